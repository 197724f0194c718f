"""Synthetic shapes data: every spec constraint checked on fresh scenes, answers against the pixels,
grounding round trips through paddlemix_vl2.grounding, determinism of the written files and the CLI."""
import json
import os
import random
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from paddlemix_vl2.demo import shapes as shapes_data
from paddlemix_vl2.demo.shapes import draw_scene, main, make_example, write_dataset
from paddlemix_vl2.grounding import GroundingParseWarning, boxes_to_pixels, parse_grounding

N_SCENES = 200
SPEC_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
WHITE = (255, 255, 255)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ideal_mask_and_boundary_distance(kind, box):
    """Rasterises the ideal geometry at the centres of the box's pixels, and each centre's distance to the
    outline; both ``[y2 - y1, x2 - x1]``."""
    x1, y1, x2, y2 = box
    ys, xs = np.mgrid[y1:y2, x1:x2] + 0.5
    if kind == "square":
        inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
        distance = np.minimum(np.minimum(np.abs(xs - x1), np.abs(xs - x2)),
                              np.minimum(np.abs(ys - y1), np.abs(ys - y2)))
        return inside, distance
    if kind == "circle":
        radius = (x2 - x1) / 2
        from_centre = np.hypot(xs - (x1 + x2) / 2, ys - (y1 + y2) / 2)
        return from_centre <= radius, np.abs(from_centre - radius)
    apex, left, right = np.array([(x1 + x2) / 2, y1]), np.array([x1, y2]), np.array([x2, y2])
    signed = []
    for start, end in ((apex, right), (right, left), (left, apex)):
        edge = end - start
        normal = np.array([edge[1], -edge[0]]) / np.hypot(*edge)
        signed.append((xs - start[0]) * normal[0] + (ys - start[1]) * normal[1])
    signed = np.stack(signed)
    return np.all(signed <= 0, axis=0), np.min(np.abs(signed), axis=0)


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(20240601)
    return [draw_scene(rng) for _ in range(N_SCENES)]


