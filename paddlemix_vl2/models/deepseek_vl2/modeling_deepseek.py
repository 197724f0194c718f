"""The DeepSeek-V2 mixture-of-experts language model of DeepSeek-VL2.

``DeepseekV2ForCausalLM.from_pretrained(path)`` accepts a DeepSeek-VL2 checkpoint (it then reads
``language_config`` and the ``language.`` tensors) or a plain DeepSeek-V2 one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Union

import paddle
import paddle.nn.functional as F
from paddle import nn

from .attention import DeepseekV2MHAAttention, build_attention
from .checkpoint import build_and_load, refuse_training_bf16_storage, save_weights
from .configuration_deepseek import ConfigError, DeepseekV2Config, read_config_json
from .kv_cache import KVCache
from .layers import DeepseekV2MLP, DeepseekV2RMSNorm, Linear, TokenEmbedding
from .moe import DeepseekV2MoE
from .native_decode import DecodeStack, MHALayer, MLALayer, decode_rows_apply, decode_step, decode_step_applies
from .rotary import DeepseekV2RotaryEmbedding

__all__ = [
    "DeepseekV2DecoderLayer",
    "DeepseekV2Model",
    "DeepseekV2ForCausalLM",
    "CausalLMOutput",
    "build_attention_mask",
    "default_position_ids",
]

IGNORE_INDEX = -100


def build_attention_mask(key_valid: paddle.Tensor, start: int, q_len: int, dtype) -> paddle.Tensor:
    """Additive causal mask [B, 1, T, S] for queries at positions ``start .. start+T-1``.

    key_valid: [B, S] bool, False at left padding. Masked entries hold the dtype's finite minimum, so a
    fully masked row (a padding query) stays finite instead of turning into NaN.
    """
    kv_len = key_valid.shape[1]
    key_pos = paddle.arange(kv_len, dtype=paddle.int64)
    query_pos = paddle.arange(start, start + q_len, dtype=paddle.int64)
    allowed = (key_pos.unsqueeze(0) <= query_pos.unsqueeze(1)).unsqueeze(0).unsqueeze(0)  # [1, 1, T, S]
    allowed = paddle.logical_and(allowed, key_valid.astype(paddle.bool).unsqueeze(1).unsqueeze(1))
    zero = paddle.zeros([], dtype=dtype)
    return paddle.where(allowed, zero, paddle.full([], paddle.finfo(dtype).min, dtype=dtype))


def default_position_ids(key_valid: paddle.Tensor, start: int, q_len: int) -> paddle.Tensor:
    """Positions of the new tokens as generation assigns them: ``cumsum(mask) - 1``, padding at 1.

    key_valid: [B, S] over cached + new tokens -> [B, T] int64 (``start .. start+T-1`` without padding).
    """
    valid = key_valid.astype(paddle.int64)
    positions = valid.cumsum(axis=1)[:, start:start + q_len] - 1
    return paddle.where(valid[:, start:start + q_len] > 0, positions, paddle.ones_like(positions))


@dataclass
class CausalLMOutput:
    """logits: [B, T, V] float32 (or [B, logits_to_keep, V]); loss: mean cross-entropy over labels != -100."""

    logits: paddle.Tensor
    loss: Optional[paddle.Tensor] = None


class DeepseekV2DecoderLayer(nn.Layer):
    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__()
        self.self_attn = build_attention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp = DeepseekV2MoE(config)
        else:
            self.mlp = DeepseekV2MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = DeepseekV2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, position_embeddings, mask, cache=None, cache_start=0):
        """x [B, T, H], position_embeddings (cos, sin) -> [B, T, H]; the cache is updated in place."""
        h = x + self.self_attn(self.input_layernorm(x), position_embeddings, mask, cache, cache_start)
        return h + self.mlp(self.post_attention_layernorm(h), cache)

    def decode_layer(self, cache: KVCache) -> Optional[Union[MHALayer, MLALayer]]:
        """This layer as the decode kernel takes it (``native_decode.MHALayer`` or ``MLALayer``, pointing into
        the generation's cache); None where the kernels do not serve its attention or MLP."""
        block = self.mlp.decode_block(cache)  # also the MLP kernels' table when the step is not fused
        if block is None:
            return None
        kind = MHALayer if isinstance(self.self_attn, DeepseekV2MHAAttention) else MLALayer
        return kind.of(self.self_attn, self.input_layernorm, self.post_attention_layernorm, block, cache)


class DeepseekV2Model(nn.Layer):
    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = TokenEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.LayerList([DeepseekV2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        # One table for every layer: all rotate the same dimensions (the rope part of MLA's heads, or the
        # whole MHA head), so cos/sin are computed once per forward rather than once per layer.
        self.rotary_emb = DeepseekV2RotaryEmbedding(
            config.qk_rope_head_dim if config.use_mla else config.head_dim, config
        )
        self.norm = DeepseekV2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: Optional[paddle.Tensor] = None,
        inputs_embeds: Optional[paddle.Tensor] = None,
        attention_mask: Optional[paddle.Tensor] = None,
        position_ids: Optional[paddle.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> paddle.Tensor:
        """Final hidden states [B, T, H] (after the last RMSNorm).

        Args:
            input_ids: [B, T] int64, or inputs_embeds: [B, T, H].
            attention_mask: [B, T] for the new tokens, or [B, S] for cached + new (its last T columns
                are used); False/0 marks left padding. None means all valid.
            position_ids: [B, T]; by default ``cumsum(mask) - 1`` over the cache, padding at 1.
            cache: a ``KVCache``; the new tokens are appended to it.
        """
        if (
            cache is not None and inputs_embeds is None and input_ids is not None and position_ids is not None
            and attention_mask is None and decode_step_applies(input_ids)
        ):
            stack = self.decode_stack(cache)
            if stack is not None:
                start = cache.reserve(1)
                hidden, routing = decode_step(input_ids, position_ids, stack, start)
                for topk_idx in routing:
                    cache.record_routing(topk_idx)
                cache.commit(1)
                return hidden
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.embed_tokens(input_ids)
        bsz, q_len = inputs_embeds.shape[:2]
        if attention_mask is not None:
            attention_mask = attention_mask[:, -q_len:].astype(paddle.bool)
        if cache is not None:
            start = cache.begin(q_len, attention_mask)
            key_valid = cache.key_valid  # attention reads the whole cache; see kv_cache.py
            if decode_rows_apply(inputs_embeds):
                # Made on the prompt's pass, so that the first decode step does not: made there, the tiny
                # model's layer descriptions took 15-20 ms of a 35-50 ms step.
                self.decode_stack(cache)
        else:
            start = 0
            key_valid = attention_mask if attention_mask is not None else paddle.ones([bsz, q_len], dtype=paddle.bool)
        if position_ids is None:
            position_ids = default_position_ids(key_valid, start, q_len)
        position_embeddings = self.rotary_emb(position_ids, inputs_embeds.dtype, seq_len=start + q_len)
        mask = build_attention_mask(key_valid, start, q_len, inputs_embeds.dtype)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, position_embeddings, mask, cache, start)
        if cache is not None:
            cache.commit(q_len)
        return self.norm(hidden)

    def decode_stack(self, cache: KVCache) -> Optional[DecodeStack]:
        """The model's decode step as one ``native_decode.decode_step`` call takes it (token ids in, hidden
        states after the final norm out), kept in the generation's cache; None where the kernels do not
        serve every part (the step then runs the modules, whose MLP parts still decode through the MLP
        kernels). A forward takes it for one token per sequence given as ``input_ids`` with
        ``position_ids`` and no ``attention_mask`` (what ``generation`` passes). The fused call skips the
        modules, so forward hooks on them do not see decode steps; ``KVCache.routing`` records the routing."""
        parts = ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp")
        owners = [(layer, name) for layer in self.layers for name in parts]
        owners += [(self, name) for name in ("embed_tokens", "rotary_emb", "norm")]
        return cache.memo((id(self), "decode_stack"), lambda: DecodeStack.of(
            (layer.decode_layer(cache) for layer in self.layers), self.embed_tokens, self.rotary_emb, self.norm, cache,
            owners,
        ))


class DeepseekV2ForCausalLM(nn.Layer):
    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.config = config
        self.model = DeepseekV2Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias_attr=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return KVCache(self.config, batch_size, max_length, dtype=self.model.norm.weight.dtype)

    def forward(
        self,
        input_ids: Optional[paddle.Tensor] = None,
        inputs_embeds: Optional[paddle.Tensor] = None,
        attention_mask: Optional[paddle.Tensor] = None,
        position_ids: Optional[paddle.Tensor] = None,
        cache: Optional[KVCache] = None,
        labels: Optional[paddle.Tensor] = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """Logits (float32) and, with ``labels`` [B, T], the shifted cross-entropy loss.

        ``logits_to_keep=k`` computes the vocabulary projection for the last k positions only (prefill
        needs just the last one). Other arguments as ``DeepseekV2Model.forward``.
        """
        hidden = self.model(input_ids, inputs_embeds, attention_mask, position_ids, cache)
        if logits_to_keep and logits_to_keep < hidden.shape[1]:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        if logits.dtype != paddle.float32:  # a decode step runs cold, where even a no-op cast costs
            logits = logits.astype(paddle.float32)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return CausalLMOutput(logits=logits, loss=loss)

    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, **kwargs) -> paddle.Tensor:
        """New tokens [B, N]; see ``paddlemix_vl2.generation.generate`` for the arguments."""
        from ...generation import generate

        return generate(self, inputs_embeds, attention_mask, input_ids, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str, dtype=None, progress: bool = True, weight_dtype="auto",
                        map_weights: bool = True) -> "DeepseekV2ForCausalLM":
        """Load a DeepSeek-V2 LM from an official DeepSeek-VL2 (``language.`` subtree) or DeepSeek-V2 folder.
        ``weight_dtype`` as in ``DeepseekVLV2ForCausalLM.from_pretrained``."""
        raw = read_config_json(path)
        model_type = raw.get("model_type")
        if model_type == "deepseek_vl_v2":
            config, prefix = DeepseekV2Config.from_dict(raw.get("language_config") or {}), "language."
        elif model_type == "deepseek_v2":
            config, prefix = DeepseekV2Config.from_dict(raw), ""
        else:
            raise ConfigError(
                f"{path}: model_type={model_type!r}; expected a DeepSeek-VL2 ('deepseek_vl_v2') or DeepSeek-V2 checkpoint"
            )
        return build_and_load(
            lambda: cls(config), path, prefix=prefix, dtype=dtype, progress=progress, weight_dtype=weight_dtype,
            map_weights=map_weights,
        )

    def train(self, mode: bool = True):
        refuse_training_bf16_storage(self, mode)
        return super().train(mode)

    def save_pretrained(self, directory: str, dtype=paddle.bfloat16) -> None:
        """Write a DeepSeek-V2 checkpoint (config.json + safetensors in torch orientation)."""
        config_text = json.dumps(self.config.to_dict(), indent=1, ensure_ascii=False) + "\n"
        save_weights(self, directory, dtype=dtype, extra_files={"config.json": config_text})


def causal_lm_loss(logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
    """Mean next-token cross-entropy over the labelled positions (0 when nothing is labelled).

    logits [B, T, V] float32, labels [B, T] with -100 = ignored.
    NOTE(port): Paddle's ``reduction="mean"`` with ``ignore_index`` divides by every position, ignored ones
    included (torch divides by the labelled ones), so the sum is divided by the labelled count here.
    """
    targets = labels[:, 1:].reshape([-1])
    per_token = F.cross_entropy(
        logits[:, :-1].reshape([-1, logits.shape[-1]]), targets, ignore_index=IGNORE_INDEX, reduction="none"
    ).reshape([-1])  # [B*(T-1)], 0 at ignored positions
    count = (targets != IGNORE_INDEX).astype(per_token.dtype).sum()
    return per_token.sum() / paddle.clip(count, min=1.0)
