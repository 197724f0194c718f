"""Chat with DeepSeek-VL2 turn by turn on stdin/stdout (/image PATH, /reset, /quit).

    python examples/chat.py --model_path CKPT --image_file a.png

The program is ``paddlemix_vl2.apps.chat``; ``--help`` lists the flags.
"""
import sys

from paddlemix_vl2.apps.chat import main, parse_args
from paddlemix_vl2.cli import run_cli

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
