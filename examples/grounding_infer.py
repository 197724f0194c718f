"""Locate objects in an image with DeepSeek-VL2 and save the image with labelled boxes.

    python examples/grounding_infer.py --model_path CKPT --image_file a.png --ref "the red circle" --output boxes.png

The program is ``paddlemix_vl2.apps.grounding_infer``; ``--help`` lists the flags.
"""
import sys

from paddlemix_vl2.apps.grounding_infer import main, parse_args
from paddlemix_vl2.cli import run_cli

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
