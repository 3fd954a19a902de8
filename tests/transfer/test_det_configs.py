"""Every detection YAML merges, and the paper's transfer setting is really what fpn_simo_1x.yaml
says."""
import glob
import os

import pytest
import torch

from transfer.config import load_config, resolve_device_and_norm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DET_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_there_are_detection_configs():
    names = {os.path.basename(p) for p in DET_CONFIGS}
    assert {"fpn_simo_1x.yaml", "fpn_random_init_1x.yaml", "fpn_supervised_1x.yaml"} <= names
    assert "shapes_fpn_cpu.yaml" in names


@pytest.mark.parametrize("path", DET_CONFIGS, ids=os.path.basename)
def test_config_merges_with_paper_architecture(path):
    cfg = load_config(path, [])
    m = cfg.MODEL
    assert m.META_ARCHITECTURE == "GeneralizedRCNN"
    assert m.BACKBONE.NAME == "build_resnet_fpn_backbone"
    assert m.RESNETS.DEPTH == 50
    assert (m.ROI_BOX_HEAD.NAME, m.ROI_BOX_HEAD.NUM_CONV, m.ROI_BOX_HEAD.NUM_FC) == (
        "FastRCNNConvFCHead", 4, 1)  # fmt: skip
    assert m.RESNETS.NORM == m.FPN.NORM == m.ROI_BOX_HEAD.NORM == "SyncBN"
    assert m.BACKBONE.FREEZE_AT == 0 and m.RESNETS.STRIDE_IN_1X1 is False
    assert cfg.INPUT.FORMAT == "RGB"
    assert list(m.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert list(m.PIXEL_STD) == [58.395, 57.12, 57.375]
    assert cfg.TEST.PRECISE_BN.ENABLED


def test_fpn_simo_1x_is_the_paper_schedule():
    cfg = load_config(os.path.join(ROOT, "configs", "fpn_simo_1x.yaml"), [])
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.DATASETS.TEST == ("coco_2017_val",)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 80
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (640, 672, 704, 736, 768, 800)
    assert cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice" and cfg.INPUT.MIN_SIZE_TEST == 800
    s = cfg.SOLVER
    assert (s.IMS_PER_BATCH, s.BASE_LR, s.MAX_ITER, tuple(s.STEPS)) == (
        16, 0.02, 90000, (60000, 80000))  # fmt: skip
    assert s.WARMUP_ITERS > 0
    # 1x = ~12 epochs of COCO train2017 (118,287 images)
    assert 12 <= s.MAX_ITER * s.IMS_PER_BATCH / 118287 < 12.5
    assert cfg.MODEL.WEIGHTS.endswith(".pkl")


def test_overrides_and_bad_keys():
    path = os.path.join(ROOT, "configs", "shapes_fpn_cpu.yaml")
    assert load_config(path, ["SOLVER.MAX_ITER", "7"]).SOLVER.MAX_ITER == 7
    from pretrain.io import UserError

    with pytest.raises(UserError, match="unknown config key SOLVER.MAX_ITERS"):
        load_config(path, ["SOLVER.MAX_ITERS", "7"])
    with pytest.raises(UserError, match="KEY VALUE pairs"):
        load_config(path, ["SOLVER.MAX_ITER"])
    with pytest.raises(UserError, match="config file not found"):
        load_config(os.path.join(ROOT, "configs", "nope.yaml"), [])


def test_device_and_syncbn_resolution():
    from pretrain.io import UserError

    path = os.path.join(ROOT, "configs", "fpn_simo_1x.yaml")
    one = load_config(path, [])
    resolve_device_and_norm(one, world_size=1)
    assert one.MODEL.RESNETS.NORM == "SyncBN"  # nn.SyncBatchNorm is plain BN on one process
    if not torch.cuda.is_available():
        assert one.MODEL.DEVICE == "cpu"
    two = load_config(path, ["MODEL.DEVICE", "cpu"])
    with pytest.raises(UserError, match="needs GPUs"):
        resolve_device_and_norm(two, world_size=2)
