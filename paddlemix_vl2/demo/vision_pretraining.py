"""Stage 1 of the demo recipe: pretrain the vision tower alone on the synthetic images.

DeepSeek-VL2 starts from a SigLIP tower that was pretrained on its own, with a pooling head that the
vision-language model then drops (``ignore_head=True``). The demo follows the same plan at its scale:
the randomly initialised ViT learns to see the shapes first, with heads that are thrown away, and only
then do the projector and the language model train on the questions, the tower frozen.

Why the stage is there (measured, README.md): trained from random initialisation on the questions
alone, the model never learnt what shape it was looking at. The answer to a shape question is read
through attention spread over all 145 image tokens, most of them white background, so the few edge
and corner patches that tell a triangle from a square reach the tower only as a faint average. A
classifier on the tower's patch features showed the same: averaged over the patches it was still near
chance (0.45) after 350 steps of 16 images; taking the maximum over the patches instead, 0.85 after 275.

The heads, all linear on the tower's patch features (the recipe weights the box and count heads zero; see
the end):

* **presence**: every patch is scored for each label, and an image's score is the highest over its
  patches (multiple-instance learning). The labels are the presence of each (colour, shape) pair, of
  each shape and of each colour: a patch can only score high for "red triangle" if it carries both what
  it is and what it belongs to;
* **box**, on the patches whose centre lies in a shape's bounding box: the hundreds digit of each of
  that box's four 0..999 grounding coordinates (classes) and the four coordinates themselves (L1 on a
  sigmoid). Without it the maximum above is translation-invariant, nothing asks the tower to keep where
  a shape is, and the language model's boxes stayed at chance (worse than a constant box); with it, 424
  steps of grounding questions taught the language model to read the box off the shape's tokens
  (correlation 0.95 with the truth, README.md);
* **count**, on every patch: how many shapes the image holds, so the answer sits in every token.

The whole command with box and count heads (weights 0.3, 2.0, 0.1) grounded one-shape scenes far better
than the shipped model but named colours and shapes worse and still picked the wrong shape among several
(README.md), so ``DemoTrainingSettings`` keeps them at zero: the shipped model's recipe, reproduced bit
for bit.

Stage 2 keeps the tower frozen: the untrained language model's early gradients wiped this stage out
when the tower trained on (with the presence head alone, shape accuracy on one-shape images fell from
0.93 to 0.37 within 600 steps).
"""
from __future__ import annotations

import functools
import logging
import random
from typing import Dict, List, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from ..finetune import Trainer, TrainingConfig, latest_checkpoint
from ..grounding import COORDINATE_MAX, box_from_pixels
from ..models.deepseek_vl2 import DeepseekVLV2ForCausalLM
from ..models.deepseek_vl2.siglip_vit import VisionTransformer
from ..processors.image_processing import ImageTransform
from .shapes import COLORS, SHAPE_COUNT_RANGE, SHAPE_KINDS, Shape, draw_scene

__all__ = [
    "PRESENCE_LABELS",
    "presence_labels",
    "letterbox",
    "patch_centres",
    "patch_targets",
    "SceneImages",
    "PretrainingHeads",
    "collate",
    "pretraining_loss",
    "pretrain_vision",
]

logger = logging.getLogger(__name__)

# (colour, shape) pairs, then the shapes, then the colours.
PRESENCE_LABELS: Tuple[str, ...] = (
    tuple(f"{color} {kind}" for color in COLORS for kind in SHAPE_KINDS) + SHAPE_KINDS + tuple(COLORS)
)


NO_BOX = -1
NUM_COUNTS = SHAPE_COUNT_RANGE[1] - SHAPE_COUNT_RANGE[0] + 1
# Dense head outputs per patch: hundreds-digit logits of x1, y1, x2, y2, their regression logits, count logits.
DIGIT_COLUMNS, BOX_COLUMNS = 4 * 10, 4
DENSE_OUTPUTS = DIGIT_COLUMNS + BOX_COLUMNS + NUM_COUNTS


def presence_labels(shapes: Sequence[Shape]) -> np.ndarray:
    """float32 [len(PRESENCE_LABELS)]: 1 for every pair, shape and colour present in the scene."""
    present = set()
    for shape in shapes:
        present.update((f"{shape.color} {shape.shape}", shape.shape, shape.color))
    return np.array([label in present for label in PRESENCE_LABELS], dtype=np.float32)


