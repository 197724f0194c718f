"""Which parts of DeepSeek-VL2 train: the vision tower, the projector, the language model.

The three training stages of DeepSeek-VL2 map onto these switches (full-parameter training):

* projector warm-up: freeze vision and language; the projector, ``image_newline`` and ``view_seperator`` train;
* joint pretraining and SFT: nothing frozen.

With LoRA every base weight is frozen and only the adapters train (``lora.apply_lora``).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import paddle
from paddle import nn

__all__ = ["PART_PREFIXES", "freeze_parts", "trainable_parameters", "count_parameters"]

# Parameter-name prefixes of each part; image_newline and view_seperator are the projector's output tokens.
PART_PREFIXES: Dict[str, Tuple[str, ...]] = {
    "vision": ("vision.",),
    "projector": ("projector.", "image_newline", "view_seperator"),
    "language": ("language.",),
}


def freeze_parts(model: nn.Layer, vision: bool = False, projector: bool = False, language: bool = False) -> None:
    """Freeze the named parts (``stop_gradient=True``) and make every other parameter trainable.

    Raises ValueError when everything would be frozen.
    """
    frozen = tuple(p for part, on in (("vision", vision), ("projector", projector), ("language", language)) if on
                   for p in PART_PREFIXES[part])
    any_trainable = False
    for name, param in model.named_parameters():
        param.stop_gradient = name.startswith(frozen) if frozen else False
        any_trainable |= not param.stop_gradient
    if not any_trainable:
        raise ValueError(
            "every part is frozen, so nothing would train; "
            "drop one of --freeze_vision/--freeze_projector/--freeze_language"
        )


def trainable_parameters(model: nn.Layer) -> List[Tuple[str, paddle.Tensor]]:
    """``[(structured name, parameter)]`` of every parameter that trains, in model order."""
    return [(name, param) for name, param in model.named_parameters() if not param.stop_gradient]


def count_parameters(model: nn.Layer) -> Tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = trainable = 0
    for param in model.parameters():
        n = int(param.numel())
        total += n
        trainable += 0 if param.stop_gradient else n
    return trainable, total
