"""Ask one question about any number of images (PaddleMIX's ``multi_image_infer.py`` flags and output).

Images come from ``--image_file_1 .. --image_file_3`` (as in PaddleMIX) or a repeated ``--image_file``;
without either, the bundled demo images are used. The user turn is the official interleaved form::

    This is image_1: <image>
    This is image_2: <image>
    This is image_3: <image>
     {question}

With more than two images the processor turns tiling off (every image costs 421 tokens).

With neither images nor ``--question`` the run is the bundled demo: each demo image is asked its own
question (``paddlemix_vl2.demo.DEMO_QUESTIONS``), one conversation per image, answered as one batch. The
bundled demo model was trained on one image per conversation; real checkpoints answer these too.
"""
from __future__ import annotations

import argparse
from typing import List, Optional, Sequence

from ..cli import (
    EXAMPLE_DEFAULTS, CLIArgumentParser, CLIInputError, add_generation_args, add_model_args, add_output_args,
    answer_each, answer_one_turn, require_text, run_cli,
)
from ..demo import DEMO_IMAGES, DEMO_QUESTIONS

__all__ = [
    "DEFAULT_QUESTION", "build_parser", "cli", "demo_requested", "image_paths", "main", "multi_image_content", "parse_args",
]

DEFAULT_QUESTION = "Can you tell me what are in the images?"
NUMBERED_IMAGE_FLAGS = ("image_file_1", "image_file_2", "image_file_3")


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = CLIArgumentParser(
        prog=prog, description="Answer a question about several images with DeepSeek-VL2.",
        epilog="Without image flags the bundled demo images are used; with neither images nor --question, each "
        "demo image is asked its own question (one conversation per image, one batch).",
    )
    add_model_args(parser)
    group = parser.add_argument_group("input")
    for number, name in enumerate(NUMBERED_IMAGE_FLAGS, start=1):
        group.add_argument(f"--{name}", default=None, help=f"image number {number} (PaddleMIX style)")
    group.add_argument("--image_file", action="append", default=None,
                       help="an image; repeat the flag for more images, in order")
    group.add_argument("--question", default=None,
                       help=f"the question about all the images (default with images: {DEFAULT_QUESTION!r})")
    add_generation_args(parser, EXAMPLE_DEFAULTS)
    add_output_args(parser)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


def image_paths(args: argparse.Namespace) -> List[str]:
    """The images in prompt order: the numbered flags, or the repeated ``--image_file``, or the demo images."""
    numbered = [getattr(args, name) for name in NUMBERED_IMAGE_FLAGS]
    given = [path for path in numbered if path is not None]
    if given and args.image_file:
        raise CLIInputError("use either --image_file_1/2/3 or --image_file (repeatable), not both")
    if given:
        missing = numbered.index(None) if None in numbered else len(numbered)
        if len(given) != missing:
            raise CLIInputError(f"--image_file_{missing + 1} is missing: number the images from 1 without gaps")
        return given
    return list(args.image_file or DEMO_IMAGES)


def multi_image_content(num_images: int, question: str) -> str:
    """The user turn of the official multi-image example: one ``This is image_k: <image>`` line per image,
    then a space and the question."""
    if num_images < 1:
        raise CLIInputError("give at least one image")
    lines = "".join(f"This is image_{k}: <image>\n" for k in range(1, num_images + 1))
    return f"{lines} {question}"


def demo_requested(args: argparse.Namespace) -> bool:
    """True when neither images nor a question were given: the run asks each demo image its own question."""
    return args.question is None and not args.image_file and all(getattr(args, name) is None for name in NUMBERED_IMAGE_FLAGS)


def main(args: argparse.Namespace) -> int:
    if demo_requested(args):
        answer_each(args, [f"<image>\n{question}" for question in DEMO_QUESTIONS], [[path] for path in DEMO_IMAGES])
        return 0
    question = require_text(DEFAULT_QUESTION if args.question is None else args.question, "--question")
    paths = image_paths(args)
    answer_one_turn(args, multi_image_content(len(paths), question), paths)
    return 0


def cli(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    return run_cli(main, lambda arguments: parse_args(arguments, prog), argv)
