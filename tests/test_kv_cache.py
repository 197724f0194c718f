"""Cached decoding equals one full forward (MHA and MLA, with and without left padding)."""
import numpy as np
import paddle
import pytest

from lm_golden import load_lm
from paddlemix_vl2.models.deepseek_vl2 import KVCache


def _prompt(pad_rows):
    rng = np.random.default_rng(7)
    ids = rng.integers(3, 1000, size=(2, 20))
    mask = np.ones((2, 20), bool)
    if pad_rows:
        mask[1, :6] = False
        ids[1, :6] = 2
    return paddle.to_tensor(ids), paddle.to_tensor(mask)


@pytest.mark.parametrize("name", ["micro-tiny", "micro-small", "micro-full"])
@pytest.mark.parametrize("left_pad", [False, True])
def test_step_by_step_equals_full_forward(name, left_pad):
    lm = load_lm(name)
    ids, mask = _prompt(left_pad)
    with paddle.no_grad():
        full = lm(input_ids=ids, attention_mask=mask).logits.numpy()
        cache = lm.new_cache(2, 20)
        pieces = [lm(input_ids=ids[:, :8], attention_mask=mask[:, :8], cache=cache).logits.numpy()]
        for j in range(8, 20):
            pieces.append(lm(input_ids=ids[:, j:j + 1], attention_mask=mask[:, j:j + 1], cache=cache).logits.numpy())
    cached = np.concatenate(pieces, axis=1)
    valid = mask.numpy()
    assert cache.length == 20
    np.testing.assert_allclose(cached[valid], full[valid], atol=1e-4, rtol=0)


def test_cache_shapes_and_bytes_per_token():
    tiny, small, full = (load_lm(n).config for n in ("micro-tiny", "micro-small", "micro-full"))
    mha = KVCache(tiny, 2, 32)
    assert [list(t.shape) for t in mha.layers[0]] == [[2, 32, 4, 16], [2, 32, 4, 16]]
    mla = KVCache(full, 1, 32)
    assert [list(t.shape) for t in mla.layers[0]] == [[1, 32, 8], [1, 32, 48]]
    assert KVCache(small, 1, 8).nbytes_per_token() == (32 + 8) * small.num_hidden_layers * 4


def test_cache_overflow_and_context_limit_are_clear_errors():
    lm = load_lm("micro-tiny")
    cache = lm.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache is full"):
        lm(input_ids=paddle.to_tensor([[5, 6, 7, 8, 9]]), cache=cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        lm.new_cache(1, lm.config.max_position_embeddings + 1)
