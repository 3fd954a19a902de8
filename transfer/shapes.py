"""A deterministic synthetic detection dataset ("shapes") so every stage runs on a laptop CPU.

Each scene has 1-4 filled shapes (circle, square, triangle, star, cross) of random sizes and
rotations on a background; later shapes may partially occlude earlier ones. Boxes are the tight
boxes of the *visible* pixels (COCO convention) and ``area`` is the visible pixel count. Like
ImageNet (object-centric) next to COCO (scenes), an ImageFolder view serves pretraining and linear
evaluation while detection uses the scenes. Two styles:

* ``grey`` (default): bright shapes on a dark background with pixel noise, grey levels in narrow
  ranges (GREY_OBJECT, GREY_BACKGROUND), and every shape with its own silhouette (a random stretch
  and a smooth wobble, :func:`_deform`). The ImageFolder view holds single-shape images of their
  own (larger shapes anywhere in the image; classes in turn). Two augmented crops of one image
  then share nothing the MoCo v2 augmentation leaves intact except the shape: noise is drawn per
  pixel, the colour jitter moves grey levels by more than images differ, and the polarity is
  fixed. Self-supervised instance discrimination has to encode the shape, which is what the
  classes are: the style on which contrastive pretraining beats a random-init backbone within CPU
  minutes (docs/results.md, "Does the pretraining learn?").
* ``colour``: a textured colour background (gradient, blotches, stripes), shapes of random
  colours, and as ImageFolder view one crop of each scene's largest object. Two crops of one image
  share its background and colours, a shortcut that lets instance discrimination ignore the
  shapes: contrastive features trained on it probe below a random-init network (kept to reproduce
  that measurement).

Each object also has its instance mask, the visible pixels as COCO RLE (``segmentation``), for
Mask R-CNN; and the scenes are also written as a Pascal VOC copy (:func:`_write_voc`: a "VOC2007"
with trainval + test and a "VOC2012" with trainval, as the 07+12 protocol), so that every detection
benchmark runs on them. Neither changes the images or boxes a seed draws.

The layout on disk is described in docs/formats.md. Same arguments -> identical bytes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from typing import Any
from xml.etree import ElementTree as ET

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "star", "cross")
SPLITS = ("train", "val")
# An object whose visible part is smaller than this fraction of its full area is removed from the
# image (not just from the labels), so no unlabelled fragments remain.
MIN_VISIBLE_FRACTION = 0.35
# colour style's ImageFolder view: the largest object with this much context (x its box's side)
CROP_CONTEXT = 1.6
STYLES = ("grey", "colour")
# grey style: background and object grey levels (ranges as for rng.integers; narrower than the
# colour jitter's +-40% moves them, so they are no instance cue), the smallest object-background
# difference, and the std of the background's pixel noise
GREY_BACKGROUND = (30, 71)
GREY_OBJECT = (180, 221)
MIN_CONTRAST = GREY_OBJECT[0] - GREY_BACKGROUND[1] + 1
GREY_NOISE = 8.0
# grey style: each object's own silhouette (_deform)
STRETCH = 1.35
DEFORM = 0.12
# radius of a shape of the area of a circle of this radius, as a fraction of the image side: in
# scenes, and in the grey style's single-object classification images
OBJECT_RADIUS = (0.08, 0.2)
OBJECT_RADIUS_SINGLE = (0.2, 0.35)
# The Pascal VOC copy (_write_voc): the first VOC2007_SHARE of the train scenes are "VOC2007"
# trainval, the others "VOC2012" trainval (the real sets' 5011 and 11540 images), the val scenes
# "VOC2007" test. Image ids are "<split>_<index>", the COCO split and file name.
VOC2007_SHARE = 5011 / (5011 + 11540)


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


def _deform(
    rng: np.random.Generator, poly: list[tuple[float, float]], cx: float, cy: float
) -> list[tuple[float, float]]:
    """The polygon with its own silhouette: a random stretch (aspect 1/STRETCH..STRETCH along a
    random axis) and a smooth radial wobble (2nd and 3rd harmonics, DEFORM each). Every instance
    then differs in shape from the others of its class, a cue that survives crops and colour
    jitter (rotation alone does not: flips mirror it and circles have none)."""
    axis = rng.uniform(0, math.pi)
    stretch = math.exp(rng.uniform(-1, 1) * math.log(STRETCH))
    amps, phases = rng.uniform(0, DEFORM, size=2), rng.uniform(0, 2 * math.pi, size=2)
    out = []
    for x, y in poly:
        dx, dy = x - cx, y - cy
        t = math.atan2(dy, dx)
        f = 1.0 + sum(a * math.cos(k * t + p) for a, k, p in zip(amps, (2, 3), phases))
        dx, dy = dx * f, dy * f
        # stretch along ``axis`` by sqrt(stretch) and across it by 1/sqrt(stretch): same area
        u = dx * math.cos(axis) + dy * math.sin(axis)
        v = -dx * math.sin(axis) + dy * math.cos(axis)
        u, v = u * math.sqrt(stretch), v / math.sqrt(stretch)
        out.append((cx + u * math.cos(axis) - v * math.sin(axis),
                    cy + u * math.sin(axis) + v * math.cos(axis)))  # fmt: skip
    return out


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


def _grey_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A flat grey level (GREY_BACKGROUND) plus independent pixel noise (uint8 HxWx3)."""
    level = int(rng.integers(*GREY_BACKGROUND))
    img = level + rng.normal(0, GREY_NOISE, size=(size, size, 1))
    return np.repeat(np.clip(img, 0, 255).astype(np.uint8), 3, axis=2)


