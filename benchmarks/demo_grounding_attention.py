"""Where does a demo checkpoint look when it writes a grounding box? Attention from the position that
predicts the box's first digit, per language-model layer, split into the image tokens over the asked shape,
over the other shapes and over the rest of the image.

Each grounding question of ``--images`` fresh scenes is fed with its true answer (teacher forcing); the
attention probabilities are read off the model's own softmax and averaged over the heads. An image token
counts as over a shape when its 48-px cell of the 384-px view overlaps the shape's bounding box (the asked
shape first). The demo's image tokens are the global view's 8 rows of 8 cells and a newline, the view
separator, then the one local tile laid out the same; the local tile is the same letterboxed image.

    .venv/bin/python benchmarks/demo_grounding_attention.py --model_path DIR --images 60
"""
from __future__ import annotations

import argparse
import contextlib
import random
from collections import defaultdict
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import paddle

from paddlemix_vl2.demo import DEFAULT_CHECKPOINT
from paddlemix_vl2.demo.conversations import scene_questions
from paddlemix_vl2.demo.evaluate import load_for_inference
from paddlemix_vl2.demo.shapes import ASSISTANT_ROLE, IMAGE_TAG, USER_ROLE, draw_scene
from paddlemix_vl2.demo.vision_pretraining import letterbox
from paddlemix_vl2.models.deepseek_vl2 import attention as attention_module

REGIONS = ("asked", "other shapes", "rest of image")


@contextlib.contextmanager
def recorded_attention() -> Iterator[List[np.ndarray]]:
    """Records every attention softmax the language model computes, in layer order ([B, nh, T, S] each)."""
    original = attention_module.masked_softmax
    probabilities: List[np.ndarray] = []

    def recording(*args, **kwargs):
        probs = original(*args, **kwargs)
        probabilities.append(probs.numpy())
        return probs

    attention_module.masked_softmax = recording
    try:
        yield probabilities
    finally:
        attention_module.masked_softmax = original


def cell_regions(image_size: Tuple[int, int], asked: Sequence[int], others: Sequence[Sequence[int]], view: int,
                 grid: int) -> np.ndarray:
    """int [grid * grid]: the ``REGIONS`` index of each cell of the letterboxed view, row-major (a cell
    counts as over a box when their overlap has a positive area)."""
    scale, left, top = letterbox(image_size, view)
    cell = view / grid
    starts_x = (np.arange(grid) * cell - left) / scale  # image-pixel edges of the columns and rows
    starts_y = (np.arange(grid) * cell - top) / scale

    def over(box: Sequence[float]) -> np.ndarray:
        x1, y1, x2, y2 = box
        columns = np.minimum(starts_x + cell / scale, x2) > np.maximum(starts_x, x1)
        rows = np.minimum(starts_y + cell / scale, y2) > np.maximum(starts_y, y1)
        return (rows[:, None] & columns[None, :]).ravel()

    regions = np.full(grid * grid, 2)
    for other in others:
        regions[over(other)] = 1
    regions[over(asked)] = 0
    return regions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--seed", type=int, default=20261123)
    args = parser.parse_args()

    model, processor = load_for_inference(args.model_path)
    vision = model.config.vision_config
    grid = vision.grid_size // model.config.projector_config.downsample_ratio
    # Image-token offsets of the cells: each view is `grid` rows of `grid` cells and a newline; the
    # separator sits between the global view and the local tile.
    row_major = (np.arange(grid)[:, None] * (grid + 1) + np.arange(grid)[None, :]).ravel()
    cell_tokens = np.concatenate([row_major, grid * (grid + 1) + 1 + row_major])

    mass = defaultdict(list)  # shapes in the scene -> [questions][layers, len(REGIONS)]
    rng = random.Random(args.seed)
    for _ in range(args.images):
        image, shapes = draw_scene(rng)
        for question in scene_questions(image, shapes):
            if question.kind != "grounding":
                continue
            sample = processor.process_one(
                conversations=[{"role": USER_ROLE, "content": f"{IMAGE_TAG}\n{question.question}"},
                               {"role": ASSISTANT_ROLE, "content": question.answer}],
                images=[image], inference_mode=False)
            batch = processor.batchify([sample])
            ids = batch["input_ids"].numpy()[0].tolist()
            pieces = [processor.decode([token]) for token in ids]
            det = max(i for i, piece in enumerate(pieces) if "<|det|>" in piece)
            query = next(i for i in range(det + 1, len(ids)) if pieces[i].strip().isdigit()) - 1
            image_positions = np.flatnonzero(batch["images_seq_mask"].numpy()[0])
            others = [shape.box_px for shape in shapes if shape.box_px != question.box_px]
            regions = np.tile(cell_regions(image.size, question.box_px, others, vision.image_size, grid), 2)
            with recorded_attention() as probabilities, paddle.no_grad():
                model(**batch)
            per_layer = []
            for probs in probabilities:
                cells = probs[0, :, query][:, image_positions[cell_tokens]].mean(0)  # [2 * grid * grid]
                per_layer.append(np.bincount(regions, weights=cells, minlength=len(REGIONS)))
            mass[len(shapes)].append(per_layer)

    for count in sorted(mass):
        layers = np.mean(mass[count], axis=0)  # [layers, regions]
        print(f"{count} shape(s), {len(mass[count])} questions: attention mass on " + " / ".join(REGIONS))
        for layer, row in enumerate(layers):
            print(f"  layer {layer}: " + " / ".join(f"{value:.3f}" for value in row))


if __name__ == "__main__":
    main()
