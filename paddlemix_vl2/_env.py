"""Process settings that must be in place before Paddle is imported.

Paddle forces ``OMP_NUM_THREADS=1`` when it is unset, and its bundled MKL takes a slow code path on
AMD CPUs unless ``MKL_DEBUG_CPU_TYPE=5`` (4x faster fp32 matmul on the Zen 4 CI machine, same results).
Values the user has set are kept.

Subnormal floats (below 1.2e-38 in float32) are flushed to zero on x86-64 CPUs, as
``torch.set_flush_denormal(True)`` does: x86 arithmetic on subnormals takes a slow microcode path, and
sharp attention makes them (softmax probabilities under e^-87, and their gradients). Measured on an Intel Xeon
CI machine: a 2000^2 matmul of subnormal inputs takes 10.4 s against 65 ms; one matmul gradient in a demo
training step took 450 ms instead of about 3. Only subnormal values are touched: they are read and
written as 0 (the demo model's answers on 100 test images came out byte-identical either way).
``PADDLEMIX_VL2_KEEP_DENORMALS=1`` keeps them. The mode is per thread; it reaches the threads of Paddle's
matmuls even when they ran before the package was imported (measured; Intel's OpenMP runtime hands the
caller's floating-point control to its workers by default, ``KMP_INHERIT_FP_CONTROL``).

With glibc, memory the main thread frees is kept for its next allocations instead of being handed back
to the system: glibc serves blocks above 32 MiB (a vision tower's activations) with fresh mappings and
unmaps them when freed, so every forward faulted its activations in again (slow on virtual machines:
0.3-0.9 GB/s on the KVM benchmark machine), and a guest that reports freed pages to its host slowed down
for a moment about two seconds later. Measured on tiny's shapes there, a second one-image generation in
the same process: vision 11.6-12.6 s instead of 13.4-13.7 s, prefill 3.0-3.4 s instead of 4.0-4.5 s;
peak RSS 6.96 instead of 6.89 GiB. The main heap keeps its peak until the process exits; other threads'
heaps keep what they freed below 64 MiB a block (the loader's read buffers: up to 128 MiB), their larger
blocks are still mapped and returned one by one. ``PADDLEMIX_VL2_RETURN_FREED_MEMORY=1``, or malloc
settings of one's own (``MALLOC_*_`` variables, ``GLIBC_TUNABLES`` with ``glibc.malloc``), keep glibc's
behaviour.
"""
import ctypes
import ctypes.util
import os
import platform
import sys

KEEP_DENORMALS_VARIABLE = "PADDLEMIX_VL2_KEEP_DENORMALS"
RETURN_FREED_MEMORY_VARIABLE = "PADDLEMIX_VL2_RETURN_FREED_MEMORY"

# glibc's mallopt parameters: M_MMAP_MAX 0 (no block of the main heap gets its own mapping) and
# M_TRIM_THRESHOLD -1 (the heap's free top is never returned), as mallopt(3) documents them.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

# MXCSR bits: flush-to-zero (subnormal results become 0) and denormals-are-zero (subnormal inputs read as 0).
_MXCSR_FTZ_DAZ = 0x8000 | 0x0040
# glibc's x86-64 fenv_t: 28 bytes of x87 state, then the 32-bit MXCSR.
_FENV_WORDS, _MXCSR_WORD = 8, 7


def configure_cpu_threads() -> None:
    if "paddle" in sys.modules:
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")


def flush_denormals() -> bool:
    """Set flush-to-zero and denormals-are-zero for this thread and the threads it starts later.

    Returns whether the CPU now flushes subnormals: False where the mode is not available (not x86-64
    Linux with glibc) or when ``PADDLEMIX_VL2_KEEP_DENORMALS=1``.
    """
    if os.environ.get(KEEP_DENORMALS_VARIABLE) == "1":
        return False
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    except OSError:
        return False
    env = (ctypes.c_uint32 * _FENV_WORDS)()
    if libm.fegetenv(ctypes.byref(env)) != 0:
        return False
    env[_MXCSR_WORD] |= _MXCSR_FTZ_DAZ
    return libm.fesetenv(ctypes.byref(env)) == 0


def keep_freed_memory() -> bool:
    """With glibc, serve the main heap's blocks from the heap and keep freed memory there (see the module
    docstring). Returns whether the settings took: False off glibc, when mallopt refuses them, when
    ``PADDLEMIX_VL2_RETURN_FREED_MEMORY=1`` or when the environment sets malloc parameters itself."""
    user_settings = any(name in os.environ for name in _MALLOC_VARIABLES) or (
        "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
    )
    if os.environ.get(RETURN_FREED_MEMORY_VARIABLE) == "1" or user_settings or sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    # glibc only: other C libraries ignore or reject these parameters.
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_TRIM_THRESHOLD, -1) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
