"""Distributed, resumable loaders: :class:`ResumableDistributedSampler` and :class:`ResumableLoader`
(the position, epoch and batch, is part of the checkpoint), and the builders of the training and
evaluation loaders."""

from __future__ import annotations

import logging
import os
from typing import (
    Any,
    Callable,
    Iterator,
    Optional,
    Tuple,
    Union,
)

import torch
from detectron2.data.samplers import InferenceSampler
from detectron2.utils import comm
from torch.utils.data import DataLoader, Sampler

from pretrain.io import UserError
from pretrain.data.datasets import RobustImageFolder

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Samplers and loaders
# --------------------------------------------------------------------------------------------


class ResumableDistributedSampler(Sampler):
    """``DistributedSampler`` that can start in the middle of an epoch and can seed each sample.

    Epoch ``e`` uses the permutation ``randperm(size, seed + e)`` (the same as torch's
    ``DistributedSampler``); rank ``r`` of ``W`` takes positions ``r, r + W, ...`` of it.
    ``set_start(n)`` skips this rank's first ``n`` indices (exact mid-epoch resume).

    With ``sample_seeds=True`` it yields ``(index, seed)`` pairs where the seed depends only on
    (``seed``, epoch, index): :class:`RobustImageFolder` then draws the same augmentation for a
    sample whatever the number of workers or ranks and wherever a resumed run restarts.
    """

    def __init__(
        self,
        size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        sample_seeds: bool = False,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
    ) -> None:
        self.size = int(size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.sample_seeds = sample_seeds
        self.num_replicas = comm.get_world_size() if num_replicas is None else num_replicas
        self.rank = comm.get_rank() if rank is None else rank
        if drop_last:
            self.num_samples = self.size // self.num_replicas  # per rank
        else:
            self.num_samples = -(-self.size // self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of this rank in the current epoch."""
        self.start = int(start)

    def __iter__(self) -> Iterator[Union[int, Tuple[int, int]]]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        if self.shuffle:
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        if self.total_size > self.size:  # pad by wrapping around, like DistributedSampler
            order = torch.cat([order, order[: self.total_size - self.size]])
        mine = order[: self.total_size][self.rank :: self.num_replicas][self.start :]
        if not self.sample_seeds:
            return iter(mine.tolist())
        # one seed per dataset index for this epoch, drawn after the permutation from the same
        # generator: a function of (seed, epoch, index) only
        seeds = torch.randint(0, 2**62, (self.size,), generator=g)
        return iter(zip(mine.tolist(), seeds[mine].tolist(), strict=True))

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


class ResumableLoader:
    """Endless iterator over epochs of a ``DataLoader`` with a :class:`ResumableDistributedSampler`.

    It counts the batches *handed to the consumer* (not those prefetched by workers), so
    :meth:`state_dict` after ``n`` ``next()`` calls is exactly the position to restart from.
    """

    def __init__(self, loader: DataLoader, sampler: ResumableDistributedSampler) -> None:
        self.loader = loader
        self.sampler = sampler
        self.batch_size = loader.batch_size
        self.batches_per_epoch = sampler.num_samples // self.batch_size
        self.epoch = 0
        self.batch = 0

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    def epochs_done(self) -> float:
        """Epochs consumed so far, as a float (``epoch + batch / batches_per_epoch``)."""
        return self.epoch + self.batch / max(self.batches_per_epoch, 1)

    def __iter__(self) -> Iterator[Any]:
        while True:
            self.sampler.set_epoch(self.epoch)
            self.sampler.set_start(self.batch * self.batch_size)
            for batch in self.loader:
                self.batch += 1
                yield batch
            self.epoch += 1
            self.batch = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.batch = int(state["batch"])


def build_image_folder(root: str, split: str, transform: Callable) -> RobustImageFolder:
    """``RobustImageFolder(os.path.join(root, split))`` with a clear error when it is missing."""
    path = os.path.join(root, split) if split else root
    if not os.path.isdir(path):
        raise UserError(
            f"{path}: dataset folder not found; set DATASETS.ROOT (and DATASETS.TRAIN_SPLIT / "
            "VAL_SPLIT) to an ImageFolder layout such as datasets/shapes/imagefolder."
        )
    return RobustImageFolder(path, transform=transform)


def _worker_init(worker_id: int) -> None:
    # one intra-op thread per worker: workers are processes already, more threads only contend
    torch.set_num_threads(1)


def build_train_loader(
    dataset: RobustImageFolder,
    total_batch_size: int,
    *,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = True,
    prefetch_factor: int = 2,
) -> ResumableLoader:
    """Shuffled, per-sample-seeded, ``drop_last`` training loader split over all ranks.

    ``total_batch_size`` is the global N (SOLVER.IMS_PER_BATCH); each rank gets N / world_size.
    """
    world = comm.get_world_size()
    if total_batch_size % world != 0:
        raise UserError(
            f"SOLVER.IMS_PER_BATCH={total_batch_size} is not divisible by the number of processes "
            f"({world}); pick a multiple of it."
        )
    per_rank = total_batch_size // world
    if len(dataset) < total_batch_size:
        raise UserError(
            f"{dataset.root}: {len(dataset)} images are fewer than one batch of "
            f"SOLVER.IMS_PER_BATCH={total_batch_size}; lower the batch size or add images."
        )
    sampler = ResumableDistributedSampler(len(dataset), shuffle=True, seed=seed, sample_seeds=True)
    extra = {}
    if num_workers > 0:
        extra = dict(
            persistent_workers=persistent_workers,
            prefetch_factor=prefetch_factor,
            worker_init_fn=_worker_init,
        )
    loader = DataLoader(
        dataset,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        # the loader's own base seed is irrelevant (samples are seeded), but drawing it from a
        # private generator keeps the global RNG stream independent of the loader
        generator=torch.Generator().manual_seed(seed),
        **extra,
    )
    return ResumableLoader(loader, sampler)


def build_eval_loader(
    dataset: torch.utils.data.Dataset,
    batch_size_per_rank: int,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Ordered loader over this rank's contiguous shard (detectron2 ``InferenceSampler``: no
    padding, so gathering the shards in rank order gives every sample exactly once)."""
    return DataLoader(
        dataset,
        batch_size=batch_size_per_rank,
        sampler=InferenceSampler(len(dataset)),
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(0),
    )
