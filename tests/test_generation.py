"""Generation: chunked prefill, streaming, seeded sampling, stop strings and the context limit."""
import numpy as np
import paddle
import pytest

from lm_golden import expected, load_lm, load_processor, load_vl, process_case
from paddlemix_vl2.generation import GenerationConfig, PromptTooLongError, generate, prefill, split_at_eos


@pytest.mark.parametrize("name", ["micro-tiny", "micro-small", "micro-full"])  # micro-full: expanded MLA prefill
@pytest.mark.parametrize("chunk_size", [1, 100, 333])
def test_chunked_prefill_equals_one_shot(name, chunk_size):
    lm, exp = load_lm(name), expected(name, "viii_batch_left_pad")
    embeds = paddle.to_tensor(exp["inputs_embeds"][:, -400:])
    mask = paddle.to_tensor(exp["attention_mask"][:, -400:])
    with paddle.no_grad():
        one_shot = prefill(lm, embeds, mask, lm.new_cache(2, 400)).numpy()
        cache = lm.new_cache(2, 400)
        chunked = prefill(lm, embeds, mask, cache, chunk_size=chunk_size).numpy()
    assert cache.length == 400
    np.testing.assert_allclose(chunked, one_shot, atol=1e-4, rtol=0)
    one = generate(lm, embeds, mask, max_new_tokens=6).numpy()
    np.testing.assert_array_equal(generate(lm, embeds, mask, max_new_tokens=6, chunk_size=chunk_size).numpy(), one)


def test_stream_yields_exactly_the_generated_text():
    model, processor = load_vl("micro-tiny"), load_processor("micro-tiny")
    inputs = process_case("micro-tiny", "ii_one_image")
    tokens = model.generate(**inputs, max_new_tokens=20).numpy()[0]
    pieces = list(model.stream_generate(processor.tokenizer, **inputs, max_new_tokens=20))
    assert len(pieces) > 1
    assert "".join(pieces) == processor.tokenizer.decode(tokens.tolist())


def test_on_step_sees_each_step_as_it_is_chosen():
    """``on_step`` gets every step's tokens [B], in order, before the next step runs (the CLIs time the
    first token with it)."""
    lm, exp = load_lm("micro-tiny"), expected("micro-tiny", "viii_batch_left_pad")
    embeds, mask = paddle.to_tensor(exp["inputs_embeds"]), paddle.to_tensor(exp["attention_mask"])
    steps, caches = [], []
    real_new_cache = lm.new_cache

    def new_cache(*args):
        caches.append(real_new_cache(*args))
        return caches[-1]

    def on_step(tokens):
        steps.append((tokens.numpy().copy(), caches[0].length))

    lm.new_cache = new_cache
    try:
        out = generate(lm, embeds, mask, max_new_tokens=4, on_step=on_step).numpy()
    finally:
        del lm.new_cache
    prompt_len = embeds.shape[1]
    np.testing.assert_array_equal(np.stack([tokens for tokens, _ in steps], axis=1), out)
    # Step i is reported with the prompt and i - 1 decoded tokens in the cache: before step i + 1 runs.
    assert [length for _, length in steps] == [prompt_len + i for i in range(4)]


def test_stop_string_ends_the_stream_before_it():
    model, processor = load_vl("micro-tiny"), load_processor("micro-tiny")
    inputs = process_case("micro-tiny", "i_text_only")
    full = processor.tokenizer.decode(model.generate(**inputs, max_new_tokens=12).numpy()[0].tolist())
    stop = full[len(full) // 2: len(full) // 2 + 2]
    streamed = "".join(model.stream_generate(processor.tokenizer, **inputs, max_new_tokens=12, stop_strings=[stop]))
    assert streamed == full[: full.index(stop)]
    ids = model.generate(**inputs, max_new_tokens=12, stop_strings=[stop], tokenizer=processor.tokenizer).numpy()[0]
    assert stop in processor.tokenizer.decode(ids.tolist())
    assert len(ids) < 12 or ids[-1] == 1


def test_seeded_sampling_repeats_and_differs_by_seed():
    lm = load_lm("micro-small")
    ids = paddle.to_tensor(expected("micro-small", "i_text_only")["input_ids"])
    kwargs = dict(input_ids=ids, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95, top_k=50)
    a = generate(lm, seed=11, **kwargs).numpy()
    b = generate(lm, seed=11, **kwargs).numpy()
    c = generate(lm, seed=12, **kwargs).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_finished_rows_are_padded_with_eos():
    lm = load_lm("micro-tiny")
    exp = expected("micro-tiny", "i_text_only")
    ids = paddle.to_tensor(exp["input_ids"])
    first = int(exp["gen_tokens"][0, 0])
    out = generate(lm, input_ids=ids, max_new_tokens=5, eos_token_id=first, pad_token_id=7).numpy()
    assert out.tolist() == [[first]]  # stopped at once; a batch of one ends when its row ends
    batch = paddle.concat([ids, ids], axis=0)
    out = generate(lm, input_ids=batch, max_new_tokens=3, eos_token_id=first, pad_token_id=7).numpy()
    assert out.tolist() == [[first], [first]]


def test_split_at_eos_drops_the_eos_and_the_padding_after_it():
    assert split_at_eos([5, 6, 1, 1, 1], eos_token_id=1) == ([5, 6], True)
    assert split_at_eos([1, 9], eos_token_id=1) == ([], True)
    assert split_at_eos([5, 6], eos_token_id=1) == ([5, 6], False)


def test_prompt_over_the_context_is_refused_before_any_work():
    lm = load_lm("micro-tiny")
    too_long = paddle.zeros([1, lm.config.max_position_embeddings], dtype=paddle.int64)
    with pytest.raises(PromptTooLongError, match="context"):
        generate(lm, input_ids=too_long, max_new_tokens=1)


def test_bad_generation_settings():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(do_sample=True, top_p=1.5)
