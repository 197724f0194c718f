"""MoEGate routing, the router kernel and the auxiliary loss against a NumPy computation written from the
formulas."""
import itertools

import numpy as np
import paddle
import pytest

from paddlemix_vl2.models.deepseek_vl2 import ConfigError, DeepseekV2Config, DeepseekV2MoE, MoEGate
from paddlemix_vl2.models.deepseek_vl2 import native, native_decode
from paddlemix_vl2.models.deepseek_vl2.moe import moe_aux_loss

E, K, H = 16, 4, 32


def numpy_route(logits, scoring, method, n_group, topk_group, k, norm, rsf, bias=None):
    """Returns (sets of chosen experts per token, weights by expert per token)."""
    logits = logits.astype(np.float64)
    if scoring == "softmax":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        scores = e / e.sum(-1, keepdims=True)
    else:
        scores = 1 / (1 + np.exp(-logits))
    choices, weights, ties = [], [], []
    for s in scores:
        choice = s + bias if method == "noaux_tc" else s.copy()
        if method in ("group_limited_greedy", "noaux_tc"):
            groups = choice.reshape(n_group, -1)
            if method == "group_limited_greedy":
                group_score = groups.max(-1)
            else:
                group_score = np.sort(groups, -1)[:, -2:].sum(-1)
            keep = np.argsort(-group_score, kind="stable")[:topk_group]
            mask = np.zeros(n_group, bool)
            mask[keep] = True
            choice = np.where(np.repeat(mask, E // n_group), choice, 0.0)
        ranked = np.sort(choice)[::-1]
        # Masked experts all hold 0.0: when the k-th and (k+1)-th choice tie, any pick is correct.
        ties.append(abs(ranked[k - 1] - ranked[k]) < 1e-9)
        idx = np.argsort(-choice, kind="stable")[:k]
        w = s[idx]
        if k > 1 and norm:
            w = w / (w.sum() + 1e-20)
        choices.append(set(idx.tolist()))
        weights.append(dict(zip(idx.tolist(), (w * rsf).tolist())))
    return choices, weights, ties


CASES = [
    ("softmax", "greedy", 1, 1, False, 1.0),
    ("softmax", "greedy", 1, 1, True, 2.5),
    ("sigmoid", "greedy", 1, 1, False, 1.0),
    ("softmax", "group_limited_greedy", 4, 2, False, 1.0),
    ("softmax", "group_limited_greedy", 8, 3, True, 1.5),
    ("sigmoid", "noaux_tc", 1, 1, True, 2.0),
    ("sigmoid", "noaux_tc", 4, 2, True, 2.5),
    ("sigmoid", "noaux_tc", 8, 2, False, 1.0),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_gate_matches_numpy(case):
    scoring, method, n_group, topk_group, norm, rsf = CASES[case]
    rng = np.random.default_rng(case)
    config = DeepseekV2Config(
        hidden_size=H, n_routed_experts=E, num_experts_per_tok=K, scoring_func=scoring, topk_method=method,
        n_group=n_group, topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=rsf,
    )
    gate = MoEGate(config)
    gate.eval()
    weight = rng.normal(0, 0.5, (E, H)).astype(np.float32)
    gate.weight.set_value(paddle.to_tensor(weight))
    bias = None
    if method == "noaux_tc":
        bias = rng.uniform(-0.2, 0.2, E).astype(np.float32)
        gate.e_score_correction_bias.set_value(paddle.to_tensor(bias))
    x = rng.normal(size=(2, 40, H)).astype(np.float32)
    topk_idx, topk_weight, aux = gate(paddle.to_tensor(x))
    assert aux is None
    logits = x.reshape(-1, H) @ weight.T
    assert_routes_like_numpy(topk_idx.numpy(), topk_weight.numpy(), logits, config, bias)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_router_kernel_matches_numpy(case):
    """``native_decode.route_rows`` (the router of a decode step's MoE kernel) by the same rules."""
    if native.kernel_library() is None:
        pytest.skip("the CPU kernels are not built here; decode routes through MoEGate, tested above")
    scoring, method, n_group, topk_group, norm, rsf = CASES[case]
    rng = np.random.default_rng(100 + case)
    config = DeepseekV2Config(
        hidden_size=H, n_routed_experts=E, num_experts_per_tok=K, scoring_func=scoring, topk_method=method,
        n_group=n_group, topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=rsf,
    )
    bias = rng.uniform(-0.2, 0.2, E).astype(np.float32) if method == "noaux_tc" else None
    logits = rng.normal(0, 2.0, (80, E)).astype(np.float32)
    router = native_decode.RouterConfig.of(config, None if bias is None else paddle.to_tensor(bias))
    topk_idx, topk_weight = native_decode.route_rows(paddle.to_tensor(logits), router)
    assert_routes_like_numpy(topk_idx, topk_weight, logits, config, bias)


def assert_routes_like_numpy(idx, w, logits, config, bias):
    """idx, w [N, K] against ``numpy_route`` of float32 logits [N, E]: the same experts for every token
    without a tie at the k-th place (at most a quarter may tie), weights to float32 rounding."""
    sets, weights, ties = numpy_route(
        logits, config.scoring_func, config.moe_topk_method, config.n_group, config.topk_group, K,
        config.norm_topk_prob, config.routed_scaling_factor, bias,
    )
    assert sum(ties) < len(ties) // 4
    for t in range(len(sets)):
        if ties[t]:
            continue
        assert set(idx[t].tolist()) == sets[t], f"token {t}"
        for j, e in enumerate(idx[t]):
            np.testing.assert_allclose(w[t, j], weights[t][e], rtol=1e-5, atol=1e-6)


def test_noaux_bias_changes_selection_but_not_weights():
    config = DeepseekV2Config(
        hidden_size=H, n_routed_experts=E, num_experts_per_tok=K, scoring_func="sigmoid", topk_method="noaux_tc",
        n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
    )
    gate = MoEGate(config)
    gate.eval()
    rng = np.random.default_rng(0)
    gate.weight.set_value(paddle.to_tensor(rng.normal(0, 0.5, (E, H)).astype(np.float32)))
    bias = np.zeros(E, np.float32)
    bias[3] = 10.0  # expert 3 is always chosen, but its weight stays its own sigmoid score
    gate.e_score_correction_bias.set_value(paddle.to_tensor(bias))
    x = paddle.to_tensor(rng.normal(size=(1, 8, H)).astype(np.float32))
    idx, w, _ = gate(x)
    scores = 1 / (1 + np.exp(-(x.numpy().reshape(-1, H) @ gate.weight.numpy().T)))
    assert (idx.numpy() == 3).any(axis=1).all()
    np.testing.assert_allclose(w.numpy(), np.take_along_axis(scores, idx.numpy(), 1), rtol=1e-5)


@pytest.mark.parametrize("seq_aux", [True, False])
def test_aux_loss_matches_numpy(seq_aux):
    rng = np.random.default_rng(1)
    bsz, seq, alpha = 3, 10, 0.01
    logits = rng.normal(size=(bsz * seq, E)).astype(np.float32)
    scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    topk = np.argsort(-scores, -1)[:, :K]
    ours = float(moe_aux_loss(paddle.to_tensor(scores), paddle.to_tensor(topk), bsz, E, alpha, seq_aux))
    if seq_aux:
        total = 0.0
        for b in range(bsz):
            counts = np.bincount(topk[b * seq:(b + 1) * seq].ravel(), minlength=E)
            ce = counts / (seq * K / E)
            total += (ce * scores[b * seq:(b + 1) * seq].mean(0)).sum()
        expected = total / bsz * alpha
    else:
        fraction = np.bincount(topk.ravel(), minlength=E) / topk.size
        expected = (scores.mean(0) * fraction * E).sum() * alpha
    np.testing.assert_allclose(ours, expected, rtol=1e-5)


def test_moe_dispatch_equals_dense_loop():
    """Grouped moe_infer equals running every token through its experts one by one."""
    config = DeepseekV2Config(
        hidden_size=H, moe_intermediate_size=8, n_routed_experts=E, num_experts_per_tok=K, n_shared_experts=1,
    )
    paddle.seed(3)
    moe = DeepseekV2MoE(config)
    moe.eval()
    x = paddle.randn([2, 5, H])
    idx, w, _ = moe.gate(x)
    flat = x.reshape([-1, H])
    expected = []
    for t, j in itertools.product(range(flat.shape[0]), range(K)):
        expected.append(moe.experts[int(idx[t, j])](flat[t:t + 1]) * float(w[t, j]))
    expected = paddle.concat(expected).reshape([flat.shape[0], K, H]).sum(1) + moe.shared_experts(flat)
    np.testing.assert_allclose(moe(x).reshape([-1, H]).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "field,value", [("topk_method", "top1"), ("scoring_func", "relu"), ("rope_scaling", {"type": "ntk"})]
)
def test_unknown_config_values_are_rejected(field, value):
    with pytest.raises(ConfigError, match=field):
        DeepseekV2Config(**{field: value})


@pytest.mark.parametrize("settings,named", [
    (dict(num_experts_per_tok=17), "num_experts_per_tok"),
    (dict(topk_method="group_limited_greedy", n_group=3, topk_group=1), "n_group"),
    (dict(topk_method="group_limited_greedy", n_group=4, topk_group=5), "topk_group"),
    (dict(topk_method="noaux_tc", scoring_func="sigmoid", n_group=16, topk_group=2), "best two"),
])
def test_router_sizes_that_do_not_fit_are_rejected(settings, named):
    with pytest.raises(ConfigError, match=named):
        DeepseekV2Config(**{"n_routed_experts": E, "num_experts_per_tok": K, **settings})
