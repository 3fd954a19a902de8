"""tools/report.py / transfer.report: run dirs -> table, CSV and plots, without inventing values."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import pickle
import time

import numpy as np
import pytest

from pretrain.io import UserError, read_metrics
from transfer.report import make_report
from transfer.report.document import label_repeated_names
from transfer.report.plots import plot_pretrain_health
from transfer.report.rows import PAPER_ROWS
from transfer.report.runs import find_runs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADER = (
    "| name | method | loss | K | alpha | epochs | top-1 | kNN | retrieval | val | seed | det seed "
    "| AP | AP sd | AP50 | AP75 | APs | APm | APl |"
)

SIMO_META = {
    "kind": "pretrain",
    "name": "simo_k16",
    "method": "simo",
    "arch": "resnet50",
    "loss": "eqco",
    "tau": 0.2,
    "alpha": 256.0,
    "num_negatives": 16,
    "epochs": 200.0,
}


def _run(root, rel: str, results: dict, metrics: list[dict] | None = None, mtime=None) -> str:
    d = root / rel
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(results))
    if metrics is not None:
        (d / "metrics.json").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if mtime is not None:
        os.utime(d / "results.json", (mtime, mtime))
    return str(d)


@pytest.fixture
def runs(tmp_path):
    """Pretraining, linear-eval and detection OUTPUT_DIRs of two pre-trainings + a random init."""
    root = tmp_path / "output"
    simo_pre = {**SIMO_META, "iterations": 1000, "final_loss": 5.25}
    pre_metrics = [
        {"iteration": i, "total_loss": 9.0 - i / 200, "lr": 0.03, "[metric]epoch": i / 5}
        for i in range(19, 1000, 20)
    ]
    _run(root, "pretrain/simo_k16", simo_pre, pre_metrics)
    # what detectron2's default_setup dumps: the pretraining seed is only there
    (root / "pretrain" / "simo_k16" / "config.yaml").write_text(
        "DATASETS:\n  ROOT: datasets/shapes/imagefolder\nMODEL:\n  ARCH: resnet50\n"
        "  METHOD: simo\nSEED: 3\nSOLVER:\n  LR_DROP_EPOCHS:\n  - 60\n"
    )
    moco_pre = {
        "kind": "pretrain",
        "name": "mocov2_q65536",
        "method": "mocov2",
        "loss": "infonce",
        "tau": 0.2,
        "alpha": None,
        "num_negatives": 65536,
        "epochs": 200.0,
        "iterations": 1000,
        "final_loss": 6.5,
    }
    _run(
        root,
        "pretrain/mocov2",
        moco_pre,
        [{"iteration": 9, "loss": 8.0}, {"iteration": 19, "loss": 7.5}],
    )
    lincls = {
        "kind": "lincls",
        "name": "simo_k16",
        "top1": 68.1,
        "top5": 88.4,
        "knn_top1": 61.26,
        "knn_k": 20,
        "knn_t": 0.1,
        "seed": 0,
        "weights": str(root / "pretrain" / "simo_k16" / "model_final.pth"),
        "pretrain": SIMO_META,
        "input_kind": "pretrain",
        "val_images": 50000,
        "instance_retrieval_top1": 12.5,
        "retrieval_images": 256,
    }
    _run(root, "lincls/simo_k16", lincls)
    # the random-init baseline, evaluated the same way (a torchvision file: no pretraining seed)
    rand_lincls = {
        "kind": "lincls",
        "name": "random init",
        "top1": 30.04,
        "top5": 100.0,
        "knn_top1": 35.0,
        "knn_k": 20,
        "knn_t": 0.1,
        "seed": 0,
        "weights": str(root / "random_init.pth"),
        "pretrain": {},
        "input_kind": "torchvision",
        "val_images": 50000,
        "instance_retrieval_top1": 6.3,
        "retrieval_images": 256,
    }
    _run(root, "lincls/random_init", rand_lincls)
    det_metrics = [
        {"iteration": 19, "total_loss": 2.0, "loss_cls": 0.9, "lr": 0.02},
        {"iteration": 39, "total_loss": 1.5, "loss_cls": 0.7, "lr": 0.02},
        {"iteration": 39, "bbox/AP": 12.0, "bbox/AP50": 30.0},
        {"iteration": 59, "total_loss": 1.2, "loss_cls": 0.5, "lr": 0.02, "bbox/AP": 39.0123},
    ]
    prov = {**SIMO_META, "source": "/x/model_final.pth", "sha256": "ab" * 32, "top1": 68.1}
    prov.pop("kind")
    det = {
        "kind": "detection",
        "name": "simo_k16",
        "weights": "output/simo_k16.pkl",
        "pretrain": prov,
        "iteration": 60,
        "bbox": {"AP": 39.0123, "AP50": 59.16, "AP75": 42.3, "APs": None, "APm": 41.8, "APl": 50.5},
    }
    _run(root, "det/simo_k16", det, det_metrics)
    rand = {
        "kind": "detection",
        "name": "random init",
        "weights": "",
        "pretrain": {"name": "random init"},
        "iteration": 60,
        "bbox": {"AP": 25.44, "AP50": 41.0, "AP75": 26.05, "APs": 9.9, "APm": 27.3, "APl": 35.0},
    }
    _run(root, "det/random", rand, [{"iteration": 19, "total_loss": 3.0}])
    return root


def _rows(markdown: str) -> dict[str, list[str]]:
    lines = [ln for ln in markdown.splitlines() if ln.startswith("| ") and ln != HEADER]
    return {
        cells[0]: cells for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines)
    }


def test_report_table_csv_and_plots(runs, tmp_path):
    out = tmp_path / "report"
    report = make_report([str(runs)], str(out))

    assert report.markdown.splitlines()[0] == HEADER
    rows = _rows(report.markdown)
    assert list(rows) == ["mocov2_q65536", "simo_k16", "random init"]
    assert rows["simo_k16"] == [
        "simo_k16", "simo", "eqco", "16", "256", "200", "68.1", "61.3", "12.5", "50000", "3", "-",
        "39.0", "-", "59.2", "42.3", "-", "41.8", "50.5",
    ]  # fmt: skip
    # a pre-training that was never transferred: no AP, no top-1, and alpha not made up
    assert rows["mocov2_q65536"] == [
        "mocov2_q65536", "mocov2", "infonce", "65536", "-", "200", "-", "-", "-", "-", "-",
        "-", "-", "-", "-", "-", "-", "-", "-",
    ]  # fmt: skip
    # the baseline: probe and kNN under the same evaluation; random weights have no pretraining
    assert rows["random init"] == [
        "random init", "-", "-", "-", "-", "-", "30.0", "35.0", "6.3", "50000", "-", "-",
        "25.4", "-", "41.0", "26.1", "9.9", "27.3", "35.0",
    ]  # fmt: skip

    md = (out / "report.md").read_text()
    assert report.markdown in md and "[paper]" not in md
    assert "kNN top-1 (%) of the same frozen backbone on the same val split (k=20, T=0.1)" in md
    assert "retrieval: instance-retrieval top-1 (%) of that backbone" in md
    with open(out / "report.csv", newline="") as f:
        table = list(csv.DictReader(f))
    simo = next(r for r in table if r["name"] == "simo_k16")
    assert float(simo["AP"]) == 39.0123 and simo["APs"] == "-" and float(simo["top-1"]) == 68.1
    assert float(simo["kNN"]) == 61.26 and simo["val"] == "50000" and simo["seed"] == "3"
    assert (simo["knn_k"], simo["knn_t"], simo["lincls_seed"]) == ("20", "0.1", "0")
    assert float(simo["retrieval"]) == 12.5 and simo["retrieval_images"] == "256"
    assert simo["detection_dir"] == str(runs / "det" / "simo_k16")
    assert simo["lincls_dir"] == str(runs / "lincls" / "simo_k16")
    assert len(table) == 3 and all(r["source"] == "this work" for r in table)
    assert not any("differ in" in n for n in report.notes)  # one kNN setting, one val size

    for png in ("ap_bars.png", "pretrain_loss.png", "detection_curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"![{png}]({png})" in md
    # metrics.json from before the health metrics: no health figure, and no note about it
    assert not (out / "pretrain_health.png").exists() and "pretrain_health" not in md
    assert not any("health" in n for n in report.notes)


def test_paper_rows_are_marked(runs, tmp_path):
    report = make_report([str(runs)], str(tmp_path / "r"), paper=True)
    rows = _rows(report.markdown)
    assert rows["SiMo [paper]"] == [
        "SiMo [paper]", "simo", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-",
        "39.0", "-", "59.2", "42.3", "22.9", "41.8", "50.5",
    ]  # fmt: skip
    assert rows["supervised IN [paper]"][12:] == [
        "39.0", "-", "59.1", "42.6", "22.4", "42.2", "50.6"
    ]
    assert len(rows) == 3 + len(PAPER_ROWS)
    with open(tmp_path / "r" / "report.csv", newline="") as f:
        sources = [r["source"] for r in csv.DictReader(f)]
    assert sources == ["this work"] * 3 + ["paper"] * 4
    assert "reference rows from the EqCo paper" in (tmp_path / "r" / "report.md").read_text()


def test_run_dirs_given_one_by_one(runs, tmp_path):
    dirs = [str(runs / "det" / "simo_k16"), str(runs / "lincls" / "simo_k16")]
    report = make_report(dirs, str(tmp_path / "r"))
    rows = _rows(report.markdown)
    assert list(rows) == ["simo_k16"]
    # no pretraining run given: the seed still comes from the folder of the checkpoint that the
    # linear eval read
    assert rows["simo_k16"][6:13] == ["68.1", "61.3", "12.5", "50000", "3", "-", "39.0"]
    # no pretraining run given: no loss curve, and the report says so instead of drawing nothing
    assert not (tmp_path / "r" / "pretrain_loss.png").exists()
    assert any("no pretraining loss curves" in n for n in report.notes)


def test_provenance_read_from_converted_weights(tmp_path):
    pkl = tmp_path / "w.pkl"
    prov = {"name": "simclr_dcl", "method": "simclr", "loss": "dcl", "alpha": None,
            "num_negatives": 510, "epochs": 100.0, "top1": 55.5}  # fmt: skip
    with open(pkl, "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": np.zeros(3)}, "__author__": "x",
                     "matching_heuristics": True, "provenance": prov}, f)  # fmt: skip
    det = {"kind": "detection", "name": "simclr_dcl", "weights": str(pkl), "pretrain": {},
           "iteration": 5, "bbox": {"AP": 1.25}}  # fmt: skip
    _run(tmp_path, "det", det)
    rows = _rows(make_report([str(tmp_path / "det")], str(tmp_path / "r")).markdown)
    assert rows["simclr_dcl"] == [
        "simclr_dcl", "simclr", "dcl", "510", "-", "100", "55.5", "-", "-", "-", "-", "-",
        "1.2", "-", "-", "-", "-", "-", "-",
    ]  # fmt: skip


def test_duplicates_and_disagreements_are_reported(runs, tmp_path):
    # a second detection run of the same pre-training: its own row, labelled by its directory
    det2 = json.loads((runs / "det" / "simo_k16" / "results.json").read_text())
    det2["bbox"] = {"AP": 38.5}
    det2["pretrain"]["top1"] = 60.0
    _run(runs, "det/simo_k16_seed1", det2)
    # an older linear eval of the same pre-training: the newest one is used, and the report says so
    old = {"kind": "lincls", "name": "simo_k16", "top1": 50.0, "pretrain": SIMO_META}
    _run(runs, "lincls/simo_k16_old", old, mtime=time.time() - 3600)
    report = make_report([str(runs)], str(tmp_path / "r"))
    rows = _rows(report.markdown)
    assert rows["simo_k16 (simo_k16)"][6:13] == ["68.1", "61.3", "12.5", "50000", "3", "-", "39.0"]
    assert rows["simo_k16 (simo_k16_seed1)"][7:13] == ["61.3", "12.5", "50000", "3", "-", "38.5"]
    notes = " ".join(report.notes)
    assert "2 lincls results" in notes and "simo_k16_old" in notes
    assert "top-1 68.1" in notes and "60.0 in the converted weights" in notes


def test_detection_seeds_mean_sd_and_verdict(runs, tmp_path):
    """Fine-tunes repeated with detection SEEDs 0 1 2: a row each (its det seed read from its
    config.yaml), a mean row with the sample sd of AP, and a sentence on which pre-training wins."""
    for name, rel, aps in (("simo_k16", "det/simo_k16", (39.0, 37.0, 41.0)),
                           ("random init", "det/random", (25.0, 26.0, 24.0))):  # fmt: skip
        base = json.loads((runs / rel / "results.json").read_text())
        for seed, ap in enumerate(aps):
            d = runs / f"{rel}_s{seed}"
            _run(runs, f"{rel}_s{seed}", {**base, "bbox": {**base["bbox"], "AP": ap}})
            (d / "config.yaml").write_text(f"MODEL:\n  DEVICE: cpu\nSEED: {seed}\n")
        (runs / rel / "results.json").unlink()  # the fixture's unseeded run is not one of them
    report = make_report([str(runs)], str(tmp_path / "r"))
    rows = _rows(report.markdown)
    assert rows["simo_k16 (simo_k16_s1)"][10:14] == ["3", "1", "37.0", "-"]
    mean = rows["simo_k16 (mean of 3)"]
    assert mean[6:15] == ["68.1", "61.3", "12.5", "50000", "3", "0 1 2", "39.0", "2.0", "59.2"]
    assert rows["random init (mean of 3)"][11:14] == ["0 1 2", "25.0", "1.0"]
    verdict = [n for n in report.notes if n.startswith("detection:")]
    assert verdict == [
        "detection: simo_k16 (mean of 3) AP 39.0 +- 2.0 vs random init (mean of 3) 25.0 +- 1.0 "
        "(seeds 0 1 2 / 0 1 2): the gap 14.0 is above 2 x the pooled sd (3.2)."
    ]
    with open(tmp_path / "r" / "report.csv", newline="") as f:
        csv_mean = next(r for r in csv.DictReader(f) if r["name"] == "simo_k16 (mean of 3)")
    assert float(csv_mean["AP"]) == 39.0 and float(csv_mean["AP sd"]) == 2.0
    assert csv_mean["det seed"] == "0 1 2"


def test_old_results_without_knn_and_seed_sources(runs, tmp_path):
    """results.json files written before knn_top1 / val_images existed still read ("-"); the
    seed comes from a pretraining meta first, then from a config.yaml, never from a linear-eval
    or random-init folder; different kNN settings or val sizes get a note."""
    meta = {"kind": "pretrain", "name": "mocov2_q65536", "method": "mocov2"}
    weights = str(runs / "pretrain" / "mocov2" / "model_final.pth")
    old = {"kind": "lincls", "name": "mocov2_q65536", "top1": 47.25, "top5": 80.0,
           "weights": weights, "pretrain": meta}  # fmt: skip
    _run(runs, "lincls/mocov2", old)
    # the linear-eval folder has a config.yaml too, but it is no pretraining config
    (runs / "lincls" / "mocov2" / "config.yaml").write_text("MODEL:\n  ARCH: resnet50\nSEED: 9\n")
    rows = _rows(make_report([str(runs)], str(tmp_path / "r")).markdown)
    assert rows["mocov2_q65536"][6:11] == ["47.2", "-", "-", "-", "-"]

    # the pretraining run's folder holds its config; SEED -1 (drawn at random) is no seed, a meta
    # "seed" wins over any config
    def seed_cell(config_seed):
        pre_config = runs / "pretrain" / "mocov2" / "config.yaml"
        pre_config.write_text(f"MODEL:\n  METHOD: mocov2\nSEED: {config_seed}\n")
        return _rows(make_report([str(runs)], str(tmp_path / "r")).markdown)["mocov2_q65536"][10]

    assert (seed_cell(7), seed_cell(-1)) == ("7", "-")
    old["pretrain"]["seed"] = 11
    old.update(knn_top1=40.04, knn_k=200, knn_t=0.07, val_images=1000)
    (runs / "lincls" / "mocov2" / "results.json").write_text(json.dumps(old))
    report = make_report([str(runs)], str(tmp_path / "r"))
    assert _rows(report.markdown)["mocov2_q65536"][6:11] == ["47.2", "40.0", "-", "1000", "11"]
    assert report.notes[-2:] == [
        "the linear evals differ in kNN settings (k, T) (200, 0.07: mocov2_q65536; 20, 0.1: "
        "simo_k16, random init); compare with care.",
        "the linear evals differ in val sizes (1000: mocov2_q65536; 50000: simo_k16, random "
        "init); compare with care.",
    ]


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _health_metrics() -> list[dict]:
    """What a pretraining run with LOG_PERIOD 20 and TEST.KNN_PERIOD 40 writes: health keys on the
    log lines, kNN-monitor keys on their own lines."""
    lines = []
    for i in range(19, 100, 20):
        lines.append({
            "iteration": i, "total_loss": 8.0 - i / 50, "lr": 0.06, "[metric]epoch": i / 10,
            "[metric]health/contrastive_top1": 0.05 + i / 200,
            "[metric]health/alignment": 1.5 - i / 100,
            "[metric]health/uniformity": -1.0 - i / 50,
            "[metric]health/emb_std": 0.04 + i / 10000,
        })  # fmt: skip
        if (i + 1) % 40 == 0:
            lines.append({"iteration": i, "knn_top1": 30.0 + i / 4,
                          "instance_retrieval_top1": 10.0 + i / 2})  # fmt: skip
    return lines


def test_pretrain_health_plot(runs, tmp_path):
    """Health metrics and the kNN monitor of a pretraining run -> pretrain_health.png with the
    values of metrics.json; the random-init lincls kNN is the dashed line, and the report says
    when its k / T differ from the monitor's."""
    metrics = _health_metrics()
    meta = {**SIMO_META, "name": "simo_health", "iterations": 100}
    _run(runs, "pretrain/simo_health", meta, metrics)
    (runs / "pretrain" / "simo_health" / "config.yaml").write_text(
        "MODEL:\n  METHOD: simo\nSEED: 1\nTEST:\n  KNN_K: 200\n  KNN_PERIOD: 40\n  KNN_T: 0.1\n"
    )
    out = tmp_path / "r"
    report = make_report([str(runs)], str(out))

    data = (out / "pretrain_health.png").read_bytes()
    width, height = _png_size(data)
    assert len(data) > 20000 and width > 1000 and height > 500
    assert str(out / "pretrain_health.png") in report.files
    md = (out / "report.md").read_text()
    assert "![pretrain_health.png](pretrain_health.png)" in md
    assert "Dashed: kNN top-1 of each random-init linear eval" in md
    assert "and its instance-retrieval top-1, the monitor's measurement when" in md
    # monitor k=200 vs lincls k=20: said in the notes, one note per (run, baseline)
    label = "random init kNN (lincls, k=20, T=0.1)"
    health_notes = [n for n in report.notes if "pretrain_health.png" in n]
    lin_dir = runs / "lincls" / "random_init"
    assert health_notes == [
        "pretrain_health.png: the kNN monitor of 'simo_health' uses k=200, T=0.1, the random-init "
        f"linear eval {lin_dir} k=20, T=0.1: its dashed line is another measurement."
    ]

    drawn = plot_pretrain_health(find_runs([str(runs)]), str(tmp_path / "h.png"))
    assert _png_size((tmp_path / "h.png").read_bytes())[0] > 0

    def written(key):
        return [(m["iteration"], m[key]) for m in metrics if key in m]

    assert drawn.series["loss"]["simo_health"] == written("total_loss")
    for panel in ("contrastive_top1", "alignment", "uniformity", "emb_std"):
        assert drawn.series[panel] == {"simo_health": written(f"[metric]health/{panel}")}, panel
    assert drawn.series["knn_top1"] == {"simo_health": [(39, 39.75), (79, 49.75)]}
    assert drawn.series["instance_retrieval_top1"] == {"simo_health": [(39, 29.5), (79, 49.5)]}
    # the older runs have a loss only: drawn in the loss panel, in no other
    assert drawn.series["loss"]["simo_k16"][0] == (19, 9.0 - 19 / 200)
    assert drawn.series["loss"]["mocov2_q65536"] == [(9, 8.0), (19, 7.5)]
    # and the random-init linear eval's retrieval on the retrieval panel
    assert drawn.baselines == {label: 35.0, "random init retrieval (lincls)": 6.3}

    # the same k / T on both sides: no note; a monitor without its config: the report says so
    (runs / "pretrain" / "simo_health" / "config.yaml").write_text(
        "MODEL:\n  METHOD: simo\nTEST:\n  KNN_K: 20\n  KNN_T: 0.1\n"
    )
    assert plot_pretrain_health(find_runs([str(runs)]), str(tmp_path / "h.png")).notes == []
    (runs / "pretrain" / "simo_health" / "config.yaml").unlink()
    assert plot_pretrain_health(find_runs([str(runs)]), str(tmp_path / "h.png")).notes == [
        "pretrain_health.png: k / T of the kNN monitor of 'simo_health' (config.yaml TEST) or of "
        f"the random-init linear eval {lin_dir} (knn_k / knn_t) are not in the files; its dashed "
        "line may be another measurement."
    ]


