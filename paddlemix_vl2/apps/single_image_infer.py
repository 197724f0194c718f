"""Ask one question about one image: the user turn is ``<image>\\n{question}``.

For a referring (``<|ref|>``) prompt with boxes drawn on the image, use ``grounding_infer``.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..cli import (
    EXAMPLE_DEFAULTS, CLIArgumentParser, add_generation_args, add_model_args, add_output_args, answer_one_turn,
    require_text, run_cli,
)
from ..demo import DEMO_IMAGES

__all__ = ["DEFAULT_QUESTION", "build_parser", "cli", "main", "parse_args", "single_image_content"]

DEFAULT_QUESTION = "How many shapes are there?"


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = CLIArgumentParser(prog=prog, description="Answer a question about one image with DeepSeek-VL2.")
    add_model_args(parser)
    group = parser.add_argument_group("input")
    group.add_argument("--image_file", default=DEMO_IMAGES[2], help="the image (default: a bundled demo image)")
    group.add_argument("--question", default=DEFAULT_QUESTION, help="the question (default: %(default)r)")
    add_generation_args(parser, EXAMPLE_DEFAULTS)
    add_output_args(parser)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


def single_image_content(question: str) -> str:
    return f"<image>\n{question}"


def main(args: argparse.Namespace) -> int:
    question = require_text(args.question, "--question")
    answer_one_turn(args, single_image_content(question), [args.image_file])
    return 0


def cli(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    return run_cli(main, lambda arguments: parse_args(arguments, prog), argv)
