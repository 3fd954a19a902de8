"""MoCo's transfer benchmarks (VOC07+12 R50-C4, COCO Mask R-CNN R50-C4 and R50-FPN 1x/2x) are,
key by key, what their source configs say, and Res5ROIHeadsExtraNorm builds, trains and infers."""

import os

import pytest
import torch
from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from transfer.config import get_transfer_cfg, load_config, resolve_device_and_norm
from transfer.heads import Res5ROIHeadsExtraNorm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs")

# ------------------------------------------------------------------------------ the sources
# facebookresearch/moco, commit 7397dfe146c7ca6bbb58e9c382498069178ba764, detection/configs/
# open-mmlab/mmselfsup, commit db861f30487c9a0b0cb3e35e176d6058887660bc,
#   configs/benchmarks/detectron2/
# (docs/methods.md, "Transfer protocols")

# MoCo *_moco.yaml (pascal_voc_R_50_C4_24k_moco.yaml, coco_R_50_C4_2x_moco.yaml) and MMSelfSup
# coco_R_50_FPN_1x_moco.yaml: the torchvision input convention
TORCHVISION_INPUT = [
    ("MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53]),
    ("MODEL.PIXEL_STD", [58.395, 57.12, 57.375]),
    ("MODEL.RESNETS.STRIDE_IN_1X1", False),
    ("INPUT.FORMAT", "RGB"),
]
# MoCo Base-RCNN-C4-BN.yaml; its RESNETS.NORM is "naiveSyncBN", MMSelfSup's copy of the file has
# "SyncBN", which we follow (the PyTorch bug behind MoCo's choice is fixed; Base-RCNN-C4-BN.yaml)
MOCO_C4 = [
    ("MODEL.META_ARCHITECTURE", "GeneralizedRCNN"),
    ("MODEL.RPN.PRE_NMS_TOPK_TEST", 6000),
    ("MODEL.RPN.POST_NMS_TOPK_TEST", 1000),
    ("MODEL.ROI_HEADS.NAME", "Res5ROIHeadsExtraNorm"),
    ("MODEL.BACKBONE.FREEZE_AT", 0),
    ("MODEL.RESNETS.NORM", "SyncBN"),
    ("TEST.PRECISE_BN.ENABLED", True),
    ("SOLVER.IMS_PER_BATCH", 16),
    ("SOLVER.BASE_LR", 0.02),
]
# MoCo pascal_voc_R_50_C4_24k.yaml
MOCO_VOC = [
    ("MODEL.MASK_ON", False),
    ("MODEL.ROI_HEADS.NUM_CLASSES", 20),
    ("INPUT.MIN_SIZE_TRAIN", [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]),
    ("INPUT.MIN_SIZE_TEST", 800),
    ("DATASETS.TRAIN", ["voc_2007_trainval", "voc_2012_trainval"]),
    ("DATASETS.TEST", ["voc_2007_test"]),
    ("SOLVER.STEPS", [18000, 22000]),
    ("SOLVER.MAX_ITER", 24000),
    ("SOLVER.WARMUP_ITERS", 100),
]
# MoCo coco_R_50_C4_2x.yaml
MOCO_COCO_C4_2X = [
    ("MODEL.MASK_ON", True),
    ("INPUT.MIN_SIZE_TRAIN", [640, 672, 704, 736, 768, 800]),
    ("INPUT.MIN_SIZE_TEST", 800),
    ("DATASETS.TRAIN", ["coco_2017_train"]),
    ("DATASETS.TEST", ["coco_2017_val"]),
    ("SOLVER.STEPS", [120000, 160000]),
    ("SOLVER.MAX_ITER", 180000),
]
# MMSelfSup coco_R_50_C4_1x.yaml (and _moco): the 2x file with detectron2's 1x steps
MMSELFSUP_C4_1X = [("SOLVER.STEPS", [60000, 80000]), ("SOLVER.MAX_ITER", 90000)]
# MMSelfSup Base-RCNN-FPN.yaml (detectron2's) + coco_R_50_FPN_1x.yaml; moco#34: "SyncBN only on
# backbone and FPN", standard heads
MMSELFSUP_FPN_1X = [
    ("MODEL.META_ARCHITECTURE", "GeneralizedRCNN"),
    ("MODEL.MASK_ON", True),
    ("MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone"),
    ("MODEL.BACKBONE.FREEZE_AT", 0),
    ("MODEL.RESNETS.DEPTH", 50),
    ("MODEL.RESNETS.NORM", "SyncBN"),
    ("MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"]),
    ("MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"]),
    ("MODEL.FPN.NORM", "SyncBN"),
    ("MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64], [128], [256], [512]]),
    ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[0.5, 1.0, 2.0]]),
    ("MODEL.RPN.IN_FEATURES", ["p2", "p3", "p4", "p5", "p6"]),
    ("MODEL.RPN.PRE_NMS_TOPK_TRAIN", 2000),
    ("MODEL.RPN.PRE_NMS_TOPK_TEST", 1000),
    ("MODEL.RPN.POST_NMS_TOPK_TRAIN", 1000),
    ("MODEL.RPN.POST_NMS_TOPK_TEST", 1000),
    ("MODEL.ROI_HEADS.NAME", "StandardROIHeads"),
    ("MODEL.ROI_HEADS.IN_FEATURES", ["p2", "p3", "p4", "p5"]),
    ("MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead"),
    ("MODEL.ROI_BOX_HEAD.NUM_FC", 2),
    ("MODEL.ROI_BOX_HEAD.NUM_CONV", 0),
    ("MODEL.ROI_BOX_HEAD.NORM", ""),
    ("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7),
    ("MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead"),
    ("MODEL.ROI_MASK_HEAD.NUM_CONV", 4),
    ("MODEL.ROI_MASK_HEAD.NORM", ""),
    ("MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", 14),
    ("DATASETS.TRAIN", ["coco_2017_train"]),
    ("DATASETS.TEST", ["coco_2017_val"]),
    ("INPUT.MIN_SIZE_TRAIN", [640, 672, 704, 736, 768, 800]),
    ("TEST.PRECISE_BN.ENABLED", True),
    ("SOLVER.IMS_PER_BATCH", 16),
    ("SOLVER.BASE_LR", 0.02),
    ("SOLVER.STEPS", [60000, 80000]),
    ("SOLVER.MAX_ITER", 90000),
]
# MMSelfSup coco_R_50_FPN_2x.yaml
MMSELFSUP_FPN_2X = [("SOLVER.STEPS", [120000, 160000]), ("SOLVER.MAX_ITER", 180000)]
# ours, for every benchmark (configs/Base-RCNN-FPN-4conv1fc-SyncBN.yaml's conventions): written
# for 8 GPUs with detectron2's auto-scaling, bfloat16 AMP on GPUs (SOLVER.AMP.ENABLED False is the
# published float32), detectron2's SEED -1
OURS = [
    ("SOLVER.REFERENCE_WORLD_SIZE", 8),
    ("SOLVER.AMP.ENABLED", True),
    ("SOLVER.AMP.PRECISION", "bfloat16"),
    ("SEED", -1),
]


