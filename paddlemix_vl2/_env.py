"""Process settings that must be in place before Paddle is imported.

Paddle forces ``OMP_NUM_THREADS=1`` when it is unset, and its bundled MKL takes a slow code path on
AMD CPUs unless ``MKL_DEBUG_CPU_TYPE=5`` (4x faster fp32 matmul on the Zen 4 CI machine, same results).
Values the user has set are kept.
"""
import os
import sys


def configure_cpu_threads() -> None:
    if "paddle" in sys.modules:
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
