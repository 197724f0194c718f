"""The safetensors files of a checkpoint: which shard holds each tensor, and reading a shard's tensors.

A checkpoint folder holds either ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
A shard's tensors are read with positioned reads into reused buffers (``ShardReader.read_chunks``), or mapped
copy-on-write where the model keeps them as stored (``ShardReader.mapped_bf16``, ``populate_pages``).
``checkpoint.py`` decides which, and fills the model's parameters.
"""
from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import paddle

from ...json_files import read_json_object

__all__ = ["CheckpointError", "INDEX_FILE", "SINGLE_FILE", "READ_CHUNK_BYTES", "checkpoint_weight_map", "ShardReader",
           "populate_pages"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype -> the NumPy dtype its bytes are read as (bf16 as raw uint16 bits).
_STORAGE_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
# Bytes read per call: large enough for sequential throughput, small enough to add little to the peak.
READ_CHUNK_BYTES = 32 << 20
# Linux's madvise(MADV_POPULATE_READ) (5.14+; the mmap module names it from Python 3.13): map a range's
# pages in, sharing the page cache, without breaking copy-on-write.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read as asked; the message names the file or keys and the fix."""


def checkpoint_weight_map(path: str) -> Dict[str, str]:
    """Map every tensor name to the shard file that holds it (absolute paths)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder; pass the checkpoint folder that holds config.json")
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        weight_map = read_json_object(index, CheckpointError, "re-download it").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise CheckpointError(f"{index} is not a valid safetensors index: its weight_map must map tensor "
                                  "names to shard file names; re-download it")
        files = {name: os.path.join(path, shard) for name, shard in weight_map.items()}
    elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
        single = os.path.join(path, SINGLE_FILE)
        files = {name: single for name in ShardReader(single).entries}
    else:
        raise CheckpointError(f"{path} has neither {INDEX_FILE} nor {SINGLE_FILE}; is it a DeepSeek-VL2 checkpoint?")
    missing_shards = sorted({p for p in files.values() if not os.path.isfile(p)})
    if missing_shards:
        raise CheckpointError(
            f"missing shard file(s) {', '.join(os.path.basename(p) for p in missing_shards)} in {path}; "
            "download every file listed in the index"
        )
    return files


class ShardReader:
    """One safetensors file: its header parsed by hand, tensor bytes read with positioned reads.

    The format is an 8-byte little-endian header length, a JSON header mapping each name to
    ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets from the end of the header), then the
    data. Every read opens its own handle, so threads can read one shard at once.
    """

    def __init__(self, file: str):
        self.file = file
        self._mapping: Optional[mmap.mmap] = None
        with open(file, "rb", buffering=0) as handle:
            self.entries = self._read_header(handle)

    def _read_header(self, handle) -> Dict[str, dict]:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if header_len < 0 or 8 + header_len > size:
            raise CheckpointError(f"{self.file} is truncated or not a safetensors file; re-download it")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.file} has a corrupt header ({e}); re-download it") from None
        header.pop("__metadata__", None)
        data_start, entries = 8 + header_len, {}
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            if data_start + end > size:
                raise CheckpointError(
                    f"{self.file} is truncated: {name} ends at byte {data_start + end} of {size}; re-download it"
                )
            if entry["dtype"] not in _STORAGE_DTYPES:
                raise CheckpointError(
                    f"{self.file}: {name} has dtype {entry['dtype']}, which a DeepSeek-VL2 checkpoint never holds; "
                    f"use one of {', '.join(_STORAGE_DTYPES)}"
                )
            entries[name] = {"dtype": entry["dtype"], "shape": list(entry["shape"]), "offset": data_start + begin}
        return entries

    def names_in_file_order(self, names: Sequence[str]) -> List[str]:
        return sorted(names, key=lambda name: self.entries[name]["offset"])

    def read_chunks(self, name: str, buffer: bytearray) -> Iterator[Tuple[int, np.ndarray]]:
        """Yield ``(first_row, rows)`` over the tensor, ``rows`` a [n, *shape[1:]] view into ``buffer``."""
        entry = self.entries[name]
        storage = np.dtype(_STORAGE_DTYPES[entry["dtype"]])
        shape = entry["shape"] or [1]
        row_bytes = max(int(np.prod(shape[1:], dtype=np.int64)) * storage.itemsize, 1)
        if row_bytes > len(buffer):  # a single row larger than the shared buffer gets its own
            buffer = bytearray(row_bytes)
        rows_per_chunk = len(buffer) // row_bytes
        with open(self.file, "rb", buffering=0) as handle:
            for first in range(0, shape[0], rows_per_chunk):
                count = min(rows_per_chunk, shape[0] - first)
                view = memoryview(buffer)[: count * row_bytes]
                self._read_exact(handle, entry["offset"] + first * row_bytes, view, name)
                yield first, np.frombuffer(view, dtype=storage).reshape([count] + shape[1:])

    def _read_exact(self, handle, offset: int, view: memoryview, name: str) -> None:
        handle.seek(offset)
        done = 0
        while done < len(view):
            count = handle.readinto(view[done:])
            if not count:
                raise CheckpointError(f"{self.file}: cannot read {name}; the file is truncated, re-download it")
            done += count

    def read_tensor(self, name: str) -> paddle.Tensor:
        """The whole tensor as a host Paddle tensor in its checkpoint dtype."""
        entry = self.entries[name]
        values = np.empty(entry["shape"], dtype=_STORAGE_DTYPES[entry["dtype"]])
        flat = values.reshape([values.shape[0], -1]) if values.ndim else values.reshape([1, 1])
        for first, rows in self.read_chunks(name, bytearray(READ_CHUNK_BYTES)):
            flat[first:first + len(rows)] = rows.reshape([len(rows), -1])
        tensor = paddle.to_tensor(values, place=paddle.CPUPlace())
        return tensor.view(paddle.bfloat16) if entry["dtype"] == "BF16" else tensor

    def mapped_bf16(self, name: str) -> np.ndarray:
        """A BF16 tensor as uint16 bits in a copy-on-write mapping of the file (``populate_pages`` maps its
        pages in).

        The mapping is the tensor's storage from then on: pages come from the page cache without a copy
        (or from disk if the file is not cached), stay clean, so the kernel may drop and re-read them
        under memory pressure, and a write (a LoRA merge in place) copies only the pages it touches.
        """
        if self._mapping is None:
            with open(self.file, "rb") as handle:
                self._mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        entry = self.entries[name]
        count = int(np.prod(entry["shape"], dtype=np.int64))
        array = np.frombuffer(self._mapping, dtype=np.uint16, count=count, offset=entry["offset"])
        return array.reshape(entry["shape"])

    def mapped_span(self, begin: int, end: int) -> np.ndarray:
        """Bytes ``[begin, end)`` of the file as a view of the mapping ``mapped_bf16`` made."""
        return np.frombuffer(self._mapping, dtype=np.uint8, count=end - begin, offset=begin)

    def read_into(self, name: str, dst: np.ndarray) -> None:
        """The tensor's bytes as stored, straight into ``dst`` (C-contiguous, of the same size and dtype)."""
        entry = self.entries[name]
        with open(self.file, "rb", buffering=0) as handle:
            self._read_exact(handle, entry["offset"], memoryview(dst.reshape(-1)).cast("B"), name)


@functools.lru_cache(maxsize=None)
def _libc_madvise():
    try:
        return ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return None


def populate_pages(array: np.ndarray) -> None:
    """Map in now the pages of ``array`` (a view of a file mapping): the load reads the file, not the first
    forward. ``madvise(MADV_POPULATE_READ)`` is called through ctypes, which releases the GIL (``mmap.madvise``
    keeps it), so the loader's threads populate in parallel; a kernel before 5.14 gets a value read per page
    instead."""
    madvise, address = _libc_madvise(), array.ctypes.data
    first_page = address // mmap.PAGESIZE * mmap.PAGESIZE
    length = ctypes.c_size_t(address + array.nbytes - first_page)
    if madvise is None or madvise(ctypes.c_void_p(first_page), length, _MADV_POPULATE_READ) != 0:
        flat = array.reshape(-1)
        flat[:: mmap.PAGESIZE // array.itemsize].max(initial=0)
        flat[-1:].max(initial=0)  # the last page, which the stride can step over when the start is not aligned
