"""Running the K-sweep planned by :mod:`ksweep_plan`: every unfinished random-init baseline, then
every unfinished cell, each stage a subprocess of a tool beside this folder (``tools/pretrain.py``,
``tools/lincls.py``), with the outputs rewritten after each run.

Each stage starts from a clean process (loggers, seeds, threads). A cell is finished exactly when
its ``lincls/results.json`` exists, so re-running the sweep skips finished cells and baselines and
resumes a half-trained cell from its last checkpoint (``--resume``); a cell whose pretraining
finished (``results.json`` and ``model_final.pth``) only runs its linear evaluation again.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from pretrain.io import UserError, atomic_save, atomic_write_text, read_json, read_metrics

from .ksweep_plan import SweepBaseline, SweepCell, SweepEntry, SweepPlan
from .ksweep_plot import write_plot
from .ksweep_results import collect_rows, write_csv, write_markdown

__all__ = ["run_sweep", "run_cell", "run_baseline", "write_random_init", "write_outputs"]

logger = logging.getLogger(__name__)


def _last_iteration(metrics_path: str) -> Optional[int]:
    """Iterations done by the run writing ``metrics_path`` (the last logged one + 1), or None."""
    done = [series[-1][0] for series in read_metrics(metrics_path).values() if series]
    return max(done) + 1 if done else None


def _run_stage(
    cmd: List[str],
    log_path: str,
    describe: str,
    on_poll: Optional[Callable[[], None]],
    timing: str,
    timing_key: str,
) -> None:
    """Run one stage as a subprocess (its output to ``log_path``); its wall time, finished or not,
    accumulates under ``timing_key`` in the JSON file ``timing`` (over attempts).

    A failure raises :class:`UserError` with the last lines of the stage's output."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.perf_counter()
    try:
        rc = _run_logged(cmd, log_path, on_poll)
    finally:
        _add_seconds(timing, timing_key, time.perf_counter() - start)
    if rc != 0:
        with open(log_path, errors="replace") as f:
            tail = "".join(f.readlines()[-5:]).strip()
        raise UserError(
            f"{describe} failed (exit status {rc}); its output is in {log_path}; "
            f"last lines:\n{tail}"
        )


