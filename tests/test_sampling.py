"""Sampling: processors against NumPy written from Hugging Face's formulas, seeding, streaming text."""

import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
import tokenizers

from paddlemix_vl2.sampling import (
    SamplingConfigError,
    SamplingGenerator,
    SamplingParams,
    StopStringMatcher,
    StreamDecoder,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    find_stop_string,
    sample_next_token,
)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPLACEMENT_CHAR = "\ufffd"


# ---------------------------------------------------------------- NumPy references (from the formulas)


def np_repetition_penalty(logits, ids, penalty, mask):
    out = logits.copy()
    for row in range(logits.shape[0]):
        for token in set(ids[row][mask[row]].tolist()):
            score = logits[row, token]
            out[row, token] = score * np.float32(penalty) if score < 0 else score / np.float32(penalty)
    return out


def np_top_k(logits, k):
    if k == 0 or k >= logits.shape[1]:
        return logits.copy()
    kth_largest = np.sort(logits, axis=1)[:, -k][:, None]
    return np.where(logits < kth_largest, np.float32(-np.inf), logits)


def np_softmax(row):
    shifted = np.exp(row - row.max())
    return shifted / shifted.sum()


def np_top_p(logits, p, min_tokens_to_keep=1):
    if p == 1.0:
        return logits.copy()
    out = logits.copy()
    vocab_size = logits.shape[1]
    for row in range(logits.shape[0]):
        order = np.argsort(logits[row], kind="stable")
        cumulative = np.cumsum(np_softmax(logits[row][order]), dtype=np.float32)
        remove = cumulative <= np.float32(1 - p)
        remove[vocab_size - min_tokens_to_keep :] = False
        out[row, order[remove]] = -np.inf
    return out


