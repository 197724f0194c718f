"""``python -m paddlemix_vl2``: lists the commands; ``python -m paddlemix_vl2 <command> ...`` runs one."""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

# command -> (module under paddlemix_vl2.apps, console script, what it does)
COMMANDS = {
    "infer": ("multi_image_infer", "paddlemix-vl2-infer", "answer a question about one or more images"),
    "single": ("single_image_infer", "paddlemix-vl2-single-infer", "answer a question about one image"),
    "ground": ("grounding_infer", "paddlemix-vl2-ground", "locate objects (<|ref|> prompts) and draw their boxes"),
    "chat": ("chat", "paddlemix-vl2-chat", "multi-turn chat with images, streamed"),
}
EXIT_USAGE = 2


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: python -m paddlemix_vl2 <command> [options]",
        "",
        "DeepSeek-VL2 in PaddlePaddle. Commands:",
        *(f"  {name:<{width}}  {about} (also: {script})" for name, (_, script, about) in COMMANDS.items()),
        "",
        "Run 'python -m paddlemix_vl2 <command> --help' for a command's options. Without --model_path the",
        "commands use the bundled demo checkpoint (not DeepSeek's weights) and the bundled demo images.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        choices = ", ".join(COMMANDS)
        sys.stderr.write(f"python -m paddlemix_vl2: error: unknown command {name!r}; choose from {choices}\n")
        return EXIT_USAGE
    module = importlib.import_module(f"paddlemix_vl2.apps.{COMMANDS[name][0]}")
    return module.cli(rest, prog=f"python -m paddlemix_vl2 {name}")


if __name__ == "__main__":
    sys.exit(main())
