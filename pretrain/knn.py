"""Weighted kNN monitor (Wu et al. 2018, as in the MoCo/InstDisc demos): classify held-out images
by a temperature-weighted vote of their k nearest training images in backbone feature space.

It needs no training, so it tracks representation quality every few epochs at the cost of one
feature extraction pass. All functions that gather are collective (call them on every process).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from pretrain.features import extract_features

__all__ = ["knn_predict", "knn_top1"]


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
    """kNN top-1 accuracy (%) of ``val_set`` against ``train_set`` (both with eval transforms),
    on the L2-normalised backbone features of :func:`pretrain.features.extract_features`
    (collective: each process extracts its shard of each split, then all-gather).

    The encoder is put in eval mode (BN running statistics) and restored afterwards.
    """
    args = (device, batch_size, num_workers)
    train_f, train_y = extract_features(encoder, train_set, *args, normalize=True)
    val_f, val_y = extract_features(encoder, val_set, *args, normalize=True)
    num_classes = len(getattr(train_set, "classes", [])) or int(train_y.max()) + 1
    pred = knn_predict(train_f, train_y, val_f, num_classes, k, t)
    return 100.0 * (pred == val_y).float().mean().item() if len(val_y) else float("nan")