def fixed_logits():
    """[6, 40] float32 with negatives, ties at the top-k boundary, an all-equal row and masked entries."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, size=(6, 40)).astype(np.float32)
    logits[0, [3, 7, 11, 19]] = np.sort(logits[0])[-3]  # four-way tie at the 3rd largest value
    logits[1] = 0.5
    logits[2, ::3] = -np.inf
    logits[3] = -np.abs(logits[3])
    logits[4, [5, 6]] = logits[4].max()
    return logits


def to_paddle(array):
    return paddle.to_tensor(array)


# ---------------------------------------------------------------- processors


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_numpy(penalty):
    logits = fixed_logits()
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 40, size=(6, 25)).astype(np.int64)
    ids[:, 20:] = ids[:, :5]  # repeated ids must be penalised once
    mask = np.ones_like(ids, dtype=bool)
    mask[0, :4] = False  # left padding...
    ids[0, :4] = -100  # ...holding an out-of-range value
    mask[1, :6] = False
    ids[1, :6] = 39  # a real id that occurs only at padding must stay untouched
    ids[1, 6:] = np.where(ids[1, 6:] == 39, 0, ids[1, 6:])
    got = apply_repetition_penalty(to_paddle(logits), to_paddle(ids), penalty, to_paddle(mask)).numpy()
    np.testing.assert_array_equal(got, np_repetition_penalty(logits, ids, penalty, mask))
    assert got[1, 39] == logits[1, 39]


def test_repetition_penalty_without_mask_and_trivial_cases():
    logits = fixed_logits()
    ids = np.random.default_rng(2).integers(0, 40, size=(6, 10)).astype(np.int64)
    got = apply_repetition_penalty(to_paddle(logits), to_paddle(ids), 1.7).numpy()
    np.testing.assert_array_equal(got, np_repetition_penalty(logits, ids, 1.7, np.ones_like(ids, dtype=bool)))
    empty = paddle.zeros([6, 0], dtype="int64")
    np.testing.assert_array_equal(apply_repetition_penalty(to_paddle(logits), empty, 1.7).numpy(), logits)
    np.testing.assert_array_equal(apply_repetition_penalty(to_paddle(logits), to_paddle(ids), 1.0).numpy(), logits)


@pytest.mark.parametrize("temperature", [0.1, 0.7, 1.0, 2.5])
def test_temperature_matches_numpy(temperature):
    logits = fixed_logits()
    got = apply_temperature(to_paddle(logits), temperature).numpy()
    np.testing.assert_array_equal(got, logits / np.float32(temperature))


@pytest.mark.parametrize("top_k", [0, 1, 2, 3, 7, 39, 40, 100])
def test_top_k_matches_numpy(top_k):
    logits = fixed_logits()
    got = apply_top_k(to_paddle(logits), top_k).numpy()
    np.testing.assert_array_equal(got, np_top_k(logits, top_k))


def min_relative_distance_to_nucleus_edge(logits, p):
    """How close (relative, float64) any cumulative probability that decides a token comes to 1 - p.

    The reference and Paddle sum in float32 in possibly different orders; a margin far above float32
    rounding means the comparison cannot flip. The last position is always kept, so it decides nothing.
    """
    distances = []
    for row in logits.astype(np.float64):
        cumulative = np.cumsum(np_softmax(np.sort(row)))[:-1]
        cumulative = cumulative[cumulative > 0]
        distances.append((np.abs(cumulative - (1 - p)) / np.maximum(cumulative, 1 - p)).min())
    return min(distances)


@pytest.mark.parametrize("min_tokens_to_keep", [1, 3])
@pytest.mark.parametrize("top_p", [1e-7, 0.07, 0.33, 0.52, 0.91, 0.999999, 1.0])
def test_top_p_matches_numpy(top_p, min_tokens_to_keep):
    logits = fixed_logits()
    if top_p < 1.0:
        assert min_relative_distance_to_nucleus_edge(logits, top_p) > 1e-4
    got = apply_top_p(to_paddle(logits), top_p, min_tokens_to_keep).numpy()
    np.testing.assert_array_equal(got, np_top_p(logits, top_p, min_tokens_to_keep))


@pytest.mark.parametrize("top_p", [0.25, 0.5, 0.75])
def test_top_p_exact_boundary_removes_ties_in_id_order(top_p):
    # Equal logits over 8 ids give probabilities and cumulative sums that are exact in binary, so the
    # "<= 1 - top_p" edge is hit exactly and the stable order decides which tied ids go.
    logits = np.zeros((2, 8), dtype=np.float32)
    logits[1, 4:] = np.log(np.float32(3.0))  # row 1: four ids at 1/16, four at 3/16
    got = apply_top_p(to_paddle(logits), top_p).numpy()
    np.testing.assert_array_equal(got, np_top_p(logits, top_p))


def test_top_k_then_top_p_matches_numpy():
    logits = fixed_logits()
    got = apply_top_p(apply_top_k(to_paddle(logits), 6), 0.8).numpy()
    np.testing.assert_array_equal(got, np_top_p(np_top_k(logits, 6), 0.8))


# ---------------------------------------------------------------- next-token choice


@pytest.mark.parametrize("penalty", [1.0, 1.2])
def test_greedy_is_argmax_after_penalty(penalty):
    logits = fixed_logits()
    ids = np.random.default_rng(3).integers(0, 40, size=(6, 12)).astype(np.int64)
    expected = np.argmax(np_repetition_penalty(logits, ids, penalty, np.ones_like(ids, dtype=bool)), axis=1)
    for params in (
        SamplingParams(repetition_penalty=penalty),
        SamplingParams(do_sample=True, temperature=0.0, top_k=3, repetition_penalty=penalty),
    ):
        got = sample_next_token(to_paddle(logits), params, to_paddle(ids))
        assert got.dtype == paddle.int64 and list(got.shape) == [6]
        np.testing.assert_array_equal(got.numpy(), expected)


def seeded_draws(seed, steps=4):
    """Token ids of `steps` seeded draws from fixed logits (also run in a subprocess by a test)."""
    logits = paddle.to_tensor(np.random.default_rng(5).normal(size=(8, 300)).astype(np.float32))
    params = SamplingParams(do_sample=True, temperature=1.5, top_k=200, top_p=0.98, seed=seed)
    generator = SamplingGenerator(params.seed)
    return [sample_next_token(logits, params, generator=generator).numpy().tolist() for _ in range(steps)]


def test_seeded_sampling_repeats_and_differs_between_seeds_and_steps():
    first = seeded_draws(42)
    assert seeded_draws(42) == first
    assert seeded_draws(43) != first
    assert len({tuple(step) for step in first}) == len(first)


def test_seeded_sampling_repeats_across_processes():
    script = (
        f"import json, sys; sys.path.insert(0, {TESTS_DIR!r}); import test_sampling; "
        "print(json.dumps(test_sampling.seeded_draws(42)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=os.path.dirname(TESTS_DIR),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == seeded_draws(42)


def test_seeded_sampling_leaves_global_rng_alone():
    paddle.seed(7)
    expected = paddle.rand([5]).numpy()
    paddle.seed(7)
    seeded_draws(42, steps=2)
    np.testing.assert_array_equal(paddle.rand([5]).numpy(), expected)


def test_unseeded_sampling_is_random_and_follows_paddle_seed():
    logits = paddle.zeros([64, 1000])
    params = SamplingParams(do_sample=True)
    first = sample_next_token(logits, params).numpy()
    assert not np.array_equal(sample_next_token(logits, params).numpy(), first)
    paddle.seed(11)
    again = sample_next_token(logits, params).numpy()
    paddle.seed(11)
    np.testing.assert_array_equal(sample_next_token(logits, params).numpy(), again)


def test_seed_without_generator_is_rejected():
    with pytest.raises(ValueError, match="SamplingGenerator"):
        sample_next_token(paddle.zeros([1, 4]), SamplingParams(do_sample=True, seed=1))


@pytest.mark.parametrize(
    "temperature, top_k, top_p, penalty",
    [(0.7, 5, 1.0, 1.0), (1.0, 0, 0.8, 1.0), (1.3, 6, 0.9, 1.5), (0.5, 1, 1.0, 1.0), (2.0, 0, 0.3, 0.8)],
)
def test_sampled_distribution_matches_numpy(temperature, top_k, top_p, penalty):
    num_samples = 20000
    row_logits = np.array([[2.1, 1.7, 1.3, 0.9, 0.55, 0.1, -0.6, -1.2]], dtype=np.float32)
    row_ids = np.array([[0, 3, 3]], dtype=np.int64)
    scores = np_repetition_penalty(row_logits, row_ids, penalty, np.ones_like(row_ids, dtype=bool))
    scores = np_top_k(scores / np.float32(temperature), top_k)
    if top_p < 1.0:
        assert min_relative_distance_to_nucleus_edge(scores, top_p) > 1e-4
    expected = np_softmax(np_top_p(scores, top_p)[0].astype(np.float64))

    params = SamplingParams(
        do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty, seed=2024
    )
    samples = sample_next_token(
        to_paddle(np.repeat(row_logits, num_samples, axis=0)),
        params,
        to_paddle(np.repeat(row_ids, num_samples, axis=0)),
        generator=SamplingGenerator(params.seed),
    ).numpy()
    frequencies = np.bincount(samples, minlength=8) / num_samples
    assert frequencies[expected == 0].sum() == 0
    assert np.abs(frequencies - expected).max() < 0.01


def test_big_vocabulary_row_samples_only_from_the_nucleus():
    logits = np.random.default_rng(6).normal(0.0, 4.0, size=(4, 129280)).astype(np.float32)
    params = SamplingParams(do_sample=True, temperature=0.4, top_p=0.9, seed=9)
    got = sample_next_token(to_paddle(logits), params, generator=SamplingGenerator(params.seed)).numpy()
    kept = np_top_p(logits / np.float32(0.4), 0.9) > -np.inf
    assert kept[np.arange(4), got].all()


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"do_sample": True, "temperature": 1e-39}, "too small to sample with"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"seed": -3}, "seed"),
    ],
)
def test_bad_params_raise_one_line_errors(kwargs, field):
    with pytest.raises(SamplingConfigError, match=field) as error:
        SamplingParams(**kwargs)
    assert "\n" not in str(error.value)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        apply_top_k(paddle.zeros([5]), 2)
    with pytest.raises(ValueError, match="generated_ids"):
        apply_repetition_penalty(paddle.zeros([2, 5]), paddle.zeros([3, 4], dtype="int64"), 1.1)
    with pytest.raises(ValueError, match="valid_mask"):
        apply_repetition_penalty(
            paddle.zeros([2, 5]), paddle.zeros([2, 4], dtype="int64"), 1.1, paddle.ones([2, 3], dtype="bool")
        )
    with pytest.raises(ValueError, match="generated_ids"):
        sample_next_token(paddle.zeros([2, 5]), SamplingParams(repetition_penalty=1.1))


# ---------------------------------------------------------------- streaming text with the real vocabulary


class TokenizerAdapter:
    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def decode(self, ids, skip_special_tokens=False):
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def vl2_tokenizer(fixtures_dir):
    return tokenizers.Tokenizer.from_file(os.path.join(fixtures_dir, "tokenizer-vl2", "tokenizer.json"))


def stream(tokenizer, ids, skip_special_tokens=False):
    decoder = StreamDecoder(TokenizerAdapter(tokenizer), skip_special_tokens=skip_special_tokens)
    return [decoder.push(token_id) for token_id in ids], decoder.flush()


@pytest.mark.parametrize(
    "text",
    [
        "深度求索的视觉语言模型能看懂图片。龘靐齉爩，𠀀𪚥也可以。",
        "👨‍👩‍👧‍👦 🎉🐉 family 🏳️‍🌈!",
        "Hello 世界! 🚀 Ünïcödé ½ — naïve café, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ✓ 123456 done.",
    ],
)
def test_stream_decoder_reproduces_full_decode(vl2_tokenizer, text):
    ids = vl2_tokenizer.encode(text, add_special_tokens=False).ids
    full_text = vl2_tokenizer.decode(ids)
    assert full_text == text
    assert any(REPLACEMENT_CHAR in vl2_tokenizer.decode([token_id]) for token_id in ids), "no split character"
    pieces, tail = stream(vl2_tokenizer, ids)
    assert tail == ""
    assert "".join(pieces) == full_text
    assert all(REPLACEMENT_CHAR not in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece) > len(ids) // 2
    for count in range(1, len(ids) + 1):
        assert full_text.startswith("".join(pieces[:count]))


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_stream_decoder_with_special_tokens(vl2_tokenizer, skip_special_tokens):
    text = "<|ref|>一只猫🐈<|/ref|><|det|>[[12, 40, 500, 999]]<|/det|>"
    ids = vl2_tokenizer.encode(text, add_special_tokens=False).ids + [1]
    pieces, tail = stream(vl2_tokenizer, ids, skip_special_tokens)
    assert "".join(pieces) + tail == vl2_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert all(REPLACEMENT_CHAR not in piece for piece in pieces)


def gpt2_byte_to_char():
    """The byte-level BPE alphabet: printable bytes map to themselves, the others to U+0100 onwards."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def test_stream_decoder_keeps_genuinely_invalid_bytes(vl2_tokenizer):
    byte_to_char = gpt2_byte_to_char()
    lead_byte_id = vl2_tokenizer.token_to_id(byte_to_char[0xE4])
    letter_id = vl2_tokenizer.token_to_id("a")
    ids = [letter_id, lead_byte_id, letter_id, lead_byte_id]
    full_text = vl2_tokenizer.decode(ids)
    assert full_text.count(REPLACEMENT_CHAR) == 2
    pieces, tail = stream(vl2_tokenizer, ids)
    assert "".join(pieces) + tail == full_text
    assert tail.endswith(REPLACEMENT_CHAR)


