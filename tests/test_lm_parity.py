"""The language model against the official float32 goldens, for all three micro checkpoints.

Text-only cases start from input_ids; the image cases start from the golden ``inputs_embeds`` so the
language model is checked on every case independently of the vision tower.
"""
import numpy as np
import paddle
import pytest

from lm_golden import (
    CASES, CHECKPOINTS, ROUTER_GAP, WEIGHT_DTYPES, assert_greedy_match, assert_logits_match, expected, load_lm,
)
from paddlemix_vl2.generation import generate


def _router_layer1(lm, run):
    """Run ``run()`` and return the first MoE layer's topk_idx [N, K] (captured with a forward hook)."""
    first_moe = next(i for i in range(lm.config.num_hidden_layers) if lm.config.is_moe_layer(i))
    captured = []
    hook = lm.model.layers[first_moe].mlp.gate.register_forward_post_hook(
        lambda layer, inputs, outputs: captured.append(outputs[0].numpy())
    )
    try:
        result = run()
    finally:
        hook.remove()
    return result, captured[0]


@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_text_only_logits_router_and_greedy(name, weight_dtype):
    lm, exp = load_lm(name, weight_dtype), expected(name, "i_text_only")
    input_ids = paddle.to_tensor(exp["input_ids"])
    with paddle.no_grad():
        out, topk_idx = _router_layer1(lm, lambda: lm(input_ids=input_ids))
    logits = out.logits.numpy()
    assert_logits_match(logits[:, exp["logits_positions"]], exp)
    np.testing.assert_array_equal(logits.argmax(-1), exp["logits_argmax"])

    ours, theirs, gap = np.sort(topk_idx, axis=1), exp["router_l1_topk_idx"], exp["router_l1_gap"]
    decided = gap > ROUTER_GAP
    assert decided.sum() > 0
    np.testing.assert_array_equal(ours[decided], theirs[decided])

    tokens = generate(lm, input_ids=input_ids, max_new_tokens=12).numpy()
    assert_greedy_match(tokens, exp)


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("case", [c for c in CASES if c != "i_text_only"])
def test_from_inputs_embeds(name, case):
    lm, exp = load_lm(name), expected(name, case)
    embeds = paddle.to_tensor(exp["inputs_embeds"])
    mask = paddle.to_tensor(exp["attention_mask"])
    with paddle.no_grad():
        out, topk_idx = _router_layer1(lm, lambda: lm(inputs_embeds=embeds, attention_mask=mask))
    assert_logits_match(out.logits.numpy()[:, exp["logits_positions"]], exp)

    valid = exp["attention_mask"].reshape(-1) & (exp["router_l1_gap"] > ROUTER_GAP)
    np.testing.assert_array_equal(np.sort(topk_idx, axis=1)[valid], exp["router_l1_topk_idx"][valid])

    tokens = generate(lm, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12, eos_token_id=1).numpy()
    assert_greedy_match(tokens, exp)


def test_default_position_ids_follow_generation_rule():
    exp = expected("micro-tiny", "viii_batch_left_pad")
    from paddlemix_vl2.models.deepseek_vl2.modeling_deepseek import default_position_ids

    mask = paddle.to_tensor(exp["attention_mask"])
    ours = default_position_ids(mask, 0, mask.shape[1]).numpy()
    np.testing.assert_array_equal(ours, exp["position_ids"])
