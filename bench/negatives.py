#!/usr/bin/env python
"""Cost of drawing SiMo's negatives per step: the former draw (on the CPU, top-K of uniform noise
for every query of the global batch, then this process's rows kept) against the current one
(``pretrain.losses.sample_batch_negatives(..., rows=...)`` on the model's device: the same noise,
top-K for this process's rows only). Both give the same indices for the same generator state
(tests/pretrain/test_losses.py); this measures the time.

    python bench/negatives.py                      # N = 256, 1024, 4096; 8 processes; K = 16
    python bench/negatives.py --world 64 --device cuda

Prints one JSON line per N and appends a table to bench/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import RATIO_HEADER, append_result  # noqa: E402
from pretrain.losses import sample_batch_negatives  # noqa: E402


def former(n: int, k: int, rank: int, local: int, device: torch.device, g) -> torch.Tensor:
    """The draw before: whole global batch on the CPU, rows sliced, then copied to the device."""
    idx = sample_batch_negatives(n, k, generator=g, shared=False)
    return idx[rank * local : (rank + 1) * local].to(device)


def current(n: int, k: int, rank: int, local: int, device: torch.device, g) -> torch.Tensor:
    return sample_batch_negatives(
        n, k, generator=g, shared=False, device=device, rows=slice(rank * local, (rank + 1) * local)
    )


def _time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--world", type=int, default=8, help="processes sharing the global batch")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for n in args.sizes:
        local = n // args.world
        cpu_g = torch.Generator().manual_seed(0)
        dev_g = torch.Generator(device=device).manual_seed(0)
        # same generator state -> same indices (on the CPU; a CUDA generator draws other numbers)
        if device.type == "cpu":
            a = former(n, args.k, 1, local, device, torch.Generator().manual_seed(1))
            b = current(n, args.k, 1, local, device, torch.Generator().manual_seed(1))
            assert torch.equal(a, b)
        t_former = _time(lambda: former(n, args.k, 0, local, device, cpu_g), args.repeats, device)
        t_current = _time(lambda: current(n, args.k, 0, local, device, dev_g), args.repeats, device)
        record = {
            "n": n,
            "world": args.world,
            "k": args.k,
            "device": str(device),
            "former_ms": 1e3 * t_former,
            "current_ms": 1e3 * t_current,
            "ratio": t_current / t_former,
        }
        print(json.dumps(record))
        rows.append(
            f"| N={n}, {args.world} processes, K={args.k}, {device} | {1e3 * t_former:.2f} ms "
            f"| {1e3 * t_current:.2f} ms | {t_current / t_former:.2f} |"
        )
    append_result(
        "negatives.py: drawing SiMo's negatives per step",
        [(RATIO_HEADER, rows)],
        notes=["reference = former draw (CPU, all rows, then sliced); ours = rows on the device"],
    )


if __name__ == "__main__":
    main()
