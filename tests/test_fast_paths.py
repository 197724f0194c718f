"""The inference fast paths against the straightforward computation they replace.

The goldens already run every fast path at the micro sizes (fused RMSNorm and the one-token MoE in every
no-grad forward and greedy decode). The paths that only switch on at real sizes (attention scores and
ViT activations formed in blocks) are forced here by lowering the block size, and each path is compared
with an independent computation.
"""
import numpy as np
import paddle
import pytest

from lm_golden import load_lm, load_vl
from paddlemix_vl2.models.deepseek_vl2 import layers, native, siglip_vit
from paddlemix_vl2.models.deepseek_vl2.layers import DeepseekV2RMSNorm, attend


def numpy_attention(query, keys, values, mask, scale):
    """query [B, nh, T, D], keys/values [B, kv, S, D] (kv divides nh), mask [B, 1, T, S] or None."""
    group = query.shape[1] // keys.shape[1]
    keys, values = np.repeat(keys, group, axis=1), np.repeat(values, group, axis=1)
    scores = np.einsum("bhtd,bhsd->bhts", query.astype(np.float64), keys) * scale
    if mask is not None:
        scores = scores + mask
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhts,bhsd->bhtd", scores / scores.sum(-1, keepdims=True), values)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("block_bytes", [layers.ACTIVATION_BLOCK_BYTES, 1])
def test_attend_in_blocks_equals_numpy(monkeypatch, batch, block_bytes):
    """Blocks of one row (block_bytes=1) and the unblocked path, with grouped heads and a mask."""
    monkeypatch.setattr(layers, "ACTIVATION_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(0)
    heads, kv_heads, q_len, kv_len, dim = 4, 2, 5, 7, 8
    query = rng.standard_normal((batch, heads, q_len, dim)).astype(np.float32)
    keys = rng.standard_normal((batch, kv_heads, kv_len, dim)).astype(np.float32)
    values = rng.standard_normal((batch, kv_heads, kv_len, dim)).astype(np.float32)
    mask = np.where(rng.random((batch, 1, q_len, kv_len)) < 0.3, -1e9, 0.0).astype(np.float32)
    mask[..., 0] = 0.0  # every query sees at least one key
    out = attend(*(paddle.to_tensor(a) for a in (query, keys, values, mask)), dim ** -0.5)
    np.testing.assert_allclose(out.numpy(), numpy_attention(query, keys, values, mask, dim ** -0.5), atol=1e-5)


def test_vit_in_tile_groups_equals_one_pass(monkeypatch):
    tower = load_vl("micro-tiny").vision
    size = tower.config.image_size
    tiles = paddle.to_tensor(np.random.default_rng(1).standard_normal((5, 3, size, size)).astype(np.float32))
    with paddle.no_grad():
        one_pass = tower(tiles).numpy()
        widest = tower.config.grid_size ** 2 * max(3 * tower.config.width, tower.config.mlp_hidden_dim) * 4
        monkeypatch.setattr(siglip_vit, "ACTIVATION_BLOCK_BYTES", 2 * widest)  # groups of 2, 2 and 1 tiles
        grouped = tower(tiles).numpy()
    np.testing.assert_allclose(grouped, one_pass, atol=1e-5, rtol=0)


def test_one_token_moe_equals_the_grouped_path():
    """One token through the short path equals the same token inside a two-token batch (grouped path)."""
    lm = load_lm("micro-full")
    moe = next(layer.mlp for i, layer in enumerate(lm.model.layers) if lm.config.is_moe_layer(i))
    x = paddle.to_tensor(np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32))
    pair = paddle.concat([x, -x])
    with paddle.no_grad():
        idx, weight, _ = moe.gate(pair.unsqueeze(0))
        grouped = moe.moe_infer(pair, idx, weight).numpy()[:1]
        alone = moe.moe_infer(x, idx[:1], weight[:1]).numpy()
    np.testing.assert_allclose(alone, grouped, atol=1e-6, rtol=0)


