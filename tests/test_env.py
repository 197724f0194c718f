"""Process settings made when the package is imported (paddlemix_vl2/_env.py)."""
import os
import platform
import subprocess
import sys

import pytest

from paddlemix_vl2._env import KEEP_DENORMALS_VARIABLE, RETURN_FREED_MEMORY_VARIABLE

# A subnormal float32 through numpy and through a two-thread Paddle matmul, in a fresh process.
_PROBE = """
import numpy as np
import paddlemix_vl2
import paddle
tiny = np.float32(1e-39)
ones = paddle.ones([512, 512])
print(float(tiny * np.float32(1.0)), float(paddle.matmul(paddle.full([512, 512], 1e-39), ones).max()))
"""


def _probe(keep_denormals: bool):
    env = {name: value for name, value in os.environ.items() if name != KEEP_DENORMALS_VARIABLE}
    env["OMP_NUM_THREADS"] = "2"
    if keep_denormals:
        env[KEEP_DENORMALS_VARIABLE] = "1"
    completed = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True)
    return [float(value) for value in completed.stdout.split()]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or sys.platform != "linux",
                    reason="the flush mode is set on x86-64 Linux only")
def test_importing_the_package_flushes_subnormals_in_every_thread():
    numpy_product, matmul_max = _probe(keep_denormals=False)
    assert numpy_product == 0.0 and matmul_max == 0.0


def test_subnormals_are_kept_on_request():
    numpy_product, matmul_max = _probe(keep_denormals=True)
    assert numpy_product == pytest.approx(1e-39, rel=1e-3)
    assert matmul_max == pytest.approx(512e-39, rel=1e-3)


# Resident memory around freeing a 256 MiB array, in a fresh process that imported the package.
_FREE_PROBE = """
import numpy as np
import paddlemix_vl2

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

block = np.ones(256 << 18, dtype=np.float32)
held = resident()
del block
print(held - resident())
"""


def _released_bytes(return_freed: bool) -> int:
    env = {name: value for name, value in os.environ.items() if name != RETURN_FREED_MEMORY_VARIABLE}
    if return_freed:
        env[RETURN_FREED_MEMORY_VARIABLE] = "1"
    completed = subprocess.run([sys.executable, "-c", _FREE_PROBE], capture_output=True, text=True, env=env,
                               check=True)
    return int(completed.stdout.split()[-1])


@pytest.mark.skipif(sys.platform != "linux" or not platform.libc_ver()[0] == "glibc",
                    reason="freed memory is kept with glibc only")
def test_freed_memory_is_kept_unless_asked_to_return_it():
    assert _released_bytes(return_freed=False) < 16 << 20
    assert _released_bytes(return_freed=True) > 200 << 20
