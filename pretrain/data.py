"""Data pipeline shared by pretraining and linear evaluation.

Public API (also used by :mod:`pretrain.lincls`):

* :func:`load_rgb` -- open any image PIL can read (CMYK, grayscale, 16-bit, palette, PNG with alpha)
  as an 8-bit RGB image; raises ``OSError``-like errors for truncated/unreadable files.
  :func:`open_rgb` does the same, optionally decoding a JPEG at 1/2, 1/4 or 1/8 size.
* :class:`RobustImageFolder` -- ``torchvision.datasets.ImageFolder`` that never crashes on a bad
  file: the file is logged once, counted (:attr:`RobustImageFolder.num_bad`, shared by all
  DataLoader workers) and replaced by the next readable sample, so batches keep their size (all
  ranks must produce equal batches for the all-gathers). An index may also be a pair
  ``(index, seed)``: the transform then runs under that seed, which makes augmentations independent
  of worker count and of where a resumed run restarts (exact resume).
* :func:`moco_v2_transform`, :class:`TwoCropsTransform`, :func:`eval_transform`,
  :func:`lincls_train_transform` -- the MoCo v2 "aug+" recipe and the linear-evaluation
  transforms (docs/methods.md, "Augmentation").
* The pretraining input pipeline, ``TwoCropsTransform(moco_v2_transform(size))``
  (``bench/data_pipeline.py``: 1.6x MoCo's images/s per core on 500 x 375 JPEGs at 224 px), keeps
  aug+: every random draw is torchvision's (same calls, same order, same numbers for a seed) and
  every op gives torchvision's bytes (:class:`MoCoV2Augment`, tested). It is faster by (1) drawing
  both views' parameters from the file header first, then decoding a JPEG once, reduced by 2/4/8
  only when both crops still span >= the output size in the reduced image (the one place where
  pixel values can differ, by the filtering: :meth:`MoCoV2Augment.draft_factor`); (2) exact
  re-implementations of the costly PIL colour ops (hue via tables of PIL's own HSV conversion,
  brightness / contrast as one lookup); (3) uint8 views, normalised on the device
  (:func:`normalize_uint8`, called by :meth:`pretrain.methods.ContrastiveMethod.forward`).
* :class:`ResumableDistributedSampler` + :class:`ResumableLoader` and the builders
  :func:`build_train_loader` / :func:`build_eval_loader` -- distributed-aware loaders; the training
  loader iterates epoch after epoch (calling ``set_epoch``) and its position (epoch, batch) is
  part of the checkpoint.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np
import torch
import torchvision.transforms as T
from detectron2.data.samplers import InferenceSampler
from detectron2.utils import comm
from PIL import Image, ImageEnhance, ImageFilter, ImageStat
from torch.utils.data import DataLoader, Sampler
from torchvision.datasets import ImageFolder

from pretrain.io import UserError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_rgb",
    "RobustImageFolder",
    "open_rgb",
    "moco_v2_transform",
    "MoCoV2Augment",
    "ViewParams",
    "GaussianBlur",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "normalize_uint8",
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


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def moco_v2_transform(
    size: int = 224,
    scale: Tuple[float, float] = (0.2, 1.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> "MoCoV2Augment":
    """MoCo v2 "aug+" (docs/methods.md, "Augmentation"): RandomResizedCrop(size, scale 0.2-1),
    ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, RandomGrayscale p=0.2, GaussianBlur(sigma 0.1-2) p=0.5,
    horizontal flip, normalisation.

    Returns a :class:`MoCoV2Augment`: called on a PIL image it gives the normalised float tensor
    of torchvision's ``Compose`` of those transforms, bit for bit for the same torch RNG state
    (tested). :class:`TwoCropsTransform` around it makes the fast two-view pretraining pipeline
    (one reduced JPEG decode, uint8 output).

    The blur is MoCo's: PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` (:class:`GaussianBlur`),
    with sigma drawn from torch's RNG so that per-sample seeding and exact resume hold; unlike
    torchvision's ``GaussianBlur`` it does not go through a tensor and back (measured on the demo
    data, one core: a whole 64 px view 0.8 ms vs 1.9 ms with torchvision's 13-tap blur).
    """
    return MoCoV2Augment(size, scale, mean, std)


class GaussianBlur:
    """MoCo v2's blur: PIL's ``ImageFilter.GaussianBlur(radius=sigma)``, sigma uniform in
    ``sigma`` drawn from torch's global RNG (seeded per sample by :class:`RobustImageFolder`)."""

    def __init__(self, sigma: Tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def draw(self) -> float:
        """The sigma of one application (one draw from torch's global RNG)."""
        lo, hi = self.sigma
        return lo + (hi - lo) * float(torch.rand(()))

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=self.draw()))

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma})"


