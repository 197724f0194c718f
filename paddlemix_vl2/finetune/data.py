"""Fine-tune data: conversation records from JSON/JSONL files or a PaddleMIX mixture file, checked up front.

A record is one conversation (see README.md in this folder for the full format)::

    {"messages": [{"role": "<|User|>", "content": "<image>\\nWhat shape is in the image?",
                   "images": ["images/000001.png"]},
                  {"role": "<|Assistant|>", "content": "circle"}]}

PaddleMIX's form is read too: roles ``user``/``assistant`` and the images in a top-level ``"images"``
list; and InternVL's ``"conversations": [{"from": "human"|"gpt", "value": ...}]`` with ``"image"``.
Relative image paths are relative to the annotation file's folder (or to the mixture entry's ``root``).

``load_dataset`` runs every record through the processor once, before training. A record that cannot
be used (malformed JSON or roles, a missing or unreadable image, a ``<image>`` tag count that differs
from its image count, more tokens than ``max_seq_length``) is logged as ``file:line: reason`` and
skipped; the counts are in the returned ``DatasetReport`` and in one summary log line.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import paddle

from ..processors import DeepseekVLV2Processor
from ..processors.image_processing import ImageLoadError

__all__ = [
    "Record",
    "SkippedRecord",
    "DatasetReport",
    "DatasetFormatError",
    "FinetuneDataset",
    "FinetuneCollator",
    "MODEL_INPUT_FIELDS",
    "load_dataset",
    "read_mixture",
]

logger = logging.getLogger(__name__)

# The processor batch fields the model's forward takes during training.
MODEL_INPUT_FIELDS = ("input_ids", "labels", "attention_mask", "images", "images_seq_mask", "images_spatial_crop")

_USER, _ASSISTANT = "<|User|>", "<|Assistant|>"
_ROLE_NAMES = {
    "<|User|>": _USER, "user": _USER, "human": _USER,
    "<|Assistant|>": _ASSISTANT, "assistant": _ASSISTANT, "gpt": _ASSISTANT,
    "system": "system",
}


class DatasetFormatError(ValueError):
    """A dataset or mixture file that cannot be read at all; the message names the file and the fix."""


class _BadRecord(ValueError):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


@dataclasses.dataclass
class Record:
    """One usable conversation: roles normalised to ``<|User|>``/``<|Assistant|>``, absolute image paths."""

    messages: List[Dict[str, str]]
    images: List[str]
    source: str  # "file:line"
    num_tokens: int


@dataclasses.dataclass
class SkippedRecord:
    source: str
    kind: str  # malformed | missing_image | image_count | unreadable | too_long
    reason: str


@dataclasses.dataclass
class DatasetReport:
    """What ``load_dataset`` kept and skipped."""

    kept: int = 0
    skipped: List[SkippedRecord] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        kinds = Counter(s.kind for s in self.skipped)
        detail = f" ({', '.join(f'{k}: {n}' for k, n in sorted(kinds.items()))})" if kinds else ""
        return f"{self.kept} records kept, {len(self.skipped)} skipped{detail}"


class FinetuneDataset(paddle.io.Dataset):
    """The checked records, each mixture entry repeated ``repeat_time`` times; item i is a ``Record``."""

    def __init__(self, records: Sequence[Record], report: DatasetReport):
        super().__init__()
        self.records = list(records)
        self.report = report

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]


class FinetuneCollator:
    """Records -> one padded training batch (a dict of the model's forward arguments).

    Labels come from the processor in training mode (``inference_mode=False``): -100 at image tokens
    and padding, and at prompt tokens when the processor's ``mask_prompt`` is set.
    """

    def __init__(self, processor: DeepseekVLV2Processor, padding: str = "left"):
        self.processor = processor
        self.padding = padding

    def __call__(self, records: Sequence[Record]) -> Dict[str, paddle.Tensor]:
        samples = [
            self.processor.process_one(conversations=r.messages, images=r.images, inference_mode=False)
            for r in records
        ]
        batch = self.processor.batchify(samples, padding=self.padding)
        return {name: batch[name] for name in MODEL_INPUT_FIELDS}


def load_dataset(path: str, processor: DeepseekVLV2Processor, max_seq_length: int) -> FinetuneDataset:
    """Read a JSON/JSONL annotation file or a mixture file, check every record, skip and report bad ones.

    Raises DatasetFormatError when a file cannot be read at all or no record is usable.
    """
    if not os.path.isfile(path):
        problem = "is a folder" if os.path.isdir(path) else "not found"
        raise FileNotFoundError(f"dataset {path} {problem}; pass a .json/.jsonl annotation file or a mixture .json")
    entries = read_mixture(path) if _is_mixture(path) else [(os.path.abspath(path), None, 1.0)]
    report = DatasetReport()
    records: List[Record] = []
    for annotation, image_root, repeat_time in entries:
        kept = []
        root = image_root or os.path.dirname(annotation)
        for source, raw in _read_annotation(annotation):
            try:
                kept.append(_check_record(raw, source, root, processor, max_seq_length))
            except _BadRecord as bad:
                report.skipped.append(SkippedRecord(source, bad.kind, str(bad)))
                logger.warning("%s: %s; skipped", source, bad)
        records += _repeat(kept, repeat_time)
    report.kept = len(records)
    logger.info("dataset %s: %s", path, report.summary())
    if not records:
        raise DatasetFormatError(f"{path} has no usable record ({report.summary()}); fix the records listed above")
    return FinetuneDataset(records, report)


def read_mixture(path: str) -> List[Tuple[str, Optional[str], float]]:
    """``[(annotation path, image root or None, repeat_time)]`` of a PaddleMIX mixture file
    ``{"name": {"annotation": "a.jsonl", "root": "images/", "repeat_time": 1}}``; relative paths are
    relative to the mixture file's folder."""
    meta = _read_json(path)
    if not isinstance(meta, dict) or not meta:
        raise DatasetFormatError(f"{path} must map dataset names to {{\"annotation\": ..., \"repeat_time\": ...}}")
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    for name, entry in meta.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("annotation"), str):
            raise DatasetFormatError(
                f"{path}: entry {name!r} needs an \"annotation\" path (a .json dataset must be a list of records; "
                "name a file of one record per line .jsonl)"
            )
        repeat_time = entry.get("repeat_time", 1)
        if not isinstance(repeat_time, (int, float)) or repeat_time < 0:
            raise DatasetFormatError(f"{path}: entry {name!r} has repeat_time {repeat_time!r}; use a number >= 0")
        annotation = os.path.join(base, entry["annotation"])
        if not os.path.isfile(annotation):
            raise DatasetFormatError(f"{path}: entry {name!r}: annotation file {annotation} not found")
        root = os.path.join(base, entry["root"]) if isinstance(entry.get("root"), str) else None
        entries.append((annotation, root, float(repeat_time)))
    return entries


