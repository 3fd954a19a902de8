"""Reading images that may be broken: :func:`load_rgb` / :func:`open_rgb` (any PIL image as 8-bit
RGB, optionally JPEG-decoded at a reduced size) and :class:`RobustImageFolder` (an ImageFolder that
skips, logs and counts unreadable files and runs its transform under a per-sample seed)."""

from __future__ import annotations

import logging
import os
from typing import (
    Any,
    Callable,
    List,
    Optional,
    Tuple,
    Union,
)

import numpy as np
import torch
from detectron2.utils import comm
from PIL import Image
from torchvision.datasets import ImageFolder

from pretrain.io import UserError

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
    return open_rgb(path)[0]


def open_rgb(
    path: str, plan: Optional[Callable[[int, int], int]] = None
) -> Tuple[Image.Image, int]:
    """:func:`load_rgb`, optionally decoding a JPEG at a reduced size: ``(image, factor)``.

    ``plan(width, height)`` is called with the full size (read from the header, before any
    decoding) and returns the wanted reduction ``s`` (1, 2, 4 or 8); a JPEG is then decoded by
    libjpeg's scaled IDCT (PIL ``Image.draft``) at ``ceil(width / s) x ceil(height / s)``, where
    full-image pixel coordinates map to decoded ones by exactly ``1 / s``. Other formats decode
    at full size; ``factor`` is the reduction actually applied.
    """
    with open(path, "rb") as f:
        img = Image.open(f)
        factor = 1
        if plan is not None:
            want = int(plan(*img.size))
            if want > 1 and img.format == "JPEG":
                width, height = img.size
                drafted = img.draft("RGB", (max(width // want, 1), max(height // want, 1)))
                if drafted is not None:  # its box is (0, 0, width / scale, height / scale)
                    factor = int(round(width / drafted[1][2]))
        img.load()
    return _to_rgb(img), factor


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB version of a decoded image (see :func:`load_rgb`)."""
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

    def _load(self, index: int, read: Callable[[str], Any] = load_rgb) -> Tuple[Any, int]:
        """``read(path)`` and the target of ``index`` or, if its file is unreadable, of the next
        readable sample (``read`` decodes: :func:`load_rgb`, or a transform's ``load``)."""
        n = len(self.samples)
        for step in range(n):
            j = (index + step) % n
            if self.bad_mask[j]:
                continue
            path, target = self.samples[j]
            try:
                return read(path), target
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
        index = int(index)
        # a transform with a ``load(path)`` (TwoCropsTransform) decodes the file itself, so that
        # it can draw its crops before decoding (reduced JPEG decode); otherwise decode, transform
        file_transform = getattr(self.transform, "load", None)
        if callable(file_transform):
            out, target = self._load(index, lambda path: _seeded(seed, file_transform, path))
        else:
            out, target = self._load(index)
            if self.transform is not None:
                out = _seeded(seed, self.transform, out)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return out, target


def _seeded(seed: Optional[int], fn: Callable[[Any], Any], x: Any) -> Any:
    """``fn(x)``; with a ``seed``, under torch's global RNG seeded with it and restored after.

    All torchvision v1 random transforms (and :class:`MoCoV2Augment`) draw from torch's global
    RNG; forking it leaves the caller's RNG stream untouched. A replacement for an unreadable file
    is drawn from the same seed again."""
    if seed is None:
        return fn(x)
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed would also (lazily) re-seed every
        # accelerator's generator, which these transforms never use, at ~70 us a call
        torch.default_generator.manual_seed(int(seed))
        return fn(x)


def count_bad_files(dataset: RobustImageFolder) -> int:
    """Number of distinct unreadable files seen by all ranks (collective: call on every rank)."""
    masks = comm.all_gather(dataset.bad_mask.clone())
    union = torch.stack(masks).amax(dim=0)
    return int(union.sum())
