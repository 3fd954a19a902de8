"""Numerical check of converted weights: detectron2's res2..res5 vs torchvision's layer1..4.

Loads a converted .pkl through ``DetectionCheckpointer`` (exactly as ``MODEL.WEIGHTS`` does) into
detectron2's own ResNet or, under a detection config, into the whole detector that config builds,
wherever its ResNet lives: ``backbone.*`` (C4, with res5 per RoI in ``roi_heads.res5``) or
``backbone.bottom_up.*`` (FPN). Runs it and torchvision's ResNet in eval mode on the same
normalised image and compares the stem and every stage, res5 included (docs/methods.md,
"Conversion"); also the line of ``tools/convert.py``'s summary that reports the result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pretrain.checkpoints import HEAD_PREFIX, ResNetArch, infer_resnet_arch
from pretrain.io import UserError, load_weights_pickle

__all__ = [
    "TRANSFER_SETTINGS",
    "VERIFY_TOLERANCE",
    "DetectionConfig",
    "LoadCheck",
    "backbone_output_diffs",
    "format_verify",
    "load_into_detectron2",
    "verify_conversion",
    "verify_report",
]

VERIFY_TOLERANCE = 1e-4

# The detectron2 settings that match a torchvision-layout backbone trained on RGB, ImageNet-
# normalised images (docs/methods.md, "Conversion"). Printed by the CLI; --verify uses them without
# a config file.
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


@dataclass
class LoadCheck:
    """How a pickle landed in a detectron2 model: every list empty means every tensor was placed."""

    norm: str  # the MODEL.RESNETS.NORM the model was built with
    missing: list[str]  # model tensors with no counterpart in the pickle
    not_loaded: list[str]  # model tensors whose value after loading differs from the pickle
    unexpected: list[str]  # pickle tensors the model has no place for
    # where the pickle's tensors went: {module path in the model: number of tensors}
    placed: dict[str, int] = field(default_factory=dict)


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
    if config is None:  # the detection config's own layout (C4: res5 in the head) stays as it is
        cfg.MODEL.RESNETS.OUT_FEATURES = ["stem", "res2", "res3", "res4", "res5"]
        if not cfg.MODEL.FPN.IN_FEATURES:
            cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    return cfg


def _cfg_get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


class _ResNetStages(nn.Module):
    """The stem and res2..res5 outputs of a detector's ResNet, wherever res5 lives: in the backbone,
    or (C4) per RoI in ``roi_heads.res5``, run here on the whole res4 map without the extra norm
    of ``Res5ROIHeadsExtraNorm`` (a new layer, not part of the pre-trained ResNet)."""

    def __init__(self, resnet: nn.Module, res5_head: nn.Module | None) -> None:
        super().__init__()
        self.resnet = resnet
        self.res5_head = res5_head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.resnet.stem(x)
        out = {"stem": x}
        for name, stage in zip(self.resnet.stage_names, self.resnet.stages, strict=True):
            x = stage(x)
            out[name] = x
        if self.res5_head is not None:
            out["res5"] = self.res5_head(out["res4"])
        return out


def _detector_resnet(
    cfg: Any, arch: ResNetArch, config: DetectionConfig
) -> tuple[nn.Module, _ResNetStages, dict[str, dict[str, torch.Tensor]]]:
    """Build the detector ``cfg`` describes (on the CPU) and find its ResNet: returns the detector,
    its :class:`_ResNetStages` and, per module path, its tensors under the pickle's names
    (``res4.5.conv3.weight``, ...)."""
    from detectron2.layers import CNNBlockBase
    from detectron2.modeling import build_model
    from detectron2.modeling.backbone import ResNet

    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    backbone = model.backbone
    if isinstance(backbone, ResNet):
        resnet, where = backbone, "backbone"
    elif isinstance(getattr(backbone, "bottom_up", None), ResNet):
        resnet, where = backbone.bottom_up, "backbone.bottom_up"
    else:
        raise UserError(
            f"{config}: MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME} builds no detectron2 ResNet "
            "to load the converted weights into; verify under a ResNet or ResNet-FPN config."
        )
    tensors = {where: resnet.state_dict()}
    head = getattr(model.roi_heads, "res5", None)
    res5_head = None
    if "res5" not in resnet.stage_names and head is not None:
        if arch.depth < 50 and cfg.MODEL.ROI_HEADS.NAME != "Res5ROIHeadsExtraNorm":
            raise UserError(
                f"{config}: MODEL.ROI_HEADS.NAME {cfg.MODEL.ROI_HEADS.NAME} builds res5 in the box "
                f"head from bottleneck blocks, which {arch.name()} weights (basic blocks) cannot "
                "fill; use Res5ROIHeadsExtraNorm (basic blocks for ResNet-18/34), a ResNet-50 or "
                "deeper, or an FPN config."
            )
        blocks = {n: m for n, m in head.named_children() if isinstance(m, CNNBlockBase)}
        res5_head = nn.Sequential(*blocks.values())
        tensors["roi_heads.res5"] = {
            f"res5.{k}": v for k, v in head.state_dict().items() if k.split(".")[0] in blocks
        }
    return model, _ResNetStages(resnet, res5_head).eval(), tensors


def load_into_detectron2(
    pkl_path: str,
    arch: ResNetArch,
    norm: str | None = None,
    config: DetectionConfig | None = None,
    fpn: bool = False,
) -> tuple[nn.Module, LoadCheck, Any]:
    """Load ``pkl_path`` into detectron2 as ``MODEL.WEIGHTS`` would, and say where each tensor went.

    Without ``config``: detectron2's ResNet (or ResNet-FPN when ``fpn``) with the built-in transfer
    settings. With ``config``: the whole detector it builds (``build_model`` on the CPU), so that
    ``DetectionCheckpointer``'s name matching places the pickle's ``res2..res5`` where that model
    keeps them: ``backbone.*`` and ``roi_heads.res5.*`` (C4) or ``backbone.bottom_up.*`` (FPN).
    Every model tensor is filled with NaN (ints: -1) first, so a tensor that was not loaded cannot
    pass the equality check by chance. Returns a module computing ``{stem, res2..res5}``, the
    :class:`LoadCheck` and the detectron2 config.
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_resnet_backbone
    from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

    cfg = _d2_config(arch, norm, config)
    if config is not None:
        model, stages, tensors = _detector_resnet(cfg, arch, config)
    else:
        builder = build_resnet_fpn_backbone if fpn else build_resnet_backbone
        model = stages = builder(cfg, ShapeSpec(channels=3)).eval()
        resnet = model.bottom_up if fpn else model
        tensors = {"bottom_up" if fpn else "backbone": resnet.state_dict()}
    with torch.no_grad():
        for t in model.state_dict().values():
            t.fill_(float("nan") if t.is_floating_point() else -1)
    # fvcore warns about every head tensor the pickle does not hold (all of them: a backbone-only
    # file); what matters, the ResNet's own tensors, is checked below and reported by the caller
    checkpoint_logger = logging.getLogger("fvcore.common.checkpoint")
    level = checkpoint_logger.level
    checkpoint_logger.setLevel(logging.ERROR)
    try:
        DetectionCheckpointer(model).load(pkl_path)
    finally:
        checkpoint_logger.setLevel(level)

    weights = load_weights_pickle(pkl_path)["model"]
    state = {k: v for part in tensors.values() for k, v in part.items()}
    missing = [k for k in state if k not in weights]
    not_loaded = [
        k
        for k in state
        if k in weights
        and not torch.equal(state[k], torch.as_tensor(weights[k]).to(state[k].dtype))
    ]
    unexpected = [k for k in weights if k not in state]
    placed = {where: sum(k in weights for k in part) for where, part in tensors.items()}
    check = LoadCheck(cfg.MODEL.RESNETS.NORM, missing, not_loaded, unexpected, placed)
    return stages, check, cfg


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
    # the input convention first: it is the common mistake, and says so before any model is built
    _check_pixel_format(_d2_config(arch, norm, config), config)
    d2_model, check, cfg = load_into_detectron2(pkl_path, arch, norm, config)

    tv_model = arch.torchvision_model().eval()
    result = tv_model.load_state_dict(sd, strict=False)
    not_fc = [k for k in result.missing_keys if not k.startswith(HEAD_PREFIX)]
    if not_fc or result.unexpected_keys:
        bad = not_fc[:3] + result.unexpected_keys[:3]
        raise UserError(f"torchvision cannot load the state dict as a {arch.name()}: {bad}.")

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
        out = d2_out.get(stage)  # a stage the model does not compute at all cannot pass either
        same_shape = out is not None and out.shape == ref.shape
        diffs[stage] = float((out - ref).abs().max()) if same_shape else float("inf")
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
    diffs, check = backbone_output_diffs(pkl_path, torchvision_state_dict, depth, norm, config)
    return _worst_if_equivalent(pkl_path, diffs, check, tolerance)


