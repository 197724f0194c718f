"""Rotary position embeddings: the default table and the ``linear``, ``dynamic`` and ``yarn`` scalings.

cos/sin are computed from float32 positions and float32 inverse frequencies, then cast to the
activation dtype, as the official code does when loaded with ``torch_dtype`` (``inference.py``).
Two layouts rotate with the same table:
* the MHA path (tiny, Llama style) rotates the whole head with NeoX ``rotate_half``;
* the MLA path first de-interleaves ``[x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...]`` and then
  applies ``rotate_half``, which equals GPT-J interleaved RoPE.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import paddle
from paddle import nn

from .configuration_deepseek import DeepseekV2Config

__all__ = ["DeepseekV2RotaryEmbedding", "apply_rotary_pos_emb", "yarn_get_mscale"]


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _inv_freq(dim: int, base: float) -> paddle.Tensor:
    """[dim // 2] float32."""
    return 1.0 / (base ** (paddle.arange(0, dim, 2, dtype=paddle.float32) / dim))


class DeepseekV2RotaryEmbedding(nn.Layer):
    """cos/sin for arbitrary position ids, with the scaling the config asks for.

    ``forward(position_ids [B, T]) -> (cos, sin)``, each [B, T, dim] in ``dtype``.
    """

    def __init__(self, dim: int, config: DeepseekV2Config):
        super().__init__()
        self.dim = dim
        self.base = config.rope_theta
        self.max_position_embeddings = config.max_position_embeddings
        scaling = config.rope_scaling or {}
        self.kind = scaling.get("type", scaling.get("rope_type", "default"))
        self.factor = float(scaling.get("factor", 1.0))
        self.mscale = 1.0
        inv_freq = _inv_freq(dim, self.base)
        if self.kind == "yarn":
            original_max = scaling.get("original_max_position_embeddings", 4096)
            beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)
            low = max(math.floor(_yarn_correction_dim(beta_fast, dim, self.base, original_max)), 0)
            high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, self.base, original_max)), dim - 1)
            if low == high:
                high += 0.001
            ramp = paddle.clip((paddle.arange(dim // 2, dtype=paddle.float32) - low) / (high - low), 0, 1)
            extrapolation_weight = 1.0 - ramp
            inv_freq = (inv_freq / self.factor) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
            self.mscale = yarn_get_mscale(self.factor, scaling.get("mscale", 1)) / yarn_get_mscale(
                self.factor, scaling.get("mscale_all_dim", 0)
            )
        self.register_buffer("inv_freq", inv_freq, persistable=False)

    def _dynamic_inv_freq(self, seq_len: int) -> paddle.Tensor:
        if seq_len <= self.max_position_embeddings:
            return self.inv_freq
        base = self.base * (
            (self.factor * seq_len / self.max_position_embeddings) - (self.factor - 1)
        ) ** (self.dim / (self.dim - 2))
        return _inv_freq(self.dim, base)

    def forward(
        self, position_ids: paddle.Tensor, dtype, seq_len: Optional[int] = None
    ) -> Tuple[paddle.Tensor, paddle.Tensor]:
        inv_freq = self._dynamic_inv_freq(seq_len or 0) if self.kind == "dynamic" else self.inv_freq
        positions = position_ids.astype(paddle.float32)
        if self.kind == "linear":
            positions = positions / self.factor
        freqs = positions.unsqueeze(-1) * inv_freq  # [B, T, dim/2]
        emb = paddle.concat([freqs, freqs], axis=-1)  # [B, T, dim]
        cos, sin = emb.cos(), emb.sin()
        if self.mscale != 1.0:
            cos, sin = cos * self.mscale, sin * self.mscale
        return cos.astype(dtype), sin.astype(dtype)


def _rotate_half(x: paddle.Tensor) -> paddle.Tensor:
    x1, x2 = x.chunk(2, axis=-1)
    return paddle.concat([-x2, x1], axis=-1)


def _deinterleave(x: paddle.Tensor) -> paddle.Tensor:
    """[..., d] -> [..., d] as ``[x0, x2, x4, ..., x1, x3, x5, ...]``."""
    shape = x.shape
    return x.reshape(shape[:-1] + [shape[-1] // 2, 2]).transpose(
        list(range(len(shape) - 1)) + [len(shape), len(shape) - 1]
    ).reshape(shape)


def apply_rotary_pos_emb(
    x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, interleaved: bool
) -> paddle.Tensor:
    """Rotate ``x`` [B, T, (heads,) dim] with cos/sin [B, T, dim].

    ``interleaved=True`` is the MLA layout (de-interleave first); the result keeps the de-interleaved
    order, which is what the official cache holds.
    """
    if interleaved:
        x = _deinterleave(x)
    if x.ndim == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        if x.shape[1] > 1:
            # Paddle's CPU multiply is several times slower when it broadcasts over the heads axis
            # ([1, 1037, 10, 128] * [1, 1037, 1, 128]: 23 ms, expand then multiply: 9 ms); for one decode
            # token the two extra ops would cost more than they save.
            cos, sin = cos.expand(x.shape), sin.expand(x.shape)
    return x * cos + _rotate_half(x) * sin