def letterbox(image_size: Tuple[int, int], view: int) -> Tuple[float, float, float]:
    """``(scale, left, top)`` of an image of ``(width, height)`` resized into ``view`` x ``view`` pixels with
    centred letterboxing (``ImageOps.pad``): view pixel = image pixel * scale + (left, top)."""
    width, height = image_size
    scale = min(view / width, view / height)
    return scale, (view - round(width * scale)) / 2, (view - round(height * scale)) / 2


def patch_centres(image_size: Tuple[int, int], view: int, grid: int) -> Tuple[np.ndarray, np.ndarray]:
    """Image-pixel ``(x, y)`` [grid, grid] of the centres of the view's ``grid`` x ``grid`` patches."""
    scale, left, top = letterbox(image_size, view)
    centres = (np.arange(grid) + 0.5) * view / grid
    return (np.broadcast_to((centres[None, :] - left) / scale, (grid, grid)),
            np.broadcast_to((centres[:, None] - top) / scale, (grid, grid)))


def patch_targets(image_size: Tuple[int, int], shapes: Sequence[Shape], view: int, grid: int) -> np.ndarray:
    """int64 [grid * grid, 5] for the patches of the padded global view, row-major: the 0..999 grounding box
    ``(x1, y1, x2, y2)`` of the shape whose bounding box holds the patch centre (the nearest box centre
    wins; ``NO_BOX`` in all four where there is none), then the image's shape count minus one.

    ``image_size`` is the image's ``(width, height)``; the view is the image resized into ``view`` x ``view``
    pixels with centred letterboxing (``ImageOps.pad``), so a patch centre maps back to image pixels.
    """
    width, height = image_size
    xs, ys = patch_centres(image_size, view, grid)
    targets = np.full((grid, grid, 5), NO_BOX, dtype=np.int64)
    nearest = np.full((grid, grid), np.inf)
    for shape in shapes:
        x1, y1, x2, y2 = shape.box_px
        distance = np.hypot(xs - (x1 + x2) / 2, ys - (y1 + y2) / 2)
        take = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2) & (distance < nearest)
        nearest = np.where(take, distance, nearest)
        targets[take, :4] = box_from_pixels(shape.box_px, width, height)
    targets[..., 4] = len(shapes) - SHAPE_COUNT_RANGE[0]
    return targets.reshape(grid * grid, 5)


class SceneImages:
    """``n`` random scenes drawn on demand: item ``i`` is ``(global view [3, S, S], labels [L], patch targets
    [P, 5])`` (``patch_targets`` for the tower's ``grid`` x ``grid`` patches).

    Item ``i`` is drawn from its own generator seeded with ``(seed, i)``, so the data set is the same
    in any order (the trainer's shuffling and resume rely on that) and is never written to disk. The
    view is the processor's global view (``ImageTransform.tiles``), so the tower sees exactly what it
    sees in the model.
    """

    def __init__(self, n: int, seed: int, transform: ImageTransform, image_size: int, grid: int):
        if n < 1:
            raise ValueError(f"the vision pretraining set needs at least one image, got {n}")
        self.n = n
        self.seed = seed
        self.transform = transform
        self.image_size = image_size
        self.grid = grid

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        image, shapes = draw_scene(random.Random(f"{self.seed}-{index}"))
        global_view = self.transform.tiles(image, (1, 1), self.image_size)[0]  # [3, S, S]
        return global_view, presence_labels(shapes), patch_targets(image.size, shapes, self.image_size, self.grid)