# ---- exact, faster versions of torchvision's PIL colour ops ----------------------------------
#
# Each returns the same bytes as torchvision.transforms.functional.adjust_* on an RGB PIL image
# (tests compare them on every colour). Brightness and contrast are PIL blends with a constant
# image, i.e. a per-byte map: it is tabulated by running PIL's own blend on the 256 byte values
# and applied with one ``Image.point``. Hue (PIL's RGB -> HSV -> shift H -> RGB, 1.4 ms per 224 px
# view, the costliest op of aug+) is computed with numpy from small tables that are themselves
# made by PIL's converters (:func:`_hue_tables`); the float arithmetic of PIL's hsv2rgb is
# reproduced in float64 (tested on all 2^24 HSV triples).

_GRADIENT = bytes(range(256))


def _blend_lut(degenerate: int, factor: float) -> List[int]:
    """PIL's ``Image.blend(constant degenerate, x, factor)`` for every byte value x."""
    grad = Image.frombytes("L", (256, 1), _GRADIENT)
    out = Image.blend(Image.new("L", (256, 1), degenerate), grad, factor)
    return list(out.tobytes()) * 3


def _point(img: Image.Image, lut: List[int]) -> Image.Image:
    """``img.point(lut)`` for a table of ints, without ``Image.point``'s per-entry Python
    ``round`` (half the cost of the call at 224 px); falls back to it if PIL's internals move."""
    try:
        return img._new(img.im.point(lut, None))
    except AttributeError:
        return img.point(lut)


def adjust_brightness(img: Image.Image, factor: float) -> Image.Image:
    """= torchvision's ``adjust_brightness`` (PIL ``ImageEnhance.Brightness``) on RGB."""
    return _point(img, _blend_lut(0, factor))


def adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
    """= torchvision's ``adjust_contrast`` (PIL ``ImageEnhance.Contrast``: blend with the mean
    grey level, rounded as PIL rounds it) on RGB."""
    mean = int(ImageStat.Stat(img.convert("L")).mean[0] + 0.5)
    return _point(img, _blend_lut(mean, factor))


def adjust_saturation(img: Image.Image, factor: float) -> Image.Image:
    """torchvision's ``adjust_saturation`` on PIL (``ImageEnhance.Color``), as it is."""
    return ImageEnhance.Color(img).enhance(factor)


def _pil_rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """PIL's RGB -> HSV conversion of ``[n, 3]`` uint8 pixels."""
    im = Image.frombytes("RGB", (rgb.shape[0], 1), np.ascontiguousarray(rgb, np.uint8).tobytes())
    return np.asarray(im.convert("HSV")).reshape(-1, 3)