def _run_logged(cmd: List[str], log_path: str, on_poll: Optional[Callable[[], None]]) -> int:
    """``cmd`` with its output appended to ``log_path``, ``on_poll()`` every 2 s; its exit
    status. An interrupt (Ctrl-C) stops the child too; the cell resumes next time."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    return proc.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    if on_poll is not None:
                        on_poll()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise


def _add_seconds(path: str, key: str, seconds: float) -> None:
    data = read_json(path) or {}
    data[key] = float(data.get(key, 0.0)) + seconds
    atomic_write_text(path, json.dumps(data, indent=2))


def run_cell(
    plan: SweepPlan, cell: SweepCell, on_poll: Optional[Callable[[str], None]] = None
) -> None:
    """Pretrain (resuming from the cell's last checkpoint, if any) unless already done, then
    linear-evaluate. Wall times accumulate in ``<cell>/timing.json`` over attempts."""
    cell_dir = plan.cell_dir(cell)
    timing = os.path.join(cell_dir, "timing.json")
    pre_dir = plan.pretrain_dir(cell)
    os.makedirs(cell_dir, exist_ok=True)
    if not (
        os.path.isfile(os.path.join(pre_dir, "results.json"))
        and os.path.isfile(os.path.join(pre_dir, "model_final.pth"))
    ):
        metrics = os.path.join(pre_dir, "metrics.json")

        def poll_pretrain() -> None:
            if on_poll is not None:
                it = _last_iteration(metrics)
                on_poll(f"{cell.name}: pretraining" + (f", iteration {it}" if it else ""))

        _run_stage(
            plan.pretrain_cmds[cell.name],
            os.path.join(cell_dir, "pretrain.out"),
            f"pretraining of cell {cell.name}",
            poll_pretrain,
            timing,
            "pretrain_seconds",
        )
    _run_lincls(plan, cell, f"cell {cell.name}", on_poll)


def _run_lincls(
    plan: SweepPlan, entry: SweepEntry, what: str, on_poll: Optional[Callable[[str], None]]
) -> None:
    """The linear-eval stage of a cell or baseline; its wall time accumulates in
    ``<entry>/timing.json`` (``lincls_seconds``)."""
    entry_dir = plan.entry_dir(entry)
    if on_poll is not None:
        on_poll(f"{entry.name}: linear eval")
    _run_stage(
        plan.lincls_cmds[entry.name],
        os.path.join(entry_dir, "lincls.out"),
        f"linear evaluation of {what}",
        (lambda: on_poll(f"{entry.name}: linear eval")) if on_poll else None,
        os.path.join(entry_dir, "timing.json"),
        "lincls_seconds",
    )


def write_random_init(arch: str, seed: int, path: str) -> str:
    """Save (atomically) the state dict of ``getattr(torchvision.models, arch)()`` built right
    after ``torch.manual_seed(seed)``: torchvision's own initialisation, the same tensors for the
    same seed (and torch version). The caller's random state is left as it was."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = getattr(torchvision.models, arch)()
    atomic_save(net.state_dict(), path)
    return path


def run_baseline(
    plan: SweepPlan, baseline: SweepBaseline, on_poll: Optional[Callable[[str], None]] = None
) -> None:
    """Write the baseline's ``random_init.pth`` unless it exists, then linear-evaluate it."""
    os.makedirs(plan.baseline_dir(baseline), exist_ok=True)
    weights = plan.random_init_path(baseline)
    if not os.path.isfile(weights):
        write_random_init(baseline.arch, baseline.seed, weights)
    _run_lincls(plan, baseline, f"the random-init baseline {baseline.name}", on_poll)


def run_sweep(plan: SweepPlan, train: bool = True, progress: bool = True) -> Dict[str, Any]:
    """Run every unfinished random-init baseline of ``plan`` (first: cheap, and the reference
    for every top-1 that follows), then every unfinished cell, with one tqdm bar over both (its
    ETA is from the runs so far, so it is low while the baselines run), rewriting ``sweep.csv`` /
    ``sweep.md`` / ``sweep.png`` after each so partial results are visible. With
    ``train=False`` only the outputs are (re)written.

    Returns ``{"ran": [names], "skipped": [names], "rows": csv rows, "files": paths}`` (names of
    baselines and cells, baselines first)."""
    from tqdm import tqdm

    os.makedirs(plan.out, exist_ok=True)
    entries: List[SweepEntry] = [*plan.baselines, *plan.runs]
    done = [e for e in entries if plan.finished(e)]
    todo = [e for e in entries if not plan.finished(e)] if train else []
    if done:
        logger.info(
            "K-sweep: %d of %d runs (cells and random-init baselines) already finished, "
            "skipped: %s",
            len(done),
            len(entries),
            " ".join(e.name for e in done),
        )
    ran: List[str] = []
    if todo:
        bar = tqdm(
            total=len(entries),
            initial=len(done),
            desc="K-sweep",
            unit="run",
            disable=not progress,
            dynamic_ncols=True,
        )
        try:
            for entry in todo:
                bar.set_postfix_str(entry.name, refresh=True)
                run = run_baseline if isinstance(entry, SweepBaseline) else run_cell
                run(plan, entry, on_poll=lambda s: bar.set_postfix_str(s, refresh=True))
                ran.append(entry.name)
                bar.update(1)
                write_outputs(plan)
        finally:
            bar.close()
    files = write_outputs(plan)
    rows = collect_rows(plan)
    if not rows:
        logger.warning("K-sweep: no finished cell or baseline yet; nothing to tabulate.")
    return {"ran": ran, "skipped": [e.name for e in done], "rows": rows, "files": files}


def write_outputs(plan: SweepPlan) -> Dict[str, str]:
    """``sweep.csv``, ``sweep.md``, ``sweep.png`` in the sweep's directory, from the finished
    cells and baselines (the csv always; the table and plot once either is finished)."""
    rows = collect_rows(plan)
    files = {"csv": write_csv(rows, os.path.join(plan.out, "sweep.csv"))}
    if rows:
        files["md"] = write_markdown(plan, rows, os.path.join(plan.out, "sweep.md"))
        files["png"] = write_plot(rows, os.path.join(plan.out, "sweep.png"))
    return files
