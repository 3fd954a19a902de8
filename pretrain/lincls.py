"""Linear evaluation of a frozen backbone (MoCo protocol, METHODS.md section 4).

A supervised loop on top of the pretraining engine's pieces (launch, checkpointing, writers):

* the backbone (a torchvision ResNet loaded from MODEL.WEIGHTS) is frozen: ``requires_grad``
  False, features computed under ``torch.no_grad`` and **always in eval mode**, so BatchNorm uses
  and keeps its running statistics (:class:`LinearClassifier` overrides ``train()``);
* features are the global-average-pooled output of ``layer4`` (2048-d for R50, 512-d for R18);
  one ``nn.Linear`` (weights N(0, 0.01^2), bias 0, as MoCo's ``main_lincls.py``) is trained with
  cross-entropy, SGD momentum 0.9, lr 30 (not scaled with the batch size, as MoCo), wd 0,
  batch 256, 100 epochs, lr x0.1 at epochs 60 and 80. Only the fc is wrapped in DDP;
* train images: RandomResizedCrop + flip; val: Resize + CenterCrop; top-1 / top-5 on the val
  split at the end (and every ``TEST.EVAL_PERIOD_EPOCHS``);
* next to it, the weighted kNN top-1 of the frozen backbone (``TEST.KNN``, :func:`knn_accuracy`):
  val against train, both through the eval transform (Resize + CenterCrop), cosine similarity
  of L2-normalised features, ``exp(s / TEST.KNN_T)`` vote of the ``TEST.KNN_K`` nearest
  (:func:`pretrain.knn.knn_predict`). No training, so it is the same evaluation for every
  backbone, random init included; the image protocol pays one extra extraction pass for it;
* at the end every backbone tensor is compared with MODEL.WEIGHTS (MoCo's sanity check);
  a difference raises :class:`BackboneChangedError`.

``CACHED_FEATURES True`` (``--cached-features``) extracts the features of the train and val
splits once (center crops, i.e. *no augmentation*: **not the paper protocol**) and trains the same
fc with the same schedule on them: much faster, for demos and sweeps.

Outputs in OUTPUT_DIR follow docs/formats.md: ``config.yaml``, ``log.txt``, ``metrics.json``,
tensorboard events, ``model_*.pth`` / ``model_final.pth`` (a torchvision ResNet state dict with
the trained fc and ``meta.kind == "lincls"``, which tools/convert.py accepts) and ``results.json``.

Public API: :func:`get_lincls_cfg` / :func:`load_lincls_cfg`, :func:`load_pretrained`,
:func:`check_backbone_unchanged`, :class:`LinearEvaluator`, :func:`run_linear_eval`,
:func:`evaluate_weights`, :func:`knn_accuracy`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from detectron2.engine import SimpleTrainer, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation.evaluator import inference_context
from detectron2.utils import comm
from torch import nn
from torch.utils.data import Dataset

from pretrain.config import ARCHS, PretrainCfgNode, merge_config
from pretrain.data import (
    RobustImageFolder,
    build_eval_loader,
    build_image_folder,
    build_train_loader,
    count_bad_files,
    eval_transform,
    lincls_train_transform,
)
from pretrain.engine import (
    AtomicCheckpointer,
    NonFiniteLossError,
    ProgressHook,
    RNGStates,
    build_writers,
    check_finite,
    get_device,
    write_results,
)
from pretrain.io import UserError, load_checkpoint
from pretrain.knn import knn_predict
from pretrain.models import backbone_features

__all__ = [
    "BackboneChangedError",
    "CachedFeatures",
    "FeatureDataset",
    "LinearClassifier",
    "LinearEvaluator",
    "LinearTrainer",
    "PretrainedWeights",
    "add_lincls_config",
    "build_linear_model",
    "check_backbone_unchanged",
    "evaluate_weights",
    "extract_features",
    "get_lincls_cfg",
    "knn_accuracy",
    "load_lincls_cfg",
    "load_pretrained",
    "run_linear_eval",
    "topk_correct",
    "validate_lincls_cfg",
]

logger = logging.getLogger(__name__)

# MoCo's main_lincls.py: fc.weight ~ N(0, 0.01^2), fc.bias = 0
FC_INIT_STD = 0.01
_PROTOCOL = {
    False: "MoCo protocol",
    True: "CACHED FEATURES of center crops: fast, not the paper protocol",
}
_BN_COUNTER = "num_batches_tracked"


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def add_lincls_config(cfg: PretrainCfgNode) -> None:
    """Add every linear-evaluation key with its default (the MoCo R50 protocol)."""
    cfg.MODEL = PretrainCfgNode()
    # torchvision ResNet of the checkpoint (must match it): resnet18/34/50/101/152, wide_resnet*
    cfg.MODEL.ARCH = "resnet50"
    # checkpoint to evaluate: ours (encoder_q.*), MoCo's (module.encoder_q.*), torchvision's
    cfg.MODEL.WEIGHTS = ""

    cfg.INPUT = PretrainCfgNode()
    # crop size: RandomResizedCrop(SIZE) for train, CenterCrop(SIZE) for val
    cfg.INPUT.SIZE = 224
    # shorter side before the val center crop; 0 = round(SIZE * 256 / 224) (256 for 224)
    cfg.INPUT.RESIZE = 0

    cfg.DATASETS = PretrainCfgNode()
    # ImageFolder root holding <TRAIN_SPLIT>/<class>/*.jpg and <VAL_SPLIT>/<class>/*.jpg
    cfg.DATASETS.ROOT = "datasets/imagenet"
    cfg.DATASETS.TRAIN_SPLIT = "train"
    cfg.DATASETS.VAL_SPLIT = "val"

    cfg.SOLVER = PretrainCfgNode()
    # global batch over all processes
    cfg.SOLVER.IMS_PER_BATCH = 256
    # used as is, whatever the batch size (MoCo does not scale the linear-eval lr)
    cfg.SOLVER.BASE_LR = 30.0
    cfg.SOLVER.MOMENTUM = 0.9
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    # length in epochs of DATASETS.TRAIN_SPLIT (ignored if MAX_ITER > 0)
    cfg.SOLVER.EPOCHS = 100
    # length in iterations; > 0 overrides EPOCHS (the lr drops stay at LR_DROP_EPOCHS)
    cfg.SOLVER.MAX_ITER = 0
    # multiply the lr by GAMMA at the start of each of these epochs (MoCo: 60, 80)
    cfg.SOLVER.LR_DROP_EPOCHS = (60, 80)
    cfg.SOLVER.GAMMA = 0.1
    # save model_{iter:07d}.pth every this many epochs (may be fractional; model_final.pth always)
    cfg.SOLVER.CHECKPOINT_PERIOD_EPOCHS = 1.0
    # keep only the newest this many periodic checkpoints (0 = keep all)
    cfg.SOLVER.MAX_TO_KEEP = 2

    cfg.TEST = PretrainCfgNode()
    # also evaluate top-1/top-5 on VAL_SPLIT every this many epochs (0 = only at the end)
    cfg.TEST.EVAL_PERIOD_EPOCHS = 0.0
    # global batch of the val pass and of the feature extraction
    cfg.TEST.IMS_PER_BATCH = 256
    # also report the weighted kNN top-1 of the frozen backbone (val against train, eval-transform
    # features, cosine similarity; no training). Without CACHED_FEATURES it costs one extra
    # feature-extraction pass over both splits. False: skipped (results.json knn_top1 null)
    cfg.TEST.KNN = True
    # neighbours that vote (capped at the number of train images)
    cfg.TEST.KNN_K = 20
    # temperature of the vote: neighbour j weighs exp(cosine_j / KNN_T)
    cfg.TEST.KNN_T = 0.1

    # train the fc on features of center crops extracted once (fast; NOT the paper protocol,
    # which augments every epoch). Set by the CLI flag --cached-features.
    cfg.CACHED_FEATURES = False

    cfg.DATALOADER = PretrainCfgNode()
    # worker processes per training process (0 = load in the main process)
    cfg.DATALOADER.NUM_WORKERS = 8
    # page-locked host memory for faster host->GPU copies (only used with CUDA)
    cfg.DATALOADER.PIN_MEMORY = True
    cfg.DATALOADER.PERSISTENT_WORKERS = True
    cfg.DATALOADER.PREFETCH_FACTOR = 2

    # where config.yaml, log.txt, metrics.json, events, checkpoints and results.json go
    cfg.OUTPUT_DIR = "output/lincls/r50_100ep"
    # name of the pre-training in results.json; "" = the checkpoint's meta.name, else its file name
    cfg.NAME = ""
    # seeds the fc initialisation and the data order (augmentations are seeded per sample)
    cfg.SEED = 0
    # print a progress line (loss, ETA, images/s, lr) every this many iterations
    cfg.LOG_PERIOD = 20
    # cudnn.benchmark (read by detectron2's default_setup)
    cfg.CUDNN_BENCHMARK = True


def get_lincls_cfg() -> PretrainCfgNode:
    """A fresh config holding the linear-evaluation defaults."""
    cfg = PretrainCfgNode()
    add_lincls_config(cfg)
    return cfg


def load_lincls_cfg(
    config_file: str, opts: list[str] | None = None, check_paths: bool = True
) -> PretrainCfgNode:
    """Defaults <- ``config_file`` (with ``_BASE_``) <- ``KEY VALUE`` overrides, validated.

    Every mistake (unknown key, wrong type, missing file) is one :class:`UserError` sentence.
    """
    cfg = merge_config(get_lincls_cfg(), config_file, opts, "pretrain/lincls.py")
    validate_lincls_cfg(cfg, check_paths=check_paths)
    return cfg


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


def validate_lincls_cfg(cfg: PretrainCfgNode, check_paths: bool = True) -> None:
    """Reject values that cannot work, each with one sentence naming the key."""
    s = cfg.SOLVER
    arch = cfg.MODEL.ARCH
    _need(arch in ARCHS, f"MODEL.ARCH {arch!r} is unknown; choose one of {ARCHS}.")
    _need(s.IMS_PER_BATCH >= 1, f"SOLVER.IMS_PER_BATCH must be >= 1, got {s.IMS_PER_BATCH}.")
    _need(s.BASE_LR > 0, f"SOLVER.BASE_LR must be > 0, got {s.BASE_LR}.")
    _need(s.WEIGHT_DECAY >= 0 and s.MOMENTUM >= 0, "SOLVER.WEIGHT_DECAY and MOMENTUM must be >= 0.")
    _need(s.MAX_ITER > 0 or s.EPOCHS > 0, "set SOLVER.EPOCHS or SOLVER.MAX_ITER to be positive.")
    drops = list(s.LR_DROP_EPOCHS)
    _need(
        all(d > 0 for d in drops) and drops == sorted(set(drops)),
        f"SOLVER.LR_DROP_EPOCHS {tuple(drops)} must be strictly increasing positive epochs.",
    )
    _need(0 < s.GAMMA <= 1, f"SOLVER.GAMMA must be in (0, 1], got {s.GAMMA}.")
    _need(s.CHECKPOINT_PERIOD_EPOCHS > 0, "SOLVER.CHECKPOINT_PERIOD_EPOCHS must be > 0.")
    _need(cfg.TEST.EVAL_PERIOD_EPOCHS >= 0, "TEST.EVAL_PERIOD_EPOCHS must be >= 0.")
    _need(cfg.TEST.IMS_PER_BATCH >= 1, "TEST.IMS_PER_BATCH must be >= 1.")
    _need(cfg.TEST.KNN_K >= 1, f"TEST.KNN_K must be >= 1, got {cfg.TEST.KNN_K}.")
    _need(cfg.TEST.KNN_T > 0, f"TEST.KNN_T must be > 0, got {cfg.TEST.KNN_T}.")
    _need(cfg.INPUT.SIZE >= 8, f"INPUT.SIZE must be at least 8 pixels, got {cfg.INPUT.SIZE}.")
    _need(
        cfg.INPUT.RESIZE == 0 or cfg.INPUT.RESIZE >= cfg.INPUT.SIZE,
        "INPUT.RESIZE must be 0 (automatic) or at least INPUT.SIZE.",
    )
    _need(cfg.DATALOADER.NUM_WORKERS >= 0, "DATALOADER.NUM_WORKERS must be >= 0.")
    _need(cfg.LOG_PERIOD > 0, "LOG_PERIOD must be > 0.")
    _need(bool(cfg.OUTPUT_DIR), "OUTPUT_DIR must not be empty.")
    if check_paths:
        for key in ("TRAIN_SPLIT", "VAL_SPLIT"):
            path = os.path.join(cfg.DATASETS.ROOT, cfg.DATASETS[key])
            _need(
                os.path.isdir(path),
                f"DATASETS.ROOT/{key} {path} is not a folder; point DATASETS.ROOT at an "
                "ImageFolder root (e.g. datasets/shapes/imagefolder from tools/make_shapes.py).",
            )


# --------------------------------------------------------------------------------------------
# Input weights
# --------------------------------------------------------------------------------------------


@dataclass
class PretrainedWeights:
    """A backbone found in a checkpoint, in torchvision names.

    Attributes:
        path: the file it came from.
        kind: ``pretrain`` (ours), ``moco``, ``lincls`` (ours) or ``torchvision``.
        backbone: every backbone tensor (no ``fc.*``).
        fc: ``fc.weight`` / ``fc.bias`` when the checkpoint holds a linear classifier (lincls or
            torchvision checkpoints), else empty; only ``--eval-only`` uses it.
        meta: what the checkpoint says about its pre-training (docs/formats.md ``meta``).
        file_meta: the file's own ``meta`` as stored (for a linear-eval checkpoint: its
            ``seed``, ``top1``, ...; ``meta`` holds the pre-training's), else empty.
    """

    path: str
    kind: str
    backbone: dict[str, torch.Tensor]
    fc: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    file_meta: dict[str, Any] = field(default_factory=dict)


def _arch_name(depth: int, width_per_group: int, groups: int) -> str:
    """torchvision constructor name of an inferred ResNet shape (for error messages)."""
    if groups == 1 and width_per_group == 128:
        return f"wide_resnet{depth}_2"
    if groups == 1 and width_per_group == 64:
        return f"resnet{depth}"
    return f"a ResNeXt-{depth} {groups}x{width_per_group}d"


def _checkpoint_arch(backbone: dict[str, torch.Tensor]) -> str | None:
    """The architecture the tensors describe, or None when they describe no full ResNet."""
    # transfer.convert reads depth, width and groups off the tensors; reuse it (import here: the
    # transfer package is optional for everything else in pretrain/)
    from pretrain.checkpoints import infer_resnet_arch

    try:
        a = infer_resnet_arch(backbone)
    except UserError:
        return None
    return _arch_name(a.depth, a.width_per_group, a.num_groups)


def _reference_shapes(arch: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _check_backbone(backbone: dict[str, torch.Tensor], arch: str, path: str) -> None:
    """Strict: every backbone tensor of ``arch`` present with its shape, nothing else.

    ``num_batches_tracked`` counters may be absent (old torchvision files lack them; they do not
    affect an eval-mode forward)."""
    reference = {k: s for k, s in _reference_shapes(arch).items() if not k.startswith("fc.")}
    missing = [k for k in reference if k not in backbone and not k.endswith(_BN_COUNTER)]
    wrong = [k for k in reference if k in backbone and tuple(backbone[k].shape) != reference[k]]
    extra = [k for k in backbone if k not in reference]
    if not (missing or wrong or extra):
        return
    actual = _checkpoint_arch(backbone)
    if actual is not None and actual != arch:
        raise UserError(
            f"{path}: holds a {actual} backbone but MODEL.ARCH is {arch}; set MODEL.ARCH {actual}."
        )
    if missing:
        raise UserError(
            f"{path}: {len(missing)} backbone tensor(s) of a {arch} are missing, e.g. "
            f"{', '.join(missing[:3])}; the checkpoint is incomplete or not a {arch}."
        )
    if wrong:
        k = wrong[0]
        raise UserError(
            f"{path}: {len(wrong)} backbone tensor(s) have the wrong shape for a {arch}, e.g. {k} "
            f"{tuple(backbone[k].shape)} instead of {reference[k]}; check MODEL.ARCH."
        )
    raise UserError(
        f"{path}: {len(extra)} tensor(s) are not part of a {arch} backbone, e.g. "
        f"{', '.join(extra[:3])}; check MODEL.ARCH (refusing to ignore them)."
    )


def load_pretrained(path: str, arch: str, unsafe: bool = False) -> PretrainedWeights:
    """Read MODEL.WEIGHTS and return its backbone, checked strictly against ``arch``.

    Recognised by content (``transfer.convert.extract_backbone``): our pretraining checkpoints
    (``encoder_q.*`` minus the projection head ``encoder_q.fc.*``), MoCo's
    (``state_dict`` / ``module.encoder_q.*``), our linear-eval checkpoints and torchvision state
    dicts (with or without ``module.``). Anything else, a missing backbone tensor, a wrong shape
    or an architecture other than ``arch`` raises :class:`UserError`.
    """
    from pretrain.checkpoints import extract_backbone

    if not path:
        raise UserError("MODEL.WEIGHTS is empty; set it to the checkpoint to evaluate.")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory; pass a checkpoint (e.g. {path}/model_final.pth).")
    obj = load_checkpoint(path, unsafe=unsafe)
    file_meta = obj.get("meta") if isinstance(obj, dict) else None
    file_meta = dict(file_meta) if isinstance(file_meta, dict) else {}
    extracted = extract_backbone(obj, path)
    sd = extracted.state_dict
    backbone = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    fc: dict[str, torch.Tensor] = {}
    if extracted.kind in ("lincls", "torchvision") and {"fc.weight", "fc.bias"} <= set(sd):
        fc = {"fc.weight": sd["fc.weight"], "fc.bias": sd["fc.bias"]}
    meta = dict(extracted.meta)
    meta_arch = meta.get("arch")
    if isinstance(meta_arch, str) and meta_arch in ARCHS and meta_arch != arch:
        raise UserError(
            f"{path}: its meta says it is a {meta_arch} but MODEL.ARCH is {arch}; "
            f"set MODEL.ARCH {meta_arch}."
        )
    _check_backbone(backbone, arch, path)
    return PretrainedWeights(path, extracted.kind, backbone, fc, meta, file_meta)


def build_linear_model(
    arch: str, num_classes: int, weights: PretrainedWeights, seed: int = 0
) -> torchvision.models.ResNet:
    """A torchvision ResNet with the backbone of ``weights`` (frozen: ``requires_grad`` False)
    and a fresh ``fc`` (N(0, 0.01^2) weights drawn from ``seed``, zero bias), in eval mode."""
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    result = net.load_state_dict(weights.backbone, strict=False)
    allowed = {"fc.weight", "fc.bias"}
    not_loaded = [
        k for k in result.missing_keys if k not in allowed and not k.endswith(_BN_COUNTER)
    ]
    # _check_backbone guarantees this; a failure here is a bug, not bad input
    assert not not_loaded and not result.unexpected_keys, (not_loaded, result.unexpected_keys)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=g) * FC_INIT_STD)
        net.fc.bias.zero_()
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    return net.eval()


# --------------------------------------------------------------------------------------------
# The sanity check
# --------------------------------------------------------------------------------------------


class BackboneChangedError(RuntimeError):
    """A backbone tensor differs from MODEL.WEIGHTS after linear evaluation: a bug (e.g. BN in
    train mode updating its running statistics, or the optimizer reaching the backbone)."""


def check_backbone_unchanged(
    net: nn.Module, reference: dict[str, torch.Tensor], source: str = "MODEL.WEIGHTS"
) -> int:
    """Compare every backbone tensor of ``net`` (everything but ``fc.*``) with ``reference``
    bit for bit, like MoCo's ``sanity_check``; returns the number of tensors checked.

    Raises :class:`BackboneChangedError` naming the changed tensors.
    """
    current = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    changed = []
    checked = 0
    for k, v in current.items():
        if k not in reference:
            if k.endswith(_BN_COUNTER):
                continue  # absent from old torchvision files (see _check_backbone)
            changed.append(f"{k} (not in {source})")
            continue
        ref = reference[k].to(device=v.device, dtype=v.dtype)
        checked += 1
        if not torch.equal(v, ref):
            diff = (v.double() - ref.double()).abs().max().item()
            changed.append(f"{k} (max abs diff {diff:.3g})")
    if changed:
        raise BackboneChangedError(
            f"{len(changed)} backbone tensor(s) differ from {source} after linear evaluation, "
            f"e.g. {', '.join(changed[:3])}: the frozen backbone was modified."
        )
    return checked


# --------------------------------------------------------------------------------------------
# Features, model, trainer
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(
    net: torchvision.models.ResNet,
    dataset: Dataset,
    device: torch.device,
    batch_size_per_rank: int,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pooled backbone features (not normalised) and labels of the whole dataset, on CPU,
    in dataset order, on every rank (collective: each rank extracts its shard, then all-gather).

    ``net`` must be in eval mode (it is: :func:`build_linear_model`)."""
    assert not net.training, "features of a frozen backbone are extracted in eval mode"
    loader = build_eval_loader(
        dataset,
        batch_size_per_rank,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    feats, labels = [], []
    for images, targets in loader:
        feats.append(backbone_features(net, images.to(device, non_blocking=True)).float().cpu())
        labels.append(targets)
    dim = net.fc.in_features
    local_f = torch.cat(feats) if feats else torch.zeros(0, dim)
    local_y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    if comm.get_world_size() == 1:
        return local_f, local_y
    return torch.cat(comm.all_gather(local_f)), torch.cat(comm.all_gather(local_y))


@dataclass
class CachedFeatures:
    """Backbone features (CPU, dataset order) of the train and val splits, as
    :func:`extract_features` returns them."""

    train: torch.Tensor
    train_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor


class FeatureDataset(Dataset):
    """Cached features as a dataset for :func:`pretrain.data.build_train_loader`.

    Indices may be ``(index, seed)`` pairs (the loader seeds every sample; features need no
    augmentation, so the seed is ignored). ``root`` names the image folder in error messages.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, root: str = "") -> None:
        self.features = features
        self.labels = labels
        self.root = root

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(index, (tuple, list)):
            index = index[0]
        return self.features[index], self.labels[index]


class LinearClassifier(nn.Module):
    """Frozen backbone + linear head; ``forward(inputs, labels) -> {"loss_cls": CE}``.

    ``inputs`` are images, or features when ``from_features`` (cached mode). The backbone is in
    eval mode whatever ``train()`` is called with: BN statistics are never updated (the classic
    linear-eval bug). ``head`` is ``net.fc``, wrapped in DDP with more than one process.
    """

    def __init__(
        self, net: torchvision.models.ResNet, head: nn.Module, from_features: bool
    ) -> None:
        super().__init__()
        self.net = net
        self.head = head
        self.from_features = from_features

    def train(self, mode: bool = True) -> LinearClassifier:
        super().train(mode)
        self.net.eval()
        return self

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.from_features:
            return inputs
        with torch.no_grad():
            return backbone_features(self.net, inputs)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.features(inputs))
        return {"loss_cls": F.cross_entropy(logits, labels)}


class LinearTrainer(SimpleTrainer):
    """detectron2 ``SimpleTrainer`` whose step feeds ``(inputs, labels)`` to a
    :class:`LinearClassifier` and stops on a NaN/inf loss before the update."""

    def __init__(
        self,
        model: LinearClassifier,
        data_loader: Any,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
    ) -> None:
        super().__init__(model, data_loader, optimizer)
        self.device = device

    def run_step(self) -> None:
        assert self.model.training, "model was switched to eval mode"
        start = time.perf_counter()
        inputs, labels = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        inputs = inputs.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        loss_dict = self.model(inputs, labels)
        check_finite(loss_dict, self.iter)
        self.optimizer.zero_grad(set_to_none=True)
        sum(loss_dict.values()).backward()
        self.after_backward()
        SimpleTrainer.write_metrics(loss_dict, data_time, self.iter)
        self.optimizer.step()


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> list[int]:
    """Number of rows whose label is among the ``k`` highest logits, for each ``k`` (capped at
    the number of classes)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top == labels[:, None]
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


def _accuracy(counts: Sequence[int], total: int) -> dict[str, float]:
    if total == 0:
        raise UserError("the val split has no images to evaluate.")
    return {"top1": 100.0 * counts[0] / total, "top5": 100.0 * counts[1] / total}


@torch.no_grad()
def _evaluate_images(
    net: torchvision.models.ResNet,
    val_set: Dataset,
    device: torch.device,
    batch_size_per_rank: int,
    num_workers: int,
) -> dict[str, float]:
    """Top-1 / top-5 (%) of ``net`` (backbone + fc, eval mode) on ``val_set`` (collective)."""
    loader = build_eval_loader(
        val_set, batch_size_per_rank, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    counts, total = [0, 0], 0
    with inference_context(net):
        for images, labels in loader:
            logits = net.fc(backbone_features(net, images.to(device, non_blocking=True)))
            c = topk_correct(logits.float().cpu(), labels, (1, 5))
            counts = [a + b for a, b in zip(counts, c)]
            total += len(labels)
    gathered = comm.all_gather((counts, total))
    counts = [sum(g[0][i] for g in gathered) for i in range(2)]
    return _accuracy(counts, sum(g[1] for g in gathered))


@torch.no_grad()
def _evaluate_features(
    fc: nn.Module, features: torch.Tensor, labels: torch.Tensor, device: torch.device
) -> dict[str, float]:
    """Top-1 / top-5 (%) of ``fc`` on cached features (every rank holds all of them)."""
    counts = [0, 0]
    for start in range(0, len(labels), 4096):
        logits = fc(features[start : start + 4096].to(device)).float().cpu()
        c = topk_correct(logits, labels[start : start + 4096], (1, 5))
        counts = [a + b for a, b in zip(counts, c)]
    return _accuracy(counts, len(labels))


# at most this many similarities (float32) per kNN chunk: 256 MiB, whatever the train size
_KNN_CHUNK_ELEMENTS = 2**26


def _normalized_copy(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``F.normalize(x, dim=1)`` on ``device`` with one copy of ``x`` (ImageNet train features of
    a ResNet-50 are 10 GB), never modifying ``x``."""
    out = x.to(device=device, dtype=torch.float32, copy=True)
    return out.div_(out.norm(dim=1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def knn_accuracy(
    features: CachedFeatures,
    num_classes: int,
    k: int,
    t: float,
    device: torch.device | None = None,
) -> float:
    """Weighted kNN top-1 (%) of the val features against the train features.

    Both are L2-normalised here (copies: the cached features stay as they are), so similarities
    are cosines; :func:`pretrain.knn.knn_predict` votes with ``exp(cos / t)`` over the ``k``
    nearest train features. Collective: every rank holds all features (:func:`extract_features`
    gathers them), classifies every ``world``-th val row on ``device`` and the counts are summed.
    """
    # every rank holds the same features: these checks agree on all of them
    if not len(features.val_labels):
        raise UserError("the val split has no images to evaluate.")
    if not len(features.train_labels):
        raise UserError("the train split has no images: the kNN evaluation needs them.")
    device = device or torch.device("cpu")
    rank, world = comm.get_rank(), comm.get_world_size()
    train = _normalized_copy(features.train, device)
    train_y = features.train_labels.to(device)
    val = _normalized_copy(features.val[rank::world], device)
    val_y = features.val_labels[rank::world]
    chunk = max(1, min(1024, _KNN_CHUNK_ELEMENTS // len(train_y)))
    pred = knn_predict(train, train_y, val, num_classes, k, t, chunk=chunk).cpu()
    gathered = comm.all_gather((int((pred == val_y).sum()), len(val_y)))
    return 100.0 * sum(g[0] for g in gathered) / sum(g[1] for g in gathered)


def _knn_features(
    net: torchvision.models.ResNet,
    cfg: PretrainCfgNode,
    val_set: RobustImageFolder,
    device: torch.device,
    batch_size_per_rank: int,
) -> CachedFeatures:
    """Features of the train split through the *eval* transform (as the val split's) and of the
    val split: one extraction pass over each (collective, like the cached features)."""
    tf = eval_transform(cfg.INPUT.SIZE, cfg.INPUT.RESIZE or None)
    train_set = build_image_folder(cfg.DATASETS.ROOT, cfg.DATASETS.TRAIN_SPLIT, tf)
    if train_set.classes != val_set.classes:
        raise UserError(
            f"{val_set.root}: its class folders differ from those of {train_set.root}; the kNN "
            "evaluation needs the same classes in both splits (or set TEST.KNN False)."
        )
    logger.info(
        "Extracting eval-transform features of %d train + %d val images for the kNN top-1...",
        len(train_set),
        len(val_set),
    )
    args = (device, batch_size_per_rank, cfg.DATALOADER.NUM_WORKERS)
    train, train_labels = extract_features(net, train_set, *args)
    val, val_labels = extract_features(net, val_set, *args)
    bad = count_bad_files(train_set)
    if bad:
        logger.warning("%d unreadable train images were skipped by the kNN extraction.", bad)
    return CachedFeatures(train, train_labels, val, val_labels)


def _knn_top1(
    net: torchvision.models.ResNet,
    cfg: PretrainCfgNode,
    val_set: RobustImageFolder,
    num_classes: int,
    device: torch.device,
    batch_size_per_rank: int,
    features: CachedFeatures | None = None,
) -> float | None:
    """TEST.KNN's top-1 (%) of ``net``'s frozen backbone (:func:`knn_accuracy` with TEST.KNN_K /
    KNN_T), logged; None when TEST.KNN is False. ``features``: eval-transform features of both
    splits already extracted (cached mode), else one extraction pass (collective)."""
    if not cfg.TEST.KNN:
        return None
    if features is None:
        features = _knn_features(net, cfg, val_set, device, batch_size_per_rank)
    top1 = knn_accuracy(features, num_classes, cfg.TEST.KNN_K, cfg.TEST.KNN_T, device)
    logger.info(
        "kNN top-1 %.2f%% (k=%d, T=%g; %d val against %d train images, eval-transform features "
        "of the frozen backbone)",
        top1,
        cfg.TEST.KNN_K,
        cfg.TEST.KNN_T,
        len(features.val_labels),
        len(features.train_labels),
    )
    return top1


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _default_name(cfg: PretrainCfgNode, weights: PretrainedWeights) -> str:
    """cfg.NAME, else the pre-training's meta.name, else the checkpoint's file name without its
    extension (the rule transfer.convert applies, so later stages find the same name)."""
    if cfg.NAME:
        return cfg.NAME
    if weights.meta.get("name"):
        return str(weights.meta["name"])
    stem = os.path.basename(weights.path)
    return re.sub(r"(\.pth\.tar|\.pth|\.pt|\.tar|\.ckpt|\.pkl)$", "", stem)


def _datasets(cfg: PretrainCfgNode) -> tuple[RobustImageFolder, RobustImageFolder]:
    size, resize = cfg.INPUT.SIZE, cfg.INPUT.RESIZE or None
    val_tf = eval_transform(size, resize)
    # cached mode: one feature per image, so the train split gets the deterministic val transform
    train_tf = val_tf if cfg.CACHED_FEATURES else lincls_train_transform(size)
    train = build_image_folder(cfg.DATASETS.ROOT, cfg.DATASETS.TRAIN_SPLIT, train_tf)
    val = build_image_folder(cfg.DATASETS.ROOT, cfg.DATASETS.VAL_SPLIT, val_tf)
    if train.classes != val.classes:
        raise UserError(
            f"{val.root}: its class folders differ from those of {train.root} "
            f"({len(val.classes)} vs {len(train.classes)}); both splits need the same classes."
        )
    return train, val


def _per_rank(total: int, key: str) -> int:
    world = comm.get_world_size()
    if total % world:
        raise UserError(
            f"{key}={total} is not divisible by the number of processes ({world}); "
            "pick a multiple of it."
        )
    return total // world


def _knn_results(cfg: PretrainCfgNode, top1: float | None) -> dict[str, Any]:
    """The results.json kNN keys: all None when TEST.KNN is False."""
    on = bool(cfg.TEST.KNN)
    return {
        "knn_top1": top1,
        "knn_k": int(cfg.TEST.KNN_K) if on else None,
        "knn_t": float(cfg.TEST.KNN_T) if on else None,
    }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


class LinearEvaluator:
    """Data, frozen backbone, fc, optimizer, schedule, checkpoints and hooks of one linear eval.

    Call on every process (after :func:`pretrain.engine.setup_run` for log.txt/config.yaml)::

        results = LinearEvaluator(cfg).resume_or_load(resume=True).train()

    Args:
        cfg: a config from :func:`load_lincls_cfg`.
        unsafe: allow MODEL.WEIGHTS files that need code execution to load (trusted files only).
        weights: an already loaded :class:`PretrainedWeights` (sweeps); default: MODEL.WEIGHTS.
        features: cached mode only: the :attr:`features` of an earlier evaluator with the same
            MODEL.WEIGHTS, INPUT and DATASETS (sweeps over the fc's hyper-parameters then skip
            the extraction).
    """

    def __init__(
        self,
        cfg: PretrainCfgNode,
        unsafe: bool = False,
        weights: PretrainedWeights | None = None,
        features: CachedFeatures | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = get_device()
        if comm.is_main_process():
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        self.cached = bool(cfg.CACHED_FEATURES)
        self.weights = weights or load_pretrained(cfg.MODEL.WEIGHTS, cfg.MODEL.ARCH, unsafe)
        self.name = _default_name(cfg, self.weights)
        self.train_set, self.val_set = _datasets(cfg)
        self.num_classes = len(self.train_set.classes)
        seed = cfg.SEED if cfg.SEED >= 0 else int(torch.randint(0, 2**31, ()).item())
        self.net = build_linear_model(cfg.MODEL.ARCH, self.num_classes, self.weights, seed)
        self.net.to(self.device)
        cuda = self.device.type == "cuda"
        self.test_per_rank = _per_rank(cfg.TEST.IMS_PER_BATCH, "TEST.IMS_PER_BATCH")
        workers = cfg.DATALOADER.NUM_WORKERS

        self.features: CachedFeatures | None = None
        if self.cached:
            self.features = features or self._extract(workers)
            sizes = (len(self.features.train_labels), len(self.features.val_labels))
            if sizes != (len(self.train_set), len(self.val_set)):
                raise UserError(
                    "the cached features passed in do not match the datasets' sizes; extract "
                    "them with the same DATASETS and MODEL.WEIGHTS."
                )
            train_data: Dataset = FeatureDataset(
                self.features.train, self.features.train_labels, self.train_set.root
            )
            workers = 0  # in memory already: worker processes would only copy the tensors
        else:
            train_data = self.train_set
        self.loader = build_train_loader(
            train_data,
            cfg.SOLVER.IMS_PER_BATCH,
            num_workers=workers,
            seed=max(cfg.SEED, 0),
            pin_memory=cfg.DATALOADER.PIN_MEMORY and cuda,
            persistent_workers=cfg.DATALOADER.PERSISTENT_WORKERS,
            prefetch_factor=cfg.DATALOADER.PREFETCH_FACTOR,
        )
        ipe = self.iters_per_epoch = self.loader.batches_per_epoch
        self.max_iter = cfg.SOLVER.MAX_ITER or max(int(round(cfg.SOLVER.EPOCHS * ipe)), 1)

        ddp_kwargs: dict[str, Any] = {"broadcast_buffers": False}
        if not cuda:
            ddp_kwargs["device_ids"] = None
        # DDP over the fc only: the frozen backbone has no gradient to synchronise
        self.model = LinearClassifier(
            self.net, create_ddp_model(self.net.fc, **ddp_kwargs), from_features=self.cached
        )
        params = [p for p in self.net.parameters() if p.requires_grad]
        assert len(params) == 2, "only fc.weight and fc.bias are trained"  # as MoCo's main_lincls
        self.optimizer = torch.optim.SGD(
            params,
            lr=cfg.SOLVER.BASE_LR,
            momentum=cfg.SOLVER.MOMENTUM,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
        # lr x GAMMA at the first iteration of each drop epoch (MoCo adjusts per epoch)
        self.milestones = [int(round(e * ipe)) for e in cfg.SOLVER.LR_DROP_EPOCHS]
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, self.milestones, gamma=cfg.SOLVER.GAMMA
        )
        self.trainer = LinearTrainer(self.model, self.loader, self.optimizer, self.device)
        self.checkpointer = AtomicCheckpointer(
            self.net,
            cfg.OUTPUT_DIR,
            meta_fn=self.meta,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            loader=self.loader,
            rng=RNGStates(),
        )
        self.last_eval: dict[str, float] = {}
        self.last_knn_top1: float | None = None
        self.trainer.register_hooks(self.build_hooks())
        self.start_iter = 0
        logger.info(
            "Linear eval (%s) of %s [%s checkpoint %s]: %s, %d train / %d val images, %d classes, "
            "%d processes, global batch %d, %d iterations/epoch, %d iterations (%.2f epochs); "
            "lr %.4g (as configured, not scaled with the batch size), x%g at iterations %s",
            _PROTOCOL[self.cached],
            self.name,
            self.weights.kind,
            self.weights.path,
            cfg.MODEL.ARCH,
            len(self.train_set),
            len(self.val_set),
            self.num_classes,
            comm.get_world_size(),
            cfg.SOLVER.IMS_PER_BATCH,
            ipe,
            self.max_iter,
            self.max_iter / max(ipe, 1),
            cfg.SOLVER.BASE_LR,
            cfg.SOLVER.GAMMA,
            self.milestones,
        )

    def _extract(self, workers: int) -> CachedFeatures:
        logger.info(
            "Extracting features of %d train + %d val images (center crops, eval mode)...",
            len(self.train_set),
            len(self.val_set),
        )
        args = (self.device, self.test_per_rank, workers)
        train, train_labels = extract_features(self.net, self.train_set, *args)
        val, val_labels = extract_features(self.net, self.val_set, *args)
        return CachedFeatures(train, train_labels, val, val_labels)

    def _epochs_to_iters(self, epochs: float) -> int:
        return max(int(round(epochs * self.iters_per_epoch)), 1) if epochs > 0 else 0

    def build_hooks(self) -> list[hooks.HookBase]:
        cfg = self.cfg
        max_keep = cfg.SOLVER.MAX_TO_KEEP if cfg.SOLVER.MAX_TO_KEEP > 0 else None
        ret: list[hooks.HookBase] = [
            hooks.IterationTimer(),
            hooks.LRScheduler(self.optimizer, self.scheduler),
            ProgressHook(cfg.SOLVER.IMS_PER_BATCH, self.loader.epochs_done),
            hooks.PeriodicCheckpointer(
                self.checkpointer,
                self._epochs_to_iters(cfg.SOLVER.CHECKPOINT_PERIOD_EPOCHS),
                max_to_keep=max_keep,
            ),
            # periodic evals, and the final one after the last iteration
            hooks.EvalHook(self._epochs_to_iters(cfg.TEST.EVAL_PERIOD_EPOCHS), self.evaluate),
        ]
        if comm.is_main_process():
            # last, so that it writes what the other hooks put into the storage this step
            ret.append(
                hooks.PeriodicWriter(build_writers(cfg.OUTPUT_DIR, self.max_iter), cfg.LOG_PERIOD)
            )
        return ret

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Top-1 / top-5 (%) on the val split (collective); also kept in :attr:`last_eval`."""
        if self.cached:
            f = self.features
            acc = _evaluate_features(self.net.fc, f.val, f.val_labels, self.device)
        else:
            acc = _evaluate_images(
                self.net,
                self.val_set,
                self.device,
                self.test_per_rank,
                self.cfg.DATALOADER.NUM_WORKERS,
            )
        self.last_eval = acc
        logger.info(
            "Val top-1 %.2f%%, top-5 %.2f%% (%d images) after %.2f epochs",
            acc["top1"],
            acc["top5"],
            len(self.val_set),
            self.loader.epochs_done(),
        )
        return {"val": acc}

    def knn_eval(self) -> float | None:
        """Weighted kNN top-1 (%) of the frozen backbone, val against train (:func:`knn_accuracy`
        with TEST.KNN_K / KNN_T), or None when TEST.KNN is False; also kept in
        :attr:`last_knn_top1` (collective).

        Cached mode reuses :attr:`features` (both splits already through the eval transform);
        the image protocol extracts both splits once with the eval transform."""
        self.last_knn_top1 = _knn_top1(
            self.net,
            self.cfg,
            self.val_set,
            self.num_classes,
            self.device,
            self.test_per_rank,
            self.features,
        )
        return self.last_knn_top1

    def meta(self) -> dict[str, Any]:
        """The checkpoint's ``meta`` (docs/formats.md): kind ``lincls``, the last val accuracy
        and the ``meta`` of the pre-training checkpoint under ``pretrain``."""
        cfg = self.cfg
        return {
            "kind": "lincls",
            "name": self.name,
            "arch": cfg.MODEL.ARCH,
            "num_classes": self.num_classes,
            "top1": self.last_eval.get("top1"),
            "top5": self.last_eval.get("top5"),
            "knn_top1": self.last_knn_top1,
            "seed": int(cfg.SEED),
            "epochs": float(self.loader.epochs_done()),
            "iteration": int(self.trainer.iter) + 1,
            "ims_per_batch": int(cfg.SOLVER.IMS_PER_BATCH),
            "cached_features": self.cached,
            "weights": os.path.abspath(self.weights.path),
            "pretrain": dict(self.weights.meta),
        }

    def resume_or_load(self, resume: bool = True) -> LinearEvaluator:
        """With ``resume`` and a ``last_checkpoint`` in OUTPUT_DIR, restore fc, optimizer,
        scheduler, loader position and RNG states; else start at iteration 0."""
        if resume and self.checkpointer.has_checkpoint():
            extra = self.checkpointer.resume_or_load("", resume=True)
            self.start_iter = int(extra["iteration"]) + 1
            last = self.checkpointer.get_checkpoint_file()
            try:
                check_backbone_unchanged(self.net, self.weights.backbone, self.weights.path)
            except BackboneChangedError as e:
                raise UserError(
                    f"{last}: its backbone is not the one in MODEL.WEIGHTS {self.weights.path}; "
                    "resume with the same MODEL.WEIGHTS or use a fresh OUTPUT_DIR."
                ) from e
            logger.info(
                "Resumed at iteration %d (epoch %.3f)", self.start_iter, self.loader.epochs_done()
            )
        elif resume:
            logger.info("No checkpoint in %s: starting from scratch.", self.cfg.OUTPUT_DIR)
        return self

    @contextlib.contextmanager
    def _fc_threads(self) -> Iterator[None]:
        """One intra-op thread while training the fc on cached features on CPU.

        A [32, 512] x [512, C] step is far too small to split: extra threads only add
        synchronisation, which costs 10x in wall time on a busy machine (measured on 2 shared
        cores: 1200 steps 0.7 s with 1 thread, 6-9 s with 2). Restored afterwards."""
        if not (self.cached and self.device.type == "cpu"):
            yield
            return
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)

    def train(self) -> dict[str, Any]:
        """Train to ``max_iter``, evaluate, run the sanity check, save ``model_final.pth`` with
        the accuracy in its meta and write ``results.json`` (returned)."""
        if self.start_iter >= self.max_iter:
            logger.info("Already trained for %d iterations; evaluating.", self.max_iter)
            self.trainer.iter = self.max_iter - 1
            self.evaluate()
        else:
            try:
                with self._fc_threads():
                    self.trainer.train(self.start_iter, self.max_iter)
            except NonFiniteLossError as e:
                raise UserError(
                    f"linear eval diverged: the loss became non-finite at iteration "
                    f"{e.iteration}; lower SOLVER.BASE_LR."
                ) from e
            self.trainer.iter = self.max_iter - 1  # TrainerBase leaves it at max_iter
        self.knn_eval()  # before the sanity check, which then covers its forward passes too
        checked = check_backbone_unchanged(self.net, self.weights.backbone, self.weights.path)
        logger.info("Sanity check passed: %d backbone tensors equal MODEL.WEIGHTS.", checked)
        # the hook saved model_final before the final eval; save it again with top-1 in meta
        self.checkpointer.save("model_final", iteration=self.max_iter - 1)
        bad = count_bad_files(self.train_set) + count_bad_files(self.val_set)
        if bad:
            logger.warning("%d unreadable images were skipped (listed above).", bad)
        results = {
            "kind": "lincls",
            "name": self.name,
            "top1": self.last_eval["top1"],
            "top5": self.last_eval["top5"],
            **_knn_results(self.cfg, self.last_knn_top1),
            "seed": int(self.cfg.SEED),
            "weights": os.path.abspath(self.weights.path),
            "pretrain": dict(self.weights.meta),
            "arch": self.cfg.MODEL.ARCH,
            "input_kind": self.weights.kind,
            "num_classes": self.num_classes,
            "val_images": len(self.val_set),
            "epochs": float(self.loader.epochs_done()),
            "iterations": int(self.max_iter),
            "ims_per_batch": int(self.cfg.SOLVER.IMS_PER_BATCH),
            "lr": float(self.cfg.SOLVER.BASE_LR),
            "cached_features": self.cached,
            "protocol": "cached" if self.cached else "moco",
            "skipped_images": bad,
        }
        write_results(self.cfg.OUTPUT_DIR, results)
        logger.info(
            "Linear eval of %s: top-1 %.2f%%, top-5 %.2f%%, kNN top-1 %s (%d val images, "
            "SEED %d) -> %s",
            self.name,
            results["top1"],
            results["top5"],
            _percent(results["knn_top1"]),
            results["val_images"],
            results["seed"],
            os.path.join(self.cfg.OUTPUT_DIR, "results.json"),
        )
        return results


def evaluate_weights(
    cfg: PretrainCfgNode, weights_path: str, unsafe: bool = False
) -> dict[str, Any]:
    """``--eval-only``: top-1 / top-5 of a checkpoint that already has a linear classifier for the
    val split's classes (our linear-eval checkpoint, or a supervised torchvision ResNet), and the
    kNN top-1 of its backbone as a training run reports it (TEST.KNN: one eval-transform pass over
    both splits); writes ``results.json`` (collective). ``seed`` is the SEED stored in a
    linear-eval checkpoint's meta (the run that trained its fc), else None."""
    weights = load_pretrained(weights_path, cfg.MODEL.ARCH, unsafe)
    val_tf = eval_transform(cfg.INPUT.SIZE, cfg.INPUT.RESIZE or None)
    val = build_image_folder(cfg.DATASETS.ROOT, cfg.DATASETS.VAL_SPLIT, val_tf)
    num_classes = len(val.classes)
    w = weights.fc.get("fc.weight")
    expected = (num_classes, _reference_shapes(cfg.MODEL.ARCH)["fc.weight"][1])
    if w is None or tuple(w.shape) != expected:
        shape = "no linear classifier" if w is None else f"an fc of shape {tuple(w.shape)}"
        raise UserError(
            f"{weights_path}: has {shape}, but --eval-only needs the fc of a linear eval on the "
            f"{num_classes} classes of {val.root}; train one first (drop --eval-only)."
        )
    net = build_linear_model(cfg.MODEL.ARCH, num_classes, weights)
    net.fc.load_state_dict({"weight": weights.fc["fc.weight"], "bias": weights.fc["fc.bias"]})
    device = get_device()
    per_rank = _per_rank(cfg.TEST.IMS_PER_BATCH, "TEST.IMS_PER_BATCH")
    acc = _evaluate_images(net.to(device), val, device, per_rank, cfg.DATALOADER.NUM_WORKERS)
    knn = _knn_top1(net, cfg, val, num_classes, device, per_rank)
    seed = weights.file_meta.get("seed") if weights.kind == "lincls" else None
    pretrain_meta = dict(weights.meta)
    results = {
        "kind": "lincls",
        "name": _default_name(cfg, weights),
        "top1": acc["top1"],
        "top5": acc["top5"],
        **_knn_results(cfg, knn),
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
        "Eval of %s: top-1 %.2f%%, top-5 %.2f%%, kNN top-1 %s (%d val images)",
        weights_path,
        acc["top1"],
        acc["top5"],
        _percent(knn),
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
