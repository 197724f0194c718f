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


@pytest.fixture
def amx_switch(monkeypatch):
    """``amx_switch("0" | "1")`` sets PADDLEMIX_VL2_AMX and reloads the kernel library's settings, returning
    whether the GEMM now runs on AMX; the default comes back afterwards."""
    from paddlemix_vl2.models.deepseek_vl2 import native

    def switch(value):
        monkeypatch.setenv(native.AMX_VARIABLE, value)
        native.kernel_library.cache_clear()
        return native.amx_gemm_runs()

    yield switch
    monkeypatch.undo()  # the session's own setting first, then the library reads it again
    native.kernel_library.cache_clear()
    native.kernel_library()
