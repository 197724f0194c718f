"""Stage 1 of the demo recipe: pretrain the vision tower alone on the synthetic images.

DeepSeek-VL2 starts from a SigLIP tower that was pretrained on its own, with a pooling head that the
vision-language model then drops (``ignore_head=True``). The demo follows the same plan at its scale:
the randomly initialised ViT learns to see the shapes first, with a head that is thrown away, and only
then does the whole model train on the questions.

Why the stage is there (measured, README.md): trained from random initialisation on the questions
alone, the model never learnt what shape it was looking at. The answer to a shape question is read
through attention spread over all 145 image tokens, most of them white background, so the few edge
and corner patches that tell a triangle from a square reach the tower only as a faint average. A
classifier on the tower's patch features showed the same: averaged over the patches it was still
near chance (0.45) after 350 steps of 16 images; taking the maximum over the patches instead, 0.85
after 275 steps.

The head has two throw-away linear layers on the patch features:

* presence: one score per label for every patch, an image's score the highest over its patches
  (multiple-instance learning). The labels are the presence of each (colour, shape) pair, of each
  shape and of each colour in the image: a patch can only score high for "red triangle" if it carries
  both what it is and what it belongs to.
* box: every patch whose centre lies in a shape's box regresses that box in the grounding answer's
  0..999 coordinates of the original image (divided by 999), so the features also say where the
  object's edges are, which the grounding answers need to sub-patch precision. Boxes of different
  shapes never overlap (``shapes.PLACEMENT_MARGIN_PX``), so every patch has at most one target.

The language model cannot read what the tower learns here until it has learnt to look, and its early
gradients wiped this stage out when the tower trained on (a presence probe fell from 0.93 to 0.37 in
600 steps), so stage 2 keeps the tower frozen (``train_demo``).
"""
from __future__ import annotations

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
from .shapes import COLORS, SHAPE_KINDS, Shape, draw_scene

__all__ = [
    "PRESENCE_LABELS",
    "BOX_LOSS_WEIGHT",
    "presence_labels",
    "patch_boxes",
    "SceneImages",
    "PresenceHead",
    "collate",
    "presence_loss",
    "pretrain_vision",
]

logger = logging.getLogger(__name__)

# (colour, shape) pairs, then the shapes, then the colours.
PRESENCE_LABELS: Tuple[str, ...] = (
    tuple(f"{color} {kind}" for color in COLORS for kind in SHAPE_KINDS) + SHAPE_KINDS + tuple(COLORS)
)

# The box error is on a 0..1 scale; the weight puts it on the scale of the presence loss at its start.
BOX_LOSS_WEIGHT = 4.0


def presence_labels(shapes: Sequence[Shape]) -> np.ndarray:
    """float32 [len(PRESENCE_LABELS)]: 1 for every pair, shape and colour present in the scene."""
    present = set()
    for shape in shapes:
        present.update((f"{shape.color} {shape.shape}", shape.shape, shape.color))
    return np.array([label in present for label in PRESENCE_LABELS], dtype=np.float32)


