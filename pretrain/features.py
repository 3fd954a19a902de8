"""Backbone features of a dataset: the one extraction pass behind the kNN monitor
(:mod:`pretrain.knn`), linear evaluation (:mod:`pretrain.lincls`) and instance retrieval
(:mod:`pretrain.health`).

A feature is the global-average-pooled output of ``layer4`` (2048-d for R50, 512-d for R18;
:func:`pretrain.models.backbone_features`), computed in eval mode (detectron2's
``inference_context``: BN uses and keeps its running statistics; the module's mode is restored
afterwards) without autograd.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from detectron2.evaluation.evaluator import inference_context
from detectron2.utils import comm
from torch import nn
from torch.utils.data import Dataset

from pretrain.data import build_eval_loader
from pretrain.models import backbone_features

__all__ = ["extract_features"]


def _feature_dim(net: nn.Module) -> int:
    """Width of a feature: the input of the first ``nn.Linear`` of ``net.fc`` (a classifier or a
    projection head), else the channels of ``layer4`` (torchvision keeps them in ``inplanes``)."""
    for m in net.fc.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    return int(net.inplanes)


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images, labels)`` of a batch: ``(images, labels, ...)`` or a bare image tensor."""
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


@torch.no_grad()
def extract_features(
    net: nn.Module,
    data: Dataset | Iterable[Any],
    device: torch.device,
    batch_size: int = 64,
    num_workers: int = 0,
    *,
    normalize: bool = False,
    gather: bool = True,
    cpu: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backbone features and labels of ``data``, in its order.

    Args:
        net: a torchvision ResNet (any ``fc``: classifier or projection head); run in eval mode
            and restored to its mode afterwards.
        data: a ``Dataset`` of ``(image, label)``: this process reads its contiguous shard
            (:func:`pretrain.data.build_eval_loader` with ``batch_size`` images per process and
            ``num_workers`` workers, pinned memory on CUDA). Or an iterable of batches, used as
            is: ``(images, labels)`` tuples or bare image tensors (then the labels are None);
            with ``gather`` it must be this process's contiguous shard in rank order.
        device: where the forward runs.
        normalize: L2-normalise every feature (cosine similarities then are dot products).
        gather: all-gather the shards of every process in rank order (collective; a no-op with
            one process), so that every process returns the whole dataset. False: this
            process's part only.
        cpu: return the features on CPU (False: on ``device``). Labels are always on CPU.
        dtype: of the returned features, cast batch by batch after the float32 forward and
            normalisation (float16 halves a kNN train shard, :mod:`pretrain.knn`).

    Returns:
        ``(features [n, dim] dtype, labels [n] or None)``. From a ``Dataset`` this process's
        features are written into one preallocated tensor (no second copy while concatenating).
    """
    size = None
    if isinstance(data, Dataset):
        data = build_eval_loader(
            data, batch_size, num_workers=num_workers, pin_memory=device.type == "cuda"
        )
        size = len(data.sampler)  # this process's shard: InferenceSampler pads nothing
    out_device = torch.device("cpu") if cpu else device
    feats: list[torch.Tensor] = []
    out: torch.Tensor | None = None  # preallocated [size, dim] when the size is known
    filled = 0
    labels: list[torch.Tensor] | None = []
    with inference_context(net):
        for batch in data:
            images, targets = _split(batch)
            f = backbone_features(net, images.to(device, non_blocking=True)).float()
            if normalize:
                f = F.normalize(f, dim=1)
            f = f.to(out_device, dtype)
            if size is None:
                feats.append(f)
            else:
                if out is None:
                    out = f.new_empty(size, f.shape[1])
                out[filled : filled + len(f)] = f
                filled += len(f)
            if targets is None:
                labels = None
            elif labels is not None:
                labels.append(targets.cpu())
    if out is not None:
        local_f = out[:filled]
    elif feats:
        local_f = torch.cat(feats)
    else:
        local_f = torch.zeros(0, _feature_dim(net), dtype=dtype, device=out_device)
    local_y = None
    if labels is not None:
        local_y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    if not gather or comm.get_world_size() == 1:
        return local_f, local_y
    all_f = torch.cat(comm.all_gather(local_f))
    return all_f, (None if local_y is None else torch.cat(comm.all_gather(local_y)))
