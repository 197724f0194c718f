"""A decode step's layer blocks in one kernel call each (``cpu_decode.c``), for one to ``MAX_FEW_ROWS``
rows (one new token per sequence):

* ``mlp_block_decode``: a layer's MLP part, a MoE with its router (logits, ``route_rows`` for the rules of
  ``moe.route``, the expert lists) or a dense MLP;
* ``mha_layer_decode`` (AVX-512 builds): a whole decoder layer with multi-head attention (the tiny model's):
  norms, projections, ``native.mha_decode``, residuals and the MLP block.

The layers describe themselves once per generation (``KVCache.memo``) as the structures below, which hold
the tensors they point to; a step then costs one ctypes call per layer. Alternating fused and plain steps
in one process on the tiny model (bf16 storage, 600-token context): the MoE block alone took 4 ms off a
45 ms step.
"""
from __future__ import annotations

import ctypes
from typing import Optional, Tuple

import numpy as np
import paddle

from .native import (
    C_LONG, MAX_DECODE_HEAD_DIM, MAX_FEW_ROWS, MLPTable, check_status, inference_kernels_apply, is_bf16,
    kernel_library, output_tensor, weights_readable,
)

__all__ = ["RouterConfig", "MLPBlock", "MHALayer", "route_rows", "mlp_block_decode", "mha_layer_decode",
           "decode_rows_apply"]

_VOID_P4 = ctypes.c_void_p * 4


class RouterConfig(ctypes.Structure):
    """``moe.route``'s rules for one MoE layer (``router_config`` in ``cpu_decode.c``)."""

    _fields_ = [
        ("n_experts", ctypes.c_long), ("top_k", ctypes.c_long), ("n_group", ctypes.c_long),
        ("topk_group", ctypes.c_long), ("sigmoid", ctypes.c_int), ("method", ctypes.c_int),
        ("norm_topk_prob", ctypes.c_int), ("routed_scaling_factor", ctypes.c_float),
        ("e_score_correction_bias", ctypes.c_void_p),
    ]
    METHODS = ("greedy", "group_limited_greedy", "noaux_tc")

    @classmethod
    def of(cls, config, bias: Optional[paddle.Tensor]) -> "RouterConfig":
        """From a ``DeepseekV2Config`` and the gate's ``e_score_correction_bias`` (float32 [E], noaux_tc only),
        which the structure keeps."""
        method = cls.METHODS.index(config.moe_topk_method)
        if (bias is None) != (config.moe_topk_method != "noaux_tc") or (bias is not None and bias.dtype != paddle.float32):
            raise ValueError("noaux_tc routing takes a float32 e_score_correction_bias, other methods none")
        router = cls(
            config.n_routed_experts, config.num_experts_per_tok, config.n_group or 1, config.topk_group or 1,
            int(config.scoring_func == "sigmoid"), method, int(bool(config.norm_topk_prob)),
            config.routed_scaling_factor, None if bias is None else bias.data_ptr(),
        )
        router.bias = bias
        return router


class MLPBlock(ctypes.Structure):
    """A layer's MLP part (``mlp_block``): routed experts behind a router, then (``shared``) one MLP over
    every row, the shared experts or a dense MLP."""

    _fields_ = [
        ("router_weight", ctypes.c_void_p), ("router_bf16", ctypes.c_int), ("router", RouterConfig),
        ("gate", ctypes.c_void_p), ("up", ctypes.c_void_p), ("down", ctypes.c_void_p), ("inter", ctypes.c_void_p),
        ("bf16", ctypes.c_int), ("shared", ctypes.c_int),
    ]

    @classmethod
    def of(cls, table: MLPTable, router_weight: Optional[paddle.Tensor] = None,
           router: Optional[RouterConfig] = None, shared: bool = True) -> Optional["MLPBlock"]:
        """The block over ``table`` (routed experts in order, then the shared MLP) with the router's [E, H]
        weight and rules; without a router, the table's one MLP (a dense layer). None when the kernels do
        not read the weights (bf16 without AVX512BW)."""
        if not weights_readable(table.weights[0][0]) or (router_weight is not None and not weights_readable(router_weight)):
            return None
        router = router if router is not None else RouterConfig()
        gate, up, down, intermediate = table.addresses
        block = cls(
            None if router_weight is None else router_weight.data_ptr(),
            0 if router_weight is None else is_bf16(router_weight), router, gate, up, down, intermediate,
            table.bf16, int(shared),
        )
        block.table, block.router_weight_tensor = table, router_weight
        block.router_keep = router  # the structure is copied into the block; its bias tensor lives here
        return block


