"""Results of the K-sweep: the rows of the finished cells and random-init baselines (read from
their ``results.json`` / ``metrics.json`` / ``timing.json``), their mean +- std over seeds, and the
files ``OUT/sweep.csv`` (one row per cell x seed, then one ``random_init`` row per seed with top-1 /
top-5 / kNN only) and ``OUT/sweep.md`` (tables per (loss, K), the random-init top-1 after them).
``OUT/sweep.png`` is drawn by :mod:`ksweep_plot`; :func:`ksweep_run.write_outputs` writes all three.
"""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Dict, List, Tuple

from pretrain.grad_norm import read_grad_norms
from pretrain.io import atomic_open, atomic_write_text, read_json

from .ksweep_plan import BASELINE_LOSS, SweepPlan, unique

__all__ = [
    "CSV_COLUMNS",
    "collect_rows",
    "split_rows",
    "baseline_top1",
    "summarize",
    "write_csv",
    "write_markdown",
    "arch_label",
    "loss_label",
]

CSV_COLUMNS = (
    "loss",
    "k",
    "alpha",
    "seed",
    "top1",
    "top5",
    "knn_top1",
    "final_loss",
    "grad_norm",
    "pretrain_seconds",
)
_METRICS = ("top1", "top5", "knn_top1", "grad_norm", "final_loss")
# the header's words for the methods the sweep runs (ksweep_plan.SWEEP_K_KEYS) and what K is there
_METHOD_NAMES = {"simo": "SiMo", "mocov2": "MoCo v2"}
_K_MEANING = {"simo": "in-batch negatives per query", "mocov2": "queue length"}


def collect_rows(plan: SweepPlan) -> List[Dict[str, Any]]:
    """One row per finished cell (CSV_COLUMNS): top-1/top-5 of the linear evaluation, the final
    pretraining loss, ``grad_norm`` = mean of the logged ``grad_norm_q`` over the run, and the
    wall time of the pretraining subprocess(es); then one row per finished random-init baseline:
    loss ``random_init``, its seed, top-1/top-5, the rest NaN (empty in the csv)."""
    rows = []
    for cell in plan.cells:
        if not plan.finished(cell):
            continue
        lin = read_json(os.path.join(plan.lincls_dir(cell), "results.json")) or {}
        pre = read_json(os.path.join(plan.pretrain_dir(cell), "results.json")) or {}
        timing = read_json(os.path.join(plan.cell_dir(cell), "timing.json")) or {}
        norms = read_grad_norms(os.path.join(plan.pretrain_dir(cell), "metrics.json"))
        rows.append(
            {
                "loss": cell.loss,
                "k": cell.k,
                "alpha": cell.alpha,
                "seed": cell.seed,
                "top1": _float(lin.get("top1")),
                "top5": _float(lin.get("top5")),
                "knn_top1": _float(lin.get("knn_top1")),
                "final_loss": _float(pre.get("final_loss")),
                "grad_norm": sum(norms) / len(norms) if norms else math.nan,
                "pretrain_seconds": _float(timing.get("pretrain_seconds")),
            }
        )
    for base in plan.baselines:
        if not plan.finished(base):
            continue
        lin = read_json(os.path.join(plan.lincls_dir(base), "results.json")) or {}
        row: Dict[str, Any] = {c: math.nan for c in CSV_COLUMNS}
        row.update(
            loss=BASELINE_LOSS,
            seed=base.seed,
            top1=_float(lin.get("top1")),
            top5=_float(lin.get("top5")),
            knn_top1=_float(lin.get("knn_top1")),
        )
        rows.append(row)
    return rows


def _float(x: Any) -> float:
    return math.nan if x is None else float(x)


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _mean_std(values: List[float]) -> tuple:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan, 0
    mean = sum(values) / len(values)
    # sample standard deviation over seeds (0 for a single seed)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var), len(values)


def split_rows(
    rows: List[Dict[str, Any]],
) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """``(cell rows, random-init baseline rows)``."""
    cells = [r for r in rows if r["loss"] != BASELINE_LOSS]
    return cells, [r for r in rows if r["loss"] == BASELINE_LOSS]


def baseline_top1(rows: List[Dict[str, Any]], metric: str = "top1") -> tuple:
    """``(mean, std, n)`` of the random-init baseline's top-1 (or ``metric``) over seeds."""
    return _mean_std([r.get(metric, math.nan) for r in split_rows(rows)[1]])