def test_repeated_names_get_one_label_each(tmp_path):
    """Three pretraining seeds of one NAME (PRETRAIN_SEEDS="0 1 2" make demo): three legend labels
    (the third used to keep the bare name once the first two were relabelled)."""
    for d in ("pretrain_simo", "pretrain_simo_s1", "pretrain_simo_s2"):
        _run(tmp_path, f"out/{d}", {"kind": "pretrain", "name": "simo"})
    _run(tmp_path, "out/det", {"kind": "detection", "name": "simo", "bbox": {}})
    runs = find_runs([str(tmp_path / "out")])
    label_repeated_names(runs)
    labels = sorted(r.label for r in runs if r.kind == "pretrain")
    assert labels == [
        "simo (pretrain_simo)", "simo (pretrain_simo_s1)", "simo (pretrain_simo_s2)"
    ]
    assert [r.label for r in runs if r.kind == "detection"] == ["simo"]  # alone of its kind


def test_pretrain_health_panels_skipped(tmp_path):
    """Only the keys a run logged get a panel; kNN keys alone are enough for a figure, and with no
    random-init linear eval there is no dashed line; loss-only runs give no figure."""
    knn_only = [{"iteration": 9, "total_loss": 5.0}, {"iteration": 9, "knn_top1": 12.5}]
    _run(tmp_path, "out/pre", {"kind": "pretrain", "name": "old_knn"}, knn_only)
    drawn = plot_pretrain_health(find_runs([str(tmp_path / "out")]), str(tmp_path / "a.png"))
    assert drawn.series == {"loss": {"old_knn": [(9, 5.0)]}, "knn_top1": {"old_knn": [(9, 12.5)]}}
    assert drawn.baselines == {} and drawn.notes == []
    assert _png_size((tmp_path / "a.png").read_bytes())[0] > 0

    _run(tmp_path, "loss_only/pre", {"kind": "pretrain", "name": "old"}, knn_only[:1])
    _run(tmp_path, "loss_only/lin", {"kind": "lincls", "name": "random init", "knn_top1": 3.0})
    runs = find_runs([str(tmp_path / "loss_only")])
    assert plot_pretrain_health(runs, str(tmp_path / "b.png")) is None
    assert not (tmp_path / "b.png").exists()
    make_report([str(tmp_path / "loss_only")], str(tmp_path / "r"))
    assert (tmp_path / "r" / "pretrain_loss.png").exists()
    assert not (tmp_path / "r" / "pretrain_health.png").exists()


