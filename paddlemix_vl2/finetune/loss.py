"""The training loss: the model's mean next-token cross-entropy over the labelled positions."""
from __future__ import annotations

from typing import Dict

import paddle
from paddle import nn

__all__ = ["causal_lm_training_loss"]


def causal_lm_training_loss(model: nn.Layer, batch: Dict[str, paddle.Tensor]) -> paddle.Tensor:
    """Forward ``batch`` (with ``labels``) through ``model`` and return the scalar training loss.

    In train mode the MoE layers add their aux loss to the gradients, not to this value.
    """
    return model(**batch).loss
