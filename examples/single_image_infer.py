"""Ask DeepSeek-VL2 one question about one image.

    python examples/single_image_infer.py --model_path CKPT --image_file a.png --question "Describe this image."

The program is ``paddlemix_vl2.apps.single_image_infer``; ``--help`` lists the flags.
"""
import sys

from paddlemix_vl2.apps.single_image_infer import main, parse_args
from paddlemix_vl2.cli import run_cli

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
