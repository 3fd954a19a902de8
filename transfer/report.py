"""Run directories -> one comparison table (markdown + CSV) and plots.

Reads the ``results.json`` of pretraining, linear-eval and detection OUTPUT_DIRs
(docs/formats.md), groups them by pre-training ``name`` and writes one row per pre-training (one
per detection run when a pre-training was transferred several times). Values come from the files
only; a value no file gives is shown as "-". Curves come from the runs' ``metrics.json``
(detectron2 ``JSONWriter``: one JSON object per line).

Plots: ``ap_bars.png`` (box AP per row), ``pretrain_loss.png`` (pretraining loss),
``detection_curves.png`` (detection loss and AP) and ``pretrain_health.png``: per pretraining run
vs iteration, the training loss, the health metrics (``[metric]health/contrastive_top1``,
``alignment``, ``uniformity``, ``emb_std``; pretrain/health.py) and the kNN monitor's
``knn_top1`` / ``instance_retrieval_top1``, with the kNN top-1 of each random-init linear eval as
a dashed line. Panels whose keys no run logged are left out; runs logged before these metrics
existed give no ``pretrain_health.png`` at all. The dashed line is lincls's own kNN (its k, T and
val split): the same measurement as the monitor only when both are configured alike, and the
report notes where the k / T recorded in the files differ.

Next to the linear-probe top-1 each row shows the kNN top-1 of the same linear-eval run (frozen
backbone, same val split; ``knn_top1``), that run's val-set size (``val_images``) and the
pretraining seed: a ``seed`` in the pre-training's meta if one is there, else ``SEED`` of the
pretraining run's ``config.yaml`` (its OUTPUT_DIR among the runs, or the folder of the checkpoint
the linear eval or the conversion read). A random-init backbone has no pretraining seed: "-".
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from pretrain.io import UserError, atomic_write_text
from transfer.convert import read_provenance

__all__ = [
    "COLUMNS",
    "HealthPlot",
    "PAPER_ROWS",
    "Run",
    "build_rows",
    "find_runs",
    "format_value",
    "make_report",
    "markdown_table",
    "plot_pretrain_health",
    "read_metrics",
]

# (column title, row key)
COLUMNS: list[tuple[str, str]] = [
    ("name", "name"),
    ("method", "method"),
    ("loss", "loss"),
    ("K", "num_negatives"),
    ("alpha", "alpha"),
    ("epochs", "epochs"),
    ("top-1", "top1"),
    ("kNN", "knn_top1"),
    ("val", "val_images"),
    ("seed", "seed"),
    ("AP", "AP"),
    ("AP50", "AP50"),
    ("AP75", "AP75"),
    ("APs", "APs"),
    ("APm", "APm"),
    ("APl", "APl"),
]
BBOX_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# shown with one decimal, like AP
PERCENT_KEYS = ("top1", "knn_top1") + BBOX_KEYS
# CSV only, after the table's columns: the kNN settings and the linear eval's own SEED
CSV_EXTRA = [
    "source", "knn_k", "knn_t", "lincls_seed", "pretrain_dir", "lincls_dir", "detection_dir"
]
MISSING = "-"
PAPER_MARK = " [paper]"
PAPER_NOTE = (
    "[paper]: reference rows from the EqCo paper (METHODS.md s. 6): Faster R-CNN R50-FPN, 4conv1fc "
    "head, SyncBN, 1x schedule, COCO val2017 box AP; not run here. Only the values the table "
    "states are shown."
)
# METHODS.md s. 6 (EqCo paper, detection appendix). The table states no K / alpha / epochs / top-1
# for these rows, so none are filled in.
PAPER_ROWS: list[dict[str, Any]] = [
    {"name": "random init", "method": None, "AP": 31.4, "AP50": 49.4, "AP75": 34.0,
     "APs": 17.9, "APm": 32.3, "APl": 41.6},
    {"name": "supervised IN", "method": "supervised", "AP": 39.0, "AP50": 59.1, "AP75": 42.6,
     "APs": 22.4, "APm": 42.2, "APl": 50.6},
    {"name": "MoCo v2", "method": "mocov2", "AP": 39.1, "AP50": 59.2, "AP75": 42.5,
     "APs": 23.3, "APm": 42.1, "APl": 50.8},
    {"name": "SiMo", "method": "simo", "AP": 39.0, "AP50": 59.2, "AP75": 42.3,
     "APs": 22.9, "APm": 41.8, "APl": 50.5},
]  # fmt: skip
KINDS = ("pretrain", "lincls", "detection")


# --------------------------------------------------------------------------------------------------
# finding and reading runs


@dataclass
class Run:
    """One OUTPUT_DIR with its ``results.json``."""

    kind: str
    name: str
    path: str  # the directory
    results: dict[str, Any]
    mtime: float = 0.0
    label: str = ""  # legend / row label, set when names repeat

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.path, "metrics.json")


def _read_results(path: str) -> Run:
    file = os.path.join(path, "results.json")
    try:
        with open(file) as f:
            res = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"{file}: not readable JSON ({e}); re-run that stage or remove the file."
        ) from e
    if not isinstance(res, dict) or res.get("kind") not in KINDS:
        kind = res.get("kind") if isinstance(res, dict) else type(res).__name__
        raise UserError(
            f"{file}: kind {kind!r} is none of {', '.join(KINDS)}; it is not a results.json "
            "written by tools/pretrain.py, tools/lincls.py or tools/train_det.py."
        )
    prov = res.get("pretrain") if isinstance(res.get("pretrain"), dict) else {}
    name = res.get("name") or prov.get("name") or os.path.basename(os.path.normpath(path))
    return Run(res["kind"], str(name), path, res, os.path.getmtime(file), str(name))


def find_runs(paths: list[str]) -> list[Run]:
    """Each path is a run dir (holds results.json) or a parent searched recursively for them."""
    runs: list[Run] = []
    seen: set[str] = set()
    for path in paths:
        if os.path.isfile(path) and os.path.basename(path) == "results.json":
            path = os.path.dirname(path) or "."
        if not os.path.isdir(path):
            raise UserError(
                f"{path}: no such directory; pass OUTPUT_DIRs (or a folder holding them)."
            )
        found = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if "results.json" in files:
                found.append(root)
        if not found:
            raise UserError(
                f"{path}: no results.json in it or below; pass the OUTPUT_DIR of a finished "
                "tools/pretrain.py, tools/lincls.py or tools/train_det.py run."
            )
        for root in found:
            key = os.path.realpath(root)
            if key not in seen:
                seen.add(key)
                runs.append(_read_results(root))
    return runs


def read_metrics(path: str) -> dict[str, list[tuple[int, float]]]:
    """``metrics.json`` -> {key: [(iteration, value)]} sorted by iteration.

    A resumed run repeats iterations: the last value written wins. Lines that are not JSON (a run
    killed mid-write) and non-numeric values are skipped.
    """
    series: dict[str, dict[int, float]] = {}
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("iteration"), (int, float)):
                continue
            it = int(rec["iteration"])
            for key, value in rec.items():
                if (
                    key != "iteration"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    series.setdefault(key, {})[it] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


# --------------------------------------------------------------------------------------------------
# rows


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def _count(value: Any) -> int | None:
    """A non-negative integer (a seed, an image count), else None (SEED < 0 means "drawn at
    random": not a seed anyone can re-run)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _pretrain_config(folder: str) -> dict[str, Any] | None:
    """``folder/config.yaml`` when it is a pretraining config (it has MODEL.METHOD), else None."""
    path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("MODEL"), dict):
        return None
    if "METHOD" not in cfg["MODEL"]:
        return None  # a linear-eval or detection config: not the pretraining's
    return cfg


