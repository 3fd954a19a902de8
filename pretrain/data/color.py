"""Exact, faster versions of torchvision's PIL colour ops (brightness, contrast, saturation, hue):
the same bytes as ``torchvision.transforms.functional.adjust_*`` on an RGB image (tested)."""

from __future__ import annotations

import functools
import logging
from typing import (
    Any,
    Dict,
    List,
    Optional,
    Tuple,
)

import numpy as np
from PIL import Image, ImageEnhance


logger = logging.getLogger(__name__)

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
    # w = floor(v * a + 0.5) in float64 equals (v * A + 2^23) >> 24 in uint32 with
    # A = round(a * 2^24) for all 2^24 (h, s, v) (tested exhaustively; 0 <= a <= 1, so the sum
    # stays below 255 * 2^24 + 2^23 < 2^32)
    a24 = np.round(a * float(1 << 24)).astype(np.uint32)
    p = np.floor(span[None, :] * (1.0 - fs[:, None].astype(np.float64)) + 0.5)  # [s, v]
    # first H of sectors 1..5 (H = 255 is sector 6 % 6 = 0)
    starts = tuple(int(np.argmax(sector == k)) for k in range(1, 6))
    p = p.astype(np.uint8)
    # S and hsv2rgb's p of every (max, max - min) in one uint16 (S low byte, p high byte), so
    # that adjust_hue looks both up at once
    sat_p = sat.astype(np.uint16) | (p[sat, vmax.reshape(-1)].astype(np.uint16) << 8)
    return {
        "hue": hue.reshape(-1),
        "sat": sat,
        "sat_p": sat_p,
        "a": a.reshape(-1),
        "a24": a24.reshape(-1),
        "p": p.reshape(-1),
        "starts": starts,
    }


def _rgb_to_hsvp(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, ...]:
    """PIL's RGB -> HSV of flat uint8 planes, as uint8 planes ``(h, s, v, p)``, where ``p`` is
    PIL's hsv2rgb ``round(v * (1 - s / 255))`` (independent of h, so a hue shift keeps it)."""
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
    s_p = t["sat_p"].take(_key16(vmax, cr)).view(u8).reshape(-1, 2)  # little-endian: (S, p)
    low, high = (0, 1) if np.little_endian else (1, 0)
    s, p = s_p[:, low].copy(), s_p[:, high].copy()  # contiguous: cheaper to use below
    return h, s, vmax, p


def _rgb_to_hsv(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, ...]:
    """PIL's RGB -> HSV of flat uint8 planes, as uint8 planes ``(h, s, v)``."""
    return _rgb_to_hsvp(r, g, b)[:3]


def _key16(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """``high * 256 + low`` of two uint8 planes, as uint16."""
    key = high.astype(np.uint16)
    key <<= 8
    key |= low
    return key


def _hsv_to_rgb(
    h: np.ndarray, s: np.ndarray, v: np.ndarray, p: Optional[np.ndarray] = None
) -> Tuple[np.ndarray, ...]:
    """PIL's HSV -> RGB of flat uint8 planes, as uint8 planes ``(r, g, b)`` (``p``: the plane
    :func:`_rgb_to_hsvp` gives, if known)."""
    t = _hue_tables()
    u8 = np.uint8
    key = h.astype(np.intp)
    key <<= 8
    key |= s
    x = t["a24"].take(key)  # (an intp key takes several times faster than a uint16 one)
    x *= v
    x += np.uint32(1 << 23)  # round half up = C's round() here (exhaustively tested)
    x >>= np.uint32(24)
    w = x.astype(u8)
    if p is None:
        p = t["p"].take(_key16(s, v))
    # the output is a permutation of (V, p, w) given by the sector of H (H = 255: sector 0):
    # r: V in sectors 0, 5; p in 2, 3.  g: V in 1, 2; p in 4, 5.  b: V in 3, 4; p in 0, 1
    # ge[k]: sector >= k (k = 1..5; H = 255 is counted in ge5 too, and `top` takes it out)
    ge1, ge2, ge3, ge4, ge5 = (h >= k for k in t["starts"])
    top = h == 255
    vw = v - w  # channel = w + [is V] * (v - w) - [is p] * (w - p), in uint8 (mod 256, exact)
    wp = w - p
    out = []
    for not_v, is_v, is_p, not_p in (
        (ge1 ^ ge5, None, ge2 ^ ge4, None),
        (None, ge1 ^ ge3, ge4 ^ top, None),
        (None, ge3 ^ ge5, None, ge2 ^ top),
    ):
        if not_v is not None:  # is V = not not_v
            c = v - not_v.view(u8) * vw
        else:
            c = w + is_v.view(u8) * vw
        if is_p is not None:
            c -= is_p.view(u8) * wp
        else:  # is p = not not_p (and never V there)
            c -= wp
            c += not_p.view(u8) * wp
        out.append(c)
    return tuple(out)


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """= torchvision's ``adjust_hue`` on an RGB PIL image (PIL HSV, H shifted by
    ``int(hue_factor * 255)`` mod 256), 2-3x faster."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5].")
    planes = [np.frombuffer(img.tobytes("raw", c), np.uint8) for c in "RGB"]
    h, s, v, p = _rgb_to_hsvp(*planes)
    h += np.int32(hue_factor * 255).astype(np.uint8)  # torchvision's wrap-around shift
    rgb = _hsv_to_rgb(h, s, v, p)
    bands = [Image.frombuffer("L", img.size, c, "raw", "L", 0, 1) for c in rgb]
    return Image.merge("RGB", bands)
