"""A decode step in one kernel call (``cpu_decode.c``), for one to ``MAX_FEW_ROWS`` rows (one new token per
sequence):

* ``mlp_block_decode``: a layer's MLP part, a MoE with its router (logits, ``route_rows`` for the rules of
  ``moe.route``, the expert lists) or a dense MLP; the MLP modules call it when the step is not fused;
* ``decode_step`` (AVX-512 builds): the whole step up to the final norm, from the token ids: the embedding
  rows, the rotary table, the mask, then every decoder layer, each an ``MHALayer`` (the tiny model's
  multi-head attention) or an ``MLALayer`` (the small and full models' latent attention): norms,
  projections, RoPE, the cache write, attention, residuals and the MLP block;
* ``mla_decode_attention`` (AVX-512 builds): the absorbed multi-head latent attention over the compressed
  cache (a plain kernel call, no structure), which ``decode_step`` and the attention module both use.

The model describes itself once per generation (``KVCache.memo``) as the structures below, which hold the
tensors they point to; a step then costs one ctypes call. The fused call skips the modules it stands for,
so forward hooks on those (the embedding, the gate, the projections, the norms) do not see these steps;
``KVCache.routing`` records the routing.
"""
from __future__ import annotations

import ctypes
from typing import List, Optional, Tuple

import numpy as np
import paddle

from .native import (
    C_LONG, MAX_DECODE_HEAD_DIM, MAX_FEW_ROWS, MLPTable, PinnedTensors, check_status, check_step_mask, module_owners,
    inference_kernels_apply, is_bf16, kernel_library, output_tensor, vector_kernels_built, weights_readable,
)

__all__ = ["RouterConfig", "MLPBlock", "MHALayer", "MLALayer", "DecodeStack", "route_rows", "mlp_block_decode",
           "decode_step", "mla_decode_attention", "decode_rows_apply",
           "decode_step_applies"]

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
    bias = None  # the e_score_correction_bias tensor it points to (set by ``of``)

    @classmethod
    def of(cls, config, bias: Optional[paddle.Tensor]) -> "RouterConfig":
        """From a ``DeepseekV2Config`` (whose sizes it checked) and the gate's ``e_score_correction_bias``
        ([E], noaux_tc only; a float32 copy is taken if it is not float32), which it keeps as ``bias``."""
        method = cls.METHODS.index(config.moe_topk_method)
        if (bias is None) != (config.moe_topk_method != "noaux_tc"):
            raise ValueError("noaux_tc routing takes an e_score_correction_bias, other methods none")
        if bias is not None and bias.dtype != paddle.float32:
            bias = bias.astype(paddle.float32)
        grouped = config.moe_topk_method != "greedy"
        router = cls(
            config.n_routed_experts, config.num_experts_per_tok, config.n_group if grouped else 1,
            config.topk_group if grouped else 1, int(config.scoring_func == "sigmoid"), method,
            int(bool(config.norm_topk_prob)), config.routed_scaling_factor, None if bias is None else bias.data_ptr(),
        )
        router.bias = bias
        return router


