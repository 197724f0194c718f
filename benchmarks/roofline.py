"""Measure this machine's roofline with Paddle: fp32 matmul rate and memory read bandwidth.

The package's own GEMM (``native.linear``, AVX-512 builds) runs the same matmul shapes faster than Paddle's
bundled MKL here, so its rate is measured too: Paddle's rate is the limit the issue names, the faster of the
two is the best this machine has shown for the shape.

The figures bound what inference can reach here: prefill (ViT, projector, LM over the prompt) is matmul
bound, decode reads every active weight once per token and is bandwidth bound. Three bandwidths are given:
a large ``paddle.sum`` (pure streaming read), a 1×K×N GEMV whose weight is far larger than the caches,
which is what a decode step does, and the same GEMV through the package's decode kernel (faster than
Paddle's here: the best reader of memory measured, a stricter limit than Paddle's two).

Usage::

    python benchmarks/roofline.py                  # full sizes, about half a minute
    python benchmarks/roofline.py --quick --json /tmp/roofline.json

Importable: ``measure(quick=False, repeats=None, operands=None) -> dict``, its stable keys in ``RESULT_KEYS``.
"""

from __future__ import annotations

import os

# Before Paddle is imported: Paddle forces one thread when OMP_NUM_THREADS is unset, and its MKL takes a slow
# path on AMD CPUs without MKL_DEBUG_CPU_TYPE=5 (about 4x slower fp32 matmul on the benchmark machine).
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional, Sequence  # noqa: E402

import paddle  # noqa: E402

FP32_BYTES = 4
RESULT_KEYS = (
    "matmul_gflops_2048", "matmul_gflops_vit_fc1", "package_gemm_gflops_2048", "package_gemm_gflops_vit_fc1",
    "read_bandwidth_gbs", "gemv_bandwidth_gbs", "package_gemv_bandwidth_gbs", "cpu_model", "avx512", "amx_gemm",
)


@dataclasses.dataclass(frozen=True)
class RooflineSizes:
    """Problem sizes. Matmul shapes are (M, K, N): [M, K] @ [K, N]."""

    square_matmul: tuple[int, int, int] = (2048, 2048, 2048)
    # One SigLIP MLP fc1 on a 384² tile: 729 patches, width 1152, hidden 4304.
    vit_fc1_matmul: tuple[int, int, int] = (729, 1152, 4304)
    read_bytes: int = 1 << 30
    # A 512 MiB fp32 weight, far beyond any L3: every call streams it from memory.
    gemv_k_n: tuple[int, int] = (8192, 16384)
    repeats: int = 10
    warmup: int = 2


FULL_SIZES = RooflineSizes()
# Tiny sizes for a smoke test: the numbers mean little, the code path is the same.
QUICK_SIZES = RooflineSizes(
    square_matmul=(128, 128, 128), vit_fc1_matmul=(64, 96, 128), read_bytes=8 << 20, gemv_k_n=(512, 1024),
    repeats=3, warmup=1,
)


@dataclasses.dataclass(frozen=True)
class Rate:
    """Best (highest) and median rate over the timed runs."""

    best: float
    median: float