def _grey_fill(rng: np.random.Generator) -> tuple[int, int, int]:
    """An object grey level (GREY_OBJECT), brighter than any background by at least MIN_CONTRAST:
    one polarity, as the augmentation never inverts grey levels and a polarity cue would split
    every class in two."""
    v = int(rng.integers(*GREY_OBJECT))
    return (v, v, v)


def _visible(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each mask when later masks are painted on top of earlier ones."""
    covered = np.zeros_like(masks[0])
    out = []
    for m in reversed(masks):
        out.append(m & ~covered)
        covered |= m
    return out[::-1]


def _render(
    rng: np.random.Generator,
    size: int,
    style: str = "grey",
    single: int | None = None,
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One image and its objects [{"category_id", "bbox" [x, y, w, h], "area", "segmentation"}]
    (``segmentation``: the visible pixels as compressed COCO RLE, :func:`_rle`). ``single``:
    exactly one object of this class index, larger (OBJECT_RADIUS_SINGLE), as the object-centric
    classification images."""
    background = _grey_background(rng, size) if style == "grey" else _background(rng, size)
    img = Image.fromarray(background)
    shapes = []
    for _ in range(1 if single is not None else int(rng.integers(1, 5))):
        cls_idx = single if single is not None else int(rng.integers(len(CLASSES)))
        # equal-area sizing, so no class is systematically the largest object of an image
        radius = OBJECT_RADIUS_SINGLE if single is not None else OBJECT_RADIUS
        r = rng.uniform(*radius) * size * math.sqrt(math.pi / _UNIT_AREA[CLASSES[cls_idx]])
        cx, cy = rng.uniform(r * 0.6, size - r * 0.6, size=2)
        poly = _polygon(CLASSES[cls_idx], cx, cy, r, rng.uniform(0, 2 * math.pi))
        if style == "grey":
            poly = _deform(rng, poly, cx, cy)
            colour = _grey_fill(rng)
        else:
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
                "segmentation": _rle(v),
            }
        )
    return img, anns


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """A boolean HxW mask as compressed COCO RLE ``{"size": [h, w], "counts": str}`` (what
    pycocotools' ``mask.encode`` gives, with the counts decoded for JSON): exact, so its area is
    the pixel count, whatever the occlusion left of the shape."""
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode("ascii")}


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


def voc_split(num_train: int) -> int:
    """How many of ``num_train`` train scenes (the first ones) are "VOC2007" trainval; the others
    are "VOC2012" trainval. At least one in each when ``num_train`` >= 2."""
    return min(num_train - 1, max(1, round(num_train * VOC2007_SHARE)))


def _voc_xml(file_id: str, folder: str, size: int, anns: list[dict[str, Any]]) -> bytes:
    """A Pascal VOC annotation (the fields detectron2's loader and VOC evaluator read). VOC boxes
    are 1-based inclusive pixel indices: ``xmin = x + 1``, ``xmax = x + w``, which detectron2's
    ``load_voc_instances`` turns back into the COCO box [x, y, x + w, y + h]. ``truncated``: the
    visible box touches the image border (the shape may extend beyond it); nothing is difficult."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = file_id + ".jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "shapes"
    size_el = ET.SubElement(root, "size")
    for key, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(size_el, key).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for a in anns:
        x, y, w, h = (int(v) for v in a["bbox"])
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = CLASSES[a["category_id"] - 1]
        ET.SubElement(obj, "pose").text = "Unspecified"
        truncated = x == 0 or y == 0 or x + w == size or y + h == size
        ET.SubElement(obj, "truncated").text = str(int(truncated))
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for key, value in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
            ET.SubElement(box, key).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8") + b"\n"


def _write_voc(
    out: str, split: str, size: int, scenes: list[tuple[str, list[dict[str, Any]]]]
) -> None:
    """The Pascal VOC copy of one split's scenes ``[(file_name, anns)]`` (layout in
    docs/formats.md): train -> trainval of out/VOC2007 (the first :func:`voc_split`) and
    out/VOC2012 (the rest), val -> test of out/VOC2007. The JPEGs are byte copies of the COCO
    split's."""
    if split == "train":
        n07 = voc_split(len(scenes))
        parts = [("VOC2007", "trainval", scenes[:n07]), ("VOC2012", "trainval", scenes[n07:])]
    else:
        parts = [("VOC2007", "test", scenes)]
    for folder, image_set, part in parts:
        root = os.path.join(out, folder)
        for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        ids = []
        for fname, anns in part:
            file_id = f"{split}_{os.path.splitext(fname)[0]}"
            ids.append(file_id)
            shutil.copyfile(
                os.path.join(out, split, fname), os.path.join(root, "JPEGImages", file_id + ".jpg")
            )
            with open(os.path.join(root, "Annotations", file_id + ".xml"), "wb") as f:
                f.write(_voc_xml(file_id, folder, size, anns))
        with open(os.path.join(root, "ImageSets", "Main", image_set + ".txt"), "w") as f:
            f.write("".join(i + "\n" for i in ids))


