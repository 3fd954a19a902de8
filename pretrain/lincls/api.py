"""One call = one linear evaluation, for the CLI, sweeps and notebooks: :func:`run_linear_eval`
trains (or resumes) a :class:`~pretrain.lincls.evaluator.LinearEvaluator` on a config;
:func:`evaluate_weights` is ``--eval-only``: the accuracy of a checkpoint that already has its fc.
Both return the ``results.json`` dict and are collective (call them on every process).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from detectron2.utils import comm

from pretrain.config import PretrainCfgNode
from pretrain.data import build_image_folder, eval_transform
from pretrain.engine import amp_dtype, get_device, write_results
from pretrain.io import UserError
from pretrain.lincls.config import validate_lincls_cfg
from pretrain.lincls.data import CachedFeatures, per_rank_batch
from pretrain.lincls.evaluator import LinearEvaluator
from pretrain.lincls.metrics import (
    evaluate_images,
    frozen_knn_top1,
    frozen_retrieval,
    knn_results,
    percent,
)
from pretrain.lincls.weights import (
    build_linear_model,
    default_name,
    load_pretrained,
    reference_shapes,
)

__all__ = ["evaluate_weights", "run_linear_eval"]

# the package's logger: log.txt names these lines pretrain.lincls, as before the split
logger = logging.getLogger("pretrain.lincls")


def evaluate_weights(
    cfg: PretrainCfgNode, weights_path: str, unsafe: bool = False
) -> dict[str, Any]:
    """``--eval-only``: top-1 / top-5 of a checkpoint that already has a linear classifier for the
    val split's classes (our linear-eval checkpoint, or a supervised torchvision ResNet), and the
    kNN top-1 (TEST.KNN: one eval-transform pass over both splits) and instance-retrieval top-1
    (TEST.RETRIEVAL_SIZE) of its backbone as a training run reports them (SOLVER.AMP and
    MODEL.CHANNELS_LAST as there); writes ``results.json`` (collective). ``seed`` is the SEED
    stored in a linear-eval checkpoint's meta (the run that trained its fc), else None."""
    device = get_device(cfg.MODEL.DEVICE)
    dtype = amp_dtype(cfg, device)
    weights = load_pretrained(weights_path, cfg.MODEL.ARCH, unsafe)
    val_tf = eval_transform(cfg.INPUT.SIZE, cfg.INPUT.RESIZE or None)
    val = build_image_folder(cfg.DATASETS.ROOT, cfg.DATASETS.VAL_SPLIT, val_tf)
    num_classes = len(val.classes)
    w = weights.fc.get("fc.weight")
    expected = (num_classes, reference_shapes(cfg.MODEL.ARCH)["fc.weight"][1])
    if w is None or tuple(w.shape) != expected:
        shape = "no linear classifier" if w is None else f"an fc of shape {tuple(w.shape)}"
        raise UserError(
            f"{weights_path}: has {shape}, but --eval-only needs the fc of a linear eval on the "
            f"{num_classes} classes of {val.root}; train one first (drop --eval-only)."
        )
    net = build_linear_model(cfg.MODEL.ARCH, num_classes, weights)
    net.fc.load_state_dict({"weight": weights.fc["fc.weight"], "bias": weights.fc["fc.bias"]})
    net.to(device)
    if cfg.MODEL.CHANNELS_LAST:
        net.to(memory_format=torch.channels_last)
    per_rank = per_rank_batch(cfg.TEST.IMS_PER_BATCH, "TEST.IMS_PER_BATCH")
    acc = evaluate_images(
        net, val, device, per_rank, cfg.DATALOADER.NUM_WORKERS, dtype, cfg.MODEL.CHANNELS_LAST
    )
    knn = frozen_knn_top1(net, cfg, val, num_classes, device, per_rank, amp_dtype=dtype)
    retrieval = frozen_retrieval(net, cfg, device, per_rank)
    seed = weights.file_meta.get("seed") if weights.kind == "lincls" else None
    pretrain_meta = dict(weights.meta)
    results = {
        "kind": "lincls",
        "name": default_name(cfg, weights),
        "top1": acc["top1"],
        "top5": acc["top5"],
        **knn_results(cfg, knn),
        **retrieval,
        "seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        "weights": os.path.abspath(weights_path),
        "pretrain": pretrain_meta,
        "arch": cfg.MODEL.ARCH,
        "input_kind": weights.kind,
        "num_classes": num_classes,
        "val_images": len(val),
        "eval_only": True,
    }
    if comm.is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    write_results(cfg.OUTPUT_DIR, results)
    logger.info(
        "Eval of %s: top-1 %.2f%%, top-5 %.2f%%, kNN top-1 %s, instance retrieval top-1 %s "
        "(%d val images)",
        weights_path,
        acc["top1"],
        acc["top5"],
        percent(knn),
        percent(retrieval["instance_retrieval_top1"]),
        len(val),
    )
    return results


def run_linear_eval(
    cfg: PretrainCfgNode,
    weights: str | None = None,
    cached: bool | None = None,
    resume: bool = False,
    unsafe: bool = False,
    features: CachedFeatures | None = None,
) -> dict[str, Any]:
    """One linear evaluation in this process (or on every process of a launched job), for sweep
    tools and notebooks: returns the ``results.json`` dict (``top1``, ``top5``, ...).

    ``weights`` / ``cached`` override MODEL.WEIGHTS / CACHED_FEATURES of a copy of ``cfg``. The
    run is deterministic given SEED (fc init and data order are seeded; no global RNG is used).
    Outputs go to cfg.OUTPUT_DIR as with the CLI (minus log.txt / config.yaml, which the CLI's
    :func:`pretrain.engine.setup_run` writes). ``features`` (cached mode): reuse the
    ``results["features"]`` of an earlier call on the same weights and data, e.g. in an lr sweep::

        first = run_linear_eval(cfg, "ckpt.pth", cached=True)
        for lr in (3.0, 0.3):
            cfg.SOLVER.BASE_LR, cfg.OUTPUT_DIR = lr, f"out/lr{lr}"
            r = run_linear_eval(cfg, "ckpt.pth", cached=True, features=first["features"])

    ``results["features"]`` (a :class:`CachedFeatures`, cached mode only) is not written to disk.
    """
    cfg = cfg.clone()
    cfg.defrost()
    if weights is not None:
        cfg.MODEL.WEIGHTS = weights
    if cached is not None:
        cfg.CACHED_FEATURES = bool(cached)
    validate_lincls_cfg(cfg)
    cfg.freeze()
    if comm.is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    comm.synchronize()
    evaluator = LinearEvaluator(cfg, unsafe=unsafe, features=features)
    results = evaluator.resume_or_load(resume=resume).train()
    if evaluator.features is not None:
        results = dict(results, features=evaluator.features)
    return results
