"""SOLVER.AMP for detection: the device-generic AMP trainer (CPU autocast here), its precision and
GradScaler, the configs' defaults, and the one-sentence refusals."""
import glob
import json
import os

import numpy as np
import pytest
import torch

from pretrain.engine import DeviceAMPTrainer
from pretrain.io import UserError
from transfer.config import load_config, resolve_device_and_norm
from transfer.shapes import make_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs")
SHAPES = os.path.join(CONFIGS, "shapes_fpn_cpu.yaml")
# the shapes CPU config at its cheapest (tests/transfer/test_train_det.py's FAST), no evaluation,
# and a ResNet-18 trunk: without AVX512-BF16 a CPU runs bfloat16 convolutions on the slow
# (im2col) path, ~8x slower than float32 (R50: ~50 s a step on 2 cores)
FAST = [
    "SOLVER.IMS_PER_BATCH", "2", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "8",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32", "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "DATALOADER.NUM_WORKERS", "0", "SOLVER.WARMUP_ITERS", "2", "SEED", "1",
    "TEST.PRECISE_BN.ENABLED", "False", "DATASETS.TEST", "()", "MODEL.DEVICE", "cpu",
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
]  # fmt: skip


def test_paper_configs_default_to_bfloat16_amp_and_shapes_to_float32():
    paper = glob.glob(os.path.join(CONFIGS, "fpn_*.yaml"))
    assert len(paper) >= 5
    for path in [os.path.join(CONFIGS, "Base-RCNN-FPN-4conv1fc-SyncBN.yaml"), *paper]:
        cfg = load_config(path, [])
        assert (cfg.SOLVER.AMP.ENABLED, cfg.SOLVER.AMP.PRECISION) == (True, "bfloat16"), path
        assert cfg.MODEL.DEVICE == "cuda", path  # detectron2's default: the paper runs on GPUs
    assert not load_config(SHAPES, []).SOLVER.AMP.ENABLED
    # the paper's float32 is one documented override away
    assert not load_config(os.path.join(CONFIGS, "fpn_simo_1x.yaml"),
                           ["SOLVER.AMP.ENABLED", "False"]).SOLVER.AMP.ENABLED  # fmt: skip


def test_unknown_precision_is_a_sentence():
    with pytest.raises(UserError, match=r"SOLVER.AMP.PRECISION 'float8' is unknown; choose one of"):
        load_config(SHAPES, ["SOLVER.AMP.PRECISION", "float8"])


def test_auto_without_gpu_refuses_amp():
    if torch.cuda.is_available():
        pytest.skip("a GPU is usable here: MODEL.DEVICE auto runs AMP on it")
    cfg = load_config(SHAPES, ["MODEL.DEVICE", "auto", "SOLVER.AMP.ENABLED", "True"])
    with pytest.raises(UserError) as e:
        resolve_device_and_norm(cfg, world_size=1)
    message = str(e.value)
    assert message.startswith("SOLVER.AMP.ENABLED asks for mixed precision on a GPU, but ")
    assert "set SOLVER.AMP.ENABLED False" in message and "MODEL.DEVICE cpu" in message
    # asked for explicitly, the CPU runs AMP (its autocast)
    cpu = load_config(SHAPES, ["MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "True"])
    resolve_device_and_norm(cpu, world_size=1)
    assert cpu.MODEL.DEVICE == "cpu"


@pytest.mark.parametrize("precision, scaled", [("bfloat16", False), ("float16", True)])
def test_amp_trainer_precision_and_grad_scaler(precision, scaled):
    """float16 needs loss scaling (an enabled GradScaler, on the CPU too); bfloat16 does not."""
    from transfer.trainer import build_amp_trainer

    cfg = load_config(SHAPES, ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", precision])
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = build_amp_trainer(cfg, model, [], optimizer, gather_metric_period=3)
    assert isinstance(trainer, DeviceAMPTrainer) and trainer.device_type == "cpu"
    assert trainer.precision == getattr(torch, precision)
    assert trainer.grad_scaler.is_enabled() is scaled
    assert trainer.gather_metric_period == 3  # what DefaultTrainer passes goes through


def test_amp_trainer_swap_is_scoped_to_default_trainer_init():
    from detectron2.engine import DefaultTrainer
    from detectron2.engine import defaults

    from transfer.trainer import _device_amp_trainer

    # DefaultTrainer.__init__ reaches AMPTrainer by its module-level name, which is swapped
    assert "AMPTrainer" in DefaultTrainer.__init__.__code__.co_names
    original = defaults.AMPTrainer
    with pytest.raises(RuntimeError):
        with _device_amp_trainer(load_config(SHAPES, [])):
            assert defaults.AMPTrainer is not original
            raise RuntimeError
    assert defaults.AMPTrainer is original


def test_trains_in_bfloat16_on_the_cpu(tmp_path, monkeypatch):
    """Two steps of the shapes detector under CPU autocast (bfloat16): the device-generic trainer,
    bfloat16 features, finite losses, float32 weights, and checkpoints that hold the GradScaler's
    state (resume restores it)."""
    from transfer.datasets import register_datasets
    from transfer.trainer import Trainer

    datasets = tmp_path / "datasets"
    make_shapes(str(datasets / "shapes"), num_train=8, num_val=2, size=64, seed=0)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    out = str(tmp_path / "run")
    cfg = load_config(SHAPES, [*FAST, "SOLVER.AMP.ENABLED", "True",
                               "SOLVER.AMP.PRECISION", "bfloat16", "SOLVER.MAX_ITER", "2",
                               "SOLVER.CHECKPOINT_PERIOD", "1", "OUTPUT_DIR", out])  # fmt: skip
    resolve_device_and_norm(cfg, world_size=1)
    register_datasets(cfg)
    cfg.freeze()
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    assert isinstance(trainer._trainer, DeviceAMPTrainer)
    assert trainer._trainer.precision == torch.bfloat16 and trainer._trainer.device_type == "cpu"
    assert not trainer._trainer.grad_scaler.is_enabled()
    trainer.resume_or_load(resume=False)
    dtypes = set()
    trainer.model.backbone.register_forward_hook(
        lambda module, inputs, features: dtypes.update(f.dtype for f in features.values()))
    trainer.train()

    assert dtypes == {torch.bfloat16}  # the steps ran under autocast

    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast only
    with open(os.path.join(out, "metrics.json")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    losses = [m["total_loss"] for m in lines if "total_loss" in m]
    assert losses and np.isfinite(losses).all()
    for name in ("model_0000000.pth", "model_final.pth"):
        ckpt = torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)
        assert "grad_scaler" in ckpt["trainer"]["_trainer"], name