def _config_seed(folder: str) -> int | None:
    """SEED of ``folder/config.yaml`` when it is a pretraining config (it has MODEL.METHOD)."""
    cfg = _pretrain_config(folder)
    return _count(cfg.get("SEED")) if cfg else None


def _config_knn(folder: str) -> tuple[int, float] | None:
    """(TEST.KNN_K, TEST.KNN_T) of the kNN monitor in a pretraining ``folder/config.yaml``; None
    when the file or the keys are not there."""
    cfg = _pretrain_config(folder)
    test = cfg.get("TEST") if cfg else None
    if not isinstance(test, dict):
        return None
    k, t = _count(test.get("KNN_K")), _num(test.get("KNN_T"))
    return (k, t) if k is not None and t is not None else None


def _pretrain_seed(pre: Run | None, lin: Run | None, prov: dict[str, Any]) -> int | None:
    """The pretraining seed: ``seed`` in a meta or results.json of the pre-training, else SEED of
    the pretraining run's config.yaml (its OUTPUT_DIR, or the folder of the pretraining checkpoint
    the linear eval / the conversion read); None when no file says it."""
    lin_meta = lin.results.get("pretrain") if lin else None
    lin_meta = lin_meta if isinstance(lin_meta, dict) else {}
    for source in (lin_meta, prov, pre.results if pre else {}):
        if _count(source.get("seed")) is not None:
            return _count(source.get("seed"))
    folders = [pre.path] if pre else []
    checkpoints = []  # only pretraining checkpoints: a random-init or torchvision file has no run
    if lin and "pretrain" in (lin.results.get("input_kind"), lin_meta.get("kind")):
        checkpoints.append(lin.results.get("weights"))
    if prov.get("input_kind") == "pretrain":
        checkpoints.append(prov.get("source"))
    folders += [os.path.dirname(c) for c in checkpoints if isinstance(c, str) and c]
    for folder in folders:
        seed = _config_seed(folder)
        if seed is not None:
            return seed
    return None