def make_shapes(
    out: str,
    num_train: int = 400,
    num_val: int = 100,
    size: int = 128,
    seed: int = 0,
    force: bool = False,
    style: str = "grey",
    num_train_objects: int | None = None,
    num_val_objects: int | None = None,
    voc: bool = True,
) -> dict[str, Any]:
    """Write the dataset to ``out`` (layout in docs/formats.md) and return a summary.

    ``num_train`` / ``num_val`` scenes make the detection splits. The ImageFolder view holds, in
    the grey style, ``num_train_objects`` / ``num_val_objects`` single-object images of their own
    (default: as many as scenes; classes in turn, so balanced), and in the colour style one crop
    of the largest object of each scene. The COCO json holds each object's mask; ``voc`` also
    writes the Pascal VOC copy of the scenes (:func:`_write_voc`).

    Every image is drawn from its own RNG stream ``(seed, split, index[, 1])``, so the bytes depend
    only on the arguments. Refuses to write into a non-empty ``out`` unless ``force`` (which
    deletes it first).
    """
    if size < 32:
        raise ValueError(f"--size {size} is too small; use at least 32 pixels.")
    if style not in STYLES:
        raise ValueError(f"--style {style!r} is unknown; use one of {', '.join(STYLES)}.")
    num_objects = (
        num_train if num_train_objects is None else num_train_objects,
        num_val if num_val_objects is None else num_val_objects,
    )
    if num_train < 1 or num_val < 1 or min(num_objects) < 1:
        raise ValueError("--num-train, --num-val and the object counts must be at least 1.")
    if voc and num_train < 2:
        raise ValueError(
            "--num-train must be at least 2 for the VOC copy (its VOC2007 and VOC2012 trainval "
            "sets); pass --no-voc to write without it."
        )
    if style != "grey" and num_objects != (num_train, num_val):
        raise ValueError(
            "--num-train-objects / --num-val-objects need --style grey (the colour style crops "
            "one object of each scene)."
        )
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass --force to regenerate it.")
        shutil.rmtree(out)
    categories = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)]
    summary: dict[str, Any] = {"out": out, "size": size, "seed": seed, "style": style}
    for split_idx, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
        os.makedirs(os.path.join(out, split))
        for c in CLASSES:
            os.makedirs(os.path.join(out, "imagefolder", split, c))
        images, annotations, scenes = [], [], []
        per_class: Counter = Counter()
        for i in range(count):
            rng = np.random.default_rng([seed, split_idx, i])
            img, anns = _render(rng, size, style)
            fname = f"{i:06d}.jpg"
            img.save(os.path.join(out, split, fname), quality=92)
            images.append({"id": i + 1, "file_name": fname, "width": size, "height": size})
            scenes.append((fname, anns))
            for a in anns:
                a.update(id=len(annotations) + 1, image_id=i + 1, iscrowd=0)
                annotations.append(a)
            if style == "colour":
                largest = max(anns, key=lambda a: a["area"])
                label = CLASSES[largest["category_id"] - 1]
                per_class[label] += 1
                _object_crop(img, largest["bbox"]).save(
                    os.path.join(out, "imagefolder", split, label, fname), quality=92
                )
        if voc:  # before the ImageFolder view and the json: instances_val.json is the last file
            _write_voc(out, split, size, scenes)
        if style == "grey":
            # classification view: images of their own with one object, classes in turn
            for i in range(num_objects[split_idx]):
                cls_idx = i % len(CLASSES)
                obj_rng = np.random.default_rng([seed, split_idx, i, 1])
                view, _ = _render(obj_rng, size, style, single=cls_idx)
                per_class[CLASSES[cls_idx]] += 1
                path = os.path.join(out, "imagefolder", split, CLASSES[cls_idx], f"{i:06d}.jpg")
                view.save(path, quality=92)
        os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
        with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(
                {
                    "info": {
                        "description": "shapes: synthetic detection dataset",
                        "seed": seed,
                        "style": style,
                    },
                    "images": images,
                    "annotations": annotations,
                    "categories": categories,
                },
                f,
            )
        summary[split] = {
            "images": count,
            "objects": len(annotations),
            "imagefolder_images": sum(per_class.values()),
            "imagefolder_classes": dict(sorted(per_class.items())),
        }
    if voc:
        summary["voc"] = {
            "VOC2007": {"trainval": voc_split(num_train), "test": num_val},
            "VOC2012": {"trainval": num_train - voc_split(num_train)},
        }
    return summary
