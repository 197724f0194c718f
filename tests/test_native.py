"""The CPU kernels (cpu_kernels.c and cpu_gemm.c through native.py) and the layers that call them.

The kernels are compared with float64 NumPy at odd sizes (a reduction length that is not a multiple of
the vector width, an output count that is not a multiple of the four-output tile, more rows than one pass
takes); the Linear, the MLP and the one-token MoE with the kernels against the same layers without. The goldens
(test_lm_parity, test_vl_parity, test_generation) run the kernel in every no-grad forward of one to
eight rows, so the decode steps there go through it too.
"""
import dataclasses
import logging
import os

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddlemix_vl2.models.deepseek_vl2 import layers, native, native_decode
from paddlemix_vl2.models.deepseek_vl2.layers import DeepseekV2MLP, Linear
from paddlemix_vl2.models.deepseek_vl2 import moe as moe_module
from paddlemix_vl2.models.deepseek_vl2.moe import DeepseekV2MoE


@pytest.fixture
def rebuilt_library(monkeypatch, tmp_path):
    """A fresh library lookup with its own cache folder; the cached lookup is restored afterwards."""
    monkeypatch.setenv(native.CACHE_VARIABLE, str(tmp_path))
    native.kernel_library.cache_clear()
    yield tmp_path
    native.kernel_library.cache_clear()


def test_the_kernel_builds_on_this_machine():
    assert native.kernel_library() is not None, "the few-row kernel did not build; see the logged reason"


def stored_weights(values, dtype):
    """``values`` as a weight tensor of ``dtype`` (float32 or bf16 storage) and the exact values it holds,
    as float64 for the NumPy reference."""
    if dtype == "bfloat16" and not native.bf16_weights_supported():
        pytest.skip("the kernels here do not read bf16 weights (no AVX512BW build), so loads keep float32 "
                    "matrices; the float32 cases of this test cover that path")
    tensor = paddle.to_tensor(values).astype(dtype)
    return tensor, tensor.astype("float32").numpy().astype(np.float64)


@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("k_dim, n_dim", [(64, 1024), (37, 13), (96, 4)])
def test_few_rows_linear_equals_numpy(rows, k_dim, n_dim, weight_dtype):
    rng = np.random.default_rng(rows * 1000 + k_dim)
    x = rng.standard_normal((rows, k_dim)).astype(np.float32)
    weight, weight_values = stored_weights(rng.standard_normal((n_dim, k_dim)).astype(np.float32), weight_dtype)
    out = native.few_rows_linear(paddle.to_tensor(x), weight).numpy()
    expected = x.astype(np.float64) @ weight_values.T
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_few_rows_linear_reads_a_strided_input():
    rng = np.random.default_rng(1)
    wide = paddle.to_tensor(rng.standard_normal((3, 40)).astype(np.float32))
    weight = paddle.to_tensor(rng.standard_normal((24, 20)).astype(np.float32))
    x = wide[:, 10:30]  # a column slice: not contiguous
    expected = x.numpy().astype(np.float64) @ weight.numpy().T.astype(np.float64)
    np.testing.assert_allclose(native.few_rows_linear(x, weight).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [[1, 1, 48], [2, 3, 48], [4, 48], [3, 5, 48]])
def test_linear_with_the_kernel_equals_the_matmul_path(monkeypatch, shape):
    """Up to eight rows without gradient take the few-row kernel, more rows the GEMM (AVX-512 builds; calls
    counted); both give the matmul path's result."""
    paddle.seed(0)
    layer = Linear(48, 40)
    layer.bias.set_value(paddle.uniform([40]))
    x = paddle.randn(shape)
    calls = []
    for name in ("few_rows_linear", "linear"):
        kernel = getattr(native, name)
        monkeypatch.setattr(layers, name, lambda *args, name=name, kernel=kernel: calls.append(name) or kernel(*args))
    with paddle.no_grad():
        fast = layer(x)
    expected = paddle.matmul(x, layer.weight, transpose_y=True) + layer.bias
    np.testing.assert_allclose(fast.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    assert fast.shape == shape[:-1] + [40]
    few_rows = np.prod(shape[:-1]) <= native.MAX_FEW_ROWS
    assert calls == (["few_rows_linear"] if few_rows else ["linear"] if native.vector_kernels_built() else [])


def numpy_swiglu(x, gate, up, down):
    gated = x @ gate.T
    return (gated / (1 + np.exp(-gated)) * (x @ up.T)) @ down.T


@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 3, 6, 29, 400])
def test_swiglu_mlps_equals_numpy(rows, weight_dtype):
    """MLPs of different widths, one over every row (a shared expert), the others over subsets with
    their own weights (routed experts): six rows take two passes of four, 29 rows the GEMM for the MLPs
    with more than eight, 400 rows two of the GEMM's 384-row chunks."""
    if rows > native.MAX_FEW_ROWS and not native.vector_kernels_built():
        pytest.skip("no AVX-512 build of the CPU kernels here: MLPs over more than eight rows use Paddle's "
                    "matmuls, which test_mlp_and_moe_with_the_kernels_equal_the_plain_path checks")
    rng = np.random.default_rng(rows)
    hidden = 40
    x = rng.standard_normal((rows, hidden)).astype(np.float32)
    mlps = [tuple(stored_weights(rng.standard_normal(shape).astype(np.float32) * 0.3, weight_dtype)
                  for shape in ((inter, hidden), (inter, hidden), (hidden, inter))) for inter in (24, 56, 9)]
    every_other = np.arange(0, rows, 2)
    assignments = [
        (np.arange(rows), np.ones(rows)), (np.array([rows - 1]), np.array([0.6])),
        (every_other[::-1], rng.uniform(0.1, 1.0, len(every_other))),
    ]
    # The table holds the MLPs in reverse, so the call's ids pick them out of order.
    table = native.MLPTable([tuple(w for w, _ in m) for m in reversed(mlps)])
    out = native.swiglu_mlps(
        paddle.to_tensor(x), table, np.array([2, 1, 0]), [len(ids) for ids, _ in assignments],
        np.concatenate([ids for ids, _ in assignments]), np.concatenate([scales for _, scales in assignments]),
    )
    expected = np.zeros((rows, hidden))
    for m, (taken, scales) in zip(mlps, assignments):
        for row, scale in zip(taken, scales):
            expected[row] += scale * numpy_swiglu(x[row].astype(np.float64), *(values for _, values in m))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("m, k, n", [(9, 1, 1), (13, 17, 33), (100, 385, 15), (31, 800, 770), (400, 64, 100)])
