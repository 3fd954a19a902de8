"""A deterministic synthetic detection dataset ("shapes") so every stage runs on a laptop CPU.

Each image has a textured, noisy background and 1-4 filled shapes (circle, square, triangle, star,
cross) with random colours, sizes and rotations; later shapes may partially occlude earlier ones.
Boxes are the tight boxes of the *visible* pixels (COCO convention) and ``area`` is the visible
pixel count.

Like ImageNet (object-centric) and COCO (scenes), the classification view holds one crop per scene,
centred on its largest object and labelled with that object's class, while detection uses the full
scenes. The layout on disk is described in docs/formats.md. Same arguments -> identical bytes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "star", "cross")
SPLITS = ("train", "val")
# An object whose visible part is smaller than this fraction of its full area is removed from the
# image (not just from the labels), so no unlabelled fragments remain.
MIN_VISIBLE_FRACTION = 0.35
# ImageFolder view: the largest object with this much context (x its box's longer side)
CROP_CONTEXT = 1.6


def _polygon(cls: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius ``r`` centred at (cx, cy), rotated by ``angle``."""
    if cls == "circle":
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    elif cls == "square":
        pts = [(math.cos(t), math.sin(t)) for t in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif cls == "triangle":
        pts = [(math.cos(t), math.sin(t)) for t in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif cls == "star":
        radii = [1.0 if i % 2 == 0 else 0.42 for i in range(10)]
        angles = np.arange(10) * math.pi / 5 - math.pi / 2
        pts = [(r * math.cos(t), r * math.sin(t)) for r, t in zip(radii, angles)]
    elif cls == "cross":
        a, b = 1.0 / math.sqrt(2), 0.33 / math.sqrt(2)
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b),
               (-a, b), (-a, -b), (-b, -b)]  # fmt: skip
    else:
        raise ValueError(f"unknown shape class {cls!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _area(poly: list[tuple[float, float]]) -> float:
    """Shoelace formula."""
    edges = zip(poly, poly[1:] + poly[:1])
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in edges))


