"""tools/train_det.py end to end on a tiny shapes dataset: train, resume, eval-only, bad input."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from transfer.shapes import make_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "shapes_fpn_cpu.yaml")
# the shapes CPU config made cheaper still: 64 px images, 2 per batch, few RoIs
FAST = [
    "SOLVER.IMS_PER_BATCH", "2", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "32",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64", "DATALOADER.NUM_WORKERS", "0",
    "TEST.PRECISE_BN.NUM_ITER", "2", "SOLVER.WARMUP_ITERS", "2", "SEED", "1",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",  # so an untrained model still predicts boxes
]  # fmt: skip


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    make_shapes(str(root / "shapes"), num_train=12, num_val=4, size=64, seed=0)
    return str(root)


def train_det(datasets, *args):
    env = dict(os.environ, DETECTRON2_DATASETS=datasets, OMP_NUM_THREADS="2")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "train_det.py"), *args],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip


def metrics_lines(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_train_resume_and_eval_only(datasets, tmp_path):
    out = str(tmp_path / "run")
    r = train_det(datasets, "--config", CONFIG, *FAST, "SOLVER.MAX_ITER", "4",
                  "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", out)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("config.yaml", "log.txt", "metrics.json", "model_0000001.pth", "model_final.pth"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert open(os.path.join(out, "last_checkpoint")).read().strip() == "model_final.pth"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
    first = results(out)
    assert first["kind"] == "detection" and first["iteration"] == 4
    assert first["pretrain"] == {"name": "random init"}
    assert set(first["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert 0.0 <= first["bbox"]["AP"] <= 100.0
    lines = metrics_lines(out)
    assert [m["iteration"] for m in lines if "total_loss" in m] == [3]
    assert any("bbox/AP" in m for m in lines)
    assert np.isfinite([m["total_loss"] for m in lines if "total_loss" in m]).all()
    ckpt = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 3 and "optimizer" in ckpt["trainer"]["_trainer"]

    # --resume continues at iteration 4 (does not restart) and finishes the longer schedule
    r = train_det(datasets, "--config", CONFIG, "--resume", *FAST, "SOLVER.MAX_ITER", "6",
                  "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", out)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["iteration"] for m in metrics_lines(out) if "total_loss" in m] == [3, 5]
    assert results(out)["iteration"] == 6
    assert os.path.isfile(os.path.join(out, "model_0000005.pth"))

    # --eval-only on the final weights reproduces the final evaluation of training exactly
    ev = str(tmp_path / "eval")
    r = train_det(datasets, "--config-file", CONFIG, "--eval-only", *FAST,
                  "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"),
                  "OUTPUT_DIR", ev)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert results(ev)["bbox"] == pytest.approx(results(out)["bbox"], abs=1e-6)


def _refused(r, *phrases):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for p in phrases:
        assert p in last, last


def test_unknown_key_and_missing_dataset(datasets, tmp_path):
    _refused(train_det(datasets, "--config", CONFIG, "SOLVER.BASE_LRR", "0.1"),
             "unknown config key SOLVER.BASE_LRR")  # fmt: skip
    _refused(train_det(str(tmp_path / "nowhere"), "--config", CONFIG),
             "dataset 'shapes_train'", "not found", "make_shapes.py")  # fmt: skip
    if not torch.cuda.is_available():
        _refused(train_det(datasets, "--config", CONFIG, "--num-gpus", "2"), "no GPU here")


def test_refuses_unconverted_wrong_or_unsafe_weights(datasets, tmp_path):
    args = ["--config", CONFIG, *FAST, "OUTPUT_DIR", str(tmp_path / "o"), "MODEL.WEIGHTS"]
    raw = str(tmp_path / "pretrain.pth")
    torch.save({"model": {"encoder_q.conv1.weight": torch.zeros(64, 3, 7, 7)},
                "meta": {"kind": "pretrain", "name": "x"}}, raw)  # fmt: skip
    _refused(train_det(datasets, *args, raw), "tools/convert.py")

    wrong = str(tmp_path / "r18ish.pkl")
    with open(wrong, "wb") as f:  # stem of the right name but the wrong kernel size
        pickle.dump({"model": {"stem.conv1.weight": np.zeros((64, 3, 3, 3), np.float32)},
                     "__author__": "test", "matching_heuristics": True}, f)  # fmt: skip
    _refused(train_det(datasets, *args, wrong), "stem.conv1.weight", "(64, 3, 3, 3)")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = str(tmp_path / "evil.pkl")
    with open(evil, "wb") as f:
        pickle.dump({"model": {"x": Evil()}}, f)
    r = train_det(datasets, *args, evil)
    _refused(r, "--unsafe")
    assert "pwned" not in r.stdout

    _refused(train_det(datasets, *args, str(tmp_path / "missing.pkl")), "not found", "convert.py")
