"""Text generation on the DeepSeek-V2 language model: prefill, one-token decode, the loop and streaming.

The loop runs on a preallocated ``KVCache``: the prompt is prefilled once (optionally in chunks, which
bounds the activation memory of long multi-image prompts), then each step feeds one token per row.
Images enter only through the prompt's ``inputs_embeds``. Left-padded batches work because the cache
remembers which key positions are padding and each row keeps its own position counter.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import paddle

from .sampling import SamplingGenerator, SamplingParams, StopStringMatcher, StreamDecoder, sample_next_token

__all__ = [
    "GenerationConfig", "prefill", "decode_one_token", "generate", "stream_generate", "split_at_eos", "PromptTooLongError",
]

logger = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    """The prompt does not fit the model's context window."""


@dataclass
class GenerationConfig:
    """Decoding settings. The defaults are greedy, as in the official README and PaddleMIX's scripts;
    the official ``inference.py`` samples with ``temperature=0.4, top_p=0.9, repetition_penalty=1.1``."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    stop_strings: Sequence[str] = field(default_factory=tuple)
    chunk_size: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 = prefill in one pass), got {self.chunk_size}")
        self.sampling = SamplingParams(
            do_sample=self.do_sample, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            repetition_penalty=self.repetition_penalty, seed=self.seed,
        )


def prefill(lm, inputs_embeds: paddle.Tensor, attention_mask: paddle.Tensor, cache, chunk_size: int = 0) -> paddle.Tensor:
    """Run the prompt through the model into ``cache``; returns the last position's logits [B, V].

    inputs_embeds: [B, T, H]; attention_mask: [B, T] bool (False = left padding). With ``chunk_size``
    the prompt goes through in slices of that many tokens; the logits equal one-shot prefill.
    """
    seq_len = inputs_embeds.shape[1]
    step = chunk_size if chunk_size > 0 else seq_len
    logits = None
    for start in range(0, seq_len, step):
        end = min(start + step, seq_len)
        out = lm(
            inputs_embeds=inputs_embeds[:, start:end], attention_mask=attention_mask[:, start:end],
            cache=cache, logits_to_keep=1,
        )
        logits = out.logits
    return logits[:, -1]


def decode_one_token(lm, tokens: paddle.Tensor, cache, position_ids: paddle.Tensor) -> paddle.Tensor:
    """tokens [B] int64 at positions position_ids [B] -> next-token logits [B, V] float32."""
    out = lm(
        input_ids=tokens.unsqueeze(1), position_ids=position_ids.unsqueeze(1), cache=cache, logits_to_keep=1
    )
    return out.logits[:, -1]


def _resolve(lm, config: GenerationConfig) -> GenerationConfig:
    eos = config.eos_token_id if config.eos_token_id is not None else lm.config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else eos
    return replace(config, eos_token_id=eos, pad_token_id=pad)


def _generate_steps(
    lm,
    config: GenerationConfig,
    inputs_embeds: paddle.Tensor,
    attention_mask: Optional[paddle.Tensor],
    input_ids: Optional[paddle.Tensor],
    tokenizer=None,
) -> Iterator[paddle.Tensor]:
    """Yield the next token of every row [B] int64, step by step; finished rows yield the pad id."""
    bsz, prompt_len = inputs_embeds.shape[:2]
    limit = lm.config.max_position_embeddings
    if prompt_len >= limit:
        raise PromptTooLongError(
            f"the prompt has {prompt_len} tokens but the model's context is {limit}; "
            "shorten the question or use fewer or smaller images"
        )
    max_new = config.max_new_tokens
    if prompt_len + max_new > limit:
        max_new = limit - prompt_len
        logger.warning("max_new_tokens lowered to %d so the sequence fits the %d-token context", max_new, limit)
    if config.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    if attention_mask is None:
        attention_mask = paddle.ones([bsz, prompt_len], dtype=paddle.bool)
    attention_mask = attention_mask.astype(paddle.bool)

    # Ids seen so far per row, for the repetition penalty; unknown prompt ids (embeddings only) are padding.
    history = paddle.full([bsz, prompt_len + max_new], config.pad_token_id, dtype=paddle.int64)
    history_valid = paddle.zeros([bsz, prompt_len + max_new], dtype=paddle.bool)
    if input_ids is not None:
        history[:, :prompt_len] = input_ids
        history_valid[:, :prompt_len] = attention_mask

    cache = lm.new_cache(bsz, prompt_len + max_new)
    generator = SamplingGenerator(config.seed)
    matchers = [StopStringMatcher(config.stop_strings) for _ in range(bsz)] if config.stop_strings else None
    decoders = [StreamDecoder(tokenizer) for _ in range(bsz)] if config.stop_strings else None
    positions = attention_mask.astype(paddle.int64).sum(axis=1)  # [B]: next position = count of real tokens
    finished = paddle.zeros([bsz], dtype=paddle.bool)
    pad = paddle.full([bsz], config.pad_token_id, dtype=paddle.int64)

    with paddle.no_grad():
        logits = prefill(lm, inputs_embeds, attention_mask, cache, config.chunk_size)
        for step in range(max_new):
            end = prompt_len + step
            token = sample_next_token(logits, config.sampling, history[:, :end], history_valid[:, :end], generator)
            token = paddle.where(finished, pad, token)
            history[:, end] = token
            history_valid[:, end] = paddle.logical_not(finished)
            finished = paddle.logical_or(finished, token == config.eos_token_id)
            if matchers is not None:
                for matcher, decoder, token_id in zip(matchers, decoders, token.tolist()):
                    matcher.feed(decoder.push(token_id))
                finished = paddle.logical_or(finished, paddle.to_tensor([m.stopped for m in matchers]))
            yield token
            if bool(finished.all()) or step == max_new - 1:
                return
            logits = decode_one_token(lm, token, cache, positions)
            positions = positions + 1


def generate(
    lm,
    inputs_embeds: Optional[paddle.Tensor] = None,
    attention_mask: Optional[paddle.Tensor] = None,
    input_ids: Optional[paddle.Tensor] = None,
    config: Optional[GenerationConfig] = None,
    tokenizer=None,
    on_step: Optional[Callable[[paddle.Tensor], None]] = None,
    **kwargs,
) -> paddle.Tensor:
    """Generate new tokens for a (left-padded) batch.

    Args:
        lm: a ``DeepseekV2ForCausalLM``.
        inputs_embeds: [B, T, H] prompt embeddings (with images merged), or input_ids [B, T] alone.
        attention_mask: [B, T], False/0 at left padding.
        input_ids: [B, T] prompt ids, used for the repetition penalty (and for embeddings if no
            inputs_embeds are given).
        config: a ``GenerationConfig``; keyword arguments override its fields.
        tokenizer: needed only for ``stop_strings``.
        on_step: called with each step's tokens [B] as they are chosen (a progress display or a timer: the
            first call marks the end of the prefill).
    Returns:
        [B, N] int64 new tokens only; rows that finished early are filled with ``pad_token_id``.
    """
    config = _resolve(lm, replace(config or GenerationConfig(), **kwargs))
    if inputs_embeds is None:
        if input_ids is None:
            raise ValueError("pass inputs_embeds or input_ids")
        inputs_embeds = lm.get_input_embeddings()(input_ids)
    tokens = []
    for token in _generate_steps(lm, config, inputs_embeds, attention_mask, input_ids, tokenizer):
        tokens.append(token)
        if on_step is not None:
            on_step(token)
    return paddle.stack(tokens, axis=1)


def stream_generate(
    lm,
    tokenizer,
    inputs_embeds: Optional[paddle.Tensor] = None,
    attention_mask: Optional[paddle.Tensor] = None,
    input_ids: Optional[paddle.Tensor] = None,
    config: Optional[GenerationConfig] = None,
    skip_special_tokens: bool = False,
    on_token: Optional[Callable[[int], None]] = None,
    **kwargs,
) -> Iterator[str]:
    """Generate for one prompt and yield the text as it is decoded.

    The pieces concatenate to exactly the decoded text of ``generate``'s tokens (up to a stop string,
    which is not included). Multi-byte characters split across tokens are held back until complete.
    """
    config = _resolve(lm, replace(config or GenerationConfig(), **kwargs))
    if inputs_embeds is None:
        if input_ids is None:
            raise ValueError("pass inputs_embeds or input_ids")
        inputs_embeds = lm.get_input_embeddings()(input_ids)
    if inputs_embeds.shape[0] != 1:
        raise ValueError(f"stream_generate takes one prompt, got a batch of {inputs_embeds.shape[0]}; use generate()")
    decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    matcher = StopStringMatcher(config.stop_strings)
    steps = _generate_steps(lm, replace(config, stop_strings=()), inputs_embeds, attention_mask, input_ids)
    for token in steps:
        token_id = int(token[0])
        if on_token is not None:
            on_token(token_id)
        piece = matcher.feed(decoder.push(token_id))
        if piece:
            yield piece
        if matcher.stopped:
            steps.close()
            return
    tail = matcher.feed(decoder.flush())
    if tail:
        yield tail
    if not matcher.stopped:
        rest = matcher.flush()
        if rest:
            yield rest


def split_at_eos(token_ids: Sequence[int], eos_token_id: int) -> Tuple[List[int], bool]:
    """One row of ``generate``'s output -> (the answer's ids before the first eos, whether eos came).

    Rows that finish early are padded after their eos, so everything from the first eos on is dropped.
    """
    token_ids = list(token_ids)
    if eos_token_id in token_ids:
        return token_ids[: token_ids.index(eos_token_id)], True
    return token_ids, False