def test_stream_decoder_fuzz_random_text_and_random_ids(vl2_tokenizer):
    rng = np.random.default_rng(7)
    alphabet = list("abc XYZ,.!\n01234") + list("中文字龘靐齉爩")
    alphabet += ["é", "ß", "—", "😀", "🐉", "👍🏽", "𠀀", "𝔘", "\u200d"]
    for _ in range(150):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 30))))
        ids = vl2_tokenizer.encode(text, add_special_tokens=False).ids
        pieces, tail = stream(vl2_tokenizer, ids)
        assert "".join(pieces) + tail == vl2_tokenizer.decode(ids)
        assert all(REPLACEMENT_CHAR not in piece for piece in pieces + [tail])

    byte_to_char = gpt2_byte_to_char()
    high_byte_ids = [vl2_tokenizer.token_to_id(byte_to_char[byte]) for byte in range(128, 256)]
    vocabulary_size = vl2_tokenizer.get_vocab_size()
    for _ in range(150):
        ids = [
            int(rng.choice(high_byte_ids)) if rng.random() < 0.5 else int(rng.integers(0, vocabulary_size))
            for _ in range(int(rng.integers(1, 30)))
        ]
        for skip_special_tokens in (False, True):
            pieces, tail = stream(vl2_tokenizer, ids, skip_special_tokens)
            assert "".join(pieces) + tail == vl2_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


