"""Shared by the bench scripts: append a dated entry (machine, versions, command, tables) to
bench/results.md."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from collections.abc import Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
RESULTS = os.path.join(ROOT, "bench", "results.md")
# the columns of an overhead measurement: what, reference figure, our figure, ours / reference
RATIO_HEADER = ("what", "reference", "ours", "ratio")

Table = tuple[Sequence[str], Sequence[str]]  # (header cells, markdown rows "| a | b |")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """Host, CPU model, cores, torch intra-op threads and GPU (or "no GPU")."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.node()}: {_cpu_model()}, {os.cpu_count()} CPU cores "
        f"(torch threads {torch.get_num_threads()}), {gpu}"
    )


def versions() -> str:
    """Python, torch (+ CUDA when available), torchvision and detectron2 (when importable)."""
    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        parts.append(f"CUDA {torch.version.cuda}")
    try:
        import torchvision

        parts.append(f"torchvision {torchvision.__version__}")
    except ImportError:
        parts.append("torchvision not installed")
    try:
        import detectron2

        parts.append(f"detectron2 {detectron2.__version__}")
    except ImportError:
        parts.append("detectron2 not installed")
    return ", ".join(parts)


def markdown_table(header: Sequence[str], rows: Sequence[str]) -> str:
    """A markdown table: ``header`` cells, then ``rows`` (already formatted ``| a | b |`` lines)."""
    head = "| " + " | ".join(header) + " |"
    rule = "|" + "---|" * len(header)
    return "\n".join([head, rule, *rows])


def append_result(name: str, tables: Sequence[Table], notes: Sequence[str] = ()) -> None:
    """Append an entry to bench/results.md: a heading with ``name`` and the date and time, the
    command line, :func:`machine`, :func:`versions`, ``notes`` (one bullet each), then ``tables``
    (``(header, rows)`` pairs; use :data:`RATIO_HEADER` for reference-vs-ours rows)."""
    new = not os.path.exists(RESULTS)
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    command = " ".join([script, *sys.argv[1:]])
    bullets = [f"command: `{command}`", f"machine: {machine()}", f"versions: {versions()}"]
    bullets += list(notes)
    with open(RESULTS, "a") as f:
        if new:
            f.write("# Benchmark results\n\nWritten by `make bench` (bench/*.py); newest last.\n")
        f.write(f"\n## {name}, {now}\n\n")
        f.write("".join(f"- {b}\n" for b in bullets))
        f.writelines("\n" + markdown_table(header, rows) + "\n" for header, rows in tables)
