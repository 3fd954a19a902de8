"""The benchmark table (MoCo's transfer table): one row per pre-training with its linear-eval top-1
and kNN, then per transfer benchmark (transfer/benchmark.py) its metrics as mean +- sd over the
detection SEEDs: VOC07+12 AP50 / AP / AP75, COCO box AP and mask AP per protocol; with ``--paper``
the numbers published for MoCo v2 and the supervised backbone beside ours. Also
``benchmarks.png``: one panel per metric, a bar per pre-training with the seeds' sd."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from transfer.benchmark import BENCHMARKS
from transfer.report.runs import Run, as_number
from transfer.report.tables import MISSING

__all__ = [
    "MAIN_BENCHMARK",
    "BenchmarkTable",
    "benchmark_of",
    "benchmark_table",
    "in_main_table",
    "plot_benchmarks",
]

# the EqCo paper's own detector: the main table's AP column (configs/Base-RCNN-FPN-4conv1fc-SyncBN)
MAIN_BENCHMARK = "coco_fpn_4conv1fc_1x"
# (column title, results.json task, metric) per benchmark family
_VOC = [("AP50", "bbox", "AP50"), ("AP", "bbox", "AP"), ("AP75", "bbox", "AP75")]
_COCO_MASK = [("box AP", "bbox", "AP"), ("mask AP", "segm", "AP")]
_COCO_BOX = [("box AP", "bbox", "AP")]


def _metrics(key: str) -> list[tuple[str, str, str]]:
    if key == "voc":
        return _VOC
    return _COCO_MASK if BENCHMARKS[key].masks else _COCO_BOX


# docs/methods.md, "Transfer protocols": facebookresearch/moco detection/README.md (7397dfe),
# VOC07+12 Faster R-CNN R50-C4, means of 5 trials. The COCO numbers of those pre-trainings are in
# the MoCo paper only, not in a source read here: left out rather than copied from memory.
PAPER_BENCHMARKS: list[dict[str, Any]] = [
    {"name": "supervised IN", "voc": {"AP50": 81.3, "AP": 53.5, "AP75": 58.8}},
    {"name": "MoCo v2 200ep", "voc": {"AP50": 82.4, "AP": 57.0, "AP75": 63.6}},
    {"name": "MoCo v2 800ep", "voc": {"AP50": 82.5, "AP": 57.4, "AP75": 64.0}},
]
PAPER_NOTE = (
    "[paper]: published numbers of MoCo's detection/README.md (VOC07+12 Faster R-CNN R50-C4, "
    "means of 5 trials; docs/methods.md, 'Transfer protocols'); not run here."
)


def benchmark_of(run: Run) -> str | None:
    """The ``benchmark`` a detection run's results.json names (None: a plain fine-tune)."""
    key = run.results.get("benchmark")
    return key if isinstance(key, str) and key in BENCHMARKS else None


def in_main_table(run: Run) -> bool:
    """Whether a run belongs in the main table: every non-detection run, and the detection runs
    of the EqCo paper's detector (or of no named benchmark, e.g. files written before the key)."""
    return run.kind != "detection" or benchmark_of(run) in (None, MAIN_BENCHMARK)


@dataclass
class BenchmarkTable:
    """The table as markdown and its values: ``cells[name][(benchmark, column)] = (mean, sd,
    seeds)``."""

    markdown: str
    names: list[str]
    columns: list[tuple[str, str]]  # (benchmark, column title)
    cells: dict[str, dict[tuple[str, str], tuple[float | None, float | None, list[Any]]]]
    notes: list[str] = field(default_factory=list)


