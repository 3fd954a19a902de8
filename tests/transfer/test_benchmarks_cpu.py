"""The three transfer benchmarks at CPU size on the shapes data (configs/*_shapes_cpu.yaml):
VOC07+12 Faster R-CNN R50-C4, COCO Mask R-CNN R50-C4 and R50-FPN. Each runs tools/train_det.py
for a few iterations from converted SiMo-style weights, then its own evaluation (results.json)."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torchvision

from transfer.convert import convert
from transfer.shapes import CLASSES, make_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the CPU configs made cheaper still: 64 px images, 2 per batch, 4 RoIs and 4 detections per
# image (C4 runs res5 on each: ~0.8 GFLOP), no precise BN, 2 iterations
FAST = [
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.CHECKPOINT_PERIOD", "100", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "4",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "16", "MODEL.RPN.POST_NMS_TOPK_TEST", "4",
    "TEST.DETECTIONS_PER_IMAGE", "4", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64",
    "DATALOADER.NUM_WORKERS", "0", "TEST.PRECISE_BN.ENABLED", "False",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",  # so a barely trained model still predicts boxes
    "MODEL.DEVICE", "cpu",
]  # fmt: skip
R18 = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]  # the demo's backbone
# config, backbone, overrides, evaluator, test dataset, masks
BENCHMARKS = {
    # the demo's ResNet-18: Res5ROIHeadsExtraNorm builds res5 of basic blocks (transfer/heads.py)
    "voc_C4": ("voc_C4_shapes_cpu.yaml", "resnet18", R18, "pascal_voc_2007",
               "shapes_voc_2007_test", False),
    "coco_mask_C4": ("coco_mask_C4_shapes_cpu.yaml", "resnet50", [], "coco", "shapes_val", True),
    "coco_mask_FPN": ("coco_mask_FPN_shapes_cpu.yaml", "resnet18", R18, "coco", "shapes_val", True),
}  # fmt: skip
# this model's ResNet tensors: FPN's bottom-up ResNet; C4's stem..res4 backbone and res5 box head
# (not roi_heads.res5.norm, the extra norm that is new in every C4 fine-tune)
BACKBONE = re.compile(r"^(backbone\.(bottom_up\.)?(stem|res\d)|roi_heads\.res5\.\d)")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    make_shapes(str(root / "shapes"), num_train=8, num_val=4, size=64, seed=0)
    # every class among the test images: the VOC AP of a class without objects is NaN
    with open(root / "shapes" / "annotations" / "instances_val.json") as f:
        present = {a["category_id"] for a in json.load(f)["annotations"]}
    assert present == set(range(1, len(CLASSES) + 1))
    return str(root)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """{arch: converted .pkl} of SiMo-style pretraining checkpoints (docs/formats.md: a torchvision
    ResNet under encoder_q. with an MLP head, meta kind "pretrain") of random ResNets."""
    folder = tmp_path_factory.mktemp("weights")
    out = {}
    for arch in ("resnet50", "resnet18"):
        torch.manual_seed(0)
        state = getattr(torchvision.models, arch)().state_dict()
        model = {f"encoder_q.{k}": v for k, v in state.items() if not k.startswith("fc.")}
        model.update({"encoder_q.fc.0.weight": torch.randn(32, 16), "queue": torch.randn(8, 16)})
        meta = {"kind": "pretrain", "name": f"simo_{arch}", "method": "simo", "arch": arch,
                "loss": "eqco", "tau": 0.2, "alpha": 256.0, "num_negatives": 16, "epochs": 1.0,
                "iteration": 1, "ims_per_batch": 8}  # fmt: skip
        src = str(folder / f"simo_{arch}.pth")
        torch.save({"model": model, "iteration": 1, "meta": meta}, src)
        out[arch] = str(folder / f"simo_{arch}.pkl")
        convert(src, out[arch])
    return out


def _missing_keys(log: str) -> list[str]:
    """The model tensors detectron2's checkpointer logged as not found in MODEL.WEIGHTS (grouped as
    fvcore prints them: ``prefix.{a, b}``)."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", log).splitlines()
    missing = []
    for i, line in enumerate(lines):
        if "are not found in the checkpoint:" in line:
            for group in lines[i + 1 :]:
                if group.startswith("[") or not group.strip():
                    break
                missing.append(group.strip())
    return missing