def _lincls_columns(lin: Run | None) -> dict[str, Any]:
    """kNN top-1, val-set size, kNN settings and SEED of the linear-eval run ("-" in files written
    before these keys existed)."""
    res = lin.results if lin else {}
    return {
        "knn_top1": _num(res.get("knn_top1")),
        "val_images": _count(res.get("val_images")),
        "knn_k": _count(res.get("knn_k")),
        "knn_t": _num(res.get("knn_t")),
        "lincls_seed": _count(res.get("seed")),
    }


def _differing_evaluations(rows: list[dict[str, Any]]) -> list[str]:
    """Notes when the rows' kNN numbers do not come from one evaluation setting."""
    notes = []
    for keys, what in ((("knn_k", "knn_t"), "kNN settings (k, T)"), (("val_images",), "val sizes")):
        seen: dict[str, list[str]] = {}
        for row in rows:
            values = tuple(row.get(k) for k in keys)
            if row.get("lincls_dir") and all(v is not None for v in values):
                shown = ", ".join(format_value(k, v) for k, v in zip(keys, values))
                seen.setdefault(shown, []).append(str(row["name"]))
        if len(seen) > 1:
            parts = "; ".join(f"{v}: {', '.join(names)}" for v, names in seen.items())
            notes.append(f"the linear evals differ in {what} ({parts}); compare with care.")
    return notes


def _newest(runs: list[Run], kind: str, name: str, notes: list[str]) -> Run | None:
    same = sorted((r for r in runs if r.kind == kind), key=lambda r: r.mtime, reverse=True)
    if len(same) > 1:
        ignored = ", ".join(r.path for r in same[1:])
        notes.append(
            f"'{name}': {len(same)} {kind} results; using {same[0].path} (newest), "
            f"ignoring {ignored}."
        )
    return same[0] if same else None


def _merge(
    name: str, sources: list[tuple[str, dict[str, Any]]], notes: list[str]
) -> dict[str, Any]:
    """First non-missing value per field in the order of ``sources``; disagreements become notes."""
    row: dict[str, Any] = {}
    for key in ("method", "loss", "num_negatives", "alpha", "epochs"):
        values = [(where, src.get(key)) for where, src in sources if src.get(key) is not None]
        row[key] = values[0][1] if values else None
        distinct = {json.dumps(v) for _, v in values}
        if len(distinct) > 1:
            shown = "; ".join(f"{where}: {v}" for where, v in values)
            notes.append(f"'{name}': {key} differs between stages ({shown}); showing {row[key]}.")
    return row