def _summary(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _format(cell: tuple[float | None, float | None, list[Any]] | None) -> str:
    if cell is None or cell[0] is None:
        return MISSING
    mean, sd, _ = cell
    return f"{mean:.1f}" if sd is None else f"{mean:.1f} ± {sd:.1f}"


def benchmark_table(
    runs: list[Run], top1: dict[str, tuple[Any, Any]], paper: bool = False
) -> BenchmarkTable | None:
    """The table of the benchmark runs among ``runs`` (None when there is no run of a benchmark
    besides the main table's). ``top1[name] = (linear top-1, kNN top-1)`` from the main rows."""
    bench_runs = [r for r in runs if r.kind == "detection" and benchmark_of(r)]
    if not any(benchmark_of(r) != MAIN_BENCHMARK for r in bench_runs):
        return None
    keys = [k for k in BENCHMARKS if any(benchmark_of(r) == k for r in bench_runs)]
    # the main table's order (``top1`` follows it), then any pre-training only seen here
    seen = set(r.name for r in bench_runs)
    names = [n for n in top1 if n in seen] + sorted(seen - set(top1))
    columns = [(k, title) for k in keys for title, _, _ in _metrics(k)]
    cells: dict[str, dict[tuple[str, str], Any]] = {}
    notes: list[str] = []
    for name in names:
        cells[name] = {}
        for key in keys:
            group = [r for r in bench_runs if r.name == name and benchmark_of(r) == key]
            if not group:
                continue
            seeds = [r.results.get("seed") for r in group]
            if len(set(map(str, seeds))) < len(seeds):
                notes.append(
                    f"'{name}' {key}: {len(group)} runs with SEEDs {seeds}, not all distinct; "
                    "the mean is over runs."
                )
            for title, task, metric in _metrics(key):
                values = []
                for r in group:
                    block = r.results.get(task)
                    value = as_number(block.get(metric)) if isinstance(block, dict) else None
                    if value is not None:
                        values.append(value)
                if len(values) < len(group):
                    notes.append(
                        f"'{name}' {key} {title}: {len(group) - len(values)} of {len(group)} runs "
                        "give no value; the mean is over the others."
                    )
                mean, sd = _summary(values)
                cells[name][(key, title)] = (mean, sd, seeds)
    rows = list(names)
    if paper:
        for ref in PAPER_BENCHMARKS:
            name = ref["name"] + " [paper]"
            rows.append(name)
            cells[name] = {
                (key, title): (ref[key][metric], None, [])
                for key in keys
                if key in ref
                for title, task, metric in _metrics(key)
                if task == "bbox"
            }
    header = ["pre-training", "top-1", "kNN"] + [f"{_short(k)} {t}" for k, t in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in rows:
        lin, knn = top1.get(name, (None, None))
        values = [_format((as_number(lin), None, [])), _format((as_number(knn), None, []))]
        values += [_format(cells[name].get(col)) for col in columns]
        lines.append("| " + " | ".join([name] + values) + " |")
    seed_lines = []
    for key in keys:
        per_name = {
            n: sorted({str(s) for s in cells[n][(key, _metrics(key)[0][0])][2]})
            for n in names
            if (key, _metrics(key)[0][0]) in cells[n]
        }
        shown = "; ".join(f"{n}: {' '.join(s)}" for n, s in per_name.items())
        seed_lines.append(f"{_short(key)} = {BENCHMARKS[key].title} (detection SEEDs: {shown})")
    markdown = "\n".join(lines) + "\n\n" + "; ".join(seed_lines) + "."
    return BenchmarkTable(markdown, rows, columns, cells, notes)


def _short(key: str) -> str:
    return {
        "voc": "VOC",
        "coco_c4_1x": "C4 1x",
        "coco_c4_2x": "C4 2x",
        "coco_fpn_1x": "FPN 1x",
        "coco_fpn_2x": "FPN 2x",
        MAIN_BENCHMARK: "4conv1fc",
    }.get(key, key)


def plot_benchmarks(table: BenchmarkTable, path: str) -> bool:
    """``benchmarks.png``: a panel per (benchmark, metric), a bar per pre-training (mean, the
    seeds' sd as error bar; [paper] rows hatched). False when nothing has a value."""
    from transfer.report.plots import _pyplot, _save

    columns = [c for c in table.columns if any(table.cells[n].get(c) for n in table.names)]
    if not columns:
        return False
    plt = _pyplot()
    ncols = min(5, len(columns))
    nrows = -(-len(columns) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(2.4 * ncols + 1.6, 3.0 * nrows + 0.4), squeeze=False
    )
    for ax in axes.flat[len(columns) :]:
        ax.set_visible(False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, column in zip(axes.flat, columns):
        for i, name in enumerate(table.names):
            cell = table.cells[name].get(column)
            if not cell or cell[0] is None:
                continue
            ax.bar(
                i, cell[0], yerr=cell[1] or 0, capsize=3, color=colors[i % len(colors)],
                hatch="//" if name.endswith("[paper]") else None, label=name,
            )  # fmt: skip
        ax.set_title(f"{_short(column[0])} {column[1]}", fontsize=9)
        ax.set_xticks([])
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    axes[0][ncols - 1].legend(
        handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8
    )
    fig.suptitle("Transfer benchmarks (mean ± sd over detection seeds)", fontsize=10)
    _save(fig, path, dpi=110)
    return True