@pytest.mark.slow
@pytest.mark.parametrize("benchmark", list(BENCHMARKS))
def test_benchmark_trains_and_evaluates(benchmark, datasets, weights, tmp_path):
    config, arch, arch_opts, evaluator, test_set, masks = BENCHMARKS[benchmark]
    out = str(tmp_path / benchmark)
    env = dict(os.environ, DETECTRON2_DATASETS=datasets, OMP_NUM_THREADS="2")
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "train_det.py"),
         "--config-file", os.path.join(ROOT, "configs", config), *FAST, *arch_opts,
         "MODEL.WEIGHTS", weights[arch], "OUTPUT_DIR", out],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("config.yaml", "log.txt", "metrics.json", "model_final.pth", "results.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    if evaluator == "coco":  # COCOEvaluator's detections (boxes, and masks as RLE)
        with open(os.path.join(out, "inference", "coco_instances_results.json")) as f:
            detections = json.load(f)
        assert detections and all(("segmentation" in d) == masks for d in detections)

    # the backbone (C4: and res5 in the box head) came from the converted weights: detectron2
    # reports only the new layers as missing, and no tensor of another shape
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    missing = _missing_keys(log)
    assert missing and not [m for m in missing if BACKBONE.match(m)], missing
    assert "Skip loading parameter" not in log

    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert results["kind"] == "detection" and results["iteration"] == 2
    assert results["name"] == f"simo_{arch}" and results["pretrain"]["method"] == "simo"
    assert (results["evaluator"], results["test_dataset"]) == (evaluator, test_set)
    tasks = ("bbox", "segm") if masks else ("bbox",)
    assert [t for t in ("bbox", "segm") if t in results] == list(tasks)
    for task in tasks:
        keys = {"AP", "AP50", "AP75"}
        assert set(results[task]) == (keys if evaluator != "coco" else keys | {"APs", "APm", "APl"})
        for key in sorted(keys):
            value = results[task][key]
            assert isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 100.0


@pytest.mark.slow
def test_benchmark_suite_skips_finished_runs_and_reports_mean_sd(datasets, weights, tmp_path):
    """tools/benchmark.py runs VOC for two seeds into one folder (results.json names the benchmark
    and the seed); the same command again skips both; tools/report.py's benchmark table shows
    their mean +- sd next to the linear-eval top-1, and the main table leaves them out."""
    out = str(tmp_path / "suite")
    env = dict(os.environ, DETECTRON2_DATASETS=datasets, OMP_NUM_THREADS="2")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--weights",
           weights["resnet18"], "--suite", "voc", "--size", "shapes", "--seeds", "0", "1",
           "--out", out, *FAST, *R18]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "2 runs in " in r.stdout and "2 ran, 0 finished before, 0 failed" in r.stdout
    aps = []
    for seed in (0, 1):
        with open(os.path.join(out, "voc", f"seed{seed}", "results.json")) as f:
            res = json.load(f)
        assert (res["benchmark"], res["seed"], res["name"]) == ("voc", seed, "simo_resnet18")
        aps.append([res["bbox"][k] for k in ("AP50", "AP", "AP75")])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "0 ran, 2 finished before" in r.stdout, r.stdout[-2000:]
    assert r.stdout.count("finished before, skipped") == 2

    # a linear eval of the same pre-training: the table puts its top-1 beside the benchmark
    lin = tmp_path / "lincls"
    lin.mkdir()
    (lin / "results.json").write_text(json.dumps(
        {"kind": "lincls", "name": "simo_resnet18", "top1": 61.25, "knn_top1": 55.5}))
    from transfer.report import make_report

    report = make_report([out, str(lin)], str(tmp_path / "report"), paper=True)
    lines = report.benchmarks_markdown.splitlines()
    assert lines[0] == "| pre-training | top-1 | kNN | VOC AP50 | VOC AP | VOC AP75 |"
    import statistics

    cells = [f"{statistics.fmean(v):.1f} ± {statistics.stdev(v):.1f}" for v in zip(*aps)]
    assert lines[2] == "| simo_resnet18 | 61.2 | 55.5 | " + " | ".join(cells) + " |"
    assert lines[3] == "| supervised IN [paper] | - | - | 81.3 | 53.5 | 58.8 |"
    seeds_line = "VOC = VOC07+12 R50-C4 (detection SEEDs: simo_resnet18: 0 1)"
    assert seeds_line in report.benchmarks_markdown
    # the main table's AP column is the paper's detector only: no VOC number in it
    assert [r.get("AP") for r in report.rows if r["name"] == "simo_resnet18"] == [None]
    assert os.path.isfile(os.path.join(str(tmp_path / "report"), "benchmarks.png"))
