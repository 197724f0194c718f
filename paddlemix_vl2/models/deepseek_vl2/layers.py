"""Building blocks shared by the towers: the torch-layout Linear, RMSNorm, the SiLU-gated MLP and softmax
attention in heads-first layout."""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn
from paddle.incubate.nn.functional import fused_rms_norm
from paddle.base.initializer import _global_weight_initializer
from paddle.nn.initializer.lazy_init import lazy_init_helper

from .native import (
    MLPTable, add_bias_, few_rows_applies, few_rows_linear, gelu_tanh_, gemm_applies, inference_kernels_apply,
    linear, mlp_kernels_apply, rms_norm, softmax_last_axis, swiglu_mlps, vector_kernels_apply,
)
from .native_decode import MLPBlock

__all__ = [
    "Linear", "TokenEmbedding", "DeepseekV2RMSNorm", "DeepseekV2MLP", "attend", "masked_softmax", "softmax_float32",
    "gelu_tanh", "cpu_has_avx512f", "memoized_native_table",
    "ACTIVATION_BLOCK_BYTES",
]

# Largest activation the towers form at once during a forward. glibc serves allocations above 32 MiB
# with fresh mmaps, and faulting those pages in (about 0.6 ms per MB on the KVM benchmark machine) costs
# more than the arithmetic that fills them; blocks below the threshold reuse memory already in the process.
ACTIVATION_BLOCK_BYTES = 16 << 20