def _provenance(det: Run) -> dict[str, Any]:
    """The converted weights' provenance: from results.json, else from the .pkl it names."""
    prov = det.results.get("pretrain")
    prov = dict(prov) if isinstance(prov, dict) else {}
    weights = det.results.get("weights")
    if prov.get("method") is None and isinstance(weights, str) and weights.endswith(".pkl"):
        # detection runs store MODEL.WEIGHTS as given: relative to where training was started
        for path in (weights, os.path.join(det.path, weights)):
            if os.path.isfile(path):
                prov = {**read_provenance(path), **{k: v for k, v in prov.items() if v is not None}}
                break
    return prov


def build_rows(runs: list[Run], paper: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per pre-training name (one per detection run of it), then the paper's rows."""
    notes: list[str] = []
    names: list[str] = []
    # pipeline order: pre-trainings that have a pretraining run first, then the ones only seen later
    for r in sorted(runs, key=lambda r: KINDS.index(r.kind)):
        if r.name not in names:
            names.append(r.name)
    rows: list[dict[str, Any]] = []
    for name in names:
        group = [r for r in runs if r.name == name]
        pre = _newest(group, "pretrain", name, notes)
        lin = _newest(group, "lincls", name, notes)
        dets = [r for r in group if r.kind == "detection"] or [None]
        for det in dets:
            prov = _provenance(det) if det else {}
            # what was actually transferred (the converted weights' provenance) comes first
            sources = [("detection weights", prov)] if det else []
            if pre:
                sources.append((pre.path, pre.results))
            if lin and isinstance(lin.results.get("pretrain"), dict):
                sources.append((lin.path, lin.results["pretrain"]))
            row = {"name": name, **_merge(name, sources, notes), "source": "this work"}
            top1 = _num(lin.results.get("top1")) if lin else None
            prov_top1 = _num(prov.get("top1"))
            if top1 is not None and prov_top1 is not None and abs(top1 - prov_top1) > 1e-6:
                notes.append(
                    f"'{name}': top-1 {top1} in {lin.path} but {prov_top1} in the converted "
                    "weights' provenance; showing the linear-eval result."
                )
            row["top1"] = top1 if top1 is not None else prov_top1
            row.update(_lincls_columns(lin))
            row["seed"] = _pretrain_seed(pre, lin, prov)
            bbox = det.results.get("bbox") if det else None
            bbox = bbox if isinstance(bbox, dict) else {}
            row.update({k: _num(bbox.get(k)) for k in BBOX_KEYS})
            row["pretrain_dir"] = pre.path if pre else None
            row["lincls_dir"] = lin.path if lin else None
            row["detection_dir"] = det.path if det else None
            if len(dets) > 1:
                row["name"] = f"{name} ({os.path.basename(os.path.normpath(det.path))})"
                det.label = row["name"]
            rows.append(row)
    notes += _differing_evaluations(rows)
    if paper:
        for ref in PAPER_ROWS:
            row = {c: None for _, c in COLUMNS}
            row.update(ref)
            row.update(name=ref["name"] + PAPER_MARK, source="paper")
            rows.append(row)
    return rows, notes


def format_value(key: str, value: Any) -> str:
    """Table text: "-" for missing, 1 decimal for accuracies/AP, integers where integral."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if key in PERCENT_KEYS:
        return f"{float(value):.1f}"
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for title, _ in COLUMNS) + " |"]
    lines.append(
        "|"
        + "|".join("---" if key in ("name", "method", "loss") else "---:" for _, key in COLUMNS)
        + "|"
    )
    for row in rows:
        cells = [format_value(key, row.get(key)).replace("|", "\\|") for _, key in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_csv(rows: list[dict[str, Any]], path: str) -> None:
    extra = CSV_EXTRA
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([title for title, _ in COLUMNS] + extra)
        for row in rows:
            # full precision in the CSV; missing values are "-" as in the table
            cells = [
                MISSING if row.get(k) is None else row[k]
                for _, k in COLUMNS + [(e, e) for e in extra]
            ]
            writer.writerow(cells)


# --------------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed (servers, CI)
    import matplotlib.pyplot as plt

    return plt


def _plot_ap_bars(rows: list[dict[str, Any]], path: str) -> bool:
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# the training loss in a pretraining metrics.json, in order of preference
LOSS_KEYS = ("loss", "total_loss")


def _loss_key(series: dict[str, list]) -> str | None:
    return next((k for k in LOSS_KEYS if series.get(k)), None)


def _plot_pretrain_losses(runs: list[Run], path: str) -> bool:
    curves = []
    for run in runs:
        if run.kind != "pretrain":
            continue
        series = read_metrics(run.metrics_path)
        key = _loss_key(series)
        if key:
            curves.append((run.label, series[key]))
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves:
        few = len(points) <= 10  # a short run is a few dots, not an invisible line
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            label=label,
            lw=1.2,
            marker="o" if few else None,
            ms=3,
        )
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.set_title("Pretraining loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_detection_curves(runs: list[Run], path: str) -> bool:
    curves = []
    for run in runs:
        if run.kind != "detection":
            continue
        series = read_metrics(run.metrics_path)
        loss, ap = series.get("total_loss", []), series.get("bbox/AP", [])
        if loss or ap:
            curves.append((run.label, loss, ap))
    if not curves:
        return False
    plt = _pyplot()
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, loss, ap) in enumerate(curves):
        if loss:
            ax_loss.plot(
                [p[0] for p in loss],
                [p[1] for p in loss],
                label=label,
                color=f"C{i}",
                lw=1.2,
                marker="o" if len(loss) <= 10 else None,
                ms=3,
            )
        if ap:
            ax_ap.plot([p[0] for p in ap], [p[1] for p in ap], "o-", label=label, color=f"C{i}")
    ax_loss.set(xlabel="iteration", ylabel="total_loss", title="Detection training loss")
    ax_ap.set(xlabel="iteration", ylabel="bbox/AP (%)", title="Detection box AP (val)")
    for ax in (ax_loss, ax_ap):
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
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
HEALTH_CAPTION = (
    "pretrain_health.png: per pretraining run vs iteration, the training loss, the health metrics "
    "(contrastive top-1 as a fraction; alignment, uniformity, embedding std of the normalised "
    "embeddings) and the kNN monitor's kNN / instance-retrieval top-1 (%) on DATASETS.VAL_SPLIT; "
    "panels no run logged are left out. Dashed: kNN top-1 of each random-init linear eval "
    "(lincls's own kNN: its k, T and val split), the same measurement as the monitor only when "
    "both are configured alike."
)


@dataclass
class HealthPlot:
    """What :func:`plot_pretrain_health` drew: ``series[panel][run label]`` = [(iteration, value)]
    as read from metrics.json, ``baselines[legend label]`` = random-init lincls kNN top-1 (%), and
    notes on how comparable the two kNN measurements are."""

    series: dict[str, dict[str, list[tuple[int, float]]]]
    baselines: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _knn_text(setting: tuple[Any, Any]) -> str:
    return f"k={setting[0]}, T={format_value('knn_t', setting[1])}"


def _random_init_knn(runs: list[Run]) -> list[tuple[str, float, tuple[Any, Any] | None, str]]:
    """(legend label, kNN top-1, (k, T) or None, directory) of each random-init lincls run with a
    kNN top-1."""
    found = [
        r
        for r in runs
        if r.kind == "lincls"
        and r.name == RANDOM_INIT
        and _num(r.results.get("knn_top1")) is not None
    ]
    lines = []
    for run in found:
        k, t = _count(run.results.get("knn_k")), _num(run.results.get("knn_t"))
        setting = (k, t) if k is not None and t is not None else None
        extra = [_knn_text(setting)] if setting else []
        if len(found) > 1:
            extra.append(os.path.basename(os.path.normpath(run.path)))
        label = RANDOM_INIT_KNN if not extra else f"{RANDOM_INIT_KNN[:-1]}, {', '.join(extra)})"
        lines.append((label, float(run.results["knn_top1"]), setting, run.path))
    return lines


def plot_pretrain_health(runs: list[Run], path: str) -> HealthPlot | None:
    """``pretrain_health.png``: one panel per :data:`HEALTH_PANELS` entry that a pretraining run
    logged, one line per run; the kNN panel also gets a dashed line per random-init lincls run.
    Returns what was drawn, or None (nothing written) when no pretraining run logged a health or
    kNN-monitor key (runs from before these metrics)."""
    pretrain = [r for r in runs if r.kind == "pretrain"]
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    monitor: dict[str, tuple[Any, Any] | None] = {}  # run label -> its kNN monitor's (k, T)
    for run in pretrain:
        metrics = read_metrics(run.metrics_path)
        for panel, keys, _, _ in HEALTH_PANELS:
            key = next((k for k in keys if metrics.get(k)), None)
            if key:
                series.setdefault(panel, {})[run.label] = metrics[key]
        if run.label in series.get("knn_top1", {}):
            monitor[run.label] = _config_knn(run.path)
    if not any(panel != "loss" for panel in series):
        return None
    notes = []
    baselines = _random_init_knn(runs) if "knn_top1" in series else []
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
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                label=label,
                color=colors[label],
                lw=1.2,
                marker="o" if len(points) <= 10 else None,
                ms=3,
            )
        if panel == "knn_top1":
            if len(settings) == 1 and None not in monitor.values():
                title = f"{title} ({_knn_text(next(iter(settings)))})"
            for i, (label, value, _, _) in enumerate(baselines):
                ax.axhline(value, ls="--", lw=1.0, color=f"{0.2 + 0.2 * (i % 3):.1f}", label=label)
        ax.set(xlabel="iteration", ylabel=ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    for ax in flat[len(panels):]:
        ax.remove()
    fig.suptitle("Pretraining health")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return HealthPlot(series, {label: value for label, value, _, _ in baselines}, notes)


# --------------------------------------------------------------------------------------------------
# the whole report


@dataclass
class Report:
    markdown: str
    rows: list[dict[str, Any]]
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def make_report(paths: list[str], out_dir: str, paper: bool = False) -> Report:
    """Read the runs under ``paths``; write report.md, report.csv and PNG plots to ``out_dir``."""
    runs = find_runs(paths)
    rows, notes = build_rows(runs, paper)
    for kind in ("pretrain", "detection"):  # distinct legend labels when a name repeats
        same_kind = [r for r in runs if r.kind == kind]
        for run in same_kind:
            if sum(r.label == run.label for r in same_kind) > 1:
                run.label = f"{run.name} ({os.path.basename(os.path.normpath(run.path))})"
    table = markdown_table(rows)
    os.makedirs(out_dir, exist_ok=True)
    files = []
    health: list[HealthPlot] = []

    def plot_health(path: str) -> bool:
        drawn = plot_pretrain_health(runs, path)
        health.extend([drawn] if drawn else [])
        return drawn is not None

    # what=None: no note when absent (runs from before the health metrics simply have none)
    plots: list[tuple[str, str | None, Any]] = [
        ("ap_bars.png", "AP bars", lambda p: _plot_ap_bars(rows, p)),
        ("pretrain_loss.png", "pretraining loss curves", lambda p: _plot_pretrain_losses(runs, p)),
        (
            "detection_curves.png",
            "detection loss/AP curves",
            lambda p: _plot_detection_curves(runs, p),
        ),
        ("pretrain_health.png", None, plot_health),
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

    md = ["# Pre-training comparison", "", table, ""]
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
        f"same val split ({knn}); val: images in that val split; seed: the pretraining SEED; "
        "K: negatives per query; alpha: EqCo's alpha.",
        "",
    ]
    md += [f"![{name}]({name})" for name in written]
    if "pretrain_health.png" in written:
        md += ["", HEALTH_CAPTION]
    if notes:
        md += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    md_path, csv_path = os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.csv")
    atomic_write_text(md_path, "\n".join(md) + "\n")
    _write_csv(rows, csv_path + ".tmp")
    os.replace(csv_path + ".tmp", csv_path)
    return Report(table, rows, [md_path, csv_path] + files, notes)


