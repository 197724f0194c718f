"""Read and write official DeepSeek-VL2 checkpoints (Hugging Face layout, torch orientation).

A checkpoint folder holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Loading streams one tensor at a time from the shards straight into the
model's parameters, so peak memory is the model plus a few small read buffers (the files themselves are
read by ``safetensors_shards``).

Module attribute names equal checkpoint names and every tensor keeps its checkpoint shape (the model's
``Linear`` stores its weight ``[out, in]`` as torch does), so the only rules are:
* a key prefix selects a subtree (``language.`` for the text-only model);
* tensors the official model creates but never uses (``SKIPPED_KEYS``) are skipped on purpose.

How float32 parameters on the host are filled (the CPU path), and why:
* shards are read with positioned reads into reused buffers, not mmap'd: mapped pages count in the
  process's resident set until the shard is closed, which would add up to a whole shard to the peak;
* bf16 becomes float32 in NumPy (``uint16 << 16``), several times faster than Paddle's cast;
* the values are written straight into the parameter's memory. ``build_and_load`` builds the model
  under ``paddle.LazyGuard``, so that memory is allocated (``paddle.empty``) just before it is
  written instead of being zero-filled first: faulting in fresh pages is most of the cost of a load;
* tensors are filled by a small thread pool: NumPy and file reads release the GIL, and page faults,
  conversion and reads then proceed on every core.
Any other parameter (off the host, or not float32) is filled through Paddle's cast and ``set_value``.

bf16 storage (``build_and_load(..., weight_dtype=...)``, "auto" by default in ``from_pretrained``): on a CPU
whose kernels read bf16 weights (``native.bf16_weights_supported``), float32 inference keeps the matrices
of the ``Linear`` layers as the checkpoint stores them; the kernels widen them to float32 as they load
them, so results are the same as with float32 copies (bf16 to float32 is exact) at half the memory and
half the bytes a decode step streams. Those matrices are not copied at all: each is a copy-on-write
mapping of its shard, its pages mapped in at load (the tiny model: 1.5-4 s against 12 s to read them into
fresh memory on the benchmark machine, whose first touch of fresh memory is slow). How fast a decode step
streams mapped matrices depends on how the page cache holds the shards: in 2 MiB folios (what reading an
uncached shard through the mapping gives, and a plain copy of the files) the tiny model's step took 62 ms,
as from a copy; in small folios left by earlier page-cache history, 76 ms, the 331 MB lm_head alone
streaming at 15 against 25 GB/s (benchmarks/HISTORY.md). The cached pages cannot be collapsed into huge
pages afterwards (this machine's Linux 6.18 refuses ``MADV_COLLAPSE`` for these mappings), so
``map_weights=False``, which reads the matrices into fresh memory, is the choice for a long-running server
whatever the page cache holds. Mapped pages are clean, so the kernel can reclaim them under memory
pressure, and processes that load one checkpoint share them. The token embedding table is kept the same
way (its rows are widened as they are looked up); norms, routers, biases and the vision tower's patch and
position embeddings stay float32. The kept matrices are inference storage: such a model refuses
``train()``, and the matrices take no gradient (``stop_gradient``), so a gradient taken in eval mode (a
saliency map, say) reaches the inputs and the float32 parameters only; ``weight_dtype="float32"`` gives
gradients for every parameter.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import mmap
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import paddle
from safetensors.paddle import save_file

from ...output_folders import atomic_directory
from .layers import Linear, TokenEmbedding
from .native import bf16_weights_supported
from .safetensors_shards import (
    INDEX_FILE, READ_CHUNK_BYTES, SINGLE_FILE, CheckpointError, ShardReader, checkpoint_weight_map, populate_pages,
)

__all__ = [
    "CheckpointError",
    "SKIPPED_KEYS",
    "DTYPES_BY_NAME",
    "resolve_dtype",
    "checkpoint_weight_map",
    "load_weights",
    "save_weights",
    "zero_init",
    "build_and_load",
    "bf16_storage_names",
    "refuse_training_bf16_storage",
]

logger = logging.getLogger(__name__)

# NOTE(port): the official SigLIP tower builds an attention-pooling head that VL2 never calls
# (ignore_head=True); its tensors are in every checkpoint and are skipped here.
SKIPPED_KEYS = (re.compile(r"^vision\.attn_pool\."),)

# What a dtype given by name means, for compute (``resolve_dtype``) and for stored weights alike.
DTYPES_BY_NAME = {
    "float32": paddle.float32, "fp32": paddle.float32,
    "bfloat16": paddle.bfloat16, "bf16": paddle.bfloat16,
    "float16": paddle.float16, "fp16": paddle.float16,
}
# Threads filling parameters; beyond a few, memory bandwidth is the limit.
_LOAD_THREADS = min(4, os.cpu_count() or 1)
# Mapped matrices are populated in ranges of about this size: whole matrices coalesced, so a thread returns
# for the GIL once per range rather than once per matrix.
_POPULATE_SPAN_BYTES = 256 << 20


def resolve_dtype(dtype=None) -> paddle.dtype:
    """The compute dtype: float32 on CPU, bfloat16 on GPU unless asked otherwise.

    Paddle has no bf16/fp16 compute kernels on CPU, so a half dtype requested on CPU falls back to
    float32 with one notice.
    """
    on_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.get_device().startswith("gpu")
    if dtype is None:
        return paddle.bfloat16 if on_gpu else paddle.float32
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES_BY_NAME:
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = DTYPES_BY_NAME[dtype.lower()]
    if dtype in (paddle.bfloat16, paddle.float16) and not on_gpu:
        logger.warning(
            "%s was requested but Paddle has no %s compute on CPU; computing in float32 instead",
            str(dtype).replace("paddle.", ""), str(dtype).replace("paddle.", ""),
        )
        return paddle.float32
    return dtype


def _write_rows(dst: np.ndarray, rows: np.ndarray) -> None:
    """Convert checkpoint rows into float32 ``dst`` of the same shape (bf16 bits -> float32 bits)."""
    if rows.dtype == np.uint16:
        np.left_shift(rows, 16, out=dst.view(np.uint32), dtype=np.uint32)
    else:
        dst[...] = rows


_thread_buffers = threading.local()


def _fill_host_array(shard: ShardReader, name: str, dst: np.ndarray) -> None:
    """Read ``name`` into ``dst`` of its checkpoint shape: float32, or bf16 bits (uint16) as stored.

    Runs on a loader thread; each thread converts through its own buffer.
    """
    if dst.size == 0:
        return
    if dst.dtype == np.uint16:
        shard.read_into(name, dst)
        return
    if not hasattr(_thread_buffers, "buffer"):
        _thread_buffers.buffer = bytearray(READ_CHUNK_BYTES)
    chunks = shard.read_chunks(name, _thread_buffers.buffer)
    flat = dst.reshape([dst.shape[0], -1]) if dst.ndim else dst.reshape([1, 1])
    for first, rows in chunks:
        _write_rows(flat[first:first + len(rows)], rows.reshape([len(rows), -1]))


def _lazy_on_host(param: paddle.Tensor) -> bool:
    return not param._is_initialized() and paddle.get_device() == "cpu"


def _host_float32_storage(param: paddle.Tensor) -> Optional[paddle.Tensor]:
    """A float32 host tensor to write ``param``'s values into: the parameter itself, or fresh memory
    for a parameter built under ``paddle.LazyGuard``. None when ``param`` is not float32 on the host."""
    if param.dtype != paddle.float32:
        return None
    if _lazy_on_host(param):
        return paddle.empty(param.shape, dtype=paddle.float32)
    return param.detach() if param._is_initialized() and param.place.is_cpu_place() else None


class _ParameterFiller:
    """Fills parameters from shards: host float32 ones on a thread pool, the rest inline; mapped matrices
    take their mapping at once and their pages at the end of each shard (``populate_mapped``)."""

    def __init__(self, on_done, map_bf16: bool):
        self._map_bf16 = map_bf16
        self._pool = ThreadPoolExecutor(max_workers=_LOAD_THREADS, thread_name_prefix="load_weights")
        self._pending: collections.deque = collections.deque()
        self._on_done = on_done
        self._mapped: List[Tuple[ShardReader, int, int]] = []  # (shard, begin, end) not yet populated

    def __enter__(self) -> "_ParameterFiller":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.populate_mapped()
                while self._pending:
                    self._finish_oldest()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def fill(self, param: paddle.Tensor, shard: ShardReader, name: str, keep_bf16: bool = False) -> None:
        """Fill ``param`` from ``name``; ``keep_bf16``: a bf16 tensor stays bf16 (a lazy host parameter),
        mapped from the file or read into fresh memory, and takes no gradient."""
        keep_bf16 = keep_bf16 and shard.entries[name]["dtype"] == "BF16" and _lazy_on_host(param)
        if keep_bf16:
            # A gradient reaching a bf16-stored matrix would be rounded to bf16 without a word; inference
            # storage takes none (gradients still flow through it to the inputs, in float32).
            param.stop_gradient = True
        if keep_bf16 and self._map_bf16 and param.size > 0:
            bits = shard.mapped_bf16(name)
            # Zero-copy: the parameter holds the mapped array (DLPack keeps it, and so the mapping, alive).
            paddle.utils.dlpack.from_dlpack(bits.view(np.int16)).view(paddle.bfloat16)._share_buffer_to(param)
            begin = shard.entries[name]["offset"]
            self._mapped.append((shard, begin, begin + bits.nbytes))
            return
        if keep_bf16:  # NumPy has no bf16: the memory is written as uint16 bits
            bits = paddle.empty(param.shape, dtype=paddle.int16)
            storage, target = bits.view(paddle.bfloat16), np.from_dlpack(bits).view(np.uint16)
        else:
            storage = _host_float32_storage(param)
            target = None if storage is None else np.from_dlpack(storage)  # a writable view of its memory
        if storage is None:
            if not param._is_initialized():
                param.initialize()
            tensor = shard.read_tensor(name)
            param.set_value(tensor.astype(param.dtype) if tensor.dtype != param.dtype else tensor)
            self._on_done()
            return
        future = self._pool.submit(_fill_host_array, shard, name, target)
        self._pending.append((future, storage, param))
        self._bound_pending()

    def populate_mapped(self) -> None:
        """Map in the pages of the matrices mapped since the last call (``fill`` order, file order within a
        shard), in ranges of about ``_POPULATE_SPAN_BYTES`` on the pool, while this thread waits.

        Populated one matrix at a time while the main thread went on, each return from ``madvise`` waited
        for the GIL that thread held (up to Python's 5 ms switch interval): the tiny model's 2308 matrices
        took 0.24-0.27 s of the threads' time, and its ``load_weights`` 0.39-0.62 s against 0.23-0.35 s in
        ranges. The progress bar counts a matrix when its pages are in.
        """
        spans: List[Tuple[ShardReader, int, int, int]] = []  # (shard, begin, end, matrices ending in it)
        for shard, begin, end in self._mapped:
            last = spans[-1] if spans else None
            if last and last[0] is shard and last[1] <= begin < last[2] + mmap.PAGESIZE \
                    and max(end, last[2]) - last[1] <= _POPULATE_SPAN_BYTES:
                spans[-1] = (shard, last[1], max(end, last[2]), last[3] + 1)
            else:
                spans.append((shard, begin, end, 1))
        self._mapped = []
        ranges = self._pool.map(populate_pages, [shard.mapped_span(begin, end) for shard, begin, end, _ in spans])
        for (*_, matrices), _done in zip(spans, ranges):
            for _ in range(matrices):
                self._on_done()

    def _bound_pending(self) -> None:
        # Bounded look-ahead keeps errors prompt; the arrays are the parameters' own memory anyway.
        while len(self._pending) > 2 * _LOAD_THREADS:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        future, storage, param = self._pending.popleft()
        future.result()
        if storage is not None and not param._is_initialized():
            storage._share_buffer_to(param)  # zero-copy: the parameter takes over the filled memory
        self._on_done()


class _Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.count = total, label, 0
        self.enabled = enabled and sys.stderr.isatty()

    def step(self) -> None:
        self.count += 1
        if self.enabled and (self.count == self.total or self.count % 8 == 0):
            filled = int(30 * self.count / max(self.total, 1))
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {self.count}/{self.total}")
            if self.count == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def load_weights(
    layer: paddle.nn.Layer,
    path: str,
    prefix: str = "",
    skip: Sequence[re.Pattern] = SKIPPED_KEYS,
    progress: bool = True,
    keep_bf16: Sequence[str] = (),
    map_weights: bool = True,
) -> List[str]:
    """Stream the tensors under ``prefix`` from the checkpoint at ``path`` into ``layer``.

    Each tensor is read from its shard, converted to the parameter's dtype and written into the parameter
    (see the module docstring for the host float32 path). Parameters of a layer built under
    ``paddle.LazyGuard`` get their memory here. Missing keys, unexpected keys and
    shape mismatches are collected and raised together as one ``CheckpointError``. ``keep_bf16``: names
    (relative to ``layer``) of lazy host parameters that keep a bf16 checkpoint tensor as stored, mapped from
    the shard (``map_weights``) or read into fresh memory.

    Returns:
        the checkpoint names that were loaded.
    """
    files = checkpoint_weight_map(path)
    params = dict(layer.named_parameters())
    params.update({n: b for n, b in layer.named_buffers() if n in layer.state_dict()})
    keep_bf16 = frozenset(keep_bf16)
    wanted: Dict[str, List[str]] = {}
    unexpected: List[str] = []
    for ckpt_name, file in files.items():
        if not ckpt_name.startswith(prefix) or any(p.search(ckpt_name) for p in skip):
            continue
        name = ckpt_name[len(prefix):]
        if name in params:
            wanted.setdefault(file, []).append(ckpt_name)
        else:
            unexpected.append(ckpt_name)
    loaded_names = {n[len(prefix):] for names in wanted.values() for n in names}
    missing = sorted(set(params) - loaded_names)

    mismatched: List[str] = []
    loaded: List[str] = []
    bar = _Progress(sum(len(v) for v in wanted.values()), f"loading {os.path.basename(os.path.normpath(path))}", progress)
    with _ParameterFiller(on_done=bar.step, map_bf16=map_weights) as filler:
        for file in sorted(wanted):
            shard = ShardReader(file)
            missing_in_shard = [n for n in wanted[file] if n not in shard.entries]
            if missing_in_shard:
                raise CheckpointError(
                    f"{file} does not hold {missing_in_shard[0]}, but the index says it does; re-download the checkpoint"
                )
            for ckpt_name in shard.names_in_file_order(wanted[file]):
                name = ckpt_name[len(prefix):]
                param = params[name]
                shape = shard.entries[ckpt_name]["shape"]
                expected = list(param.shape)
                if shape != expected:
                    mismatched.append(f"{ckpt_name}: checkpoint {shape} vs model {expected}")
                    continue
                filler.fill(param, shard, ckpt_name, keep_bf16=name in keep_bf16)
                loaded.append(ckpt_name)
            filler.populate_mapped()

    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {', '.join(prefix + m for m in missing[:10])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {', '.join(sorted(unexpected)[:10])}")
    if mismatched:
        problems.append(f"shape mismatch in {len(mismatched)} tensor(s): {'; '.join(mismatched[:10])}")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model built from its config.json: " + " | ".join(problems)
            + " (is config.json from the same checkpoint as the weights?)"
        )
    return loaded


def _iter_export(layer: paddle.nn.Layer, prefix: str, dtype) -> Iterator[Tuple[str, paddle.Tensor]]:
    for name, tensor in layer.state_dict().items():
        yield prefix + name, tensor.astype(dtype) if tensor.dtype != dtype else tensor


def save_weights(
    layer: paddle.nn.Layer,
    directory: str,
    prefix: str = "",
    dtype=paddle.bfloat16,
    max_shard_bytes: int = 4 << 30,
    extra_files: Optional[Dict[str, str]] = None,
) -> None:
    """Write ``layer`` as official sharded safetensors (torch ``[out, in]`` orientation) plus an index.

    Everything is first written into a temporary folder beside ``directory`` and moved into place at the
    end (``output_folders.atomic_directory``), so an interrupted save never leaves a half-written
    checkpoint, and an existing ``directory`` is only replaced when it holds checkpoint files alone.
    ``extra_files`` maps file names to text contents (config.json, processor_config.json, ...) written in
    the same step.
    """
    with atomic_directory(directory) as staging:
        size = 0
        shard_tensors: List[Dict[str, paddle.Tensor]] = [{}]
        for name, tensor in _iter_export(layer, prefix, dtype):
            nbytes = int(np.prod(tensor.shape)) * tensor.element_size()
            if shard_tensors[-1] and size + nbytes > max_shard_bytes:
                shard_tensors.append({})
                size = 0
            shard_tensors[-1][name] = tensor.contiguous()
            size += nbytes
        total = len(shard_tensors)
        weight_map, total_size = {}, 0
        for i, tensors in enumerate(shard_tensors):
            shard = SINGLE_FILE if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            save_file(tensors, os.path.join(staging, shard), metadata={"format": "pt"})
            for name, t in tensors.items():
                weight_map[name] = shard
                total_size += int(np.prod(t.shape)) * t.element_size()
        if total > 1:
            with open(os.path.join(staging, INDEX_FILE), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        for fname, text in (extra_files or {}).items():
            with open(os.path.join(staging, fname), "w", encoding="utf-8") as f:
                f.write(text)


@contextlib.contextmanager
def zero_init(dtype=paddle.float32):
    """Build layers with zero-filled parameters in ``dtype`` (fast; weights are loaded right after).

    Random initialisation of billions of parameters would cost more than reading the checkpoint.
    """
    previous_dtype = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    paddle.nn.initializer.set_global_initializer(
        paddle.nn.initializer.Constant(0.0), paddle.nn.initializer.Constant(0.0)
    )
    try:
        yield
    finally:
        paddle.nn.initializer.set_global_initializer(None, None)
        paddle.set_default_dtype(previous_dtype)


def bf16_storage_names(model: paddle.nn.Layer) -> List[str]:
    """The parameters bf16 storage applies to: the weights of the model's ``Linear`` layers (every matrix
    the CPU kernels multiply by) and the token embedding table (looked up, then widened)."""
    return [
        f"{name}.weight" if name else "weight"
        for name, layer in model.named_sublayers(include_self=True) if type(layer) in (Linear, TokenEmbedding)
    ]


def refuse_training_bf16_storage(model: paddle.nn.Layer, mode: bool) -> None:
    """Raise when ``model.train()`` is asked of a model that keeps bf16 matrices for float32 inference
    (its optimizer would update bf16 copies); a model in one dtype throughout (bf16 on a GPU) trains."""
    dtypes = {parameter.dtype for parameter in model.parameters()}
    if mode and paddle.bfloat16 in dtypes and paddle.float32 in dtypes:
        raise RuntimeError(
            "this model was loaded for inference with bf16 weight storage; to train it, load it with "
            "from_pretrained(..., weight_dtype='float32')"
        )


def _keeps_bf16(weight_dtype, compute_dtype) -> bool:
    """Whether a load keeps bf16 matrices: ``weight_dtype`` "auto" (when the kernels read them and the model
    computes in float32 on the CPU), "bfloat16" (the same, or an error where they cannot) or None /
    "float32" / the compute dtype (never)."""
    name = str(weight_dtype).replace("paddle.", "").lower() if weight_dtype is not None else None
    if name in (None, "float32", str(compute_dtype).replace("paddle.", "").lower()):
        return False
    if name not in ("auto", "bfloat16"):
        raise ValueError(f"unknown weight_dtype {weight_dtype!r}; use 'auto', 'bfloat16' or 'float32'")
    possible = compute_dtype == paddle.float32 and paddle.get_device() == "cpu" and bf16_weights_supported()
    if name == "bfloat16" and not possible:
        raise CheckpointError(
            "weight_dtype='bfloat16' needs float32 CPU inference and the package's CPU kernels built with "
            "AVX-512 (AVX512BW), which this machine or run lacks; use weight_dtype='float32'"
        )
    return possible


def build_and_load(build, path: str, prefix: str = "", dtype=None, progress: bool = True,
                   weight_dtype=None, map_weights: bool = True) -> paddle.nn.Layer:
    """Construct a model with ``build()`` in the compute dtype without allocating its parameters, stream
    its weights in, and return it in eval mode. ``weight_dtype``: None or "float32" keeps every parameter
    in the compute dtype (what training needs); "auto" or "bfloat16" keeps the ``Linear`` matrices and the
    token embedding table of a bf16 checkpoint as stored for float32 CPU inference, mapped from the shards
    unless ``map_weights`` is False (see the module docstring)."""
    compute_dtype = resolve_dtype(dtype)
    # LazyGuard: parameters get their memory while loading, so nothing is zero-filled first.
    with zero_init(compute_dtype), paddle.LazyGuard():
        model = build()
    keep = bf16_storage_names(model) if _keeps_bf16(weight_dtype, compute_dtype) else ()
    load_weights(model, path, prefix=prefix, progress=progress, keep_bf16=keep, map_weights=map_weights)
    model.eval()
    return model