def test_gemm_equals_numpy(m, k, n, with_bias, weight_dtype):
    """Row counts that leave part of a 12-row sliver, reduction lengths across the 384 block and below the
    16-wide transpose, output counts that leave part of a 32-column panel and cross a 768-column chunk."""
    if not native.vector_kernels_built():
        pytest.skip("no AVX-512 build of the CPU kernels here: Linear layers over more than eight rows use "
                    "Paddle's matmul, which test_linear_with_the_kernel_equals_the_matmul_path checks")
    rng = np.random.default_rng(m * k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    weight, weight_values = stored_weights(rng.standard_normal((n, k)).astype(np.float32), weight_dtype)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    with paddle.no_grad():
        out = native.linear(paddle.to_tensor(x), weight, None if bias is None else paddle.to_tensor(bias)).numpy()
    expected = x.astype(np.float64) @ weight_values.T + (0.0 if bias is None else bias)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def _cpu_has_amx_bf16() -> bool:
    with open("/proc/cpuinfo") as cpuinfo:
        flags = next((line.split() for line in cpuinfo if line.startswith("flags")), [])
    return {"amx_tile", "amx_bf16", "avx512bw"} <= set(flags)


def test_amx_gemm_runs_where_the_cpu_has_it_and_equals_the_avx512_gemm(amx_switch):
    """On a CPU with AMX-BF16 the GEMM takes it for bf16 weights (PADDLEMIX_VL2_AMX=0 switches it off), and
    its products (the vision tower's fc1 on one tile's rows with a bias; a MoE prefill through
    swiglu_mlps: gathered rows, router scales, two experts summed into one output; rows holding +inf and
    -inf) equal the AVX-512 GEMM's to float32 rounding."""
    if not (os.path.exists("/proc/cpuinfo") and _cpu_has_amx_bf16() and native.bf16_weights_supported()):
        pytest.skip("no AMX-BF16 here (or no AVX-512 build): the GEMM runs on AVX-512, which "
                    "test_gemm_equals_numpy checks")
    assert amx_switch("1"), "the CPU has AMX-BF16 but the GEMM does not take it (a build or arch_prctl problem)"
    rng = np.random.default_rng(7)
    x = paddle.to_tensor(rng.standard_normal((729, 1152)).astype(np.float32))
    weight = paddle.to_tensor(rng.standard_normal((4304, 1152)).astype(np.float32) * 0.03).astype("bfloat16")
    bias = paddle.to_tensor(rng.standard_normal(4304).astype(np.float32))
    rows = rng.standard_normal((40, 64)).astype(np.float32)
    experts = [tuple(paddle.to_tensor(rng.standard_normal(s).astype(np.float32) * 0.1).astype("bfloat16")
                     for s in ((96, 64), (96, 64), (64, 96))) for _ in range(2)]
    ids = np.concatenate([rng.permutation(40)[:36], rng.permutation(40)[:33]])
    scales = rng.random(len(ids)).astype(np.float32)

    infinite = x.numpy()[:40].copy()
    infinite[0, 3], infinite[1, 5] = np.inf, -np.inf
    infinite = paddle.to_tensor(infinite)

    def products():
        with paddle.no_grad():
            fc1 = native.linear(x, weight, bias).numpy()
            mlps = native.swiglu_mlps(paddle.to_tensor(rows), native.MLPTable(experts), np.array([0, 1]), [36, 33],
                                      ids, scales).numpy()
            overflowed = native.linear(infinite, weight[:64], None).numpy()
        return fc1, mlps, overflowed

    with_amx = products()
    assert np.isinf(with_amx[2][:2]).all() and np.isfinite(with_amx[2][2:]).all()
    assert not amx_switch("0")
    for amx, avx512 in zip(with_amx, products()):
        np.testing.assert_allclose(amx, avx512, rtol=1e-5, atol=1e-5 * np.abs(avx512[np.isfinite(avx512)]).max())


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_mlp_and_moe_with_the_kernels_equal_the_plain_path(monkeypatch, tokens):
    """The dense MLP and a MoE (routed + shared experts in one kernel call: decode steps of one and three
    tokens, a 40-token prefill through the GEMM) against the same layers with the kernels switched off
    (the one-token path and the grouped path)."""
    from lm_golden import load_lm

    lm = load_lm("micro-tiny")
    moe_layer = next(layer for layer in lm.model.layers if isinstance(layer.mlp, DeepseekV2MoE))
    dense_mlp = next(layer.mlp for layer in lm.model.layers if isinstance(layer.mlp, DeepseekV2MLP))
    x = paddle.randn([tokens, 1, lm.config.hidden_size])
    cache = lm.new_cache(1, 8)
    with paddle.no_grad():
        fast_moe, fast_mlp = moe_layer.mlp(x), dense_mlp(x)
        # A generation's cache keeps each layer's weight table: the second call reuses the first's.
        memo_moe = [moe_layer.mlp(x, cache).numpy() for _ in range(2)]
        memo_mlp = [dense_mlp(x, cache).numpy() for _ in range(2)]
        assert cache.memo((id(moe_layer.mlp), "mlp_table"), lambda: None).pointers.shape == (
            3, lm.config.n_routed_experts + 1)
        monkeypatch.setenv(native.NATIVE_VARIABLE, "0")
        native.kernel_library.cache_clear()
        try:
            plain_moe, plain_mlp = moe_layer.mlp(x), dense_mlp(x)
        finally:
            monkeypatch.delenv(native.NATIVE_VARIABLE)
            native.kernel_library.cache_clear()
    np.testing.assert_allclose(fast_moe.numpy(), plain_moe.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast_mlp.numpy(), plain_mlp.numpy(), rtol=1e-5, atol=1e-6)
    # With a cache, up to eight rows route in the kernel too (mlp_block_decode): equal to float32 rounding.
    np.testing.assert_array_equal(memo_moe[0], memo_moe[1])
    np.testing.assert_allclose(memo_moe[0], fast_moe.numpy(), rtol=1e-5, atol=1e-6)
    for memo_out in memo_mlp:
        np.testing.assert_array_equal(memo_out, fast_mlp.numpy())


def _group_limited_moe():
    """A float32 MoE routed by group_limited_greedy without shared experts, which no fixture has."""
    from lm_golden import load_lm

    config = dataclasses.replace(load_lm("micro-tiny").config, topk_method="group_limited_greedy", n_group=4,
                                 topk_group=2, n_shared_experts=None)
    paddle.seed(3)
    moe = DeepseekV2MoE(config)
    moe.eval()
    return moe


@pytest.mark.parametrize("source", ["micro-tiny", "micro-full", "group_limited"])
@pytest.mark.parametrize("rows", [1, 6])
def test_moe_decode_block_routes_and_computes_as_the_module_path(monkeypatch, source, rows):
    """A MoE over up to eight rows with a cache runs as one ``mlp_block_decode`` call (router in the kernel)
    and gives the gate module's routing and the uncached layer's output: greedy softmax and noaux_tc sigmoid
    on the fixtures' bf16-stored experts with shared experts, group_limited_greedy on float32 ones without;
    six rows take the kernels' second pass of four."""
    from lm_golden import load_lm

    if native.kernel_library() is None:
        pytest.skip("the CPU kernels are not built here; every MoE takes the module path")
    if source == "group_limited":
        moe = _group_limited_moe()
    else:
        moe = next(layer.mlp for layer in load_lm(source).model.layers if isinstance(layer.mlp, DeepseekV2MoE))
    x = paddle.randn([rows, 1, moe.config.hidden_size])
    calls = []
    kernel = moe_module.mlp_block_decode
    monkeypatch.setattr(moe_module, "mlp_block_decode", lambda *args: calls.append(args) or kernel(*args))
    with paddle.no_grad():
        cache = load_lm("micro-tiny").new_cache(rows, 4)  # only its memo of the layer's tables is used
        cache.routing = []
        fused = moe(x, cache).numpy()
        assert len(calls) == 1
        plain = moe(x).numpy()
        topk_idx, topk_weight, _ = moe.gate(x)
        _, kernel_idx, kernel_weight = kernel(*calls[0])
    np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cache.routing[0], kernel_idx)
    order, kernel_order = np.argsort(topk_idx.numpy(), axis=1), np.argsort(kernel_idx, axis=1)
    np.testing.assert_array_equal(np.take_along_axis(kernel_idx, kernel_order, 1),
                                  np.take_along_axis(topk_idx.numpy(), order, 1))
    np.testing.assert_allclose(np.take_along_axis(kernel_weight, kernel_order, 1),
                               np.take_along_axis(topk_weight.numpy(), order, 1), rtol=1e-5, atol=1e-7)


