"""detectron2 training for the transfer stage: safe weights, atomic checkpoints, COCO / VOC
evaluation."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import weakref
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import convert_c2_detectron_names
from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer, hooks
from detectron2.engine import defaults as d2_defaults
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils import comm

from pretrain.engine import AtomicCheckpointer, DeviceAMPTrainer, RunMixin, create_ddp_model
from pretrain.engine import with_signal_checkpoint
from pretrain.engine import write_results as write_results_json
from pretrain.io import UserError, load_checkpoint, load_weights_pickle

logger = logging.getLogger(__name__)

BBOX_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def read_weights(path: str, unsafe: bool = False) -> dict[str, Any]:
    """Read a ``.pkl`` or ``.pyth`` weights file into the dict that detectron2's
    ``DetectionCheckpointer._load_file`` returns for it, without running code from the file.

    * ``{"model": ..., "__author__": ...}`` pickles (detectron2 model zoo, tools/convert.py): as is.
    * any other pickle is Caffe2 / Detectron format (e.g. ``ImageNetPretrained/MSRA/R-50.pkl``):
      ``data["blobs"]`` if present (detection models) else the dict itself (ImageNet models), less
      the ``*_momentum`` blobs, as ``{"model": blobs, "__author__": "Caffe2",
      "matching_heuristics": True}``; detectron2 then renames the blobs (``res2_0_branch2a_w`` ->
      ``res2.0.conv1.weight``, ...) when it loads them.
    * ``.pyth`` (pycls): ``{"model": model_state less num_batches_tracked, "__author__": "pycls",
      "matching_heuristics": True}``.
    """
    if path.endswith(".pyth"):
        data = load_checkpoint(path, unsafe=unsafe)
        if not (isinstance(data, dict) and isinstance(data.get("model_state"), dict)):
            raise UserError(f"{path}: not a pycls checkpoint (no 'model_state' dict inside).")
        state = {
            k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")
        }
        return {"model": state, "__author__": "pycls", "matching_heuristics": True}
    data = load_weights_pickle(path, unsafe=unsafe)
    # detectron2 also wants "__author__"; a dict-valued "model" is never a Caffe2 blob, so such
    # files (which this checkpointer always accepted) keep loading as detectron2 weights
    if isinstance(data, dict) and "model" in data:
        if "__author__" in data or isinstance(data["model"], dict):
            return data
    blobs = data.get("blobs", data) if isinstance(data, dict) else None
    if not (isinstance(blobs, dict) and all(isinstance(k, str) for k in blobs)):
        raise UserError(
            f"{path}: not detectron2 or Caffe2 weights (neither a 'model' entry nor a dict of "
            "named arrays)."
        )
    blobs = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
    return {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}


class SafeDetectionCheckpointer(AtomicCheckpointer, DetectionCheckpointer):
    """DetectionCheckpointer that writes atomically (the pretraining engine's ``save``) and never
    runs code from a weights file.

    It reads what detectron2 reads (detectron2 and Caffe2 ``.pkl``, pycls ``.pyth``, torch files,
    ``PATH?matching_heuristics=True``): ``.pkl`` files with a restricted unpickler (containers and
    numpy arrays only), the others with ``torch.load(weights_only=True)``; ``unsafe=True`` lifts
    both limits.
    """

    def __init__(
        self, *args: Any, unsafe: bool = False, collective_saves: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.unsafe = unsafe
        # every process calls save (Trainer.build_hooks): they share the writer's outcome
        self.collective_saves = collective_saves

    def save_is_collective(self) -> bool:
        return self.collective_saves and comm.get_world_size() > 1

    def _load_file(self, filename: str) -> dict[str, Any]:
        if filename.endswith((".pkl", ".pyth")):
            data = read_weights(filename, unsafe=self.unsafe)
            if "__author__" in data:
                self.logger.info(f"Reading a file from '{data['__author__']}'")
            return data
        # detectron2's own: self._torch_load, then the ?matching_heuristics=True of the URL
        return DetectionCheckpointer._load_file(self, filename)

    def _torch_load(self, f: str) -> Any:
        return load_checkpoint(f, unsafe=self.unsafe)


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


def _caffe2_shapes(path: str, blobs: dict[str, Any]) -> dict[str, tuple]:
    """detectron2's names and shapes for Caffe2 blobs: its own renaming, applied to shape-only
    (meta) tensors so that no data is copied."""
    meta = {k: torch.empty(tuple(getattr(v, "shape", ())), device="meta") for k, v in blobs.items()}
    try:
        renamed, _ = convert_c2_detectron_names(meta)
    except (AssertionError, RuntimeError, IndexError) as e:
        raise UserError(f"MODEL.WEIGHTS {path}: its blob names are not Caffe2 names ({e}).") from e
    return {k: tuple(v.shape) for k, v in renamed.items()}


def check_weights(cfg: CfgNode, model: torch.nn.Module, unsafe: bool = False) -> dict[str, Any]:
    """Validate ``MODEL.WEIGHTS`` against the built model before any training; return its
    provenance.

    Refuses (one sentence each): a missing file; a raw pretraining / torchvision checkpoint (it must
    go through tools/convert.py first); weights whose backbone tensors have other shapes than this
    model's (a different depth or width); weights that contain no tensor of this model at all.
    Head tensors of another shape (another NUM_CLASSES) are left to detectron2, which skips them.
    """
    path = cfg.MODEL.WEIGHTS
    if not path:
        return {"name": "random init"}
    if "://" in path:  # detectron2:// or http(s):// model-zoo URL, resolved by detectron2
        return {"name": os.path.basename(path), "source": path}
    # like DetectionCheckpointer.load: a query (?matching_heuristics=True) is not part of the file
    url = urlparse(path)
    path = url._replace(query="").geturl()
    if not os.path.isfile(path):
        raise UserError(
            f"MODEL.WEIGHTS {path} not found; convert a pretraining checkpoint with "
            "`python tools/convert.py CKPT.pth OUT.pkl --verify` and pass OUT.pkl."
        )
    if path.endswith((".pkl", ".pyth")):
        data = read_weights(path, unsafe=unsafe)
    else:
        data = load_checkpoint(path, unsafe=unsafe)
        if _looks_like_torchvision_or_pretrain(data):
            raise UserError(
                f"MODEL.WEIGHTS {path} is a pretraining/torchvision checkpoint, not detectron2 "
                f"weights; run `python tools/convert.py {path} OUT.pkl --verify` first and pass "
                "OUT.pkl."
            )
        if isinstance(data, dict) and "model" not in data:  # a bare state dict, as detectron2
            data = {"model": data}
        if isinstance(data, dict) and parse_qs(url.query).get("matching_heuristics") == ["True"]:
            data["matching_heuristics"] = True
    if not (isinstance(data, dict) and isinstance(data.get("model"), dict)):
        raise UserError(f"MODEL.WEIGHTS {path}: not detectron2 weights (no 'model' dict inside).")

    weights = data["model"]
    if data.get("__author__") == "Caffe2":
        shapes = _caffe2_shapes(path, weights)
    else:
        shapes = {k: tuple(getattr(v, "shape", ())) for k, v in weights.items()}
    model = model.module if hasattr(model, "module") else model
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # this model's ResNet tensors under their bare names (stem.*, res2.*, ...): FPN models hold the
    # ResNet in backbone.bottom_up; C4 models hold stem..res4 in the backbone and res5 in the box
    # head (roi_heads.res5), where detectron2's name matching puts a converted res5
    bottom_up = {}
    for key, shape in own.items():
        for prefix in ("backbone.bottom_up.", "backbone.", "roi_heads."):
            if key.startswith(prefix):
                if key[len(prefix) :].startswith(("stem.", "res")):
                    bottom_up.setdefault(key[len(prefix) :], shape)
                break
    # converted backbones and (renamed) Caffe2 blobs use bare ResNet names (stem.*, res2.*), which
    # only detectron2's name matching (matching_heuristics) finds; full detectors use model names
    heuristics = bool(data.get("matching_heuristics"))
    matched = 0
    for name, shape in shapes.items():
        target = own.get(name, bottom_up.get(name) if heuristics else None)
        if target is None:
            if name in bottom_up:  # detectron2 reads the flag of a .pkl from the file itself
                fix = (
                    "store 'matching_heuristics': True in it (tools/convert.py does)"
                    if path.endswith(".pkl")
                    else f"pass MODEL.WEIGHTS {path}?matching_heuristics=True"
                )
                raise UserError(
                    f"MODEL.WEIGHTS {path} has bare backbone names ({name}) that detectron2 "
                    f"only matches by name heuristics; {fix}."
                )
            continue
        if shape != target:
            if name in bottom_up or name.startswith("backbone."):
                raise UserError(
                    f"MODEL.WEIGHTS {path} does not fit this model: {name} has shape {shape} but "
                    f"the config builds {target}; check MODEL.RESNETS.DEPTH / RES2_OUT_CHANNELS "
                    "against the network that was converted."
                )
            continue
        matched += 1
    if matched == 0:
        raise UserError(
            f"MODEL.WEIGHTS {path}: none of its {len(weights)} tensors belongs to this model; "
            "was it converted with tools/convert.py from a ResNet?"
        )
    provenance = dict(data.get("provenance") or {})
    provenance.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return provenance


@contextlib.contextmanager
def _ddp_on_cpu_too() -> Iterator[None]:
    """While ``DefaultTrainer.__init__`` runs: the ``create_ddp_model`` it calls is
    :func:`pretrain.engine.create_ddp_model` (``device_ids=None`` for a model on the CPU;
    detectron2's passes ``[local_rank]``, which DDP refuses for CPU modules). detectron2 has no
    hook for the wrapping, so the name in ``detectron2.engine.defaults`` is swapped for the call
    and restored afterwards."""
    original = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


def build_amp_trainer(
    cfg: CfgNode,
    model: torch.nn.Module,
    data_loader: Any,
    optimizer: torch.optim.Optimizer,
    **kwargs: Any,
) -> DeviceAMPTrainer:
    """The trainer of ``SOLVER.AMP.ENABLED``: :class:`pretrain.engine.DeviceAMPTrainer`, autocast
    to ``SOLVER.AMP.PRECISION`` on the device of ``model``'s parameters (the CPU included), with a
    ``GradScaler`` that is enabled for float16 only (bfloat16 has float32's range). ``kwargs`` are
    what ``DefaultTrainer`` passes to detectron2's ``AMPTrainer``; the scaler's state is in
    ``AMPTrainer.state_dict``, so checkpoints hold it and resume restores it."""
    precision = getattr(torch, cfg.SOLVER.AMP.PRECISION)
    device_type = next(model.parameters()).device.type
    return DeviceAMPTrainer(
        model,
        data_loader,
        optimizer,
        grad_scaler=torch.amp.GradScaler(device_type, enabled=precision == torch.float16),
        precision=precision,
        device_type=device_type,
        **kwargs,
    )


@contextlib.contextmanager
def _device_amp_trainer(cfg: CfgNode) -> Iterator[None]:
    """While ``DefaultTrainer.__init__`` runs: the ``AMPTrainer`` it builds for
    SOLVER.AMP.ENABLED is :func:`build_amp_trainer`'s. detectron2's own asserts CUDA, autocasts
    with the deprecated ``torch.cuda.amp.autocast``, always in float16, and builds a
    ``torch.cuda.amp.GradScaler`` (deprecation and "CUDA is not available" warnings on the CPU);
    ``DefaultTrainer`` builds it inline with no hook to choose it, so, as for
    :func:`_ddp_on_cpu_too`, the name in ``detectron2.engine.defaults`` is swapped for the call
    (one trainer is built, before the checkpointer and hooks that refer to it)."""
    original = d2_defaults.AMPTrainer
    d2_defaults.AMPTrainer = lambda *args, **kwargs: build_amp_trainer(cfg, *args, **kwargs)
    try:
        yield
    finally:
        d2_defaults.AMPTrainer = original


class Trainer(RunMixin, DefaultTrainer):
    """detectron2's ``DefaultTrainer`` (its build_* methods, hooks, ``train`` and ``test``) with
    COCO evaluation, safe/atomic checkpoints, several CPU processes (gloo), mixed precision on
    any device (:func:`build_amp_trainer`) and, from :class:`pretrain.engine.RunMixin` as in the
    pretraining and linear-eval runs, a resume decided by the main process and ``results.json``.

    ``SOLVER.AMP.ENABLED`` applies to the training steps only: evaluation (``test``, the
    ``EvalHook``, ``--eval-only``) and PreciseBN run detectron2's inference as it is, without
    autocast, so in float32.
    """

    unsafe_weights = False  # set from the CLI's --unsafe

    def __init__(self, cfg: CfgNode) -> None:
        with _ddp_on_cpu_too(), _device_amp_trainer(cfg):
            super().__init__(cfg)

    def build_hooks(self) -> list[hooks.HookBase | None]:
        """``DefaultTrainer.build_hooks``, with :attr:`checkpointer` (built by
        ``DefaultTrainer.__init__`` just before) replaced by a :class:`SafeDetectionCheckpointer`
        first, so that the PeriodicCheckpointer hook and resume use it."""
        if not isinstance(self.checkpointer, SafeDetectionCheckpointer):
            self.checkpointer = SafeDetectionCheckpointer(
                self.model,
                self.cfg.OUTPUT_DIR,
                trainer=weakref.proxy(self),
                unsafe=self.unsafe_weights,
                collective_saves=True,
            )
        ret = super().build_hooks()
        if not comm.is_main_process():
            # detectron2 checkpoints on the main process only; here every process calls save (only
            # the main one writes), so that a full disk stops all of them with the same sentence
            # instead of leaving the others in the next collective
            at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook))
            period = self.cfg.SOLVER.CHECKPOINT_PERIOD
            ret.insert(at, hooks.PeriodicCheckpointer(self.checkpointer, period))
        # on SIGTERM / SIGINT / SIGUSR1: a checkpoint once the step is done, then stop
        return with_signal_checkpoint(ret, self.checkpointer)

    def load_initial_weights(self) -> None:
        """Without a checkpoint to resume: MODEL.WEIGHTS, the model only (as detectron2)."""
        self.checkpointer.load(self.cfg.MODEL.WEIGHTS, checkpointables=[])

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str) -> DatasetEvaluator:
        """By the dataset's ``evaluator_type`` (its metadata): ``"pascal_voc"`` (detectron2's
        voc_* builtins, shapes_voc_*) -> ``PascalVOCDetectionEvaluator`` (boxes; the VOC2007
        11-point AP for a 2007 set); anything else -> ``COCOEvaluator`` on the boxes, and the
        masks too with MODEL.MASK_ON."""
        if getattr(MetadataCatalog.get(dataset_name), "evaluator_type", None) == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        return COCOEvaluator(
            dataset_name,
            tasks=("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",),
            output_dir=os.path.join(cfg.OUTPUT_DIR, "inference"),
            use_fast_impl=cfg.TEST.COCO_FAST_EVAL and fast_coco_eval_available(),
        )


def fast_coco_eval_available() -> bool:
    """True when detectron2's compiled COCO evaluation (detectron2._C) loads."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def first_dataset_results(results: dict[str, Any]) -> dict[str, Any]:
    """The results of the first test dataset from ``Trainer.test``'s (possibly nested) output:
    ``{"bbox": {...}, "segm": {...}}``."""
    if "bbox" not in results and len(results) >= 1:
        results = next(iter(results.values()))
    return results if isinstance(results, dict) else {}


def task_results(results: dict[str, Any], task: str = "bbox") -> dict[str, float | None]:
    """The summary metrics (:data:`BBOX_KEYS`, those present: COCO gives all six, Pascal VOC
    AP/AP50/AP75) of one task ("bbox", "segm") of the first test dataset; empty when it was not
    evaluated."""
    metrics = first_dataset_results(results).get(task) or {}
    # COCOeval reports NaN when there is no prediction at all; JSON has no NaN, so that becomes null
    return {
        k: (None if math.isnan(float(metrics[k])) else float(metrics[k]))
        for k in BBOX_KEYS
        if k in metrics
    }


def bbox_results(results: dict[str, Any]) -> dict[str, float | None]:
    """The bbox metrics of the first test dataset from ``Trainer.test``'s (possibly nested)
    output."""
    return task_results(results, "bbox")


def evaluator_name(cfg: CfgNode) -> str | None:
    """How the first test dataset was evaluated: "coco", "pascal_voc_2007" (11-point AP) or
    "pascal_voc_2012" (area under the curve); None without a test dataset."""
    if not cfg.DATASETS.TEST:
        return None
    meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    if getattr(meta, "evaluator_type", None) == "pascal_voc":
        return f"pascal_voc_{meta.year}"
    return "coco"


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
        "benchmark": cfg.BENCHMARK or None,
        "seed": cfg.SEED,
        "test_dataset": cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None,
        "evaluator": evaluator_name(cfg),
        "bbox": bbox_results(results),
    }
    segm = task_results(results, "segm")
    if segm:
        record["segm"] = segm
    path = write_results_json(cfg.OUTPUT_DIR, record)
    if comm.is_main_process():
        shown = {k: record[k] for k in ("bbox", "segm") if k in record}
        logger.info(f"Wrote {path}: " + json.dumps(shown))
    return path