def run_times(run: Callable[[], object], repeats: int, warmup: int) -> list[float]:
    """Wall seconds of each timed call. Paddle's CPU kernels are synchronous, so no device sync is needed."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def rate(work: float, times: Sequence[float]) -> Rate:
    """work / time for the fastest and the median run."""
    return Rate(best=work / min(times), median=work / statistics.median(times))


class Operands:
    """The tensors the measurements run on, made on first use and, with ``keep``, held for reuse.

    A probe that allocates a gigabyte and frees it is not free on a guest whose balloon device has free
    page reporting (this benchmark machine): about two seconds after the free, the guest hands the pages
    back to the host, and for half a second the memory-bound work running then is up to 2.5× slower. The
    bracketing probes of ``bench_infer`` ran right before each decode stage, so that slow half second landed
    inside the decode being measured; they keep their operands for the whole run instead.
    """

    def __init__(self, keep: bool = False):
        self.keep = keep
        self._tensors: dict = {}

    def get(self, shape: Sequence[int], make: Callable[[list], paddle.Tensor]) -> paddle.Tensor:
        """A float32 tensor of ``shape`` from ``make(shape)``: the same one again while kept, so a kept
        square matmul multiplies one tensor by itself (the measurements only read their operands)."""
        key = (tuple(shape), make)
        tensor = self._tensors.get(key)
        if tensor is None:
            tensor = make(list(shape))
            if self.keep:
                self._tensors[key] = tensor
        return tensor


def _normal(shape: list) -> paddle.Tensor:
    return paddle.randn(shape, dtype="float32")


def _half(shape: list) -> paddle.Tensor:
    return paddle.full(shape, 0.5, dtype="float32")


def matmul_gflops(shape: tuple[int, int, int], repeats: int, warmup: int,
                  operands: Optional[Operands] = None) -> Rate:
    """fp32 GFLOP/s of [M, K] @ [K, N] (2·M·K·N flops per call)."""
    operands = operands or Operands()
    m, k, n = shape
    left, right = operands.get([m, k], _normal), operands.get([k, n], _normal)
    times = run_times(lambda: paddle.matmul(left, right), repeats, warmup)
    return rate(2.0 * m * k * n / 1e9, times)


def package_gemm_gflops(shape: tuple[int, int, int], repeats: int, warmup: int,
                        operands: Optional[Operands] = None) -> Optional[Rate]:
    """fp32 GFLOP/s of the package's GEMM on [M, K] @ [K, N] (the weight held [N, K], as a Linear holds
    it), or None where it does not run (no AVX-512 build of the CPU kernels)."""
    from paddlemix_vl2.models.deepseek_vl2 import native

    operands = operands or Operands()
    m, k, n = shape
    left, weight = operands.get([m, k], _normal), operands.get([n, k], _normal)
    with paddle.no_grad():
        if not native.gemm_applies(left, weight, m):
            return None
        times = run_times(lambda: native.linear(left, weight, None), repeats, warmup)
    return rate(2.0 * m * k * n / 1e9, times)


def read_bandwidth_gbs(nbytes: int, repeats: int, warmup: int, operands: Optional[Operands] = None) -> Rate:
    """GB/s of ``paddle.sum`` over an fp32 tensor of ``nbytes``: a pure streaming read."""
    values = (operands or Operands()).get([nbytes // FP32_BYTES], _half)
    times = run_times(lambda: paddle.sum(values), repeats, warmup)
    return rate(nbytes / 1e9, times)


def gemv_bandwidth_gbs(k_n: tuple[int, int], repeats: int, warmup: int,
                       operands: Optional[Operands] = None) -> Rate:
    """GB/s of weight bytes read by x[1, K] @ W[K, N], the shape of a decode step's projections."""
    operands = operands or Operands()
    k, n = k_n
    weight, activation = operands.get([k, n], _half), operands.get([1, k], _normal)
    times = run_times(lambda: paddle.matmul(activation, weight), repeats, warmup)
    return rate(k * n * FP32_BYTES / 1e9, times)


def package_gemv_bandwidth_gbs(k_n: tuple[int, int], repeats: int, warmup: int,
                               operands: Optional[Operands] = None) -> Optional[Rate]:
    """GB/s of weight bytes the package's decode GEMV (``native.few_rows_linear``, the weight held [N, K]
    as a Linear holds it) reads for one row, or None where it does not run (no CPU kernels built)."""
    from paddlemix_vl2.models.deepseek_vl2 import native

    operands = operands or Operands()
    k, n = k_n
    # Paddle's GEMV weight read as [N, K]: the values do not matter here, and a kept run holds no second copy.
    weight, activation = operands.get([k, n], _half).reshape([n, k]), operands.get([1, k], _normal)
    with paddle.no_grad():
        if not native.few_rows_applies(activation, weight, 1):
            return None
        times = run_times(lambda: native.few_rows_linear(activation, weight), repeats, warmup)
    return rate(k * n * FP32_BYTES / 1e9, times)


def cpu_info() -> tuple[str, bool]:
    """(CPU model name, whether any avx512 flag is present), from lscpu or else /proc/cpuinfo.

    Both list "Model name"/"model name" and "Flags"/"flags" as "key: value" lines.
    """
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        cpuinfo = Path("/proc/cpuinfo")
        text = cpuinfo.read_text() if cpuinfo.exists() else ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, separator, value = line.partition(":")
        if separator:
            fields.setdefault(key.strip().lower(), value.strip())
    flags = fields.get("flags", "").split()
    return fields.get("model name", "unknown"), any(flag.startswith("avx512") for flag in flags)


