"""The demo model's training loss: cross-entropy averaged per answer, then over the answers of the batch.

The stack's default loss averages over labelled tokens, so a grounding answer (about 26 tokens) weighs
13 times a one-word answer plus its end-of-sentence token. Early in training nearly all of that weight
sits on box digits the model cannot predict yet, and the shape/colour/count answers were learnt
several times slower in the earlier one-stage runs (measured then, not repeated since). Here every
answer (a maximal run of labelled tokens) has weight 1, spread evenly over its tokens.

Targets whose predicting position is padding are dropped: with left padding the processor's
beginning-of-sentence label sits right after the pad run and would otherwise count as an answer.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

__all__ = ["IGNORE_INDEX", "answer_weights", "per_answer_loss"]

IGNORE_INDEX = -100


def answer_weights(targets: np.ndarray, query_valid: np.ndarray) -> np.ndarray:
    """Per-target weights that sum to 1: ``1 / (tokens in its answer * answers in the batch)``.

    Args:
        targets: [B, T] next-token labels (``labels[:, 1:]``), -100 = not trained.
        query_valid: [B, T] True where the predicting position is a real token (``attention_mask[:, :-1]``).
    Returns:
        [B, T] float32 weights, 0 at untrained targets; all zeros when nothing is labelled.
    """
    valid = (targets != IGNORE_INDEX) & query_valid.astype(bool)
    previous = np.zeros_like(valid)
    previous[:, 1:] = valid[:, :-1]
    starts = valid & ~previous
    n_answers = int(starts.sum())
    if n_answers == 0:
        return np.zeros(targets.shape, dtype=np.float32)
    answer_id = np.cumsum(starts.reshape(-1)).reshape(valid.shape) * valid  # 1.. per answer, 0 elsewhere
    lengths = np.bincount(answer_id.reshape(-1))
    weights = np.where(valid, 1.0 / (lengths[answer_id] * n_answers), 0.0)
    return weights.astype(np.float32)


def per_answer_loss(model: nn.Layer, batch: Dict[str, paddle.Tensor]) -> paddle.Tensor:
    """A ``Trainer`` loss function: forward ``batch`` and return the per-answer mean cross-entropy.

    ``batch`` holds the model's forward arguments plus ``labels`` [B, T] and ``attention_mask`` [B, T].
    """
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    logits = model(**inputs).logits  # [B, T, V] float32
    labels = batch["labels"].numpy()
    targets = labels[:, 1:]
    weights = answer_weights(targets, batch["attention_mask"].numpy()[:, :-1])  # [B, T-1]
    safe_targets = np.where(targets == IGNORE_INDEX, 0, targets)
    per_token = F.cross_entropy(
        logits[:, :-1].reshape([-1, logits.shape[-1]]),
        paddle.to_tensor(safe_targets.reshape(-1)),
        reduction="none",
    ).reshape([-1])  # [B*(T-1)]
    return (per_token * paddle.to_tensor(weights.reshape(-1))).sum()
