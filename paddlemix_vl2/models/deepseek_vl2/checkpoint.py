"""Read and write official DeepSeek-VL2 checkpoints (Hugging Face layout, torch orientation).

A checkpoint folder holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Loading streams one tensor at a time from lazily opened (mmap'd)
shards straight into the model's parameters, so peak memory is the model plus one tensor.

Module attribute names equal checkpoint names, so the only rules are:
* a key prefix selects a subtree (``language.`` for the text-only model);
* the 2-D ``weight`` of every ``nn.Linear`` is stored ``[out, in]`` by torch and ``[in, out]`` by Paddle,
  so it is transposed on the way in and out;
* tensors the official model creates but never uses (``SKIPPED_KEYS``) are skipped on purpose.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import paddle
from safetensors import safe_open
from safetensors.paddle import save_file

__all__ = [
    "CheckpointError",
    "SKIPPED_KEYS",
    "resolve_dtype",
    "checkpoint_weight_map",
    "load_weights",
    "save_weights",
    "zero_init",
    "build_and_load",
]

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# NOTE(port): the official SigLIP tower builds an attention-pooling head that VL2 never calls
# (ignore_head=True); its tensors are in every checkpoint and are skipped here.
SKIPPED_KEYS = (re.compile(r"^vision\.attn_pool\."),)

_DTYPES = {
    "float32": paddle.float32, "fp32": paddle.float32,
    "bfloat16": paddle.bfloat16, "bf16": paddle.bfloat16,
    "float16": paddle.float16, "fp16": paddle.float16,
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read as asked; the message names the file or keys and the fix."""


def resolve_dtype(dtype=None) -> paddle.dtype:
    """The compute dtype: float32 on CPU, bfloat16 on GPU unless asked otherwise.

    Paddle has no bf16/fp16 compute kernels on CPU, so a half dtype requested on CPU falls back to
    float32 with one notice.
    """
    on_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.get_device().startswith("gpu")
    if dtype is None:
        return paddle.bfloat16 if on_gpu else paddle.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = _DTYPES[dtype.lower()]
    if dtype in (paddle.bfloat16, paddle.float16) and not on_gpu:
        logger.warning(
            "%s was requested but Paddle has no %s compute on CPU; computing in float32 instead",
            str(dtype).replace("paddle.", ""), str(dtype).replace("paddle.", ""),
        )
        return paddle.float32
    return dtype


def checkpoint_weight_map(path: str) -> Dict[str, str]:
    """Map every tensor name to the shard file that holds it (absolute paths)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder; pass the checkpoint folder that holds config.json")
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-download it") from None
        files = {name: os.path.join(path, shard) for name, shard in weight_map.items()}
    elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
        single = os.path.join(path, SINGLE_FILE)
        with _open_shard(single) as f:
            files = {name: single for name in f.keys()}
    else:
        raise CheckpointError(f"{path} has neither {INDEX_FILE} nor {SINGLE_FILE}; is it a DeepSeek-VL2 checkpoint?")
    missing_shards = sorted({p for p in files.values() if not os.path.isfile(p)})
    if missing_shards:
        raise CheckpointError(
            f"missing shard file(s) {', '.join(os.path.basename(p) for p in missing_shards)} in {path}; "
            "download every file listed in the index"
        )
    return files


@contextlib.contextmanager
def _open_shard(file: str):
    try:
        handle = safe_open(file, framework="paddle")
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
        raise CheckpointError(f"{file} is truncated or not a safetensors file ({e}); re-download it") from None
    with handle as f:
        yield f


def _linear_weight_names(layer: paddle.nn.Layer) -> Set[str]:
    return {
        f"{name}.weight" if name else "weight"
        for name, sub in layer.named_sublayers(include_self=True)
        if isinstance(sub, paddle.nn.Linear)
    }


def _to_param_layout(tensor: paddle.Tensor, transpose: bool, dtype) -> paddle.Tensor:
    if transpose:
        tensor = tensor.transpose([1, 0])  # torch [out, in] -> paddle [in, out]; a cheap bf16 copy
    return tensor.astype(dtype) if tensor.dtype != dtype else tensor


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
) -> List[str]:
    """Stream the tensors under ``prefix`` from the checkpoint at ``path`` into ``layer``.

    Each tensor is read lazily from its shard, transposed if it is a Linear weight, cast to the
    parameter's dtype and copied in place. Missing keys, unexpected keys and shape mismatches are
    collected and raised together as one ``CheckpointError``.

    Returns:
        the checkpoint names that were loaded.
    """
    files = checkpoint_weight_map(path)
    params = dict(layer.named_parameters())
    params.update({n: b for n, b in layer.named_buffers() if n in layer.state_dict()})
    transposed = _linear_weight_names(layer)

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
    for file in sorted(wanted):
        with _open_shard(file) as f:
            for ckpt_name in wanted[file]:
                name = ckpt_name[len(prefix):]
                param = params[name]
                try:
                    shape = list(f.get_slice(ckpt_name).get_shape())
                except Exception as e:
                    raise CheckpointError(f"{file}: cannot read {ckpt_name} ({e}); the file is corrupt, re-download it") from None
                transpose = name in transposed and len(shape) == 2
                expected = list(param.shape)[::-1] if transpose else list(param.shape)
                if shape != expected:
                    mismatched.append(f"{ckpt_name}: checkpoint {shape} vs model {expected}")
                    continue
                try:
                    tensor = f.get_tensor(ckpt_name)
                except Exception as e:
                    raise CheckpointError(f"{file}: cannot read {ckpt_name} ({e}); the file is truncated, re-download it") from None
                param.set_value(_to_param_layout(tensor, transpose, param.dtype))
                loaded.append(ckpt_name)
                bar.step()

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
    transposed = _linear_weight_names(layer)
    for name, tensor in layer.state_dict().items():
        if name in transposed and tensor.ndim == 2:
            tensor = tensor.transpose([1, 0])
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
    end, so an interrupted save never leaves a half-written checkpoint. ``extra_files`` maps file names
    to text contents (config.json, processor_config.json, ...) written in the same step.
    """
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", dir=parent)
    try:
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
        if os.path.isdir(directory):
            backup = directory + ".old"
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(directory, backup)
            os.replace(staging, directory)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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


def build_and_load(build, path: str, prefix: str = "", dtype=None, progress: bool = True) -> paddle.nn.Layer:
    """Construct a model with ``build()`` under ``zero_init`` in the compute dtype, stream its weights in,
    and return it in eval mode."""
    compute_dtype = resolve_dtype(dtype)
    with zero_init(compute_dtype):
        model = build()
    load_weights(model, path, prefix=prefix, progress=progress)
    model.eval()
    return model
