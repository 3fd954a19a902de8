"""The few config keys the transfer stage adds to detectron2's, and train_det's config set-up."""
from __future__ import annotations

import logging

import torch
from detectron2.config import CfgNode, get_cfg

from pretrain.config import merge_config
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


def get_transfer_cfg() -> CfgNode:
    """detectron2's defaults plus :func:`add_transfer_config`."""
    cfg = get_cfg()
    add_transfer_config(cfg)
    return cfg


def load_config(config_file: str, opts: list[str]) -> CfgNode:
    """Defaults <- ``config_file`` (with its ``_BASE_`` chain) <- ``KEY VALUE`` overrides.

    Unknown keys, type mismatches and missing files become one-sentence :class:`UserError`s.
    """
    return merge_config(
        get_transfer_cfg(), config_file, opts, "detectron2's defaults (or transfer/config.py)"
    )


def resolve_device_and_norm(cfg: CfgNode, world_size: int) -> None:
    """Make a GPU config run anywhere, saying what changed.

    * ``MODEL.DEVICE cuda`` without CUDA -> ``cpu``.
    * ``SyncBN`` (``nn.SyncBatchNorm``) on a single process is plain BatchNorm over the local batch.
    * Several processes need GPUs: detectron2 wraps the model in DistributedDataParallel with
      ``device_ids``, which refuses CPU modules (and ``nn.SyncBatchNorm`` needs CUDA tensors).
    """
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.info("CUDA is not available: MODEL.DEVICE cuda -> cpu")
        cfg.MODEL.DEVICE = "cpu"
    if world_size > 1 and cfg.MODEL.DEVICE == "cpu":
        raise UserError(
            "detection training with several processes needs GPUs; on CPU use --num-gpus 1."
        )
    norms = (cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM)
    if world_size == 1 and "SyncBN" in norms:
        logger.info("SyncBN on a single process: behaves as BatchNorm over the local batch")
