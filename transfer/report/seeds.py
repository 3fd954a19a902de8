"""The linear evaluations of each pre-training over its seeds: one row per seed, a mean +- sd row,
and one sentence per pair of pre-trainings saying which probes higher and whether the gap is above
the seed noise (``PRETRAIN_SEEDS="0 1 2" make demo``, or any set of runs of one NAME).

A linear-eval run's seed is the pretraining seed of the checkpoint it probed (:func:`lincls_seed`);
for a backbone without pretraining (random init) it is the linear eval's own SEED, which the demo
also uses to draw the random weights.
"""

from __future__ import annotations

import statistics
from typing import Any, NamedTuple

from transfer.report.runs import Run, as_count, as_number, pretrain_seed, run_seed
from transfer.report.tables import format_value

__all__ = [
    "SEED_METRICS", "SeedMetric", "compare_means", "lincls_seed", "seed_rows", "seed_table"
]  # fmt: skip


class SeedMetric(NamedTuple):
    """One metric of the per-seed table, its verdicts and ``lincls_seeds.png``."""

    title: str  # column title
    key: str  # results.json key of the linear-eval run
    what: str  # its name in verdicts and plot titles
    size_key: str  # results.json key of the number of images it is measured on
    images: str  # what those images are, in verdicts
    short: str  # ... and in plot titles
    ylim: float | None  # top of its plot axis (None: automatic)


SEED_METRICS = (
    SeedMetric("top-1", "top1", "linear eval top-1", "val_images", "val images", "val", 100),
    SeedMetric("kNN", "knn_top1", "linear eval kNN", "val_images", "val images", "val", 100),
    # a few % at chance 100 / gallery: measured on retrieval_images of the val images
    SeedMetric("retrieval", "instance_retrieval_top1", "instance retrieval", "retrieval_images",
               "val images in the gallery", "gallery", None),
)  # fmt: skip
_SIZE_KEYS = tuple(dict.fromkeys(m.size_key for m in SEED_METRICS))


def lincls_seed(run: Run) -> int | None:
    """The pretraining seed of a linear-eval run: ``seed`` in its checkpoint's meta, else SEED of
    the config.yaml beside the pretraining checkpoint it read; its own SEED when it probed no
    pretraining (random init, a torchvision file)."""
    meta = run.results.get("pretrain")
    meta = meta if isinstance(meta, dict) else {}
    if "pretrain" not in (run.results.get("input_kind"), meta.get("kind")):
        return run_seed(run.path)
    return pretrain_seed(None, run, {})


def seed_rows(runs: list[Run]) -> tuple[list[dict[str, Any]], list[str]]:
    """Per pre-training name with linear evals of at least two distinct seeds: a row per seed (the
    newest run of each) and a mean row with the sample sd; then the notes comparing the means."""
    by_name: dict[str, dict[int, Run]] = {}
    for run in sorted((r for r in runs if r.kind == "lincls"), key=lambda r: r.mtime):
        seed = lincls_seed(run)
        if seed is not None:
            by_name.setdefault(run.name, {})[seed] = run  # the newest run of a seed wins
    rows: list[dict[str, Any]] = []
    for name, per_seed in by_name.items():
        if len(per_seed) < 2:
            continue
        group = []
        for seed in sorted(per_seed):
            res = per_seed[seed].results
            row = {"name": name, "group": name, "seed": str(seed)}
            row.update({size: as_count(res.get(size)) for size in _SIZE_KEYS})
            row.update({m.key: as_number(res.get(m.key)) for m in SEED_METRICS})
            group.append(row)
        mean = {"name": f"{name} (mean of {len(group)})", "group": name, "summary": True}
        mean["seed"] = " ".join(r["seed"] for r in group)
        for size in _SIZE_KEYS:
            sizes = {r[size] for r in group}
            mean[size] = sizes.pop() if len(sizes) == 1 else None
        for key in (m.key for m in SEED_METRICS):
            values = [r[key] for r in group if r[key] is not None]
            complete = len(values) == len(group)
            mean[key] = statistics.fmean(values) if complete else None
            mean[f"{key}_sd"] = statistics.stdev(values) if complete else None
        rows += group + [mean]
    return rows, _verdicts([r for r in rows if r.get("summary")])


def compare_means(
    means: list[dict[str, Any]], key: str, sd_key: str
) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
    """Each pair of summary rows with a ``key`` mean: ``(higher, lower, "the gap G is above (or
    within) 2 x the pooled sd (S)")`` -- above it, the difference is not seed noise."""
    have = [m for m in means if m.get(key) is not None]
    out = []
    for i, a in enumerate(have):
        for b in have[i + 1:]:
            hi, lo = (a, b) if a[key] >= b[key] else (b, a)
            two_sd = 2 * ((hi[sd_key] ** 2 + lo[sd_key] ** 2) / 2) ** 0.5
            gap = hi[key] - lo[key]
            clear = "above" if gap > two_sd else "within"
            out.append((hi, lo, f"the gap {gap:.1f} is {clear} 2 x the pooled sd ({two_sd:.1f})"))
    return out


def _verdicts(means: list[dict[str, Any]]) -> list[str]:
    notes = []
    for m in SEED_METRICS:
        key, size = m.key, m.size_key
        for hi, lo, verdict in compare_means(means, key, f"{key}_sd"):
            n = hi[size] if hi[size] == lo[size] else None
            notes.append(
                f"{m.what}: {hi['name']} {hi[key]:.1f} +- {hi[f'{key}_sd']:.1f} vs "
                f"{lo['name']} {lo[key]:.1f} +- {lo[f'{key}_sd']:.1f} (seeds {hi['seed']} / "
                f"{lo['seed']}, {format_value(size, n)} {m.images}): {verdict}."
            )
    return notes


def seed_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of :func:`seed_rows` (mean rows with their sd)."""
    titles = ["name", "seed"] + [m.title for m in SEED_METRICS] + ["val"]
    lines = ["| " + " | ".join(titles) + " |", "|---|---:|" + "---:|" * (len(titles) - 2)]
    for row in rows:
        cells = [row["name"], row["seed"]]
        for key in (m.key for m in SEED_METRICS):
            text = format_value(key, row.get(key))
            if row.get(f"{key}_sd") is not None:
                text += f" +- {row[f'{key}_sd']:.1f}"
            cells.append(text)
        cells.append(format_value("val_images", row.get("val_images")))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
