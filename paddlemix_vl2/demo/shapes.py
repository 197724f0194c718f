"""Synthetic shapes: images of a few coloured shapes and exact question/answer pairs about them.

Each image has a white background, a width and a height drawn uniformly from 200..600 px, and one to
three filled shapes that do not overlap. A shape is a ``circle``, ``square`` or ``triangle`` in ``red``,
``green``, ``blue`` or ``yellow`` (exact RGB values in ``COLORS``, drawn without anti-aliasing); no
(colour, shape) pair repeats within an image. A shape's size (the square's side, the circle's diameter,
the side of the upright triangle's square bounding box) is an integer between 15% and 40% of the image's
shorter side.

Boxes are pixel edges ``(x1, y1, x2, y2)`` with ``x2``/``y2`` exclusive, so a shape of size ``s`` at
``(x1, y1)`` covers pixel columns ``x1 .. x1 + s - 1``. Grounding answers give that box in 0..999
coordinates as ``round(x / W * 999)`` and ``round(y / H * 999)``; ``paddlemix_vl2.grounding.boxes_to_pixels``
inverts it (``v / 999 * W``) to within ``0.5 * W / 999`` pixels.

Questions (user content ``<image>\\n{question}``) and their answers:

* ``What shape is in the image?`` (one-shape images only) -> ``circle`` / ``square`` / ``triangle``
* ``What color is the {shape}?`` (only when that shape occurs exactly once) -> the colour name
* ``How many shapes are there?`` -> ``1`` / ``2`` / ``3``
* ``<|ref|>the {color} {shape}<|/ref|>.`` -> ``<|ref|>the {color} {shape}<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>``

Run ``python -m paddlemix_vl2.demo.shapes --out DIR --n N --seed S`` to write ``DIR/train.jsonl`` and
``DIR/images/*.png``. The same seed gives the same files (``random.Random`` drives every choice).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

from ..cli import CLIArgumentParser
from ..grounding import box_from_pixels, format_grounding, save_png

__all__ = [
    "SHAPE_KINDS",
    "COLORS",
    "BACKGROUND",
    "QUESTION_WEIGHTS",
    "Shape",
    "draw_scene",
    "make_example",
    "to_record",
    "write_dataset",
    "write_image_records",
    "main",
    "write_text_atomically",
]

logger = logging.getLogger(__name__)

SHAPE_KINDS = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
}
BACKGROUND = (255, 255, 255)
IMAGE_SIDE_RANGE = (200, 600)
SHAPE_COUNT_RANGE = (1, 3)
# Shape size as a fraction of the shorter image side, in percent so the bounds are exact integers.
SHAPE_SIZE_PERCENT = (15, 40)
# Minimum empty gap, in pixels, between the bounding boxes of two shapes.
PLACEMENT_MARGIN_PX = 4
# Positions tried per shape before the whole layout starts over, and layouts tried before giving up.
POSITION_ATTEMPTS = 50
LAYOUT_ATTEMPTS = 1000

USER_ROLE, ASSISTANT_ROLE = "<|User|>", "<|Assistant|>"
IMAGE_TAG = "<image>"
JSONL_NAME = "train.jsonl"
IMAGE_FOLDER = "images"

# Relative frequency of each question type among those the scene allows. "shape" is only possible on
# one-shape images (a third of them), so it is weighted up; grounding is the hardest skill, so it gets
# the largest share.
QUESTION_WEIGHTS = (("shape", 2.0), ("color", 1.0), ("count", 1.0), ("grounding", 2.0))

PixelBox = Tuple[int, int, int, int]


@dataclass(frozen=True)
class Shape:
    """A drawn shape: ``shape`` in ``SHAPE_KINDS``, ``color`` in ``COLORS``, ``box_px`` its pixel-edge box."""

    shape: str
    color: str
    box_px: PixelBox

    @property
    def size(self) -> int:
        return self.box_px[2] - self.box_px[0]


def draw_scene(rng: random.Random) -> Tuple[Image.Image, List[Shape]]:
    """Draws one random scene: an RGB image of size ``[H, W]`` and the shapes on it, in drawing order."""
    width = rng.randint(*IMAGE_SIDE_RANGE)
    height = rng.randint(*IMAGE_SIDE_RANGE)
    shorter = min(width, height)
    smallest = -(-SHAPE_SIZE_PERCENT[0] * shorter // 100)
    largest = SHAPE_SIZE_PERCENT[1] * shorter // 100
    count = rng.randint(*SHAPE_COUNT_RANGE)
    pairs = rng.sample([(color, kind) for color in COLORS for kind in SHAPE_KINDS], count)
    sizes = [rng.randint(smallest, largest) for _ in pairs]
    boxes = _layout(rng, sizes, width, height)
    shapes = [Shape(shape=kind, color=color, box_px=box) for (color, kind), box in zip(pairs, boxes)]
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        _draw_shape(draw, shape)
    return image, shapes


def make_example(rng: random.Random) -> Dict[str, Any]:
    """Draws a scene and asks one question about it.

    Returns ``{"image": PIL.Image, "shapes": [Shape], "question_type": str, "question": str, "answer": str}``;
    the question type is drawn with ``QUESTION_WEIGHTS`` among the types the scene allows.
    """
    image, shapes = draw_scene(rng)
    kind_counts = {kind: sum(shape.shape == kind for shape in shapes) for kind in SHAPE_KINDS}
    unique_kind_shapes = [shape for shape in shapes if kind_counts[shape.shape] == 1]
    allowed = {
        "shape": len(shapes) == 1,
        "color": bool(unique_kind_shapes),
        "count": True,
        "grounding": True,
    }
    types = [name for name, _ in QUESTION_WEIGHTS if allowed[name]]
    weights = [weight for name, weight in QUESTION_WEIGHTS if allowed[name]]
    question_type = rng.choices(types, weights=weights)[0]
    if question_type == "shape":
        question, answer = "What shape is in the image?", shapes[0].shape
    elif question_type == "color":
        target = rng.choice(unique_kind_shapes)
        question, answer = f"What color is the {target.shape}?", target.color
    elif question_type == "count":
        question, answer = "How many shapes are there?", str(len(shapes))
    else:
        target = rng.choice(shapes)
        label = f"the {target.color} {target.shape}"
        question = f"<|ref|>{label}<|/ref|>."
        answer = format_grounding(label, [box_from_pixels(target.box_px, *image.size)])
    return {"image": image, "shapes": shapes, "question_type": question_type, "question": question,
            "answer": answer}


def to_record(example: Dict[str, Any], image_path: str) -> Dict[str, Any]:
    """The fine-tune record of ``example``; ``image_path`` is relative to the JSONL file."""
    return {
        "messages": [
            {"role": USER_ROLE, "content": f"{IMAGE_TAG}\n{example['question']}", "images": [image_path]},
            {"role": ASSISTANT_ROLE, "content": example["answer"]},
        ]
    }


def write_dataset(out_dir: str, n: int, seed: int) -> str:
    """Writes ``n`` examples to ``out_dir/images/000001.png ...`` and ``out_dir/train.jsonl``; returns the JSONL path.

    The files depend only on ``n`` and ``seed``. Every file is written to a temporary name and then
    renamed, so an interrupted run leaves no half-written file behind.
    """

    def draw(rng: random.Random) -> Tuple[Image.Image, Callable[[str], Dict[str, Any]]]:
        example = make_example(rng)
        return example["image"], lambda image_path: to_record(example, image_path)

    return write_image_records(out_dir, n, seed, draw)


def write_image_records(
    out_dir: str, n: int, seed: int, draw: Callable[[random.Random], Tuple[Image.Image, Callable[[str], Dict[str, Any]]]]
) -> str:
    """The writer behind every synthetic-shapes data set: ``draw(rng)`` gives an image and the function
    that turns the image's relative path into its fine-tune record. Images go to
    ``out_dir/images/000001.png ...``, the records to ``out_dir/train.jsonl`` (written atomically);
    returns the JSONL path. ``random.Random(seed)`` drives every choice."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of examples, got {n!r}")
    image_dir = os.path.join(out_dir, IMAGE_FOLDER)
    os.makedirs(image_dir, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for index in range(1, n + 1):
        image, to_record_at = draw(rng)
        name = f"{index:06d}.png"
        save_png(image, os.path.join(image_dir, name))
        lines.append(json.dumps(to_record_at(f"{IMAGE_FOLDER}/{name}"), ensure_ascii=False))
    jsonl_path = os.path.join(out_dir, JSONL_NAME)
    write_text_atomically(jsonl_path, "\n".join(lines) + "\n")
    return jsonl_path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = CLIArgumentParser(
        prog="python -m paddlemix_vl2.demo.shapes",
        description="Write the synthetic shapes data set (PNG images + a fine-tune JSONL file).",
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--n", type=int, required=True, help="number of examples")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Command-line entry point; returns the path of the written JSONL file."""
    args = parse_args(argv)
    jsonl_path = write_dataset(args.out, args.n, args.seed)
    logger.info("wrote %d examples to %s", args.n, jsonl_path)
    return jsonl_path


def _layout(rng: random.Random, sizes: List[int], width: int, height: int) -> List[PixelBox]:
    # Shapes are placed one by one at random free positions. An early shape can leave no room for a
    # later one (a large shape in the middle of a small image), so a stuck layout starts over; three
    # shapes of 40% of the shorter side always fit side by side, so a layout is found quickly.
    for _ in range(LAYOUT_ATTEMPTS):
        boxes: List[PixelBox] = []
        for size in sizes:
            box = _free_position(rng, size, width, height, boxes)
            if box is None:
                break
            boxes.append(box)
        else:
            return boxes
    raise RuntimeError(
        f"could not lay out shapes of sizes {sizes} in a {width}x{height} image after {LAYOUT_ATTEMPTS} "
        "attempts; lower the upper bound of SHAPE_SIZE_PERCENT"
    )


def _free_position(
    rng: random.Random, size: int, width: int, height: int, taken: List[PixelBox]
) -> Optional[PixelBox]:
    for _ in range(POSITION_ATTEMPTS):
        x1 = rng.randint(0, width - size)
        y1 = rng.randint(0, height - size)
        box = (x1, y1, x1 + size, y1 + size)
        if all(_apart(box, other) for other in taken):
            return box
    return None


def _apart(box: PixelBox, other: PixelBox) -> bool:
    gap = PLACEMENT_MARGIN_PX
    return (box[2] + gap <= other[0] or other[2] + gap <= box[0]
            or box[3] + gap <= other[1] or other[3] + gap <= box[1])


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    # PIL's shape coordinates are inclusive pixel positions, hence the "- 1" on the exclusive edges.
    x1, y1, x2, y2 = shape.box_px
    fill = COLORS[shape.color]
    if shape.shape == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif shape.shape == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
    else:
        apex_x = (x1 + x2 - 1) / 2
        draw.polygon([(apex_x, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=fill)


def write_text_atomically(path: str, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it: no half file is ever seen."""
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
