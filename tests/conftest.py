import os
import sys

# Before Paddle is imported anywhere: Paddle forces one thread when OMP_NUM_THREADS is unset, and its
# MKL takes a slow path on AMD CPUs without MKL_DEBUG_CPU_TYPE=5.
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")

import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
CHECKPOINTS = ("micro-tiny", "micro-small", "micro-full")


@pytest.fixture(scope="session")
def fixtures_dir():
    return FIXTURES


def checkpoint_dir(name: str) -> str:
    return os.path.join(FIXTURES, "checkpoints", name)


def expected_path(name: str, case: str) -> str:
    return os.path.join(FIXTURES, "expected", name, f"{case}.safetensors")


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
