"""The few config keys the transfer stage adds to detectron2's, and train_det's config set-up."""
from __future__ import annotations

import logging

import torch
from detectron2.config import CfgNode, get_cfg

import transfer.heads  # noqa: F401  (registers Res5ROIHeadsExtraNorm wherever configs are built)
from pretrain.config import AMP_PRECISIONS, merge_config
from pretrain.engine.launch import amp_dtype, no_cuda_reason, resolve_device
from pretrain.io import UserError

logger = logging.getLogger(__name__)


def add_transfer_config(cfg: CfgNode) -> None:
    """Add our keys (with their defaults) to a detectron2 config."""
    # Extra COCO-format datasets to register, each [name, json_file, image_root]; relative paths
    # are resolved against $DETECTRON2_DATASETS (default "datasets"), like detectron2's builtins.
    # "shapes_train" / "shapes_val" (tools/make_shapes.py) are always registered.
    cfg.DATASETS.REGISTER = []
    # Evaluate with detectron2's C++ COCO evaluation when its compiled ops load, else with pure
    # pycocotools. The numbers are the same; only the speed differs.
    cfg.TEST.COCO_FAST_EVAL = True
    # The autocast dtype of SOLVER.AMP.ENABLED (detectron2 has the switch only and always uses
    # float16): bfloat16 (float32's range, no loss scaling) or float16 (with a GradScaler).
    # Training only; evaluation stays float32 (transfer.trainer.Trainer).
    cfg.SOLVER.AMP.PRECISION = "bfloat16"
    # TensorFloat-32 for float32 matmuls and convolutions on Ampere and newer GPUs, as for
    # pretraining (pretrain/config.py); False = full float32
    cfg.TF32 = True
    # Which transfer benchmark this config is (transfer/benchmark.py: voc, coco_c4_1x, ...,
    # coco_fpn_4conv1fc_1x), written to results.json as "benchmark": tools/report.py's benchmark
    # table groups runs by it. Set by the benchmark Bases; "" = none (a plain fine-tune).
    cfg.BENCHMARK = ""


def get_transfer_cfg() -> CfgNode:
    """detectron2's defaults plus :func:`add_transfer_config`."""
    cfg = get_cfg()
    add_transfer_config(cfg)
    return cfg


def load_config(config_file: str, opts: list[str]) -> CfgNode:
    """Defaults <- ``config_file`` (with its ``_BASE_`` chain) <- ``KEY VALUE`` overrides.

    Unknown keys, type mismatches, missing files and an unknown ``SOLVER.AMP.PRECISION`` become
    one-sentence :class:`UserError`s.
    """
    cfg = merge_config(
        get_transfer_cfg(), config_file, opts, "detectron2's defaults (or transfer/config.py)"
    )
    check_amp_precision(cfg)
    return cfg


def check_amp_precision(cfg: CfgNode) -> None:
    """``SOLVER.AMP.PRECISION`` is one of :data:`pretrain.config.AMP_PRECISIONS`, else one
    sentence."""
    if cfg.SOLVER.AMP.PRECISION not in AMP_PRECISIONS:
        raise UserError(
            f"SOLVER.AMP.PRECISION {cfg.SOLVER.AMP.PRECISION!r} is unknown; choose one of "
            f"{AMP_PRECISIONS}."
        )


def _sync_bn_keys(node: CfgNode, prefix: str = "") -> list[str]:
    """The ``*NORM`` keys of ``node`` (recursively) set to ``SyncBN``."""
    keys = []
    for name, value in node.items():
        if isinstance(value, CfgNode):
            keys += _sync_bn_keys(value, f"{prefix}{name}.")
        elif name.endswith("NORM") and value == "SyncBN":
            keys.append(prefix + name)
    return keys


def launch_device(cfg: CfgNode) -> str:
    """MODEL.DEVICE as :func:`pretrain.engine.launch_from_args` takes it: auto | cuda | cpu
    (``cuda:N`` is cuda: each process uses its local rank's GPU)."""
    device = cfg.MODEL.DEVICE
    return "cuda" if device.startswith("cuda") else device


def resolve_device_and_norm(cfg: CfgNode, world_size: int) -> None:
    """Make a config run on this process's device, saying what changed.

    * ``MODEL.DEVICE auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; ``cuda`` without a
      usable GPU is one sentence (:func:`pretrain.engine.resolve_device`), never a silent CPU run.
    * ``SOLVER.AMP.ENABLED`` as in pretraining: with ``MODEL.DEVICE cpu`` it is the CPU's autocast
      (:class:`pretrain.engine.DeviceAMPTrainer`); with ``auto`` that found no GPU it is one
      sentence (a GPU feature was asked for and no GPU is there).
    * ``SyncBN`` (``nn.SyncBatchNorm``) on a single process is plain BatchNorm over the local batch.
    * ``SyncBN`` on several CPU processes -> ``naiveSyncBN`` (detectron2's ``NaiveSyncBatchNorm``:
      the same batch statistics over all processes, by an all-reduce that gloo runs on CPU;
      ``nn.SyncBatchNorm`` only accepts GPU tensors). The module has the same parameters and
      buffers, so checkpoints load under either.
    """
    if resolve_device(launch_device(cfg)) == "cpu":
        amp_dtype(cfg, torch.device("cpu"))  # AMP with auto on the CPU: one sentence
        if cfg.MODEL.DEVICE == "auto":
            logger.info("No usable CUDA GPU (%s): MODEL.DEVICE auto -> cpu", no_cuda_reason())
        cfg.MODEL.DEVICE = "cpu"
    elif cfg.MODEL.DEVICE == "auto":
        cfg.MODEL.DEVICE = "cuda"
    keys = _sync_bn_keys(cfg.MODEL, "MODEL.")
    if world_size > 1 and cfg.MODEL.DEVICE == "cpu" and keys:
        for key in keys:
            *parents, leaf = key.split(".")
            node = cfg
            for part in parents:
                node = node[part]
            node[leaf] = "naiveSyncBN"
        logger.info(
            "%d CPU processes: SyncBN -> naiveSyncBN (NaiveSyncBatchNorm) in %s",
            world_size,
            ", ".join(keys),
        )
    if world_size == 1 and keys:
        logger.info("SyncBN on a single process: behaves as BatchNorm over the local batch")
