"""The MoCo v2 "aug+" pipeline built for speed (:class:`MoCoV2Augment`, uint8 two-view output,
:func:`normalize_uint8` on the device) and the evaluation / linear-eval transforms
(docs/methods.md, "Augmentation")."""

from __future__ import annotations

import logging
import math
from typing import (
    Any,
    Callable,
    Dict,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
)

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from pretrain.data.color import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    cv2_module,
)
from pretrain.data.datasets import IMAGENET_MEAN, IMAGENET_STD, open_rgb, load_rgb

logger = logging.getLogger(__name__)

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
    of torchvision's ``Compose`` of those transforms (with :class:`GaussianBlur` as the blur),
    bit for bit for the same torch RNG state (tested). :class:`TwoCropsTransform` around it
    makes the fast two-view pretraining pipeline (one reduced JPEG decode, uint8 output).

    The blur is a true Gaussian of the drawn sigma (OpenCV, :func:`gaussian_blur`), as
    torchvision's ``GaussianBlur`` used by SimCLR / BYOL, where MoCo applies PIL's
    ``ImageFilter.GaussianBlur(radius=sigma)``, a three-pass box approximation of it: same sigma
    distribution, same probability, and pixel differences far below those between two sigma
    draws (docs/methods.md, "Augmentation"). Sigma is drawn from torch's RNG so that per-sample
    seeding and exact resume hold.
    """
    return MoCoV2Augment(size, scale, mean, std)


def blur_kernel_size(sigma: float) -> int:
    """The odd kernel width of :func:`gaussian_blur`: ``2 * ceil(3 sigma) + 1`` (+-3 sigma, what
    OpenCV itself picks for 8-bit images; +-4 sigma is 1.4x slower at sigma 2 and changes a view
    by 0.01 grey levels on average, measured on the bench photos)."""
    return 2 * math.ceil(3.0 * sigma) + 1


def gaussian_blur(array: np.ndarray, sigma: float) -> np.ndarray:
    """A true Gaussian blur of standard deviation ``sigma`` of a uint8 ``[H, W]`` or
    ``[H, W, C]`` array (a new array): ``cv2.GaussianBlur`` with a :func:`blur_kernel_size`
    kernel and ``BORDER_REFLECT`` edges (``cba|abc``), the border closest to PIL's blur, which
    clamps the line at the edge pixel in each of its box passes (measured on the bench photos,
    sigma 0.5-2: mean absolute difference to PIL in the outer 3 rows and columns 0.39 grey
    levels, against 0.51 with ``BORDER_REPLICATE`` and 0.86 with OpenCV's default
    ``BORDER_REFLECT_101``). It is 4-9x faster than PIL's ``GaussianBlur`` on a 224 px RGB view
    (sigma 2 / 1); how its output differs from PIL's (MoCo's) is in docs/methods.md,
    "Augmentation"."""
    cv2 = cv2_module()
    k = blur_kernel_size(sigma)
    return cv2.GaussianBlur(
        array, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT
    )


class GaussianBlur:
    """The aug+ blur as a PIL-image transform: :func:`gaussian_blur` with sigma uniform in
    ``sigma``, drawn from torch's global RNG (seeded per sample by :class:`RobustImageFolder`).
    :class:`MoCoV2Augment` makes the same draw (:meth:`draw`) and the same blur on arrays."""

    def __init__(self, sigma: Tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def draw(self) -> float:
        """The sigma of one application (one draw from torch's global RNG)."""
        lo, hi = self.sigma
        return lo + (hi - lo) * float(torch.rand(()))

    def __call__(self, img: Image.Image) -> Image.Image:
        return Image.fromarray(gaussian_blur(np.asarray(img), self.draw()), img.mode)

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma})"


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
        # torchvision's float32 log(ratio), as the Python floats uniform_ receives
        self._log_ratio = tuple(float(x) for x in torch.log(torch.tensor(self.ratio)))

    def sample(self, width: int, height: int) -> ViewParams:
        """Draw one view's parameters for a ``width`` x ``height`` image.

        The calls of torchvision's transforms, with less of their per-call overhead (same draws,
        same numbers, same RNG state after; tested against them): the crop is
        :meth:`_crop_box`, and each ``p < torch.rand(1)`` (a float32 comparison) is made on
        Python floats against ``p`` rounded to float32 (:attr:`_thresholds`), which orders every
        float32 draw the same way."""
        box = self._crop_box(width, height)
        p_jitter, p_gray, p_blur, p_flip = self._thresholds
        jitter = None
        if not p_jitter < float(torch.rand(1)):  # RandomApply
            j = self._jitter
            order, *factors = T.ColorJitter.get_params(
                j.brightness, j.contrast, j.saturation, j.hue
            )
            jitter = (order.tolist(), *factors)
        gray = float(torch.rand(1)) < p_gray  # RandomGrayscale
        sigma = None if p_blur < float(torch.rand(1)) else self.blur.draw()  # RandomApply
        flip = float(torch.rand(1)) < p_flip  # RandomHorizontalFlip
        return ViewParams(box, jitter, gray, sigma, flip)

    @property
    def _thresholds(self) -> Tuple[float, float, float, float]:
        """The four probabilities as float32 values (what torch compares a draw with)."""
        ps = (self.p_jitter, self.p_gray, self.p_blur, self.p_flip)
        return tuple(float(np.float32(p)) for p in ps)  # type: ignore[return-value]

    def _crop_box(self, width: int, height: int) -> Tuple[int, int, int, int]:
        """``T.RandomResizedCrop.get_params`` for a ``width`` x ``height`` image: the same torch
        calls in the same order on the same numbers, without building an image-shaped tensor
        and ``log(ratio)`` on every call."""
        area = height * width
        scale_lo, scale_hi = self.scale
        log_lo, log_hi = self._log_ratio
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(scale_lo, scale_hi).item()
            aspect_ratio = torch.exp(torch.empty(1).uniform_(log_lo, log_hi)).item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,)).item()
                j = torch.randint(0, width - w + 1, size=(1,)).item()
                return i, j, h, w
        # fallback: torchvision's central crop (no draws)
        in_ratio = float(width) / float(height)
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

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

    def resized_crop(self, img: Image.Image, view: ViewParams, factor: int = 1) -> Image.Image:
        """The view's crop of ``img`` resized to ``size`` x ``size`` (RGB; other modes are
        converted); ``img`` is the decode reduced by ``factor`` (crop coordinates are divided by
        it). The first step of :meth:`render`, and all the pixel work of the device path's CPU
        share (:class:`pretrain.data.device_augment.TwoCropsDeviceAugment`) but the flip."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        top, left, h, w = view.box
        if factor == 1:  # torchvision's resized_crop: crop, then BILINEAR (antialiased) resize
            out = img.crop((left, top, left + w, top + h))
            return out.resize((self.size, self.size), Image.BILINEAR)
        # the same region of the reduced decode, in fractional pixels
        box = (left / factor, top / factor, (left + w) / factor, (top + h) / factor)
        return img.resize((self.size, self.size), Image.BILINEAR, box=box)

    def render(self, img: Image.Image, view: ViewParams, factor: int = 1) -> torch.Tensor:
        """The view as a uint8 ``[3, size, size]`` tensor; ``img`` (RGB; other modes are
        converted) is the decode reduced by ``factor`` (crop coordinates are divided by it)."""
        out = self.resized_crop(img, view, factor)
        if view.jitter is not None:
            order, *factors = view.jitter
            for k in order:
                out = _JITTER_OPS[k](out, factors[k])
        # From here on every op works on each band alone, so a grey view goes on as its single
        # L band (``convert("L").convert("RGB")`` makes three copies of it: same bytes, a third
        # of the blur), a blurred colour view as an [H, W, 3] array; the flip is done by the
        # final planar copy.
        if view.gray:
            arr: Optional[np.ndarray] = np.asarray(out.convert("L"))
        elif view.sigma is not None:
            arr = np.asarray(out)
        else:
            arr = None
        if view.sigma is not None:
            arr = gaussian_blur(arr, view.sigma)
        return _planar(out, arr, view.flip)

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


def _planar(img: Image.Image, arr: Optional[np.ndarray], flip: bool) -> torch.Tensor:
    """uint8 ``[3, H, W]`` of an RGB image, or of ``arr`` when given (``[H, W]``: a grey view,
    repeated; ``[H, W, 3]``), mirrored left-right if ``flip``; one copy per plane."""
    width, height = img.size
    out = np.empty((3, height, width), np.uint8)
    if arr is not None and arr.ndim == 3:
        out[:] = arr.transpose(2, 0, 1)[:, :, ::-1] if flip else arr.transpose(2, 0, 1)
        return torch.from_numpy(out)
    if arr is None:
        planes = [
            np.frombuffer(img.tobytes("raw", c), np.uint8).reshape(height, width) for c in "RGB"
        ]
    else:
        planes = [arr]
    for i in range(3):
        plane = planes[i % len(planes)]
        out[i] = plane[:, ::-1] if flip else plane
    return torch.from_numpy(out)


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
        return [self.render(img, v) for v in views]

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
        return [self.render(img, v, factor) for v in views]

    def render(self, img: Image.Image, view: ViewParams, factor: int = 1) -> Any:
        """One view of the (reduced) decode ``img``: :meth:`MoCoV2Augment.render`'s uint8 view
        here; the device path's CPU share in
        :class:`pretrain.data.device_augment.TwoCropsDeviceAugment`."""
        return self.base_transform.render(img, view, factor)

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