class Linear(nn.Layer):
    """``y = x @ weight.T + bias`` with ``weight`` [out_features, in_features], the layout of the official
    checkpoints (torch's), where Paddle's ``nn.Linear`` keeps [in, out].

    Why not ``nn.Linear``: a decode step reads every weight once per token, and one output's weights
    contiguous is what lets ``native.few_rows_linear`` stream a matrix once for up to four rows (a batch of
    four on the tiny lm_head: 25 ms against 70 ms through MKL with either layout). The checkpoints load
    and save without a transpose. More rows take the package's GEMM in float32 CPU inference on AVX-512
    (``native.linear``, bias added as it writes), Paddle's matmul with ``transpose_y`` elsewhere (training,
    GPUs), which runs at the same rate as with [in, out].

    A randomly initialised layer draws what ``nn.Linear`` draws (Xavier-uniform over [in, out], then
    transposed), so a seeded model starts from the same weights as before the layout changed.
    """

    def __init__(self, in_features: int, out_features: int, weight_attr=None, bias_attr=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # create_parameter deep-copies the attr it is given: None (no attr) costs nothing, which a build of
        # thousands of experts notices.
        draw_like_nn_linear = (
            (weight_attr is None or paddle.ParamAttr._to_attr(weight_attr).initializer is None)
            and _global_weight_initializer() is None
            and not lazy_init_helper().state
        )
        self.weight = self.create_parameter(
            [out_features, in_features], attr=weight_attr,
            default_initializer=nn.initializer.Constant(0.0) if draw_like_nn_linear else None,
        )
        if draw_like_nn_linear:
            limit = math.sqrt(6.0 / (in_features + out_features))
            drawn = paddle.uniform([in_features, out_features], dtype=self.weight.dtype, min=-limit, max=limit)
            self.weight.set_value(drawn.T)
        self.bias = (
            None if bias_attr is False
            else self.create_parameter([out_features], attr=bias_attr, is_bias=True)
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """x [..., in_features] -> [..., out_features]."""
        rows = math.prod(x.shape[:-1])
        if few_rows_applies(x, self.weight, rows):
            y = few_rows_linear(x, self.weight)
        elif gemm_applies(x, self.weight, rows) and (self.bias is None or self.bias.dtype == paddle.float32):
            return linear(x, self.weight, self.bias)
        else:
            # A bf16-stored weight (float32 CPU inference) outside the kernels' reach is widened per call.
            weight = self.weight if self.weight.dtype == x.dtype else self.weight.astype(x.dtype)
            y = paddle.matmul(x, weight, transpose_y=True)
        if self.bias is None:
            return y
        if inference_kernels_apply(y) and self.bias.dtype == paddle.float32 and y.is_contiguous():
            return add_bias_(y, self.bias)  # y is this call's own output
        return y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class TokenEmbedding(nn.Embedding):
    """``nn.Embedding`` whose rows come out in float32 when its table is kept in bf16 for float32 CPU
    inference (bf16 storage, ``checkpoint.py``): the lookup copies the rows as stored, and the model
    goes on in float32. Anywhere else exactly ``nn.Embedding``."""

    def forward(self, ids: paddle.Tensor) -> paddle.Tensor:
        """ids [...] int64 -> [..., embedding_dim]."""
        rows = super().forward(ids)
        return rows.astype(paddle.float32) if rows.dtype == paddle.bfloat16 and rows.place.is_cpu_place() else rows


class DeepseekV2RMSNorm(nn.Layer):
    """RMSNorm that normalises in float32, casts back, then scales (the official order).

    Float32 inference on the CPU runs the package's kernel (``native.rms_norm``) or, without it, on a CPU
    with AVX-512F, Paddle's fused kernel: one call instead of eight ops, the same math up to rounding
    (about 1e-6 relative). Paddle's has no gradient on CPU and, in Paddle 3.3, no code path without
    AVX-512F (it dies with SIGILL on an AVX2-only AMD EPYC, Zen 3), so training, half-precision
    activations (where the cast-back order matters), other CPUs and GPUs (not measured) take the
    written-out path.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = self.create_parameter([hidden_size], default_initializer=nn.initializer.Constant(1.0))
        self.variance_epsilon = eps

    def forward(self, hidden_states: paddle.Tensor) -> paddle.Tensor:
        """hidden_states: [..., hidden_size] -> same shape and dtype."""
        if inference_kernels_apply(hidden_states) and self.weight.dtype == paddle.float32:
            return rms_norm(hidden_states, self.weight, self.variance_epsilon)
        if (
            hidden_states.dtype == paddle.float32 and not paddle.is_grad_enabled()
            and hidden_states.place.is_cpu_place() and cpu_has_avx512f()
        ):
            return fused_rms_norm(
                hidden_states, self.weight, None, self.variance_epsilon, begin_norm_axis=hidden_states.ndim - 1
            )[0]
        x = hidden_states.astype(paddle.float32)
        # square, not pow(2): Paddle's CPU pow is 12x slower forward (8x with its gradient) and 1 ulp off
        # x * x on some elements (torch's pow(2) is exact).
        x = x * paddle.rsqrt(paddle.square(x).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.astype(hidden_states.dtype)


@functools.lru_cache(maxsize=None)
def cpu_has_avx512f() -> bool:
    """Whether this CPU runs AVX-512F instructions (Paddle's own CPU-feature probe; a Paddle without the
    probe counts as no, which only costs the fused kernel)."""
    probe = getattr(paddle.base.core, "supports_avx512f", None)
    return bool(probe()) if probe is not None else False


class DeepseekV2MLP(nn.Layer):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``; the dense MLP, each routed expert and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias_attr=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias_attr=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias_attr=False)

    def forward(self, x: paddle.Tensor, cache=None) -> paddle.Tensor:
        """x: [..., hidden_size] -> [..., hidden_size]. ``cache``: the generation's ``KVCache``, where the
        kernel's weight table is kept (``native.MLPTable``), or None."""
        rows = math.prod(x.shape[:-1])
        if mlp_kernels_apply(x, self.down_proj.weight, rows):
            table = memoized_native_table(self, cache)
            if table is not None:
                scales = np.ones(rows, dtype=np.float32)
                return swiglu_mlps(x, table, np.zeros(1, dtype=np.int64), [rows], np.arange(rows), scales)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def native_table(self) -> Optional[MLPTable]:
        """This MLP as a one-entry ``native.MLPTable``, or None (see ``native_weights``)."""
        return MLPTable.of([self.native_weights()])

    def decode_block(self, cache) -> Optional[MLPBlock]:
        """This MLP as the decode kernels take it (``native_decode.MLPBlock``), kept in the generation's
        ``KVCache``; None where they do not serve it."""

        def build():
            table = memoized_native_table(self, cache)
            return None if table is None else MLPBlock.dense(table)

        return cache.memo((id(self), "decode_block"), build)

    def native_weights(self):
        """(gate [I, H], up [I, H], down [H, I]) as ``native.swiglu_mlps`` takes them, or None when a
        projection is not a plain ``Linear`` (a LoRA wrapper: the kernel would leave its adapter out) or
        the three differ in dtype (a LoRA merge into bf16 storage leaves its merged weights float32)."""
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        if not all(type(projection) is Linear for projection in projections):
            return None
        weights = tuple(projection.weight for projection in projections)
        return weights if weights[0].dtype == weights[1].dtype == weights[2].dtype else None


def memoized_native_table(layer: nn.Layer, cache) -> Optional[MLPTable]:
    """``layer.native_table()`` (an MLP or a MoE), kept in the generation's ``KVCache`` when there is one."""
    if cache is None:
        return layer.native_table()
    return cache.memo((id(layer), "mlp_table"), layer.native_table)


def attend(query: paddle.Tensor, keys: paddle.Tensor, values: paddle.Tensor, mask: Optional[paddle.Tensor],
           scale: float) -> paddle.Tensor:
    """Softmax attention in heads-first layout: the math ``F.scaled_dot_product_attention`` runs on CPU.

    SDPA takes [B, S, heads, D] and transposes q, k and v to heads-first on every call, through Paddle's
    element-by-element strided copy. Callers here already hold heads-first tensors (the KV cache stores
    keys that way; the ViT builds them with block copies), so the same math runs on that layout.

    The [.., T, S] scores are formed for a few rows of the leading axis at a time (for one sequence, its
    key/value heads become that axis, a free reshape), so no block exceeds ``ACTIVATION_BLOCK_BYTES``.

    Args:
        query: [B, nh, T, D]; keys, values: [B, kv_heads, S, D] with nh a multiple of kv_heads.
        mask: additive [B, 1, T, S], or None for none.

    Returns:
        [B, nh, T, D], heads-first like the inputs.
    """
    bsz, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = keys.shape[1], keys.shape[2]
    if bsz == 1 and kv_heads > 1:
        out = attend(
            query.reshape([kv_heads, heads // kv_heads, q_len, head_dim]),
            keys.reshape([kv_heads, 1, kv_len, head_dim]), values.reshape([kv_heads, 1, kv_len, head_dim]),
            mask, scale,
        )
        return out.reshape([1, heads, q_len, head_dim])
    block = max(1, ACTIVATION_BLOCK_BYTES // (heads * q_len * kv_len * query.element_size()))
    if block >= bsz:
        return _attend_block(query, keys, values, mask, scale)
    outputs = []
    for start in range(0, bsz, block):
        rows = slice(start, start + block)
        block_mask = mask if mask is None or mask.shape[0] == 1 else mask[rows]
        outputs.append(_attend_block(query[rows], keys[rows], values[rows], block_mask, scale))
    return paddle.concat(outputs)


def _attend_block(query: paddle.Tensor, keys: paddle.Tensor, values: paddle.Tensor, mask: Optional[paddle.Tensor],
                  scale: float) -> paddle.Tensor:
    """``attend`` on one block: query [b, nh, T, D], keys/values [b, kv_heads, S, D] -> [b, nh, T, D]."""
    bsz, heads, q_len, head_dim = query.shape
    kv_heads = keys.shape[1]
    rows = heads // kv_heads * q_len  # the query heads sharing one key/value head, folded into rows
    scores = paddle.matmul((query * scale).reshape([bsz, kv_heads, rows, head_dim]), keys, transpose_y=True)
    probs = masked_softmax(scores.reshape([bsz, heads, q_len, -1]), mask, overwrite=True)
    probs = probs.reshape([bsz, kv_heads, rows, -1])
    return paddle.matmul(probs, values).reshape([bsz, heads, q_len, head_dim])


def masked_softmax(scores: paddle.Tensor, mask: Optional[paddle.Tensor], overwrite: bool = False) -> paddle.Tensor:
    """``softmax_float32(scores + mask)``; scores [B, nh, T, S], mask additive [B or 1, 1, T, S] or None.
    ``overwrite``: the scores are the caller's scratch and may hold the result.

    In inference on an AVX-512 CPU the native kernel adds the mask row by row and normalises in place.
    Otherwise the mask is expanded to the scores' shape before the add: Paddle's CPU add is several times
    slower when it broadcasts (a [10, 1, 1037, 1037] + [1, 1, 1037, 1037] add: 118 ms, expand then add:
    61 ms; [4, 4, 241, 241] + [4, 1, 241, 241]: 7.6 against 0.5 ms), and the sums are the same.
    """
    if vector_kernels_apply(scores) and (mask is None or mask.dtype == paddle.float32):
        return softmax_last_axis(scores, overwrite, mask)
    if mask is not None:
        scores = scores + (mask if mask.shape == scores.shape else mask.expand(scores.shape))
    return softmax_float32(scores)


def softmax_float32(scores: paddle.Tensor) -> paddle.Tensor:
    """Softmax over the last axis, computed in float32 whatever the activation dtype."""
    if scores.dtype == paddle.float32:
        return F.softmax(scores, axis=-1)
    return F.softmax(scores.astype(paddle.float32), axis=-1).astype(scores.dtype)


def gelu_tanh(x: paddle.Tensor, overwrite: bool = False) -> paddle.Tensor:
    """The tanh-approximate GELU (SigLIP's). ``overwrite``: ``x`` is the caller's scratch, and the native
    kernel (inference, AVX-512) writes the result there."""
    if overwrite and vector_kernels_apply(x):
        return gelu_tanh_(x)
    return F.gelu(x, approximate=True)
