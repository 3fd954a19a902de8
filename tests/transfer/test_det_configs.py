"""Every detection YAML merges, and the paper's transfer setting is really what fpn_simo_1x.yaml
says."""
import glob
import os

import pytest
import torch
from detectron2.config import get_cfg

from pretrain.io import UserError
from transfer.config import load_config, resolve_device_and_norm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DET_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
FPN_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "fpn_*.yaml")))
# the EqCo paper's detector; MoCo's benchmarks (voc_*, coco_mask_*, their Bases) are checked in
# test_benchmark_configs.py
PAPER_CONFIGS = [
    p for p in DET_CONFIGS
    if os.path.basename(p) in ("Base-RCNN-FPN-4conv1fc-SyncBN.yaml", "shapes_fpn_cpu.yaml")
    or os.path.basename(p).startswith("fpn_")
]
MSRA_R50 = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
# (INPUT.FORMAT, PIXEL_MEAN, PIXEL_STD, RESNETS.STRIDE_IN_1X1) that the weights were trained with
TORCHVISION = ("RGB", [123.675, 116.28, 103.53], [58.395, 57.12, 57.375], False)
MSRA = ("BGR", [103.53, 116.28, 123.675], [1.0, 1.0, 1.0], True)


def input_convention(cfg):
    m = cfg.MODEL
    return (cfg.INPUT.FORMAT, list(m.PIXEL_MEAN), list(m.PIXEL_STD), m.RESNETS.STRIDE_IN_1X1)


def test_there_are_detection_configs():
    names = {os.path.basename(p) for p in DET_CONFIGS}
    assert {"fpn_simo_1x.yaml", "fpn_random_init_1x.yaml", "fpn_supervised_1x.yaml",
            "fpn_supervised_tv_1x.yaml"} <= names  # fmt: skip
    assert "shapes_fpn_cpu.yaml" in names


@pytest.mark.parametrize("path", DET_CONFIGS, ids=os.path.basename)
def test_every_config_merges(path):
    cfg = load_config(path, [])
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and cfg.MODEL.BACKBONE.FREEZE_AT == 0


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=os.path.basename)
def test_config_merges_with_paper_architecture(path):
    cfg = load_config(path, [])
    m = cfg.MODEL
    assert m.META_ARCHITECTURE == "GeneralizedRCNN"
    assert m.BACKBONE.NAME == "build_resnet_fpn_backbone"
    assert m.RESNETS.DEPTH == 50
    assert (m.ROI_BOX_HEAD.NAME, m.ROI_BOX_HEAD.NUM_CONV, m.ROI_BOX_HEAD.NUM_FC) == (
        "FastRCNNConvFCHead", 4, 1)  # fmt: skip
    assert m.RESNETS.NORM == m.FPN.NORM == m.ROI_BOX_HEAD.NORM == "SyncBN"
    assert m.BACKBONE.FREEZE_AT == 0
    # torchvision conventions everywhere except for the MSRA (Caffe2) weights of detectron2's zoo
    assert input_convention(cfg) == (MSRA if "/MSRA/" in m.WEIGHTS else TORCHVISION)
    assert cfg.TEST.PRECISE_BN.ENABLED


def test_msra_convention_is_detectron2s():
    # detectron2's defaults are the MSRA R-50's input convention (its model zoo configs only set
    # MODEL.WEIGHTS); our base config overrides them with torchvision's
    assert input_convention(get_cfg()) == MSRA