@functools.lru_cache(maxsize=None)
def _hue_tables() -> Dict[str, Any]:
    """Tables of PIL's RGB <-> HSV conversions (built once per process, ~20 ms).

    rgb -> hsv: V = max; S depends on (max, max - min) only; H on (branch, max - mid,
    max - min) only, where the branch is which channel PIL's code finds to be the max (r, then g,
    then b) and which of the other two is the min (6 cases). Both tables are filled by running
    PIL's converter on one pixel per entry, so they are PIL's values by construction.
    hsv -> rgb: the output is a permutation (given by the sector of H) of (V, p, w) with
    p = round(V * (1 - s)) and w = round(V * a[h, s]); ``a`` holds PIL's float expression
    (``1 - fs*f`` in float32 for odd sectors, ``1 - fs*(1 - f)`` in float64 for even ones).
    """
    span = np.arange(256)
    d, cr = np.meshgrid(span, span, indexing="ij")  # [max - mid, max - min]
    d = np.minimum(d, cr)
    hue = np.empty((6, 256, 256), np.uint8)
    # (position of the max, of the min, of the mid) of the 6 cases, in the order of `case` below
    for c, (cmax, cmin, cmid) in enumerate(
        [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    ):
        px = np.zeros((256 * 256, 3), np.uint8)
        px[:, cmax] = 255
        px[:, cmin] = (255 - cr).reshape(-1)
        px[:, cmid] = (255 - d).reshape(-1)
        hue[c] = _pil_rgb_to_hsv(px)[:, 0].reshape(256, 256)
    vmax, cr = np.meshgrid(span, span, indexing="ij")  # [max, max - min]
    px = np.repeat(np.clip(vmax - cr, 0, 255).reshape(-1, 1), 3, axis=1)
    px[:, 0] = vmax.reshape(-1)
    sat = _pil_rgb_to_hsv(px.astype(np.uint8))[:, 1].copy()
    # hsv2rgb's floats, as PIL's C code computes them
    h = span.astype(np.float64)
    i = np.floor(h * 6.0 / 255.0)
    f = (h * 6.0 / 255.0 - i).astype(np.float32)
    sector = i.astype(np.int64) % 6
    fs = (span / 255.0).astype(np.float32)
    odd = (sector % 2 == 1)[:, None]
    m_odd = (fs[None, :] * f[:, None]).astype(np.float64)  # float32 product
    m_even = fs[None, :].astype(np.float64) * (1.0 - f[:, None].astype(np.float64))
    a = 1.0 - np.where(odd, m_odd, m_even)  # [h, s]
    p = np.floor(span[None, :] * (1.0 - fs[:, None].astype(np.float64)) + 0.5)  # [s, v]
    # first H of sectors 1..5 (H = 255 is sector 6 % 6 = 0)
    starts = tuple(int(np.argmax(sector == k)) for k in range(1, 6))
    return {
        "hue": hue.reshape(-1),
        "sat": sat,
        "a": a.reshape(-1),
        "p": p.astype(np.uint8).reshape(-1),
        "starts": starts,
    }


def _rgb_to_hsv(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, ...]:
    """PIL's RGB -> HSV of flat uint8 planes, as uint8 planes ``(h, s, v)``."""
    t = _hue_tables()
    u8 = np.uint8
    vmax = np.maximum(np.maximum(r, g), b)
    vmin = np.minimum(np.minimum(r, g), b)
    cr = vmax - vmin
    d = vmax - (r + g + b - vmax - vmin)  # max - mid (uint8 arithmetic mod 256, exact)
    rmax = (r == vmax).view(u8)
    gmax = (g == vmax).view(u8)
    rmin = (r == vmin).view(u8)
    gmin = (g == vmin).view(u8)
    # case: 0/1 r is the max (g / b the min), 2/3 g (r / b), 4/5 b (r / g), PIL's precedence
    other = u8(5) - gmax - gmax - rmin
    case = other - rmax * (other - (u8(1) - gmin))
    # table keys in the narrowest integer type that holds them (cheapest to build and to take)
    key = case.astype(np.uint32)
    key <<= 8
    key |= d
    key <<= 8
    key |= cr
    h = t["hue"].take(key)
    return h, t["sat"].take(_key16(vmax, cr)), vmax


def _key16(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """``high * 256 + low`` of two uint8 planes, as uint16."""
    key = high.astype(np.uint16)
    key <<= 8
    key |= low
    return key


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> Tuple[np.ndarray, ...]:
    """PIL's HSV -> RGB of flat uint8 planes, as uint8 planes ``(r, g, b)``."""
    t = _hue_tables()
    u8 = np.uint8
    key = h.astype(np.intp)
    key <<= 8
    key |= s
    x = t["a"].take(key)  # (float64 tables: an intp key takes 7x faster than a uint16 one)
    x *= v
    x += 0.5  # round half up = C's round() here (all values >= 0; exhaustively tested)
    w = np.floor(x, out=x).astype(u8)
    p = t["p"].take(_key16(s, v))
    vw = v - w
    wp = w - p
    s1, s2, s3, s4, s5 = t["starts"]
    lo1, lo2, lo3, lo4, lo5, top = h < s1, h < s2, h < s3, h < s4, h < s5, h == 255
    out = []
    # per output channel: where it is V and where p (elsewhere w), by sector
    # r: V in 0, 5; p in 2, 3.  g: V in 1, 2; p in 4, 5.  b: V in 3, 4; p in 0, 1 (H=255: 0)
    for is_v, is_p in (
        (lo1 | ~lo5, ~lo2 & lo4),
        (~lo1 & lo3, ~lo4 & ~top),
        (~lo3 & lo5, lo2 | top),
    ):
        c = w + is_v.view(u8) * vw
        c -= is_p.view(u8) * wp
        out.append(c)
    return tuple(out)


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """= torchvision's ``adjust_hue`` on an RGB PIL image (PIL HSV, H shifted by
    ``int(hue_factor * 255)`` mod 256), 2-3x faster."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5].")
    planes = [np.asarray(band).reshape(-1) for band in img.split()]
    h, s, v = _rgb_to_hsv(*planes)
    h += np.int32(hue_factor * 255).astype(np.uint8)  # torchvision's wrap-around shift
    bands = [Image.frombuffer("L", img.size, c, "raw", "L", 0, 1) for c in _hsv_to_rgb(h, s, v)]
    return Image.merge("RGB", bands)


# ---- the aug+ pipeline -----------------------------------------------------------------------


class ViewParams(NamedTuple):
    """Every random choice of one aug+ view, drawn before any pixel is touched."""

    box: Tuple[int, int, int, int]  # crop (top, left, height, width) in full-image pixels
    jitter: Optional[Tuple[List[int], float, float, float, float]]  # order, b, c, s, h
    gray: bool
    sigma: Optional[float]  # blur sigma, None = no blur
    flip: bool


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


class MoCoV2Augment:
    """MoCo v2 aug+ for one view (see :func:`moco_v2_transform`), split into :meth:`sample` (all
    random draws, from torch's global RNG in exactly the order and with exactly the calls of
    torchvision's ``Compose`` of ``RandomResizedCrop``, ``RandomApply(ColorJitter)``,
    ``RandomGrayscale``, ``RandomApply(GaussianBlur)`` and ``RandomHorizontalFlip``) and
    :meth:`render` (the pixels, uint8). No random draw depends on pixels, only on the image size,
    so both views' crops are known before the file is decoded (:meth:`draft_factor`).
    """

    ratio = (3.0 / 4.0, 4.0 / 3.0)

    def __init__(
        self,
        size: int = 224,
        scale: Tuple[float, float] = (0.2, 1.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.size = int(size)
        self.scale = tuple(scale)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.1)  # holds torchvision's factor ranges
        self.blur = GaussianBlur((0.1, 2.0))
        self.p_jitter, self.p_gray, self.p_blur, self.p_flip = 0.8, 0.2, 0.5, 0.5

    def sample(self, width: int, height: int) -> ViewParams:
        """Draw one view's parameters for a ``width`` x ``height`` image."""
        shape_only = torch.empty((1, 1, 1)).expand(3, height, width)  # what get_params reads
        box = T.RandomResizedCrop.get_params(shape_only, list(self.scale), list(self.ratio))
        jitter = None
        if not self.p_jitter < torch.rand(1):  # RandomApply
            j = self._jitter
            order, *factors = T.ColorJitter.get_params(
                j.brightness, j.contrast, j.saturation, j.hue
            )
            jitter = (order.tolist(), *factors)
        gray = bool(torch.rand(1) < self.p_gray)  # RandomGrayscale
        sigma = None if self.p_blur < torch.rand(1) else self.blur.draw()  # RandomApply
        flip = bool(torch.rand(1) < self.p_flip)  # RandomHorizontalFlip
        return ViewParams(box, jitter, gray, sigma, flip)

    def draft_factor(self, views: Sequence[ViewParams]) -> int:
        """The JPEG reduction (1, 2, 4 or 8) that :meth:`render` of ``views`` can use.

        The largest ``s`` such that every crop still spans at least ``size`` decoded pixels
        along both sides, i.e. the crop's resize stays a downscaling from the reduced decode, as
        it is from the full one. The crop itself does not change: it is drawn on the full size
        (read from the JPEG header) and mapped to the reduced image by the exact factor 1/s
        (libjpeg's scaled IDCT maps full pixels [s*x, s*x + s) to decoded pixel x), so it covers
        the same part of the scene, to the sub-pixel. What differs is only how the output pixels
        are filtered: libjpeg's DCT-domain 1/s reduction followed by PIL's antialiased bilinear
        reduction by ``(crop / s) / size >= 1``, instead of one bilinear reduction by
        ``crop / size >= s``; both low-pass the crop to the output grid, so no view loses
        resolution, and the crop's edge pixels are filtered with their true neighbours instead of
        PIL's clamped edge. Measured on a photograph (scikit-image's astronaut at 500 x 375 to
        2048 x 1536, views of 64-224 px, same seeds): mean absolute difference to the full-decode
        view 0.3-0.8 grey levels (of 255), at most 2.5 for a single view; the bound tested in
        tests/pretrain/test_data_pipeline.py is a mean < 1.5. This is smaller than one step of
        the jitter's brightness range (x0.6-1.4), and the view is blurred with sigma up to 2 half
        the time anyway. A crop of less than ``2 * size`` pixels on a side always decodes at full
        size, so at 224 px ImageNet's typical 500 x 375 images are never reduced (their largest
        crop side is 375 < 448); larger images are.
        """
        side = min(min(v.box[2], v.box[3]) for v in views)
        for s in (8, 4, 2):
            if side >= s * self.size:
                return s
        return 1

    def render(self, img: Image.Image, view: ViewParams, factor: int = 1) -> torch.Tensor:
        """The view as a uint8 ``[3, size, size]`` tensor; ``img`` (RGB; other modes are
        converted) is the decode reduced by ``factor`` (crop coordinates are divided by it)."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        top, left, h, w = view.box
        if factor == 1:  # torchvision's resized_crop: crop, then BILINEAR (antialiased) resize
            out = img.crop((left, top, left + w, top + h))
            out = out.resize((self.size, self.size), Image.BILINEAR)
        else:  # the same region of the reduced decode, in fractional pixels
            box = (left / factor, top / factor, (left + w) / factor, (top + h) / factor)
            out = img.resize((self.size, self.size), Image.BILINEAR, box=box)
        if view.jitter is not None:
            order, *factors = view.jitter
            for k in order:
                out = _JITTER_OPS[k](out, factors[k])
        if view.gray:
            out = out.convert("L").convert("RGB")
        if view.sigma is not None:
            out = out.filter(ImageFilter.GaussianBlur(radius=view.sigma))
        if view.flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        # planar copy band by band (4x faster than permuting an HWC uint8 tensor)
        return torch.from_numpy(np.stack([np.asarray(band) for band in out.split()]))

    def normalize(self, view: torch.Tensor) -> torch.Tensor:
        """uint8 ``[..., 3, H, W]`` -> float32, ``(x / 255 - mean) / std`` (same ops as
        ``ToTensor`` + ``Normalize``, so the same numbers)."""
        return normalize_uint8(view, self.mean, self.std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """One view as a normalised float tensor (= torchvision's ``Compose``, bit for bit)."""
        return self.normalize(self.render(img, self.sample(*img.size)))

    def __repr__(self) -> str:
        return (
            f"MoCoV2Augment(size={self.size}, scale={self.scale}, jitter=ColorJitter(0.4, 0.4, "
            f"0.4, 0.1) p={self.p_jitter}, gray p={self.p_gray}, {self.blur!r} p={self.p_blur}, "
            f"flip p={self.p_flip})"
        )


_NORM_CONSTANTS: Dict[Tuple[Any, ...], Tuple[torch.Tensor, torch.Tensor]] = {}


def normalize_uint8(
    x: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 images ``[..., 3, H, W]`` -> float32 ``(x / 255 - mean) / std`` on ``x``'s device
    (the model's, in :meth:`pretrain.methods.ContrastiveMethod.forward`).

    The same three operations as torchvision's ``ToTensor`` (``float().div(255)``) and
    ``Normalize`` (``sub_(mean).div_(std)``), each correctly rounded in float32, so the result is
    the float CPU pipeline's (bit-identical on CPU, tested; CUDA's float32 division is IEEE-exact
    too unless built with fast math). The memory format of ``x`` is kept (channels_last). The
    mean / std tensors are cached per device.
    """
    key = (str(x.device), tuple(mean), tuple(std))
    consts = _NORM_CONSTANTS.get(key)
    if consts is None:
        consts = tuple(
            torch.as_tensor(v, dtype=torch.float32).view(3, 1, 1).to(x.device) for v in (mean, std)
        )
        _NORM_CONSTANTS[key] = consts
    m, s = consts
    return x.to(torch.float32).div_(255).sub_(m).div_(s)


class TwoCropsTransform:
    """Two independent augmentations of one image: ``[query view, key view]`` (MoCo).

    Around a :class:`MoCoV2Augment` with ImageNet's mean / std (what :func:`moco_v2_transform`
    gives by default) it is the fast pretraining pipeline: the views come out as uint8
    ``[3, size, size]`` tensors (normalised on the device by the method's ``forward``, 4x fewer
    bytes to collate, pin and copy), and :meth:`load` decodes a JPEG file once, reduced as far as
    both crops allow (:meth:`MoCoV2Augment.draft_factor`). The random draws are those of applying
    the float pipeline to view 1 then to view 2, so for a given seed the views equal the float
    pipeline's up to the normalisation (exactly, when the decode is not reduced). Any other base
    transform is applied twice, as in MoCo.
    """

    def __init__(self, base_transform: Callable) -> None:
        self.base_transform = base_transform
        self.uint8 = (
            isinstance(base_transform, MoCoV2Augment)
            and np.allclose(base_transform.mean, IMAGENET_MEAN)
            and np.allclose(base_transform.std, IMAGENET_STD)
        )

    def __call__(self, img: Image.Image) -> List[torch.Tensor]:
        if not self.uint8:
            return [self.base_transform(img), self.base_transform(img)]
        aug = self.base_transform
        views = [aug.sample(*img.size), aug.sample(*img.size)]
        return [aug.render(img, v) for v in views]

    def load(self, path: str) -> List[torch.Tensor]:
        """The two views of the image file ``path``: one decode (reduced when both crops allow
        it), the crops drawn on the full size from the file's header."""
        if not self.uint8:
            return self(load_rgb(path))
        aug = self.base_transform
        views: List[ViewParams] = []

        def plan(width: int, height: int) -> int:
            views[:] = [aug.sample(width, height), aug.sample(width, height)]
            return aug.draft_factor(views)

        img, factor = open_rgb(path, plan)
        return [aug.render(img, v, factor) for v in views]

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