def test_rms_norm_without_avx512_never_calls_the_fused_kernel(monkeypatch):
    """Paddle's fused CPU kernel is AVX-512F only (SIGILL elsewhere): on such CPUs inference must take the
    written-out norm."""
    def no_fused_kernel(*args, **kwargs):
        raise AssertionError("fused_rms_norm called on a CPU without AVX-512F")

    monkeypatch.setattr(layers, "cpu_has_avx512f", lambda: False)
    monkeypatch.setattr(layers, "fused_rms_norm", no_fused_kernel)
    monkeypatch.setattr(layers, "inference_kernels_apply", lambda x: False)  # as without the package's kernels
    norm = DeepseekV2RMSNorm(64, eps=1e-6)
    x = np.random.default_rng(4).standard_normal((2, 3, 64)).astype(np.float32)
    with paddle.no_grad():
        out = norm(paddle.to_tensor(x)).numpy()
    expected = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", ["package kernel", "fused kernel", "written out"])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_rms_norm_paths_equal_float64(monkeypatch, path, rows):
    """The package's kernel (one row, a few rows inline, many rows threaded), Paddle's fused kernel and the
    written-out norm all give the float64 result up to float32 rounding; each case checks that its path ran."""
    if path == "package kernel" and native.kernel_library() is None:
        pytest.skip("the package's CPU kernels are not built here (no C compiler or PADDLEMIX_VL2_NATIVE=0)")
    if path == "fused kernel" and not layers.cpu_has_avx512f():
        pytest.skip("Paddle's fused RMSNorm kernel runs only on CPUs with AVX-512F")
    if path != "package kernel":
        monkeypatch.setattr(layers, "inference_kernels_apply", lambda x: False)
    calls = []
    for name in ("rms_norm", "fused_rms_norm"):
        kernel = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *args, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*args, **kw))
    norm = DeepseekV2RMSNorm(200, eps=1e-6)
    rng = np.random.default_rng(rows)
    norm.weight.set_value(rng.uniform(0.5, 1.5, 200).astype(np.float32))
    x = rng.standard_normal((1, rows, 200)).astype(np.float32)
    expected = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * norm.weight.numpy()
    with paddle.set_grad_enabled(path == "written out"):  # a gradient keeps both kernels out
        out = norm(paddle.to_tensor(x)).numpy()
    assert calls == {"package kernel": ["rms_norm"], "fused kernel": ["fused_rms_norm"], "written out": []}[path]
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["micro-small", "micro-full"])
def test_mla_expanded_form_equals_the_absorbed_form(monkeypatch, name):
    """Both MLA forms on one prompt, each forced: the logits and the gradient reaching kv_b_proj (the
    training path) agree. The goldens run each form where it is chosen (prefill expanded, decode absorbed)."""
    from paddlemix_vl2.models.deepseek_vl2.attention import DeepseekV2Attention

    lm = load_lm(name, weight_dtype="float32")  # a gradient is taken: float32 parameters, as training has
    ids = paddle.to_tensor(np.random.default_rng(5).integers(3, lm.config.vocab_size, size=(2, 29)))
    kv_b_proj = lm.model.layers[0].self_attn.kv_b_proj.weight
    results = {}
    for expanded in (True, False):
        monkeypatch.setattr(DeepseekV2Attention, "expanded_is_cheaper", lambda self, q_len, kv_len: expanded)
        logits = lm(input_ids=ids).logits
        logits.square().mean().backward()
        results[expanded] = logits.numpy(), kv_b_proj.grad.numpy().copy()
        lm.clear_gradients()
    np.testing.assert_allclose(results[True][0], results[False][0], atol=2e-5, rtol=0)
    np.testing.assert_allclose(results[True][1], results[False][1], atol=1e-6, rtol=1e-4)


def test_mla_form_choice_at_the_real_small_sizes():
    """DeepSeek-VL2-small's widths: a 1037-token prefill expands (with or without 64 extra cache slots),
    a decode step stays absorbed at any context."""
    from paddlemix_vl2.models.deepseek_vl2.attention import DeepseekV2Attention
    from paddlemix_vl2.models.deepseek_vl2.configuration_deepseek import DeepseekV2Config

    config = DeepseekV2Config.from_dict({
        "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2, "use_mla": True,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "q_lora_rank": None, "vocab_size": 16, "num_hidden_layers": 1,
    })
    attention = DeepseekV2Attention(config, 0)
    assert attention.expanded_is_cheaper(1037, 1037)
    assert attention.expanded_is_cheaper(1037, 1101)
    assert not any(attention.expanded_is_cheaper(1, context) for context in (2, 256, 2048, 65536))
