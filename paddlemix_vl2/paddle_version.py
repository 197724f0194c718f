"""The PaddlePaddle this package needs, checked where the model and the CLIs first import it.

Paddle comes as two distributions that install the same ``paddle`` module: ``paddlepaddle`` (CPU, on PyPI)
and ``paddlepaddle-gpu`` (from Paddle's own index). ``setup.py`` therefore requires neither (requiring one
would make pip put the CPU wheel over a GPU install); this check stands in for it with a message that says
which to install.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

__all__ = ["MIN_PADDLE_VERSION", "PaddleVersionError", "paddle_release", "require_paddle"]

# Tested with 3.3.1; 3.2 is the oldest whose APIs the package uses (lazy parameters, C ops on the CPU).
MIN_PADDLE_VERSION = (3, 2)
_MINIMUM = ".".join(map(str, MIN_PADDLE_VERSION))
_INSTALL = (f"install PaddlePaddle {_MINIMUM} or later: 'bash build_paddle_env.sh' makes a .venv with it, or pip "
            "install paddlepaddle (CPU), or paddlepaddle-gpu from Paddle's index (GPU; build_paddle_env.sh names the "
            "index)")


class PaddleVersionError(ImportError):
    """PaddlePaddle is missing, broken or older than ``MIN_PADDLE_VERSION``."""


def paddle_release(version: str) -> Optional[Tuple[int, int]]:
    """(major, minor) of a Paddle version string ("3.3.1", "3.0.0rc1"); None for a develop build ("0.0.0",
    which Paddle's nightly and source builds report) or a string it cannot read."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return None
    release = (int(match.group(1)), int(match.group(2)))
    return None if release == (0, 0) else release


def require_paddle() -> None:
    """Import Paddle, or raise ``PaddleVersionError`` naming the problem and the fix."""
    try:
        import paddle
    except Exception as err:  # not only ImportError: a broken install can fail with OSError and others
        raise PaddleVersionError(f"PaddlePaddle cannot be imported ({type(err).__name__}: {err}); {_INSTALL}") from None
    release = paddle_release(getattr(paddle, "__version__", ""))
    if release is not None and release < MIN_PADDLE_VERSION:
        raise PaddleVersionError(f"paddlemix_vl2 needs PaddlePaddle >= {_MINIMUM}, found {paddle.__version__}; {_INSTALL}")
