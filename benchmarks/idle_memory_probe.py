"""Does this machine slow down the first read of memory that sat idle for a moment?

A decode step streams every weight once. On the Intel benchmark guest (2026-12-04) the first step after a
prefill took 1.9-2.7x the median step in every section of `bench_infer.py`, its first layers the slowest.
This probe asks the same of plain memory, with no model: two float32 weights of 512 MiB are read by the
decode GEMV until warm; then, in each round, ``--idle`` seconds of matmuls on other operands (the weights
untouched) are followed by two reads of each weight, in turn, the weight read first alternating by round.

    .venv/bin/python benchmarks/idle_memory_probe.py [--idle 1.5] [--rounds 4]

It prints GB/s per read (the unit of `bench_infer.py`) and, per weight, its reads after the pause over
its warm median, as the first weight read and as the second. Well below 1 as the first read means the
host penalises memory left idle (or the switch back to streaming it), and a decode step pays it; warm
rates that differ between the two weights mean they sit in memory of different speed.
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


def gemv_rate(x: paddle.Tensor, weight: paddle.Tensor) -> float:
    """GB/s of one decode GEMV over ``weight`` (the package's kernel where it runs, else Paddle's)."""
    start = time.perf_counter()
    if native.few_rows_applies(x, weight, 1):
        native.few_rows_linear(x, weight)
    else:
        paddle.matmul(x, weight, transpose_y=True).numpy()
    return weight.numel().item() * 4 / 1e9 / (time.perf_counter() - start)


def busy_without(seconds: float, a: paddle.Tensor, b: paddle.Tensor) -> None:
    """Matmuls on small operands for ``seconds``: both cores busy, the weights untouched."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        paddle.matmul(a, b).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=float, default=1.5, help="seconds of matmuls before each round of reads")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of reads (at least 2: each weight once first)")
    args = parser.parse_args()
    if args.rounds < 2 or args.idle < 0:
        parser.error("--rounds must be at least 2 and --idle at least 0")
    rng = np.random.default_rng(0)
    weights = {name: paddle.to_tensor(rng.standard_normal(WEIGHT_SHAPE, dtype=np.float32)) for name in ("A", "B")}
    x = paddle.to_tensor(rng.standard_normal((1, WEIGHT_SHAPE[1]), dtype=np.float32))
    a = paddle.to_tensor(rng.standard_normal((512, 1024), dtype=np.float32))
    b = paddle.to_tensor(rng.standard_normal((1024, 1024), dtype=np.float32))
    with paddle.no_grad():
        kernel = "the package's GEMV" if native.few_rows_applies(x, weights["A"], 1) else "Paddle's matmul"
        print(f"reads by {kernel}; GB/s")
        for weight in weights.values():
            gemv_rate(x, weight)  # untimed: the first call also starts the kernels' threads
        warm = {name: [] for name in weights}
        for _ in range(4):
            for name, weight in weights.items():
                warm[name].append(gemv_rate(x, weight))
        print("warm, in turn: " + "; ".join(f"{n} {' '.join(f'{r:.1f}' for r in rates)}" for n, rates in warm.items()))
        first_read = {name: [] for name in weights}  # read first after the pause
        second_read = {name: [] for name in weights}  # read right after the other weight
        for round_ in range(args.rounds):
            order = ["A", "B"] if round_ % 2 == 0 else ["B", "A"]
            busy_without(args.idle, a, b)
            reads = [(name, gemv_rate(x, weights[name])) for _ in range(2) for name in order]
            first_read[reads[0][0]].append(reads[0][1])
            second_read[reads[1][0]].append(reads[1][1])
            print(f"after {args.idle:.2f} s of other work: " + ", ".join(f"{n} {r:.1f}" for n, r in reads))
        for name in weights:
            base = np.median(warm[name])
            print(f"{name}: warm median {base:.1f}; after a pause, read first {np.median(first_read[name]) / base:.2f} "
                  f"of it, read second {np.median(second_read[name]) / base:.2f}")


if __name__ == "__main__":
    main()
