"""Training checkpoints: everything needed to continue a run exactly, written atomically.

``<output_dir>/checkpoint-<step>/`` holds

* the trainable weights: ``peft_model.safetensors`` + ``lora_config.json`` for LoRA (so a checkpoint is
  also an adapter folder), else ``trainable.safetensors``; frozen weights are not repeated, they come
  from the base checkpoint;
* ``optimizer.safetensors``: AdamW's moments, step counts and (bf16 runs) float32 master weights, keyed
  by the parameter's structured name (``optim.AdamW``);
* ``trainer_state.json``: the step, the loss history and the training settings.

Data order and dropout depend only on (seed, step) (see ``trainer.py``), so the step is all the
position there is to restore. A checkpoint folder appears by one rename; an interrupted save leaves
the previous checkpoints untouched and no half-written ``checkpoint-*`` folder.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import paddle
from paddle import nn

from ..json_files import read_json_object
from .files import (
    STAGING_PREFIX, StateFileError, atomic_directory, load_named_tensors, open_tensor_file, save_named_tensors,
)
from .lora import ADAPTER_WEIGHTS_FILE, LoRAConfig, adapter_state_dict, write_adapter_files
from .optim import AdamW

__all__ = [
    "CHECKPOINT_PREFIX",
    "TRAINER_STATE_FILE",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "remove_old_checkpoints",
    "remove_all_checkpoints",
]

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"

NamedParams = List[Tuple[str, paddle.Tensor]]


def _read_tensors(path: str) -> Dict[str, paddle.Tensor]:
    with open_tensor_file(path) as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def save_checkpoint(
    directory: str,
    model: nn.Layer,
    optimizer: AdamW,
    params: NamedParams,
    trainer_state: Dict[str, Any],
    lora_config: Optional[LoRAConfig] = None,
) -> None:
    """Write one checkpoint folder atomically (see the module docstring for its files)."""
    with atomic_directory(directory) as staging:
        if lora_config is not None:
            write_adapter_files(model, lora_config, staging)
        else:
            save_named_tensors(dict(params), os.path.join(staging, TRAINABLE_FILE))
        save_named_tensors(optimizer.state_dict(), os.path.join(staging, OPTIMIZER_FILE))
        with open(os.path.join(staging, TRAINER_STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(trainer_state, f, indent=1)


def load_checkpoint(
    directory: str, model: nn.Layer, optimizer: AdamW, params: NamedParams, lora: bool
) -> Dict[str, Any]:
    """Restore trainable weights and optimizer state from ``directory``; returns its trainer state."""
    state_file = os.path.join(directory, TRAINER_STATE_FILE)
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"{state_file} not found; --resume_from_checkpoint must be a checkpoint-<step> folder")
    trainer_state = read_json_object(state_file, StateFileError, "resume from another checkpoint")
    if lora:
        load_named_tensors(adapter_state_dict(model), os.path.join(directory, ADAPTER_WEIGHTS_FILE), what="adapter")
    else:
        load_named_tensors(dict(params), os.path.join(directory, TRAINABLE_FILE), what="trainable")
    optimizer.set_state_dict(_read_tensors(os.path.join(directory, OPTIMIZER_FILE)))
    return trainer_state


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """Finished checkpoints ``[(step, path)]`` in ``output_dir``, oldest first (staging folders excluded)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        step = name[len(CHECKPOINT_PREFIX):]
        path = os.path.join(output_dir, name)
        finished = os.path.isfile(os.path.join(path, TRAINER_STATE_FILE))
        if name.startswith(CHECKPOINT_PREFIX) and step.isdigit() and finished:
            found.append((int(step), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The newest finished checkpoint folder in ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_all_checkpoints(output_dir: str) -> None:
    """Delete every finished checkpoint in ``output_dir`` (a fresh run that overwrites an earlier one's)."""
    for _, path in list_checkpoints(output_dir):
        shutil.rmtree(path)


def remove_old_checkpoints(output_dir: str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep <= 0`` keeps all), and stale staging folders."""
    if keep > 0:
        for _, path in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(output_dir):
        if name.startswith(STAGING_PREFIX + CHECKPOINT_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