def verify_report(
    pkl_path: str,
    torchvision_state_dict: dict[str, torch.Tensor],
    norm: str | None = None,
    config: DetectionConfig | None = None,
) -> dict[str, Any]:
    """:func:`verify_conversion` with what the summary shows: ``stages`` ({stage: max abs diff}),
    ``max_abs_diff``, the ``norm`` used, the ``settings`` verified under and where the tensors
    were ``placed`` ({module path: count}, e.g. ``backbone`` and ``roi_heads.res5`` for C4)."""
    diffs, check = backbone_output_diffs(pkl_path, torchvision_state_dict, None, norm, config)
    return {
        "stages": diffs,
        "max_abs_diff": _worst_if_equivalent(pkl_path, diffs, check, VERIFY_TOLERANCE),
        "norm": check.norm,
        "settings": str(config or "the built-in transfer settings"),
        "placed": dict(check.placed),
    }


def _worst_if_equivalent(
    pkl_path: str, diffs: dict[str, float], check: LoadCheck, tolerance: float
) -> float:
    """The largest stage difference; :class:`UserError` unless every tensor was placed and loaded
    and every stage is within ``tolerance``."""
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
    return worst


def format_verify(verify: dict[str, Any] | None) -> str:
    """The summary's ``verify:`` line for a :func:`verify_report` result (None: not verified)."""
    if verify is None:
        return "verify: skipped (pass --verify to compare detectron2's outputs with torchvision's)"
    stages = ", ".join(f"{k} {d:.2e}" for k, d in verify["stages"].items())
    placed = ", ".join(f"{where} {n} tensors" for where, n in verify.get("placed", {}).items())
    return (
        f"verify: max abs diff {verify['max_abs_diff']:.2e} <= {VERIFY_TOLERANCE:g} "
        f"(detectron2 vs torchvision, eval mode, NORM {verify['norm']}, settings of "
        f"{verify['settings']}; {stages}): OK"
        + (f"\n  loaded as MODEL.WEIGHTS loads them: {placed}" if placed else "")
    )