def _cast_moving_the_memory(lm):
    lm.model.layers[0].self_attn.o_proj.to(dtype="float64")  # a cast in place moves the weight's memory


def _recast_at_the_old_address(lm):
    # A cast whose new buffer landed where the old one was: another dtype at the same address.
    weight = lm.model.layers[0].self_attn.o_proj.weight
    address = weight.data_ptr()
    weight.detach().view(paddle.int32)._share_buffer_to(weight)
    assert weight.data_ptr() == address and weight.dtype == paddle.int32


def _replace_a_parameter(lm):
    # The old parameter stays alive (the structure holds it) where the kernel would still read it.
    norm = lm.model.norm
    replacement = norm.create_parameter(norm.weight.shape, default_initializer=paddle.nn.initializer.Constant(2.0))
    norm.weight = replacement


def _wrap_a_projection(lm):
    # As a LoRA wrapper does: the layer's projection attribute now holds another module.
    attention = lm.model.layers[-1].self_attn
    old = attention.o_proj
    attention.o_proj = paddle.nn.Sequential(old)


@pytest.mark.parametrize("source", ["micro-tiny", "micro-small"])
@pytest.mark.parametrize("change", [_cast_moving_the_memory, _recast_at_the_old_address, _replace_a_parameter,
                                    _wrap_a_projection])
def test_decode_kernels_refuse_weights_that_changed(change, source):
    """A generation's kernel structures point at the weights; a weight whose memory moved meanwhile, that
    holds another dtype where it was, or a parameter or module put in another's place, is refused, not read
    from freed memory, as the old dtype or as the old weights."""
    from lm_golden import load_lm
    from paddlemix_vl2.models.deepseek_vl2.modeling_deepseek import DeepseekV2ForCausalLM

    if not native.vector_kernels_built():
        pytest.skip("no AVX-512 build of the CPU kernels here: decode steps run the modules")
    lm = DeepseekV2ForCausalLM(load_lm(source).config)
    lm.eval()
    with paddle.no_grad():
        cache = lm.new_cache(1, 4)
        lm(input_ids=paddle.to_tensor([[5]]), cache=cache)
        assert cache.memo((id(lm.model), "decode_stack"), lambda: None) is not None
        change(lm)
        with pytest.raises(ValueError, match="start a new KVCache"):  # a decode step as generation makes it
            lm(input_ids=paddle.to_tensor([[6]]), position_ids=paddle.to_tensor([[1]]), cache=cache)


def test_a_decode_step_with_int32_ids_runs_the_modules():
    """Token ids the kernel does not take (int32) decode through the modules, as before it, to the logits
    of the same step with int64 ids (through the kernel)."""
    from lm_golden import load_lm

    lm = load_lm("micro-small")
    logits = []
    with paddle.no_grad():
        for dtype in ("int64", "int32"):
            cache = lm.new_cache(1, 4)
            lm(input_ids=paddle.to_tensor([[5, 6]]), cache=cache)
            step = lm(input_ids=paddle.to_tensor([[7]], dtype=dtype), position_ids=paddle.to_tensor([[2]]),
                      cache=cache)
            logits.append(step.logits.numpy())
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["micro-tiny", "micro-small"])
def test_decode_step_refuses_inputs_that_do_not_fit(source):
    """``decode_step`` names what does not fit (the ids' or positions' shape or dtype, a position outside the
    cache, more sequences than the cache holds, a token id outside the vocabulary) instead of reading past a
    buffer, and writes nothing then."""
    from lm_golden import load_lm

    if not native.vector_kernels_built():
        pytest.skip("no AVX-512 build of the CPU kernels here: decode steps run the modules")
    lm = load_lm(source)
    with paddle.no_grad():
        cache = lm.new_cache(2, 8)
        lm(input_ids=paddle.to_tensor([[5, 6], [7, 8]]), cache=cache)
        stack = lm.model.decode_stack(cache)
        ids, positions = paddle.to_tensor([[3], [4]]), paddle.to_tensor([[2], [2]])
        before = [b.numpy() for pair in cache.layers for b in pair] + [cache.key_valid.numpy()]
        bad = [
            (paddle.to_tensor([[3, 4], [4, 5]]), positions, 2, "must be \\[2, 1\\] int64"),
            (ids, positions.astype("int32"), 2, "must be \\[2, 1\\] int64"),
            (ids, positions, 8, "outside the cache"),
            (paddle.to_tensor([[3], [4], [5]]), paddle.to_tensor([[2], [2], [2]]), 2, "made for 2"),
            (paddle.to_tensor([[3], [lm.config.vocab_size]]), positions, 2, "outside the vocabulary"),
            (paddle.to_tensor([[-1], [4]]), positions, 2, "outside the vocabulary"),
        ]
        for tokens, places, position, message in bad:
            with pytest.raises(ValueError, match=message):
                native_decode.decode_step(tokens, places, stack, position)
        after = [b.numpy() for pair in cache.layers for b in pair] + [cache.key_valid.numpy()]
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)
        out, routing = native_decode.decode_step(ids, positions, stack, 2)
        assert out.shape == [2, 1, lm.config.hidden_size] and len(routing) == sum(map(bool, stack.top_ks))


