"""Checkpoint -> detectron2 weights: keep the ResNet backbone, rename, check (METHODS.md s. 5).

Pipeline of :func:`convert`:

1. load the input safely (``pretrain.io.load_checkpoint``, ``weights_only``) and recognise its kind
   by content: our pretraining checkpoint (``meta.kind == "pretrain"``, query encoder under
   ``encoder_q.``), an official MoCo / MoCo v2 checkpoint (``state_dict`` with
   ``module.encoder_q.*``), our linear-eval checkpoint (``meta.kind == "lincls"``) or a plain
   torchvision ResNet state dict (with or without ``module.``);
2. keep the backbone (torchvision names), drop heads, key encoder, queue and training state;
3. :func:`torchvision_to_detectron2`: rename with the rules of :data:`RENAME_RULES`; refuse when
   a backbone tensor is missing, has the wrong shape, or cannot be placed;
4. write ``{"model": {name: ndarray}, "__author__", "matching_heuristics": True, "provenance"}``
   atomically (docs/formats.md);
5. optionally :func:`verify_conversion`: load the pickle into detectron2's own ResNet through
   ``DetectionCheckpointer`` and compare res2..res5 (and the stem) with torchvision's
   layer1..layer4 on the same normalised image, in eval mode.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pretrain.checkpoints import (
    HEAD_PREFIX,
    INPUT_KINDS,
    Extracted,
    ResNetArch,
    check_against_reference,
    extract_backbone,
    infer_resnet_arch,
)
from pretrain.io import UserError, load_checkpoint, load_weights_pickle

__all__ = [
    "AUTHOR",
    "RENAME_RULES",
    "TRANSFER_SETTINGS",
    "DetectionConfig",
    "ResNetArch",
    "backbone_output_diffs",
    "convert",
    "extract_backbone",
    "format_report",
    "infer_resnet_arch",
    "load_into_detectron2",
    "read_provenance",
    "torchvision_to_detectron2",
    "verify_conversion",
]

logger = logging.getLogger(__name__)

AUTHOR = "eqco-transfer"
VERIFY_TOLERANCE = 1e-4

# The detectron2 settings that match a torchvision-layout backbone trained on RGB, ImageNet-
# normalised images (METHODS.md s. 5). Printed by the CLI; --verify uses them without a config file.
TRANSFER_SETTINGS: dict[str, Any] = {
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "MODEL.BACKBONE.FREEZE_AT": 0,
}
# torchvision's normalisation of a [0, 1] RGB image; kept apart from TRANSFER_SETTINGS on purpose:
# --verify checks the detection config's PIXEL_MEAN/STD against these, not against themselves.
_TORCHVISION_MEAN = (0.485, 0.456, 0.406)
_TORCHVISION_STD = (0.229, 0.224, 0.225)


# torchvision -> detectron2 renaming (METHODS.md s. 5), applied in this order to every backbone key;
# (rule shown to the user, pattern, replacement). Counting hits per rule gives the CLI's summary.
RENAME_RULES: list[tuple[str, str, str | Callable[[re.Match], str]]] = [
    ("conv1 -> stem.conv1", r"^conv1\.", "stem.conv1."),
    ("bn1 -> stem.conv1.norm", r"^bn1\.", "stem.conv1.norm."),
    ("layer1..4 -> res2..5", r"^layer([1-4])\.", lambda m: f"res{int(m.group(1)) + 1}."),
    ("bnX -> convX.norm", r"^(res[2-5]\.\d+\.)bn([1-3])\.", r"\1conv\2.norm."),
    ("downsample.0 -> shortcut", r"^(res[2-5]\.\d+\.)downsample\.0\.", r"\1shortcut."),
    ("downsample.1 -> shortcut.norm", r"^(res[2-5]\.\d+\.)downsample\.1\.", r"\1shortcut.norm."),
]
_BN_SUFFIX = r"norm\.(weight|bias|running_mean|running_var|num_batches_tracked)"
# Every name a detectron2 ResNet (bias-free convs + norm) can hold; anything else is "unplaced".
_D2_NAME = re.compile(rf"(stem\.conv1|res[2-5]\.\d+\.(conv[1-3]|shortcut))\.(weight|{_BN_SUFFIX})")



# --------------------------------------------------------------------------------------------------
# renaming


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype != torch.float32:
        t = t.float()  # numpy has no bfloat16; detectron2 trains in fp32 anyway
    return t.numpy().copy()


def torchvision_to_detectron2(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, np.ndarray], list[tuple[str, str, list[str]]], list[str]]:
    """Rename a torchvision ResNet state dict to detectron2's ResNet names (METHODS.md s. 5).

    Returns ``(weights, renamed, dropped)``: ``weights`` maps detectron2 names to numpy arrays,
    ``renamed`` lists ``(old, new, rules applied)`` for every kept tensor, ``dropped`` the
    classifier/head keys (``fc.*``). Raises :class:`UserError` when a backbone tensor is missing,
    has the wrong shape, or cannot be placed.
    """
    dropped = sorted(k for k in state_dict if k.startswith(HEAD_PREFIX))
    backbone = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIX)}
    arch = infer_resnet_arch(backbone)
    check_against_reference(backbone, arch)

    weights: dict[str, np.ndarray] = {}
    renamed: list[tuple[str, str, list[str]]] = []
    unplaced: list[str] = []
    for old, tensor in backbone.items():
        new, applied = old, []
        for rule, pattern, repl in RENAME_RULES:
            new, hits = re.subn(pattern, repl, new)
            if hits:
                applied.append(rule)
        if not _D2_NAME.fullmatch(new) or new in weights:
            unplaced.append(old)
            continue
        weights[new] = _to_numpy(tensor)
        renamed.append((old, new, applied))
    if unplaced:
        raise UserError(
            f"{len(unplaced)} tensor(s) match no torchvision -> detectron2 rule, e.g. "
            f"{', '.join(unplaced[:3])}; refusing to leave them unplaced."
        )
    return weights, renamed, dropped


# --------------------------------------------------------------------------------------------------
# loading the input, provenance, writing


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve_input(path: str) -> str:
    """A file, or a pretraining OUTPUT_DIR (its ``last_checkpoint``, else ``model_final.pth``)."""
    if not os.path.isdir(path):
        return path
    last = os.path.join(path, "last_checkpoint")
    if os.path.isfile(last):
        with open(last) as f:
            name = f.read().strip()
        if name:
            return os.path.join(path, name)
    final = os.path.join(path, "model_final.pth")
    if os.path.isfile(final):
        return final
    raise UserError(
        f"{path}: a directory without last_checkpoint or model_final.pth; pass a checkpoint."
    )


def _read_lincls_top1(lincls_dir: str) -> tuple[float, str | None]:
    path = os.path.join(lincls_dir, "results.json")
    if not os.path.isfile(path):
        raise UserError(
            f"{path}: not found; pass the OUTPUT_DIR of tools/lincls.py to --lincls-dir."
        )
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}).") from e
    if not isinstance(res, dict) or res.get("kind") != "lincls" or res.get("top1") is None:
        raise UserError(f"{path}: not a linear-eval results.json (needs kind 'lincls' and top1).")
    name = res.get("name") or (res.get("pretrain") or {}).get("name")
    return float(res["top1"]), name


_PROVENANCE_KEYS = ("name", "method", "arch", "loss", "tau", "alpha", "num_negatives", "epochs")


def _provenance(
    extracted: Extracted, source: str, arch: ResNetArch, top1: float | None, name: str | None
) -> dict[str, Any]:
    meta = {k: v for k, v in extracted.meta.items() if k != "kind"}
    prov: dict[str, Any] = {k: meta.pop(k, None) for k in _PROVENANCE_KEYS}
    prov.update(meta)  # anything else the checkpoint recorded (iteration, ims_per_batch, ...)
    stem = re.sub(r"(\.pth\.tar|\.pth|\.pt|\.tar|\.ckpt|\.pkl)$", "", os.path.basename(source))
    prov["name"] = name or prov["name"] or stem
    prov["arch"] = prov["arch"] or f"resnet{arch.depth}"
    prov["input_kind"] = extracted.kind
    prov["source"] = os.path.abspath(source)
    prov["sha256"] = _sha256(source)
    if top1 is not None:
        prov["top1"] = float(top1)
    prov.setdefault("top1", None)
    return prov


def _write_pickle_atomic(obj: Any, path: str) -> str:
    """Pickle to a temp file beside ``path`` (suffix .pkl: detectron2 reads it); return its path."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pkl", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            # protocol 4: readable by every Python 3 detectron2 install
            pickle.dump(obj, f, protocol=4)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def read_provenance(pkl_path: str) -> dict[str, Any]:
    """The ``provenance`` of a converted .pkl (``{}`` if none), read without executing code."""
    data = load_weights_pickle(pkl_path)
    if not isinstance(data, dict) or "model" not in data:
        raise UserError(f"{pkl_path}: not a detectron2 weights pickle (no 'model').")
    prov = data.get("provenance")
    return dict(prov) if isinstance(prov, dict) else {}


