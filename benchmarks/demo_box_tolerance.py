"""How precise must a demo-model grounding box be? IoU >= 0.5 rates of true boxes with added errors.

Draws scenes with the demo task's ``draw_scene`` and, for every shape, scores against its true box:
* the true box with independent Gaussian errors on each 0..999 coordinate, at several mean absolute sizes;
* the true box snapped outwards to the patch grid of the 384-px view (the image padded to a square in the
  centre and resized, as the global view and the demo's one local tile are), the best a model that only
  knows which patches a shape covers can answer.

    .venv/bin/python benchmarks/demo_box_tolerance.py --scenes 1500
"""
from __future__ import annotations

import argparse
import math
import random
from typing import List, Sequence

import numpy as np

from paddlemix_vl2.demo.evaluate import box_iou
from paddlemix_vl2.demo.recipe import TILE_SIZE, DemoModelSizes
from paddlemix_vl2.demo.shapes import draw_scene
from paddlemix_vl2.demo.vision_pretraining import letterbox


def snap_to_patches(box_px: Sequence[float], width: int, height: int, patch_px: int) -> List[float]:
    """``box_px`` widened to the patch edges of the centred, padded ``TILE_SIZE`` view, in image pixels."""
    scale, offset_x, offset_y = letterbox((width, height), TILE_SIZE)
    x1, y1, x2, y2 = box_px
    return [
        (math.floor((x1 * scale + offset_x) / patch_px) * patch_px - offset_x) / scale,
        (math.floor((y1 * scale + offset_y) / patch_px) * patch_px - offset_y) / scale,
        (math.ceil((x2 * scale + offset_x) / patch_px) * patch_px - offset_x) / scale,
        (math.ceil((y2 * scale + offset_y) / patch_px) * patch_px - offset_y) / scale,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--errors", type=float, nargs="+", default=[20, 25, 30, 40], help="mean absolute, 0..999 units")
    args = parser.parse_args()

    scene_rng = random.Random(args.seed)
    noise_rng = np.random.default_rng(args.seed)
    patch_px = DemoModelSizes().patch_size
    # A Gaussian's mean absolute value is sigma * sqrt(2 / pi).
    sigmas = np.array(args.errors) * math.sqrt(math.pi / 2)
    hits = np.zeros(len(sigmas))
    snapped_hits = 0
    shorter_sides = []
    for _ in range(args.scenes):
        image, shapes = draw_scene(scene_rng)
        width, height = image.size
        per_unit = np.array([width, height, width, height]) / 1000
        for shape in shapes:
            truth = np.array(shape.box_px, dtype=np.float64)
            shorter_sides.append(min((truth[2] - truth[0]) / width, (truth[3] - truth[1]) / height) * 1000)
            snapped_hits += box_iou(snap_to_patches(truth, width, height, patch_px), truth) >= 0.5
            noisy = truth / per_unit + noise_rng.normal(0.0, 1.0, (len(sigmas), 4)) * sigmas[:, None]
            hits += [box_iou(box * per_unit, truth) >= 0.5 for box in noisy]
    n = len(shorter_sides)
    print(f"{args.scenes} scenes, {n} shapes; shorter box side (0..999 units) "
          f"5/50/95th percentile: {np.percentile(shorter_sides, [5, 50, 95]).round().astype(int).tolist()}")
    for error, hit in zip(args.errors, hits):
        print(f"mean absolute error {error:g} per coordinate: IoU >= 0.5 for {hit / n:.3f}")
    print(f"snapped outwards to the {patch_px}-px patch grid: IoU >= 0.5 for {snapped_hits / n:.3f}")


if __name__ == "__main__":
    main()
