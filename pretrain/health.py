"""Training-health metrics of a contrastive run: what they measure, and the hook that logs them.

Per step, from tensors the method already builds (no extra forward; ``ContrastiveMethod.stats``):

* ``health/contrastive_top1``: fraction of queries whose positive logit is strictly larger than
  every negative logit (a tie counts as a failure); symmetric methods average their two halves.
  Compared on the similarities ``(pos, neg)``, before any margin or EqCo shift of the loss.
* ``health/alignment`` (Wang & Isola 2020, alpha = 2): mean_i ||q_i - k_i||^2 of the normalised
  embeddings of the two views, in [0, 4]; lower is better aligned.
* ``health/uniformity`` (t = 2): log mean_{i<j} exp(-2 ||q_i - q_j||^2) of the local normalised
  queries, in [-4, 0]; lower is more uniform.
* ``health/emb_std``: mean over dimensions of the per-dimension std of the normalised queries,
  about 1/sqrt(dim) when healthy and 0 when the embeddings collapse to one point.

:class:`HealthHook` sums them on the device every step and reads them back once per LOG_PERIOD
(one ``.tolist()``), so logging adds no host synchronisation to the other steps.

At each kNN period, :func:`instance_retrieval_top1` measures whether the backbone still tells the
two augmented views of an image apart from other images (a fixed, seeded held-out subset).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from detectron2.engine import hooks
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from pretrain.data import build_image_folder, moco_v2_transform
from pretrain.features import extract_features

__all__ = [
    "HEALTH_KEYS",
    "contrastive_top1",
    "alignment",
    "uniformity",
    "emb_std",
    "embedding_stats",
    "HealthHook",
    "retrieval_top1",
    "view_retrieval_top1",
    "instance_retrieval_top1",
    "retrieval_subset",
    "split_retrieval",
    "RETRIEVAL_VIEW_SEED",
]

HEALTH_KEYS = (
    "health/contrastive_top1",
    "health/alignment",
    "health/uniformity",
    "health/emb_std",
)


def contrastive_top1(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Fraction (0-d float32 tensor) of rows with ``pos[i] > neg[i, j]`` for every j (strict)."""
    with torch.no_grad():
        return (pos.detach().unsqueeze(1) > neg.detach()).all(dim=1).float().mean()