def _override(*tables):
    """Later tables win, as a _BASE_ chain does."""
    merged = {}
    for table in tables:
        merged.update(dict(table))
    return merged


# (Base, leaf prefix, expected keys) per benchmark
BENCHMARKS = {
    "voc_R_50_C4_24k": (
        "Base-VOC-R50-C4-BN.yaml", _override(MOCO_C4, MOCO_VOC, TORCHVISION_INPUT, OURS)),
    "coco_mask_R_50_C4_1x": (
        "Base-COCO-Mask-R50-C4-BN.yaml",
        _override(MOCO_C4, MOCO_COCO_C4_2X, MMSELFSUP_C4_1X, TORCHVISION_INPUT, OURS),
    ),
    "coco_mask_R_50_C4_2x": (
        "Base-COCO-Mask-R50-C4-BN-2x.yaml",
        _override(MOCO_C4, MOCO_COCO_C4_2X, TORCHVISION_INPUT, OURS),
    ),
    "coco_mask_R_50_FPN_1x": (
        "Base-COCO-Mask-R50-FPN-SyncBN.yaml", _override(MMSELFSUP_FPN_1X, TORCHVISION_INPUT, OURS)),
    "coco_mask_R_50_FPN_2x": (
        "Base-COCO-Mask-R50-FPN-SyncBN-2x.yaml",
        _override(MMSELFSUP_FPN_1X, MMSELFSUP_FPN_2X, TORCHVISION_INPUT, OURS),
    ),
}  # fmt: skip
PRETRAININGS = ["simo", "mocov2", "supervised", "random_init"]
LEAVES = [(bench, p) for bench in BENCHMARKS for p in PRETRAININGS]
# the weights each leaf points at: the same files as the fpn_*_1x.yaml leaves
WEIGHTS = {
    "simo": "output/simo_r50_200ep.pkl",
    "mocov2": "output/mocov2_r50_200ep.pkl",
    "supervised": "detectron2://ImageNetPretrained/MSRA/R-50.pkl",
    "random_init": "",
}
# the MSRA (Caffe2) R-50's input convention: detectron2's defaults, MoCo's configs without _moco
MSRA_INPUT = {
    "MODEL.PIXEL_MEAN": [103.53, 116.28, 123.675],
    "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
    "MODEL.RESNETS.STRIDE_IN_1X1": True,
    "INPUT.FORMAT": "BGR",
}


