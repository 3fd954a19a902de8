"""How good the frozen backbone and its linear classifier are: top-1 / top-5 of the fc (on val
images or cached val features), the weighted kNN top-1 of the backbone (``TEST.KNN``) and its
instance-retrieval top-1 (``TEST.RETRIEVAL_SIZE``, :func:`pretrain.health.split_retrieval`).

The kNN top-1 is val against train, both through the eval transform (Resize + CenterCrop),
cosine similarity of L2-normalised features, ``exp(s / TEST.KNN_T)`` vote of the ``TEST.KNN_K``
nearest, each rank holding only its shard of the train features on its device
(:func:`pretrain.knn.sharded_knn_predict`). It needs no training, so it is the same evaluation
for every backbone, random init included. Every function here that gathers is collective.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torchvision
from detectron2.evaluation.evaluator import inference_context
from detectron2.utils import comm
from torch import nn
from torch.utils.data import Dataset

from pretrain.config import PretrainCfgNode
from pretrain.data import (
    RobustImageFolder,
    build_eval_loader,
    build_image_folder,
    count_bad_files,
    eval_transform,
)
from pretrain.engine import autocast_to
from pretrain.health import split_retrieval
from pretrain.io import UserError
from pretrain.knn import (
    contiguous_shard,
    feature_dtype,
    hit_counts,
    knn_hits,
    sharded_knn_predict,
)
from pretrain.lincls.data import CachedFeatures
from pretrain.models import backbone_features

__all__ = [
    "accuracy",
    "evaluate_features",
    "evaluate_images",
    "frozen_knn_top1",
    "frozen_retrieval",
    "knn_accuracy",
    "knn_train_set",
    "knn_results",
    "percent",
    "topk_correct",
]

# the package's logger: log.txt names these lines pretrain.lincls, as before the split
logger = logging.getLogger("pretrain.lincls")


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> list[int]:
    """Number of rows whose label is among the ``k`` highest logits, for each ``k`` (capped at
    the number of classes)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top == labels[:, None]
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


def accuracy(counts: Sequence[int], total: int) -> dict[str, float]:
    """``{"top1", "top5"}`` in % from the top-1 / top-5 hit counts of ``total`` val images."""
    if total == 0:
        raise UserError("the val split has no images to evaluate.")
    return {"top1": 100.0 * counts[0] / total, "top5": 100.0 * counts[1] / total}


