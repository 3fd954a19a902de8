"""Shared by the bench scripts: append a result row to bench/results.md with machine and versions."""
import datetime
import os
import platform

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.md")


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.node()}: {os.cpu_count()} CPU cores, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def append_result(name: str, row: str) -> None:
    """Append ``row`` (a markdown table row) under a dated heading naming the machine."""
    new = not os.path.exists(RESULTS)
    with open(RESULTS, "a") as f:
        if new:
            f.write("# Benchmark results\n\nWritten by `make bench` (bench/*.py); newest last.\n")
        f.write(f"\n## {name}, {datetime.date.today().isoformat()}, {machine()}\n\n")
        f.write("| what | reference | ours | ratio |\n|---|---|---|---|\n")
        f.write(row + "\n")