# --------------------------------------------------------------------------------------------------
# verification against detectron2's own ResNet


@dataclass
class LoadCheck:
    """How a pickle landed in a detectron2 model: every list empty means every tensor was placed."""

    norm: str  # the MODEL.RESNETS.NORM the model was built with
    missing: list[str]  # model tensors with no counterpart in the pickle
    not_loaded: list[str]  # model tensors whose value after loading differs from the pickle
    unexpected: list[str]  # pickle tensors the model has no place for


@dataclass(frozen=True)
class DetectionConfig:
    """A detection config as tools/train_det.py gets it: a YAML file + ``KEY VALUE`` overrides."""

    file: str | None = None
    opts: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = self.file or "the default detection config"
        return f"{where} with {' '.join(self.opts)}" if self.opts else where

    def load(self) -> Any:
        from transfer.config import load_config

        return load_config(self.file or "", list(self.opts))


def _d2_config(arch: ResNetArch, norm: str | None, config: DetectionConfig | None) -> Any:
    """detectron2 config: the detection config (or TRANSFER_SETTINGS), checked against ``arch``."""
    if config is not None:
        cfg = config.load()
        wrong = {k: v for k, v in arch.d2_options().items() if _cfg_get(cfg, k) != v}
        if wrong:
            first = next(iter(wrong))
            raise UserError(
                f"{config}: {first} is {_cfg_get(cfg, first)} but the weights are a {arch.name()}; "
                "train (and verify) with " + " ".join(f"{k} {v}" for k, v in wrong.items()) + "."
            )
    else:
        from detectron2.config import get_cfg

        cfg = get_cfg()
        settings = {**TRANSFER_SETTINGS, **arch.d2_options()}
        cfg.merge_from_list([x for k, v in settings.items() for x in (k, str(v))])
    if norm or config is None:  # default: the config's NORM, else plain BN
        cfg.MODEL.RESNETS.NORM = norm or "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["stem", "res2", "res3", "res4", "res5"]
    if not cfg.MODEL.FPN.IN_FEATURES:
        cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    return cfg


