"""MoCo v2 aug+ split between the loader and the model's device (``INPUT.DEVICE_AUGMENT``;
docs/methods.md, "Augmentation").

* The CPU share, :class:`TwoCropsDeviceAugment` (in the loader workers): decode, crop + resize and
  flip, as :class:`~pretrain.data.TwoCropsTransform` does them (same bytes), and every random
  draw of the view (:meth:`MoCoV2Augment.sample`: the same torch RNG calls, so the same numbers
  for a sample seed, hence per-sample seeding and exact resume as before). A view is a
  :class:`DeviceView`: its uint8 pixels and its colour / grey / blur parameters
  (:func:`pack_view_params`).
* The device share, :func:`augment_on_device` (in :meth:`ContrastiveMethod.forward`, on the
  model's device): the colour jitter in the drawn order of its four ops, grayscale, the Gaussian
  blur and the normalisation of a whole batch, per-sample parameters, in float32. Every op rounds
  its result to a grey level as the CPU path's uint8 ops do (PIL's blends truncate, the other ops
  round), so brightness, contrast, saturation and grayscale give the CPU path's bytes on the same
  input, and the two paths differ only where the hue and the blur round differently (bounds in
  docs/methods.md, tested in tests/pretrain/test_device_augment.py).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from pretrain.config import DEVICE_AUGMENT_CHOICES
from pretrain.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from pretrain.data.transforms import (
    MoCoV2Augment,
    TwoCropsTransform,
    ViewParams,
    _planar,
    normalize_uint8,
)

__all__ = [
    "DEVICE_AUGMENT_CHOICES",
    "PARAM_NAMES",
    "DeviceView",
    "TwoCropsDeviceAugment",
    "augment_on_device",
    "pack_view_params",
    "two_crops_transform",
    "use_device_augment",
]


# The parameter vector of a view (float64: the drawn numbers exactly). ``order*`` are the
# positions of ColorJitter's ops (0 brightness, 1 contrast, 2 saturation, 3 hue); a view without
# jitter has jitter 0 and the identity factors; sigma 0 = no blur.
PARAM_NAMES = (
    "jitter", "order0", "order1", "order2", "order3",
    "brightness", "contrast", "saturation", "hue", "gray", "sigma",
)  # fmt: skip
_JITTER, _ORDER, _FACTORS, _HUE, _GRAY, _SIGMA = 0, slice(1, 5), slice(5, 8), 8, 9, 10
_NO_JITTER = (0.0, 0.0, 1.0, 2.0, 3.0, 1.0, 1.0, 1.0, 0.0)


class DeviceView(NamedTuple):
    """One view of the device path (batched by the loader's collate: ``[N, ...]`` fields)."""

    image: torch.Tensor  # uint8 [3, S, S]: cropped, resized and flipped; no colour op yet
    params: torch.Tensor  # float64 [len(PARAM_NAMES)]: :func:`pack_view_params`


def pack_view_params(view: ViewParams) -> torch.Tensor:
    """The colour / grey / blur choices of ``view`` as a float64 vector (:data:`PARAM_NAMES`)."""
    if view.jitter is None:
        head = _NO_JITTER
    else:
        order, b, c, s, h = view.jitter
        head = (1.0, *map(float, order), b, c, s, h)
    return torch.tensor((*head, float(view.gray), view.sigma or 0.0), dtype=torch.float64)


def use_device_augment(setting: str, device: torch.device) -> bool:
    """Whether ``INPUT.DEVICE_AUGMENT`` = ``setting`` puts the colour ops, grayscale and blur on
    ``device``: ``"on"``, ``"off"``, or ``"auto"`` = on when ``device`` is CUDA (a CPU run keeps
    the all-CPU path, whose views are bit-for-bit torchvision's)."""
    if setting not in DEVICE_AUGMENT_CHOICES:
        raise ValueError(
            f"INPUT.DEVICE_AUGMENT {setting!r} is unknown; choose one of {DEVICE_AUGMENT_CHOICES}."
        )
    return setting == "on" or (setting == "auto" and torch.device(device).type == "cuda")


class TwoCropsDeviceAugment(TwoCropsTransform):
    """The loader's share of the device path: :class:`TwoCropsTransform` (same draws, same
    decode, same crops) whose views stop after the resize and the flip, each a
    :class:`DeviceView` carrying its drawn parameters; :func:`augment_on_device` does the rest.
    The base transform must be a :class:`MoCoV2Augment` with ImageNet's mean / std (the
    normalisation :func:`augment_on_device` applies)."""

    def __init__(self, base_transform: MoCoV2Augment) -> None:
        super().__init__(base_transform)
        if not self.uint8:
            raise ValueError(
                "TwoCropsDeviceAugment needs a MoCoV2Augment with ImageNet's mean / std "
                f"(moco_v2_transform(size)), got {base_transform!r}."
            )

    def render(self, img: Image.Image, view: ViewParams, factor: int = 1) -> DeviceView:
        out = self.base_transform.resized_crop(img, view, factor)
        return DeviceView(_planar(out, None, view.flip), pack_view_params(view))

    def __repr__(self) -> str:
        return f"TwoCropsDeviceAugment({self.base_transform!r})"


def two_crops_transform(base_transform: MoCoV2Augment, on_device: bool) -> TwoCropsTransform:
    """The pretraining transform: :class:`TwoCropsDeviceAugment` if ``on_device``, else the
    all-CPU :class:`TwoCropsTransform`."""
    return (TwoCropsDeviceAugment if on_device else TwoCropsTransform)(base_transform)


# ---- the device share ------------------------------------------------------------------------


def augment_on_device(
    images: torch.Tensor,
    params: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """The rest of aug+ on a batch of :class:`TwoCropsDeviceAugment` views, on ``images``'
    device: ``images`` uint8 ``[N, 3, H, W]``, ``params`` ``[N, len(PARAM_NAMES)]`` (any device;
    read on the host, one small copy) -> float32 ``[N, 3, H, W]``, ``(x / 255 - mean) / std``.

    In the CPU path's order: ColorJitter's four ops in each view's drawn order (brightness,
    contrast, saturation as PIL's blends with black, the mean grey, the grey image; hue as a
    rotation of the HSV hue by ``int(255 h) / 256`` turn, torchvision's 8-bit shift, computed in
    float where the CPU path goes through 8-bit HSV), grayscale (PIL's ``convert("L")``), the
    Gaussian blur (:func:`gaussian_blur_batch`), normalisation. Batched over views (one loop over
    the four op positions, none over views), float32 with autocast off; a view the jitter, the
    grey and the blur leave alone normalises to :func:`normalize_uint8`'s numbers exactly."""
    host = params.detach().to("cpu", torch.float64)
    with torch.autocast(images.device.type, enabled=False):
        x = images.to(torch.float32)
        x = color_jitter(x, host)
        x = grayscale(x, host[:, _GRAY] > 0)
        x = gaussian_blur_batch(x, host[:, _SIGMA])
        return normalize_uint8(x, mean, std)  # float32 in: the same three ops, in place


def luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")`` of integral RGB levels ``[N, 3, H, W]`` -> ``[N, 1, H, W]``:
    ``(19595 R + 38470 G + 7471 B + 2^15) >> 16`` (exact in float32: every partial sum is an
    integer below 2^24)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (r * 19595 + g * 38470 + b * 7471 + 32768).div_(65536).floor_()


def color_jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ColorJitter with each view's factors and op order (``params`` on the host): at each of
    the four positions, brightness / contrast / saturation as one PIL blend
    ``floor(d + f * (x - d))`` with the view's degenerate image ``d`` (0, the rounded mean grey,
    the grey image; identity for views whose op there is the hue or that have no jitter), then
    :func:`rotate_hue` on the views whose op there is the hue."""
    n = x.shape[0]
    jitter = params[:, _JITTER] > 0
    if not bool(jitter.any()):
        return x
    order = params[:, _ORDER].long()
    factors = params[:, _FACTORS]
    # torchvision's shift: int(h * 255) (truncated) steps of the 256 of an 8-bit hue turn
    steps = torch.trunc(params[:, _HUE] * 255).remainder(256)
    dev = x.device

    def column(v: torch.Tensor) -> torch.Tensor:
        return v.to(device=dev, dtype=torch.float32).view(n, 1, 1, 1)

    for t in range(4):
        op = torch.where(jitter, order[:, t], torch.full_like(order[:, t], -1))
        blend = (op >= 0) & (op < 3)
        if bool(blend.any()):
            f = torch.ones(n, dtype=torch.float64)
            f[blend] = factors[blend, op[blend]]
            grey = luma(x)
            mean_grey = grey.mean(dim=(2, 3), keepdim=True, dtype=torch.float64)
            mean_grey = mean_grey.add_(0.5).floor_().to(torch.float32)  # ImageStat, rounded
            d = grey * column(op == 2) + mean_grey * column(op == 1)
            x = x.sub_(d).mul_(column(f)).add_(d).floor_().clamp_(0, 255)
        hue = (op == 3) & (steps != 0)
        if bool(hue.any()):
            idx = hue.nonzero().flatten()
            turns = (steps[idx] / 256).to(device=dev, dtype=torch.float32)
            idx = idx.to(dev)
            x.index_copy_(0, idx, rotate_hue(x.index_select(0, idx), turns).round_())
    return x


def rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """RGB ``[n, 3, H, W]`` (any range) with the HSV hue of every pixel rotated by ``turns[i]``
    of a full turn (saturation and value kept), in float: RGB -> hue in [0, 6) -> shifted -> RGB
    by ``V - (V - min) * clamp(min(k, 4 - k), 0, 1)``, ``k = (5, 3, 1) + hue`` mod 6."""
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = x.unbind(dim=1)
    rc, gc, bc = ((maxc - c) / safe for c in (r, g, b))
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = h.add_(turns.view(-1, 1, 1) * 6).remainder_(6)
    out = []
    for k0 in (5.0, 3.0, 1.0):
        k = (h + k0).remainder_(6)
        out.append(maxc - delta * torch.minimum(k, 4 - k).clamp_(0, 1))
    return torch.stack(out, dim=1)


def grayscale(x: torch.Tensor, gray: torch.Tensor) -> torch.Tensor:
    """The views where ``gray`` (bool ``[N]``, host) replaced by their :func:`luma` in all three
    channels (PIL's ``convert("L").convert("RGB")``)."""
    if not bool(gray.any()):
        return x
    idx = gray.nonzero().flatten().to(x.device)
    return x.index_copy_(0, idx, luma(x.index_select(0, idx)).expand(-1, 3, -1, -1))


def gaussian_blur_batch(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """:func:`pretrain.data.gaussian_blur` of every view with ``sigma[i] > 0`` (``sigma`` on the
    host), rounded to grey levels: the same sampled Gaussian (``2 ceil(3 sigma) + 1`` taps,
    ``exp(-t^2 / 2 sigma^2)`` normalised, computed in float64 like OpenCV's kernel) and the same
    symmetric edges (``cba|abc``); two depthwise convolutions (rows, then columns), each view's
    kernel zero-padded to the widest of the batch. OpenCV rounds its kernel to 8-bit fixed
    point, this one stays float32."""
    sel = (sigma > 0).nonzero().flatten()
    if sel.numel() == 0:
        return x
    sig = sigma[sel].to(torch.float64)
    radius = torch.ceil(3 * sig)
    r = int(radius.max())
    taps = torch.arange(-r, r + 1, dtype=torch.float64)
    kernel = torch.exp(-(taps**2) / (2 * sig[:, None] ** 2))
    kernel = torch.where(taps.abs() <= radius[:, None], kernel, torch.zeros_like(kernel))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    n, c, h, w = len(sel), x.shape[1], x.shape[2], x.shape[3]
    weight = kernel.to(device=x.device, dtype=torch.float32).repeat_interleave(c, dim=0)
    idx = sel.to(x.device)
    rows = _pad_symmetric(x.index_select(0, idx), r, dim=3).view(1, n * c, h, w + 2 * r)
    sub = F.conv2d(rows, weight.view(n * c, 1, 1, 2 * r + 1), groups=n * c)
    cols = _pad_symmetric(sub.view(n, c, h, w), r, dim=2).view(1, n * c, h + 2 * r, w)
    sub = F.conv2d(cols, weight.view(n * c, 1, 2 * r + 1, 1), groups=n * c)
    return x.index_copy_(0, idx, sub.view(n, c, h, w).round_().clamp_(0, 255))


def _pad_symmetric(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """``x`` extended by ``pad`` mirrored positions on both sides of ``dim`` (``cba|abc``,
    OpenCV's ``BORDER_REFLECT``; repeated reflections where ``pad`` exceeds the size)."""
    size = x.shape[dim]
    if pad <= size:
        left = x.narrow(dim, 0, pad).flip(dim)
        right = x.narrow(dim, size - pad, pad).flip(dim)
        return torch.cat([left, x, right], dim=dim)
    pos = torch.arange(-pad, size + pad).remainder(2 * size)
    pos = torch.where(pos < size, pos, 2 * size - 1 - pos)
    return x.index_select(dim, pos.to(x.device))