class MLPBlock(ctypes.Structure):
    """A layer's MLP part (``mlp_block``): routed experts behind a router, then (``shared``) one MLP over
    every row, the shared experts or a dense MLP. Made by ``moe`` or ``dense``."""

    _fields_ = [
        ("router_weight", ctypes.c_void_p), ("router", RouterConfig), ("gate", ctypes.c_void_p),
        ("up", ctypes.c_void_p), ("down", ctypes.c_void_p), ("inter", ctypes.c_void_p), ("bf16", ctypes.c_int),
        ("shared", ctypes.c_int),
    ]

    @classmethod
    def moe(cls, table: MLPTable, router_weight: paddle.Tensor, router: RouterConfig,
            shared: bool) -> Optional["MLPBlock"]:
        """A MoE: ``table`` holds the E routed experts in order, then (``shared``) the shared experts as one
        MLP; ``router_weight`` [E, H] float32. None when the kernels do not read the experts' weights or the
        router's is not float32 (it is a bare float32 parameter in every loaded model)."""
        if len(table.intermediate) != router.n_experts + int(shared):
            raise ValueError(f"a table of {len(table.intermediate)} MLPs does not hold {router.n_experts} experts"
                             f"{' and the shared ones' if shared else ''}")
        if router_weight.dtype != paddle.float32 or not weights_readable(table.weights[0][0]):
            return None
        return cls._made(table, router, shared, router_weight)

    @classmethod
    def dense(cls, table: MLPTable) -> Optional["MLPBlock"]:
        """A dense MLP, the table's one entry. None when the kernels do not read its weights."""
        if len(table.intermediate) != 1:
            raise ValueError(f"a dense MLP block takes a table of one MLP, not {len(table.intermediate)}")
        if not weights_readable(table.weights[0][0]):
            return None
        return cls._made(table, RouterConfig(), True, None)

    @classmethod
    def _made(cls, table: MLPTable, router: RouterConfig, shared: bool,
              router_weight: Optional[paddle.Tensor]) -> "MLPBlock":
        gate, up, down, intermediate = table.addresses
        block = cls(None if router_weight is None else router_weight.data_ptr(), router, gate, up, down,
                    intermediate, table.bf16, int(shared))
        # The structure holds a copy of the router's fields; ``pinned`` keeps every tensor they point to.
        block.table = table
        block.pinned = table.pinned + PinnedTensors([t for t in (router_weight, router.bias) if t is not None])
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
    def of(cls, attention, input_norm, post_norm, mlp_block: MLPBlock, cache) -> Optional["MHALayer"]:
        """From a ``DeepseekV2MHAAttention``, the layer's two ``DeepseekV2RMSNorm``, its MLP block and the
        generation's ``KVCache``; None where the kernel does not serve the layer: no AVX-512 build, a cache
        or norm not in float32 (or norms with different epsilons), heads wider than ``MAX_DECODE_HEAD_DIM``,
        projections that are not plain bias-free ``Linear`` layers (``plain_projection_weights``) with
        weights the kernels read."""
        parts = _served_layer_parts(attention, (input_norm, post_norm), cache, attention.head_dim)
        if parts is None:
            return None
        weights, (keys, values), pinned = parts
        layer = cls(
            input_norm.weight.shape[0], attention.num_heads, attention.num_kv_heads, attention.head_dim,
            keys.shape[2], input_norm.variance_epsilon, attention.head_dim ** -0.5,
            input_norm.weight.data_ptr(), post_norm.weight.data_ptr(), _VOID_P4(*(w.data_ptr() for w in weights)),
            (ctypes.c_int * 4)(*(is_bf16(w) for w in weights)), keys.data_ptr(), values.data_ptr(),
            ctypes.pointer(mlp_block),
        )
        layer.pinned = pinned + mlp_block.pinned
        layer.block = mlp_block
        return layer


_MLA_PROJECTIONS = 5


class MLALayer(ctypes.Structure):
    """One MLA decoder layer (``mla_layer``): projections q_a, q_b (or q_proj in q_b's place, q_a NULL),
    kv_a_proj_with_mqa, kv_b and o ([out, in] weights, float32 or bf16, no biases), the four RMSNorms, the
    layer's cache (k_pe, compressed_kv) and its MLP block."""

    _fields_ = [
        ("hidden", ctypes.c_long), ("heads", ctypes.c_long), ("q_lora_rank", ctypes.c_long), ("latent", ctypes.c_long),
        ("nope", ctypes.c_long), ("rope", ctypes.c_long), ("value", ctypes.c_long), ("max_len", ctypes.c_long),
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p), ("q_a_norm", ctypes.c_void_p), ("kv_a_norm", ctypes.c_void_p),
        ("proj", ctypes.c_void_p * _MLA_PROJECTIONS), ("proj_bf16", ctypes.c_int * _MLA_PROJECTIONS),
        ("cache_k_pe", ctypes.c_void_p), ("cache_ckv", ctypes.c_void_p), ("mlp", ctypes.POINTER(MLPBlock)),
    ]

    @classmethod
    def of(cls, attention, input_norm, post_norm, mlp_block: MLPBlock, cache) -> Optional["MLALayer"]:
        """From a ``DeepseekV2Attention``, the layer's two ``DeepseekV2RMSNorm``, its MLP block and the
        generation's ``KVCache``; None where the kernel does not serve the layer, as ``MHALayer.of`` (the
        rotary width at most ``MAX_DECODE_HEAD_DIM``, all four norms float32 with one epsilon)."""
        q_a_norm = getattr(attention, "q_a_layernorm", None)
        norms = [n for n in (input_norm, post_norm, q_a_norm, attention.kv_a_layernorm) if n is not None]
        parts = _served_layer_parts(attention, norms, cache, attention.qk_rope_head_dim)
        if parts is None:
            return None
        weights, (k_pe, compressed_kv), pinned = parts  # weights: q_a (or None), q_b or q_proj, kv_a, kv_b, o
        layer = cls(
            input_norm.weight.shape[0], attention.num_heads, attention.q_lora_rank or 0, attention.kv_lora_rank,
            attention.qk_nope_head_dim, attention.qk_rope_head_dim, attention.v_head_dim, k_pe.shape[1],
            input_norm.variance_epsilon, attention.softmax_scale, input_norm.weight.data_ptr(),
            post_norm.weight.data_ptr(), None if q_a_norm is None else q_a_norm.weight.data_ptr(),
            attention.kv_a_layernorm.weight.data_ptr(),
            (ctypes.c_void_p * _MLA_PROJECTIONS)(*(None if w is None else w.data_ptr() for w in weights)),
            (ctypes.c_int * _MLA_PROJECTIONS)(*(0 if w is None else is_bf16(w) for w in weights)),
            k_pe.data_ptr(), compressed_kv.data_ptr(), ctypes.pointer(mlp_block),
        )
        layer.pinned = pinned + mlp_block.pinned
        layer.block = mlp_block
        return layer


