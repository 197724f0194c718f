"""The DeepSeek byte-level BPE tokenizer, read from the files of an official checkpoint.

The official code loads these files with transformers' ``LlamaTokenizerFast``, which is a thin shell over
the ``tokenizers`` library. This wrapper reads the same three files and gives the same ids:

* ``tokenizer.json``: vocabulary, merges, pre-tokenizer and the added (special) tokens;
* ``tokenizer_config.json``: ``add_bos_token`` / ``add_eos_token`` and the special-token strings;
* ``special_tokens_map.json``: bos / eos / pad and ``additional_special_tokens`` (wins over the config).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
from tokenizers import Tokenizer

from ..json_files import read_json_object

__all__ = ["DeepseekTokenizer", "TokenizerFileError", "UnknownTokenError"]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


class TokenizerFileError(ValueError):
    """A tokenizer file exists but cannot be used; the message names the file."""


class UnknownTokenError(ValueError):
    """A token string that is not in the vocabulary."""


def _read_json(path: str) -> Dict[str, Any]:
    return read_json_object(path, TokenizerFileError, "re-download it from the checkpoint")


def _token_content(value: Any) -> Optional[str]:
    """Special tokens are stored either as plain strings or as ``{"content": ...}`` AddedToken dicts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerFileError(f"cannot read a special token from {value!r}: expected a string or {{'content': str}}")


class DeepseekTokenizer:
    """Encode and decode text with the DeepSeek-VL2 vocabulary.

    Attributes:
        bos_token, eos_token, pad_token: the special-token strings (``pad_token`` may be None).
        bos_token_id, eos_token_id, pad_token_id: their ids (``pad_token_id`` may be None).
        additional_special_tokens: e.g. ``["<|User|>", "<|Assistant|>"]``.
        add_bos_token, add_eos_token: what ``encode(..., add_special_tokens=True)`` adds.
        model_max_length: from ``tokenizer_config.json`` (None when absent).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        bos_token: str,
        eos_token: str,
        pad_token: Optional[str] = None,
        additional_special_tokens: Sequence[str] = (),
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        model_max_length: Optional[int] = None,
    ):
        self._tokenizer = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.additional_special_tokens = list(additional_special_tokens)
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.model_max_length = model_max_length
        self.bos_token_id = self.convert_tokens_to_ids(bos_token)
        self.eos_token_id = self.convert_tokens_to_ids(eos_token)
        self.pad_token_id = None if pad_token is None else self.convert_tokens_to_ids(pad_token)
        self.convert_tokens_to_ids(self.additional_special_tokens)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "DeepseekTokenizer":
        """Load ``tokenizer.json`` plus the optional ``tokenizer_config.json`` / ``special_tokens_map.json``."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"tokenizer folder {directory!r} does not exist: pass a checkpoint folder")
        tokenizer_path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.isfile(tokenizer_path):
            raise FileNotFoundError(
                f"{tokenizer_path} not found: the folder must hold the checkpoint's {TOKENIZER_FILE}"
            )
        try:
            tokenizer = Tokenizer.from_file(tokenizer_path)
        except Exception as err:  # the Rust loader raises a bare Exception on any parse problem
            raise TokenizerFileError(
                f"cannot load {tokenizer_path} ({err}); re-download it from the checkpoint"
            ) from err

        settings: Dict[str, Any] = {}
        for name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                settings.update({k: v for k, v in _read_json(path).items() if v is not None})

        bos_token = _token_content(settings.get("bos_token"))
        eos_token = _token_content(settings.get("eos_token"))
        if bos_token is None or eos_token is None:
            raise TokenizerFileError(
                f"{directory} defines no bos_token/eos_token: it needs {TOKENIZER_CONFIG_FILE} or "
                f"{SPECIAL_TOKENS_MAP_FILE} from the checkpoint"
            )
        additional = [_token_content(t) for t in settings.get("additional_special_tokens", [])]
        # NOTE(port): LlamaTokenizerFast defaults to add_bos_token=True when the config does not say.
        return cls(
            tokenizer,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=_token_content(settings.get("pad_token")),
            additional_special_tokens=additional,
            add_bos_token=bool(settings.get("add_bos_token", True)),
            add_eos_token=bool(settings.get("add_eos_token", False)),
            model_max_length=settings.get("model_max_length"),
        )

    def __len__(self) -> int:
        """Vocabulary size including the added tokens (128823 for the VL2 tiny/full vocabulary)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: Union[str, Iterable[str]]) -> Union[int, List[int]]:
        """Id of one token string, or the list of ids of several; unknown tokens raise UnknownTokenError."""
        if isinstance(tokens, str):
            token_id = self._tokenizer.token_to_id(tokens)
            if token_id is None:
                raise UnknownTokenError(f"token {tokens!r} is not in the vocabulary of this tokenizer")
            return token_id
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(self, ids: Union[int, Iterable[int]]) -> Union[str, List[str]]:
        """Token string of one id, or the list of strings of several."""
        if isinstance(ids, (int, np.integer)):
            token = self._tokenizer.id_to_token(int(ids))
            if token is None:
                raise UnknownTokenError(f"id {int(ids)} is outside the vocabulary (size {len(self)})")
            return token
        return [self.convert_ids_to_tokens(token_id) for token_id in _as_id_list(ids)]

    def _with_special_tokens(self, ids: List[int]) -> List[int]:
        prefix = [self.bos_token_id] if self.add_bos_token else []
        suffix = [self.eos_token_id] if self.add_eos_token else []
        return prefix + ids + suffix

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        """Token ids of ``text``; with ``add_special_tokens`` bos/eos are added as the config says."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return self._with_special_tokens(ids) if add_special_tokens else ids

    def batch_encode(self, texts: Sequence[str], add_special_tokens: bool = False) -> List[List[int]]:
        """``encode`` for several texts at once (the Rust tokenizer runs them in parallel)."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        if add_special_tokens:
            return [self._with_special_tokens(e.ids) for e in encodings]
        return [e.ids for e in encodings]

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of a 1-D id sequence (list, numpy array or paddle.Tensor)."""
        return self._tokenizer.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> List[str]:
        """Texts of several id sequences, e.g. a [B, T] array of generated tokens."""
        return self._tokenizer.decode_batch(
            [_as_id_list(ids) for ids in sequences], skip_special_tokens=skip_special_tokens
        )


def _as_id_list(ids: Any) -> List[int]:
    array = np.asarray(ids)
    if array.size == 0:
        return []
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"expected a 1-D sequence of integer token ids, got shape {array.shape} {array.dtype}")
    return array.tolist()