def _repeat(records: List[Record], repeat_time: float) -> List[Record]:
    """Whole copies, then the first ``fraction * len`` records for a fractional repeat_time."""
    whole = int(repeat_time)
    return records * whole + records[: round((repeat_time - whole) * len(records))]


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetFormatError(f"{path} is not valid JSON ({err})") from None


def _is_mixture(path: str) -> bool:
    if path.endswith(".jsonl"):
        return False
    with open(path, encoding="utf-8") as f:
        head = f.read(64).lstrip()
    # A .json dataset is a list of records; an object can only be a mixture file.
    return head.startswith("{")


def _read_annotation(path: str) -> Iterator[Tuple[str, Any]]:
    """Yield ``("file:line", parsed JSON or a _BadRecord)`` for each record of a JSONL or JSON-list file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{line_no}", json.loads(line)
            except json.JSONDecodeError as err:
                yield f"{path}:{line_no}", _BadRecord("malformed", f"not valid JSON ({err.msg} at column {err.colno})")
        return
    yield from _iter_json_list(text, path)


def _iter_json_list(text: str, path: str) -> Iterator[Tuple[str, Any]]:
    """Elements of a top-level JSON list with the line each starts on."""
    decoder = json.JSONDecoder()
    pos, line, counted = _skip_space(text, 0), 1, 0

    def line_at(position: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, position)
        counted = position
        return line

    if not text.startswith("[", pos):
        raise DatasetFormatError(
            f"{path}: a .json dataset must be a list of records (or use .jsonl, one record per line)"
        )
    pos = _skip_space(text, pos + 1)
    while pos < len(text) and text[pos] != "]":
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DatasetFormatError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); fix it or use JSONL") from None
        yield f"{path}:{line_at(pos)}", obj
        pos = _skip_space(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_space(text, pos + 1)
        elif pos >= len(text) or text[pos] != "]":
            raise DatasetFormatError(f"{path}:{line_at(pos)}: expected ',' or ']' between records")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _normalise(raw: Any) -> Tuple[List[Dict[str, str]], List[str]]:
    """(messages with canonical roles, image paths as written) of one raw record."""
    if isinstance(raw, _BadRecord):
        raise raw
    if not isinstance(raw, dict):
        raise _BadRecord("malformed", "a record must be a JSON object with \"messages\"")
    turns = raw.get("messages", raw.get("conversations"))
    if not isinstance(turns, list) or not turns:
        raise _BadRecord("malformed", "\"messages\" must be a non-empty list")
    messages, message_images = [], []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _BadRecord("malformed", f"message {index} is not an object")
        role, content = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
        if role not in _ROLE_NAMES or not isinstance(content, str):
            raise _BadRecord(
                "malformed", f"message {index} needs a role ({', '.join(sorted(_ROLE_NAMES))}) and a string content"
            )
        messages.append({"role": _ROLE_NAMES[role], "content": content})
        message_images += _as_list(turn.get("images"), f"message {index} images")
    top_images = _as_list(raw.get("images", raw.get("image")), "images")
    if message_images and top_images:
        raise _BadRecord("malformed", "images are listed both in the messages and at the top level; keep one list")
    if not any(m["role"] == _ASSISTANT and m["content"].strip() for m in messages):
        raise _BadRecord("malformed", "no non-empty assistant answer to learn from")
    return messages, message_images or top_images


def _as_list(value: Any, what: str) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise _BadRecord("malformed", f"{what} must be a path or a list of paths")


def _check_record(
    raw: Any, source: str, image_root: str, processor: DeepseekVLV2Processor, max_seq_length: int
) -> Record:
    messages, images = _normalise(raw)
    tag = processor.image_token
    tags = sum(m["content"].count(tag) for m in messages if m["role"] == _USER)
    if tags != len(images):
        raise _BadRecord("image_count", f"{tags} {tag} tag(s) but {len(images)} image(s); give one image per tag")
    paths = [p if os.path.isabs(p) else os.path.join(image_root, p) for p in images]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise _BadRecord("missing_image", f"image file {missing[0]} not found")
    try:
        sample = processor.process_one(conversations=messages, images=paths, inference_mode=False)
    except (ImageLoadError, OSError) as err:
        raise _BadRecord("unreadable", str(err)) from None
    except ValueError as err:
        raise _BadRecord("malformed", str(err)) from None
    if len(sample) > max_seq_length:
        raise _BadRecord("too_long", f"{len(sample)} tokens, more than --max_seq_length {max_seq_length}")
    return Record(messages=messages, images=paths, source=source, num_tokens=len(sample))
