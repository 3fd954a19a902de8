"""The built-in shapes dataset: deterministic, valid COCO, sane boxes and class balance, masks
that are the rendered pixels, the Pascal VOC copy, and their registration and evaluation."""
import filecmp
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from PIL import Image

import numpy as np

from transfer.shapes import (
    CLASSES,
    CROP_CONTEXT,
    GREY_BACKGROUND,
    GREY_OBJECT,
    MIN_CONTRAST,
    _render,
    make_shapes,
    voc_split,
)

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


def test_cli_without_the_voc_copy(tmp_path):
    out = str(tmp_path / "s")
    with pytest.raises(ValueError, match="at least 2 for the VOC copy.*--no-voc"):
        make_shapes(out, num_train=1, num_val=1, size=32)
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "make_shapes.py"), "--out", out,
         "--num-train", "1", "--num-val", "1", "--size", "32", "--no-voc"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "voc" not in json.loads(r.stdout)
    assert sorted(os.listdir(out)) == ["annotations", "imagefolder", "train", "val"]


# ------------------------------------------------------------------ masks, VOC copy, registration


def _rendered(seed, split_idx, i, size, style="grey"):
    """The scene make_shapes draws as image ``i`` of split ``split_idx``, before the JPEG."""
    return _render(np.random.default_rng([seed, split_idx, i]), size, style)


def _render_digest(style, size, counts, singles, seed=0):
    """sha256 of the rendered pixels (before the JPEG) and of the boxes of the scenes, and of the
    pixels of the single-object images, as make_shapes draws them."""
    h = hashlib.sha256()
    for split_idx, n in enumerate(counts):
        for i in range(n):
            img, anns = _rendered(seed, split_idx, i, size, style)
            h.update(np.asarray(img).tobytes())
            h.update(json.dumps([[a["category_id"], a["bbox"], a["area"]] for a in anns]).encode())
    for split_idx, n in enumerate(singles):
        for i in range(n):
            rng = np.random.default_rng([seed, split_idx, i, 1])
            h.update(np.asarray(_render(rng, size, style, single=i % len(CLASSES))[0]).tobytes())
    return h.hexdigest()


def test_images_and_boxes_unchanged_by_masks_and_voc(tmp_path):
    # computed with the code before the masks and the VOC copy existed (commit 3af3c09): the FPN
    # demo's images and boxes (and so its numbers) stay what they were. Drawing is numpy's
    # PCG64 streams and Pillow's polygon fill; a Pillow that rasterises differently changes these.
    assert _render_digest("grey", 64, (12, 4), (10, 5)) == (
        "651f4d91f4ee767c06e67feeb32eb060a8423bfac4480a1568d7798bffefc9bf"
    )
    assert _render_digest("colour", 64, (6, 3), (0, 0)) == (
        "6cae3bb33dd5da802c151964ad7f4597f9e73f1774f7888c23772c33a08be723"
    )
    # and the files: with and without the VOC copy, every other file but the json is the same
    # bytes, and the json differs by the masks only
    with_voc, without = str(tmp_path / "with"), str(tmp_path / "without")
    make_shapes(with_voc, num_train=6, num_val=3, size=64, seed=5)
    make_shapes(without, num_train=6, num_val=3, size=64, seed=5, voc=False)
    files = _all_files(without)
    assert [f for f in _all_files(with_voc) if f not in files] == [
        f for f in _all_files(with_voc) if f.startswith(("VOC2007", "VOC2012"))
    ]
    jsons = [f for f in files if f.endswith(".json")]
    match, mismatch, errors = filecmp.cmpfiles(
        with_voc, without, [f for f in files if f not in jsons], shallow=False
    )
    assert mismatch == errors == [] and len(match) == len(files) - 2
    for name in jsons:
        with open(os.path.join(with_voc, name)) as f, open(os.path.join(without, name)) as g:
            assert json.load(f) == json.load(g)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
