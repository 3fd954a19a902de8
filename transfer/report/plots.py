"""Draws the report's plots from the runs' metrics.json and the rows: ``ap_vs_top1.png``,
``ap_bars.png``, ``pretrain_loss.png``, ``detection_curves.png``, ``pretrain_health.png`` and
``lincls_seeds.png``.

Each ``plot_*`` function writes its PNG through ``pretrain.io.save_figure`` (atomic), titles
wrapped to fit their axes, and returns what it drew, false when nothing (nothing is written when no
run has the data).
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pretrain.io import read_metrics, save_figure
from transfer.report.runs import Run, as_count, as_number, config_knn
from transfer.report.seeds import SEED_METRICS
from transfer.report.tables import format_value

__all__ = [
    "AP_VS_TOP1_CAPTION",
    "AP_VS_TOP1_PAPER",
    "HEALTH_CAPTION",
    "HEALTH_PANELS",
    "PAPER_TOP1",
    "HealthPlot",
    "ScatterPoint",
    "ap_vs_top1_points",
    "plot_ap_bars",
    "plot_ap_vs_top1",
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


def _fit_titles(fig: Any) -> None:
    """Wrap each axes title wider than its axes, and a suptitle wider than the figure, onto more
    lines (measured on the laid-out figure), so that no title is cut off at the PNG's edge."""
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [(ax.title, ax.bbox.width) for ax in fig.axes]
    suptitle = getattr(fig, "_suptitle", None)
    if suptitle is not None:
        texts.append((suptitle, fig.bbox.width))
    for text, room in texts:
        words = text.get_text()
        width = text.get_window_extent(renderer).width
        if words and width > room:
            chars = max(12, int(len(words) * room / width * 0.95))
            text.set_text(textwrap.fill(words, chars, break_on_hyphens=False))


def _save(fig: Any, path: str, dpi: int) -> None:
    """:func:`pretrain.io.save_figure` after :func:`_fit_titles` (the figure is closed either
    way)."""
    try:
        _fit_titles(fig)
    except BaseException:
        _pyplot().close(fig)
        raise
    save_figure(fig, path, dpi=dpi)


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
    ax.set_title("Box AP per pre-training")
    handles, labels = ax.get_legend_handles_labels()
    if any(r.get("source") == "paper" for r in rows):
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="//"))
        labels.append("paper (hatched)")
    ax.legend(handles, labels, fontsize=8)
    _save(fig, path, dpi=120)
    return True


# The linear top-1 the EqCo paper gives for the pre-trainings of its detection table (ImageNet,
# R50, 200 epochs; docs/methods.md, "SiMo"). It gives none for random init and the supervised
# backbone, which are left off ap_vs_top1.png.
PAPER_TOP1 = {"MoCo v2": 67.5, "SiMo": 68.1}
AP_VS_TOP1_CAPTION = (
    "ap_vs_top1.png: detection box AP (y) against linear-eval top-1 (x), one point per "
    "pre-training, labelled. With several pretraining seeds x is their mean and the horizontal "
    "bar their sd (the seeds table); with several detection seeds y is their mean and the vertical "
    "bar the sd of AP (the mean row; fine-tuned from the first seed's backbone)."
)
AP_VS_TOP1_PAPER = (
    " Squares: the EqCo paper's ImageNet linear top-1 and COCO box AP of a ResNet-50 (MoCo v2, "
    "SiMo; it gives no linear top-1 for random init and the supervised backbone), a larger "
    "scale than runs on the built-in data."
)
# label offsets (points) and alignment, in the order points close to each other take them
_LABEL_PLACES = [(6, 6, "left"), (6, -13, "left"), (-6, 6, "right"), (-6, -13, "right")]
_MEAN_OF = re.compile(r" \(mean of \d+\)$")


@dataclass
class ScatterPoint:
    """One point of ``ap_vs_top1.png``: a pre-training's linear top-1 and box AP (%), with their
    sd over seeds where there are several (else None); ``paper`` for the EqCo paper's rows."""

    name: str
    top1: float
    ap: float
    top1_sd: float | None = None
    ap_sd: float | None = None
    paper: bool = False