_UNIT_AREA = {c: _area(_polygon(c, 0.0, 0.0, 1.0, 0.0)) for c in CLASSES}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth colour gradient plus blotches, stripes and pixel noise (uint8 HxWx3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1, c2 = rng.uniform(0, 255, size=(3, 3))
    img = c0 + np.multiply.outer(xx, c1 - c0) * 0.6 + np.multiply.outer(yy, c2 - c0) * 0.4
    # low-frequency blotches: a coarse random grid upsampled
    coarse = rng.uniform(-40, 40, size=(4, 4, 3)).astype(np.float32)
    coarse_img = Image.fromarray(((coarse + 40) * (255 / 80)).astype(np.uint8))
    blotch = (
        np.asarray(coarse_img.resize((size, size), Image.BILINEAR), dtype=np.float32) * (80 / 255)
        - 40
    )
    img = img + blotch
    if rng.random() < 0.5:  # stripes
        freq, phase = rng.uniform(4, 16), rng.uniform(0, 2 * math.pi)
        theta = rng.uniform(0, math.pi)
        stripes = np.sin(freq * 2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
        img = img + 18 * stripes[..., None]
    img = img + rng.normal(0, rng.uniform(4, 14), size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _visible(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each mask when later masks are painted on top of earlier ones."""
    covered = np.zeros_like(masks[0])
    out = []
    for m in reversed(masks):
        out.append(m & ~covered)
        covered |= m
    return out[::-1]


def _render(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One image and its objects: [{"category_id", "bbox" [x, y, w, h], "area"}]."""
    img = Image.fromarray(_background(rng, size))
    shapes = []
    for _ in range(int(rng.integers(1, 5))):
        cls_idx = int(rng.integers(len(CLASSES)))
        # equal-area sizing, so no class is systematically the largest object of an image
        r = rng.uniform(0.08, 0.2) * size * math.sqrt(math.pi / _UNIT_AREA[CLASSES[cls_idx]])
        cx, cy = rng.uniform(r * 0.6, size - r * 0.6, size=2)
        poly = _polygon(CLASSES[cls_idx], cx, cy, r, rng.uniform(0, 2 * math.pi))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        layer = Image.new("L", (size, size), 0)
        ImageDraw.Draw(layer).polygon(poly, fill=255)
        shapes.append((cls_idx + 1, poly, colour, np.asarray(layer) > 0))
    # Drop shapes that are mostly hidden (they are not painted at all); the top-most one always
    # stays. Removing a shape only uncovers the others, so one pass suffices.
    vis = _visible([s[3] for s in shapes])
    shapes = [
        s
        for s, v in zip(shapes, vis)
        if v.any() and v.sum() >= MIN_VISIBLE_FRACTION * s[3].sum()
    ]
    draw = ImageDraw.Draw(img)
    anns = []
    for (category_id, poly, colour, _), v in zip(shapes, _visible([s[3] for s in shapes])):
        draw.polygon(poly, fill=colour)
        ys, xs = np.nonzero(v)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        anns.append(
            {
                "category_id": category_id,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float(v.sum()),
            }
        )
    return img, anns


def _object_crop(img: Image.Image, bbox: list[float]) -> Image.Image:
    """A square crop centred on ``bbox`` with context (CROP_CONTEXT x its longer side), as an
    object-centric ImageNet-style image; parts outside the scene are filled with its mean colour."""
    x, y, w, h = bbox
    side = int(round(max(w, h) * CROP_CONTEXT))
    x0, y0 = int(round(x + w / 2 - side / 2)), int(round(y + h / 2 - side / 2))
    fill = tuple(int(v) for v in np.asarray(img).reshape(-1, 3).mean(0))
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, (-x0, -y0))
    return canvas


def make_shapes(
    out: str,
    num_train: int = 400,
    num_val: int = 100,
    size: int = 128,
    seed: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Write the dataset to ``out`` (layout in docs/formats.md) and return a summary.

    Every image is drawn from its own RNG stream ``(seed, split, index)``, so the bytes depend only
    on the arguments. Refuses to write into a non-empty ``out`` unless ``force`` (which deletes it
    first).
    """
    if size < 32:
        raise ValueError(f"--size {size} is too small; use at least 32 pixels.")
    if num_train < 1 or num_val < 1:
        raise ValueError("--num-train and --num-val must be at least 1.")
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass --force to regenerate it.")
        shutil.rmtree(out)
    categories = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)]
    summary: dict[str, Any] = {"out": out, "size": size, "seed": seed}
    for split_idx, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
        os.makedirs(os.path.join(out, split))
        for c in CLASSES:
            os.makedirs(os.path.join(out, "imagefolder", split, c))
        images, annotations = [], []
        per_class: Counter = Counter()
        for i in range(count):
            rng = np.random.default_rng([seed, split_idx, i])
            img, anns = _render(rng, size)
            fname = f"{i:06d}.jpg"
            img.save(os.path.join(out, split, fname), quality=92)
            images.append({"id": i + 1, "file_name": fname, "width": size, "height": size})
            for a in anns:
                a.update(id=len(annotations) + 1, image_id=i + 1, iscrowd=0)
                annotations.append(a)
            largest = max(anns, key=lambda a: a["area"])
            label = CLASSES[largest["category_id"] - 1]
            per_class[label] += 1
            _object_crop(img, largest["bbox"]).save(
                os.path.join(out, "imagefolder", split, label, fname), quality=92
            )
        os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
        with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(
                {
                    "info": {"description": "shapes: synthetic detection dataset", "seed": seed},
                    "images": images,
                    "annotations": annotations,
                    "categories": categories,
                },
                f,
            )
        summary[split] = {
            "images": count,
            "objects": len(annotations),
            "imagefolder_classes": dict(sorted(per_class.items())),
        }
    return summary