def test_masks_are_the_visible_rendered_pixels(shapes):
    """Each object's RLE is exactly the pixels drawn in its grey level: disjoint, together all
    object pixels of the rendered image, its area the json's, its box the json's."""
    for split_idx, split in enumerate(("train", "val")):
        coco = COCO(os.path.join(shapes, "annotations", f"instances_{split}.json"))
        for image_id in coco.getImgIds()[:30]:
            img, _ = _rendered(3, split_idx, image_id - 1, 96)
            grey = np.asarray(img)[..., 0]
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            masks = [coco.annToMask(a).astype(bool) for a in anns]
            for a, m in zip(anns, masks):
                assert a["segmentation"]["size"] == [96, 96]
                assert m.sum() == a["area"] == mask_util.area(a["segmentation"])
                assert list(mask_util.toBbox(a["segmentation"])) == a["bbox"]
                levels = np.unique(grey[m])
                assert len(levels) == 1 and GREY_OBJECT[0] <= levels[0] < GREY_OBJECT[1]
            assert (np.sum(masks, axis=0) <= 1).all()
            # background: GREY_BACKGROUND + noise (std 8), far below the objects' grey levels
            objects = grey > (GREY_BACKGROUND[1] + GREY_OBJECT[0]) // 2
            assert (np.any(masks, axis=0) == objects).all()


def _register(monkeypatch, root):
    from transfer.config import get_transfer_cfg
    from transfer.datasets import register_datasets

    monkeypatch.setenv("DETECTRON2_DATASETS", root)
    cfg = get_transfer_cfg()
    register_datasets(cfg)
    return cfg


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable:UserWarning")
def test_detectron2_reads_masks_and_the_voc_copy(shapes, monkeypatch):
    """detectron2's COCO loader + Mask R-CNN mapper read the masks; its VOC loader reads the VOC
    copy as the same scenes and boxes, split 07 / 12 / 07 test as the real sets."""
    from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
    from detectron2.structures import BoxMode

    cfg = _register(monkeypatch, os.path.dirname(shapes))
    cfg.merge_from_list(["MODEL.MASK_ON", "True", "INPUT.MASK_FORMAT", "bitmask",
                         "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.RANDOM_FLIP", "none"])  # fmt: skip
    coco_train = DatasetCatalog.get("shapes_train")
    mapper = DatasetMapper(cfg, is_train=True)
    with open(os.path.join(shapes, "annotations", "instances_train.json")) as f:
        areas = Counter()
        for a in json.load(f)["annotations"]:
            areas[a["image_id"]] += a["area"]
    for d in coco_train[:5]:
        masks = mapper(d)["instances"].gt_masks.tensor
        assert masks.shape[1:] == (96, 96) and masks.sum().item() == areas[d["image_id"]]

    n07 = voc_split(120)
    assert n07 == 36  # 30%: VOC2007's 5011 of the 16551 07+12 trainval images
    names = ("shapes_voc_2007_trainval", "shapes_voc_2012_trainval", "shapes_voc_2007_test")
    voc = {name: DatasetCatalog.get(name) for name in names}
    assert [len(v) for v in voc.values()] == [n07, 120 - n07, 30]
    for name, year in (("shapes_voc_2007_trainval", 2007), ("shapes_voc_2012_trainval", 2012)):
        meta = MetadataCatalog.get(name)
        assert (meta.evaluator_type, meta.year) == ("pascal_voc", year)
        assert meta.thing_classes == list(CLASSES)
    scenes = voc["shapes_voc_2007_trainval"] + voc["shapes_voc_2012_trainval"]
    for split, coco_dicts, voc_dicts in (("train", coco_train, scenes),
                                         ("val", DatasetCatalog.get("shapes_val"),
                                          voc["shapes_voc_2007_test"])):  # fmt: skip
        for c, v in zip(coco_dicts, voc_dicts):
            assert v["image_id"] == f"{split}_{os.path.basename(c['file_name'])[:-4]}"
            assert filecmp.cmp(c["file_name"], v["file_name"], shallow=False)
            boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                     for a in c["annotations"]]  # fmt: skip
            assert [a["bbox"] for a in v["annotations"]] == boxes
            assert [a["category_id"] for a in v["annotations"]] == [
                a["category_id"] for a in c["annotations"]
            ]


