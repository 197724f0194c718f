"""Self-attention of the DeepSeek-V2 language model.

* ``DeepseekV2MHAAttention``: plain multi-head attention with NeoX RoPE over the whole head
  (``use_mla=false``, DeepSeek-VL2-tiny; the official code runs Llama's attention there).
* ``DeepseekV2Attention``: multi-head latent attention in the absorbed form of the official eager path.
  Keys and values are never expanded per head: the cache holds one shared latent per token,
  ``compressed_kv`` [C] plus the rotated ``k_pe`` [R], and ``kv_b_proj`` is folded into the query
  (W_UK) and the output (W_UV).

Shapes: B batch, T new tokens, S key positions (T without a cache; the cache's whole ``max_length``
with one), nh heads, C kv_lora_rank, R qk_rope_head_dim, Dn qk_nope_head_dim, Dv v_head_dim. ``mask`` is
additive [B, 1, T, S] in the activation dtype; ``position_embeddings`` the (cos, sin) [B, T, rope dim] the
model computes once per forward for all layers.
"""
from __future__ import annotations

from typing import Optional, Tuple

import paddle
from paddle import nn

from .configuration_deepseek import DeepseekV2Config
from .kv_cache import KVCache
from .layers import DeepseekV2RMSNorm, Linear, attend, masked_softmax
from .native import (
    MAX_DECODE_HEAD_DIM, attention_prefill, mha_decode, mha_kernels_apply, rope_store_prefill, weights_readable,
)
from .native_decode import mla_decode_attention
from .rotary import apply_rotary_pos_emb, yarn_get_mscale

__all__ = ["DeepseekV2Attention", "DeepseekV2MHAAttention", "build_attention"]


class DeepseekV2MHAAttention(nn.Layer):
    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias_attr=bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias_attr=bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias_attr=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias_attr=bias)

    decode_projections = ("q_proj", "k_proj", "v_proj", "o_proj")

    def plain_projection_weights(self) -> Optional[Tuple[paddle.Tensor, ...]]:
        """The weights of ``decode_projections`` as the decode kernel takes them (``native_decode.MHALayer``);
        see ``plain_weights``."""
        return plain_weights([getattr(self, name) for name in self.decode_projections])

    def forward(
        self,
        hidden_states: paddle.Tensor,
        position_embeddings: Tuple[paddle.Tensor, paddle.Tensor],
        mask: paddle.Tensor,
        cache: Optional[KVCache] = None,
        cache_start: int = 0,
    ) -> paddle.Tensor:
        """hidden_states [B, T, H], position_embeddings (cos, sin) [B, T, head_dim] -> [B, T, H]."""
        bsz, q_len, _ = hidden_states.shape
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        cos, sin = position_embeddings
        native = cache is not None and mha_kernels_apply(q, cache.dtype)
        if native:
            keys, values = cache.buffers(self.layer_idx)
            if q_len == 1 and self.head_dim <= MAX_DECODE_HEAD_DIM:
                return self.o_proj(mha_decode(q, k, v, cos, sin, keys, values, mask, cache_start, self.head_dim ** -0.5))
            q = rope_store_prefill(q, k, v, cos, sin, keys, values, cache_start)
            return self.o_proj(attention_prefill(q, keys, values, mask, cache_start, self.head_dim ** -0.5))
        q = q.reshape([bsz, q_len, self.num_heads, self.head_dim])
        k = k.reshape([bsz, q_len, self.num_kv_heads, self.head_dim])
        v = v.reshape([bsz, q_len, self.num_kv_heads, self.head_dim])
        q = apply_rotary_pos_emb(q, cos, sin, interleaved=False)
        k = apply_rotary_pos_emb(k, cos, sin, interleaved=False)
        if cache is not None:
            keys, values = cache.store(self.layer_idx, cache_start, k, v)  # [B, kv_heads, S, D]
        else:
            keys, values = k.transpose([0, 2, 1, 3]), v.transpose([0, 2, 1, 3])
        out = attend(q.transpose([0, 2, 1, 3]), keys, values, mask, self.head_dim ** -0.5)  # [B, nh, T, D]
        return self.o_proj(out.transpose([0, 2, 1, 3]).reshape([bsz, q_len, self.num_heads * self.head_dim]))