def collate(items: List[Tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Dict[str, paddle.Tensor]:
    """Items -> ``{"pixels": [B, 3, S, S], "labels": [B, L], "patch_targets": [B, P, 5]}``."""
    pixels, labels, targets = zip(*items)
    return {"pixels": paddle.to_tensor(np.stack(pixels)), "labels": paddle.to_tensor(np.stack(labels)),
            "patch_targets": paddle.to_tensor(np.stack(targets))}


def _seeded_linear(rng: np.random.Generator, fan_in: int, fan_out: int) -> nn.Linear:
    """Xavier-uniform weights from ``rng``, zero bias."""
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    weight = rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)
    return nn.Linear(
        fan_in, fan_out,
        weight_attr=paddle.ParamAttr(initializer=nn.initializer.Assign(weight)),
        bias_attr=paddle.ParamAttr(initializer=nn.initializer.Constant(0.0)),
    )


class PretrainingHeads(nn.Layer):
    """The tower with its throw-away heads: ``[B, 3, S, S] -> (presence logits [B, L], dense outputs
    [B, P, DENSE_OUTPUTS])``, the presence logit of a label being the maximum over the patches of a linear
    score of the patch features.

    ``vision`` is the model's own tower (not a copy): training this layer trains the model's ViT. The
    heads start from ``seed`` (Xavier-uniform weights, zero bias), not from Paddle's global generator,
    which nothing seeds in the spawned processes of a ``--nproc`` run (two such runs trained different
    towers).
    """

    def __init__(self, vision: VisionTransformer, seed: int, num_labels: int = len(PRESENCE_LABELS)):
        super().__init__()
        self.vision = vision
        rng = np.random.default_rng(seed)
        self.score = _seeded_linear(rng, vision.config.width, num_labels)
        self.dense = _seeded_linear(rng, vision.config.width, DENSE_OUTPUTS)

    def forward(self, pixels: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        features = self.vision(pixels)  # [B, P, C]
        return self.score(features).max(axis=1), self.dense(features)


def _masked_mean(values: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (0 when nothing is masked in)."""
    return (values * mask).sum() / mask.sum().clip(min=1.0)


def pretraining_loss(model: PretrainingHeads, batch: Dict[str, paddle.Tensor], digit_weight: float,
                     box_weight: float, count_weight: float) -> paddle.Tensor:
    """Presence binary cross-entropy + ``digit_weight`` x hundreds-digit cross-entropy + ``box_weight`` x
    box L1 (in units of the 0..999 range) on the patches inside a box, + ``count_weight`` x count
    cross-entropy on every patch. Bind the weights with ``functools.partial`` for a ``Trainer``."""
    presence, dense = model(batch["pixels"])
    dense = dense.reshape([-1, DENSE_OUTPUTS])
    targets = batch["patch_targets"].reshape([-1, 5])
    box = targets[:, :4]
    inside = (box[:, 0] != NO_BOX).astype(dense.dtype)  # [B*P]
    digit_logits = dense[:, :DIGIT_COLUMNS].reshape([-1, 4, 10])
    hundreds = paddle.where(box == NO_BOX, paddle.zeros_like(box), box // 100)
    digit_loss = F.cross_entropy(digit_logits, hundreds.unsqueeze(-1), reduction="none").reshape([-1, 4]).mean(axis=1)
    box_fraction = F.sigmoid(dense[:, DIGIT_COLUMNS:DIGIT_COLUMNS + BOX_COLUMNS])
    box_error = (box_fraction - box.astype(dense.dtype) / COORDINATE_MAX).abs().mean(axis=1)
    count_loss = F.cross_entropy(dense[:, DIGIT_COLUMNS + BOX_COLUMNS:], targets[:, 4:5])
    return (F.binary_cross_entropy_with_logits(presence, batch["labels"])
            + digit_weight * _masked_mean(digit_loss, inside) + box_weight * _masked_mean(box_error, inside)
            + count_weight * count_loss)


def pretrain_vision(
    model: DeepseekVLV2ForCausalLM,
    transform: ImageTransform,
    n_images: int,
    seed: int,
    config: TrainingConfig,
    loss_weights: Tuple[float, float, float],
    resume: bool = False,
) -> List[Dict[str, float]]:
    """Train ``model.vision`` in place on ``n_images`` scenes with the pretraining heads (``config`` sets the
    loop; its ``output_dir`` holds the stage's checkpoints, ``resume`` continues from the newest;
    ``loss_weights`` are ``pretraining_loss``'s digit, box and count weights). Returns the trainer's history."""
    head = PretrainingHeads(model.vision, seed)
    vision = model.config.vision_config
    images = SceneImages(n_images, seed, transform, vision.image_size, vision.grid_size)
    loss = functools.partial(pretraining_loss, digit_weight=loss_weights[0], box_weight=loss_weights[1],
                             count_weight=loss_weights[2])
    trainer = Trainer(head, images, collate, config, loss_fn=loss)
    logger.info("vision pretraining: %d scenes, %d steps", n_images, trainer.total_steps)
    return trainer.train(resume_from_checkpoint="latest" if resume and latest_checkpoint(config.output_dir) else None)