def test_scene_layout_follows_the_spec(scenes):
    counts = Counter()
    for image, shapes in scenes:
        width, height = image.size
        assert image.mode == "RGB"
        assert 200 <= width <= 600 and 200 <= height <= 600
        assert 1 <= len(shapes) <= 3
        counts[len(shapes)] += 1
        pairs = [(shape.color, shape.shape) for shape in shapes]
        assert len(set(pairs)) == len(pairs), f"repeated (colour, shape) pair in {pairs}"
        shorter = min(width, height)
        for shape in shapes:
            assert shape.shape in ("circle", "square", "triangle") and shape.color in SPEC_COLORS
            x1, y1, x2, y2 = shape.box_px
            side = x2 - x1
            assert y2 - y1 == side == shape.size
            assert 15 * shorter <= 100 * side <= 40 * shorter, (side, shorter)
            assert 0 <= x1 and x2 <= width and 0 <= y1 and y2 <= height
        for i, a in enumerate(shapes):
            for b in shapes[i + 1:]:
                (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a.box_px, b.box_px
                gap = max(bx1 - ax2, ax1 - bx2, by1 - ay2, ay1 - by2)
                assert gap >= shapes_data.PLACEMENT_MARGIN_PX, f"boxes {a.box_px} and {b.box_px} too close"
    assert set(counts) == {1, 2, 3}
    sizes = [image.size for image, _ in scenes]
    assert len(set(sizes)) > N_SCENES // 2, "image sizes should vary"


def test_scene_pixels_match_the_shapes(scenes):
    for image, shapes in scenes:
        pixels = np.asarray(image)
        height, width = pixels.shape[:2]
        covered = np.zeros((height, width), dtype=bool)
        for shape in shapes:
            x1, y1, x2, y2 = shape.box_px
            colour = SPEC_COLORS[shape.color]
            assert tuple(pixels[(y1 + y2) // 2, (x1 + x2) // 2]) == colour, f"centre of {shape}"
            region = pixels[y1:y2, x1:x2]
            is_colour = np.all(region == colour, axis=-1)
            assert np.all(is_colour | np.all(region == WHITE, axis=-1)), f"stray colours in {shape}"
            rows, cols = np.nonzero(is_colour)
            assert (rows.min(), cols.min(), rows.max(), cols.max()) == (0, 0, y2 - y1 - 1, x2 - x1 - 1), \
                f"{shape} does not fill its box"
            ideal, boundary_distance = _ideal_mask_and_boundary_distance(shape.shape, shape.box_px)
            # Rasterisers may decide either way for a pixel whose centre lies within half a pixel of the outline.
            mismatch = is_colour != ideal
            assert np.all(boundary_distance[mismatch] <= 0.5), f"{shape} is not a {shape.shape}"
            covered[y1:y2, x1:x2] = True
        assert np.all(pixels[~covered] == WHITE), "pixels outside every shape box must be white"


def test_answers_match_the_scene():
    rng = random.Random(7)
    types = Counter()
    for _ in range(400):
        example = make_example(rng)
        image, shapes = example["image"], example["shapes"]
        pixels = np.asarray(image)
        question, answer, question_type = example["question"], example["answer"], example["question_type"]
        types[question_type] += 1
        if question_type == "shape":
            assert question == "What shape is in the image?"
            assert len(shapes) == 1 and answer == shapes[0].shape
        elif question_type == "color":
            kind = question[len("What color is the "):-1]
            assert question == f"What color is the {kind}?"
            matching = [shape for shape in shapes if shape.shape == kind]
            assert len(matching) == 1
            x1, y1, x2, y2 = matching[0].box_px
            assert SPEC_COLORS[answer] == tuple(pixels[(y1 + y2) // 2, (x1 + x2) // 2])
        elif question_type == "count":
            assert question == "How many shapes are there?" and answer == str(len(shapes))
        else:
            assert question_type == "grounding"
            label = question[len("<|ref|>"):-len("<|/ref|>.")]
            assert question == f"<|ref|>{label}<|/ref|>."
            with warnings.catch_warnings():
                warnings.simplefilter("error", GroundingParseWarning)
                objects = parse_grounding(answer)
            assert answer.startswith(question[:-1] + "<|det|>[[") and answer.endswith("]]<|/det|>")
            assert len(objects) == 1 and objects[0].label == label and len(objects[0].boxes) == 1
            target = [shape for shape in shapes if f"the {shape.color} {shape.shape}" == label]
            assert len(target) == 1
            width, height = image.size
            x1, y1, x2, y2 = target[0].box_px
            spec_box = (round(x1 / width * 999), round(y1 / height * 999),
                        round(x2 / width * 999), round(y2 / height * 999))
            assert objects[0].boxes == [spec_box]
    assert set(types) == {"shape", "color", "count", "grounding"}


def test_grounding_boxes_round_trip_to_pixels(scenes):
    for image, shapes in scenes:
        width, height = image.size
        for shape in shapes:
            x1, y1, x2, y2 = shape.box_px
            expected = (round(x1 / width * 999), round(y1 / height * 999),
                        round(x2 / width * 999), round(y2 / height * 999))
            back = boxes_to_pixels([expected], width, height)[0]
            assert max(abs(a - b) for a, b in zip(back, shape.box_px)) <= 1.0


def _read_dataset(folder):
    with open(os.path.join(folder, "train.jsonl"), encoding="utf-8") as stream:
        text = stream.read()
    images = {}
    for name in sorted(os.listdir(os.path.join(folder, "images"))):
        with open(os.path.join(folder, "images", name), "rb") as stream:
            images[name] = stream.read()
    return text, images


def test_write_dataset_format_and_determinism(tmp_path):
    first, second, other = (os.path.join(tmp_path, name) for name in ("a", "b", "c"))
    jsonl_path = write_dataset(first, 8, seed=3)
    write_dataset(second, 8, seed=3)
    write_dataset(other, 8, seed=4)
    assert jsonl_path == os.path.join(first, "train.jsonl")
    assert _read_dataset(first) == _read_dataset(second)
    assert _read_dataset(first) != _read_dataset(other)
    text, images = _read_dataset(first)
    assert sorted(images) == [f"{i:06d}.png" for i in range(1, 9)]
    assert sorted(os.listdir(first)) == ["images", "train.jsonl"], "temporary files left behind"
    records = [json.loads(line) for line in text.splitlines()]
    assert len(records) == 8 and text.endswith("\n")
    first_example = make_example(random.Random(3))
    for index, record in enumerate(records, start=1):
        assert list(record) == ["messages"]
        user, assistant = record["messages"]
        assert set(user) == {"role", "content", "images"} and set(assistant) == {"role", "content"}
        assert user["role"] == "<|User|>" and assistant["role"] == "<|Assistant|>"
        assert user["images"] == [f"images/{index:06d}.png"]
        assert user["content"].startswith("<image>\n") and user["content"].count("<image>") == 1
        with Image.open(os.path.join(first, user["images"][0])) as image:
            assert image.mode == "RGB" and 200 <= min(image.size) and max(image.size) <= 600
    assert records[0]["messages"][0]["content"] == "<image>\n" + first_example["question"]
    assert records[0]["messages"][1]["content"] == first_example["answer"]


def test_write_dataset_rejects_bad_counts(tmp_path):
    with pytest.raises(ValueError, match="positive number of examples"):
        write_dataset(str(tmp_path), 0, seed=1)


def test_cli_writes_the_same_files_as_write_dataset(tmp_path):
    by_function, by_main, by_module = (os.path.join(tmp_path, name) for name in ("f", "m", "p"))
    write_dataset(by_function, 3, seed=11)
    assert main(["--out", by_main, "--n", "3", "--seed", "11"]) == os.path.join(by_main, "train.jsonl")
    completed = subprocess.run(
        [sys.executable, "-m", "paddlemix_vl2.demo.shapes", "--out", by_module, "--n", "3", "--seed", "11"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "wrote 3 examples" in completed.stderr
    assert _read_dataset(by_function) == _read_dataset(by_main) == _read_dataset(by_module)
