"""What the fine-tuner writes to disk: folders that appear whole or not at all, and named tensors.

``atomic_directory(path)`` hands out a hidden staging folder beside ``path`` and renames it to ``path``
only when the block finishes; an exception (or a killed process) leaves any previous ``path`` as it was.
Tensors are stored with safetensors under their structured names, never pickled.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Dict, Iterator

import paddle
from safetensors import safe_open
from safetensors.paddle import save_file

__all__ = ["StateFileError", "STAGING_PREFIX", "atomic_directory", "save_named_tensors", "load_named_tensors"]

# Staging folders start with this; ``latest_checkpoint`` and users can tell them from finished ones.
STAGING_PREFIX = ".staging-"


class StateFileError(ValueError):
    """A saved file that does not fit the model it is loaded into; the message names the tensors."""


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yield a staging folder; on success it replaces ``path`` in one rename.

    An existing ``path`` is first moved into a ``.staging-<name>.old.*`` folder and deleted after the
    rename; only a crash between those two renames leaves the old contents there instead of at ``path``.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.path.basename(path)}.", dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(path):
        retired = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.path.basename(path)}.old.", dir=parent)
        os.replace(path, os.path.join(retired, "previous"))
        os.replace(staging, path)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, path)


def save_named_tensors(tensors: Dict[str, paddle.Tensor], path: str) -> None:
    """Write ``{name: tensor}`` to one safetensors file, each tensor in its own dtype.

    The header says format "np", the only one PaddleNLP's loader accepts (adapters stay loadable there).
    """
    save_file({name: t.detach().contiguous() for name, t in tensors.items()}, path, metadata={"format": "np"})


def load_named_tensors(targets: Dict[str, paddle.Tensor], path: str, what: str) -> None:
    """Copy every tensor of the safetensors file ``path`` into the same-named tensor of ``targets``.

    The names must match exactly and the shapes too; values are cast to each target's dtype.
    ``what`` names the kind of tensors in error messages ("adapter", "trainable", ...).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; the saved folder is incomplete")
    with safe_open(path, framework="paddle") as f:
        names = set(f.keys())
        missing = sorted(set(targets) - names)
        unexpected = sorted(names - set(targets))
        if missing or unexpected:
            raise StateFileError(
                f"{path} does not fit the model: missing {len(missing)} {what} tensor(s) {missing[:5]}, "
                f"unexpected {len(unexpected)} {unexpected[:5]}; was it saved with the same model and settings?"
            )
        for name, target in targets.items():
            tensor = f.get_tensor(name)
            if list(tensor.shape) != list(target.shape):
                raise StateFileError(
                    f"{path}: {name} has shape {list(tensor.shape)}, the model expects {list(target.shape)}"
                )
            target.set_value(tensor.astype(target.dtype))