def alignment(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """mean_i ||q_i - k_i||^2 of the (already normalised) rows of ``q`` and ``k``."""
    return (q - k).pow(2).sum(dim=1).mean()


def uniformity(q: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log mean_{i<j} exp(-t ||q_i - q_j||^2) (stable log-sum-exp); NaN for fewer than 2 rows."""
    n = q.shape[0]
    if n < 2:
        return torch.full((), float("nan"), dtype=q.dtype, device=q.device)
    sq = torch.pdist(q, p=2).pow(2)
    return torch.logsumexp(-t * sq, dim=0) - math.log(n * (n - 1) / 2)


def emb_std(q: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension (population) std of the rows of ``q``."""
    return q.std(dim=0, correction=0).mean()


def embedding_stats(
    q: torch.Tensor, k: torch.Tensor, top1: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """The four ``health/*`` values as detached 0-d float32 tensors on ``q``'s device.

    ``q`` / ``k`` are the normalised embeddings of view 1 (queries) and view 2 (their keys);
    ``top1`` is the contrastive top-1 of the step. Computed without autograd, autocast off.
    """
    with torch.no_grad(), torch.autocast(device_type=q.device.type, enabled=False):
        q, k = q.detach().float(), k.detach().float()
        return {
            "health/contrastive_top1": top1.detach().float(),
            "health/alignment": alignment(q, k),
            "health/uniformity": uniformity(q),
            "health/emb_std": emb_std(q),
        }


class HealthHook(hooks.HookBase):
    """Puts the mean of ``model.stats`` over the steps since the last write into the event
    storage as ``[metric]<name>`` (``[metric]health/alignment``, ...) at every ``period``-th
    iteration and at the last one, i.e. exactly when detectron2's ``PeriodicWriter`` writes:
    register it *before* the writer. The ``[metric]`` prefix puts them on the progress line of
    ``CommonMetricPrinter`` too (JSONWriter and tensorboard write them unsmoothed).

    The running sums stay on the device (no ``.item()``/``.cpu()`` per step); each write reads them
    back with one ``.tolist()``. Values are those of this process (rank 0 in practice, where the
    writers live): no collective is added, so they describe one process's share of the batch.
    """

    def __init__(self, model: nn.Module, period: int) -> None:
        self.model = model
        self.period = int(period)
        self._reset()

    def _reset(self) -> None:
        self._names: Optional[List[str]] = None
        self._sum: Optional[torch.Tensor] = None
        self._count = 0

    def before_train(self) -> None:
        self._reset()

    def after_step(self) -> None:
        stats: Optional[Dict[str, torch.Tensor]] = getattr(self.model, "stats", None)
        if stats:
            if self._names is None:
                self._names = list(stats)
            step = torch.stack([stats[name].detach().float() for name in self._names])
            self._sum = step if self._sum is None else self._sum + step
            self._count += 1
        it, max_iter = self.trainer.iter, self.trainer.max_iter
        if self._count and ((it + 1) % self.period == 0 or it == max_iter - 1):
            means = (self._sum / self._count).tolist()  # the only host read
            storage = self.trainer.storage
            for name, value in zip(self._names, means, strict=True):
                storage.put_scalar(f"[metric]{name}", value, smoothing_hint=False)
            self._sum, self._count = None, 0


# --------------------------------------------------------------------------------------------
# Instance retrieval between two augmented views
# --------------------------------------------------------------------------------------------


def retrieval_top1(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Top-1 retrieval accuracy (%): fraction of rows i of ``f1`` whose most cosine-similar row of
    ``f2`` is row i (rows are L2-normalised by the caller; ties go to the lowest index)."""
    if f1.shape[0] == 0:
        return float("nan")
    pred = (f1 @ f2.t()).argmax(dim=1)
    hits = pred == torch.arange(f1.shape[0], device=f1.device)
    return 100.0 * hits.float().mean().item()


@torch.no_grad()
def view_retrieval_top1(
    encoder: nn.Module,
    views1: Any,
    views2: Any,
    device: torch.device,
) -> float:
    """:func:`retrieval_top1` of the L2-normalised backbone features of two views.

    ``views1`` / ``views2``: iterables of image batches (tensors, or ``(images, labels)``), in the
    same image order. The encoder runs in eval mode (BN running statistics) and is restored.
    No collective: the features stay on ``device``, on this process only.
    """
    f1, _ = extract_features(encoder, views1, device, normalize=True, gather=False, cpu=False)
    f2, _ = extract_features(encoder, views2, device, normalize=True, gather=False, cpu=False)
    return retrieval_top1(f1, f2)


# the seed of the held-out retrieval views: the same in every run and for every backbone, so the
# pretraining's monitor and the linear eval of random init measure on identical views
RETRIEVAL_VIEW_SEED = 0


def retrieval_subset(num_images: int, size: int) -> list[int]:
    """The ``min(size, num_images)`` image indices instance retrieval runs on: evenly spaced over
    the dataset, ``j * num_images // n``. An ImageFolder lists its images class by class, so this
    is a class-stratified subset; the first ``n`` images would be one or two classes only (the
    demo's first 256 of 1000 val images: 200 circles, the class without a rotation to tell two
    instances apart, and 56 squares)."""
    n = min(int(size), int(num_images))
    return [j * num_images // n for j in range(n)]


def instance_retrieval_top1(
    encoder: nn.Module,
    dataset: Dataset,
    device: torch.device,
    *,
    size: int = 256,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
) -> float:
    """Instance-retrieval top-1 (%) on :func:`retrieval_subset` ``(len(dataset), size)``.

    ``dataset`` applies the pretraining augmentation and accepts ``(index, seed)`` indices
    (:class:`pretrain.data.RobustImageFolder`). View 1 and view 2 of the j-th subset image are
    drawn with seeds that depend only on (``seed``, j), so with the same ``seed`` every call, of
    this run or of another backbone, sees the same views: the numbers are comparable across
    iterations and across backbones (pretrained vs random init, paired). No collective: every
    process computes the same value on the whole subset.
    """
    indices = retrieval_subset(len(dataset), size)
    g = torch.Generator().manual_seed(int(seed))
    seeds = torch.randint(0, 2**62, (2, len(indices)), generator=g).tolist()
    loaders = [
        DataLoader(
            Subset(dataset, list(zip(indices, view_seeds))),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            # the loader's base seed comes from this generator, not from the global RNG stream
            generator=torch.Generator().manual_seed(0),
        )
        for view_seeds in seeds
    ]
    return view_retrieval_top1(encoder, loaders[0], loaders[1], device)


def split_retrieval(
    encoder: nn.Module,
    root: str,
    split: str,
    input_size: int,
    scale: tuple[float, float],
    device: torch.device,
    *,
    size: int,
    batch_size: int,
    num_workers: int,
) -> tuple[float, int]:
    """The held-out instance retrieval of the pretraining's monitor and of the linear eval:
    ``(top-1 %, gallery size)`` of :func:`instance_retrieval_top1` on the
    :func:`retrieval_subset` of the ImageFolder ``root/split``, through the pretraining
    augmentation at ``input_size`` with crop ``scale``, with the views of
    :data:`RETRIEVAL_VIEW_SEED`."""
    views = build_image_folder(root, split, moco_v2_transform(input_size, scale))
    top1 = instance_retrieval_top1(
        encoder,
        views,
        device,
        size=size,
        seed=RETRIEVAL_VIEW_SEED,
        batch_size=batch_size,
        num_workers=num_workers,
    )
    return top1, len(retrieval_subset(len(views), size))
