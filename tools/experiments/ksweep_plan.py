"""Planning of the K-sweep (EqCo paper, Fig. 2 and Fig. 4 in miniature): which runs, where, with
which exact command lines, every config validated before anything runs.

EqCo's claim (docs/methods.md, "Losses", rule 1): with the margin tau log(alpha/K) -- every
negative logit shifted by log(alpha/K) -- a few negatives per query train as well as many, and the
gradient norm of the loss w.r.t. the query no longer depends on K (Theorem 2); plain InfoNCE
(alpha = K) degrades as K shrinks. The sweep measures both:

* every cell is a pretraining with ``LOSS.NAME loss <K key> K [LOSS.ALPHA alpha] SEED s
  TEST.GRAD_NORM True``, the K key by the config's MODEL.METHOD: SiMo's in-batch negatives per
  query (``LOSS.NUM_NEGATIVES``) or MoCo v2's queue length (``LOSS.QUEUE_SIZE``, ``SWEEP_K_KEYS``)
  (``tools/pretrain.py``, which then logs ``grad_norm_q``), then linear evaluation of its
  ``model_final.pth`` (``tools/lincls.py``, cached features); both are the tools beside this
  folder, run as subprocesses by :mod:`ksweep_run`;
* the reference the top-1 is read against (unless ``baseline=False``): per seed s, a randomly
  initialised backbone (torchvision's ``MODEL.ARCH`` built right after ``torch.manual_seed(s)``,
  saved once as ``random_init.pth``) under the identical linear evaluation (same config, overrides
  and SEED as the cells, ``--cached-features``).

Layout: ``OUT/cells/<loss>_k<K>_s<seed>/{pretrain,lincls}/`` (each a normal OUTPUT_DIR) and
``OUT/baseline/random_init_s<seed>/{random_init.pth,lincls/}``; a cell or baseline is finished
exactly when its ``lincls/results.json`` exists.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from pretrain.config import get_pretrain_cfg, load_pretrain_cfg, merge_config
from pretrain.io import UserError
from pretrain.lincls import load_lincls_cfg
from pretrain.losses import LOSSES

__all__ = [
    "SweepCell",
    "SweepBaseline",
    "SweepEntry",
    "SweepPlan",
    "plan_sweep",
    "unique",
    "SWEEP_LOSSES",
    "BASELINE_LOSS",
    "TOOLS_DIR",
]

# the losses whose K-dependence the sweep compares: InfoNCE (alpha = K) and EqCo (alpha fixed)
SWEEP_LOSSES = ("infonce", "eqco")
# what K is, by MODEL.METHOD: SiMo's in-batch negatives per query (K <= N - 1), or the length of
# MoCo v2's queue, every query's negatives (any K: the paper's own K experiment varies MoCo v2's
# queue, and K = 64 or 256 then needs no batch of N > K)
SWEEP_K_KEYS = {"simo": "LOSS.NUM_NEGATIVES", "mocov2": "LOSS.QUEUE_SIZE"}
# the ``loss`` column of the random-init baseline's rows (no loss of pretrain.losses has this name)
BASELINE_LOSS = "random_init"
# the folder of tools/pretrain.py and tools/lincls.py, the two stages of a cell
TOOLS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class SweepCell:
    """One pretraining + linear evaluation: ``loss`` with ``k`` negatives per query, ``seed``.

    ``alpha`` is EqCo's alpha for ``eqco``; for ``infonce`` it is K (InfoNCE is EqCo with
    alpha = K, docs/methods.md, "Losses"), for other losses NaN (they have none)."""

    loss: str
    k: int
    alpha: float
    seed: int
    k_key: str = "LOSS.NUM_NEGATIVES"  # the config key of K (SWEEP_K_KEYS, by MODEL.METHOD)
    # the name of the cell whose runs this one is (InfoNCE at K = alpha is the EqCo cell of that
    # K: the shift log(alpha / K) is 0, the same loss bit for bit); "" = a run of its own
    same_as: str = ""

    @property
    def name(self) -> str:
        return f"{self.loss}_k{self.k}_s{self.seed}"

    def overrides(self) -> List[str]:
        """The ``KEY VALUE`` pairs that make the base config this cell."""
        opts = ["LOSS.NAME", self.loss, self.k_key, str(self.k), "SEED", str(self.seed)]
        if self.loss == "eqco":
            opts += ["LOSS.ALPHA", repr(float(self.alpha))]
        return opts


@dataclasses.dataclass(frozen=True)
class SweepBaseline:
    """The reference for the cells of seed ``seed``: a randomly initialised ``arch`` (no
    pretraining) under the same linear evaluation."""

    arch: str
    seed: int

    @property
    def name(self) -> str:
        return f"{BASELINE_LOSS}_s{self.seed}"


SweepEntry = Union[SweepCell, SweepBaseline]


def _cell_alpha(loss: str, k: int, alpha: float) -> float:
    return float(alpha) if loss == "eqco" else float(k) if loss == "infonce" else math.nan


def unique(values: Iterable[Any]) -> List[Any]:
    """``values`` without repeats, in the order of first appearance."""
    out: List[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


@dataclasses.dataclass
class SweepPlan:
    """Everything :func:`ksweep_run.run_sweep` needs, validated: the cells with their configs and
    the exact command lines of their two stages, and the random-init baselines (one per seed, or
    none) with their linear-eval command lines (``lincls_cmds`` holds both, by name)."""

    out: str
    cells: List[SweepCell]
    pretrain_cfgs: Dict[str, Any]  # cell name -> frozen pretraining config
    pretrain_cmds: Dict[str, List[str]]
    lincls_cmds: Dict[str, List[str]]  # cell or baseline name -> command line
    baselines: List[SweepBaseline] = dataclasses.field(default_factory=list)

    @property
    def runs(self) -> List[SweepCell]:
        """The cells that are run (an alias, :attr:`SweepCell.same_as`, reads its twin's)."""
        return [c for c in self.cells if not c.same_as]

    def cell_dir(self, cell: SweepCell) -> str:
        return os.path.join(self.out, "cells", cell.same_as or cell.name)

    def pretrain_dir(self, cell: SweepCell) -> str:
        return os.path.join(self.cell_dir(cell), "pretrain")

    def baseline_dir(self, baseline: SweepBaseline) -> str:
        return os.path.join(self.out, "baseline", baseline.name)

    def random_init_path(self, baseline: SweepBaseline) -> str:
        """The baseline's weights (its MODEL.WEIGHTS), written by
        :func:`ksweep_run.write_random_init`."""
        return os.path.join(self.baseline_dir(baseline), "random_init.pth")

    def entry_dir(self, entry: SweepEntry) -> str:
        if isinstance(entry, SweepBaseline):
            return self.baseline_dir(entry)
        return self.cell_dir(entry)

    def lincls_dir(self, entry: SweepEntry) -> str:
        return os.path.join(self.entry_dir(entry), "lincls")

    def finished(self, entry: SweepEntry) -> bool:
        """A cell or baseline is finished exactly when its linear evaluation wrote
        ``results.json``."""
        return os.path.isfile(os.path.join(self.lincls_dir(entry), "results.json"))


def plan_sweep(
    config_file: str,
    ks: Sequence[int],
    losses: Sequence[str],
    seeds: Sequence[int],
    out: str,
    alpha: float = 256.0,
    opts: Optional[Sequence[str]] = None,
    lincls_config: str = "configs/lincls/shapes_cpu.yaml",
    lincls_opts: Optional[Sequence[str]] = None,
    launch_args: Optional[Sequence[str]] = None,
    python: str = sys.executable,
    baseline: bool = True,
) -> SweepPlan:
    """Validate every cell's pretraining and linear-eval config (so a K larger than the batch or
    a typo fails in a second, before hours of training) and build their command lines.

    A cell's pretraining is ``tools/pretrain.py --config-file F --resume [launch_args] opts
    <cell overrides> TEST.GRAD_NORM True OUTPUT_DIR ... NAME <cell>``. The linear evaluation
    (``tools/lincls.py --cached-features --resume``) inherits MODEL.ARCH, INPUT.SIZE,
    DATASETS.ROOT / TRAIN_SPLIT and SEED from the cell's pretraining config; ``lincls_opts`` come
    after them (and win). With ``baseline``, each seed s also gets the random-init baseline
    ``random_init_s<s>``: the same linear-eval command with MODEL.WEIGHTS its ``random_init.pth``
    and NAME "random init". Writes nothing."""
    ks, losses, seeds = unique(int(k) for k in ks), unique(losses), unique(int(s) for s in seeds)
    if not ks or not losses or not seeds:
        raise UserError("--k, --loss and --seeds each need at least one value.")
    bad = [x for x in losses if x not in LOSSES]
    if bad:
        raise UserError(f"--loss {bad[0]!r} is unknown; choose among {tuple(sorted(LOSSES))}.")
    if "eqco" in losses and not alpha > 0:
        raise UserError(f"--alpha must be > 0 for the EqCo loss, got {alpha}.")
    for path in (config_file, lincls_config):
        if not os.path.isfile(path):
            raise UserError(f"{path}: config file not found; see configs/.")
    pretrain_script = os.path.join(TOOLS_DIR, "pretrain.py")
    lincls_script = os.path.join(TOOLS_DIR, "lincls.py")
    for script in (pretrain_script, lincls_script):
        if not os.path.isfile(script):
            raise UserError(f"{script} not found; the sweep runs the tools of {TOOLS_DIR}.")
    opts, lincls_opts = list(opts or []), list(lincls_opts or [])
    launch_args = list(launch_args or [])
    if len(opts) % 2:
        raise UserError(f"overrides must be KEY VALUE pairs; got an odd number: {' '.join(opts)}")
    out = os.path.abspath(out)

    def _twin(loss: str, k: int, seed: int) -> str:
        """InfoNCE at K = alpha is EqCo at that K (the same loss): run once, as the EqCo cell."""
        if loss == "infonce" and "eqco" in losses and float(k) == float(alpha):
            return SweepCell("eqco", k, float(alpha), seed).name
        return ""

    # which key K sets depends on the method: read it unvalidated (the cells are validated below)
    method = merge_config(get_pretrain_cfg(), config_file, opts, "pretrain/config.py").MODEL.METHOD
    if method not in SWEEP_K_KEYS:
        raise UserError(
            f"{config_file}: MODEL.METHOD is {method!r}, but the K-sweep varies the negatives of "
            f"{' or '.join(SWEEP_K_KEYS)} ({', '.join(SWEEP_K_KEYS.values())}); use one of them."
        )
    cells = [
        SweepCell(x, k, _cell_alpha(x, k, alpha), s, SWEEP_K_KEYS[method], _twin(x, k, s))
        for x in losses
        for k in ks
        for s in seeds
    ]
    plan = SweepPlan(out, cells, {}, {}, {})

    def add_lincls(name: str, cfg: Any, seed: int, last: List[str], what: str) -> None:
        """Validate and record the linear-eval command of a cell or baseline: the keys inherited
        from the pretraining config ``cfg``, then ``lincls_opts``, then ``last`` (these win)."""
        lin_opts = [
            "MODEL.ARCH", cfg.MODEL.ARCH,
            "INPUT.SIZE", str(cfg.INPUT.SIZE),
            "DATASETS.ROOT", os.path.abspath(cfg.DATASETS.ROOT),
            "DATASETS.TRAIN_SPLIT", cfg.DATASETS.TRAIN_SPLIT,
            "SEED", str(seed),
        ] + lincls_opts + last  # fmt: skip
        try:
            load_lincls_cfg(lincls_config, lin_opts)
        except UserError as e:
            raise UserError(f"linear evaluation of {what}: {e}") from e
        plan.lincls_cmds[name] = (
            [python, lincls_script, "--config-file", os.path.abspath(lincls_config)]
            + ["--cached-features", "--resume"]
            + launch_args
            + lin_opts
        )

    for cell in plan.runs:
        pre_dir = plan.pretrain_dir(cell)
        cell_opts = opts + cell.overrides() + ["TEST.GRAD_NORM", "True"]
        cell_opts += ["OUTPUT_DIR", pre_dir, "NAME", cell.name]
        try:
            cfg = load_pretrain_cfg(config_file, cell_opts)
        except UserError as e:
            raise UserError(f"cell {cell.name}: {e}") from e
        cfg.freeze()
        plan.pretrain_cfgs[cell.name] = cfg
        plan.pretrain_cmds[cell.name] = (
            [python, pretrain_script, "--config-file", os.path.abspath(config_file)]
            + ["--resume"]
            + launch_args
            + cell_opts
        )
        add_lincls(
            cell.name, cfg, cell.seed,
            ["MODEL.WEIGHTS", os.path.join(pre_dir, "model_final.pth")]
            + ["OUTPUT_DIR", plan.lincls_dir(cell)],
            f"cell {cell.name}",
        )  # fmt: skip
    if baseline:
        for s in seeds:
            # the cells differ only in LOSS.* and SEED: any cell of seed s has the inherited keys
            cfg = plan.pretrain_cfgs[next(c.name for c in plan.runs if c.seed == s)]
            base = SweepBaseline(cfg.MODEL.ARCH, s)
            plan.baselines.append(base)
            add_lincls(
                base.name, cfg, s,
                ["MODEL.WEIGHTS", plan.random_init_path(base)]
                + ["OUTPUT_DIR", plan.lincls_dir(base), "NAME", "random init"],
                f"the random-init baseline {base.name}",
            )  # fmt: skip
    return plan
