"""What the linear classifier trains and is evaluated on: the two image folders of a linear eval,
the per-process batch sizes, and the cached features of both splits (``CACHED_FEATURES``).

Image protocol: train images through RandomResizedCrop + flip, val through Resize + CenterCrop.
Cached mode: both splits through the deterministic val transform, extracted once by
:func:`pretrain.features.extract_features` (not normalised) and held as :class:`CachedFeatures`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from detectron2.utils import comm
from torch.utils.data import Dataset

from pretrain.config import PretrainCfgNode
from pretrain.data import (
    RobustImageFolder,
    build_image_folder,
    eval_transform,
    lincls_train_transform,
)
from pretrain.features import extract_features
from pretrain.io import UserError

__all__ = [
    "CachedFeatures",
    "FeatureDataset",
    "build_datasets",
    "extract_cached",
    "per_rank_batch",
]


@dataclass
class CachedFeatures:
    """Backbone features (CPU, dataset order) of the train and val splits, as
    :func:`extract_features` returns them."""

    train: torch.Tensor
    train_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor


def extract_cached(
    net: torchvision.models.ResNet,
    train_set: Dataset,
    val_set: Dataset,
    device: torch.device,
    batch_size_per_rank: int,
    num_workers: int,
) -> CachedFeatures:
    """Features (not normalised) of both splits, on every rank: one extraction pass over each
    (collective: each rank extracts its shard, then all-gather)."""
    args = (device, batch_size_per_rank, num_workers)
    train, train_labels = extract_features(net, train_set, *args)
    val, val_labels = extract_features(net, val_set, *args)
    return CachedFeatures(train, train_labels, val, val_labels)


class FeatureDataset(Dataset):
    """Cached features as a dataset for :func:`pretrain.data.build_train_loader`.

    Indices may be ``(index, seed)`` pairs (the loader seeds every sample; features need no
    augmentation, so the seed is ignored). ``root`` names the image folder in error messages.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, root: str = "") -> None:
        self.features = features
        self.labels = labels
        self.root = root

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(index, (tuple, list)):
            index = index[0]
        return self.features[index], self.labels[index]


def build_datasets(cfg: PretrainCfgNode) -> tuple[RobustImageFolder, RobustImageFolder]:
    """The train and val image folders (same classes required) with their transforms."""
    size, resize = cfg.INPUT.SIZE, cfg.INPUT.RESIZE or None
    val_tf = eval_transform(size, resize)
    # cached mode: one feature per image, so the train split gets the deterministic val transform
    train_tf = val_tf if cfg.CACHED_FEATURES else lincls_train_transform(size)
    train = build_image_folder(cfg.DATASETS.ROOT, cfg.DATASETS.TRAIN_SPLIT, train_tf)
    val = build_image_folder(cfg.DATASETS.ROOT, cfg.DATASETS.VAL_SPLIT, val_tf)
    if train.classes != val.classes:
        raise UserError(
            f"{val.root}: its class folders differ from those of {train.root} "
            f"({len(val.classes)} vs {len(train.classes)}); both splits need the same classes."
        )
    return train, val


def per_rank_batch(total: int, key: str) -> int:
    """``total`` (the global batch of config key ``key``) split over the processes."""
    world = comm.get_world_size()
    if total % world:
        raise UserError(
            f"{key}={total} is not divisible by the number of processes ({world}); "
            "pick a multiple of it."
        )
    return total // world
