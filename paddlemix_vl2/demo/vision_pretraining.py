"""Stage 1 of the demo recipe: pretrain the vision tower alone on the synthetic images.

DeepSeek-VL2 starts from a SigLIP tower that was pretrained on its own, with a pooling head that the
vision-language model then drops (``ignore_head=True``). The demo follows the same plan at its scale:
the randomly initialised ViT learns to see the shapes first, with a head that is thrown away, and only
then do the projector and the language model train on the questions, the tower frozen.

Why the stage is there (measured, README.md): trained from random initialisation on the questions
alone, the model never learnt what shape it was looking at. The answer to a shape question is read
through attention spread over all 145 image tokens, most of them white background, so the few edge
and corner patches that tell a triangle from a square reach the tower only as a faint average. A
classifier on the tower's patch features showed the same: averaged over the patches it was still
near chance (0.45) after 350 steps of 16 images; taking the maximum over the patches instead, 0.85
after 275 steps.

The head here is that maximum: one linear layer scores every patch for each label, and an image's
score is the highest over its patches (multiple-instance learning). The labels are the presence of
each (colour, shape) pair, of each shape and of each colour in the image: a patch can only score high
for "red triangle" if it carries both what it is and what it belongs to.

Stage 2 keeps the tower frozen: the untrained language model's early gradients wiped this stage out
when the tower trained on (with the head of this stage, shape accuracy on one-shape images fell from
0.93 to 0.37 within 600 steps). A second head regressing every patch's box, tried alongside, cut the
shape accuracy this stage reaches to 0.68 for a mean box error of 46 (0..999), so it is not used.
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
from ..models.deepseek_vl2 import DeepseekVLV2ForCausalLM
from ..models.deepseek_vl2.siglip_vit import VisionTransformer
from ..processors.image_processing import ImageTransform
from .shapes import COLORS, SHAPE_KINDS, Shape, draw_scene

__all__ = [
    "PRESENCE_LABELS",
    "presence_labels",
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


def presence_labels(shapes: Sequence[Shape]) -> np.ndarray:
    """float32 [len(PRESENCE_LABELS)]: 1 for every pair, shape and colour present in the scene."""
    present = set()
    for shape in shapes:
        present.update((f"{shape.color} {shape.shape}", shape.shape, shape.color))
    return np.array([label in present for label in PRESENCE_LABELS], dtype=np.float32)


class SceneImages:
    """``n`` random scenes drawn on demand: item ``i`` is ``(global view [3, S, S], labels [L])``.

    Item ``i`` is drawn from its own generator seeded with ``(seed, i)``, so the data set is the same
    in any order (the trainer's shuffling and resume rely on that) and is never written to disk. The
    view is the processor's global view (``ImageTransform.tiles``), so the tower sees exactly what it
    sees in the model.
    """

    def __init__(self, n: int, seed: int, transform: ImageTransform, image_size: int):
        if n < 1:
            raise ValueError(f"the vision pretraining set needs at least one image, got {n}")
        self.n = n
        self.seed = seed
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        image, shapes = draw_scene(random.Random(f"{self.seed}-{index}"))
        global_view = self.transform.tiles(image, (1, 1), self.image_size)[0]  # [3, S, S]
        return global_view, presence_labels(shapes)


def collate(items: List[Tuple[np.ndarray, np.ndarray]]) -> Dict[str, paddle.Tensor]:
    """Items -> ``{"pixels": [B, 3, S, S], "labels": [B, L]}``."""
    pixels, labels = zip(*items)
    return {"pixels": paddle.to_tensor(np.stack(pixels)), "labels": paddle.to_tensor(np.stack(labels))}


class PresenceHead(nn.Layer):
    """The tower with its throw-away head: ``[B, 3, S, S] -> [B, L]`` label logits, each the maximum
    over the patches of a linear score of the patch features.

    ``vision`` is the model's own tower (not a copy): training this layer trains the model's ViT. The
    scoring layer starts from ``seed`` (Xavier-uniform weights, zero bias), not from Paddle's global
    generator, which nothing seeds in the spawned processes of a ``--nproc`` run (two such runs trained
    different towers).
    """

    def __init__(self, vision: VisionTransformer, seed: int, num_labels: int = len(PRESENCE_LABELS)):
        super().__init__()
        self.vision = vision
        width = vision.config.width
        limit = np.sqrt(6.0 / (width + num_labels))
        weight = np.random.default_rng(seed).uniform(-limit, limit, size=(width, num_labels)).astype(np.float32)
        self.score = nn.Linear(
            width, num_labels,
            weight_attr=paddle.ParamAttr(initializer=nn.initializer.Assign(weight)),
            bias_attr=paddle.ParamAttr(initializer=nn.initializer.Constant(0.0)),
        )

    def forward(self, pixels: paddle.Tensor) -> paddle.Tensor:
        patch_scores = self.score(self.vision(pixels))  # [B, P, L]
        return patch_scores.max(axis=1)  # [B, L]


def presence_loss(model: PresenceHead, batch: Dict[str, paddle.Tensor]) -> paddle.Tensor:
    """A ``Trainer`` loss function: mean binary cross-entropy of the label logits."""
    return F.binary_cross_entropy_with_logits(model(batch["pixels"]), batch["labels"])


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
    head = PresenceHead(model.vision, seed)
    images = SceneImages(n_images, seed, transform, model.config.vision_config.image_size)
    trainer = Trainer(head, images, collate, config, loss_fn=presence_loss)
    logger.info("vision pretraining: %d scenes, %d steps", n_images, trainer.total_steps)
    return trainer.train(resume_from_checkpoint="latest" if resume and latest_checkpoint(config.output_dir) else None)
