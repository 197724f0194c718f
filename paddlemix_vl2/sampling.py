"""The model-independent half of generation: logits processors, next-token choice, streaming text.

Shapes: B = batch rows, V = vocabulary size, S = ids seen so far (prompt + generated).

The processors follow Hugging Face's semantics and order (repetition penalty, then temperature,
top-k, top-p), so settings copied from the official DeepSeek-VL2 scripts (`temperature=0.4,
top_p=0.9, repetition_penalty=1.1`) mean the same thing here. Every tensor function is vectorised
over the batch and never reads a value back to the host.

Randomness: `paddle.multinomial` draws from Paddle's global generator and takes no generator
argument, and saving/restoring the global state around each call would race with any other code
that samples. Instead the next token is drawn with the Gumbel-max (exponential race) trick,
`argmax(scores - log(E))` with `E ~ Exp(1)`, which selects index i with probability
`softmax(scores)[i]`. The exponential noise comes from `paddle.uniform(seed=...)`: a non-zero seed
gives that call its own engine and leaves the global generator untouched, and seed 0 draws from the
global generator. `SamplingGenerator(seed)` turns one user seed into a reproducible stream of
per-step seeds (Python's `random.Random`, identical across processes), so `seed=S` repeats
exactly, while `SamplingGenerator(None)` always passes 0 and stays random (or follows `paddle.seed`).
The noise is float32, so a token more than about 21 nats below the best one can never be drawn; its
true probability is below 1e-9.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import paddle
import paddle.nn.functional as F

_MAX_NOISE_SEED = 2**31 - 1  # paddle.uniform takes an int32 seed; 0 means "global generator"
_FLOAT32_TINY = float(paddle.finfo(paddle.float32).tiny)
_REPLACEMENT_CHAR = "\ufffd"
# Below this, float32 logits divided by the temperature overflow to inf (a logit of 10 at 1e-38), and the
# sampler would return an arbitrary token where the user meant the likeliest.
MIN_SAMPLING_TEMPERATURE = 1e-5


class SamplingConfigError(ValueError):
    """A sampling setting is out of range."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token.

    `do_sample=False` or `temperature == 0` means greedy (argmax after the repetition penalty).
    `top_k=0` and `top_p=1.0` disable those filters; `repetition_penalty=1.0` disables the penalty.
    `seed` makes sampling repeat exactly; `None` leaves it random.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise SamplingConfigError(
                f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature}"
            )
        if self.temperature:
            _check_sampling_temperature(self.temperature)
        _check_top_p(self.top_p)
        _check_top_k(self.top_k)
        _check_penalty(self.repetition_penalty)
        seed_is_int = isinstance(self.seed, int) and not isinstance(self.seed, bool)
        if self.seed is not None and not (seed_is_int and self.seed >= 0):
            raise SamplingConfigError(f"seed must be None or an int >= 0, got {self.seed!r}")

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


class SamplingGenerator:
    """Per-generation source of noise seeds; create one per `generate` call and pass it to every step."""

    def __init__(self, seed: int | None = None) -> None:
        self._seed_stream = None if seed is None else random.Random(seed)

    @property
    def is_seeded(self) -> bool:
        return self._seed_stream is not None

    def next_noise_seed(self) -> int:
        """A fresh seed for `paddle.uniform`: in [1, 2**31 - 1] when seeded, 0 (global generator) otherwise."""
        if self._seed_stream is None:
            return 0
        return self._seed_stream.randint(1, _MAX_NOISE_SEED)


def _check_top_p(top_p: float) -> None:
    if not 0 < top_p <= 1:
        raise SamplingConfigError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")


def _check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise SamplingConfigError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")


def _check_penalty(penalty: float) -> None:
    if not (penalty > 0 and math.isfinite(penalty)):
        raise SamplingConfigError(f"repetition_penalty must be a finite number > 0 (1 disables it), got {penalty}")