def test_read_metrics_resume_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(
        '{"iteration": 9, "total_loss": 3.0}\n'
        '{"iteration": 19, "total_loss": 2.0}\n'
        '{"iteration": 19, "total_loss": 2.5, "bbox/AP": NaN}\n'  # resumed: written again
        '{"iteration": 29, "total_lo'  # killed mid-write
    )
    series = read_metrics(str(path))
    assert series["total_loss"] == [(9, 3.0), (19, 2.5)]
    assert len(series["bbox/AP"]) == 1 and np.isnan(series["bbox/AP"][0][1])


def test_bad_inputs_are_one_sentence(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no results.json in it or below"):
        find_runs([str(tmp_path / "empty")])
    with pytest.raises(UserError, match="no such directory"):
        find_runs([str(tmp_path / "nope")])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    with pytest.raises(UserError, match=r"bad/results.json: not readable JSON"):
        find_runs([str(bad)])
    (bad / "results.json").write_text(json.dumps({"kind": "eval", "name": "x"}))
    with pytest.raises(UserError, match="kind 'eval' is none of pretrain, lincls, detection"):
        find_runs([str(bad)])


def _cli_main():
    spec = importlib.util.spec_from_file_location(
        "report_cli", os.path.join(REPO, "tools/report.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli(runs, tmp_path, capsys):
    _cli_main()([str(runs), "--out", str(tmp_path / "r"), "--paper"])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == HEADER
    assert "| SiMo [paper] |" in out and "report.csv" in out
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        _cli_main()([str(tmp_path / "empty")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no results.json" in err[0]


def _damage_two_runs(runs):
    """Two of the runs become unreadable: a results.json cut off mid-write and one of garbage
    bytes (a bad sector); returns the two files."""
    cut = runs / "det" / "random" / "results.json"
    cut.write_text(cut.read_text()[:40])
    garbage = runs / "pretrain" / "mocov2" / "results.json"
    garbage.write_bytes(bytes(range(128, 256)) * 4)
    return cut, garbage


def test_unreadable_runs_are_left_out(runs, tmp_path):
    """One unreadable results.json among many runs: the others are reported, each one left out
    is named with why in the report's notes; strict: the whole report is refused."""
    cut, garbage = _damage_two_runs(runs)
    with open(runs / "det" / "simo_k16" / "metrics.json", "ab") as f:  # and a bad sector here
        f.write(bytes(range(128, 256)) + b"\n")
    report = make_report([str(runs)], str(tmp_path / "r"))
    assert list(_rows(report.markdown)) == ["simo_k16", "random init"]  # lincls still there
    assert (tmp_path / "r" / "detection_curves.png").is_file()
    assert report.skipped == [
        f"{cut}: not readable JSON (Unterminated string starting at: line 1 column 31 (char "
        "30)); re-run that stage or remove the file.",
        f"{garbage}: not readable JSON ('utf-8' codec can't decode byte 0x80 in position 0: "
        "invalid start byte); re-run that stage or remove the file.",
    ]
    assert report.skipped == sorted(report.skipped)  # in the order of the folders: stable
    md = (tmp_path / "r" / "report.md").read_text()
    for reason in report.skipped:
        assert f"- left out, unreadable: {reason}\n" in md
    with pytest.raises(UserError) as e:
        make_report([str(runs)], str(tmp_path / "strict"), strict=True)
    assert str(e.value) == report.skipped[0]
    # run dirs given one by one: the readable one is reported
    report = make_report([str(cut.parent), str(runs / "det" / "simo_k16")], str(tmp_path / "r2"))
    assert list(_rows(report.markdown)) == ["simo_k16"] and len(report.skipped) == 1
    # nothing readable at all: one sentence
    with pytest.raises(UserError, match=r"none of the runs can be read \(2 skipped; the first: "):
        make_report([str(cut.parent), str(garbage.parent)], str(tmp_path / "r3"))


def test_cli_warns_per_unreadable_run_and_strict_refuses(runs, tmp_path, capsys):
    cut, garbage = _damage_two_runs(runs)
    _cli_main()([str(runs), "--out", str(tmp_path / "r")])  # returns: exit status 0
    captured = capsys.readouterr()
    warnings = captured.err.strip().splitlines()
    assert [w.split(": ")[:2] for w in warnings] == [
        ["warning", "left out a run"],
        ["warning", "left out a run"],
    ]
    assert str(cut) in warnings[0] and str(garbage) in warnings[1]
    assert captured.out.splitlines()[0] == HEADER and "| simo_k16 |" in captured.out
    with pytest.raises(SystemExit) as exc:
        _cli_main()([str(runs), "--out", str(tmp_path / "s"), "--strict"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {cut}: " + warnings[0].split(f"{cut}: ", 1)[1]]


def test_pretraining_seeds_table_plot_and_verdict(runs, tmp_path):
    """PRETRAIN_SEEDS="0 1 2" make demo: linear evals of three pretraining seeds (the seed read from
    the config.yaml beside each checkpoint) and of three random inits (their own SEED) give a seeds
    table with mean +- sd rows, lincls_seeds.png and one verdict per metric; the main table keeps
    the lowest seed's row."""
    base = json.loads((runs / "lincls" / "simo_k16" / "results.json").read_text())
    rand = json.loads((runs / "lincls" / "random_init" / "results.json").read_text())
    for rel in ("lincls/simo_k16", "lincls/random_init", "pretrain/simo_k16"):  # seed 3's
        (runs / rel / "results.json").unlink()
    # (top-1, kNN, retrieval) of SiMo, then of random init, per seed
    per_seed = (((80.0, 70.0, 14.0), (40.0, 45.0, 7.0)),
                ((86.0, 74.0, 18.0), (42.0, 47.0, 6.0)),
                ((83.0, 72.0, 16.0), (41.0, 46.0, 8.0)))  # fmt: skip
    for seed, ((top1, knn, ret), (rtop1, rknn, rret)) in enumerate(per_seed):
        pre = runs / "pretrain" / f"simo_s{seed}"
        pre.mkdir(parents=True)
        (pre / "config.yaml").write_text(f"MODEL:\n  METHOD: simo\nSEED: {seed}\n")
        weights = str(pre / "model_final.pth")
        _run(runs, f"lincls/simo_s{seed}",
             {**base, "top1": top1, "knn_top1": knn, "instance_retrieval_top1": ret,
              "weights": weights, "val_images": 1000})  # fmt: skip
        d = _run(runs, f"lincls/random_init_s{seed}",
                 {**rand, "top1": rtop1, "knn_top1": rknn, "instance_retrieval_top1": rret,
                  "val_images": 1000})  # fmt: skip
        (runs / d / "config.yaml").write_text(f"MODEL:\n  ARCH: resnet18\nSEED: {seed}\n")
    report = make_report([str(runs)], str(tmp_path / "r"))
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| simo_k16 | 1 | 86.0 | 74.0 | 18.0 | 1000 |" in md
    assert "| simo_k16 (mean of 3) | 0 1 2 | 83.0 +- 3.0 | 72.0 +- 2.0 | 16.0 +- 2.0 | 1000 |" in md
    rand_row = "| random init (mean of 3) | 0 1 2 | 41.0 +- 1.0 | 46.0 +- 1.0 | 7.0 +- 1.0 | 1000 |"
    assert rand_row in md
    assert (tmp_path / "r" / "lincls_seeds.png").is_file()
    assert report.seeds_markdown in md and report.seeds_markdown.count("\n") == 9  # 8 rows
    verdicts = [n for n in report.notes if n.startswith("linear eval")]
    assert verdicts == [
        "linear eval top-1: simo_k16 (mean of 3) 83.0 +- 3.0 vs random init (mean of 3) 41.0 +- "
        "1.0 (seeds 0 1 2 / 0 1 2, 1000 val images): the gap 42.0 is above 2 x the pooled sd "
        "(4.5).",
        "linear eval kNN: simo_k16 (mean of 3) 72.0 +- 2.0 vs random init (mean of 3) 46.0 +- "
        "1.0 (seeds 0 1 2 / 0 1 2, 1000 val images): the gap 26.0 is above 2 x the pooled sd "
        "(3.2).",
    ]
    retrieval = [n for n in report.notes if n.startswith("instance retrieval")]
    assert retrieval == [
        "instance retrieval: simo_k16 (mean of 3) 16.0 +- 2.0 vs random init (mean of 3) 7.0 +- "
        "1.0 (seeds 0 1 2 / 0 1 2, 256 val images in the gallery): the gap 9.0 is above 2 x the "
        "pooled sd (3.2).",
    ]
    # the main table: seed 0's linear eval for both (SiMo's seed from its checkpoint's folder)
    rows = _rows(report.markdown)
    assert rows["simo_k16"][6:11] == ["80.0", "70.0", "14.0", "1000", "0"]
    assert rows["random init"][6:10] == ["40.0", "45.0", "7.0", "1000"]
    assert any("'simo_k16': lincls runs of seeds 0 1 2; the row shows seed 0" in n
               for n in report.notes)


# --------------------------------------------------------------------------------------------
# ap_vs_top1.png: detection AP against linear top-1, and titles that fit


@pytest.fixture
def drawn(monkeypatch):
    """What each plot drew, read from its matplotlib artists just before the PNG is written:
    ``drawn[png file name]`` = {"titles": [(title, width, room)], "points": [(x, y, xerr, yerr)]}
    (points: the error-bar containers of the first axes)."""
    import transfer.report.plots as plots

    fit = plots._fit_titles
    seen = {}

    def record(fig):
        fit(fig)
        renderer = fig.canvas.get_renderer()
        titles = [(ax.title.get_text(), ax.title.get_window_extent(renderer).width, ax.bbox.width)
                  for ax in fig.axes if ax.title.get_text()]  # fmt: skip
        points = []
        for c in fig.axes[0].containers if fig.axes else []:
            line, _, bars = c.lines if type(c).__name__ == "ErrorbarContainer" else (None,) * 3
            if line is None:  # bars with error bars (lincls_seeds.png), not points
                continue
            x, y = float(line.get_xdata()[0]), float(line.get_ydata()[0])
            errs = iter(bars)
            half = {}
            for flag, axis in ((c.has_xerr, 0), (c.has_yerr, 1)):
                if flag:
                    (lo, hi), = next(errs).get_segments()
                    half[axis] = (hi[axis] - lo[axis]) / 2
            points.append((x, y, half.get(0), half.get(1)))
        seen["next"] = {"titles": titles, "points": points}

    def save(fig, path, dpi):
        record(fig)
        seen[os.path.basename(path)] = seen.pop("next")
        plots.save_figure(fig, path, dpi=dpi)

    monkeypatch.setattr(plots, "_save", save)
    return seen


def test_ap_vs_top1_plots_the_tables_values_first(runs, tmp_path, drawn):
    out = tmp_path / "r"
    report = make_report([str(runs)], str(out), paper=True)
    data = (out / "ap_vs_top1.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = (out / "report.md").read_text()
    images = [line for line in md.splitlines() if line.startswith("![")]
    assert images[0] == "![ap_vs_top1.png](ap_vs_top1.png)" and images.count(images[0]) == 1
    assert md.index(images[0]) < md.index(HEADER)
    assert "Squares: the EqCo paper's ImageNet linear top-1" in md
    # one point per pre-training with a top-1 and an AP, at the table's values (report.csv);
    # mocov2_q65536 has neither; the paper's rows at its linear top-1 (MoCo v2 67.5, SiMo 68.1)
    with open(out / "report.csv", newline="") as f:
        table = {r["name"]: r for r in csv.DictReader(f)}
    expected = [(float(table[n]["top-1"]), float(table[n]["AP"]), None, None)
                for n in ("simo_k16", "random init")]  # fmt: skip
    expected += [(67.5, 39.1, None, None), (68.1, 39.0, None, None)]
    assert sorted(drawn["ap_vs_top1.png"]["points"]) == sorted(expected)
    assert sorted((p.name, p.top1, p.ap, p.paper) for p in report.points) == [
        ("MoCo v2 [paper]", 67.5, 39.1, True), ("SiMo [paper]", 68.1, 39.0, True),
        ("random init", 30.04, 25.44, False), ("simo_k16", 68.1, 39.0123, False),
    ]  # fmt: skip
    # every title of every plot fits its axes
    assert {"ap_vs_top1.png", "ap_bars.png", "pretrain_loss.png"} <= set(drawn)
    for name, plot in drawn.items():
        for title, width, room in plot["titles"]:
            assert width <= room, (name, title, width, room)
    # without --paper: no paper points, no word of them
    report = make_report([str(runs)], str(tmp_path / "own"))
    assert [p.name for p in report.points] == ["simo_k16", "random init"]
    assert "Squares" not in (tmp_path / "own" / "report.md").read_text()


def test_ap_vs_top1_error_bars_are_the_seed_sds(runs, tmp_path, drawn):
    """Three pretraining seeds (top-1 83 +- 3 / 41 +- 1) and three detection seeds (AP 39 +- 2 /
    25 +- 1): one point per pre-training at the two means, bars of one sd each way."""
    lin = json.loads((runs / "lincls" / "simo_k16" / "results.json").read_text())
    rand = json.loads((runs / "lincls" / "random_init" / "results.json").read_text())
    for rel in ("lincls/simo_k16", "lincls/random_init"):
        (runs / rel / "results.json").unlink()
    for seed, (top1, rtop1) in enumerate(((80.0, 40.0), (86.0, 42.0), (83.0, 41.0))):
        pre = runs / "pretrain" / f"simo_s{seed}"
        pre.mkdir(parents=True)
        (pre / "config.yaml").write_text(f"MODEL:\n  METHOD: simo\nSEED: {seed}\n")
        _run(runs, f"lincls/simo_s{seed}", {**lin, "top1": top1,
                                              "weights": str(pre / "model_final.pth")})
        d = _run(runs, f"lincls/random_init_s{seed}", {**rand, "top1": rtop1})
        (runs / d / "config.yaml").write_text(f"MODEL:\n  ARCH: resnet18\nSEED: {seed}\n")
    for rel, aps in (("det/simo_k16", (39.0, 37.0, 41.0)), ("det/random", (25.0, 26.0, 24.0))):
        base = json.loads((runs / rel / "results.json").read_text())
        for seed, ap in enumerate(aps):
            d = _run(runs, f"{rel}_s{seed}", {**base, "bbox": {**base["bbox"], "AP": ap}})
            (runs / d / "config.yaml").write_text(f"MODEL:\n  DEVICE: cpu\nSEED: {seed}\n")
        (runs / rel / "results.json").unlink()
    report = make_report([str(runs)], str(tmp_path / "r"))
    points = drawn["ap_vs_top1.png"]["points"]
    flat = [v for point in sorted(points) for v in point]
    assert flat == pytest.approx([41.0, 25.0, 1.0, 1.0, 83.0, 39.0, 3.0, 2.0])
    # the same numbers as the seeds table's and the detection mean rows
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| simo_k16 (mean of 3) | 0 1 2 | 83.0 +- 3.0 |" in md
    assert _rows(report.markdown)["simo_k16 (mean of 3)"][12:14] == ["39.0", "2.0"]
    assert sorted(p.name for p in report.points) == ["random init", "simo_k16"]


def test_long_titles_are_wrapped_to_fit():
    from transfer.report.plots import _fit_titles, _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(5, 3))
    text = "Detection transfer: box AP per pre-training (hatched: paper rows from the EqCo paper)"
    axes[0].set_title(text)
    axes[1].set_title("short")
    fig.suptitle(text + ", and a suptitle longer than the whole figure is wide")
    _fit_titles(fig)
    renderer = fig.canvas.get_renderer()
    assert axes[0].title.get_text().replace("\n", " ") == text
    assert axes[0].title.get_text().count("\n") >= 1 and axes[1].title.get_text() == "short"
    for ax in axes:
        assert ax.title.get_window_extent(renderer).width <= ax.bbox.width
    assert fig._suptitle.get_window_extent(renderer).width <= fig.bbox.width
    plt.close(fig)


def test_benchmark_table_mean_sd_order_and_main_table(tmp_path):
    """Runs of tools/benchmark.py (results.json with "benchmark" and "seed") go to the benchmark
    table as mean +- sample sd per pre-training and metric, in the main table's row order, with
    a note where a run lacks a value; the main table's AP stays the paper detector's."""
    lin = {"kind": "lincls", "top1": 80.0, "knn_top1": 70.0}
    _run(tmp_path, "lin_simo", {**lin, "name": "simo"})
    _run(tmp_path, "lin_rand", {**lin, "name": "random init", "top1": 40.0, "knn_top1": 45.0})
    det = {"kind": "detection", "iteration": 9}
    _run(tmp_path, "det_simo", {**det, "name": "simo", "benchmark": "coco_fpn_4conv1fc_1x",
                                "seed": 0, "bbox": {"AP": 7.5}})  # fmt: skip
    voc = {"simo": [(20.0, 5.0, 1.0), (24.0, 7.0, 2.0)], "random init": [(10.0, 3.0, 0.5)]}
    for name, values in voc.items():
        for seed, (ap50, ap, ap75) in enumerate(values):
            _run(tmp_path, f"b_{name}/voc/seed{seed}", {
                **det, "name": name, "benchmark": "voc", "seed": seed, "evaluator":
                "pascal_voc_2007", "bbox": {"AP50": ap50, "AP": ap, "AP75": ap75}})  # fmt: skip
    _run(tmp_path, "b_simo/coco_c4_1x/seed0", {**det, "name": "simo", "benchmark": "coco_c4_1x",
                                               "seed": 0, "bbox": {"AP": 3.0}})  # fmt: skip

    report = make_report([str(tmp_path)], str(tmp_path / "report"), paper=False)
    lines = report.benchmarks_markdown.splitlines()
    assert lines[0] == (
        "| pre-training | top-1 | kNN | VOC AP50 | VOC AP | VOC AP75 | C4 1x box AP "
        "| C4 1x mask AP | 4conv1fc box AP |"
    )
    # sample sd of (20, 24) = 2.83, of (5, 7) = 1.41, of (1, 2) = 0.71
    # rows in the main table's order
    assert [r["name"] for r in report.rows] == ["random init", "simo"]
    assert lines[2] == "| random init | 40.0 | 45.0 | 10.0 | 3.0 | 0.5 | - | - | - |"
    assert lines[3] == "| simo | 80.0 | 70.0 | 22.0 ± 2.8 | 6.0 ± 1.4 | 1.5 ± 0.7 | 3.0 | - | 7.5 |"
    assert "VOC = VOC07+12 R50-C4 (detection SEEDs: random init: 0; simo: 0 1)" in lines[-1]
    assert any("'simo' coco_c4_1x mask AP: 1 of 1 runs give no value" in n for n in report.notes)
    # the main table: the paper's detector only (7.5), no VOC or C4 number
    assert [(r["name"], r["AP"]) for r in report.rows] == [("random init", None), ("simo", 7.5)]
    assert os.path.isfile(tmp_path / "report" / "benchmarks.png")
    with open(tmp_path / "report" / "report.md") as f:
        assert "## Transfer benchmarks" in f.read()
