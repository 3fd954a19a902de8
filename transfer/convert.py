"""Checkpoint -> detectron2 weights: keep the ResNet backbone, rename it, write the .pkl.

Pipeline of :func:`convert` (docs/methods.md, "Conversion"):

1. load the input safely (``pretrain.io.load_checkpoint``, ``weights_only``) and recognise its kind
   by content: our pretraining checkpoint (``meta.kind == "pretrain"``, query encoder under
   ``encoder_q.``), an official MoCo / MoCo v2 checkpoint (``state_dict`` with
   ``module.encoder_q.*``), our linear-eval checkpoint (``meta.kind == "lincls"``) or a plain
   torchvision ResNet state dict (with or without ``module.``);
2. keep the backbone (torchvision names), drop heads, key encoder, queue and training state;
3. :func:`torchvision_to_detectron2`: rename with the rules of :data:`RENAME_RULES`; refuse when
   a backbone tensor is missing, has the wrong shape, or cannot be placed;
4. optionally check the pickle numerically before anything is written (transfer/verify.py:
   detectron2's res2..res5 vs torchvision's layer1..layer4; under a detection config, inside the
   detector it builds: one pickle serves C4 models, res2..res4 in ``backbone`` and res5 in
   ``roi_heads.res5``, and FPN models, all of it in ``backbone.bottom_up``);
5. write ``{"model": {name: ndarray}, "__author__", "matching_heuristics": True, "provenance"}``
   through ``pretrain.io.atomic_open`` (docs/formats.md).

:func:`format_report` is the summary ``tools/convert.py`` prints.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pretrain.checkpoints import (
    HEAD_PREFIX,
    INPUT_KINDS,
    Extracted,
    ResNetArch,
    check_against_reference,
    extract_backbone,
    infer_resnet_arch,
)
from pretrain.io import UserError, atomic_open, load_checkpoint, load_weights_pickle, read_json
from transfer.verify import TRANSFER_SETTINGS, DetectionConfig, format_verify, verify_report

__all__ = [
    "AUTHOR",
    "RENAME_RULES",
    "convert",
    "format_report",
    "read_provenance",
    "torchvision_to_detectron2",
]

AUTHOR = "eqco-transfer"


# torchvision -> detectron2 renaming (docs/methods.md, "Conversion"), applied in this order to
# every backbone key; (rule shown to the user, pattern, replacement). Counting hits per rule gives
# the CLI's summary.
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
    """Rename a torchvision ResNet state dict to detectron2's ResNet names (docs/methods.md,
    "Conversion").

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
# loading the input, provenance


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
    res = read_json(path)
    if res is None:
        raise UserError(f"{path}: not valid JSON.")
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


def read_provenance(pkl_path: str) -> dict[str, Any]:
    """The ``provenance`` of a converted .pkl (``{}`` if none), read without executing code."""
    data = load_weights_pickle(pkl_path)
    if not isinstance(data, dict) or "model" not in data:
        raise UserError(f"{pkl_path}: not a detectron2 weights pickle (no 'model').")
    prov = data.get("provenance")
    return dict(prov) if isinstance(prov, dict) else {}


# --------------------------------------------------------------------------------------------------
# the whole conversion and its summary


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
    blob = pickle.dumps(payload, protocol=4)  # protocol 4: readable by every Python 3 detectron2
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
    if verify:  # before writing: a failed check leaves no output behind
        config = DetectionConfig(config_file, tuple(config_opts or ()))
        config = config if (config_file or config_opts) else None
        report["verify"] = _verify_blob(
            blob, os.path.basename(output_path), extracted.state_dict, norm, config
        )
    with atomic_open(output_path, "wb") as f:
        f.write(blob)
        if os.path.exists(output_path) and not force:  # appeared while we worked
            raise UserError(f"{output_path}: already exists; pass --force to overwrite it.")
    return report


def _verify_blob(
    blob: bytes,
    filename: str,
    torchvision_state_dict: dict[str, torch.Tensor],
    norm: str | None,
    config: DetectionConfig | None,
) -> dict[str, Any]:
    """:func:`transfer.verify.verify_report` on the pickle bytes about to be written, from a
    scratch copy (detectron2 loads weights only from a file whose name ends in .pkl)."""
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, filename)
        with open(path, "wb") as f:  # a private scratch file, deleted with its folder
            f.write(blob)
        return verify_report(path, torchvision_state_dict, norm, config)


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
    w(format_verify(report.get("verify")))
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
