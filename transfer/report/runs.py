"""Collects run outputs for the report: finds the OUTPUT_DIRs under the given paths and reads their
``results.json`` and pretraining ``config.yaml`` (docs/formats.md); an unreadable run is skipped
with its reason (:func:`find_runs`), or refused with ``--strict``.

``metrics.json`` is read with ``pretrain.io.read_metrics`` (:attr:`Run.metrics_path`). Values from
the files pass through :func:`as_number` / :func:`as_count`, so a value of the wrong type counts as
missing rather than inventing one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import yaml

from pretrain.io import UserError

__all__ = [
    "KINDS",
    "Run",
    "as_count",
    "as_number",
    "config_knn",
    "config_seed",
    "pretrain_seed",
    "run_seed",
    "find_runs",
]

KINDS = ("pretrain", "lincls", "detection")


@dataclass
class Run:
    """One OUTPUT_DIR with its ``results.json``."""

    kind: str
    name: str
    path: str  # the directory
    results: dict[str, Any]
    mtime: float = 0.0
    label: str = ""  # legend / row label, set when names repeat

    @property
    def folder(self) -> str:
        """The last component of :attr:`path` (what labels say when names repeat)."""
        return os.path.basename(os.path.normpath(self.path))

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.path, "metrics.json")


def _read_results(path: str) -> Run:
    file = os.path.join(path, "results.json")
    try:
        with open(file, encoding="utf-8") as f:
            res = json.load(f)
        mtime = os.path.getmtime(file)
    except OSError as e:  # unreadable: permissions, an I/O error, gone since the listing
        raise UserError(
            f"{file}: cannot be read ({e.strerror or e}); check the file (or its folder's "
            "permissions) or remove it."
        ) from e
    except ValueError as e:  # not JSON, not UTF-8: a truncated or overwritten file
        raise UserError(
            f"{file}: not readable JSON ({e}); re-run that stage or remove the file."
        ) from e
    if not isinstance(res, dict) or res.get("kind") not in KINDS:
        kind = res.get("kind") if isinstance(res, dict) else type(res).__name__
        raise UserError(
            f"{file}: kind {kind!r} is none of {', '.join(KINDS)}; it is not a results.json "
            "written by tools/pretrain.py, tools/lincls.py or tools/train_det.py."
        )
    prov = res.get("pretrain") if isinstance(res.get("pretrain"), dict) else {}
    name = res.get("name") or prov.get("name") or os.path.basename(os.path.normpath(path))
    return Run(res["kind"], str(name), path, res, mtime, str(name))


def find_runs(paths: list[str], skipped: list[str] | None = None) -> list[Run]:
    """Each path is a run dir (holds results.json) or a parent searched recursively for them.

    A run dir whose ``results.json`` cannot be read (or a folder that cannot be listed) is a
    :class:`UserError`; with a ``skipped`` list, its one-sentence reason is appended there
    instead and the other runs are read (the report's default; ``--strict`` passes none). A
    path without any results.json, or runs of which none can be read, are always an error.
    """
    runs: list[Run] = []
    seen: set[str] = set()
    problems: list[str] = []

    def unlistable(e: OSError) -> None:
        problems.append(
            f"{e.filename}: cannot be listed ({e.strerror}); check its permissions or leave it "
            "out."
        )

    for path in paths:
        if os.path.isfile(path) and os.path.basename(path) == "results.json":
            path = os.path.dirname(path) or "."
        if not os.path.isdir(path):
            raise UserError(
                f"{path}: no such directory; pass OUTPUT_DIRs (or a folder holding them)."
            )
        found = []
        before = len(problems)
        for root, dirs, files in os.walk(path, onerror=unlistable):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if "results.json" in files:
                found.append(root)
        if not found and len(problems) == before:
            raise UserError(
                f"{path}: no results.json in it or below; pass the OUTPUT_DIR of a finished "
                "tools/pretrain.py, tools/lincls.py or tools/train_det.py run."
            )
        for root in found:
            key = os.path.realpath(root)
            if key in seen:
                continue
            seen.add(key)
            try:
                runs.append(_read_results(root))
            except UserError as e:
                if skipped is None:
                    raise
                problems.append(str(e))
    if problems and skipped is None:
        raise UserError(problems[0])
    if problems and not runs:
        raise UserError(
            f"{', '.join(paths)}: none of the runs can be read ({len(problems)} skipped; the "
            f"first: {problems[0].rstrip('.')})."
        )
    if skipped is not None:
        skipped += problems
    return runs


def as_number(value: Any) -> float | None:
    """A number from a file as float; None for anything else (bool, text, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def as_count(value: Any) -> int | None:
    """A non-negative integer (a seed, an image count), else None (SEED < 0 means "drawn at
    random": not a seed anyone can re-run)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _read_config(folder: str) -> dict[str, Any] | None:
    """``folder/config.yaml`` as a dict; None when it is missing or not a YAML mapping."""
    path = os.path.join(folder, "config.yaml")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _pretrain_config(folder: str) -> dict[str, Any] | None:
    """``folder/config.yaml`` when it is a pretraining config (it has MODEL.METHOD), else None."""
    cfg = _read_config(folder)
    if cfg is None or not isinstance(cfg.get("MODEL"), dict):
        return None
    if "METHOD" not in cfg["MODEL"]:
        return None  # a linear-eval or detection config: not the pretraining's
    return cfg


def config_seed(folder: str) -> int | None:
    """SEED of ``folder/config.yaml`` when it is a pretraining config (it has MODEL.METHOD)."""
    cfg = _pretrain_config(folder)
    return as_count(cfg.get("SEED")) if cfg else None


def run_seed(folder: str) -> int | None:
    """SEED of any run's ``folder/config.yaml`` (pretraining, linear eval or detection)."""
    cfg = _read_config(folder)
    return as_count(cfg.get("SEED")) if cfg else None


def config_knn(folder: str) -> tuple[int, float] | None:
    """(TEST.KNN_K, TEST.KNN_T) of the kNN monitor in a pretraining ``folder/config.yaml``; None
    when the file or the keys are not there."""
    cfg = _pretrain_config(folder)
    test = cfg.get("TEST") if cfg else None
    if not isinstance(test, dict):
        return None
    k, t = as_count(test.get("KNN_K")), as_number(test.get("KNN_T"))
    return (k, t) if k is not None and t is not None else None


def pretrain_seed(pre: Run | None, lin: Run | None, prov: dict[str, Any]) -> int | None:
    """The pretraining seed: ``seed`` in a meta or results.json of the pre-training, else SEED of
    the pretraining run's config.yaml (its OUTPUT_DIR, or the folder of the pretraining checkpoint
    the linear eval / the conversion read); None when no file says it."""
    lin_meta = lin.results.get("pretrain") if lin else None
    lin_meta = lin_meta if isinstance(lin_meta, dict) else {}
    for source in (lin_meta, prov, pre.results if pre else {}):
        if as_count(source.get("seed")) is not None:
            return as_count(source.get("seed"))
    folders = [pre.path] if pre else []
    checkpoints = []  # only pretraining checkpoints: a random-init or torchvision file has no run
    if lin and "pretrain" in (lin.results.get("input_kind"), lin_meta.get("kind")):
        checkpoints.append(lin.results.get("weights"))
    if prov.get("input_kind") == "pretrain":
        checkpoints.append(prov.get("source"))
    folders += [os.path.dirname(c) for c in checkpoints if isinstance(c, str) and c]
    for folder in folders:
        seed = config_seed(folder)
        if seed is not None:
            return seed
    return None