@pytest.mark.parametrize("path", FPN_CONFIGS, ids=os.path.basename)
def test_fpn_configs_only_differ_in_weights(path):
    """Each fpn_*.yaml is the paper setting with its own weights and OUTPUT_DIR; the MSRA row also
    sets the input convention of its weights."""
    name = os.path.splitext(os.path.basename(path))[0]
    cfg = load_config(path, [])
    assert cfg.OUTPUT_DIR == f"output/det/{name}"
    base = load_config(os.path.join(ROOT, "configs", "Base-RCNN-FPN-4conv1fc-SyncBN.yaml"), [])
    keys = ["MODEL.WEIGHTS", "OUTPUT_DIR"]
    if input_convention(cfg) == MSRA:
        keys += ["INPUT.FORMAT", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD"]
        keys += ["MODEL.RESNETS.STRIDE_IN_1X1"]
    for c in (cfg, base):
        for key in keys:
            *parents, leaf = key.split(".")
            node = c
            for part in parents:
                node = node[part]
            node[leaf] = None
    assert cfg == base


def test_supervised_rows():
    cfg = load_config(os.path.join(ROOT, "configs", "fpn_supervised_1x.yaml"), [])
    assert cfg.MODEL.WEIGHTS == MSRA_R50 and input_convention(cfg) == MSRA
    tv = load_config(os.path.join(ROOT, "configs", "fpn_supervised_tv_1x.yaml"), [])
    assert tv.MODEL.WEIGHTS == "output/supervised_r50.pkl" and input_convention(tv) == TORCHVISION


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

    with pytest.raises(UserError, match="unknown config key SOLVER.MAX_ITERS"):
        load_config(path, ["SOLVER.MAX_ITERS", "7"])
    with pytest.raises(UserError, match="KEY VALUE pairs"):
        load_config(path, ["SOLVER.MAX_ITER"])
    with pytest.raises(UserError, match="config file not found"):
        load_config(os.path.join(ROOT, "configs", "nope.yaml"), [])


def test_device_and_syncbn_resolution():
    path = os.path.join(ROOT, "configs", "fpn_simo_1x.yaml")
    one = load_config(path, ["MODEL.DEVICE", "auto", "SOLVER.AMP.ENABLED", "False"])
    resolve_device_and_norm(one, world_size=1)
    assert one.MODEL.RESNETS.NORM == "SyncBN"  # nn.SyncBatchNorm is plain BN on one process
    assert one.MODEL.DEVICE == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        # the paper's config says cuda: without a GPU that is a sentence, not a silent CPU run
        with pytest.raises(UserError, match="MODEL.DEVICE cuda needs a usable CUDA GPU"):
            resolve_device_and_norm(load_config(path, []), world_size=1)
        # AMP (the paper configs' GPU default): the CPU's autocast when MODEL.DEVICE cpu asks for
        # the CPU, a sentence when auto looked for a GPU and found none
        amp = load_config(path, ["MODEL.DEVICE", "cpu"])
        resolve_device_and_norm(amp, world_size=1)
        assert amp.MODEL.DEVICE == "cpu" and amp.SOLVER.AMP.ENABLED
        with pytest.raises(UserError, match="SOLVER.AMP.ENABLED asks for mixed precision on a GPU"):
            resolve_device_and_norm(load_config(path, ["MODEL.DEVICE", "auto"]), world_size=1)
    # several CPU processes: nn.SyncBatchNorm refuses CPU tensors, detectron2's
    # NaiveSyncBatchNorm all-reduces the statistics with gloo
    two = load_config(path, ["MODEL.DEVICE", "cpu", "MODEL.ROI_MASK_HEAD.NORM", "SyncBN"])
    resolve_device_and_norm(two, world_size=2)
    m = two.MODEL
    assert m.RESNETS.NORM == m.FPN.NORM == m.ROI_BOX_HEAD.NORM == "naiveSyncBN"
    assert m.ROI_MASK_HEAD.NORM == "naiveSyncBN"
    assert m.SEM_SEG_HEAD.NORM == "GN" and m.RETINANET.NORM == ""  # only SyncBN changes


@pytest.mark.parametrize("path", FPN_CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize("gpus", [16, 32, 64])
def test_1x_configs_scale_to_more_gpus(path, gpus):
    """The 1x configs are written for 8 GPUs (SOLVER.REFERENCE_WORLD_SIZE); detectron2's own
    auto-scaling (DefaultTrainer.__init__ calls it) keeps 2 images per GPU on 16, 32 and 64 GPUs
    and scales the rest linearly, so the schedule stays 12 epochs at the same lr per image."""
    from detectron2.engine import DefaultTrainer

    cfg = load_config(path, [])
    s = cfg.SOLVER
    assert s.REFERENCE_WORLD_SIZE == 8 and s.IMS_PER_BATCH == 16
    k = gpus // 8
    scaled = DefaultTrainer.auto_scale_workers(cfg, gpus)
    t = scaled.SOLVER
    assert t.IMS_PER_BATCH == 16 * k and t.IMS_PER_BATCH // gpus == 2
    assert t.IMS_PER_BATCH % gpus == 0  # what detectron2's batch data loader asserts
    assert t.BASE_LR == pytest.approx(s.BASE_LR * k)
    assert (t.MAX_ITER, t.WARMUP_ITERS) == (s.MAX_ITER // k, s.WARMUP_ITERS // k)
    assert tuple(t.STEPS) == tuple(step // k for step in s.STEPS)
    assert t.CHECKPOINT_PERIOD == s.CHECKPOINT_PERIOD // k
    assert scaled.TEST.EVAL_PERIOD == cfg.TEST.EVAL_PERIOD // k
    # all exact: the same images seen, the same lr per image, the same epochs of the decays
    assert t.MAX_ITER * t.IMS_PER_BATCH == s.MAX_ITER * s.IMS_PER_BATCH
    for step, ref in zip(t.STEPS, s.STEPS):
        assert step * k == ref
    assert t.BASE_LR / t.IMS_PER_BATCH == pytest.approx(s.BASE_LR / s.IMS_PER_BATCH)
    assert t.REFERENCE_WORLD_SIZE == gpus
    assert DefaultTrainer.auto_scale_workers(cfg, 8) is cfg  # the reference count: unchanged


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_shapes_config_is_not_auto_scaled(processes):
    from detectron2.engine import DefaultTrainer

    cfg = load_config(os.path.join(ROOT, "configs", "shapes_fpn_cpu.yaml"), [])
    assert cfg.SOLVER.REFERENCE_WORLD_SIZE == 0
    assert DefaultTrainer.auto_scale_workers(cfg, processes) is cfg
