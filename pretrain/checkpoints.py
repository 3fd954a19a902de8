"""Recognise a checkpoint by its content and extract its ResNet backbone in torchvision names.

Shared by linear evaluation (pretrain/lincls.py) and the converter (transfer/convert.py). Kinds:
our pretraining checkpoint (``meta.kind == "pretrain"``, query encoder under ``encoder_q.``), an
official MoCo / MoCo v2 checkpoint (``module.encoder_q.*``), our linear-eval checkpoint
(``meta.kind == "lincls"``) and a plain torchvision ResNet state dict (with or without ``module.``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pretrain.io import UserError

INPUT_KINDS = {
    "pretrain": "our pretraining checkpoint (query encoder `encoder_q.*`)",
    "moco": "MoCo / MoCo v2 style checkpoint (`module.encoder_q.*`)",
    "lincls": "our linear-evaluation checkpoint (torchvision ResNet + linear fc)",
    "torchvision": "torchvision ResNet state dict",
}

HEAD_PREFIX = "fc."

_DEPTHS = {  # (blocks per stage, bottleneck?) -> depth, as in torchvision and detectron2
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}


# --------------------------------------------------------------------------------------------------
# architecture


@dataclass(frozen=True)
class ResNetArch:
    """What detectron2 needs to build the same ResNet (MODEL.RESNETS.*)."""

    depth: int
    num_groups: int = 1
    width_per_group: int = 64
    stem_out_channels: int = 64
    res2_out_channels: int = 256

    @property
    def bottleneck(self) -> bool:
        return self.depth >= 50

    def name(self) -> str:
        base = f"ResNet-{self.depth}"
        if self.num_groups > 1:
            return f"ResNeXt-{self.depth} {self.num_groups}x{self.width_per_group}d"
        if self.bottleneck and self.width_per_group != 64:
            return f"{base} (width x{self.width_per_group // 64})"
        return base

    def d2_options(self) -> dict[str, Any]:
        return {
            "MODEL.RESNETS.DEPTH": self.depth,
            "MODEL.RESNETS.NUM_GROUPS": self.num_groups,
            "MODEL.RESNETS.WIDTH_PER_GROUP": self.width_per_group,
            "MODEL.RESNETS.STEM_OUT_CHANNELS": self.stem_out_channels,
            "MODEL.RESNETS.RES2_OUT_CHANNELS": self.res2_out_channels,
        }

    def torchvision_model(self) -> nn.Module:
        """The torchvision ResNet with this shape (``fc`` included, 1000 classes)."""
        from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

        blocks = next(b for (b, bottle), d in _DEPTHS.items() if d == self.depth)
        block = Bottleneck if self.bottleneck else BasicBlock
        return ResNet(
            block, list(blocks), groups=self.num_groups, width_per_group=self.width_per_group
        )


def infer_resnet_arch(state_dict: dict[str, torch.Tensor]) -> ResNetArch:
    """Read depth, groups and widths off a torchvision-named backbone state dict."""
    if "conv1.weight" not in state_dict or "layer1.0.conv1.weight" not in state_dict:
        missing = "conv1.weight" if "conv1.weight" not in state_dict else "layer1.0.conv1.weight"
        raise UserError(f"no ResNet backbone found: the key {missing} is missing.")
    blocks = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in state_dict if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(max(ids) + 1 if ids else 0)
    bottleneck = "layer1.0.conv3.weight" in state_dict
    depth = _DEPTHS.get((tuple(blocks), bottleneck))
    if depth is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise UserError(
            f"the backbone has {tuple(blocks)} {kind} blocks in layer1..layer4, which is no ResNet "
            "depth (18/34/50/101/152): blocks are missing or this is not a ResNet."
        )
    stem = int(state_dict["conv1.weight"].shape[0])
    if not bottleneck:
        return ResNetArch(depth, 1, 64, stem, int(state_dict["layer1.0.conv2.weight"].shape[0]))
    width = int(state_dict["layer1.0.conv1.weight"].shape[0])
    groups = max(1, width // int(state_dict["layer1.0.conv2.weight"].shape[1]))
    return ResNetArch(
        depth, groups, width // groups, stem, int(state_dict["layer1.0.conv3.weight"].shape[0])
    )


def check_against_reference(state_dict: dict[str, torch.Tensor], arch: ResNetArch) -> None:
    """Refuse missing, extra or wrongly shaped backbone tensors (torchvision's model decides)."""
    with torch.device("meta"):  # shapes only: no memory, no init cost
        reference = {
            k: tuple(v.shape)
            for k, v in arch.torchvision_model().state_dict().items()
            if not k.startswith(HEAD_PREFIX)
        }
    missing = [k for k in reference if k not in state_dict]
    if missing:
        raise UserError(
            f"{len(missing)} backbone tensor(s) of a {arch.name()} are missing, e.g. "
            f"{', '.join(missing[:3])}: the checkpoint is incomplete or truncated."
        )
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (expected {shape})"
        for k, shape in reference.items()
        if tuple(state_dict[k].shape) != shape
    ]
    if wrong:
        raise UserError(f"{len(wrong)} backbone tensor(s) have the wrong shape, e.g. {wrong[0]}.")
    extra = [k for k in state_dict if k not in reference]
    if extra:
        raise UserError(
            f"{len(extra)} tensor(s) cannot be placed in a {arch.name()} backbone, e.g. "
            f"{', '.join(extra[:3])}: refusing to drop them silently."
        )


