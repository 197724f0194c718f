"""A preallocated key/value cache written in place.

Per layer it holds, for ``max_length`` positions:
* MHA (use_mla=false): ``keys`` and ``values`` [B, S, kv_heads, head_dim] (the layout SDPA reads);
* MLA: ``k_pe`` [B, S, qk_rope_head_dim] (already rotated) and ``compressed_kv`` [B, S, kv_lora_rank]
  (after ``kv_a_layernorm``), the official absorbed-MLA cache.

It also keeps ``key_valid`` [B, S] (False at left padding) so attention masks are built from the cache
alone. A decode step writes one slot per layer and allocates nothing that grows with the sequence.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import paddle

from .configuration_deepseek import DeepseekV2Config

__all__ = ["KVCache"]


class KVCache:
    def __init__(self, config: DeepseekV2Config, batch_size: int, max_length: int, dtype=paddle.float32):
        if max_length > config.max_position_embeddings:
            raise ValueError(
                f"cache length {max_length} exceeds max_position_embeddings={config.max_position_embeddings}; "
                "shorten the prompt or max_new_tokens"
            )
        self.batch_size, self.max_length, self.dtype = batch_size, max_length, dtype
        self.use_mla = config.use_mla
        if config.use_mla:
            widths = (config.qk_rope_head_dim, config.kv_lora_rank)
            shapes = [[batch_size, max_length, w] for w in widths]
        else:
            shape = [batch_size, max_length, config.num_key_value_heads, config.head_dim]
            shapes = [shape, shape]
        self.layers: List[Tuple[paddle.Tensor, paddle.Tensor]] = [
            tuple(paddle.zeros(s, dtype=dtype) for s in shapes) for _ in range(config.num_hidden_layers)
        ]
        self.key_valid = paddle.zeros([batch_size, max_length], dtype=paddle.bool)
        self.length = 0

    def begin(self, num_new: int, attention_mask: Optional[paddle.Tensor]) -> int:
        """Reserve ``num_new`` positions for the next forward; returns their start.

        attention_mask: [B, num_new] for the new tokens (False = padding), or None for all valid.
        """
        start = self.length
        if start + num_new > self.max_length:
            raise ValueError(
                f"KV cache is full: {start} + {num_new} tokens > max_length {self.max_length}; "
                "allocate a longer cache"
            )
        valid = (
            paddle.ones([self.batch_size, num_new], dtype=paddle.bool)
            if attention_mask is None else attention_mask.astype(paddle.bool)
        )
        self.key_valid[:, start:start + num_new] = valid
        return start

    def commit(self, num_new: int) -> None:
        """Mark the positions reserved by ``begin`` as written (called once per forward, after all layers)."""
        self.length += num_new

    def update(self, layer_idx: int, start: int, first: paddle.Tensor, second: paddle.Tensor):
        """Write the new entries at ``start`` and return both buffers up to the end of them.

        first/second: (keys, values) [B, T, kv_heads, head_dim] or (k_pe [B, T, R], compressed_kv [B, T, C]).
        """
        end = start + first.shape[1]
        buf_first, buf_second = self.layers[layer_idx]
        buf_first[:, start:end] = first.astype(self.dtype)
        buf_second[:, start:end] = second.astype(self.dtype)
        return buf_first[:, :end], buf_second[:, :end]

    def crop(self, length: int) -> None:
        """Forget every position from ``length`` on (e.g. to re-run the last prompt token)."""
        self.length = min(self.length, length)

    def nbytes_per_token(self) -> int:
        """Cache bytes one token occupies over all layers and the whole batch row."""
        per_layer = sum(_prod(t.shape[2:]) for t in self.layers[0])
        return per_layer * len(self.layers) * self.layers[0][0].element_size()


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out
