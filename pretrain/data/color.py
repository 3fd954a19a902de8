"""Faster versions of torchvision's PIL colour ops (brightness, contrast, saturation, hue):
brightness, contrast and saturation give the same bytes as
``torchvision.transforms.functional.adjust_*`` on an RGB image; hue rounds as OpenCV does (tested
bounds; docs/methods.md, "Augmentation")."""

from __future__ import annotations

from typing import Any, List

import numpy as np
from PIL import Image, ImageEnhance

# Brightness and contrast are PIL blends with a constant image, i.e. a per-byte map: it is
# tabulated by running PIL's own blend on the 256 byte values and applied with one
# ``Image.point``. Hue (RGB -> HSV -> shift H -> RGB, 0.7 ms per 224 px view with PIL's
# converters, the costliest op of aug+) uses OpenCV's converters.

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
    return _point(img, _blend_lut(_mean_grey(img), factor))


_LEVELS = np.arange(256, dtype=np.int64)


def _mean_grey(img: Image.Image) -> int:
    """``int(ImageStat.Stat(img.convert("L")).mean[0] + 0.5)``, the grey level PIL's
    ``ImageEnhance.Contrast`` blends with: the same integer sum and count of the histogram and
    the same (correctly rounded) division, without ImageStat's Python loops."""
    hist = np.asarray(img.convert("L").histogram(), dtype=np.int64)
    count = int(hist.sum())
    return int((int(hist @ _LEVELS) / count if count else 0) + 0.5)


def adjust_saturation(img: Image.Image, factor: float) -> Image.Image:
    """torchvision's ``adjust_saturation`` on PIL (``ImageEnhance.Color``), as it is."""
    return ImageEnhance.Color(img).enhance(factor)


_CV2: Any = None


def cv2_module() -> Any:
    """OpenCV, imported on first use and set to one thread (``cv2.setNumThreads(1)``) in the
    process that runs the augmentation: a loader worker is one process per core already (as
    ``torch.set_num_threads(1)`` in the loader's ``worker_init_fn``), a main process that loads
    (``num_workers=0``) leaves its other cores to the model, and the bench times one core.
    Processes that never augment (detectron2's, which import OpenCV too) keep their setting."""
    global _CV2
    if _CV2 is None:
        import cv2

        cv2.setNumThreads(1)
        _CV2 = cv2
    return _CV2


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision's ``adjust_hue`` on an RGB PIL image (8-bit HSV, H shifted by
    ``int(hue_factor * 255)`` mod 256, back to RGB) with OpenCV's SIMD RGB <-> HSV_FULL
    conversions (H in 0-255 as PIL's) instead of PIL's: 4x faster (0.17 vs 0.71 ms per 224 px
    view). The two conversions round differently: 0.3-0.6 grey levels on average on photographs,
    1.1 (at most 13) over all 2^24 colours (docs/methods.md, "Augmentation"; the bounds are
    tested)."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5].")
    cv2 = cv2_module()
    hsv = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.int32(hue_factor * 255).astype(np.uint8)  # torchvision's wrap-around shift
    return Image.fromarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL))