def test_evaluator_selection_and_voc_ap_of_the_ground_truth(shapes, monkeypatch, tmp_path):
    """shapes_voc_* -> PascalVOCDetectionEvaluator (the ground truth as predictions: AP 100),
    shapes_val -> COCOEvaluator on boxes, and masks with MODEL.MASK_ON; write_results' keys."""
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
    from detectron2.structures import Boxes, Instances

    from transfer.trainer import Trainer, write_results

    cfg = _register(monkeypatch, os.path.dirname(shapes))
    cfg.OUTPUT_DIR = str(tmp_path)
    coco = Trainer.build_evaluator(cfg, "shapes_val")
    assert isinstance(coco, COCOEvaluator) and coco._tasks == ("bbox",)
    cfg.MODEL.MASK_ON = True
    assert Trainer.build_evaluator(cfg, "shapes_val")._tasks == ("bbox", "segm")
    evaluator = Trainer.build_evaluator(cfg, "shapes_voc_2007_test")
    assert isinstance(evaluator, PascalVOCDetectionEvaluator)
    evaluator.reset()
    for d in DatasetCatalog.get("shapes_voc_2007_test"):
        gt = Instances((d["height"], d["width"]))
        gt.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in d["annotations"]]))
        gt.scores = torch.ones(len(d["annotations"]))
        gt.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
        evaluator.process([d], [{"instances": gt}])
    results = evaluator.evaluate()
    assert results["bbox"] == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0})

    cfg.DATASETS.TEST = ("shapes_voc_2007_test",)
    with open(write_results(cfg, {"shapes_voc_2007_test": results}, {}, iteration=3)) as f:
        record = json.load(f)
    assert record["evaluator"] == "pascal_voc_2007"
    assert record["test_dataset"] == "shapes_voc_2007_test"
    assert record["bbox"] == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0})
    assert "segm" not in record and record["name"] == "random init"
    cfg.DATASETS.TEST = ("shapes_val",)
    coco_results = {"bbox": {"AP": 1.0, "APl": float("nan"), "AP-circle": 2.0},
                    "segm": {"AP": 0.5, "AP50": 3.0}}  # fmt: skip
    with open(write_results(cfg, coco_results, {"name": "x"}, iteration=3)) as f:
        record = json.load(f)
    assert record["evaluator"] == "coco"
    assert record["bbox"] == {"AP": 1.0, "APl": None} and record["segm"] == {"AP": 0.5, "AP50": 3.0}


def test_missing_voc_folders_or_masks_are_one_sentence(shapes, monkeypatch, tmp_path):
    from detectron2.data import MetadataCatalog

    from pretrain.io import UserError
    from transfer.datasets import check_datasets, register_voc_format

    # a VOC-format dataset whose folder is not there: the sentence names the path and the layout
    cfg = _register(monkeypatch, str(tmp_path))
    register_voc_format("test_voc_2007_trainval", str(tmp_path / "VOC2007"), "trainval", 2007,
                        list(CLASSES))  # fmt: skip
    cfg.DATASETS.TRAIN = ("test_voc_2007_trainval",)
    with pytest.raises(UserError) as e:
        check_datasets(cfg)
    msg = str(e.value)
    assert f"folder {tmp_path / 'VOC2007'} not found" in msg
    assert "DETECTRON2_DATASETS" in msg and "ImageSets/Main/<split>.txt" in msg
    # detectron2's builtin voc_2007_test, registered when detectron2.data was imported
    meta = MetadataCatalog.get("voc_2007_test")
    if not os.path.isdir(meta.dirname):
        cfg.DATASETS.TRAIN = ("voc_2007_test",)
        with pytest.raises(UserError, match=f"'voc_2007_test': folder {meta.dirname} not found"):
            check_datasets(cfg)
    # shapes data drawn without the VOC copy (or before it existed): redraw it, with --force
    partial = tmp_path / "partial"
    make_shapes(str(partial / "shapes"), num_train=2, num_val=1, size=32, voc=False)
    cfg = _register(monkeypatch, str(partial))
    cfg.DATASETS.TRAIN = ("shapes_voc_2012_trainval",)
    with pytest.raises(UserError, match=r"make_shapes.py --out .*shapes --force` first"):
        check_datasets(cfg)
    cfg.DATASETS.TRAIN = ("shapes_train",)
    check_datasets(cfg)  # the COCO json is there
    # ... and, drawn before the masks existed, it has none: Mask R-CNN is refused
    json_file = partial / "shapes" / "annotations" / "instances_train.json"
    data = json.loads(json_file.read_text())
    for a in data["annotations"]:
        del a["segmentation"]
    json_file.write_text(json.dumps(data))
    check_datasets(cfg)
    cfg.MODEL.MASK_ON = True
    with pytest.raises(UserError, match="has no masks .* MODEL.MASK_ON .* --force` first"):
        check_datasets(cfg)