# --------------------------------------------------------------------------------------------------
# recognising the input


@dataclass
class Extracted:
    """The backbone found in a checkpoint and what was thrown away to get it."""

    kind: str
    state_dict: dict[str, torch.Tensor]  # torchvision names, fc included (dropped at renaming)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (key or group, why)
    meta: dict[str, Any] = field(default_factory=dict)


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= len(obj) / 2
    )


def _strip(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _group(keys: list[str]) -> str:
    """Short display of a key set, one entry per top-level name: ``encoder_q.fc.* (4)``."""
    parts = []
    for head in sorted({k.split(".")[0] for k in keys}):
        members = [k.split(".") for k in keys if k.split(".")[0] == head]
        common = os.path.commonprefix(members)  # works element-wise on lists
        prefix = ".".join(common)
        parts.append(
            prefix if len(members) == 1 and len(members[0]) == len(common) else prefix + ".*"
        )
    shown = ", ".join(parts[:4]) + (", ..." if len(parts) > 4 else "")
    return f"{shown} ({len(keys)})"


def extract_backbone(obj: Any, source: str = "input") -> Extracted:
    """Recognise a checkpoint by content; return its query/online backbone in torchvision names."""
    if not isinstance(obj, dict):
        raise UserError(
            f"{source}: holds a {type(obj).__name__}, not a checkpoint dict; pass a pretraining, "
            "MoCo, linear-eval or torchvision ResNet checkpoint."
        )
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    if _is_state_dict(obj):
        container, top_level = obj, []
    else:
        key = next((k for k in ("model", "state_dict") if _is_state_dict(obj.get(k))), None)
        if key is None:
            raise UserError(
                f"{source}: no state dict found (top-level keys: "
                f"{', '.join(map(str, list(obj)[:8]))}); "
                "expected 'model' or 'state_dict' holding tensors."
            )
        container, top_level = obj[key], [str(k) for k in obj if k not in (key, "meta")]

    sd = dict(container)
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = _strip(sd, "module.")
    dropped: list[tuple[str, str]] = []
    if top_level:
        dropped.append((", ".join(top_level), "training state, not weights"))

    if any(k.startswith("encoder_q.") for k in sd):
        kind = "pretrain" if meta.get("kind") == "pretrain" else "moco"
        backbone = _strip(sd, "encoder_q.")
        head = sorted(k for k in sd if k.startswith("encoder_q." + HEAD_PREFIX))
        if head:
            dropped.append((_group(head), "projection head of the query encoder"))
        rest = sorted(k for k in sd if not k.startswith("encoder_q."))
        key_enc = [k for k in rest if k.startswith("encoder_k.")]
        if key_enc:
            dropped.append((_group(key_enc), "momentum key encoder"))
        other = [k for k in rest if not k.startswith("encoder_k.")]
        if other:
            dropped.append((_group(other), "queue / predictor / other method state"))
        if kind == "moco":
            meta = _moco_meta(obj, sd)
    elif "conv1.weight" in sd or any(k.startswith("layer1.") for k in sd):
        kind = "lincls" if meta.get("kind") == "lincls" else "torchvision"
        backbone = sd
        meta = _lincls_meta(meta) if kind == "lincls" else {}
    else:
        seen = sorted({k.split(".")[0] for k in sd})
        raise UserError(
            f"{source}: no ResNet backbone recognised (tensor prefixes: {', '.join(seen[:8])}); "
            "expected encoder_q.* (pretraining/MoCo) or torchvision names (conv1, layer1..4)."
        )
    head = sorted(k for k in backbone if k.startswith(HEAD_PREFIX))
    if head and kind in ("lincls", "torchvision"):
        dropped.append((_group(head), "classifier"))
    return Extracted(kind, backbone, dropped, meta)


def _moco_meta(obj: dict, sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What an official MoCo checkpoint tells about itself (nothing is guessed)."""
    queue = sd.get("queue")
    mlp = "encoder_q.fc.0.weight" in sd  # MoCo v2's MLP head; v1 has a single fc
    return {
        "method": "mocov2" if mlp else "moco",
        "arch": obj.get("arch"),
        "loss": "infonce",
        "num_negatives": (
            int(queue.shape[1]) if isinstance(queue, torch.Tensor) and queue.ndim == 2 else None
        ),
        "epochs": obj.get("epoch"),
    }


def _lincls_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """A linear-eval checkpoint carries the pretraining meta under ``pretrain`` (and maybe top1)."""
    out = dict(meta.get("pretrain") or {})
    for key in ("name", "top1"):
        if meta.get(key) is not None and out.get(key) is None:
            out[key] = meta[key]
    out.pop("kind", None)
    return out