def _served_layer_parts(attention, norms, cache, rotary_width: int):
    """(the attention's ``plain_projection_weights``, its two cache buffers, the pins of both and of the
    norms) when the decode kernel serves the layer: an AVX-512 build, a float32 cache, plain bias-free
    projections whose weights the kernels read, a rotary width of at most ``MAX_DECODE_HEAD_DIM``, float32
    norms with one epsilon; None otherwise."""
    weights = attention.plain_projection_weights()
    present = [w for w in weights or () if w is not None]
    if (
        not vector_kernels_built() or cache.dtype != paddle.float32 or weights is None
        or rotary_width > MAX_DECODE_HEAD_DIM or not all(weights_readable(w) for w in present)
        or any(n.weight.dtype != paddle.float32 or n.variance_epsilon != norms[0].variance_epsilon for n in norms)
    ):
        return None
    buffers = cache.buffers(attention.layer_idx)
    owners = module_owners([(attention, name) for name in attention.decode_projections])
    owners += [(norm, "weight") for norm in norms]
    return weights, buffers, PinnedTensors([n.weight for n in norms] + list(buffers) + present, owners)


class StackLayer(ctypes.Structure):
    """A layer of the stack ``decode_step`` runs (``stack_layer``): an ``MHALayer`` or ``MLALayer`` and the
    experts its MLP block chooses per row."""

    _fields_ = [("layer", ctypes.c_void_p), ("mla", ctypes.c_int), ("top_k", ctypes.c_long)]


