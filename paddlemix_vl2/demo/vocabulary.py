"""The demo model's tokenizer: a small byte-level BPE trained on the synthetic-shapes text.

It keeps the DeepSeek-V3 pre-tokenizer (digit runs of 1-3 isolated, then byte-level) and the official
special-token layout: ids 0/1/2 are begin-of-sentence / end-of-sentence / pad, the BPE vocabulary
follows, and the eight DeepSeek-VL2 tokens (``<image>``, ``<|ref|>``, ``<|/ref|>``, ``<|det|>``,
``<|/det|>``, ``<|grounding|>``, ``<|User|>``, ``<|Assistant|>``) are appended last, as in the real
checkpoints. The files are those of an official checkpoint: ``tokenizer.json``,
``tokenizer_config.json`` and ``special_tokens_map.json``.

Why not the real 129k vocabulary: its embedding and output rows alone would exceed the 20 MB budget.
Why not a generic small BPE: it merges digit pairs irregularly (``345`` -> ``3|45``, ``999`` -> ``99|9``),
so each grounding coordinate would be spelt in an arbitrary mix of pieces. Here the training text has
single digits only, so no digit merge exists and every coordinate is spelt digit by digit: the model
learns ten digit tokens whose meaning depends only on their place. Every task word is one token.
Any other text still encodes (byte fallback through the byte-level alphabet), only in more tokens.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .shapes import COLORS, SHAPE_KINDS

__all__ = ["BOS_TOKEN", "EOS_TOKEN", "PAD_TOKEN", "VL2_SPECIAL_TOKENS", "training_text", "build_tokenizer",
           "write_tokenizer_files"]

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
VL2_SPECIAL_TOKENS = (
    "<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>",
)
# The DeepSeek-V3 pre-tokenizer's third split (words, punctuation runs, newlines, spaces), verbatim.
_WORD_PATTERN = (
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
)
_CJK_PATTERN = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
# Upper bound for the BPE trainer; the task text runs out of pairs to merge long before it.
_MAX_BPE_VOCAB = 1016


def training_text() -> List[str]:
    """The text pieces the processor encodes for this task, with the special tokens cut out.

    The processor encodes the text between special tokens piece by piece, so these are exactly the
    strings the tokenizer meets: the chat template's glue, the questions, the answers, the grounding
    label and box syntax. Box numbers appear as single digits only, so BPE learns no digit merge.
    """
    pieces = [": ", "\n", "\n\n", ":", ".", "What shape is in the image?", "How many shapes are there?",
              "[[1, 2, 3, 4]]", "1", "2", "3"]
    for kind in SHAPE_KINDS:
        pieces += [f"What color is the {kind}?", kind]
        for color in COLORS:
            pieces += [f"the {color} {kind}", color]
    return pieces


def build_tokenizer() -> Tokenizer:
    """Train the byte-level BPE on ``training_text()`` and append the VL2 special tokens (deterministic)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.Split(Regex(_CJK_PATTERN), behavior="isolated"),
        pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_MAX_BPE_VOCAB,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text(), trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VL2_SPECIAL_TOKENS])
    return tokenizer


def _added_token(content: str) -> Dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_tokenizer_files(directory: str) -> int:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` (the official
    file set) into ``directory``; returns the vocabulary size including the special tokens."""
    os.makedirs(directory, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", **_added_token(BOS_TOKEN)},
        "eos_token": {"__type": "AddedToken", **_added_token(EOS_TOKEN)},
        "pad_token": {"__type": "AddedToken", **_added_token(PAD_TOKEN)},
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 16384,
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "LlamaTokenizerFast",
    }
    special_map = {
        "additional_special_tokens": ["<|User|>", "<|Assistant|>"],
        "bos_token": _added_token(BOS_TOKEN),
        "eos_token": _added_token(EOS_TOKEN),
        "pad_token": _added_token(PAD_TOKEN),
    }
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
            f.write("\n")
    return tokenizer.get_vocab_size(with_added_tokens=True)
