"""Work and memory traffic of DeepSeek-VL2 inference, counted from the config.

Every figure in ``bench_infer.py`` is put next to a machine limit; this module supplies the other half of
each ratio: the matmul FLOPs of a stage (prefill is matmul bound) and the bytes of weights one decode step
reads (decode is bandwidth bound). Counts are exact for the shapes the port runs, written out term by
term so they can be checked against the model code:

* a matmul [M, K] @ [K, N] is ``2·M·K·N`` FLOPs; elementwise work (norms, activations, RoPE, softmax) is
  left out, as in the usual "model FLOPs" convention;
* attention counts the causal half only (query i reads keys 0..i), i.e. the useful work;
* the MoE counts the K experts each token actually runs, plus the shared experts and the router.

Shapes: P patches per tile, C vision width, T prompt tokens, H hidden size, V vocabulary, E routed
experts, K experts per token, I_moe expert width.
"""

from __future__ import annotations

from typing import Sequence

FP32_BYTES = 4


def vision_flops(vision, projector, num_tiles: int) -> float:
    """Matmul FLOPs of the SigLIP tower plus the projector over ``num_tiles`` tiles of ``image_size``².

    vision: a ``VisionEncoderConfig``; projector: an ``MlpProjectorConfig``.
    """
    patches = vision.grid_size ** 2  # P = 729 at 384 px / 14 px
    width, hidden = vision.width, vision.mlp_hidden_dim
    patch_embed = 2 * patches * (3 * vision.patch_size ** 2) * width
    per_block = (
        2 * patches * width * 3 * width  # qkv
        + 2 * patches * width * width  # attention output projection
        + 2 * 2 * patches * patches * width  # scores and probs @ v, bidirectional (all pairs)
        + 2 * 2 * patches * width * hidden  # fc1 and fc2
    )
    tower = patch_embed + vision.layers * per_block
    return float(num_tiles * (tower + projector_flops(projector, vision.grid_size)))