# ---------------------------------------------------------------- stop strings


def test_stop_string_spanning_tokens_is_cut_at_the_right_step(vl2_tokenizer):
    stop_strings = ["User:", "<｜end▁of▁sentence｜>"]
    text = "好的🙂, the answer is 42.\nUser: and now?"
    ids = vl2_tokenizer.encode(text, add_special_tokens=False).ids
    assert not any("User:" in vl2_tokenizer.decode([token_id]) for token_id in ids), "stop string inside one token"
    expected_stop_step = next(n for n in range(1, len(ids) + 1) if "User:" in vl2_tokenizer.decode(ids[:n]))

    decoder = StreamDecoder(TokenizerAdapter(vl2_tokenizer))
    matcher = StopStringMatcher(stop_strings)
    shown, stop_step = [], None
    for step, token_id in enumerate(ids, start=1):
        shown.append(matcher.feed(decoder.push(token_id)))
        if matcher.stopped and stop_step is None:
            stop_step = step
    shown.append(matcher.flush())
    assert stop_step == expected_stop_step
    assert matcher.matched_stop_string == "User:"
    assert "".join(shown) == text[: text.find("User:")]


def test_stop_on_end_of_sentence_text(vl2_tokenizer):
    ids = vl2_tokenizer.encode("完成了", add_special_tokens=False).ids + [1, 100, 200]
    decoder = StreamDecoder(TokenizerAdapter(vl2_tokenizer))
    matcher = StopStringMatcher(["<｜end▁of▁sentence｜>"])
    shown = "".join(matcher.feed(decoder.push(token_id)) for token_id in ids) + matcher.flush()
    assert matcher.stopped
    assert shown == "完成了"


