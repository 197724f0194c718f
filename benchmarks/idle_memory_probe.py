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
import time

import numpy as np

import roofline  # sets the process's threads and MKL variables before Paddle is imported

# The roofline's decode GEMV: a 512 MiB float32 weight.
GEMV_K_N = roofline.FULL_SIZES.gemv_k_n
# Matmul operands small enough to leave the weights alone while both cores work.
BUSY_MATMUL = (512, 1024, 1024)


def gemv_rate(operands: roofline.Operands) -> float:
    """GB/s of one decode GEMV over the weight ``operands`` holds: the package's where it runs, else
    Paddle's (they read the same tensor)."""
    rate = roofline.package_gemv_bandwidth_gbs(GEMV_K_N, 1, 0, operands)
    return (rate or roofline.gemv_bandwidth_gbs(GEMV_K_N, 1, 0, operands)).best


def busy_without(seconds: float, operands: roofline.Operands) -> None:
    """Matmuls on small operands for ``seconds``: both cores busy, the weights untouched."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        roofline.matmul_gflops(BUSY_MATMUL, 1, 0, operands)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=float, default=1.5, help="seconds of matmuls before each round of reads")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of reads (at least 2: each weight once first)")
    args = parser.parse_args()
    if args.rounds < 2 or args.idle < 0:
        parser.error("--rounds must be at least 2 and --idle at least 0")
    # One kept operand set per weight: each holds its own 512 MiB tensor of the same shape.
    weights = {name: roofline.Operands(keep=True) for name in ("A", "B")}
    busy = roofline.Operands(keep=True)
    # Untimed first reads: they also make the weights and start the kernels' threads.
    package = roofline.package_gemv_bandwidth_gbs(GEMV_K_N, 1, 0, weights["A"]) is not None
    gemv_rate(weights["B"])
    print(f"reads by {'the package GEMV' if package else 'Paddle matmul'}; GB/s")
    warm = {name: [] for name in weights}
    for _ in range(4):
        for name, operands in weights.items():
            warm[name].append(gemv_rate(operands))
    print("warm, in turn: " + "; ".join(f"{n} {' '.join(f'{r:.1f}' for r in rates)}" for n, rates in warm.items()))
    first_read = {name: [] for name in weights}  # read first after the pause
    second_read = {name: [] for name in weights}  # read right after the other weight
    for round_ in range(args.rounds):
        order = ["A", "B"] if round_ % 2 == 0 else ["B", "A"]
        busy_without(args.idle, busy)
        reads = [(name, gemv_rate(weights[name])) for _ in range(2) for name in order]
        first_read[reads[0][0]].append(reads[0][1])
        second_read[reads[1][0]].append(reads[1][1])
        print(f"after {args.idle:.2f} s of other work: " + ", ".join(f"{n} {r:.1f}" for n, r in reads))
    for name in weights:
        base = np.median(warm[name])
        print(f"{name}: warm median {base:.1f}; after a pause, read first {np.median(first_read[name]) / base:.2f} "
              f"of it, read second {np.median(second_read[name]) / base:.2f}")

if __name__ == "__main__":
    main()
