"""The few config keys the transfer stage adds to detectron2's, and train_det's config set-up."""
from __future__ import annotations

import logging

import torch
from detectron2.config import CfgNode, get_cfg

from pretrain.config import merge_config

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


def _sync_bn_keys(node: CfgNode, prefix: str = "") -> list[str]:
    """The ``*NORM`` keys of ``node`` (recursively) set to ``SyncBN``."""
    keys = []
    for name, value in node.items():
        if isinstance(value, CfgNode):
            keys += _sync_bn_keys(value, f"{prefix}{name}.")
        elif name.endswith("NORM") and value == "SyncBN":
            keys.append(prefix + name)
    return keys


def resolve_device_and_norm(cfg: CfgNode, world_size: int) -> None:
    """Make a GPU config run anywhere, saying what changed.

    * ``MODEL.DEVICE cuda`` without CUDA -> ``cpu``.
    * ``SyncBN`` (``nn.SyncBatchNorm``) on a single process is plain BatchNorm over the local batch.
    * ``SyncBN`` on several CPU processes -> ``naiveSyncBN`` (detectron2's ``NaiveSyncBatchNorm``:
      the same batch statistics over all processes, by an all-reduce that gloo runs on CPU;
      ``nn.SyncBatchNorm`` only accepts GPU tensors). The module has the same parameters and
      buffers, so checkpoints load under either.
    """
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.info("CUDA is not available: MODEL.DEVICE cuda -> cpu")
        cfg.MODEL.DEVICE = "cpu"
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
