"""The built-in shapes dataset: deterministic, valid COCO, sane boxes and class balance."""
import filecmp
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from pycocotools.coco import COCO

from PIL import Image

import numpy as np

from transfer.shapes import CLASSES, CROP_CONTEXT, MIN_CONTRAST, make_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("d") / "shapes")
    make_shapes(out, num_train=120, num_val=30, size=96, seed=3)
    return out


@pytest.fixture(scope="module")
def colour_shapes(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("c") / "shapes")
    make_shapes(out, num_train=120, num_val=30, size=96, seed=3, style="colour")
    return out


def _all_files(root):
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
    )


def test_same_seed_same_bytes_other_seed_differs(shapes, tmp_path):
    again = str(tmp_path / "again")
    make_shapes(again, num_train=120, num_val=30, size=96, seed=3)
    files = _all_files(shapes)
    assert files == _all_files(again)
    match, mismatch, errors = filecmp.cmpfiles(shapes, again, files, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(files)
    other = str(tmp_path / "other")
    make_shapes(other, num_train=120, num_val=30, size=96, seed=4)
    assert not filecmp.cmp(
        os.path.join(shapes, "train", "000000.jpg"),
        os.path.join(other, "train", "000000.jpg"),
        shallow=False,
    )


@pytest.mark.parametrize("split,count", [("train", 120), ("val", 30)])
def test_coco_json_is_valid_and_boxes_inside(shapes, split, count):
    coco = COCO(os.path.join(shapes, "annotations", f"instances_{split}.json"))
    assert len(coco.getImgIds()) == count
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    per_image = Counter()
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.loadImgs(ann["image_id"])[0]
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0
        assert x + w <= img["width"] and y + h <= img["height"]
        assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
        per_image[ann["image_id"]] += 1
    assert set(per_image) == set(coco.getImgIds())  # every image has at least one object
    assert max(per_image.values()) <= 4
    assert os.path.isfile(os.path.join(shapes, split, coco.loadImgs(1)[0]["file_name"]))


def test_colour_style_crops_the_largest_object(colour_shapes):
    shapes = colour_shapes
    with open(os.path.join(shapes, "annotations", "instances_train.json")) as f:
        data = json.load(f)
    objects = Counter(a["category_id"] for a in data["annotations"])
    assert len(objects) == len(CLASSES)
    assert min(objects.values()) >= 0.1 * sum(objects.values())
    # ImageFolder view: one crop per scene, under the class of its largest object
    largest = {}
    for a in data["annotations"]:
        if a["image_id"] not in largest or a["area"] > largest[a["image_id"]]["area"]:
            largest[a["image_id"]] = a
    seen = 0
    for cls in CLASSES:
        folder = os.path.join(shapes, "imagefolder", "train", cls)
        names = sorted(os.listdir(folder))
        assert len(names) >= 0.08 * len(data["images"]), f"class {cls} has only {len(names)} images"
        for name in names:
            image_id = int(os.path.splitext(name)[0]) + 1
            assert CLASSES[largest[image_id]["category_id"] - 1] == cls
            # an object-centric crop: square, CROP_CONTEXT x the longer side of the object's box
            w, h = Image.open(os.path.join(folder, name)).size
            side = max(largest[image_id]["bbox"][2:]) * CROP_CONTEXT
            assert w == h and abs(w - side) <= 1.5
        seen += len(names)
    assert seen == len(data["images"])


def test_grey_style_scenes_and_single_object_images(shapes, tmp_path):
    # scenes: grey (R == G == B up to JPEG noise), objects annotated as in the colour style
    with open(os.path.join(shapes, "annotations", "instances_train.json")) as f:
        data = json.load(f)
    assert data["info"]["style"] == "grey"
    objects = Counter(a["category_id"] for a in data["annotations"])
    assert len(objects) == len(CLASSES) and min(objects.values()) >= 0.1 * sum(objects.values())
    scene = np.asarray(Image.open(os.path.join(shapes, "train", "000000.jpg")), dtype=np.float32)
    assert np.abs(scene - scene.mean(axis=2, keepdims=True)).max() <= 6
    # ImageFolder view: exactly balanced single-object images, one object darker or brighter
    # than the background by at least MIN_CONTRAST (minus JPEG and pixel noise)
    for split, count in (("train", 120), ("val", 30)):
        for cls in CLASSES:
            names = os.listdir(os.path.join(shapes, "imagefolder", split, cls))
            assert len(names) == count // len(CLASSES)
    img = np.asarray(
        Image.open(os.path.join(shapes, "imagefolder", "train", "circle", "000000.jpg")).convert(
            "L"
        ),
        dtype=np.float32,
    )
    corner = np.median(img[:4, :4])
    centre_levels = np.abs(img - corner) > MIN_CONTRAST / 2
    assert 0.05 < centre_levels.mean() < 0.6  # one object, neither a speck nor the whole image
    # the object counts are independent of the scene counts
    other = str(tmp_path / "more")
    summary = make_shapes(
        other, num_train=10, num_val=5, size=64, seed=0, num_train_objects=25, num_val_objects=15
    )
    assert summary["train"]["images"] == 10 and summary["train"]["imagefolder_images"] == 25
    assert summary["val"]["imagefolder_images"] == 15
    assert sum(len(f) for _, _, f in os.walk(os.path.join(other, "imagefolder", "val"))) == 15
    with pytest.raises(ValueError, match="need --style grey"):
        make_shapes(str(tmp_path / "c"), 10, 5, 64, 0, style="colour", num_train_objects=20)


def test_cli_refuses_to_overwrite(shapes):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "make_shapes.py"), "--out", shapes],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "not empty; pass --force" in r.stderr and "Traceback" not in r.stderr
