"""detectron2 training for the transfer stage: safe weights, atomic checkpoints, COCO evaluation."""
from __future__ import annotations

import json
import logging
import math
import os
import weakref
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from pretrain.engine import AtomicCheckpointer
from pretrain.engine import write_results as write_results_json
from pretrain.io import UserError, load_checkpoint, load_weights_pickle

logger = logging.getLogger(__name__)

BBOX_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class SafeDetectionCheckpointer(AtomicCheckpointer, DetectionCheckpointer):
    """DetectionCheckpointer that writes atomically (the pretraining engine's ``save``) and never
    runs code from a weights file.

    ``.pkl`` files are read with a restricted unpickler (containers and numpy arrays only) and
    ``.pth`` files with ``torch.load(weights_only=True)``; ``unsafe=True`` lifts both limits.
    """

    def __init__(self, *args: Any, unsafe: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unsafe = unsafe

    def _load_file(self, filename: str) -> dict[str, Any]:
        if filename.endswith(".pkl"):
            data = load_weights_pickle(filename, unsafe=self.unsafe)
            if not (isinstance(data, dict) and "model" in data):
                raise UserError(f"{filename}: not detectron2 weights (no 'model' entry).")
            return data
        data = load_checkpoint(filename, unsafe=self.unsafe)
        return data if "model" in data else {"model": data}


def _looks_like_torchvision_or_pretrain(ckpt: Any) -> bool:
    if isinstance(ckpt, dict) and ckpt.get("meta", {}).get("kind") in ("pretrain", "lincls"):
        return True
    state = ckpt.get("state_dict", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else {}
    if not isinstance(state, dict):
        return False
    names = [k for k in state if isinstance(k, str)]
    return any(
        n.split("module.")[-1].split("encoder_q.")[-1].startswith(("conv1.", "layer1.", "bn1."))
        for n in names
    )


def check_weights(cfg: CfgNode, model: torch.nn.Module, unsafe: bool = False) -> dict[str, Any]:
    """Validate ``MODEL.WEIGHTS`` against the built model before any training; return its
    provenance.

    Refuses (one sentence each): a missing file; a raw pretraining / torchvision checkpoint (it must
    go through tools/convert.py first); weights whose backbone tensors have other shapes than this
    model's (a different depth or width); weights that contain no tensor of this model at all.
    """
    path = cfg.MODEL.WEIGHTS
    if not path:
        return {"name": "random init"}
    if "://" in path:  # detectron2:// or http(s):// model-zoo URL, resolved by detectron2
        return {"name": os.path.basename(path), "source": path}
    if not os.path.isfile(path):
        raise UserError(
            f"MODEL.WEIGHTS {path} not found; convert a pretraining checkpoint with "
            "`python tools/convert.py CKPT.pth OUT.pkl --verify` and pass OUT.pkl."
        )
    if path.endswith(".pkl"):
        data = load_weights_pickle(path, unsafe=unsafe)
    else:
        data = load_checkpoint(path, unsafe=unsafe)
        if _looks_like_torchvision_or_pretrain(data):
            raise UserError(
                f"MODEL.WEIGHTS {path} is a pretraining/torchvision checkpoint, not detectron2 "
                f"weights; run `python tools/convert.py {path} OUT.pkl --verify` first and pass "
                "OUT.pkl."
            )
    if not (isinstance(data, dict) and isinstance(data.get("model"), dict)):
        raise UserError(f"MODEL.WEIGHTS {path}: not detectron2 weights (no 'model' dict inside).")

    weights = data["model"]
    model = model.module if hasattr(model, "module") else model
    own = {k: v.shape for k, v in model.state_dict().items()}
    prefix = "backbone.bottom_up."
    bottom_up = {k[len(prefix) :]: s for k, s in own.items() if k.startswith(prefix)}
    matched = 0
    for name, value in weights.items():
        # converted backbones use bare ResNet names (stem.*, res2.*); full detectors use model names
        target = own.get(name, bottom_up.get(name))
        if target is None:
            continue
        shape = tuple(getattr(value, "shape", ()))
        if shape != tuple(target):
            raise UserError(
                f"MODEL.WEIGHTS {path} does not fit this model: {name} has shape {shape} but the "
                f"config builds {tuple(target)}; check MODEL.RESNETS.DEPTH / RES2_OUT_CHANNELS "
                "against the network that was converted."
            )
        matched += 1
    if matched == 0:
        raise UserError(
            f"MODEL.WEIGHTS {path}: none of its {len(weights)} tensors belongs to this model; "
            "was it converted with tools/convert.py from a ResNet?"
        )
    provenance = dict(data.get("provenance") or {})
    provenance.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return provenance


class Trainer(DefaultTrainer):
    """DefaultTrainer with COCO evaluation, safe/atomic checkpoints; everything else is
    detectron2's."""

    unsafe_weights = False  # set from the CLI's --unsafe

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str) -> COCOEvaluator:
        return COCOEvaluator(
            dataset_name,
            output_dir=os.path.join(cfg.OUTPUT_DIR, "inference"),
            use_fast_impl=cfg.TEST.COCO_FAST_EVAL and fast_coco_eval_available(),
        )

    def build_hooks(self) -> list:
        # DefaultTrainer.__init__ creates a plain DetectionCheckpointer just before it builds the
        # hooks; swap in the atomic/safe one here so the PeriodicCheckpointer hook uses it too.
        self.checkpointer = SafeDetectionCheckpointer(
            self._trainer.model,
            self.cfg.OUTPUT_DIR,
            trainer=weakref.proxy(self),
            unsafe=self.unsafe_weights,
        )
        return super().build_hooks()


def fast_coco_eval_available() -> bool:
    """True when detectron2's compiled COCO evaluation (detectron2._C) loads."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def bbox_results(results: dict[str, Any]) -> dict[str, float]:
    """The bbox metrics of the first test dataset from ``Trainer.test``'s (possibly nested)
    output."""
    if "bbox" not in results and len(results) >= 1:
        results = next(iter(results.values()))
    bbox = results.get("bbox", {}) if isinstance(results, dict) else {}
    # COCOeval reports NaN when there is no prediction at all; JSON has no NaN, so that becomes null
    return {
        k: (None if math.isnan(float(bbox[k])) else float(bbox[k]))
        for k in BBOX_KEYS
        if k in bbox
    }


def write_results(
    cfg: CfgNode, results: dict[str, Any], provenance: dict[str, Any], iteration: int
) -> str:
    """Write OUTPUT_DIR/results.json (docs/formats.md) and return its path."""
    record = {
        "kind": "detection",
        "name": provenance.get("name", "random init"),
        "weights": cfg.MODEL.WEIGHTS,
        "pretrain": provenance,
        "iteration": iteration,
        "bbox": bbox_results(results),
    }
    path = write_results_json(cfg.OUTPUT_DIR, record)
    if comm.is_main_process():
        logger.info(f"Wrote {path}: " + json.dumps(record["bbox"]))
    return path
