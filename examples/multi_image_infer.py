"""Ask DeepSeek-VL2 one question about several images (PaddleMIX's multi_image_infer.py flags, plus
a repeatable --image_file for any number of images).

    python examples/multi_image_infer.py --model_path CKPT --image_file_1 a.png --image_file_2 b.png \\
        --image_file_3 c.png --question "Can you tell me what are in the images?"

The program is ``paddlemix_vl2.apps.multi_image_infer``; ``--help`` lists the flags.
"""
import sys

from paddlemix_vl2.apps.multi_image_infer import main, parse_args
from paddlemix_vl2.cli import run_cli

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
