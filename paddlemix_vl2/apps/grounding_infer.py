"""Find objects in an image and draw their boxes.

Two prompt forms (official): a referring expression, ``<image>\\n<|ref|>{ref}<|/ref|>.``, or a grounded
conversation, ``<image>\\n<|grounding|>{question}``. The model answers with
``<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`` in 0..999 coordinates of the original
image; they are converted to pixels, printed, and drawn as labelled boxes into ``--output`` (PNG).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional, Sequence, TextIO

from PIL import Image

from ..cli import (
    EXAMPLE_DEFAULTS, CLIArgumentParser, CLIInputError, add_generation_args, add_model_args, add_output_args,
    answer_one_turn, open_images, require_text, run_cli, status,
)
from ..demo import DEMO_IMAGES
from ..grounding import GroundedObject, GroundingParseWarning, boxes_to_pixels, draw_boxes, parse_grounding, save_png

__all__ = ["DEFAULT_REF", "build_parser", "cli", "grounding_content", "main", "parse_args", "save_grounding_image"]

DEFAULT_REF = "the red circle"


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = CLIArgumentParser(
        prog=prog, description="Locate objects in an image with DeepSeek-VL2 and save the image with their boxes.",
    )
    add_model_args(parser)
    group = parser.add_argument_group("input")
    group.add_argument("--image_file", default=DEMO_IMAGES[2], help="the image (default: a bundled demo image)")
    prompt = group.add_mutually_exclusive_group()
    prompt.add_argument("--ref", default=DEFAULT_REF, help="what to find, e.g. 'the red circle' (default: %(default)r)")
    prompt.add_argument("--question", default=None,
                        help="a question answered with boxes for the objects it mentions (<|grounding|> prompt)")
    group.add_argument("--output", default="grounding.png", help="PNG file to write (default: %(default)s)")
    add_generation_args(parser, EXAMPLE_DEFAULTS)
    add_output_args(parser)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


def grounding_content(ref: Optional[str] = None, question: Optional[str] = None) -> str:
    """The user turn: a grounded conversation when ``question`` is given, otherwise a referring expression."""
    if question is not None:
        return f"<image>\n<|grounding|>{require_text(question, '--question')}"
    return f"<image>\n<|ref|>{require_text(ref, '--ref')}<|/ref|>."


def save_grounding_image(answer_text: str, image: Image.Image, output: str, out: TextIO) -> List[GroundedObject]:
    """Parse ``answer_text``, print each box in pixels of ``image`` to ``out``, and save ``image`` with the
    labelled boxes drawn to ``output`` (PNG). Malformed parts of the answer are skipped with a note on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GroundingParseWarning)
        objects = parse_grounding(answer_text)
    for warning in caught:
        status(f"note: {warning.message}")
    width, height = image.size
    found = [obj for obj in objects if obj.boxes]
    for obj in found:
        for x1, y1, x2, y2 in boxes_to_pixels(obj.boxes, width, height):
            out.write(f"{obj.label or '(no label)'}: [{round(x1)}, {round(y1)}, {round(x2)}, {round(y2)}] px\n")
    if not found:
        out.write("no boxes in the answer\n")
    save_png(draw_boxes(image, objects), output)
    out.write(f"saved {output} ({width}x{height}, {sum(len(obj.boxes) for obj in found)} box(es))\n")
    out.flush()
    return objects


def _check_output(path: str) -> None:
    if os.path.isdir(path):
        raise CLIInputError(f"--output {path!r} is a folder; give the PNG file to write, e.g. {path}/grounding.png")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIInputError(f"--output {path!r}: folder {folder!r} does not exist; create it first")


def main(args: argparse.Namespace) -> int:
    content = grounding_content(args.ref, args.question)
    _check_output(args.output)
    answer = answer_one_turn(args, content, [args.image_file])
    save_grounding_image(answer.text, open_images([args.image_file])[0], args.output, sys.stdout)
    return 0


def cli(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    return run_cli(main, lambda arguments: parse_args(arguments, prog), argv)
