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


# The bytes glibc's main heap holds (mallinfo2's ``arena``) after a 2.5 GiB array is freed, beyond any trim
# threshold a C int could hold, in a fresh process that imported the package. The pages are never touched:
# the heap's size, not the resident memory, says whether the block came from the heap and stayed there.
_FREE_PROBE = """
import ctypes
import numpy as np
import paddlemix_vl2

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
block = np.empty(5 << 27, dtype=np.float32)
del block
print(mallinfo2().arena)
"""


def _heap_bytes_after_free(return_freed: bool, **settings: str) -> int:
    env = {name: value for name, value in os.environ.items()
           if name != RETURN_FREED_MEMORY_VARIABLE and not name.startswith("MALLOC_") and name != "GLIBC_TUNABLES"}
    env.update(settings)
    if return_freed:
        env[RETURN_FREED_MEMORY_VARIABLE] = "1"
    completed = subprocess.run([sys.executable, "-c", _FREE_PROBE], capture_output=True, text=True, env=env,
                               check=True)
    return int(completed.stdout.split()[-1])


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                    reason="freed memory is kept with glibc only")
def test_freed_memory_is_kept_unless_asked_to_return_it():
    assert _heap_bytes_after_free(return_freed=False) >= 5 << 29
    assert _heap_bytes_after_free(return_freed=True) < 1 << 30
    # glibc's own settings, given by the user, are left as they are (here: its default mmap threshold).
    assert _heap_bytes_after_free(return_freed=False, MALLOC_MMAP_THRESHOLD_="33554432") < 1 << 30


def test_paddle_release_reads_versions_and_takes_develop_builds_as_new():
    from paddlemix_vl2.paddle_version import paddle_release

    assert paddle_release("3.3.1") == (3, 3)
    assert paddle_release("3.0.0rc1") == (3, 0)
    assert paddle_release("2.6.2") == (2, 6)
    assert paddle_release("0.0.0") is None  # nightly and source builds
    assert paddle_release("unknown") is None


def test_an_old_paddle_is_refused_with_what_to_install(monkeypatch):
    import paddle

    from paddlemix_vl2.paddle_version import PaddleVersionError, require_paddle

    require_paddle()  # the Paddle the tests run on
    monkeypatch.setattr(paddle, "__version__", "2.6.2")
    with pytest.raises(PaddleVersionError, match=r"needs PaddlePaddle >= 3\.2, found 2\.6\.2; .*pip install paddlepaddle"):
        require_paddle()


@pytest.mark.parametrize("program", ["apps.multi_image_infer import cli", "cli import finetune_main as cli",
                                     "cli import lora_merge_main as cli"])
@pytest.mark.parametrize("version", [None, "2.6.2"])
def test_cli_without_a_usable_paddle_says_so_in_one_line(version, program):
    """No Paddle (an import that fails) or an old one: the CLIs exit 2 with one error line, no traceback."""
    stand_in = "None" if version is None else f"types.SimpleNamespace(__version__={version!r})"
    script = f"import sys, types; sys.modules['paddle'] = {stand_in}\nfrom paddlemix_vl2.{program}\nsys.exit(cli())\n"
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pip install paddlepaddle" in lines[0]
    assert ("cannot be imported" if version is None else "found 2.6.2") in lines[0]