@torch.no_grad()
def evaluate_images(
    net: torchvision.models.ResNet,
    val_set: Dataset,
    device: torch.device,
    batch_size_per_rank: int,
    num_workers: int,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 (%) of ``net`` (backbone + fc, eval mode) on ``val_set`` (collective).

    The backbone runs under autocast to ``amp_dtype`` (None: float32) with NHWC images when
    ``channels_last``; the fc always gets float32 features, as in training."""
    loader = build_eval_loader(
        val_set, batch_size_per_rank, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    counts, total = [0, 0], 0
    with inference_context(net):
        for images, labels in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
            with autocast_to(device, amp_dtype):
                features = backbone_features(net, images)
            logits = net.fc(features.float())
            c = topk_correct(logits.float().cpu(), labels, (1, 5))
            counts = [a + b for a, b in zip(counts, c)]
            total += len(labels)
    gathered = comm.all_gather((counts, total))
    counts = [sum(g[0][i] for g in gathered) for i in range(2)]
    return accuracy(counts, sum(g[1] for g in gathered))


@torch.no_grad()
def evaluate_features(
    fc: nn.Module, features: torch.Tensor, labels: torch.Tensor, device: torch.device
) -> dict[str, float]:
    """Top-1 / top-5 (%) of ``fc`` on cached features (every rank holds all of them)."""
    counts = [0, 0]
    for start in range(0, len(labels), 4096):
        logits = fc(features[start : start + 4096].to(device, torch.float32)).float().cpu()
        c = topk_correct(logits, labels[start : start + 4096], (1, 5))
        counts = [a + b for a, b in zip(counts, c)]
    return accuracy(counts, len(labels))


def _normalized_copy(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``F.normalize(x, dim=1)`` on ``device`` in :func:`pretrain.knn.feature_dtype`, with one
    float32 copy of ``x`` (a shard of cached features), never modifying ``x``."""
    out = x.to(device=device, dtype=torch.float32, copy=True)
    out.div_(out.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return out.to(feature_dtype(device))


@torch.no_grad()
def knn_accuracy(
    features: CachedFeatures,
    num_classes: int,
    k: int,
    t: float,
    device: torch.device | None = None,
) -> float:
    """Weighted kNN top-1 (%) of the val features against the train features.

    Collective. Every rank holds all cached features (the fc trains on them); each puts only its
    contiguous shard of both splits on ``device`` (L2-normalised copies in
    :func:`pretrain.knn.feature_dtype`: the cached features stay as they are), so similarities
    are cosines, and :func:`pretrain.knn.sharded_knn_predict` votes with ``exp(cos / t)`` over
    the ``k`` nearest train features of all shards; the correct counts are summed.
    """
    # every rank holds the same features: these checks agree on all of them
    if not len(features.val_labels):
        raise UserError("the val split has no images to evaluate.")
    if not len(features.train_labels):
        raise UserError("the train split has no images: the kNN evaluation needs them.")
    device = device or torch.device("cpu")
    train_part = contiguous_shard(len(features.train_labels))
    val_part = contiguous_shard(len(features.val_labels))
    train = _normalized_copy(features.train[train_part], device)
    train_y = features.train_labels[train_part].to(device)
    val = _normalized_copy(features.val[val_part], device)
    val_y = features.val_labels[val_part]
    hits, total = hit_counts(sharded_knn_predict(train, train_y, val, num_classes, k, t), val_y)
    return 100.0 * hits / total


def knn_train_set(cfg: PretrainCfgNode, val_set: RobustImageFolder) -> RobustImageFolder:
    """The train split through the *eval* transform (as the val split's), for the kNN top-1;
    its classes must be the val split's."""
    tf = eval_transform(cfg.INPUT.SIZE, cfg.INPUT.RESIZE or None)
    train_set = build_image_folder(cfg.DATASETS.ROOT, cfg.DATASETS.TRAIN_SPLIT, tf)
    if train_set.classes != val_set.classes:
        raise UserError(
            f"{val_set.root}: its class folders differ from those of {train_set.root}; the kNN "
            "evaluation needs the same classes in both splits (or set TEST.KNN False)."
        )
    return train_set


def frozen_knn_top1(
    net: torchvision.models.ResNet,
    cfg: PretrainCfgNode,
    val_set: RobustImageFolder,
    num_classes: int,
    device: torch.device,
    batch_size_per_rank: int,
    features: CachedFeatures | None = None,
    amp_dtype: torch.dtype | None = None,
) -> float | None:
    """TEST.KNN's top-1 (%) of ``net``'s frozen backbone with TEST.KNN_K / KNN_T, logged; None
    when TEST.KNN is False (collective). ``features``: eval-transform features of both splits
    already extracted (cached mode: :func:`knn_accuracy`); else one eval-transform extraction
    pass over each split, every rank keeping only its shard (:func:`pretrain.knn.knn_hits`), the
    backbone under autocast to ``amp_dtype`` (None: float32)."""
    if not cfg.TEST.KNN:
        return None
    k, t = cfg.TEST.KNN_K, cfg.TEST.KNN_T
    if features is not None:
        top1 = knn_accuracy(features, num_classes, k, t, device)
        sizes = (len(features.val_labels), len(features.train_labels))
    else:
        train_set = knn_train_set(cfg, val_set)
        logger.info(
            "Extracting eval-transform features of %d train + %d val images for the kNN top-1...",
            len(train_set),
            len(val_set),
        )
        workers = cfg.DATALOADER.NUM_WORKERS
        hits, total = knn_hits(
            net, train_set, val_set, device, batch_size=batch_size_per_rank,
            num_workers=workers, k=k, t=t, amp_dtype=amp_dtype,
        )  # fmt: skip
        top1 = 100.0 * hits / total
        bad = count_bad_files(train_set)
        if bad:
            logger.warning("%d unreadable train images were skipped by the kNN extraction.", bad)
        sizes = (len(val_set), len(train_set))
    logger.info(
        "kNN top-1 %.2f%% (k=%d, T=%g; %d val against %d train images, eval-transform features "
        "of the frozen backbone)",
        top1,
        k,
        t,
        *sizes,
    )
    return top1


def knn_results(cfg: PretrainCfgNode, top1: float | None) -> dict[str, Any]:
    """The results.json kNN keys: all None when TEST.KNN is False."""
    on = bool(cfg.TEST.KNN)
    return {
        "knn_top1": top1,
        "knn_k": int(cfg.TEST.KNN_K) if on else None,
        "knn_t": float(cfg.TEST.KNN_T) if on else None,
    }


def frozen_retrieval(
    net: torchvision.models.ResNet,
    cfg: PretrainCfgNode,
    device: torch.device,
    batch_size: int,
) -> dict[str, Any]:
    """TEST.RETRIEVAL_SIZE's instance retrieval of ``net``'s frozen backbone, logged, as the
    results.json keys ``instance_retrieval_top1`` (%) and ``retrieval_images`` (the gallery size:
    chance is 100 / it), both None when TEST.RETRIEVAL_SIZE is 0. The views and the subset are
    those of the pretraining's monitor with the same size and scales
    (:func:`pretrain.health.split_retrieval`), so a pretrained and a random-init backbone are
    compared on identical images. No collective: every process computes the same value."""
    size = int(cfg.TEST.RETRIEVAL_SIZE)
    if size <= 0:
        return {"instance_retrieval_top1": None, "retrieval_images": None}
    scale = (float(cfg.TEST.RETRIEVAL_MIN_SCALE), float(cfg.TEST.RETRIEVAL_MAX_SCALE))
    top1, n = split_retrieval(
        net,
        cfg.DATASETS.ROOT,
        cfg.DATASETS.VAL_SPLIT,
        cfg.INPUT.SIZE,
        scale,
        device,
        size=size,
        batch_size=batch_size,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
    logger.info(
        "Instance-retrieval top-1 %.2f%% (two augmented views, crop scale %g-%g, of %d evenly "
        "spaced val images; chance %.2f%%)",
        top1,
        scale[0],
        scale[1],
        n,
        100.0 / n,
    )
    return {"instance_retrieval_top1": top1, "retrieval_images": n}


def percent(value: float | None) -> str:
    """A log-line percentage, ``-`` for None."""
    return "-" if value is None else f"{value:.2f}%"

