"""The whole model, from conversations and image files to logits and greedy tokens, against the goldens."""
import numpy as np
import paddle
import pytest

from lm_golden import (
    CASES, CHECKPOINTS, WEIGHT_DTYPES, assert_greedy_match, assert_logits_match, expected, load_processor, load_vl,
    process_case,
)


@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("case", CASES)
def test_processor_to_logits_and_greedy(name, case, weight_dtype):
    model, exp = load_vl(name, weight_dtype), expected(name, case)
    inputs = process_case(name, case)
    np.testing.assert_array_equal(inputs.input_ids.numpy(), exp["input_ids"])
    with paddle.no_grad():
        embeds = model.prepare_inputs_embeds(
            inputs.input_ids, inputs.images, inputs.images_seq_mask, inputs.images_spatial_crop
        )
        logits = model(inputs_embeds=embeds, attention_mask=inputs.attention_mask).logits.numpy()
    valid = exp["attention_mask"]
    np.testing.assert_allclose(embeds.numpy()[valid], exp["inputs_embeds"][valid], atol=2e-5, rtol=0)
    assert_logits_match(logits[:, exp["logits_positions"]], exp)
    tokens = model.generate(**inputs, max_new_tokens=12).numpy()
    assert_greedy_match(tokens, exp)


@pytest.mark.parametrize("name", ["micro-tiny", "micro-full"])
def test_batch_rows_equal_single_runs(name):
    """Each row of the left-padded batch gets the logits and tokens it gets alone."""
    model, processor = load_vl(name), load_processor(name)
    batch = process_case(name, "viii_batch_left_pad")
    with paddle.no_grad():
        batch_logits = model(**batch).logits.numpy()
    batch_tokens = model.generate(**batch, max_new_tokens=8).numpy()
    from lm_golden import cases_json, FIXTURES
    from PIL import Image
    import os

    for row, conv in enumerate(cases_json()["viii_batch_left_pad"]["conversations"]):
        images = [Image.open(os.path.join(FIXTURES, p)).convert("RGB") for m in conv for p in m.get("images", [])]
        single = processor(conversations=conv, images=images, force_batchify=True, inference_mode=True)
        with paddle.no_grad():
            alone = model(**single).logits.numpy()[0]
        n = alone.shape[0]
        np.testing.assert_allclose(batch_logits[row, -n:], alone, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(batch_tokens[row], model.generate(**single, max_new_tokens=8).numpy()[0])