class DecodeStack(ctypes.Structure):
    """A model's decode step as ``decode_step`` takes it (``decode_stack``): the decoder layers, the token
    embedding table, the rotary frequencies, the final norm and the cache's ``key_valid``; made once per
    generation."""

    _fields_ = [
        ("layers", ctypes.POINTER(StackLayer)), ("n_layers", ctypes.c_long), ("hidden", ctypes.c_long),
        ("vocab", ctypes.c_long), ("rotary_dim", ctypes.c_long), ("max_len", ctypes.c_long),
        ("embed", ctypes.c_void_p), ("embed_bf16", ctypes.c_int), ("inv_freq", ctypes.c_void_p),
        ("position_divisor", ctypes.c_float), ("mscale", ctypes.c_float), ("final_norm", ctypes.c_void_p),
        ("eps", ctypes.c_float), ("key_valid", ctypes.c_void_p),
    ]

    @classmethod
    def of(cls, layers, embedding, rotary, final_norm, cache, owners=()) -> Optional["DecodeStack"]:
        """From the layers' descriptions (``MHALayer`` / ``MLALayer``), the model's ``TokenEmbedding``,
        ``DeepseekV2RotaryEmbedding`` and final ``DeepseekV2RMSNorm``, the generation's ``KVCache``, and the
        (module, attribute) pairs that hold the model's parts (pinned: replacing one is refused); None when
        any layer is None (the kernels do not serve it), the table is neither float32 nor readable bf16, the
        norm is not float32, the rotary scaling is other than default, linear or yarn ("dynamic": its
        frequencies change with the length), or the widths do not agree."""
        layers = list(layers)
        table = embedding.weight
        if (
            not layers or any(layer is None for layer in layers) or final_norm.weight.dtype != paddle.float32
            or not weights_readable(table) or rotary.kind not in ("default", "linear", "yarn")
            or rotary.inv_freq.dtype != paddle.float32
        ):
            return None
        widths = {(layer.hidden, layer.max_len, layer.rope if isinstance(layer, MLALayer) else layer.head_dim)
                  for layer in layers}
        if widths != {(table.shape[1], layers[0].max_len, rotary.dim)}:
            return None
        entries = (StackLayer * len(layers))(*(
            StackLayer(ctypes.addressof(layer), int(isinstance(layer, MLALayer)), layer.block.router.top_k)
            for layer in layers
        ))
        first = layers[0]
        stack = cls(
            entries, len(layers), first.hidden, table.shape[0], rotary.dim, first.max_len, table.data_ptr(),
            is_bf16(table), rotary.inv_freq.data_ptr(), rotary.factor if rotary.kind == "linear" else 1.0,
            rotary.mscale, final_norm.weight.data_ptr(), final_norm.variance_epsilon, cache.key_valid.data_ptr(),
        )
        stack.entries, stack.layer_list = entries, layers  # what the structure points to
        stack.top_ks = [entry.top_k for entry in entries]
        stack.batch = cache.batch_size
        stack.pinned = sum((layer.pinned for layer in layers), PinnedTensors(
            [table, rotary.inv_freq, final_norm.weight, cache.key_valid],
            [*owners, (embedding, "weight"), (final_norm, "weight"), (rotary, "inv_freq")],
        ))
        return stack


def decode_step(
    input_ids: paddle.Tensor, position_ids: paddle.Tensor, stack: DecodeStack, position: int
) -> Tuple[paddle.Tensor, List[np.ndarray]]:
    """One decode step of the model up to its final norm, in one kernel call (``decode_step_applies``).

    Args:
        input_ids: [B, 1] int64, one new token per sequence; position_ids: [B, 1] int64, its rotary position.
        position: the cache slot the step writes (its ``key_valid`` column is set there; the caller commits).
    Returns:
        hidden [B, 1, H] after the final norm, and each MoE layer's topk_idx [B, K], in layer order.
    """
    batch = input_ids.shape[0]
    if batch != stack.batch:
        raise ValueError(f"{batch} sequences do not fit a cache made for {stack.batch}")
    for name, ids in (("input_ids", input_ids), ("position_ids", position_ids)):
        if list(ids.shape) != [batch, 1] or ids.dtype != paddle.int64:
            raise ValueError(f"{name} {list(ids.shape)} {ids.dtype} must be [{batch}, 1] int64 for a decode step")
    if not 0 <= position < stack.max_len:
        raise ValueError(f"position {position} is outside the cache of {stack.max_len}")
    stack.pinned.check()
    input_ids, position_ids = (t if t.is_contiguous() else t.contiguous() for t in (input_ids, position_ids))
    topk_idx, topk_weight = _choice_buffers(batch, sum(stack.top_ks))
    out = output_tensor([batch, 1, stack.hidden])
    status = kernel_library().decode_step(
        ctypes.addressof(stack), input_ids.data_ptr(), position_ids.data_ptr(), batch, position,
        topk_idx.ctypes.data, topk_weight.ctypes.data, out.data_ptr(),
    )
    if status == -2:
        raise ValueError(f"a token id of {input_ids.numpy().reshape(-1).tolist()} is outside the vocabulary of "
                         f"{stack.vocab}")
    check_status(status)
    chosen, first, routing = topk_idx.reshape(-1), 0, []
    for k in stack.top_ks:
        if k:
            routing.append(chosen[first:first + batch * k].reshape(batch, k))
            first += batch * k
    return out, routing


