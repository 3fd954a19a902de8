"""Dataset registration for detection: the built-in shapes data and any COCO-format json + image
dir."""
from __future__ import annotations

import os

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from pretrain.io import UserError

from .shapes import CLASSES


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


def register_datasets(cfg: CfgNode) -> None:
    """Register shapes_{train,val} and every ``DATASETS.REGISTER`` entry of ``cfg``."""
    for split in ("train", "val"):
        register_coco_format(
            f"shapes_{split}",
            os.path.join("shapes", "annotations", f"instances_{split}.json"),
            os.path.join("shapes", split),
        )
        MetadataCatalog.get(f"shapes_{split}").set(thing_classes=list(CLASSES))
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
                "coco_2017_train), shapes_train/shapes_val, or add it to DATASETS.REGISTER."
            )
        meta = MetadataCatalog.get(name)
        for attr in ("json_file", "image_root"):
            path = getattr(meta, attr, None)
            if path is not None and not os.path.exists(path):
                hint = (
                    "run `python tools/make_shapes.py --out "
                    f"{os.path.join(datasets_root(), 'shapes')}` first"
                    if name.startswith("shapes_")
                    else "set DETECTRON2_DATASETS to the folder that holds it "
                    "(see README, Full scale)"
                )
                raise UserError(f"dataset {name!r}: {attr} {path} not found; {hint}.")