def projector_flops(projector, grid_size: int) -> float:
    """Matmul FLOPs of the projector for one tile whose vision grid is ``grid_size``²."""
    kind, width, embed = projector.projector_type, projector.input_dim, projector.n_embed
    if kind == "identity":
        return 0.0
    if kind == "linear":
        return 2.0 * grid_size ** 2 * width * embed
    if kind == "mlp_gelu":
        return 2.0 * grid_size ** 2 * (width * embed + (projector.depth - 1) * embed * embed)
    ratio = projector.downsample_ratio
    tokens = (-(-grid_size // ratio)) ** 2  # g'² = 196
    merged, hidden = width * ratio * ratio, embed * projector.mlp_ratio
    return 2.0 * tokens * (merged * hidden + (projector.depth - 2) * hidden * hidden + hidden * embed)


def _attention_projection_params(config) -> int:
    """Weights of one attention layer's projections that every token multiplies by."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    if not config.use_mla:
        head_dim, kv_heads = config.head_dim, config.num_key_value_heads
        return hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    latent, rope = config.kv_lora_rank, config.qk_rope_head_dim
    if config.q_lora_rank is None:
        query = hidden * heads * config.q_head_dim
    else:
        query = hidden * config.q_lora_rank + config.q_lora_rank * heads * config.q_head_dim
    # Prefill runs MLA expanded: kv_b_proj turns each position's latent into its keys and values.
    expanded = latent * heads * (config.qk_nope_head_dim + config.v_head_dim)
    return query + hidden * (latent + rope) + expanded + heads * config.v_head_dim * hidden


def _attention_key_width(config) -> int:
    """Multiply-adds per (query, key) pair over all heads: scores plus probs @ values."""
    heads = config.num_attention_heads
    if not config.use_mla:
        return heads * 2 * config.head_dim
    # Expanded MLA: scores over the nope and rope key dimensions, the output over the value dimension.
    return heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)


def _mlp_params_per_token(config, layer_idx: int) -> int:
    """Weights one token multiplies by in a layer's MLP: the dense MLP, or K experts + shared + router."""
    hidden = config.hidden_size
    if not config.is_moe_layer(layer_idx):
        return 3 * hidden * config.intermediate_size
    shared = 3 * hidden * config.moe_intermediate_size * (config.n_shared_experts or 0)
    routed = config.num_experts_per_tok * 3 * hidden * config.moe_intermediate_size
    return routed + shared + hidden * config.n_routed_experts


def lm_prefill_flops(config, prompt_lengths: Sequence[int]) -> float:
    """Matmul FLOPs of prefilling each prompt (one per batch row) with the lm_head on its last position.

    config: a ``DeepseekV2Config``. Left padding is not counted: it is not useful work.
    """
    per_token = sum(
        _attention_projection_params(config) + _mlp_params_per_token(config, i)
        for i in range(config.num_hidden_layers)
    )
    key_width = _attention_key_width(config)
    total = 0.0
    for length in prompt_lengths:
        causal_pairs = length * (length + 1) / 2
        total += 2.0 * length * per_token
        total += 2.0 * config.num_hidden_layers * key_width * causal_pairs
        total += 2.0 * config.hidden_size * config.vocab_size  # lm_head, last position only
    return total


def expert_params(config) -> int:
    """Weights of one routed expert (gate, up and down projections)."""
    return 3 * config.hidden_size * config.moe_intermediate_size


def decode_weight_bytes(config, active_experts_per_layer: Sequence[int], matrix_bytes: int = FP32_BYTES) -> int:
    """Bytes of weights one decode step reads: everything a step touches except unused routed experts.

    active_experts_per_layer: for each MoE layer in order, how many distinct routed experts the step's
    rows used (K for one row; up to B·K for a batch of B). matrix_bytes: bytes per element of the Linear
    matrices (4 in float32, 2 when kept in bf16); norms and routers are float32 either way. The embedding
    contributes one row per token, which is negligible and left out; the KV cache is counted separately
    (``kv_cache_bytes_read``).
    """
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    if len(active_experts_per_layer) != len(moe_layers):
        raise ValueError(
            f"got expert counts for {len(active_experts_per_layer)} MoE layers, the config has {len(moe_layers)}"
        )
    hidden = config.hidden_size
    matrices = hidden * config.vocab_size  # lm_head
    others = hidden  # final norm
    norms = 2 * hidden  # input and post-attention RMSNorm
    if config.use_mla:
        norms += config.kv_lora_rank + (config.q_lora_rank or 0)  # kv_a_layernorm (and q_a_layernorm)
    matrices += config.num_hidden_layers * _attention_projection_params(config)
    others += config.num_hidden_layers * norms
    shared = 3 * hidden * config.moe_intermediate_size * (config.n_shared_experts or 0)
    router = hidden * config.n_routed_experts
    if config.moe_topk_method == "noaux_tc":
        router += config.n_routed_experts  # e_score_correction_bias
    matrices += len(moe_layers) * shared
    others += len(moe_layers) * router
    matrices += (config.num_hidden_layers - len(moe_layers)) * 3 * hidden * config.intermediate_size
    matrices += sum(active_experts_per_layer) * expert_params(config)
    return matrices * matrix_bytes + others * FP32_BYTES


def kv_cache_bytes_read(config, context_length: int, batch: int = 1, dtype_bytes: int = FP32_BYTES) -> int:
    """Bytes of KV cache one decode step reads at ``context_length`` cached positions."""
    if config.use_mla:
        per_token = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        per_token = 2 * config.num_key_value_heads * config.head_dim
    return per_token * config.num_hidden_layers * context_length * batch * dtype_bytes


def mla_cache_bytes_per_token(config, dtype_bytes: int = FP32_BYTES) -> int:
    """The compressed MLA cache per token: ``(kv_lora_rank + qk_rope_head_dim) × layers × dtype bytes``."""
    return (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * dtype_bytes