def decode_step_applies(input_ids: paddle.Tensor) -> bool:
    """Whether ``decode_step`` may serve token ids: [B, 1] int64 with at most ``MAX_FEW_ROWS`` rows,
    inference (no gradient) on the CPU, and an AVX-512 build of the kernels."""
    return (
        input_ids.ndim == 2 and input_ids.shape[1] == 1 and input_ids.shape[0] <= MAX_FEW_ROWS
        and input_ids.dtype == paddle.int64
        and not paddle.is_grad_enabled() and input_ids.place.is_cpu_place() and vector_kernels_built()
    )


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
    block.pinned.check()
    x = x if x.is_contiguous() else x.contiguous()
    topk_idx, topk_weight = _choice_buffers(rows, block.router.top_k)
    out = output_tensor([rows, hidden])
    check_status(kernel_library().mlp_block_decode(
        ctypes.addressof(block), x.data_ptr(), rows, hidden, topk_idx.ctypes.data, topk_weight.ctypes.data,
        out.data_ptr(),
    ))
    return out, topk_idx, topk_weight


def mla_decode_attention(
    q_nope: paddle.Tensor, q_pe: paddle.Tensor, k_pe: paddle.Tensor, compressed_kv: paddle.Tensor,
    kv_b_weight: paddle.Tensor, mask: paddle.Tensor, keys: int, scale: float,
) -> paddle.Tensor:
    """Absorbed MLA attention of one new token per sequence (``native.mha_kernels_apply``: float32 cache).

    Args:
        q_nope: [B, 1, nh, Dn]; q_pe: [B, 1, nh, R], rotated.
        k_pe, compressed_kv: [B, L, R] and [B, L, C], the layer's cache with positions 0 .. keys - 1 written
            (the new token's included).
        kv_b_weight: ``kv_b_proj.weight`` as stored, [nh * (Dn + Dv), C] float32 or bfloat16 (each head's
            W_UK rows, then its W_UV rows): read in place, in the layout of the checkpoint.
        mask: additive [B, 1, 1, L]; scale: the softmax scale.
    Returns:
        [B, 1, nh * Dv], the attention output before ``o_proj``.
    """
    batch, _, heads, nope = q_nope.shape
    max_len, latent, rope = compressed_kv.shape[1], compressed_kv.shape[2], q_pe.shape[-1]
    check_step_mask(mask, batch, max_len)
    rows = kv_b_weight.shape[0]
    if (rows % heads or rows // heads <= nope or list(kv_b_weight.shape) != [rows, latent]
            or not weights_readable(kv_b_weight)):
        raise ValueError(f"mla_decode_attention: kv_b_weight is {list(kv_b_weight.shape)} {kv_b_weight.dtype}, "
                         f"expected [{heads} * ({nope} + value), {latent}] float32 or bfloat16")
    value = rows // heads - nope
    shapes = {
        "q_pe": (q_pe, [batch, 1, heads, rope]), "k_pe": (k_pe, [batch, max_len, rope]),
        "compressed_kv": (compressed_kv, [batch, max_len, latent]), "mask": (mask, list(mask.shape)),
        "q_nope": (q_nope, [batch, 1, heads, nope]),
    }
    for name, (tensor, shape) in shapes.items():
        if list(tensor.shape) != shape or tensor.dtype != paddle.float32:
            raise ValueError(f"mla_decode_attention: {name} is {list(tensor.shape)} {tensor.dtype}, expected {shape} "
                             "float32")
    if not 1 <= keys <= max_len:
        raise ValueError(f"mla_decode_attention reads {keys} positions of a cache of {max_len}")
    q_nope, q_pe, k_pe, compressed_kv, kv_b_weight, mask = (
        t if t.is_contiguous() else t.contiguous() for t in (q_nope, q_pe, k_pe, compressed_kv, kv_b_weight, mask)
    )
    out = output_tensor([batch, 1, heads * value])
    check_status(kernel_library().mla_decode_attention(
        q_nope.data_ptr(), q_pe.data_ptr(), k_pe.data_ptr(), compressed_kv.data_ptr(), kv_b_weight.data_ptr(),
        is_bf16(kv_b_weight), mask.data_ptr(), out.data_ptr(), batch, heads, nope, rope, latent, value,
        max_len, keys, scale,
    ))
    return out


def _choice_buffers(rows: int, top_k: int) -> Tuple[np.ndarray, np.ndarray]:
    return np.empty([rows, top_k], dtype=C_LONG), np.empty([rows, top_k], dtype=np.float32)
