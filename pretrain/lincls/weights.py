"""The backbone under evaluation: read MODEL.WEIGHTS, check it strictly against MODEL.ARCH,
build the frozen ResNet with a fresh fc, and compare it with MODEL.WEIGHTS afterwards (MoCo's
sanity check, :func:`check_backbone_unchanged`).

Accepted checkpoints (recognised by content, :func:`pretrain.checkpoints.extract_backbone`): ours
(pretraining or linear eval), MoCo's and torchvision state dicts (docs/formats.md).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from torch import nn

from pretrain.config import ARCHS, PretrainCfgNode
from pretrain.io import UserError, load_checkpoint
from pretrain.lincls.model import BatchNormLinear, fold_head_bn

__all__ = [
    "FC_INIT_STD",
    "BackboneChangedError",
    "PretrainedWeights",
    "build_linear_model",
    "check_backbone_unchanged",
    "default_name",
    "load_pretrained",
    "reference_shapes",
]

# MoCo's main_lincls.py: fc.weight ~ N(0, 0.01^2), fc.bias = 0
FC_INIT_STD = 0.01
_BN_COUNTER = "num_batches_tracked"


@dataclass
class PretrainedWeights:
    """A backbone found in a checkpoint, in torchvision names.

    Attributes:
        path: the file it came from.
        kind: ``pretrain`` (ours), ``moco``, ``lincls`` (ours) or ``torchvision``.
        backbone: every backbone tensor (no ``fc.*``).
        fc: ``fc.weight`` / ``fc.bias`` when the checkpoint holds a linear classifier (lincls or
            torchvision checkpoints; a MODEL.HEAD_BN BatchNorm folded in), else empty; only
            ``--eval-only`` uses it.
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
    # the converter's reading of depth, width and groups off the tensors (pretrain.checkpoints)
    from pretrain.checkpoints import infer_resnet_arch

    try:
        a = infer_resnet_arch(backbone)
    except UserError:
        return None
    return _arch_name(a.depth, a.width_per_group, a.num_groups)


def reference_shapes(arch: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor of a torchvision ``arch`` with ``num_classes`` outputs."""
    with torch.device("meta"):  # shapes only: no memory, no init cost
        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _check_backbone(backbone: dict[str, torch.Tensor], arch: str, path: str) -> None:
    """Strict: every backbone tensor of ``arch`` present with its shape, nothing else.

    ``num_batches_tracked`` counters may be absent (old torchvision files lack them; they do not
    affect an eval-mode forward)."""
    reference = {k: s for k, s in reference_shapes(arch).items() if not k.startswith("fc.")}
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
        if {"fc.bn.running_mean", "fc.bn.running_var"} <= set(sd):
            # a linear-eval checkpoint saved during training with MODEL.HEAD_BN: its BatchNorm
            # folded into the fc (model_final.pth holds it folded already)
            w, b = fold_head_bn(
                sd["fc.weight"], sd["fc.bias"], sd["fc.bn.running_mean"], sd["fc.bn.running_var"]
            )
            fc = {"fc.weight": w, "fc.bias": b}
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
    arch: str, num_classes: int, weights: PretrainedWeights, seed: int = 0, head_bn: bool = False
) -> torchvision.models.ResNet:
    """A torchvision ResNet with the backbone of ``weights`` (frozen: ``requires_grad`` False)
    and a fresh ``fc`` (N(0, 0.01^2) weights drawn from ``seed``, zero bias), in eval mode;
    with ``head_bn`` the fc is a :class:`BatchNormLinear` (MODEL.HEAD_BN), the same draws."""
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if head_bn:
        net.fc = BatchNormLinear(net.fc.in_features, num_classes)
    result = net.load_state_dict(weights.backbone, strict=False)
    allowed = {k for k in net.state_dict() if k.startswith("fc.")}
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
# The sanity check, and the name a run reports
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


def default_name(cfg: PretrainCfgNode, weights: PretrainedWeights) -> str:
    """cfg.NAME, else the pre-training's meta.name, else the checkpoint's file name without its
    extension (the rule transfer.convert applies, so later stages find the same name)."""
    if cfg.NAME:
        return cfg.NAME
    if weights.meta.get("name"):
        return str(weights.meta["name"])
    stem = os.path.basename(weights.path)
    return re.sub(r"(\.pth\.tar|\.pth|\.pt|\.tar|\.ckpt|\.pkl)$", "", stem)
