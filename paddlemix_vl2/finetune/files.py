"""What the fine-tuner writes to disk: named tensors in folders that appear whole or not at all
(``output_folders.atomic_directory``). Tensors are stored with safetensors under their structured names,
never pickled.
"""
from __future__ import annotations

import os
from typing import Dict

import paddle
from safetensors import SafetensorError, safe_open
from safetensors.paddle import save_file

from ..output_folders import STAGING_PREFIX, atomic_directory

__all__ = [
    "StateFileError", "STAGING_PREFIX", "atomic_directory", "open_tensor_file", "save_named_tensors", "load_named_tensors",
]


class StateFileError(ValueError):
    """A saved file that does not fit the model it is loaded into; the message names the tensors."""


def open_tensor_file(path: str):
    """``safe_open(path)`` for Paddle, with a one-line ``StateFileError`` for a missing, truncated or corrupt
    file instead of safetensors' own error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; the saved folder is incomplete")
    try:
        return safe_open(path, framework="paddle")
    except SafetensorError as err:
        raise StateFileError(
            f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt: save it again "
            "or use another checkpoint"
        ) from None


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
    with open_tensor_file(path) as f:
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
