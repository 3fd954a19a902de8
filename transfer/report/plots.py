"""Draws the report's plots from the runs' metrics.json and the rows: ``ap_bars.png``,
``pretrain_loss.png``, ``detection_curves.png``, ``pretrain_health.png`` and ``lincls_seeds.png``.

Each ``plot_*`` function writes its PNG through ``pretrain.io.save_figure`` (atomic) and returns
whether it drew anything (nothing is written when no run has the data).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pretrain.io import read_metrics, save_figure
from transfer.report.runs import Run, as_count, as_number, config_knn
from transfer.report.seeds import SEED_METRICS
from transfer.report.tables import format_value

__all__ = [
    "HEALTH_CAPTION",
    "HEALTH_PANELS",
    "HealthPlot",
    "plot_ap_bars",
    "plot_detection_curves",
    "plot_pretrain_health",
    "plot_pretrain_losses",
    "plot_seed_probes",
]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed (servers, CI)
    import matplotlib.pyplot as plt

    return plt


def _curve(ax: Any, points: list[tuple[int, float]], **kwargs: Any) -> None:
    """A metric vs iteration; a short run is a few dots, not an invisible line."""
    ax.plot(
        [p[0] for p in points],
        [p[1] for p in points],
        lw=1.2,
        marker="o" if len(points) <= 10 else None,
        ms=3,
        **kwargs,
    )


def plot_ap_bars(rows: list[dict[str, Any]], path: str) -> bool:
    rows = [r for r in rows if any(r.get(k) is not None for k in ("AP", "AP50", "AP75"))]
    if not rows:
        return False
    plt = _pyplot()
    metrics = ("AP", "AP50", "AP75")
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 4))
    for i, metric in enumerate(metrics):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        values = [r.get(metric) if r.get(metric) is not None else 0.0 for r in rows]
        bars = ax.bar(xs, values, width, label=metric, color=f"C{i}")
        for bar, row in zip(bars, rows, strict=True):
            if row.get("source") == "paper":
                bar.set_hatch("//")
                bar.set_alpha(0.6)
            if row.get(metric) is not None:
                ax.annotate(
                    f"{row[metric]:.1f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["name"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("box AP (%)")
    ax.set_title("Detection transfer: box AP per pre-training (hatched: paper)")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)
    return True


# the training loss in a pretraining metrics.json, in order of preference
LOSS_KEYS = ("loss", "total_loss")


def _loss_key(series: dict[str, list]) -> str | None:
    return next((k for k in LOSS_KEYS if series.get(k)), None)


def _metrics(runs: list[Run], kind: str) -> Iterator[tuple[Run, dict[str, list]]]:
    """(run, its metrics.json series) for each run of ``kind``."""
    for run in runs:
        if run.kind == kind:
            yield run, read_metrics(run.metrics_path)


def plot_pretrain_losses(runs: list[Run], path: str) -> bool:
    curves = []
    for run, series in _metrics(runs, "pretrain"):
        key = _loss_key(series)
        if key:
            curves.append((run.label, series[key]))
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves:
        _curve(ax, points, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.set_title("Pretraining loss")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)
    return True


def plot_detection_curves(runs: list[Run], path: str) -> bool:
    curves = []
    for run, series in _metrics(runs, "detection"):
        loss, ap = series.get("total_loss", []), series.get("bbox/AP", [])
        if loss or ap:
            curves.append((run.label, loss, ap))
    if not curves:
        return False
    plt = _pyplot()
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, loss, ap) in enumerate(curves):
        if loss:
            _curve(ax_loss, loss, label=label, color=f"C{i}")
        if ap:
            ax_ap.plot([p[0] for p in ap], [p[1] for p in ap], "o-", label=label, color=f"C{i}")
    ax_loss.set(xlabel="iteration", ylabel="total_loss", title="Detection training loss")
    ax_ap.set(xlabel="iteration", ylabel="bbox/AP (%)", title="Detection box AP (val)")
    for ax in (ax_loss, ax_ap):
        if ax.lines:
            ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)
    return True


# (panel id, metrics.json keys tried in order, y label, title); pretrain.health.HealthHook writes
# the health keys with CommonMetricPrinter's [metric] prefix. The loss panel is context only: a
# figure is drawn when a run has one of the other panels' keys.
HEALTH_PANELS: list[tuple[str, tuple[str, ...], str, str]] = [
    ("loss", LOSS_KEYS, "training loss", "Training loss"),
    ("contrastive_top1", ("[metric]health/contrastive_top1",),
     "fraction of queries", "Contrastive top-1 (positive above all negatives)"),
    ("alignment", ("[metric]health/alignment",),
     "mean ||q - k||^2 (lower: aligned)", "Alignment"),
    ("uniformity", ("[metric]health/uniformity",),
     "log mean exp(-2||q_i - q_j||^2)", "Uniformity (lower: more uniform)"),
    ("emb_std", ("[metric]health/emb_std",),
     "mean per-dimension std", "Embedding std (0: collapsed)"),
    ("knn_top1", ("knn_top1",), "top-1 (%)", "kNN monitor top-1"),
    ("instance_retrieval_top1", ("instance_retrieval_top1",), "top-1 (%)",
     "Instance retrieval top-1"),
]  # fmt: skip
RANDOM_INIT = "random init"
RANDOM_INIT_KNN = "random init kNN (lincls)"
RANDOM_INIT_RETRIEVAL = "random init retrieval (lincls)"
HEALTH_CAPTION = (
    "pretrain_health.png: per pretraining run vs iteration, the training loss, the health metrics "
    "(contrastive top-1 as a fraction; alignment, uniformity, embedding std of the normalised "
    "embeddings) and the kNN monitor's kNN / instance-retrieval top-1 (%) on DATASETS.VAL_SPLIT; "
    "panels no run logged are left out. Dashed: kNN top-1 of each random-init linear eval "
    "(lincls's own kNN: its k, T and val split), the same measurement as the monitor only when "
    "both are configured alike; and its instance-retrieval top-1, the monitor's measurement when "
    "the linear eval's TEST.RETRIEVAL_SIZE / RETRIEVAL_MIN_SCALE / RETRIEVAL_MAX_SCALE are the "
    "pretraining's TEST.RETRIEVAL_SIZE / INPUT.MIN_SCALE / MAX_SCALE (configs/lincls/"
    "shapes_cpu.yaml and the demo's pretraining: yes)."
)


@dataclass
class HealthPlot:
    """What :func:`plot_pretrain_health` drew: ``series[panel][run label]`` = [(iteration, value)]
    as read from metrics.json, ``baselines[legend label]`` = random-init lincls kNN or retrieval
    top-1 (%), and notes on how comparable the two kNN measurements are."""

    series: dict[str, dict[str, list[tuple[int, float]]]]
    baselines: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _knn_text(setting: tuple[Any, Any]) -> str:
    return f"k={setting[0]}, T={format_value('knn_t', setting[1])}"


def _random_init_runs(runs: list[Run], key: str) -> list[Run]:
    """The random-init lincls runs with a number under ``key`` in their results.json."""
    return [
        r
        for r in runs
        if r.kind == "lincls"
        and r.name == RANDOM_INIT
        and as_number(r.results.get(key)) is not None
    ]


def _legend(base: str, extra: list[str]) -> str:
    """``base`` (which ends in ")") with ``extra`` added inside its parentheses."""
    return f"{base[:-1]}, {', '.join(extra)})" if extra else base


def _random_init_knn(runs: list[Run]) -> list[tuple[str, float, tuple[Any, Any] | None, str]]:
    """(legend label, kNN top-1, (k, T) or None, directory) of each random-init lincls run with a
    kNN top-1."""
    found = _random_init_runs(runs, "knn_top1")
    lines = []
    for run in found:
        k, t = as_count(run.results.get("knn_k")), as_number(run.results.get("knn_t"))
        setting = (k, t) if k is not None and t is not None else None
        extra = [_knn_text(setting)] if setting else []
        if len(found) > 1:
            extra.append(run.folder)
        lines.append((_legend(RANDOM_INIT_KNN, extra), float(run.results["knn_top1"]), setting,
                      run.path))  # fmt: skip
    return lines


def _random_init_retrieval(runs: list[Run]) -> list[tuple[str, float]]:
    """(legend label, instance-retrieval top-1) of each random-init lincls run that measured it."""
    found = _random_init_runs(runs, "instance_retrieval_top1")
    several = len(found) > 1
    return [
        (
            _legend(RANDOM_INIT_RETRIEVAL, [r.folder] if several else []),
            float(r.results["instance_retrieval_top1"]),
        )
        for r in found
    ]


def plot_pretrain_health(runs: list[Run], path: str) -> HealthPlot | None:
    """``pretrain_health.png``: one panel per :data:`HEALTH_PANELS` entry that a pretraining run
    logged, one line per run; the kNN and retrieval panels also get a dashed line per random-init
    lincls run that measured them.
    Returns what was drawn, or None (nothing written) when no pretraining run logged a health or
    kNN-monitor key (runs from before these metrics)."""
    pretrain = [r for r in runs if r.kind == "pretrain"]
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    monitor: dict[str, tuple[Any, Any] | None] = {}  # run label -> its kNN monitor's (k, T)
    for run, metrics in _metrics(runs, "pretrain"):
        for panel, keys, _, _ in HEALTH_PANELS:
            key = next((k for k in keys if metrics.get(k)), None)
            if key:
                series.setdefault(panel, {})[run.label] = metrics[key]
        if run.label in series.get("knn_top1", {}):
            monitor[run.label] = config_knn(run.path)
    if not any(panel != "loss" for panel in series):
        return None
    notes = []
    baselines = _random_init_knn(runs) if "knn_top1" in series else []
    # the dashed random-init lines of each panel: (legend label, value)
    dashed = {
        "knn_top1": [(label, value) for label, value, _, _ in baselines],
        "instance_retrieval_top1": (
            _random_init_retrieval(runs) if "instance_retrieval_top1" in series else []
        ),
    }
    for _, _, setting, where in baselines:
        for run_label, own in monitor.items():
            if own is None or setting is None:
                notes.append(
                    f"pretrain_health.png: k / T of the kNN monitor of '{run_label}' (config.yaml "
                    f"TEST) or of the random-init linear eval {where} (knn_k / knn_t) are not in "
                    "the files; its dashed line may be another measurement."
                )
            elif own != setting:
                notes.append(
                    f"pretrain_health.png: the kNN monitor of '{run_label}' uses "
                    f"{_knn_text(own)}, the random-init linear eval {where} {_knn_text(setting)}: "
                    "its dashed line is another measurement."
                )
    plt = _pyplot()
    panels = [p for p in HEALTH_PANELS if p[0] in series]
    ncols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False)
    flat = list(axes.flat)
    colors = {r.label: f"C{i % 10}" for i, r in enumerate(pretrain)}
    settings = {s for s in monitor.values() if s is not None}
    for ax, (panel, _, ylabel, title) in zip(flat, panels):
        for label, points in series[panel].items():
            _curve(ax, points, label=label, color=colors[label])
        if panel == "knn_top1":
            if len(settings) == 1 and None not in monitor.values():
                title = f"{title} ({_knn_text(next(iter(settings)))})"
        for i, (label, value) in enumerate(dashed.get(panel, [])):
            ax.axhline(value, ls="--", lw=1.0, color=f"{0.2 + 0.2 * (i % 3):.1f}", label=label)
        ax.set(xlabel="iteration", ylabel=ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    for ax in flat[len(panels):]:
        ax.remove()
    fig.suptitle("Pretraining health")
    save_figure(fig, path, dpi=110)
    return HealthPlot(series, {label: v for lines in dashed.values() for label, v in lines}, notes)


def plot_seed_probes(rows: list[dict[str, Any]], path: str) -> bool:
    """``lincls_seeds.png``: per pre-training, each seed's linear, kNN and instance-retrieval top-1
    (of its linear-eval run) as dots and the mean with its sd as a bar; False (nothing written)
    without any multi-seed pre-training."""
    means = [r for r in rows if r.get("summary")]
    if not means:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(SEED_METRICS), figsize=(4.5 * len(SEED_METRICS), 3.8))
    for ax, metric in zip(axes, SEED_METRICS):
        title, key = metric.title, metric.key
        for x, mean in enumerate(means):
            seeds = [r for r in rows if r["group"] == mean["group"] and not r.get("summary")]
            seeds = [r for r in seeds if r.get(key) is not None]
            if mean.get(key) is not None:
                ax.bar(x, mean[key], yerr=mean[f"{key}_sd"], color=f"C{x}", alpha=0.35, capsize=4)
            ax.plot([x] * len(seeds), [r[key] for r in seeds], "o", color=f"C{x}", ms=4)
        ax.set_xticks(range(len(means)))
        ax.set_xticklabels([m["name"] for m in means], fontsize=8)
        ax.set_ylabel(f"{title} (%)")
        ax.set_ylim(0, metric.ylim)
        size, name = metric.size_key, metric.what
        val = {m.get(size) for m in means}
        ax.set_title(f"{name}, {metric.short} {format_value(size, val.pop())}"
                     if len(val) == 1 else name)
    save_figure(fig, path, dpi=120)
    return True