def summarize(rows: List[Dict[str, Any]]) -> Dict[tuple, Dict[str, float]]:
    """``(loss, k) -> {"top1": (mean, std, n), "top5": ..., "grad_norm": ..., "final_loss": ...}``
    over seeds (sample std), in the order the cells first appear; the random-init baseline's rows
    are left out (see :func:`baseline_top1`)."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in split_rows(rows)[0]:
        groups.setdefault((r["loss"], r["k"]), []).append(r)
    return {
        key: {m: _mean_std([r.get(m, math.nan) for r in rs]) for m in _METRICS}
        for key, rs in groups.items()
    }


def write_csv(rows: List[Dict[str, Any]], path: str) -> str:
    """``sweep.csv``: CSV_COLUMNS, NaN as an empty field."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(CSV_COLUMNS))
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if _isnan(v) else v for k, v in r.items()})
    # binary: the csv module's \r\n line ends reach the file as they are on every platform
    with atomic_open(path, "wb") as f:
        f.write(text.getvalue().encode("utf-8"))
    return path


def _fmt(stat: tuple, digits: int) -> str:
    mean, std, n = stat
    if n == 0:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" + (f" (n={n})" if n != 1 else " (1 seed)")


def arch_label(arch: str) -> str:
    """``resnet18`` -> ``ResNet-18``; other torchvision names as they are."""
    digits = arch[len("resnet") :]
    return f"ResNet-{digits}" if arch.startswith("resnet") and digits.isdigit() else arch


def loss_label(loss: str, alphas: Dict[str, float]) -> str:
    """A loss as a table header / legend entry: ``eqco (alpha=256)``, ``infonce (alpha=K)``."""
    if loss == "eqco":
        return f"eqco (alpha={alphas[loss]:g})"
    return "infonce (alpha=K)" if loss == "infonce" else loss


def write_markdown(plan: SweepPlan, rows: List[Dict[str, Any]], path: str) -> str:
    """Top-1 (and the gradient norm, final loss) mean ± sample std over seeds per (loss, K);
    after the top-1 table, the random-init baseline's top-1 (mean ± sample std over seeds)."""
    cell_rows, base_rows = split_rows(rows)
    stats = summarize(rows)
    losses = unique(r["loss"] for r in cell_rows)
    ks = sorted(unique(r["k"] for r in cell_rows))
    any_cfg = next(iter(plan.pretrain_cfgs.values()))
    alphas = {c.loss: c.alpha for c in plan.cells}
    head = " | ".join(loss_label(x, alphas) for x in losses)
    finished = f"{len(cell_rows)} of {len(plan.cells)} cells"
    if plan.baselines:
        finished += f" and {len(base_rows)} of {len(plan.baselines)} random-init baselines"
    lines = [
        "# K-sweep: linear-eval top-1 vs negatives per query",
        "",
        f"{_METHOD_NAMES.get(any_cfg.MODEL.METHOD, any_cfg.MODEL.METHOD)} "
        f"{any_cfg.MODEL.ARCH}, {any_cfg.INPUT.SIZE} px, global batch "
        f"N={any_cfg.SOLVER.IMS_PER_BATCH}, K = {_K_MEANING.get(any_cfg.MODEL.METHOD, 'K')}, "
        f"{any_cfg.SOLVER.MAX_ITER or any_cfg.SOLVER.EPOCHS} "
        f"{'iterations' if any_cfg.SOLVER.MAX_ITER else 'epochs'}, data {any_cfg.DATASETS.ROOT}; "
        f"{finished} finished. Mean ± sample std over seeds.",
        "",
    ]
    twins = unique(f"K={c.k}" for c in plan.cells if c.same_as)
    if twins:
        lines += [
            f"InfoNCE at {', '.join(twins)} = alpha is the EqCo loss itself (the shift "
            "log(alpha/K) is 0): those cells are the EqCo cells, run once.",
            "",
        ]
    for title, metric, digits in (
        ("Linear-eval top-1 (%)", "top1", 2),
        ("kNN top-1 of the frozen backbone (%), same features", "knn_top1", 2),
        ("Gradient norm of the loss w.r.t. q (mean over training)", "grad_norm", 3),
        ("Final pretraining loss", "final_loss", 3),
    ):
        lines += [f"## {title}", ""]
        if cell_rows:
            lines += [f"| K | {head} |", "|---|" + "---|" * len(losses)]
        else:
            lines.append("No cell finished yet.")
        for k in ks:
            entries = [
                _fmt(stats[(x, k)][metric], digits) if (x, k) in stats else "n/a" for x in losses
            ]
            lines.append(f"| {k} | " + " | ".join(entries) + " |")
        lines.append("")
        if metric in ("top1", "knn_top1") and plan.baselines:
            lines += [
                f"Random-init {arch_label(plan.baselines[0].arch)}, same evaluation: "
                f"{_fmt(baseline_top1(rows, metric), 2)}",
                "",
            ]
    atomic_write_text(path, "\n".join(lines))
    return path