def _cfg_get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def load_into_detectron2(
    pkl_path: str,
    arch: ResNetArch,
    norm: str | None = None,
    config: DetectionConfig | None = None,
    fpn: bool = False,
) -> tuple[nn.Module, LoadCheck, Any]:
    """Build detectron2's ResNet (or ResNet-FPN when ``fpn``) and load ``pkl_path`` into it.

    Loading goes through ``DetectionCheckpointer`` exactly as ``MODEL.WEIGHTS`` would, so its
    name-matching heuristics are exercised. Every model tensor is filled with NaN (ints: -1) first,
    so a tensor that was not loaded cannot pass the equality check by chance.
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_resnet_backbone
    from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

    cfg = _d2_config(arch, norm, config)
    builder = build_resnet_fpn_backbone if fpn else build_resnet_backbone
    model = builder(cfg, ShapeSpec(channels=3)).eval()
    with torch.no_grad():
        for t in model.state_dict().values():
            t.fill_(float("nan") if t.is_floating_point() else -1)
    DetectionCheckpointer(model).load(pkl_path)

    weights = load_weights_pickle(pkl_path)["model"]
    prefix = "bottom_up." if fpn else ""
    state = {k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    missing = [k for k in state if k not in weights]
    not_loaded = [
        k
        for k in state
        if k in weights
        and not torch.equal(state[k], torch.as_tensor(weights[k]).to(state[k].dtype))
    ]
    unexpected = [k for k in weights if k not in state]
    return model, LoadCheck(cfg.MODEL.RESNETS.NORM, missing, not_loaded, unexpected), cfg


def backbone_output_diffs(
    pkl_path: str,
    torchvision_state_dict: dict[str, torch.Tensor],
    depth: int | None = None,
    norm: str | None = None,
    config: DetectionConfig | None = None,
    image_size: int = 64,
    seed: int = 0,
) -> tuple[dict[str, float], LoadCheck]:
    """Max abs difference per stage: detectron2 stem/res2..res5 vs torchvision maxpool/layer1..4.

    Both models run in eval mode on the same ImageNet-normalised random RGB image. The config's
    INPUT.FORMAT / PIXEL_MEAN / PIXEL_STD are checked against torchvision's normalisation first
    (:class:`UserError` when they differ), so a BGR or caffe-statistics config cannot pass.
    """
    # the classifier (1000 ImageNet classes or a linear-eval head) plays no part in the backbone
    sd = {k: v for k, v in torchvision_state_dict.items() if not k.startswith(HEAD_PREFIX)}
    arch = infer_resnet_arch(sd)
    if depth is not None and depth != arch.depth:
        raise UserError(f"the state dict is a ResNet-{arch.depth}, not a ResNet-{depth}.")
    d2_model, check, cfg = load_into_detectron2(pkl_path, arch, norm, config)

    tv_model = arch.torchvision_model().eval()
    result = tv_model.load_state_dict(sd, strict=False)
    not_fc = [k for k in result.missing_keys if not k.startswith(HEAD_PREFIX)]
    if not_fc or result.unexpected_keys:
        bad = not_fc[:3] + result.unexpected_keys[:3]
        raise UserError(f"torchvision cannot load the state dict as a {arch.name()}: {bad}.")

    _check_pixel_format(cfg, config)
    # One image, normalised once the torchvision way; the config's normalisation was checked above.
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (1, 3, image_size, image_size), generator=gen).float() / 255.0
    mean = torch.tensor(_TORCHVISION_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_TORCHVISION_STD).view(1, 3, 1, 1)
    tv_in = d2_in = (image - mean) / std

    with torch.no_grad():
        d2_out = d2_model(d2_in)
        x = tv_model.maxpool(tv_model.relu(tv_model.bn1(tv_model.conv1(tv_in))))
        tv_out = {"stem": x}
        for i in range(1, 5):
            x = getattr(tv_model, f"layer{i}")(x)
            tv_out[f"res{i + 1}"] = x
    diffs = {}
    for stage, ref in tv_out.items():
        out = d2_out[stage]
        diffs[stage] = float((out - ref).abs().max()) if out.shape == ref.shape else float("inf")
    return diffs, check


def _check_pixel_format(cfg: Any, config: DetectionConfig | None) -> None:
    """The detection config must feed the backbone what pretraining did: RGB, ImageNet mean/std."""
    where = str(config) if config else "the built-in transfer settings"
    expected_mean = [255.0 * m for m in _TORCHVISION_MEAN]
    expected_std = [255.0 * s for s in _TORCHVISION_STD]
    if cfg.INPUT.FORMAT != "RGB":
        raise UserError(
            f"{where}: INPUT.FORMAT is {cfg.INPUT.FORMAT}, but torchvision-style backbones are "
            "trained on RGB; set INPUT.FORMAT RGB."
        )
    for key, got, want in (
        ("MODEL.PIXEL_MEAN", cfg.MODEL.PIXEL_MEAN, expected_mean),
        ("MODEL.PIXEL_STD", cfg.MODEL.PIXEL_STD, expected_std),
    ):
        if len(got) != 3 or any(abs(g - w) > 1e-3 for g, w in zip(got, want, strict=True)):
            raise UserError(
                f"{where}: {key} is {list(got)}, but the backbone was trained with "
                f"{[round(w, 3) for w in want]} (ImageNet statistics on 0-255 RGB); set it so."
            )


def verify_conversion(
    pkl_path: str,
    torchvision_state_dict: dict[str, torch.Tensor],
    depth: int | None = None,
    norm: str | None = None,
    config: DetectionConfig | None = None,
    tolerance: float = VERIFY_TOLERANCE,
) -> float:
    """Check that ``pkl_path`` makes detectron2's ResNet compute what torchvision's does.

    Fails (:class:`UserError`) when a detectron2 backbone tensor is missing or not loaded, a pickle
    tensor has no place, or any of stem/res2..res5 differs by more than ``tolerance``. Returns the
    max abs difference over the stages.
    """
    return _verify(pkl_path, torchvision_state_dict, depth, norm, config, tolerance)[0]


def _verify(
    pkl_path: str,
    torchvision_state_dict: dict[str, torch.Tensor],
    depth: int | None,
    norm: str | None,
    config: DetectionConfig | None,
    tolerance: float = VERIFY_TOLERANCE,
) -> tuple[float, dict[str, float], str]:
    diffs, check = backbone_output_diffs(pkl_path, torchvision_state_dict, depth, norm, config)
    if check.missing or check.not_loaded:
        bad = check.missing + check.not_loaded
        raise UserError(
            f"{pkl_path}: {len(bad)} detectron2 backbone tensor(s) were not loaded, e.g. "
            f"{', '.join(bad[:3])}."
        )
    # FrozenBN has no num_batches_tracked buffer: that counter is the only tensor it may leave out.
    unexpected = [k for k in check.unexpected if not k.endswith("num_batches_tracked")]
    if unexpected:
        raise UserError(
            f"{pkl_path}: {len(unexpected)} tensor(s) have no place in detectron2's ResNet, e.g. "
            f"{', '.join(unexpected[:3])}."
        )
    worst = max(diffs.values())
    if not worst <= tolerance:  # also catches NaN
        detail = ", ".join(f"{k} {v:.3g}" for k, v in diffs.items())
        raise UserError(
            f"{pkl_path}: detectron2's backbone output differs from torchvision's by {worst:.3g} "
            f"(> {tolerance:g}; per stage: {detail}); check STRIDE_IN_1X1, PIXEL_MEAN/STD and "
            "INPUT.FORMAT."
        )
    return worst, diffs, check.norm


# --------------------------------------------------------------------------------------------------
# the whole conversion


def convert(
    input_path: str,
    output_path: str,
    verify: bool = False,
    force: bool = False,
    unsafe: bool = False,
    top1: float | None = None,
    lincls_dir: str | None = None,
    name: str | None = None,
    norm: str | None = None,
    config_file: str | None = None,
    config_opts: list[str] | None = None,
) -> dict[str, Any]:
    """Convert ``input_path`` to detectron2 weights at ``output_path`` (docs/formats.md).

    Returns a report: ``input_kind``, ``arch``, ``renamed`` [(old, new, rules)], ``rule_counts``,
    ``dropped`` [(keys, why)], ``provenance``, ``output``, and ``verify`` ({stage: max abs diff},
    ``max_abs_diff``) when ``verify``. Nothing is written unless every check passes.
    ``config_file`` / ``config_opts``: verify under a detection config (as given to train_det.py)
    instead of :data:`TRANSFER_SETTINGS`; its backbone shape and pixel format must match.
    """
    if not output_path.endswith(".pkl"):
        raise UserError(
            f"{output_path}: the output must end in .pkl (detectron2 reads only .pkl as a pickle)."
        )
    if os.path.exists(output_path) and not force:
        raise UserError(f"{output_path}: already exists; pass --force to overwrite it.")
    if (config_file or config_opts) and not verify:
        raise UserError(
            "a detection config (--config-file, KEY VALUE) is used only by --verify; add --verify."
        )
    if top1 is not None and lincls_dir is not None:
        raise UserError("give the linear-eval top-1 once: --top1 or --lincls-dir, not both.")
    if top1 is not None and not (math.isfinite(top1) and 0.0 <= top1 <= 100.0):
        raise UserError(f"--top1 {top1}: a top-1 accuracy is a percentage between 0 and 100.")

    source = _resolve_input(input_path)
    extracted = extract_backbone(load_checkpoint(source, unsafe=unsafe), source)
    weights, renamed, _ = torchvision_to_detectron2(extracted.state_dict)
    arch = infer_resnet_arch(
        {k: v for k, v in extracted.state_dict.items() if not k.startswith("fc.")}
    )

    top1_source = "--top1" if top1 is not None else None
    if lincls_dir is not None:
        top1, lincls_name = _read_lincls_top1(lincls_dir)
        known = name or extracted.meta.get("name")
        if lincls_name and known and lincls_name != known:
            raise UserError(
                f"{lincls_dir}/results.json is the linear eval of '{lincls_name}', not of "
                f"'{known}'; pass the matching --lincls-dir (or --top1)."
            )
        top1_source = os.path.join(lincls_dir, "results.json")
    elif top1 is None and extracted.meta.get("top1") is not None:
        top1, top1_source = float(extracted.meta["top1"]), "linear-eval checkpoint"
    provenance = _provenance(extracted, source, arch, top1, name)

    payload = {
        "model": weights,
        "__author__": AUTHOR,
        "matching_heuristics": True,
        "provenance": provenance,
    }
    tmp = _write_pickle_atomic(payload, output_path)
    report: dict[str, Any] = {
        "input": source,
        "input_kind": extracted.kind,
        "arch": arch,
        "renamed": renamed,
        "rule_counts": {rule: sum(rule in r for _, _, r in renamed) for rule, _, _ in RENAME_RULES},
        "dropped": extracted.dropped,
        "provenance": provenance,
        "top1_source": top1_source,
        "output": output_path,
        "num_tensors": len(weights),
        "num_parameters": int(sum(v.size for k, v in weights.items() if "num_batches" not in k)),
    }
    try:
        if verify:  # on the temp file: a failed check leaves no output behind
            config = DetectionConfig(config_file, tuple(config_opts or ()))
            config = config if (config_file or config_opts) else None
            worst, diffs, used_norm = _verify(tmp, extracted.state_dict, None, norm, config)
            report["verify"] = {"stages": diffs, "max_abs_diff": worst, "norm": used_norm}
            report["verify"]["settings"] = str(config or "the built-in transfer settings")
        if os.path.exists(output_path) and not force:  # appeared while we worked
            raise UserError(f"{output_path}: already exists; pass --force to overwrite it.")
        os.replace(tmp, output_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return report


def format_report(report: dict[str, Any], list_keys: bool = False) -> str:
    """The CLI's human-readable account of a :func:`convert` report."""
    arch: ResNetArch = report["arch"]
    prov = report["provenance"]
    out = io.StringIO()

    def w(line: str = "") -> None:
        print(line, file=out)

    w(f"input: {report['input']}")
    w(f"  recognised: {INPUT_KINDS[report['input_kind']]}")
    w(
        f"  backbone: {arch.name()} ({report['num_tensors']} tensors, "
        f"{report['num_parameters']:,} values)"
    )
    w(f"renamed {len(report['renamed'])} tensors, torchvision -> detectron2 (rule: tensors):")
    for rule, n in report["rule_counts"].items():
        w(f"  {rule:<32} {n}")
    if list_keys:
        for old, new, _ in report["renamed"]:
            w(f"    {old} -> {new}")
    w("dropped:" if report["dropped"] else "dropped: nothing")
    for keys, why in report["dropped"]:
        w(f"  {keys}: {why}")
    w("provenance:")
    shown = ["name", "method", "arch", "loss", "tau", "alpha", "num_negatives", "epochs", "top1"]
    w("  " + ", ".join(f"{k}={'-' if prov.get(k) is None else prov[k]}" for k in shown))
    if report.get("top1_source"):
        w(f"  top1 from {report['top1_source']}")
    w(f"  source {prov['source']} (sha256 {prov['sha256'][:16]}...)")
    if "verify" in report:
        v = report["verify"]
        stages = ", ".join(f"{k} {d:.2e}" for k, d in v["stages"].items())
        w(
            f"verify: max abs diff {v['max_abs_diff']:.2e} <= {VERIFY_TOLERANCE:g} "
            f"(detectron2 vs torchvision, eval mode, NORM {v['norm']}, settings of "
            f"{v['settings']}; {stages}): OK"
        )
    else:
        w("verify: skipped (pass --verify to compare detectron2's outputs with torchvision's)")
    w(f"wrote {report['output']}")
    settings = dict(TRANSFER_SETTINGS)
    d2_defaults = ResNetArch(50).d2_options()  # print only what differs from detectron2's defaults
    settings.update(
        {k: v for k, v in arch.d2_options().items() if k.endswith("DEPTH") or d2_defaults[k] != v}
    )
    w(
        "use it with: MODEL.WEIGHTS "
        + report["output"]
        + " "
        + " ".join(
            # lists quoted and without spaces, so the line can be pasted into a shell
            f"{k} '{json.dumps(v, separators=(',', ':'))}'" if isinstance(v, list) else f"{k} {v}"
            for k, v in settings.items()
        )
    )
    return out.getvalue().rstrip("\n")