@pytest.mark.parametrize("source", ["micro-tiny", "micro-small"])
def test_decode_structures_are_made_on_the_prompts_pass(source):
    """The decode kernel's description of the layers is made while the prompt goes through, so the first
    decode step makes none: MHA and MLA layers whole, with their MLP blocks."""
    from lm_golden import load_lm
    from paddlemix_vl2.generation import decode_one_token, prefill
    from paddlemix_vl2.models.deepseek_vl2.modeling_deepseek import DeepseekV2ForCausalLM
    from paddlemix_vl2.models.deepseek_vl2.moe import DeepseekV2MoE

    if not native.vector_kernels_built():
        pytest.skip("no AVX-512 build of the CPU kernels here: layers decode through their modules")
    lm = DeepseekV2ForCausalLM(load_lm(source).config)
    lm.eval()
    with paddle.no_grad():
        cache = lm.new_cache(2, 8)
        embeds = lm.get_input_embeddings()(paddle.to_tensor([[5, 6, 7], [8, 9, 10]]))
        token = paddle.argmax(prefill(lm, embeds, paddle.ones([2, 3], dtype=paddle.bool), cache), axis=-1)
        made = dict(cache._memo)
        for layer in lm.model.layers:
            if isinstance(layer.mlp, DeepseekV2MoE):  # routed in the kernel at every decode step
                assert made[(id(layer.mlp), "decode_block")] is not None
        assert made[(id(lm.model), "decode_stack")] is not None
        decode_one_token(lm, token, cache, paddle.to_tensor([3, 3]))
    assert cache._memo.keys() == made.keys()


VARIANTS = {
    # the full 27B's query path (q_a_proj, its norm, q_b_proj); no micro checkpoint has one
    "q_lora": {"q_lora_rank": 24},
    "yarn": {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 0.6}},
    "linear": {"rope_scaling": {"type": "linear", "factor": 3.0}},
}


def _variant(lm, name):
    """A random-weight model of ``lm``'s config with the changes of ``VARIANTS[name]``."""
    from paddlemix_vl2.models.deepseek_vl2 import DeepseekV2Config, DeepseekV2ForCausalLM

    paddle.seed(0)
    model = DeepseekV2ForCausalLM(DeepseekV2Config.from_dict({**lm.config.to_dict(), **VARIANTS[name]}))
    model.eval()
    return model


@pytest.mark.parametrize("source,weight_dtype", [
    ("micro-tiny", "auto"), ("micro-tiny", "float32"), ("micro-small", "auto"), ("micro-full", "auto"),
    ("micro-full", "float32"), ("micro-full q_lora", "float32"), ("micro-full yarn", "float32"),
    ("micro-tiny linear", "float32"),
])
@pytest.mark.parametrize("batch", [1, 6])
def test_decode_step_equals_the_module_path(monkeypatch, source, weight_dtype, batch):
    """Decode steps in one ``decode_step`` call (embedding, rotary table with and without scaling, mask, MHA
    or MLA layers with the query through q_proj or q_a_proj/q_b_proj, final norm) against the same steps
    through the modules with every decode kernel off but the per-op ones (the gate module routes): the same
    logits, routing and cache contents, dense and MoE layers, bf16-stored and float32 weights, one and six
    sequences (left-padded)."""
    from lm_golden import load_lm
    from paddlemix_vl2.generation import decode_one_token, prefill
    from paddlemix_vl2.models.deepseek_vl2 import modeling_deepseek

    if not native.vector_kernels_built():
        pytest.skip("no AVX-512 build of the CPU kernels here: decoder layers run their modules")
    name, *variant = source.split()
    lm = load_lm(name, weight_dtype)
    if variant:
        lm = _variant(lm, variant[0])
    rng = np.random.default_rng(batch)
    ids = paddle.to_tensor(rng.integers(0, lm.config.vocab_size, size=(batch, 6)))
    mask = paddle.to_tensor(np.arange(6)[None, :] >= np.arange(batch)[:, None] % 3)  # left padding
    real_apply, real_step = native_decode.decode_rows_apply, native_decode.decode_step
    real_step_applies = native_decode.decode_step_applies
    runs = {}
    for fused in (True, False):
        calls = []
        for module in (modeling_deepseek, moe_module):
            monkeypatch.setattr(module, "decode_rows_apply", lambda x, fused=fused: fused and real_apply(x))
        monkeypatch.setattr(modeling_deepseek, "decode_step_applies",
                            lambda ids, fused=fused: fused and real_step_applies(ids))
        monkeypatch.setattr(modeling_deepseek, "decode_step", lambda *args: calls.append(1) or real_step(*args))
        with paddle.no_grad():
            cache = lm.new_cache(batch, 10)
            cache.routing = []
            logits = [prefill(lm, lm.get_input_embeddings()(ids), mask, cache)]
            positions = mask.astype("int64").sum(axis=1)
            for step in range(3):
                token = paddle.argmax(logits[-1], axis=-1)
                logits.append(decode_one_token(lm, token, cache, positions + step))
        runs[fused] = ([t.numpy() for t in logits], cache.routing, [b.numpy() for pair in cache.layers for b in pair])
        assert len(calls) == (3 if fused else 0)
    (fused_logits, fused_routing, fused_cache), (plain_logits, plain_routing, plain_cache) = runs[True], runs[False]
    for a, b in zip(fused_logits, plain_logits):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    moe_layers = sum(lm.config.is_moe_layer(i) for i in range(lm.config.num_hidden_layers))
    assert len(fused_routing) == len(plain_routing) == 4 * moe_layers  # the prefill's, then three steps'
    assert fused_routing[0].shape == (batch * 6, lm.config.num_experts_per_tok)
    for a, b in zip(fused_routing, plain_routing):
        np.testing.assert_array_equal(np.sort(a, axis=1), np.sort(b, axis=1))
    for a, b in zip(fused_cache, plain_cache):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("heads,latent,rope,keys,spare,hidden,batch", [
    (16, 512, 64, 300, 5, 3, 2), (3, 40, 8, 17, 5, 3, 2), (11, 56, 24, 130, 0, 3, 2), (11, 56, 24, 1, 3, 0, 2),
    (5, 40, 8, 400, 2, 260, 2), (16, 512, 64, 300, 5, 3, 6),
])
def test_mla_decode_attention_matches_numpy(heads, latent, rope, keys, spare, hidden, batch, weight_dtype):
    """The absorbed MLA decode attention against float64 NumPy: the small model's widths; widths off the
    vector and tile sizes with a head group of eight and leftover heads; one key, and a full cache; two
    sequences, the second left-padded by ``hidden`` positions (260 of 400: more than one thread's share and
    several blocks, so the running softmax starts on hidden positions and is rescaled); six sequences, which
    the kernel expands four and two at a time; ``kv_b_proj``'s weight read as stored, float32 or bfloat16."""
    if not native.vector_kernels_built():
        pytest.skip("no AVX-512 build of the CPU kernels here: MLA decode attention runs on Paddle's ops")
    rng = np.random.default_rng(heads + keys)
    nope, value, max_len, scale = 24, 20, keys + spare, (latent + rope) ** -0.5  # scores of unit spread
    q_nope, q_pe = rng.standard_normal((batch, 1, heads, nope)), rng.standard_normal((batch, 1, heads, rope))
    k_pe, ckv = rng.standard_normal((batch, max_len, rope)), rng.standard_normal((batch, max_len, latent))
    # kv_b_proj's weight [heads * (nope + value), latent]: per head its W_UK rows, then its W_UV rows.
    kv_b = paddle.to_tensor(np.concatenate([
        rng.standard_normal((heads, nope, latent)) * nope ** -0.5, rng.standard_normal((heads, value, latent))
    ], axis=1).reshape(heads * (nope + value), latent).astype(np.float32)).astype(weight_dtype)
    w = kv_b.astype("float32").numpy().astype(np.float64).reshape(heads, nope + value, latent)
    w_uk, w_uv = w[:, :nope], w[:, nope:]
    mask = np.zeros((batch, 1, 1, max_len))
    mask[1, ..., :hidden] = np.finfo(np.float32).min
    tensors = [paddle.to_tensor(a.astype(np.float32)) for a in (q_nope, q_pe, k_pe, ckv)]
    with paddle.no_grad():
        out = native_decode.mla_decode_attention(*tensors, kv_b, paddle.to_tensor(mask.astype(np.float32)), keys,
                                                 scale).numpy()
        with pytest.raises(ValueError, match="positions of a cache"):
            native_decode.mla_decode_attention(*tensors, kv_b, paddle.to_tensor(mask.astype(np.float32)),
                                               max_len + 1, scale)
    q_latent = np.einsum("bhd,hdc->bhc", q_nope[:, 0], w_uk)
    scores = np.einsum("bhc,bsc->bhs", q_latent, ckv[:, :keys]) + np.einsum("bhr,bsr->bhs", q_pe[:, 0],
                                                                              k_pe[:, :keys])
    scores = scores * scale + mask[:, 0, :, :keys]
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.einsum("bhc,hvc->bhv", np.einsum("bhs,bsc->bhc", probs, ckv[:, :keys]), w_uv)
    np.testing.assert_allclose(out.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4)