class DeepseekV2Attention(nn.Layer):
    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.q_head_dim = config.q_head_dim
        hidden, bias = config.hidden_size, config.attention_bias

        if self.q_lora_rank is None:
            self.q_proj = Linear(hidden, self.num_heads * self.q_head_dim, bias_attr=False)
        else:
            self.q_a_proj = Linear(hidden, self.q_lora_rank, bias_attr=bias)
            self.q_a_layernorm = DeepseekV2RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, self.num_heads * self.q_head_dim, bias_attr=False)
        self.kv_a_proj_with_mqa = Linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias_attr=bias)
        self.kv_a_layernorm = DeepseekV2RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias_attr=False
        )
        self.o_proj = Linear(self.num_heads * self.v_head_dim, hidden, bias_attr=bias)

        self.softmax_scale = self.q_head_dim ** -0.5
        scaling = config.rope_scaling or {}
        if scaling.get("mscale_all_dim"):
            mscale = yarn_get_mscale(scaling["factor"], scaling["mscale_all_dim"])
            self.softmax_scale *= mscale * mscale

    @property
    def decode_projections(self) -> Tuple[str, ...]:
        """The projections the decode kernel reads: q_a_proj and q_b_proj (or q_proj), kv_a_proj_with_mqa,
        kv_b_proj, o_proj."""
        query = ("q_proj",) if self.q_lora_rank is None else ("q_a_proj", "q_b_proj")
        return (*query, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")

    def plain_projection_weights(self) -> Optional[Tuple[Optional[paddle.Tensor], ...]]:
        """The q_a (None without ``q_lora_rank``), q_b or q_proj, kv_a_proj_with_mqa, kv_b and o weights as the
        decode kernel takes them (``native_decode.MLALayer``); see ``plain_weights``."""
        weights = plain_weights([getattr(self, name) for name in self.decode_projections])
        return (None, *weights) if weights is not None and self.q_lora_rank is None else weights

    def _kv_b_proj_halves(self):
        """W_UK^T [nh, C, Dn] and W_UV^T [nh, C, Dv] from ``kv_b_proj`` (stored [nh * (Dn + Dv), C]): the
        absorbed form folds them into the query and output, the expanded form applies them to the latents."""
        w = self.kv_b_proj.weight
        compute_dtype = self.kv_a_layernorm.weight.dtype  # the matrix may be stored bf16 (float32 CPU inference)
        w = (w if w.dtype == compute_dtype else w.astype(compute_dtype)).reshape(
            [self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank]
        ).transpose([0, 2, 1])  # [nh, C, Dn + Dv]
        return w[:, :, : self.qk_nope_head_dim], w[:, :, self.qk_nope_head_dim:]

    def _kv_b_proj_halves_for(self, cache: Optional[KVCache]):
        """``_kv_b_proj_halves``; during cached inference made contiguous once per generation, since
        Paddle would otherwise copy the strided views element by element at every step."""
        if cache is None or paddle.is_grad_enabled():
            return self._kv_b_proj_halves()
        return cache.memo(
            (self.layer_idx, "kv_b_proj_halves"), lambda: tuple(w.contiguous() for w in self._kv_b_proj_halves())
        )

    def expanded_is_cheaper(self, q_len: int, kv_len: int) -> bool:
        """Whether expanding the S latents into per-head keys and values costs fewer multiply-adds than
        the absorbed form for T queries.

        Absorbed minus expanded, per head: ``C (Dn + Dv) (T - S)`` (the query/output folds against the
        expansion) plus ``T S (2 C - Dn - Dv)`` (scores and output read the C-wide latent instead of Dn
        and Dv). So prefill (T close to S) expands, as vLLM and the official flash path do, and a decode
        step (T = 1) stays absorbed, reading only the compressed cache.
        """
        nope, value, latent = self.qk_nope_head_dim, self.v_head_dim, self.kv_lora_rank
        return q_len * kv_len * (2 * latent - nope - value) > latent * (nope + value) * (kv_len - q_len)

    def forward(
        self,
        hidden_states: paddle.Tensor,
        position_embeddings: Tuple[paddle.Tensor, paddle.Tensor],
        mask: paddle.Tensor,
        cache: Optional[KVCache] = None,
        cache_start: int = 0,
    ) -> paddle.Tensor:
        """hidden_states [B, T, H], position_embeddings (cos, sin) [B, T, R] -> [B, T, H]. Runs the absorbed
        or the expanded form, whichever is cheaper for T and S (``expanded_is_cheaper``); both read the same
        cache."""
        bsz, q_len, _ = hidden_states.shape
        nh, c = self.num_heads, self.kv_lora_rank
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.reshape([bsz, q_len, nh, self.q_head_dim])
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], axis=-1)

        compressed_kv, k_pe = self.kv_a_proj_with_mqa(hidden_states).split(
            [c, self.qk_rope_head_dim], axis=-1
        )  # [B, T, C], [B, T, R]
        compressed_kv = self.kv_a_layernorm(compressed_kv)
        cos, sin = position_embeddings
        q_pe = apply_rotary_pos_emb(q_pe, cos, sin, interleaved=True)  # [B, T, nh, R]
        k_pe = apply_rotary_pos_emb(k_pe, cos, sin, interleaved=True)  # [B, T, R]
        if cache is not None:
            k_pe, compressed_kv = cache.store(self.layer_idx, cache_start, k_pe, compressed_kv)  # [B, S, R], [B, S, C]
        kv_len = k_pe.shape[1]

        weight = self.kv_b_proj.weight
        native = cache is not None and mha_kernels_apply(q_nope, cache.dtype)
        if native and q_len == 1 and weights_readable(weight):
            return self.o_proj(mla_decode_attention(
                q_nope, q_pe, k_pe, compressed_kv, weight, mask, cache_start + 1, self.softmax_scale
            ))
        expanded = self.expanded_is_cheaper(q_len, kv_len)
        if expanded and native:
            # kv_b_proj expands the written positions only, reading its weight as stored; the kernel takes
            # per-head keys [k_nope | k_pe] and values, tokens first.
            end = cache_start + q_len
            k_nope, values = self.kv_b_proj(compressed_kv[:, :end]).reshape(
                [bsz, end, nh, self.qk_nope_head_dim + self.v_head_dim]
            ).split([self.qk_nope_head_dim, self.v_head_dim], axis=-1)  # [B, end, nh, Dn], [B, end, nh, Dv]
            keys = paddle.concat(
                [k_nope, k_pe[:, :end].unsqueeze(2).expand([bsz, end, nh, self.qk_rope_head_dim])], axis=-1
            )  # [B, end, nh, Dn + R]
            queries = paddle.concat([q_nope, q_pe], axis=-1)  # [B, T, nh, Dn + R]
            return self.o_proj(attention_prefill(queries, keys, values, mask, cache_start, self.softmax_scale,
                                                 tokens_first=True))
        w_uk_t, w_uv_t = self._kv_b_proj_halves_for(cache)  # [nh, C, Dn], [nh, C, Dv]
        # The rope key is shared by all heads: fold heads into rows so the matmul reads it once.
        scores = paddle.matmul(
            q_pe.transpose([0, 2, 1, 3]).reshape([bsz, nh * q_len, -1]), k_pe, transpose_y=True
        ).reshape([bsz, nh, q_len, kv_len])
        if expanded:
            # Equal ranks on both sides: Paddle's matmul gradient fails on a rank-3 weight broadcast to rank 4.
            latent = compressed_kv.unsqueeze(1)  # [B, 1, S, C]
            k_nope = paddle.matmul(latent, w_uk_t.unsqueeze(0))  # [B, nh, S, Dn]
            values = paddle.matmul(latent, w_uv_t.unsqueeze(0))  # [B, nh, S, Dv]
            scores = scores + paddle.matmul(q_nope.transpose([0, 2, 1, 3]), k_nope, transpose_y=True)
            probs = masked_softmax(scores * self.softmax_scale, mask, overwrite=True)
            out = paddle.matmul(probs, values).transpose([0, 2, 1, 3])  # [B, T, nh, Dv]
        else:
            # Fold the key up-projection into the query: q_nope [nh, B*T, Dn] @ W_UK [nh, Dn, C] -> [nh, B*T, C].
            q_nope = q_nope.transpose([2, 0, 1, 3]).reshape([nh, bsz * q_len, self.qk_nope_head_dim])
            q_latent = paddle.matmul(q_nope, w_uk_t, transpose_y=True).reshape([nh, bsz, q_len, c])
            scores = scores + paddle.matmul(
                q_latent.transpose([1, 0, 2, 3]).reshape([bsz, nh * q_len, c]), compressed_kv, transpose_y=True
            ).reshape([bsz, nh, q_len, kv_len])
            probs = masked_softmax(scores * self.softmax_scale, mask, overwrite=True)
            out_latent = paddle.matmul(probs.reshape([bsz, nh * q_len, kv_len]), compressed_kv)  # [B, nh*T, C]
            # Unfold the value up-projection: [nh, B*T, C] @ W_UV^T [nh, C, Dv] -> [nh, B*T, Dv].
            out_latent = out_latent.reshape([bsz, nh, q_len, c]).transpose([1, 0, 2, 3]).reshape([nh, bsz * q_len, c])
            out = paddle.matmul(out_latent, w_uv_t)
            out = out.reshape([nh, bsz, q_len, self.v_head_dim]).transpose([1, 2, 0, 3])  # [B, T, nh, Dv]
        return self.o_proj(out.reshape([bsz, q_len, nh * self.v_head_dim]))


def plain_weights(projections) -> Optional[Tuple[paddle.Tensor, ...]]:
    """The weights ([out, in]) of the projections when all are plain ``Linear`` layers without bias, as the
    decode kernels take them; None otherwise (LoRA wrappers, ``attention_bias``)."""
    if any(type(p) is not Linear or p.bias is not None for p in projections):
        return None
    return tuple(p.weight for p in projections)


def build_attention(config: DeepseekV2Config, layer_idx: int) -> nn.Layer:
    if config.use_mla:
        return DeepseekV2Attention(config, layer_idx)
    return DeepseekV2MHAAttention(config, layer_idx)
