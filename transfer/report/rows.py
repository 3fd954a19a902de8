"""Joins the runs of each pre-training (pretraining, linear eval, detection) into report rows, with
a note wherever the files disagree; values come from the files only (None where none says it)."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

from transfer.convert import read_provenance
from transfer.report.benchmarks import in_main_table
from transfer.report.runs import KINDS, Run, as_count, as_number, pretrain_seed, run_seed
from transfer.report.seeds import compare_means, lincls_seed
from transfer.report.tables import BBOX_KEYS, COLUMNS, format_value

__all__ = ["PAPER_MARK", "PAPER_ROWS", "build_rows"]

PAPER_MARK = " [paper]"
# docs/methods.md, "Detection transfer" (EqCo paper, detection appendix). The table states no K /
# alpha / epochs / top-1 for these rows, so none are filled in.
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


def _lincls_columns(lin: Run | None) -> dict[str, Any]:
    """kNN and instance-retrieval top-1, val-set size, kNN settings, retrieval gallery size and
    SEED of the linear-eval run ("-" in files written before these keys existed)."""
    res = lin.results if lin else {}
    return {
        "knn_top1": as_number(res.get("knn_top1")),
        "instance_retrieval_top1": as_number(res.get("instance_retrieval_top1")),
        "retrieval_images": as_count(res.get("retrieval_images")),
        "val_images": as_count(res.get("val_images")),
        "knn_k": as_count(res.get("knn_k")),
        "knn_t": as_number(res.get("knn_t")),
        "lincls_seed": as_count(res.get("seed")),
    }


def _differing_evaluations(rows: list[dict[str, Any]]) -> list[str]:
    """Notes when the rows' kNN numbers do not come from one evaluation setting."""
    notes = []
    for keys, what in (
        (("knn_k", "knn_t"), "kNN settings (k, T)"),
        (("val_images",), "val sizes"),
        (("retrieval_images",), "retrieval gallery sizes"),
    ):
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


def _seed(run: Run) -> int | None:
    return lincls_seed(run) if run.kind == "lincls" else pretrain_seed(run, None, {})


def _lowest_seed(runs: list[Run], kind: str, name: str, notes: list[str]) -> Run | None:
    """The newest ``kind`` run of the pre-training's lowest seed: with several seeds (the seeds
    table lists them all) the main row is that of the first seed, the one the demo transfers."""
    same = [r for r in runs if r.kind == kind]
    seeds = sorted({s for s in map(_seed, same) if s is not None})
    if len(seeds) > 1:
        notes.append(
            f"'{name}': {kind} runs of seeds {' '.join(map(str, seeds))}; the row shows seed "
            f"{seeds[0]}, the seeds table all of them."
        )
        same = [r for r in same if _seed(r) == seeds[0]]
    return _newest(same, kind, name, notes)


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


def _seed_summary(name: str, det_rows: list[dict[str, Any]], notes: list[str]) -> dict[str, Any]:
    """The mean (and sample sd of AP) of one pre-training's detection runs: repeated fine-tunes
    with different detection SEEDs tell its AP from the noise of one run."""
    seeds = [r.get("det_seed") for r in det_rows]
    if None in seeds or len(set(seeds)) < len(seeds):
        notes.append(
            f"'{name}': {len(det_rows)} detection runs whose SEEDs are not all distinct and "
            f"fixed ({seeds}); the mean row is over runs, not over seeds."
        )
    row = {k: v for k, v in det_rows[0].items() if k not in BBOX_KEYS}
    row.update(name=f"{name} (mean of {len(det_rows)})", detection_dir=None)
    row["det_seed"] = " ".join("-" if s is None else str(s) for s in seeds)
    for key in BBOX_KEYS:
        values = [r[key] for r in det_rows if r.get(key) is not None]
        row[key] = statistics.fmean(values) if len(values) == len(det_rows) else None
    aps = [r["AP"] for r in det_rows if r.get("AP") is not None]
    row["AP_sd"] = statistics.stdev(aps) if len(aps) == len(det_rows) else None
    row["summary"] = True
    return row


def _detection_verdict(rows: list[dict[str, Any]]) -> list[str]:
    """One sentence per pair of pre-trainings with a mean row: which one's AP is higher, and
    whether the gap exceeds twice the pooled sd of the runs."""
    means = [r for r in rows if r.get("summary")]
    return [
        f"detection: {hi['name']} AP {hi['AP']:.1f} +- {hi['AP_sd']:.1f} vs {lo['name']} "
        f"{lo['AP']:.1f} +- {lo['AP_sd']:.1f} (seeds {hi['det_seed']} / {lo['det_seed']}): "
        f"{verdict}."
        for hi, lo, verdict in compare_means(means, "AP", "AP_sd")
    ]


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
        pre = _lowest_seed(group, "pretrain", name, notes)
        lin = _lowest_seed(group, "lincls", name, notes)
        # the paper's detector only: the other benchmarks have their own table (.benchmarks)
        dets = [r for r in group if r.kind == "detection" and in_main_table(r)] or [None]
        for det in dets:
            prov = _provenance(det) if det else {}
            # what was actually transferred (the converted weights' provenance) comes first
            sources = [("detection weights", prov)] if det else []
            if pre:
                sources.append((pre.path, pre.results))
            if lin and isinstance(lin.results.get("pretrain"), dict):
                sources.append((lin.path, lin.results["pretrain"]))
            row = {"name": name, **_merge(name, sources, notes), "source": "this work"}
            top1 = as_number(lin.results.get("top1")) if lin else None
            prov_top1 = as_number(prov.get("top1"))
            if top1 is not None and prov_top1 is not None and abs(top1 - prov_top1) > 1e-6:
                notes.append(
                    f"'{name}': top-1 {top1} in {lin.path} but {prov_top1} in the converted "
                    "weights' provenance; showing the linear-eval result."
                )
            row["top1"] = top1 if top1 is not None else prov_top1
            row.update(_lincls_columns(lin))
            row["seed"] = pretrain_seed(pre, lin, prov)
            row["det_seed"] = run_seed(det.path) if det else None
            bbox = det.results.get("bbox") if det else None
            bbox = bbox if isinstance(bbox, dict) else {}
            row.update({k: as_number(bbox.get(k)) for k in BBOX_KEYS})
            row["pretrain_dir"] = pre.path if pre else None
            row["lincls_dir"] = lin.path if lin else None
            row["detection_dir"] = det.path if det else None
            if len(dets) > 1:
                row["name"] = f"{name} ({det.folder})"
                det.label = row["name"]
            rows.append(row)
        if len(dets) > 1:
            rows.append(_seed_summary(name, rows[-len(dets):], notes))
    notes += _differing_evaluations(rows)
    notes += _detection_verdict(rows)
    if paper:
        for ref in PAPER_ROWS:
            row = {c: None for _, c in COLUMNS}
            row.update(ref)
            row.update(name=ref["name"] + PAPER_MARK, source="paper")
            rows.append(row)
    return rows, notes
