"""A preallocated key/value cache written in place.

Per layer it holds, for ``max_length`` positions:
* MHA (use_mla=false): keys and values, stored heads-first [B, kv_heads, S, head_dim] so attention
  multiplies by them without a transpose; ``layers`` shows them as [B, S, kv_heads, head_dim] views;
* MLA: ``k_pe`` [B, S, qk_rope_head_dim] (already rotated) and ``compressed_kv`` [B, S, kv_lora_rank]
  (after ``kv_a_layernorm``), the official absorbed-MLA cache.

It also keeps ``key_valid`` [B, S] (False at left padding and at positions not written yet) so attention
masks are built from the cache alone. A decode step writes one slot per layer and allocates nothing that
grows with the sequence.

Attention reads the whole buffers (``store``) and masks what is not written yet: a prefix slice of a
buffer is a strided view for any batch or head count above one, and Paddle feeds strided views to
matmul through an element-by-element copy that costs more than reading the unused tail. So size the
cache to the generation (``generate`` does: prompt + max_new_tokens).

The cache also memoizes tensors derived from the weights that a layer needs at every step (``memo``),
e.g. MLA's absorbed projections and the MLP kernels' weight tables: a cache lives for one generation,
during which the weights are fixed.
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable, List, Optional, Tuple

import numpy as np
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
            shape = [batch_size, config.num_key_value_heads, max_length, config.head_dim]
            shapes = [shape, shape]
        # What attention reads: MHA heads-first, MLA as stored.
        self._buffers: List[Tuple[paddle.Tensor, paddle.Tensor]] = [
            tuple(paddle.zeros(s, dtype=dtype) for s in shapes) for _ in range(config.num_hidden_layers)
        ]
        # The documented layout: views of the same memory, [B, S, kv_heads, head_dim] for MHA.
        self.layers: List[Tuple[paddle.Tensor, paddle.Tensor]] = [
            pair if config.use_mla else tuple(b.transpose([0, 2, 1, 3]) for b in pair) for pair in self._buffers
        ]
        self.key_valid = paddle.zeros([batch_size, max_length], dtype=paddle.bool)
        self.length = 0
        self._memo: Dict[Hashable, object] = {}
        # Set to a list to collect every MoE layer's choice of experts, topk_idx [N, K], in call order
        # (benchmarks and tests: a decode step routes inside its kernel, where no gate hook sees it).
        self.routing: Optional[List[np.ndarray]] = None

    def begin(self, num_new: int, attention_mask: Optional[paddle.Tensor]) -> int:
        """Reserve ``num_new`` positions for the next forward; returns their start.

        attention_mask: [B, num_new] for the new tokens (False = padding), or None for all valid.
        """
        start = self.reserve(num_new)
        valid = (
            paddle.ones([self.batch_size, num_new], dtype=paddle.bool)
            if attention_mask is None else attention_mask.astype(paddle.bool)
        )
        self.key_valid[:, start:start + num_new] = valid
        return start

    def reserve(self, num_new: int) -> int:
        """The start of ``num_new`` free positions (``begin`` without marking them valid: a fused decode step
        marks its own); raises when the cache has no room."""
        start = self.length
        if start + num_new > self.max_length:
            raise ValueError(
                f"KV cache is full: {start} + {num_new} tokens > max_length {self.max_length}; "
                "allocate a longer cache"
            )
        return start

    def commit(self, num_new: int) -> None:
        """Mark the positions reserved by ``begin`` or ``reserve`` as written (called once per forward, after all
        layers)."""
        self.length += num_new

    def store(self, layer_idx: int, start: int, first: paddle.Tensor, second: paddle.Tensor):
        """Write the new entries at ``start``; return the layer's whole buffers in attention layout.

        first/second: (keys, values) [B, T, kv_heads, head_dim] or (k_pe [B, T, R], compressed_kv [B, T, C]).
        Returns (keys, values) [B, kv_heads, max_length, head_dim] or (k_pe [B, max_length, R],
        compressed_kv [B, max_length, C]); positions from ``start + T`` on hold stale or zero values.
        """
        end = start + first.shape[1]
        buf_first, buf_second = self._buffers[layer_idx]
        if self.use_mla:
            buf_first[:, start:end] = first.astype(self.dtype)
            buf_second[:, start:end] = second.astype(self.dtype)
        else:
            buf_first[:, :, start:end] = first.astype(self.dtype).transpose([0, 2, 1, 3])
            buf_second[:, :, start:end] = second.astype(self.dtype).transpose([0, 2, 1, 3])
        return buf_first, buf_second

    def buffers(self, layer_idx: int) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """The layer's whole buffers as ``store`` returns them, for a kernel that writes the new entries itself."""
        return self._buffers[layer_idx]

    def update(self, layer_idx: int, start: int, first: paddle.Tensor, second: paddle.Tensor):
        """Write the new entries at ``start`` and return both buffers up to the end of them, in the
        ``layers`` layout ([B, S, kv_heads, head_dim] or [B, S, R] / [B, S, C])."""
        self.store(layer_idx, start, first, second)
        end = start + first.shape[1]
        layer_first, layer_second = self.layers[layer_idx]
        return layer_first[:, :end], layer_second[:, :end]

    def memo(self, key: Hashable, compute: Callable[[], object]) -> object:
        """``compute()`` once per cache (i.e. per generation) and the stored result afterwards."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def record_routing(self, topk_idx) -> None:
        """Append a MoE layer's topk_idx [N, K] (NumPy or Paddle) to ``routing`` when that is a list."""
        if self.routing is not None:
            self.routing.append(topk_idx if isinstance(topk_idx, np.ndarray) else topk_idx.numpy())

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
