"""Do a demo checkpoint's vision patches name the (colour, shape) pair of the shape they lie in?

A ridge-regression probe on the tower's patch features of the global view ([P, C] per scene): trained on
the patches whose centre lies inside a shape's bounding box in ``--train_scenes`` scenes, scored on those of
``--test_scenes`` other scenes. The bounding box also holds background (a circle's corners), so even a
perfect tower stays below 1.

    .venv/bin/python benchmarks/demo_tower_probe.py --model_path paddlemix_vl2/demo/checkpoint
"""
from __future__ import annotations

import argparse
import random
from typing import Tuple

import numpy as np
import paddle

from paddlemix_vl2.demo import DEFAULT_CHECKPOINT
from paddlemix_vl2.demo.evaluate import load_for_inference
from paddlemix_vl2.demo.shapes import COLORS, SHAPE_KINDS, draw_scene
from paddlemix_vl2.demo.vision_pretraining import patch_centres
from paddlemix_vl2.models.deepseek_vl2 import DeepseekVLV2ForCausalLM
from paddlemix_vl2.processors import DeepseekVLV2Processor

PAIRS = [(color, kind) for color in COLORS for kind in SHAPE_KINDS]


def patch_pairs(model: DeepseekVLV2ForCausalLM, processor: DeepseekVLV2Processor, n: int, seed: int
                ) -> Tuple[np.ndarray, np.ndarray]:
    """Features [N, C] of the in-box patches of ``n`` scenes and their pair indices [N] into ``PAIRS``."""
    view, grid = model.config.vision_config.image_size, model.config.vision_config.grid_size
    rng = random.Random(seed)
    features, labels = [], []
    for _ in range(n):
        image, shapes = draw_scene(rng)
        pixels = processor.image_transform.tiles(image, (1, 1), view)[:1]  # the global view [1, 3, S, S]
        with paddle.no_grad():
            patches = model.vision(paddle.to_tensor(pixels)).numpy()[0]  # [P, C]
        xs, ys = (axis.ravel() for axis in patch_centres(image.size, view, grid))
        label = np.full(grid * grid, -1)
        for shape in shapes:
            x1, y1, x2, y2 = shape.box_px
            label[(xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)] = PAIRS.index((shape.color, shape.shape))
        features.append(patches[label >= 0])
        labels.append(label[label >= 0])
    return np.concatenate(features), np.concatenate(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--train_scenes", type=int, default=400)
    parser.add_argument("--test_scenes", type=int, default=150)
    parser.add_argument("--ridge", type=float, default=1.0)
    args = parser.parse_args()

    model, processor = load_for_inference(args.model_path)
    train_x, train_y = patch_pairs(model, processor, args.train_scenes, seed=1001)
    test_x, test_y = patch_pairs(model, processor, args.test_scenes, seed=2002)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6

    def design(x: np.ndarray) -> np.ndarray:
        return np.c_[(x - mean) / std, np.ones(len(x))]

    a = design(train_x)
    weights = np.linalg.solve(a.T @ a + args.ridge * np.eye(a.shape[1]), a.T @ np.eye(len(PAIRS))[train_y])
    train_acc = ((a @ weights).argmax(1) == train_y).mean()
    test_acc = ((design(test_x) @ weights).argmax(1) == test_y).mean()
    print(f"{args.model_path}: pair of the in-box patches, ridge probe: train {train_acc:.3f}, "
          f"held out {test_acc:.3f} ({len(test_y)} patches of {args.test_scenes} scenes)")


if __name__ == "__main__":
    main()
