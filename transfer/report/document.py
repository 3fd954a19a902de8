"""Writes the whole report for a set of run dirs: ``report.md`` (``ap_vs_top1.png`` first, then
the table, legend, plot links, captions, notes), ``report.csv`` and the plots, all through
``pretrain.io.atomic_open``."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pretrain.io import atomic_write_text
from transfer.report.plots import (
    AP_VS_TOP1_CAPTION,
    AP_VS_TOP1_PAPER,
    HEALTH_CAPTION,
    HealthPlot,
    ScatterPoint,
    plot_ap_bars,
    plot_ap_vs_top1,
    plot_detection_curves,
    plot_pretrain_health,
    plot_pretrain_losses,
    plot_seed_probes,
)
from transfer.report.benchmarks import (
    PAPER_NOTE as BENCHMARK_PAPER_NOTE,
    benchmark_table,
    in_main_table,
    plot_benchmarks,
)
from transfer.report.rows import build_rows
from transfer.report.runs import Run, find_runs
from transfer.report.seeds import seed_rows, seed_table
from transfer.report.tables import format_value, markdown_table, write_csv

__all__ = ["PAPER_NOTE", "Report", "label_repeated_names", "make_report"]

PAPER_NOTE = (
    "[paper]: reference rows from the EqCo paper (docs/methods.md, 'Detection transfer'): "
    "Faster R-CNN R50-FPN, 4conv1fc head, SyncBN, 1x schedule, COCO val2017 box AP; not run "
    "here. Only the values the table states are shown."
)


@dataclass
class Report:
    """What :func:`make_report` wrote: the markdown table, its rows, the files and the notes."""

    markdown: str
    rows: list[dict[str, Any]]
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seeds_markdown: str = ""  # the linear evals over seeds ("" without a multi-seed pre-training)
    points: list[ScatterPoint] = field(default_factory=list)  # what ap_vs_top1.png shows
    skipped: list[str] = field(default_factory=list)  # why each unreadable run was left out
    benchmarks_markdown: str = ""  # the benchmark table ("" without benchmark runs)


def label_repeated_names(runs: list[Run]) -> None:
    """Distinct legend labels: every pretraining or detection run whose label is shared with
    another run of its kind becomes ``name (its folder)``."""
    for kind in ("pretrain", "detection"):
        same_kind = [r for r in runs if r.kind == kind]
        counts = Counter(r.label for r in same_kind)
        for run in same_kind:
            if counts[run.label] > 1:
                run.label = f"{run.name} ({run.folder})"


def make_report(
    paths: list[str], out_dir: str, paper: bool = False, strict: bool = False
) -> Report:
    """Read the runs under ``paths``; write report.md, report.csv and PNG plots to ``out_dir``.
    A run that cannot be read is left out and listed in the notes (``strict``: an error)."""
    skipped: list[str] = []
    runs = find_runs(paths, skipped=None if strict else skipped)
    rows, notes = build_rows(runs, paper)
    notes = [f"left out, unreadable: {reason}" for reason in skipped] + notes
    label_repeated_names(runs)
    per_seed, seed_notes = seed_rows(runs)
    notes += seed_notes
    table = markdown_table(rows)
    bench = benchmark_table(
        runs, {r["name"]: (r.get("top1"), r.get("knn_top1")) for r in rows}, paper
    )
    notes += bench.notes if bench else []
    os.makedirs(out_dir, exist_ok=True)
    files = []
    health: list[HealthPlot] = []
    points: list[ScatterPoint] = []

    def plot_points(path: str) -> bool:
        points.extend(plot_ap_vs_top1(rows, per_seed, path))
        return bool(points)

    def plot_health(path: str) -> bool:
        drawn = plot_pretrain_health(runs, path)
        health.extend([drawn] if drawn else [])
        return drawn is not None

    # what=None: no note when absent (runs from before the health metrics simply have none)
    plots: list[tuple[str, str | None, Any]] = [
        ("ap_vs_top1.png", "AP vs top-1 plot", plot_points),
        ("ap_bars.png", "AP bars", lambda p: plot_ap_bars(rows, p)),
        ("pretrain_loss.png", "pretraining loss curves", lambda p: plot_pretrain_losses(runs, p)),
        (
            "detection_curves.png",
            "detection loss/AP curves",
            lambda p: plot_detection_curves([r for r in runs if in_main_table(r)], p),
        ),
        ("benchmarks.png", None, lambda p: bench is not None and plot_benchmarks(bench, p)),
        ("pretrain_health.png", None, plot_health),
        ("lincls_seeds.png", None, lambda p: plot_seed_probes(per_seed, p)),
    ]
    written = []
    for filename, what, plot in plots:
        path = os.path.join(out_dir, filename)
        if plot(path):
            written.append(filename)
            files.append(path)
        elif what:
            notes.append(f"no {what}: none of the runs has the data (metrics.json / AP).")
    for drawn in health:
        notes += drawn.notes

    md = ["# Pre-training comparison", ""]
    if "ap_vs_top1.png" in written:
        caption = AP_VS_TOP1_CAPTION + (AP_VS_TOP1_PAPER if any(p.paper for p in points) else "")
        md += ["![ap_vs_top1.png](ap_vs_top1.png)", "", caption, ""]
    md += [table, ""]
    if paper:
        md += [PAPER_NOTE, ""]
    settings = {(r["knn_k"], r["knn_t"]) for r in rows if r.get("knn_k") is not None}
    knn = "k and T in report.csv"
    if len(settings) == 1:
        k, t = settings.pop()
        knn = f"k={k}, T={format_value('knn_t', t)}"
    md += [
        'Missing values are shown as "-". AP: COCO box AP (%) of the detection run; top-1: '
        "linear-eval top-1 (%); kNN: weighted kNN top-1 (%) of the same frozen backbone on the "
        f"same val split ({knn}); retrieval: instance-retrieval top-1 (%) of that backbone, two "
        "augmented views of each of the val images in report.csv's retrieval_images (chance: 100 "
        "/ that number), the same views for every backbone; val: images in that val split; "
        "seed: the pretraining SEED; "
        "K: negatives per query; alpha: EqCo's alpha.",
        "",
    ]
    if bench is not None:
        md += [
            "## Transfer benchmarks",
            "",
            "Detection transfer by the protocols SSL papers report (tools/benchmark.py; "
            "docs/methods.md, 'Transfer protocols'): mean ± sample sd over the detection SEEDs; "
            "VOC: Pascal VOC AP50 / AP / AP75 (%) on the test split; box / mask AP: COCO AP (%).",
            "",
            bench.markdown,
            "",
        ]
        if paper:
            md += [BENCHMARK_PAPER_NOTE, ""]
        if "benchmarks.png" in written:
            md += ["![benchmarks.png](benchmarks.png)", ""]
    seeds_md = seed_table(per_seed) if per_seed else ""
    if seeds_md:
        md += [
            "Linear evaluation over seeds (pretraining SEED; for random init the SEED that drew "
            "the weights): one row per seed, then the mean +- sample sd.",
            "",
            seeds_md,
            "",
        ]
    md += [
        f"![{name}]({name})" for name in written if name not in ("ap_vs_top1.png", "benchmarks.png")
    ]
    if "pretrain_health.png" in written:
        md += ["", HEALTH_CAPTION]
    if notes:
        md += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    md_path, csv_path = os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.csv")
    atomic_write_text(md_path, "\n".join(md) + "\n")
    write_csv(rows, csv_path)
    return Report(
        table, rows, [md_path, csv_path] + files, notes, seeds_md, points, skipped=skipped,
        benchmarks_markdown=bench.markdown if bench else "",
    )
