"""Building blocks shared by attention, MoE and the decoder: RMSNorm and the SiLU-gated MLP."""
from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddle import nn

__all__ = ["DeepseekV2RMSNorm", "DeepseekV2MLP"]


class DeepseekV2RMSNorm(nn.Layer):
    """RMSNorm that normalises in float32, casts back, then scales (the official order)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = self.create_parameter([hidden_size], default_initializer=nn.initializer.Constant(1.0))
        self.variance_epsilon = eps

    def forward(self, hidden_states: paddle.Tensor) -> paddle.Tensor:
        """hidden_states: [..., hidden_size] -> same shape and dtype."""
        x = hidden_states.astype(paddle.float32)
        x = x * paddle.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.astype(hidden_states.dtype)


class DeepseekV2MLP(nn.Layer):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``; the dense MLP, each routed expert and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias_attr=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias_attr=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias_attr=False)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """x: [..., hidden_size] -> [..., hidden_size]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
