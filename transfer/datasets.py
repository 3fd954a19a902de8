"""Dataset registration for detection: the built-in shapes data (COCO json and its Pascal VOC copy),
any COCO-format json + image dir, and the check that a run's datasets are on disk."""
from __future__ import annotations

import json
import os

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_pascal_voc

from pretrain.io import UserError

from .shapes import CLASSES

# The shapes data's Pascal VOC copy (transfer/shapes.py _write_voc), named as detectron2's builtin
# voc_* datasets: (name, folder under DETECTRON2_DATASETS/shapes, image set, year). The VOC
# benchmark trains on the 07+12 trainval sets and tests on 2007 test.
SHAPES_VOC = (
    ("shapes_voc_2007_trainval", "VOC2007", "trainval", 2007),
    ("shapes_voc_2012_trainval", "VOC2012", "trainval", 2012),
    ("shapes_voc_2007_test", "VOC2007", "test", 2007),
)
# what a Pascal VOC folder (VOC2007/, VOC2012/) holds, as detectron2's loader and evaluator read it
VOC_LAYOUT = "Annotations/, ImageSets/Main/<split>.txt and JPEGImages/"


def datasets_root() -> str:
    """detectron2's convention: builtin datasets live under $DETECTRON2_DATASETS (default
    ./datasets)."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def register_coco_format(name: str, json_file: str, image_root: str) -> None:
    """Register a COCO-format dataset once (re-registering the same name with the same files is a
    no-op)."""
    root = datasets_root()
    json_file = json_file if os.path.isabs(json_file) else os.path.join(root, json_file)
    image_root = image_root if os.path.isabs(image_root) else os.path.join(root, image_root)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        same_json = getattr(meta, "json_file", None) == json_file
        if same_json and getattr(meta, "image_root", None) == image_root:
            return
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, json_file, image_root)


def register_voc_format(name: str, dirname: str, split: str, year: int, classes: list[str]) -> None:
    """Register a Pascal VOC-format dataset (detectron2's ``register_pascal_voc``, evaluated by its
    ``PascalVOCDetectionEvaluator``) once; re-registering the same folder is a no-op."""
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if getattr(meta, "dirname", None) == dirname and getattr(meta, "split", None) == split:
            return
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_pascal_voc(name, dirname, split, year, class_names=list(classes))
    MetadataCatalog.get(name).evaluator_type = "pascal_voc"


def register_datasets(cfg: CfgNode) -> None:
    """Register shapes_{train,val} (COCO json), the shapes VOC copy (:data:`SHAPES_VOC`) and every
    ``DATASETS.REGISTER`` entry of ``cfg``. The real COCO and VOC sets are detectron2's builtins
    (coco_2017_*, voc_2007_*, voc_2012_*), registered under $DETECTRON2_DATASETS when
    detectron2.data is imported."""
    for split in ("train", "val"):
        register_coco_format(
            f"shapes_{split}",
            os.path.join("shapes", "annotations", f"instances_{split}.json"),
            os.path.join("shapes", split),
        )
        MetadataCatalog.get(f"shapes_{split}").set(thing_classes=list(CLASSES))
    for name, folder, split, year in SHAPES_VOC:
        register_voc_format(name, os.path.join(datasets_root(), "shapes", folder), split, year,
                            list(CLASSES))  # fmt: skip
    for entry in cfg.DATASETS.REGISTER:
        if len(entry) != 3:
            raise UserError(
                f"DATASETS.REGISTER entry {list(entry)} must be [name, json_file, image_root]."
            )
        register_coco_format(*entry)


def check_datasets(cfg: CfgNode) -> None:
    """Fail early, with one sentence, when a dataset is unknown or its files are not on disk."""
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name not in DatasetCatalog.list():
            raise UserError(
                f"dataset {name!r} is not registered; use a detectron2 builtin name (e.g. "
                "coco_2017_train, voc_2007_trainval), shapes_train/shapes_val/shapes_voc_*, or "
                "add it to DATASETS.REGISTER."
            )
        meta = MetadataCatalog.get(name)
        paths = [(attr, getattr(meta, attr, None)) for attr in ("json_file", "image_root")]
        dirname, split = getattr(meta, "dirname", None), getattr(meta, "split", None)
        if dirname is not None and split is not None:  # Pascal VOC layout
            paths += [
                ("folder", dirname),
                ("image set", os.path.join(dirname, "ImageSets", "Main", f"{split}.txt")),
                ("annotations", os.path.join(dirname, "Annotations")),
                ("images", os.path.join(dirname, "JPEGImages")),
            ]
        for what, path in paths:
            if path is not None and not os.path.exists(path):
                raise UserError(f"dataset {name!r}: {what} {path} not found; {_hint(name, meta)}.")
        if cfg.MODEL.MASK_ON and name in ("shapes_train", "shapes_val"):
            _check_shapes_masks(name, meta.json_file)


def _check_shapes_masks(name: str, json_file: str) -> None:
    """Mask R-CNN on shapes data drawn before the masks existed: one sentence (detectron2 would
    fail inside the mask head). The json is small; the real COCO's is not read here."""
    with open(json_file) as f:
        annotations = json.load(f)["annotations"]
    if annotations and "segmentation" not in annotations[0]:
        raise UserError(
            f"dataset {name!r}: {json_file} has no masks (drawn before tools/make_shapes.py wrote "
            f"them) and MODEL.MASK_ON is set; {_hint(name, None)}."
        )


def _hint(name: str, meta: object) -> str:
    """What to do when a dataset's files are missing (the end of check_datasets' sentence)."""
    if name.startswith("shapes_"):
        shapes = os.path.join(datasets_root(), "shapes")
        force = " --force" if os.path.isdir(shapes) and os.listdir(shapes) else ""
        return f"run `python tools/make_shapes.py --out {shapes}{force}` first"
    dirname = getattr(meta, "dirname", None)
    if dirname is not None:
        return (
            f"set DETECTRON2_DATASETS to the folder that holds {os.path.basename(dirname)}/ "
            f"(with {VOC_LAYOUT}; see README, Full scale)"
        )
    return "set DETECTRON2_DATASETS to the folder that holds it (see README, Full scale)"
