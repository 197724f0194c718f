"""The training loss: mean next-token cross-entropy over the labelled positions.

NOTE(port): computed here from the logits instead of taken from the model's returned ``loss``:
``causal_lm_loss`` in ``modeling_deepseek.py`` uses ``F.cross_entropy(..., ignore_index=-100,
reduction="mean")``, which in Paddle 3.3 divides by *every* position, ignored ones included (torch
divides by the labelled ones). On the training golden that gives 0.612 instead of 11.816. Once the model
divides by the labelled count, this function and the model's loss agree and the trainer can use either.
"""
from __future__ import annotations

from typing import Dict

import paddle
import paddle.nn.functional as F
from paddle import nn

__all__ = ["IGNORE_INDEX", "shifted_cross_entropy", "causal_lm_training_loss"]

IGNORE_INDEX = -100


def shifted_cross_entropy(logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
    """Mean cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]`` over labels != -100.

    logits: [B, T, V] float32; labels: [B, T] int64. Returns a scalar (0 when nothing is labelled).
    """
    vocab = logits.shape[-1]
    targets = labels[:, 1:].reshape([-1])
    per_token = F.cross_entropy(
        logits[:, :-1].reshape([-1, vocab]), targets, ignore_index=IGNORE_INDEX, reduction="none"
    ).reshape([-1])  # [B*(T-1)], 0 at ignored positions
    count = (targets != IGNORE_INDEX).astype(per_token.dtype).sum()
    return per_token.sum() / paddle.clip(count, min=1.0)


def causal_lm_training_loss(model: nn.Layer, batch: Dict[str, paddle.Tensor]) -> paddle.Tensor:
    """Forward ``batch`` (with ``labels``) through ``model`` and return the scalar training loss.

    In train mode the MoE layers add their aux loss to the gradients, not to this value.
    """
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    return shifted_cross_entropy(model(**inputs).logits, batch["labels"])
