"""A dataset with corrupt, empty, CMYK and PNG files: pretraining and linear evaluation run to
the end, read the CMYK/PNG files, and report the unreadable ones in results.json and the log."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
import torchvision
from detectron2.utils.env import seed_all_rng
from PIL import Image

from pretrain.config import get_pretrain_cfg
from pretrain.pretrainer import Pretrainer
from pretrain.lincls import get_lincls_cfg, run_linear_eval

BROKEN_PER_SPLIT = 3  # an empty file, a truncated JPEG, a text file named .jpg


@pytest.fixture(scope="module")
def messy(shapes_folder, tmp_path_factory):
    """A copy of the shapes ImageFolder plus, in every split: a CMYK JPEG and an RGBA PNG
    (readable) and three unreadable files."""
    root = tmp_path_factory.mktemp("messy") / "imagefolder"
    shutil.copytree(shapes_folder(40, 20, 32), root)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        folder = root / split / "circle"
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert("CMYK").save(folder / "cmyk.jpg")
        rgba = np.concatenate([pixels, np.full((32, 32, 1), 255, np.uint8)], 2)
        Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
        (folder / "empty.jpg").write_bytes(b"")
        data = (folder / "cmyk.jpg").read_bytes()
        (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
        (folder / "notes.jpg").write_text("not an image\n")
    return str(root)


def _merge(cfg, opts):
    cfg.merge_from_list([x if isinstance(x, list) else str(x) for kv in opts.items() for x in kv])
    return cfg


def test_pretraining_skips_and_reports_unreadable_files(messy, tmp_path, caplog):
    cfg = _merge(
        get_pretrain_cfg(),
        {
            "MODEL.ARCH": "resnet18", "MODEL.DIM": 16, "MODEL.MLP_HIDDEN": 32, "INPUT.SIZE": 16,
            "DATASETS.ROOT": messy, "SOLVER.IMS_PER_BATCH": 8, "LOSS.NUM_NEGATIVES": 4,
            "SOLVER.EPOCHS": 1, "SOLVER.WARMUP_EPOCHS": 0.0, "DATALOADER.NUM_WORKERS": 0,
            "CUDNN_BENCHMARK": False, "LOG_PERIOD": 1, "OUTPUT_DIR": str(tmp_path / "pre"),
        },
    )  # fmt: skip
    seed_all_rng(0)
    (tmp_path / "pre").mkdir()
    with caplog.at_level(logging.WARNING):
        results = Pretrainer(cfg).resume_or_load(resume=False).train()
    # 45 train files (40 + 5 added), batches of 8: 5 iterations see 40 of them; the epoch
    # covers the three unreadable ones unless the sampler drops them into the last partial batch
    assert results["iterations"] == 5
    assert 1 <= results["skipped_images"] <= BROKEN_PER_SPLIT
    on_disk = json.loads((tmp_path / "pre" / "results.json").read_text())
    assert on_disk["skipped_images"] == results["skipped_images"]
    assert f"{results['skipped_images']} unreadable training images were skipped" in caplog.text
    assert np.isfinite(results["final_loss"])


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "images"])
def test_linear_eval_skips_and_reports_unreadable_files(messy, tmp_path, caplog, cached):
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    cfg = _merge(
        get_lincls_cfg(),
        {
            "MODEL.ARCH": "resnet18", "MODEL.WEIGHTS": str(weights), "INPUT.SIZE": 16,
            "DATASETS.ROOT": messy, "SOLVER.IMS_PER_BATCH": 9, "SOLVER.EPOCHS": 1,
            "SOLVER.LR_DROP_EPOCHS": [2, 3], "SOLVER.CHECKPOINT_PERIOD_EPOCHS": 100.0,
            "TEST.IMS_PER_BATCH": 25, "DATALOADER.NUM_WORKERS": 0, "CUDNN_BENCHMARK": False,
            "OUTPUT_DIR": str(tmp_path / "lin"),
        },
    )  # fmt: skip
    (tmp_path / "lin").mkdir()
    with caplog.at_level(logging.WARNING):
        results = run_linear_eval(cfg, cached=cached)
    # every val file is read (and, cached, every train file once): all six broken ones are met
    assert results["skipped_images"] == 2 * BROKEN_PER_SPLIT
    assert results["val_images"] == 25  # 20 + 5 files; the broken ones are replaced, not dropped
    assert 0.0 <= results["top1"] <= 100.0
    on_disk = json.loads((tmp_path / "lin" / "results.json").read_text())
    assert on_disk["skipped_images"] == 2 * BROKEN_PER_SPLIT
    assert "6 unreadable images were skipped" in caplog.text
    for name in ("empty.jpg", "truncated.jpg", "notes.jpg"):
        assert name in caplog.text
    assert "cmyk.jpg" not in caplog.text and "alpha.png" not in caplog.text