class MHALayer(ctypes.Structure):
    """One MHA decoder layer (``mha_layer``): projections q, k, v, o ([out, in] weights, float32 or bf16,
    no biases), the layer's heads-first cache and its MLP block."""

    _fields_ = [
        ("hidden", ctypes.c_long), ("heads", ctypes.c_long), ("kv_heads", ctypes.c_long),
        ("head_dim", ctypes.c_long), ("max_len", ctypes.c_long), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
        ("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("proj", _VOID_P4),
        ("proj_bf16", ctypes.c_int * 4), ("cache_k", ctypes.c_void_p), ("cache_v", ctypes.c_void_p),
        ("mlp", ctypes.POINTER(MLPBlock)),
    ]

    @classmethod
    def of(cls, attention, input_norm, post_norm, mlp_block: MLPBlock, cache, layer_idx: int) -> Optional["MHALayer"]:
        """From a ``DeepseekV2MHAAttention``, the layer's two ``DeepseekV2RMSNorm``, its MLP block and the
        generation's ``KVCache``; None where the kernel does not serve the layer (no AVX-512 build, a cache
        or norm not in float32, heads wider than ``MAX_DECODE_HEAD_DIM``, a projection that is not a plain
        ``Linear`` without bias whose weight the kernels read: ``attention_bias`` is false in every
        DeepSeek-VL2 checkpoint)."""
        from .layers import Linear

        library = kernel_library()
        projections = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj)
        if (
            library is None or library.vector_lanes() != 16 or cache.dtype != paddle.float32
            or attention.head_dim > MAX_DECODE_HEAD_DIM
            or any(norm.weight.dtype != paddle.float32 for norm in (input_norm, post_norm))
            or any(type(p) is not Linear or p.bias is not None or not weights_readable(p.weight) for p in projections)
        ):
            return None
        keys, values = cache.buffers(layer_idx)
        layer = cls(
            input_norm.weight.shape[0], attention.num_heads, attention.num_kv_heads, attention.head_dim,
            keys.shape[2], input_norm.variance_epsilon, attention.head_dim ** -0.5,
            input_norm.weight.data_ptr(), post_norm.weight.data_ptr(),
            _VOID_P4(*(p.weight.data_ptr() for p in projections)),
            (ctypes.c_int * 4)(*(is_bf16(p.weight) for p in projections)),
            keys.data_ptr(), values.data_ptr(), ctypes.pointer(mlp_block),
        )
        layer.tensors = (input_norm.weight, post_norm.weight, keys, values, *(p.weight for p in projections))
        layer.block = mlp_block
        return layer


def decode_rows_apply(x: paddle.Tensor) -> bool:
    """Whether the decode kernels serve ``x`` [B, 1, H] or [N, H]: at most ``MAX_FEW_ROWS`` rows and
    ``inference_kernels_apply``."""
    return x.shape[0] <= MAX_FEW_ROWS and inference_kernels_apply(x)


def route_rows(logits: paddle.Tensor, router: RouterConfig) -> Tuple[np.ndarray, np.ndarray]:
    """``moe.route`` by the kernel (ties to the lower index): logits [N, E] float32 on the CPU ->
    (topk_idx [N, K] int64, topk_weight [N, K] float32)."""
    rows = logits.shape[0]
    logits = logits if logits.is_contiguous() else logits.contiguous()
    topk_idx, topk_weight = _choice_buffers(rows, router.top_k)
    check_status(kernel_library().route_rows(
        logits.data_ptr(), rows, ctypes.addressof(router), topk_idx.ctypes.data, topk_weight.ctypes.data
    ))
    return topk_idx, topk_weight


def mlp_block_decode(x: paddle.Tensor, block: MLPBlock) -> Tuple[paddle.Tensor, np.ndarray, np.ndarray]:
    """The block on x [N, H] float32 (``decode_rows_apply``) -> (out [N, H], topk_idx [N, K] int64,
    topk_weight [N, K] float32: the router's choice, as ``moe.route`` gives it; K = 0 without a router)."""
    rows, hidden = x.shape
    block.table.check_current()
    x = x if x.is_contiguous() else x.contiguous()
    topk_idx, topk_weight = _choice_buffers(rows, block.router.top_k)
    out = output_tensor([rows, hidden])
    check_status(kernel_library().mlp_block_decode(
        ctypes.addressof(block), x.data_ptr(), rows, hidden, topk_idx.ctypes.data, topk_weight.ctypes.data,
        out.data_ptr(),
    ))
    return out, topk_idx, topk_weight


def mha_layer_decode(
    x: paddle.Tensor, layer: MHALayer, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor, position: int
) -> Tuple[paddle.Tensor, np.ndarray]:
    """The decoder layer on one new token per sequence (``decode_rows_apply``).

    Args:
        x: [B, 1, H] float32; cos, sin: [B, 1, head_dim], the rotary table at the new positions.
        mask: additive [B, 1, 1, max_len] float32; position: the new tokens' cache slot (written here).
    Returns:
        [B, 1, H], and the MoE's topk_idx [B, K] (K = 0 for a dense layer).
    """
    batch = x.shape[0]
    if list(mask.shape) != [batch, 1, 1, layer.max_len]:
        raise ValueError(f"mask {list(mask.shape)} does not fit a one-token step over a cache of {layer.max_len}")
    layer.block.table.check_current()
    x, cos, sin, mask = (t if t.is_contiguous() else t.contiguous() for t in (x, cos, sin, mask))
    topk_idx, topk_weight = _choice_buffers(batch, layer.block.router.top_k)
    out = output_tensor(x.shape)
    check_status(kernel_library().mha_layer_decode(
        ctypes.addressof(layer), x.data_ptr(), batch, cos.data_ptr(), sin.data_ptr(), mask.data_ptr(), position,
        topk_idx.ctypes.data, topk_weight.ctypes.data, out.data_ptr(),
    ))
    return out, topk_idx


def _choice_buffers(rows: int, top_k: int) -> Tuple[np.ndarray, np.ndarray]:
    return np.empty([rows, top_k], dtype=C_LONG), np.empty([rows, top_k], dtype=np.float32)
