"""Does this machine slow down the first read of memory that sat idle for a moment?

A decode step streams every weight once. On the Intel benchmark guest (2026-12-04) the first step after a
prefill took 1.9-2.7x the median step in every section of `bench_infer.py`, its first layers the slowest.
This probe asks the same of plain memory, with no model: two float32 weights of 512 MiB are read in turn
by the decode GEMV until warm, then after a few seconds of matmuls on other operands (the weights
untouched) each is read twice more, in turn.

    .venv/bin/python benchmarks/idle_memory_probe.py [--idle 1.5] [--rounds 3]

It prints GiB/s per read and, per weight, its first read after the pause over its warm median. Well
below 1 means the host penalises memory left idle (or the switch back to streaming it), and the model's
first decode step pays it; warm rates that differ between the two weights mean they sit in memory of
different speed.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from paddlemix_vl2.models.deepseek_vl2 import native  # noqa: E402

WEIGHT_SHAPE = (16384, 8192)  # [N, K] float32: 512 MiB, the roofline's decode GEMV
GIB = 1 << 30


def gemv_rate(x: paddle.Tensor, weight: paddle.Tensor) -> float:
    """GiB/s of one decode GEMV over ``weight`` (the package's kernel where it runs, else Paddle's)."""
    start = time.perf_counter()
    if native.few_rows_applies(x, weight, 1):
        native.few_rows_linear(x, weight)
    else:
        paddle.matmul(x, weight, transpose_y=True).numpy()
    return weight.numel().item() * 4 / GIB / (time.perf_counter() - start)


def busy_without(seconds: float, a: paddle.Tensor, b: paddle.Tensor) -> None:
    """Matmuls on small operands for ``seconds``: both cores busy, the weights untouched."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        paddle.matmul(a, b).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=float, default=1.5, help="seconds of matmuls between the reads")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    first, second = (paddle.to_tensor(rng.standard_normal(WEIGHT_SHAPE, dtype=np.float32)) for _ in range(2))
    x = paddle.to_tensor(rng.standard_normal((1, WEIGHT_SHAPE[1]), dtype=np.float32))
    a = paddle.to_tensor(rng.standard_normal((512, 1024), dtype=np.float32))
    b = paddle.to_tensor(rng.standard_normal((1024, 1024), dtype=np.float32))
    weights = {"first": first, "second": second}
    with paddle.no_grad():
        warm = {name: [] for name in weights}
        for _ in range(4):
            for name, weight in weights.items():
                warm[name].append(gemv_rate(x, weight))
        print("warm reads: " + "; ".join(f"{name} {' '.join(f'{r:.1f}' for r in rates)}" for name, rates in warm.items())
              + " GiB/s")
        after = {name: [] for name in weights}
        for _ in range(args.rounds):
            busy_without(args.idle, a, b)
            rates = [(name, gemv_rate(x, weight)) for _ in range(2) for name, weight in weights.items()]
            for name, rate in rates[:2]:
                after[name].append(rate)
            print(f"after {args.idle:.1f} s of other work, in turn: " + ", ".join(f"{n} {r:.1f}" for n, r in rates)
                  + " GiB/s")
        for name in weights:
            print(f"{name}: warm median {np.median(warm[name]):.1f} GiB/s; first read after a pause "
                  f"{np.median(after[name]) / np.median(warm[name]):.2f} of it")

if __name__ == "__main__":
    main()