def _check_logits(logits: paddle.Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {list(logits.shape)}; take the last position first")


def apply_repetition_penalty(
    logits: paddle.Tensor,
    generated_ids: paddle.Tensor,
    penalty: float,
    valid_mask: paddle.Tensor | None = None,
) -> paddle.Tensor:
    """Penalise every token id that occurs in a row's ids (each id once, however often it occurs).

    A seen id's score becomes `score * penalty` if negative, else `score / penalty` (Hugging Face's
    RepetitionPenaltyLogitsProcessor), so `penalty > 1` discourages repeats.

    Args:
        logits: [B, V] float32.
        generated_ids: [B, S] int64, prompt and generated ids; every valid id must be in [0, V).
        penalty: > 0; 1.0 returns `logits` unchanged.
        valid_mask: [B, S] bool, False at padding; None means all positions count.
    Returns:
        [B, V] float32.
    """
    _check_logits(logits)
    _check_penalty(penalty)
    if generated_ids.ndim != 2 or generated_ids.shape[0] != logits.shape[0]:
        raise ValueError(
            f"generated_ids must be [batch, seq] with batch {logits.shape[0]}, got shape {list(generated_ids.shape)}"
        )
    if valid_mask is not None and list(valid_mask.shape) != list(generated_ids.shape):
        raise ValueError(
            f"valid_mask shape {list(valid_mask.shape)} must equal generated_ids shape {list(generated_ids.shape)}"
        )
    if penalty == 1.0 or generated_ids.shape[1] == 0:
        return logits
    if valid_mask is None:
        counted_ids = generated_ids
        weights = paddle.ones(generated_ids.shape, dtype="float32")
    else:
        # Pad positions may hold any value (even -100); send them to id 0 with weight 0.
        counted_ids = paddle.where(valid_mask, generated_ids, paddle.zeros_like(generated_ids))
        weights = valid_mask.astype("float32")
    occurrences = paddle.put_along_axis(paddle.zeros_like(logits), counted_ids, weights, axis=1, reduce="add")  # [B, V]
    penalised = paddle.where(logits < 0, logits * penalty, logits / penalty)
    return paddle.where(occurrences > 0, penalised, logits)


def apply_temperature(logits: paddle.Tensor, temperature: float) -> paddle.Tensor:
    """Divide [B, V] logits by `temperature` (> 0)."""
    _check_logits(logits)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise SamplingConfigError(f"temperature for sampling must be a finite number > 0, got {temperature}")
    _check_sampling_temperature(temperature)
    return logits / temperature


def _check_sampling_temperature(temperature: float) -> None:
    if temperature < MIN_SAMPLING_TEMPERATURE:
        raise SamplingConfigError(
            f"temperature {temperature} is too small to sample with (below {MIN_SAMPLING_TEMPERATURE}); "
            "use 0 for greedy decoding"
        )


def apply_top_k(logits: paddle.Tensor, top_k: int) -> paddle.Tensor:
    """Keep every score >= the k-th largest of its row, set the rest to -inf.

    Ties at the k-th value are all kept, as Hugging Face's TopKLogitsWarper does, so a row may keep
    more than k tokens. `top_k=0` or `top_k >= V` returns `logits` unchanged.

    Args:
        logits: [B, V] float32.
    Returns:
        [B, V] float32.
    """
    _check_logits(logits)
    _check_top_k(top_k)
    if top_k == 0 or top_k >= logits.shape[1]:
        return logits
    kth_largest = paddle.topk(logits, top_k, axis=1)[0][:, -1:]  # [B, 1]
    return paddle.where(logits < kth_largest, paddle.full_like(logits, -math.inf), logits)


def apply_top_p(logits: paddle.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> paddle.Tensor:
    """Nucleus filtering with Hugging Face's TopPLogitsWarper semantics.

    Sort each row ascending, take the cumulative softmax, and set to -inf every token whose
    cumulative probability is <= 1 - top_p; the `min_tokens_to_keep` highest tokens always stay.
    The sort is stable, so among equal scores the lower token id is removed first (torch's sort
    leaves that order unspecified). `top_p=1.0` returns `logits` unchanged.

    Args:
        logits: [B, V] float32.
    Returns:
        [B, V] float32.
    """
    _check_logits(logits)
    _check_top_p(top_p)
    if isinstance(min_tokens_to_keep, bool) or not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise SamplingConfigError(f"min_tokens_to_keep must be an int >= 1, got {min_tokens_to_keep!r}")
    if top_p == 1.0:
        return logits
    vocab_size = logits.shape[1]
    ascending_ids = paddle.argsort(logits, axis=1, stable=True)  # [B, V]
    ascending_logits = paddle.take_along_axis(logits, ascending_ids, axis=1)
    cumulative_probs = paddle.cumsum(F.softmax(ascending_logits, axis=1), axis=1)
    below_nucleus = cumulative_probs <= 1 - top_p
    protected = paddle.arange(vocab_size) >= vocab_size - min_tokens_to_keep  # [V]
    remove_sorted = paddle.logical_and(below_nucleus, paddle.logical_not(protected)).astype("float32")
    remove = paddle.put_along_axis(paddle.zeros_like(logits), ascending_ids, remove_sorted, axis=1)
    return paddle.where(remove > 0, paddle.full_like(logits, -math.inf), logits)


def sample_next_token(
    logits: paddle.Tensor,
    params: SamplingParams,
    generated_ids: paddle.Tensor | None = None,
    valid_mask: paddle.Tensor | None = None,
    generator: SamplingGenerator | None = None,
) -> paddle.Tensor:
    """Choose one next token per row.

    Greedy (`params.is_greedy`): argmax after the repetition penalty, as Hugging Face applies its
    logits processors before the argmax. Sampling: repetition penalty, temperature, top-k, top-p,
    then a draw from the softmax of what is left (Gumbel-max; see the module docstring).

    Args:
        logits: [B, V] float32 scores of the next position.
        params: the sampling settings.
        generated_ids: [B, S] int64 prompt + generated ids; needed only for the repetition penalty.
        valid_mask: [B, S] bool, False at padding in `generated_ids`.
        generator: the generation's `SamplingGenerator`; required when `params.seed` is set,
            otherwise None draws unseeded noise.
    Returns:
        [B] int64 token ids.
    """
    _check_logits(logits)
    scores = logits.astype("float32")
    if params.repetition_penalty != 1.0:
        if generated_ids is None:
            raise ValueError("repetition_penalty != 1 needs generated_ids (prompt + generated ids, [batch, seq])")
        scores = apply_repetition_penalty(scores, generated_ids, params.repetition_penalty, valid_mask)
    if params.is_greedy:
        return paddle.argmax(scores, axis=1)
    if generator is None:
        if params.seed is not None:
            raise ValueError(
                "params.seed is set but no generator was given: create SamplingGenerator(params.seed) "
                "once per generation and pass it to every step"
            )
        generator = SamplingGenerator(None)
    scores = apply_temperature(scores, params.temperature)
    scores = apply_top_k(scores, params.top_k)
    scores = apply_top_p(scores, params.top_p)
    uniform = paddle.uniform(
        scores.shape, dtype="float32", min=_FLOAT32_TINY, max=1.0, seed=generator.next_noise_seed()
    )
    exponential = paddle.clip(-paddle.log(uniform), min=_FLOAT32_TINY)  # Exp(1), kept > 0 for the log
    return paddle.argmax(scores - paddle.log(exponential), axis=1)


def find_stop_string(text: str, stop_strings: Sequence[str]) -> int:
    """Index in `text` where the earliest stop string starts, or -1 if none occurs."""
    starts = [index for index in (text.find(stop) for stop in stop_strings) if index >= 0]
    return min(starts) if starts else -1


class StopStringMatcher:
    """Watches one row's streamed text for stop strings (e.g. "User:") that may span token boundaries.

    `feed` returns the text that is safe to show: the tail that could still grow into a stop string
    is held back until it either completes one (then it is dropped and `stopped` becomes True) or
    cannot any more. Text fed after a stop is discarded. Call `flush` when generation ends.
    An empty list of stop strings never stops and holds nothing back.
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        if isinstance(stop_strings, str):
            raise ValueError(f"stop_strings must be a list of strings, got the single string {stop_strings!r}")
        if any(not isinstance(stop, str) or not stop for stop in stop_strings):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop_strings)!r}")
        self._stop_strings = tuple(stop_strings)
        self._held = ""
        self.stopped = False
        self.matched_stop_string: str | None = None

    def feed(self, text: str) -> str:
        """Add newly decoded text; return the part of it (and of earlier held text) that is now final."""
        if self.stopped:
            return ""
        pending = self._held + text
        stop_start = find_stop_string(pending, self._stop_strings)
        if stop_start >= 0:
            self.stopped = True
            self.matched_stop_string = next(stop for stop in self._stop_strings if pending.startswith(stop, stop_start))
            self._held = ""
            return pending[:stop_start]
        held_length = self._longest_stop_prefix_suffix(pending)
        self._held = pending[len(pending) - held_length :]
        return pending[: len(pending) - held_length]

    def flush(self) -> str:
        """Release held-back text at the end of generation (it did not become a stop string)."""
        released, self._held = self._held, ""
        return "" if self.stopped else released

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        longest_possible = min(len(text), max((len(stop) for stop in self._stop_strings), default=1) - 1)
        for length in range(longest_possible, 0, -1):
            tail = text[len(text) - length :]
            if any(stop.startswith(tail) for stop in self._stop_strings):
                return length
        return 0


class SupportsDecode(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class StreamDecoder:
    """Incremental detokenizer for one row: token ids in, newly printable text out.

    Byte-level BPE can split one UTF-8 character over several tokens; until the character is
    complete, decoding ends in U+FFFD, so such a tail is held back. The decoder re-decodes only a
    window that starts at the last clean boundary (the vLLM scheme: a prefix window gives the first
    token its context, the text after it is new), so each step costs O(window), not O(length).
    Invariant: the concatenation of all `push` results and the final `flush` equals
    `tokenizer.decode(all_ids, skip_special_tokens=...)`, even for ids that are not valid UTF-8.
    `flush` ends the stream.
    """

    def __init__(self, tokenizer: SupportsDecode, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window, always on a character boundary
        self._read_offset = 0  # ids before this have been emitted

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that became printable (possibly "")."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        if window_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return window_text[len(prefix_text) :]

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes to U+FFFD, as in a full decode)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return window_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""