def test_mla_decode_attention_with_minus_infinity_in_the_mask():
    """-inf hides positions as finfo.min does (a padded row over several blocks and both threads' shares),
    and a row hidden by -inf everywhere gives zeros, not NaN."""
    if not native.vector_kernels_built():
        pytest.skip("no AVX-512 build of the CPU kernels here: MLA decode attention runs on Paddle's ops")
    rng = np.random.default_rng(7)
    heads, nope, rope, latent, value, keys = 3, 8, 8, 40, 6, 200
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in (
        (2, 1, heads, nope), (2, 1, heads, rope), (2, keys, rope), (2, keys, latent), (heads * (nope + value), latent))]
    masks = {}
    for hidden in ("finfo", "inf"):
        mask = np.zeros((2, 1, 1, keys), dtype=np.float32)
        mask[0, ..., :150] = np.finfo(np.float32).min if hidden == "finfo" else -np.inf
        mask[1] = -np.inf
        masks[hidden] = native_decode.mla_decode_attention(
            *(paddle.to_tensor(a) for a in arrays), paddle.to_tensor(mask), keys, 0.3).numpy()
    np.testing.assert_allclose(masks["inf"][0], masks["finfo"][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(masks["inf"][1], np.zeros_like(masks["inf"][1]))


def test_mla_decode_attention_refuses_a_weight_of_the_wrong_shape():
    """kv_b_proj's weight must hold nope + value rows per head over the latent."""
    if not native.vector_kernels_built():
        pytest.skip("no AVX-512 build of the CPU kernels here: MLA decode attention runs on Paddle's ops")
    q_nope, q_pe = paddle.zeros([1, 1, 2, 4]), paddle.zeros([1, 1, 2, 8])
    k_pe, ckv, mask = paddle.zeros([1, 6, 8]), paddle.zeros([1, 6, 16]), paddle.zeros([1, 1, 1, 6])
    for weight in (paddle.zeros([2 * 7, 12]), paddle.zeros([2 * 4, 16]), paddle.zeros([2 * 7, 16], dtype="float16")):
        with pytest.raises(ValueError, match="kv_b_weight"):
            native_decode.mla_decode_attention(q_nope, q_pe, k_pe, ckv, weight, mask, 3, 0.5)


@pytest.mark.parametrize("name", ["micro-small", "micro-full"])
def test_mla_decode_steps_with_the_kernel_equal_the_paddle_path(monkeypatch, name):
    """Prefill and decode steps of the MLA models with the kernels (``attention_prefill`` over the expanded
    keys where the expanded form is cheaper, ``mla_decode_attention``) against the same steps through
    Paddle's ops: the same logits and the same compressed cache, three rows, left-padded. Padding positions
    are left out of the cache comparison: their queries see no key, and the kernels average the keys up to
    theirs where Paddle's softmax averages the whole buffer (nothing reads those entries)."""
    from lm_golden import load_lm
    from paddlemix_vl2.generation import decode_one_token, prefill
    from paddlemix_vl2.models.deepseek_vl2 import attention, modeling_deepseek

    if not native.vector_kernels_built():
        pytest.skip("no AVX-512 build of the CPU kernels here: MLA decode attention runs on Paddle's ops")
    lm = load_lm(name)
    ids = paddle.to_tensor(np.random.default_rng(0).integers(0, lm.config.vocab_size, size=(3, 6)))
    mask = paddle.to_tensor(np.arange(6)[None, :] >= np.arange(3)[:, None])
    kernel, real_apply, real_prefill = attention.mla_decode_attention, attention.mha_kernels_apply, attention.attention_prefill
    # The layers' modules, not the fused step (test_decode_step_equals_the_module_path checks that).
    monkeypatch.setattr(modeling_deepseek, "decode_step_applies", lambda ids: False)
    runs = []
    for use_kernel in (True, False):
        calls, prefill_calls = [], []
        monkeypatch.setattr(attention, "mla_decode_attention", lambda *args: calls.append(1) or kernel(*args))
        monkeypatch.setattr(attention, "attention_prefill",
                            lambda *args, **kwargs: prefill_calls.append(1) or real_prefill(*args, **kwargs))
        monkeypatch.setattr(attention, "mha_kernels_apply",
                            lambda x, dtype, use=use_kernel: use and real_apply(x, dtype))
        with paddle.no_grad():
            cache = lm.new_cache(3, 10)
            logits = [prefill(lm, lm.get_input_embeddings()(ids), mask, cache)]
            positions = mask.astype("int64").sum(axis=1)
            for step in range(3):
                logits.append(decode_one_token(lm, paddle.argmax(logits[-1], axis=-1), cache, positions + step))
        assert len(calls) == (3 * lm.config.num_hidden_layers if use_kernel else 0)
        expanded = lm.model.layers[0].self_attn.expanded_is_cheaper(6, 10)
        assert len(prefill_calls) == (lm.config.num_hidden_layers if use_kernel and expanded else 0)
        # With the kernels kv_b_proj is read as stored: no float32 copies of its halves for the generation.
        halves = [key for key in cache._memo if "kv_b_proj_halves" in key]
        assert not halves if use_kernel and expanded else halves
        runs.append(([t.numpy() for t in logits], [b.numpy() for pair in cache.layers for b in pair]))
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(runs[0][1], runs[1][1]):
        for row in range(3):  # row r starts with r padding positions
            np.testing.assert_allclose(a[row, row:], b[row, row:], rtol=1e-5, atol=1e-5)


def test_linear_with_gradient_never_takes_the_kernel(monkeypatch):
    layer = Linear(16, 8)
    for kernel in ("few_rows_linear", "linear"):
        monkeypatch.setattr(layers, kernel, lambda *args: pytest.fail("kernel called with gradient on"))
    x = paddle.randn([2, 16])
    x.stop_gradient = False
    layer(x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.tile(layer.weight.numpy().sum(0), (2, 1)), rtol=1e-5, atol=1e-6)


def test_linear_draws_the_weights_nn_linear_draws():
    """A seeded model starts from the same weights as with Paddle's nn.Linear, transposed."""
    paddle.seed(7)
    reference = paddle.nn.Linear(24, 10)
    paddle.seed(7)
    layer = Linear(24, 10)
    assert layer.weight.shape == [10, 24]
    np.testing.assert_array_equal(layer.weight.numpy(), reference.weight.numpy().T)
    np.testing.assert_array_equal(layer.bias.numpy(), reference.bias.numpy())


def test_switched_off_by_the_environment(monkeypatch, rebuilt_library):
    monkeypatch.setenv(native.NATIVE_VARIABLE, "0")
    assert native.kernel_library() is None
    layer = Linear(8, 4)
    with paddle.no_grad():
        out = layer(paddle.ones([1, 8]))
    np.testing.assert_allclose(out.numpy(), layer.weight.numpy().sum(1)[None] + layer.bias.numpy(), rtol=1e-5)


def test_a_failed_build_falls_back_with_one_warning(monkeypatch, rebuilt_library, caplog):
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.kernel_library() is None
    assert "could not build the CPU kernels" in caplog.text
    assert list(rebuilt_library.iterdir()) == [], "a failed build left a file behind"


@pytest.mark.parametrize("length", [1, 16, 729, 1037])
def test_softmax_equals_numpy(length):
    """Rows of the ViT's and a prompt's attention lengths, with masked (-inf and dtype-minimum) entries."""
    if not native.vector_kernels_built():
        pytest.skip("no AVX-512 build of the CPU kernels here (CPU without AVX-512, or no compiler): attention "
                    "uses Paddle's softmax, which test_masked_softmax_takes_the_kernel_only_without_gradient checks")
    rng = np.random.default_rng(length)
    scores = (rng.standard_normal((3, 5, length)) * 8).astype(np.float32)
    scores[0, :, length // 2 + 1:] = -np.inf
    scores[1, :, : length // 3] = np.finfo(np.float32).min
    with paddle.no_grad():
        out = native.softmax_last_axis(paddle.to_tensor(scores)).numpy()
        scratch = paddle.to_tensor(scores)
        in_place = native.softmax_last_axis(scratch, overwrite=True)
    np.testing.assert_array_equal(in_place.numpy(), out)
    np.testing.assert_array_equal(scratch.numpy(), out)
    shifted = np.exp(scores.astype(np.float64) - scores.max(-1, keepdims=True))
    expected = shifted / shifted.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("mask_batches", [1, 2])
def test_masked_softmax_takes_the_kernel_only_without_gradient(monkeypatch, mask_batches):
    """The kernel adds a [B or 1, 1, T, S] mask row by row; the Paddle path (with gradient) agrees."""
    calls = []
    kernel = native.softmax_last_axis
    monkeypatch.setattr(layers, "softmax_last_axis", lambda *args: calls.append(1) or kernel(*args))
    rng = np.random.default_rng(mask_batches)
    scores = paddle.to_tensor(rng.standard_normal((2, 3, 5, 21)).astype(np.float32))
    mask = np.triu(np.full((5, 21), np.finfo(np.float32).min, dtype=np.float32), k=17)
    mask = np.broadcast_to(mask, (mask_batches, 1, 5, 21)).copy()
    mask[-1, 0, :, :3] = np.finfo(np.float32).min  # the last row's padding
    with paddle.no_grad():
        fast = layers.masked_softmax(scores, paddle.to_tensor(mask))
    scores.stop_gradient = False
    plain = layers.masked_softmax(scores, paddle.to_tensor(mask))
    shifted = scores.numpy().astype(np.float64) + mask
    expected = np.exp(shifted - shifted.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(fast.numpy(), expected, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(plain.numpy(), expected, rtol=2e-6, atol=1e-7)
    assert len(calls) == (1 if native.vector_kernels_built() else 0)


def test_gelu_tanh_equals_numpy_and_paddle():
    """Large and small values of both signs, and a length that is not a multiple of the vector width."""
    if not native.vector_kernels_built():
        pytest.skip("no AVX-512 build of the CPU kernels here (CPU without AVX-512, or no compiler): the vision "
                    "tower uses Paddle's GELU, which the vision goldens check")
    x = np.concatenate([np.linspace(-12, 12, 4001), [-100.0, -30.0, 0.0, 30.0, 100.0]]).astype(np.float32)
    u = np.sqrt(2 / np.pi) * (x.astype(np.float64) + 0.044715 * x.astype(np.float64) ** 3)
    expected = 0.5 * x * (1 + np.tanh(u))
    with paddle.no_grad():
        scratch = paddle.to_tensor(x)
        out = layers.gelu_tanh(scratch, overwrite=True)
        plain = layers.gelu_tanh(paddle.to_tensor(x))
    np.testing.assert_allclose(out.numpy(), expected, rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(scratch.numpy(), out.numpy())
    np.testing.assert_allclose(out.numpy(), plain.numpy(), rtol=2e-6, atol=1e-6)


def test_linear_bias_added_in_place_equals_the_broadcast_add(monkeypatch):
    paddle.seed(3)
    layer = Linear(24, 37)
    layer.bias.set_value(paddle.uniform([37]))
    x = paddle.randn([2, 3, 24])  # 6 rows: the few-row kernel, then the bias kernel
    calls = []
    kernel = native.add_bias_
    monkeypatch.setattr(layers, "add_bias_", lambda *args: calls.append(1) or kernel(*args))
    with paddle.no_grad():
        fast = layer(x)
    expected = x.numpy().astype(np.float64) @ layer.weight.numpy().T.astype(np.float64) + layer.bias.numpy()
    np.testing.assert_allclose(fast.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1


def test_rope_store_prefill_equals_paddle_rope_and_the_cache_write():
    """q rotated in place, k rotated and v copied into the heads-first cache at start .. start + T - 1, and
    nothing else of the cache touched: two sequences, grouped keys/values, heads of 18 (half 9)."""
    if not native.vector_kernels_built():
        pytest.skip("no AVX-512 build of the CPU kernels here: a prompt's RoPE and cache write run on Paddle's "
                    "ops, which the goldens check")
    from paddlemix_vl2.models.deepseek_vl2.rotary import apply_rotary_pos_emb

    batch, tokens, heads, kv_heads, head_dim, max_len, start = 2, 5, 4, 2, 18, 12, 3
    rng = np.random.default_rng(11)
    q, k, v = (paddle.to_tensor(rng.standard_normal((batch, tokens, n * head_dim)).astype(np.float32))
               for n in (heads, kv_heads, kv_heads))
    angles = rng.random((batch, tokens, head_dim // 2)).astype(np.float32) * 6
    cos, sin = (paddle.to_tensor(np.concatenate([f(angles)] * 2, axis=-1)) for f in (np.cos, np.sin))
    keys, values = (paddle.to_tensor(rng.standard_normal((batch, kv_heads, max_len, head_dim)).astype(np.float32))
                    for _ in range(2))
    expected_keys, expected_values = keys.numpy().copy(), values.numpy().copy()
    rotate = lambda x, n: apply_rotary_pos_emb(x.reshape([batch, tokens, n, head_dim]), cos, sin, False).numpy()
    expected_q = rotate(q, heads)
    expected_keys[:, :, start:start + tokens] = rotate(k, kv_heads).transpose(0, 2, 1, 3)
    expected_values[:, :, start:start + tokens] = v.numpy().reshape(batch, tokens, kv_heads, head_dim).transpose(0, 2, 1, 3)
    with paddle.no_grad():
        rotated = native.rope_store_prefill(q, k, v, cos, sin, keys, values, start)
    np.testing.assert_allclose(rotated.numpy(), expected_q, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(keys.numpy(), expected_keys, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(values.numpy(), expected_values)
    before = keys.numpy().copy(), values.numpy().copy()
    misfits = [
        (q, k, v, cos, sin, keys, values, max_len - tokens + 1),  # past the end
        (q, k, v, cos, sin, keys, values, -1),
        (q, k, v[:, :-1], cos, sin, keys, values, start),  # values of fewer tokens
        (q, k, v, cos, sin[:1], keys, values, start),  # a sine table of one sequence
        (q[:, :, :-1], k, v, cos, sin, keys, values, start),  # q not whole heads
        (q.reshape([batch, tokens, heads, head_dim]), k, v, cos, sin, keys, values, start),  # q split in heads
        (q, k, v, cos, sin, keys, values[:, :, :-1], start),  # a shorter value cache
    ]
    for args in misfits:
        with pytest.raises(ValueError, match="do not fit a cache"):
            native.rope_store_prefill(*args)
    np.testing.assert_array_equal(keys.numpy(), before[0])
    np.testing.assert_array_equal(values.numpy(), before[1])


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_mha_decode_step_equals_the_plain_path(monkeypatch, kv_heads):
    """A prefill (``attention_prefill``) and a decode step (``decode_step``, whose ``mha_decode`` does
    RoPE, the cache write and attention over the written positions) of MHA through the kernels against the
    Paddle path: two sequences, one left-padded, heads of 18 (not a multiple of the vector width), and
    grouped keys/values; the logits and the cache must agree."""
    if not native.vector_kernels_built():
        pytest.skip("no AVX-512 build of the CPU kernels here: decode attention runs on Paddle's ops, which "
                    "the generation goldens check")
    import json

    from lm_golden import checkpoint_dir
    from paddlemix_vl2.models.deepseek_vl2 import DeepseekV2Config, DeepseekV2ForCausalLM

    with open(os.path.join(checkpoint_dir("micro-tiny"), "config.json"), encoding="utf-8") as f:
        settings = json.load(f)["language_config"]
    settings.update(hidden_size=72, num_attention_heads=4, num_key_value_heads=kv_heads)
    paddle.seed(kv_heads)
    lm = DeepseekV2ForCausalLM(DeepseekV2Config.from_dict(settings))
    lm.eval()
    prompt = paddle.randint(0, lm.config.vocab_size, [2, 6])
    valid = paddle.to_tensor([[True] * 6, [False, False] + [True] * 4])
    token = paddle.randint(0, lm.config.vocab_size, [2, 1])
    results = []
    for native_setting in (None, "0"):
        if native_setting is not None:
            monkeypatch.setenv(native.NATIVE_VARIABLE, native_setting)
        native.kernel_library.cache_clear()
        calls = []
        kernel = native_decode.decode_step
        monkeypatch.setattr("paddlemix_vl2.models.deepseek_vl2.modeling_deepseek.decode_step",
                            lambda *args: calls.append(1) or kernel(*args))
        with paddle.no_grad():
            cache = lm.new_cache(2, 9)
            lm(input_ids=prompt, attention_mask=valid, cache=cache)
            logits = lm(input_ids=token, position_ids=paddle.to_tensor([[6], [4]]), cache=cache).logits
        results.append((logits.numpy(), [b.numpy() for pair in cache.layers for b in pair], len(calls)))
    monkeypatch.delenv(native.NATIVE_VARIABLE)
    native.kernel_library.cache_clear()
    (fast, fast_cache, fast_calls), (plain, plain_cache, plain_calls) = results
    assert (fast_calls, plain_calls) == (1, 0)
    np.testing.assert_allclose(fast, plain, rtol=1e-4, atol=1e-5)
    # Row 1's two padding positions are left out: no valid query reads them, and a padding query (all
    # keys masked) averages the values over the written positions in the kernel, over the whole buffer
    # in Paddle's softmax, so the next layers' keys and values there differ.
    written = np.ones([2, fast_cache[0].shape[1]], dtype=bool)
    written[1, :2] = False
    for fast_buffer, plain_buffer in zip(fast_cache, plain_cache):
        np.testing.assert_allclose(  # later layers: rounding carried over
            fast_buffer[written], plain_buffer[written], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("tokens, heads, head_dim", [(37, 3, 24), (729, 2, 72)])
def test_attention_qkv_equals_numpy(tokens, heads, head_dim):
    """The vision tower's attention from the fused q/k/v projection, two sequences: head widths that leave
    part of a 32-column panel, a sequence length that leaves part of a 12-row sliver, and the real 729."""
    if not native.vector_kernels_built():
        pytest.skip("no AVX-512 build of the CPU kernels here: the vision tower's attention uses Paddle's "
                    "matmuls and softmax, which the vision goldens check")
    rng = np.random.default_rng(tokens)
    width = heads * head_dim
    qkv = rng.standard_normal((2, tokens, 3 * width)).astype(np.float32)
    scale = head_dim ** -0.5
    with paddle.no_grad():
        out = native.attention_qkv(paddle.to_tensor(qkv), heads, scale).numpy()
    q, k, v = (part.reshape(2, tokens, heads, head_dim).transpose(0, 2, 1, 3).astype(np.float64)
               for part in np.split(qkv, 3, axis=-1))
    scores = q @ k.transpose(0, 1, 3, 2) * scale
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = (probs @ v).transpose(0, 2, 1, 3).reshape(2, tokens, width)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_swiglu_mlps_refuses_a_table_whose_weights_moved():
    """A weight table holds pointers: after a cast moves the weights' memory the kernel must not read
    the old addresses."""
    if native.kernel_library() is None:
        pytest.skip("the package's CPU kernels are not built here (no C compiler or PADDLEMIX_VL2_NATIVE=0)")
    mlp = DeepseekV2MLP(16, 24)
    table = mlp.native_table()
    x = paddle.randn([2, 16])
    rows = np.arange(2)
    with paddle.no_grad():
        before = native.swiglu_mlps(x, table, np.zeros(1, dtype=np.int64), [2], rows, np.ones(2, np.float32))
        np.testing.assert_allclose(before.numpy(), mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)).numpy(),
                                   rtol=1e-5, atol=1e-6)
        mlp.to(dtype="float64")
        with pytest.raises(ValueError, match="stale"):
            native.swiglu_mlps(x, table, np.zeros(1, dtype=np.int64), [2], rows, np.ones(2, np.float32))


@pytest.mark.parametrize("tokens_first", [False, True])
@pytest.mark.parametrize("heads,kv_heads,key_dim,value_dim,start,q_len", [(4, 4, 24, 16, 0, 7), (6, 2, 40, 40, 5, 3)])
def test_attention_prefill_with_other_key_and_value_widths_matches_numpy(heads, kv_heads, key_dim, value_dim, start,
                                                                           q_len, tokens_first):
    """The prefill kernel against float64 NumPy: keys wider than values (MLA's expanded [k_nope | k_pe]),
    grouped heads, queries after cached positions, a key buffer longer than the keys read and a mask wider
    still: the causal mask the model builds (the kernel skips the blocks past a query block's last row and
    leaves the rest to the mask), with the second key of the second sequence hidden too; keys and values
    heads first (the MHA cache) or tokens first (MLA's expansion)."""
    if not native.vector_kernels_built():
        pytest.skip("no AVX-512 build of the CPU kernels here: prefill attention runs on Paddle's ops")
    rng = np.random.default_rng(heads + start)
    batch, key_len, mask_len, scale = 2, start + q_len + 2, start + q_len + 4, key_dim ** -0.5
    q = rng.standard_normal((batch, q_len, heads, key_dim))
    keys = rng.standard_normal((batch, kv_heads, key_len, key_dim))
    values = rng.standard_normal((batch, kv_heads, key_len, value_dim))
    future = np.arange(mask_len)[None, :] > start + np.arange(q_len)[:, None]  # [T, L]
    mask = np.where(future, np.finfo(np.float32).min, 0.0)[None, None].repeat(batch, axis=0)
    mask[1, ..., 1] = np.finfo(np.float32).min  # not key 0: every query keeps a key to attend to
    given = [a.transpose(0, 2, 1, 3) if tokens_first else a for a in (keys, values)]
    out = native.attention_prefill(*(paddle.to_tensor(a.astype(np.float32)) for a in (q, *given, mask)),
                                   start, scale, tokens_first=tokens_first).numpy()
    group = heads // kv_heads
    k, v = np.repeat(keys, group, axis=1), np.repeat(values, group, axis=1)  # [B, heads, key_len, D]
    scores = np.einsum("bthd,bhsd->bhts", q, k) * scale + mask[:, :, :, :key_len]
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.einsum("bhts,bhsd->bthd", probs, v).reshape(batch, q_len, heads * value_dim)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="do not fit"):
        native.attention_prefill(*(paddle.to_tensor(a.astype(np.float32)) for a in (q, given[0], given[1][:, :-3], mask)),
                                 start, scale, tokens_first=tokens_first)
    with pytest.raises(ValueError, match="float32"):
        native.attention_prefill(*(paddle.to_tensor(a.astype(np.float64)) for a in (q, *given)),
                                 paddle.to_tensor(mask.astype(np.float32)), start, scale, tokens_first=tokens_first)