def ap_vs_top1_points(
    rows: list[dict[str, Any]], seed_means: list[dict[str, Any]] | None = None
) -> list[ScatterPoint]:
    """The points of ``ap_vs_top1.png``, from the table's rows (:func:`build_rows`) and the
    seeds table's mean rows (:func:`transfer.report.seeds.seed_rows`, ``summary`` rows).

    One point per pre-training with a top-1 and an AP: its detection mean row when it was
    fine-tuned with several detection seeds (AP +- sd), else its one row; x is the mean top-1 of
    its seeds table row (+- sd) when it was pretrained with several seeds, else the row's top-1.
    The paper's rows get the linear top-1 of :data:`PAPER_TOP1` (none: left off)."""
    means = {m["group"]: m for m in seed_means or [] if m.get("summary")}

    def group(r: dict[str, Any]) -> tuple[Any, ...]:
        # rows of one pre-training share these; its detection mean row stands for all of them
        return r.get("pretrain_dir"), r.get("lincls_dir"), r.get("top1")

    summarised = {group(r) for r in rows if r.get("summary")}
    points = []
    for r in rows:
        if r.get("source") == "paper":
            base = str(r["name"]).removesuffix(" [paper]")
            if base in PAPER_TOP1 and r.get("AP") is not None:
                points.append(ScatterPoint(str(r["name"]), PAPER_TOP1[base], r["AP"], paper=True))
            continue
        if r.get("top1") is None or r.get("AP") is None:
            continue
        if not r.get("summary") and group(r) in summarised:
            continue  # one fine-tune of several: the mean row is plotted
        name = _MEAN_OF.sub("", str(r["name"])) if r.get("summary") else str(r["name"])
        point = ScatterPoint(name, r["top1"], r["AP"], ap_sd=r.get("AP_sd"))
        seeds = means.get(name)
        if seeds is not None and seeds.get("top1") is not None:
            point.top1, point.top1_sd = seeds["top1"], seeds.get("top1_sd")
        points.append(point)
    return points


def plot_ap_vs_top1(
    rows: list[dict[str, Any]], seed_means: list[dict[str, Any]] | None, path: str
) -> list[ScatterPoint]:
    """``ap_vs_top1.png``: box AP against linear top-1 (:func:`ap_vs_top1_points`), this work's
    pre-trainings as dots with their seed sd as error bars, the paper's as squares, each
    labelled. Returns the points drawn (empty: nothing written)."""
    points = ap_vs_top1_points(rows, seed_means)
    if not points:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, p in enumerate(points):
        style = {"marker": "s", "mfc": "white", "ms": 8} if p.paper else {"marker": "o", "ms": 7}
        ax.errorbar(
            p.top1,
            p.ap,
            xerr=p.top1_sd,
            yerr=p.ap_sd,
            color=f"C{i % 10}",
            capsize=4,
            ls="none",
            **style,
        )
    ax.margins(0.15)
    ax.autoscale_view()
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    for i, p in enumerate(points):
        # a label beside each point; points close to earlier ones get theirs below / to the left
        near = sum(
            abs(q.top1 - p.top1) < 0.1 * (x1 - x0) and abs(q.ap - p.ap) < 0.06 * (y1 - y0)
            for q in points[:i]
        )
        dx, dy, ha = _LABEL_PLACES[near % len(_LABEL_PLACES)]
        ax.annotate(
            p.name,
            (p.top1, p.ap),
            xytext=(dx, dy),
            textcoords="offset points",
            ha=ha,
            fontsize=8,
        )
    ax.set_xlabel("linear-eval top-1 (%)")
    ax.set_ylabel("box AP (%)")
    ax.set_title("Detection AP vs linear top-1")
    ax.grid(alpha=0.3)
    if any(p.paper for p in points) and not all(p.paper for p in points):
        from matplotlib.lines import Line2D

        ax.legend(
            [Line2D([], [], marker="o", ls="none", color="0.4"),
             Line2D([], [], marker="s", ls="none", mfc="white", color="0.4")],
            ["this work", "EqCo paper (ImageNet / COCO)"],
            fontsize=8,
        )  # fmt: skip
    _save(fig, path, dpi=120)
    return points


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
    _save(fig, path, dpi=120)
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
    _save(fig, path, dpi=120)
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
    _save(fig, path, dpi=110)
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
    _save(fig, path, dpi=120)
    return True