def _plain(value):
    """Tuples as lists (YAML tuples arrive as tuples, lists as lists), recursively."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flat(node: CfgNode, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, CfgNode):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = _plain(value)
    return out


def _load(name: str) -> dict:
    return _flat(load_config(os.path.join(CONFIGS, name), []))


def test_the_benchmark_configs_exist():
    names = set(os.listdir(CONFIGS))
    assert {"Base-RCNN-C4-BN.yaml"} | {base for base, _ in BENCHMARKS.values()} <= names
    assert {f"{b}_{p}.yaml" for b, p in LEAVES} <= names
    assert len(LEAVES) == 20


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_base_is_its_sources_key_by_key(bench):
    """Every key of the source table has its value, and every key that differs from detectron2's
    defaults is in the table: the keys the sources leave to detectron2's defaults, written out in
    our Bases, still equal the defaults of the detectron2 installed."""
    base, expected = BENCHMARKS[bench]
    cfg = _load(base)
    for key, value in expected.items():
        assert cfg[key] == value, key
    defaults = _flat(get_transfer_cfg())
    ours = {"MODEL.WEIGHTS", "OUTPUT_DIR", "BENCHMARK"}
    differ = {k for k, v in cfg.items() if defaults.get(k) != v} - ours
    assert differ <= set(expected), sorted(differ - set(expected))
    assert cfg["OUTPUT_DIR"] == f"output/det/{bench}"
    # the report's benchmark table groups runs by it (transfer/benchmark.py)
    from transfer.benchmark import BENCHMARKS as SUITE

    assert SUITE[cfg["BENCHMARK"]].leaf.format("simo").startswith(bench)


def test_schedules_in_epochs():
    voc_trainval_07_12, coco_train2017 = 5011 + 11540, 118287
    for bench, (base, _), epochs, dataset in [
        ("voc_R_50_C4_24k", BENCHMARKS["voc_R_50_C4_24k"], 23.2, voc_trainval_07_12),
        ("coco_mask_R_50_C4_1x", BENCHMARKS["coco_mask_R_50_C4_1x"], 12.2, coco_train2017),
        ("coco_mask_R_50_C4_2x", BENCHMARKS["coco_mask_R_50_C4_2x"], 24.3, coco_train2017),
        ("coco_mask_R_50_FPN_1x", BENCHMARKS["coco_mask_R_50_FPN_1x"], 12.2, coco_train2017),
        ("coco_mask_R_50_FPN_2x", BENCHMARKS["coco_mask_R_50_FPN_2x"], 24.3, coco_train2017),
    ]:
        cfg = _load(base)
        seen = cfg["SOLVER.MAX_ITER"] * cfg["SOLVER.IMS_PER_BATCH"] / dataset
        assert seen == pytest.approx(epochs, abs=0.05), bench


@pytest.mark.parametrize("bench,pretraining", LEAVES, ids=lambda x: x)
def test_leaf_differs_from_its_base_only_in_weights(bench, pretraining):
    base, _ = BENCHMARKS[bench]
    leaf, ref = _load(f"{bench}_{pretraining}.yaml"), _load(base)
    assert leaf["MODEL.WEIGHTS"] == WEIGHTS[pretraining]
    assert leaf["OUTPUT_DIR"] == f"output/det/{bench}_{pretraining}"
    differ = {k for k in leaf if leaf[k] != ref[k]}
    expected = {"MODEL.WEIGHTS", "OUTPUT_DIR"}
    if pretraining == "supervised":  # the caffe convention of the MSRA weights
        expected |= set(MSRA_INPUT)
        assert {k: leaf[k] for k in MSRA_INPUT} == MSRA_INPUT
    if pretraining == "random_init":
        expected -= {"MODEL.WEIGHTS"}  # the Bases have no weights either
    assert differ == expected


@pytest.mark.parametrize("bench", BENCHMARKS)
@pytest.mark.parametrize("gpus", [16, 32, 64])
def test_benchmarks_scale_to_more_gpus(bench, gpus):
    """Written for 8 GPUs; detectron2's auto-scaling keeps 2 images per GPU and the same number
    of epochs and lr per image, with the decays at the same images seen."""
    cfg = load_config(os.path.join(CONFIGS, BENCHMARKS[bench][0]), [])
    s, k = cfg.SOLVER, gpus // 8
    t = DefaultTrainer.auto_scale_workers(cfg, gpus).SOLVER
    assert t.IMS_PER_BATCH == 2 * gpus and t.BASE_LR == pytest.approx(s.BASE_LR * k)
    assert t.MAX_ITER * k == s.MAX_ITER and [x * k for x in t.STEPS] == list(s.STEPS)
    assert t.CHECKPOINT_PERIOD * k == s.CHECKPOINT_PERIOD == 5000


# ------------------------------------------------------------------------------ the C4 head

# a ResNet-50 a few channels wide at 64-96 px, few proposals and RoIs: the C4 model in ~1 s
TINY_C4 = [
    "MODEL.DEVICE", "cpu",
    "SOLVER.AMP.ENABLED", "False",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "100",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "16",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",  # an untrained model still detects something
]  # fmt: skip


def _batch(mask: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    batch = []
    for h, w in [(64, 96), (80, 64)]:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 60.0, 60.0]]))
        inst.gt_classes = torch.tensor([1, 3])
        if mask:
            masks = torch.zeros(2, h, w, dtype=torch.bool)
            masks[0, 6:50, 4:40] = masks[1, 10:60, 20:60] = True
            inst.gt_masks = BitMasks(masks)
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "height": h, "width": w, "instances": inst})
    return batch


@pytest.mark.parametrize("leaf", ["voc_R_50_C4_24k_simo", "coco_mask_R_50_C4_1x_simo"])
def test_res5_roi_heads_extra_norm_trains_and_infers(leaf):
    cfg = load_config(os.path.join(CONFIGS, f"{leaf}.yaml"), TINY_C4)
    resolve_device_and_norm(cfg, world_size=1)  # as train_det: SyncBN on one process
    torch.manual_seed(0)
    model = build_model(cfg)
    heads = model.roi_heads
    assert type(heads) is Res5ROIHeadsExtraNorm
    # res5 = 3 bottleneck blocks, then the norm (RESNETS.NORM) on res5's 8 x 32 = 256 channels
    names = [name for name, _ in heads.res5.named_children()]
    assert names == ["0", "1", "2", "norm"]
    assert type(heads.res5.norm) is torch.nn.SyncBatchNorm and heads.res5.norm.num_features == 256
    state = model.state_dict()
    assert {k for k in state if ".norm." in k and k.startswith("roi_heads.res5.norm")} == {
        f"roi_heads.res5.norm.{t}"
        for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
    assert not any(k.startswith("backbone.res5") for k in state)  # C4: res5 only in the head
    seen = []
    heads.res5.norm.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))

    model.train()
    with EventStorage():
        losses = model(_batch(mask=cfg.MODEL.MASK_ON))
    expected = {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    assert set(losses) == expected | ({"loss_mask"} if cfg.MODEL.MASK_ON else set())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    norm = heads.res5.norm
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    assert int(norm.num_batches_tracked) == 1  # ran once, in training mode
    # 2 images x 16 RoIs, 14x14 pooled res4 -> 7x7 after res5's stride 2
    assert seen[0] == (32, 256, 7, 7)

    model.eval()
    with torch.no_grad():
        out = model(_batch(mask=False))
    assert len(out) == 2 and all("instances" in o for o in out)
    assert out[0]["instances"].image_size == (64, 96) and len(out[0]["instances"]) > 0
    assert cfg.MODEL.MASK_ON == out[0]["instances"].has("pred_masks")
    assert int(norm.num_batches_tracked) == 1  # inference used the running statistics
    assert seen[1][1:] == (256, 7, 7)