def measure(quick: bool = False, repeats: int | None = None, operands: Optional[Operands] = None) -> dict:
    """Run all measurements and return a JSON-ready dict.

    Stable keys (``RESULT_KEYS``): ``matmul_gflops_2048``, ``matmul_gflops_vit_fc1`` (Paddle, GFLOP/s, best
    run), ``package_gemm_gflops_2048``, ``package_gemm_gflops_vit_fc1`` (the package's GEMM, None where it
    does not run),
    ``read_bandwidth_gbs``, ``gemv_bandwidth_gbs`` (GB/s, best run), ``package_gemv_bandwidth_gbs`` (the
    package's decode GEMV, None where it does not run), ``cpu_model`` (str), ``avx512`` (bool), ``amx_gemm``
    (bool: the package's GEMM takes bf16 weights on AMX tiles, ``native.amx_gemm_runs``; the package GEMM
    figures here use float32 weights, so they are its AVX-512 rate either way).
    Each rate also has a ``*_median`` twin. With ``quick=True`` the sizes are tiny (``QUICK_SIZES``) but the
    keys stay the same; the ``*_shape`` / ``read_bytes`` entries say what was actually run. ``operands``:
    where the tensors come from (fresh ones, freed at the end, by default).
    """
    sizes = QUICK_SIZES if quick else FULL_SIZES
    if repeats is not None:
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        sizes = dataclasses.replace(sizes, repeats=repeats)
    square = matmul_gflops(sizes.square_matmul, sizes.repeats, sizes.warmup, operands)
    vit_fc1 = matmul_gflops(sizes.vit_fc1_matmul, sizes.repeats, sizes.warmup, operands)
    square_gemm = package_gemm_gflops(sizes.square_matmul, sizes.repeats, sizes.warmup, operands)
    vit_fc1_gemm = package_gemm_gflops(sizes.vit_fc1_matmul, sizes.repeats, sizes.warmup, operands)
    read = read_bandwidth_gbs(sizes.read_bytes, sizes.repeats, sizes.warmup, operands)
    gemv = gemv_bandwidth_gbs(sizes.gemv_k_n, sizes.repeats, sizes.warmup, operands)
    package_gemv = package_gemv_bandwidth_gbs(sizes.gemv_k_n, sizes.repeats, sizes.warmup, operands)
    cpu_model, avx512 = cpu_info()
    from paddlemix_vl2.models.deepseek_vl2 import native  # as in package_gemm_gflops: only where it is measured

    return {
        "matmul_gflops_2048": square.best,
        "matmul_gflops_2048_median": square.median,
        "matmul_gflops_vit_fc1": vit_fc1.best,
        "matmul_gflops_vit_fc1_median": vit_fc1.median,
        "package_gemm_gflops_2048": square_gemm and square_gemm.best,
        "package_gemm_gflops_2048_median": square_gemm and square_gemm.median,
        "package_gemm_gflops_vit_fc1": vit_fc1_gemm and vit_fc1_gemm.best,
        "package_gemm_gflops_vit_fc1_median": vit_fc1_gemm and vit_fc1_gemm.median,
        "read_bandwidth_gbs": read.best,
        "read_bandwidth_gbs_median": read.median,
        "gemv_bandwidth_gbs": gemv.best,
        "gemv_bandwidth_gbs_median": gemv.median,
        "package_gemv_bandwidth_gbs": package_gemv and package_gemv.best,
        "package_gemv_bandwidth_gbs_median": package_gemv and package_gemv.median,
        "cpu_model": cpu_model,
        "avx512": avx512,
        "amx_gemm": native.amx_gemm_runs(),
        "square_matmul_shape": list(sizes.square_matmul),
        "vit_fc1_shape": list(sizes.vit_fc1_matmul),
        "read_bytes": sizes.read_bytes,
        "gemv_shape": [1, *sizes.gemv_k_n],
        "repeats": sizes.repeats,
        "quick": quick,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "mkl_debug_cpu_type": os.environ.get("MKL_DEBUG_CPU_TYPE"),
        "paddle_version": paddle.__version__,
    }


def format_table(result: dict) -> str:
    """A plain-text table of the rates and the CPU facts."""

    def shape(dims: Sequence[int]) -> str:
        return "×".join(str(dim) for dim in dims)

    rows = [
        (f"matmul fp32 {shape(result['square_matmul_shape'])}", "matmul_gflops_2048", "GFLOP/s"),
        (f"matmul fp32 {shape(result['vit_fc1_shape'])} (ViT fc1)", "matmul_gflops_vit_fc1", "GFLOP/s"),
        (f"package GEMM fp32 {shape(result['square_matmul_shape'])}", "package_gemm_gflops_2048", "GFLOP/s"),
        (f"package GEMM fp32 {shape(result['vit_fc1_shape'])}", "package_gemm_gflops_vit_fc1", "GFLOP/s"),
        (f"read: paddle.sum over {result['read_bytes'] / 2**20:.0f} MiB", "read_bandwidth_gbs", "GB/s"),
        (f"GEMV {shape(result['gemv_shape'])} fp32 (decode)", "gemv_bandwidth_gbs", "GB/s"),
        (f"package GEMV {shape(result['gemv_shape'])} fp32", "package_gemv_bandwidth_gbs", "GB/s"),
    ]
    width = max(len(label) for label, _, _ in rows)
    lines = [f"{'measurement':<{width}}  {'best':>9}  {'median':>9}  unit"]
    for label, key, unit in rows:
        if result[key] is None:
            lines.append(f"{label:<{width}}  {'-':>9}  {'-':>9}  (the package's kernel does not run here)")
            continue
        lines.append(f"{label:<{width}}  {result[key]:>9.1f}  {result[key + '_median']:>9.1f}  {unit}")
    lines.append(f"CPU: {result['cpu_model']}; avx512: {'yes' if result['avx512'] else 'no'}; "
                 f"AMX GEMM for bf16 weights: {'yes' if result['amx_gemm'] else 'no'}")
    lines.append(
        f"OMP_NUM_THREADS={result['omp_num_threads']}, MKL_DEBUG_CPU_TYPE={result['mkl_debug_cpu_type']}, "
        f"paddle {result['paddle_version']}, {result['repeats']} timed runs each"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure fp32 matmul rate and memory bandwidth with Paddle.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per measurement (default 10, quick 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    result = measure(quick=args.quick, repeats=args.repeats)
    print(format_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
