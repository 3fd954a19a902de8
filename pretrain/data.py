"""Data pipeline shared by pretraining and linear evaluation.

Public API (also used by :mod:`pretrain.lincls`):

* :func:`load_rgb` -- open any image PIL can read (CMYK, grayscale, 16-bit, palette, PNG with alpha)
  as an 8-bit RGB image; raises ``OSError``-like errors for truncated/unreadable files.
* :class:`RobustImageFolder` -- ``torchvision.datasets.ImageFolder`` that never crashes on a bad
  file: the file is logged once, counted (:attr:`RobustImageFolder.num_bad`, shared by all
  DataLoader workers) and replaced by the next readable sample, so batches keep their size (all
  ranks must produce equal batches for the all-gathers). An index may also be a pair
  ``(index, seed)``: the transform then runs under that seed, which makes augmentations independent
  of worker count and of where a resumed run restarts (exact resume).
* :func:`moco_v2_transform`, :class:`TwoCropsTransform`, :func:`eval_transform`,
  :func:`lincls_train_transform` -- the MoCo v2 "aug+" recipe and the linear-evaluation
  transforms (docs/methods.md, "Augmentation").
* :class:`ResumableDistributedSampler` + :class:`ResumableLoader` and the builders
  :func:`build_train_loader` / :func:`build_eval_loader` -- distributed-aware loaders; the training
  loader iterates epoch after epoch (calling ``set_epoch``) and its position (epoch, batch) is
  part of the checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torchvision.transforms as T
from detectron2.data.samplers import InferenceSampler
from detectron2.utils import comm
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Sampler
from torchvision.datasets import ImageFolder

from pretrain.io import UserError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_rgb",
    "RobustImageFolder",
    "moco_v2_transform",
    "GaussianBlur",
    "TwoCropsTransform",
    "eval_transform",
    "lincls_train_transform",
    "ResumableDistributedSampler",
    "ResumableLoader",
    "build_image_folder",
    "build_train_loader",
    "build_eval_loader",
    "count_bad_files",
]

logger = logging.getLogger(__name__)

# torchvision / MoCo normalisation in RGB order (docs/methods.md, "Conversion": detectron2's side).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Errors PIL raises for truncated, corrupt or non-image files (SyntaxError for broken headers of
# some formats, ValueError for bad mode/size fields, DecompressionBombError for absurd sizes).
_BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully and return an 8-bit RGB PIL image.

    Handles CMYK / YCbCr / 1-bit / 8-bit grayscale (``convert``), 16/32-bit grayscale (rescaled to
    8 bit rather than clipped, which would turn most of a 16-bit image white), and images with an
    alpha channel or a palette transparency (composited over white, so transparent areas do not
    turn into arbitrary colours). The full decode happens here (``load``) so that a truncated file
    fails in this call and not later inside a transform.
    """
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if arr.max(initial=0.0) > 255.0:
            arr = arr / 257.0  # 16-bit range -> 8-bit range
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class RobustImageFolder(ImageFolder):
    """``ImageFolder`` whose ``__getitem__`` survives unreadable files (see module docstring).

    Args:
        root: folder with one sub-folder per class (ImageNet's ``train``,
            ``datasets/shapes/imagefolder/train``).
        transform: applied to the RGB PIL image (e.g. :class:`TwoCropsTransform`).

    Attributes:
        bad_mask: uint8 tensor in shared memory, 1 for every sample found unreadable. It is shared
            with DataLoader workers (fork or spawn), so :attr:`num_bad` counts what all workers of
            this process saw; use :func:`count_bad_files` for the count over all ranks.
    """

    def __init__(
        self,
        root: str,
        transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
    ) -> None:
        if not os.path.isdir(root):
            raise UserError(
                f"{root}: no such image folder; point the dataset path at a folder with one "
                "sub-folder of images per class."
            )
        try:
            # allow_empty: a class folder without images is no reason to refuse a run
            super().__init__(
                root, transform=transform, target_transform=target_transform, allow_empty=True
            )
        except FileNotFoundError as e:
            raise UserError(
                f"{root}: no class sub-folders found; an image folder needs one sub-folder of "
                "images per class."
            ) from e
        if not self.samples:
            raise UserError(f"{root}: no image files found in its class sub-folders.")
        self.bad_mask = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    @property
    def num_bad(self) -> int:
        """Number of distinct files found unreadable so far (by this process and its workers)."""
        return int(self.bad_mask.sum())

    def bad_files(self) -> List[str]:
        """Paths of the files found unreadable so far."""
        return [self.samples[i][0] for i in self.bad_mask.nonzero().flatten().tolist()]

    def _load(self, index: int) -> Tuple[Image.Image, int]:
        """Image and target of ``index`` or, if it is unreadable, of the next readable sample."""
        n = len(self.samples)
        for step in range(n):
            j = (index + step) % n
            if self.bad_mask[j]:
                continue
            path, target = self.samples[j]
            try:
                return load_rgb(path), target
            except _BAD_IMAGE_ERRORS as e:
                # check-then-set: the first process to meet the file logs it, later ones stay quiet
                if not self.bad_mask[j]:
                    self.bad_mask[j] = 1
                    logger.warning(
                        "Skipping unreadable image %s (%s: %s)", path, type(e).__name__, e
                    )
        raise UserError(f"{self.root}: none of the {n} image files can be read.")

    def __getitem__(self, index: Union[int, Tuple[int, int]]) -> Tuple[Any, Any]:
        seed = None
        if isinstance(index, (tuple, list)):
            index, seed = index
        img, target = self._load(int(index))
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            else:
                # all torchvision v1 random transforms draw from torch's global RNG; fork it so
                # the caller's RNG stream is left untouched
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(seed))
                    img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def count_bad_files(dataset: RobustImageFolder) -> int:
    """Number of distinct unreadable files seen by all ranks (collective: call on every rank)."""
    masks = comm.all_gather(dataset.bad_mask.clone())
    union = torch.stack(masks).amax(dim=0)
    return int(union.sum())


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def moco_v2_transform(
    size: int = 224,
    scale: Tuple[float, float] = (0.2, 1.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """MoCo v2 "aug+" (docs/methods.md, "Augmentation"): RandomResizedCrop(size, scale 0.2-1),
    ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, RandomGrayscale p=0.2, GaussianBlur(sigma 0.1-2) p=0.5,
    horizontal flip, normalisation.

    The blur is MoCo's: PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` (:class:`GaussianBlur`),
    with sigma drawn from torch's RNG so that per-sample seeding and exact resume hold; unlike
    torchvision's ``GaussianBlur`` it does not go through a tensor and back (measured on the demo
    data, one core: a whole 64 px view 0.8 ms vs 1.9 ms with torchvision's 13-tap blur).
    """
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=scale),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class GaussianBlur:
    """MoCo v2's blur: PIL's ``ImageFilter.GaussianBlur(radius=sigma)``, sigma uniform in
    ``sigma`` drawn from torch's global RNG (seeded per sample by :class:`RobustImageFolder`)."""

    def __init__(self, sigma: Tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        lo, hi = self.sigma
        sigma = lo + (hi - lo) * float(torch.rand(()))
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma})"


class TwoCropsTransform:
    """Two independent augmentations of one image: ``[query view, key view]`` (MoCo)."""

    def __init__(self, base_transform: Callable) -> None:
        self.base_transform = base_transform

    def __call__(self, img: Image.Image) -> List[torch.Tensor]:
        return [self.base_transform(img), self.base_transform(img)]

    def __repr__(self) -> str:
        return f"TwoCropsTransform({self.base_transform!r})"


def eval_transform(
    size: int = 224,
    resize: Optional[int] = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """Resize(256) + CenterCrop(224) + normalisation (docs/methods.md, "Augmentation"); ``resize``
    defaults
    to ``round(size * 256 / 224)`` so smaller demo resolutions keep the same crop ratio."""
    resize = resize or int(round(size * 256 / 224))
    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


def lincls_train_transform(
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """RandomResizedCrop(224) + flip + normalisation: the MoCo linear-evaluation training recipe."""
    return T.Compose(
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    )


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
