"""Weighted kNN monitor (Wu et al. 2018, as in the MoCo/InstDisc demos): classify held-out images
by a temperature-weighted vote of their k nearest training images in backbone feature space.

It needs no training, so it tracks representation quality every few epochs at the cost of one
feature extraction pass. All functions that gather are collective (call them on every process).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from detectron2.evaluation.evaluator import inference_context
from detectron2.utils import comm
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pretrain.data import build_eval_loader
from pretrain.models import backbone_features

__all__ = ["extract_features", "knn_predict", "knn_top1"]


@torch.no_grad()
def extract_features(
    encoder: nn.Module, loader: DataLoader, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised backbone features and labels of the whole dataset, on CPU, in dataset order.

    ``loader`` must shard the dataset contiguously in rank order (:func:`build_eval_loader`).
    """
    feats, labels = [], []
    for images, targets in loader:
        f = backbone_features(encoder, images.to(device, non_blocking=True))
        feats.append(F.normalize(f.float(), dim=1).cpu())
        labels.append(targets.cpu())
    dim = encoder.fc[0].in_features
    local_f = torch.cat(feats) if feats else torch.zeros(0, dim)
    local_y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    all_f = comm.all_gather(local_f)
    all_y = comm.all_gather(local_y)
    return torch.cat(all_f), torch.cat(all_y)


def knn_predict(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted class of every row of ``test_f``: argmax_c sum_{j in kNN} exp(s_j / t) [y_j = c],
    with s_j the cosine similarity to the j-th neighbour (rows must be L2-normalised).

    Runs on the device of the inputs (``train_f``, ``train_y`` and ``test_f`` on the same one);
    ``chunk`` test rows at a time bound the similarity matrix to ``chunk x len(train_f)``."""
    k = min(k, train_f.shape[0])
    preds = []
    for start in range(0, test_f.shape[0], chunk):
        sims = test_f[start : start + chunk] @ train_f.t()
        top_s, top_i = sims.topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], num_classes, device=sims.device)
        votes.scatter_add_(1, train_y[top_i], (top_s / t).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=test_f.device)


@torch.no_grad()
def knn_top1(
    encoder: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    device: torch.device,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    k: int = 200,
    t: float = 0.1,
) -> float:
    """kNN top-1 accuracy (%) of ``val_set`` against ``train_set`` (both with eval transforms).

    The encoder is put in eval mode (BN running statistics) and restored afterwards.
    """
    with inference_context(encoder):
        train_f, train_y = extract_features(
            encoder, build_eval_loader(train_set, batch_size, num_workers=num_workers), device
        )
        val_f, val_y = extract_features(
            encoder, build_eval_loader(val_set, batch_size, num_workers=num_workers), device
        )
    num_classes = len(getattr(train_set, "classes", [])) or int(train_y.max()) + 1
    pred = knn_predict(train_f, train_y, val_f, num_classes, k, t)
    return 100.0 * (pred == val_y).float().mean().item() if len(val_y) else float("nan")