def patch_boxes(
    shapes: Sequence[Shape], width: int, height: int, image_size: int, patch_size: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Box targets of the patches of the global view of a ``width`` x ``height`` scene.

    The global view is the image resized to fit ``image_size``² and centred on padding
    (``ImageOps.pad``); a patch takes the box of the shape whose box holds the original-image point under
    the patch centre.

    Returns:
        boxes: float32 [P, 4] (P = (image_size // patch_size)², row-major), ``box_from_pixels / 999`` of
            the patch's shape, zeros elsewhere;
        on_shape: float32 [P], 1 where the patch has a box.
    """
    grid = image_size // patch_size
    scale = image_size / max(width, height)
    shown_w, shown_h = round(width * scale), round(height * scale)
    left, top = round((image_size - shown_w) / 2), round((image_size - shown_h) / 2)
    centres = (np.arange(grid) + 0.5) * patch_size  # [g]
    x = (centres - left) * width / shown_w  # [g] original-image columns under the patch centres
    y = (centres - top) * height / shown_h  # [g] rows
    boxes = np.zeros((grid, grid, 4), dtype=np.float32)
    on_shape = np.zeros((grid, grid), dtype=np.float32)
    for shape in shapes:
        x1, y1, x2, y2 = shape.box_px
        inside = ((y >= y1) & (y < y2))[:, None] & ((x >= x1) & (x < x2))[None, :]  # [g, g]
        boxes[inside] = np.asarray(box_from_pixels(shape.box_px, width, height), dtype=np.float32) / COORDINATE_MAX
        on_shape[inside] = 1.0
    return boxes.reshape(-1, 4), on_shape.reshape(-1)


class SceneImages:
    """``n`` random scenes drawn on demand: item ``i`` is ``(global view [3, S, S], labels [L],
    boxes [P, 4], on_shape [P])`` (``presence_labels``, ``patch_boxes``).

    Item ``i`` is drawn from its own generator seeded with ``(seed, i)``, so the data set is the same
    in any order (the trainer's shuffling and resume rely on that) and is never written to disk. The
    view is the processor's global view (``ImageTransform.tiles``), so the tower sees exactly what it
    sees in the model.
    """

    def __init__(self, n: int, seed: int, transform: ImageTransform, image_size: int, patch_size: int):
        if n < 1:
            raise ValueError(f"the vision pretraining set needs at least one image, got {n}")
        self.n = n
        self.seed = seed
        self.transform = transform
        self.image_size = image_size
        self.patch_size = patch_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        image, shapes = draw_scene(random.Random(f"{self.seed}-{index}"))
        global_view = self.transform.tiles(image, (1, 1), self.image_size)[0]  # [3, S, S]
        boxes, on_shape = patch_boxes(shapes, image.width, image.height, self.image_size, self.patch_size)
        return global_view, presence_labels(shapes), boxes, on_shape


def collate(items: List[Tuple[np.ndarray, ...]]) -> Dict[str, paddle.Tensor]:
    """Items -> ``{"pixels": [B, 3, S, S], "labels": [B, L], "boxes": [B, P, 4], "on_shape": [B, P]}``."""
    columns = (np.stack(column) for column in zip(*items))
    return {name: paddle.to_tensor(column) for name, column in zip(("pixels", "labels", "boxes", "on_shape"), columns)}


class PresenceHead(nn.Layer):
    """The tower with its throw-away head: ``[B, 3, S, S] -> ([B, L], [B, P, 4])``, the label logits
    (each the maximum over the patches of a linear score of the patch features) and every patch's box.

    ``vision`` is the model's own tower (not a copy): training this layer trains the model's ViT.
    """

    def __init__(self, vision: VisionTransformer, num_labels: int = len(PRESENCE_LABELS)):
        super().__init__()
        self.vision = vision
        self.score = nn.Linear(vision.config.width, num_labels)
        self.locate = nn.Linear(vision.config.width, 4)

    def forward(self, pixels: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        features = self.vision(pixels)  # [B, P, C]
        return self.score(features).max(axis=1), self.locate(features)  # [B, L], [B, P, 4]


def presence_loss(model: PresenceHead, batch: Dict[str, paddle.Tensor]) -> paddle.Tensor:
    """A ``Trainer`` loss function: mean binary cross-entropy of the label logits plus
    ``BOX_LOSS_WEIGHT`` x the mean absolute box error over the patches that lie in a shape's box."""
    logits, boxes = model(batch["pixels"])
    on_shape = batch["on_shape"].unsqueeze(-1)  # [B, P, 1]
    box_error = ((boxes - batch["boxes"]).abs() * on_shape).sum() / paddle.clip(on_shape.sum() * 4, min=1.0)
    return F.binary_cross_entropy_with_logits(logits, batch["labels"]) + BOX_LOSS_WEIGHT * box_error


def pretrain_vision(
    model: DeepseekVLV2ForCausalLM,
    transform: ImageTransform,
    n_images: int,
    seed: int,
    config: TrainingConfig,
    resume: bool = False,
) -> List[Dict[str, float]]:
    """Train ``model.vision`` in place on ``n_images`` scenes with the presence head (``config`` sets the
    loop; its ``output_dir`` holds the stage's checkpoints, ``resume`` continues from the newest).
    Returns the trainer's history."""
    head = PresenceHead(model.vision)
    vision = model.config.vision_config
    images = SceneImages(n_images, seed, transform, vision.image_size, vision.patch_size)
    trainer = Trainer(head, images, collate, config, loss_fn=presence_loss)
    logger.info("vision pretraining: %d scenes, %d steps", n_images, trainer.total_steps)
    return trainer.train(resume_from_checkpoint="latest" if resume and latest_checkpoint(config.output_dir) else None)