def test_partial_stop_string_is_held_then_released(vl2_tokenizer):
    text = "Ask the User\nUser name: bob"
    ids = vl2_tokenizer.encode(text, add_special_tokens=False).ids
    decoder = StreamDecoder(TokenizerAdapter(vl2_tokenizer))
    matcher = StopStringMatcher(["User:"])
    shown, held_checks = [], 0
    for token_id in ids:
        shown.append(matcher.feed(decoder.push(token_id)))
        if vl2_tokenizer.decode(ids[: len(shown)]).endswith("User"):
            assert not "".join(shown).endswith("User")
            held_checks += 1
    assert held_checks == text.count("User")
    shown.append(matcher.flush())
    assert not matcher.stopped
    assert "".join(shown) == text


@pytest.mark.parametrize(
    "text, stop_strings",
    [
        ("xxabcabcabyy", ["abcab"]),
        ("one two three", ["three", "two"]),
        ("aaab", ["aab", "b"]),
        ("no stop here", ["STOP", "here!"]),
        ("nothing to watch", []),
    ],
)
def test_stop_matcher_char_by_char_equals_find(text, stop_strings):
    starts = [text.find(stop) for stop in stop_strings if stop in text]
    expected_start = min(starts) if starts else -1
    assert find_stop_string(text, stop_strings) == expected_start
    matcher = StopStringMatcher(stop_strings)
    shown = "".join(matcher.feed(char) for char in text) + matcher.flush()
    assert matcher.stopped == (expected_start >= 0)
    assert shown == (text[:expected_start] if expected_start >= 0 else text)


def test_stop_matcher_rejects_bad_stop_strings():
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["User:", ""])
    with pytest.raises(ValueError, match="list of strings"):
        StopStringMatcher("User:")
