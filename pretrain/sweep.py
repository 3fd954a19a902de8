"""The K-sweep (EqCo paper, Fig. 2 and Fig. 4 in miniature): pretraining + linear evaluation for
every (loss, K, seed), then one table and one plot.

EqCo's claim (METHODS.md section 2, rule 1): with the margin tau log(alpha/K) -- every negative
logit shifted by log(alpha/K) -- a few negatives per query train as well as many, and the gradient
norm of the loss w.r.t. the query no longer depends on K (Theorem 2); plain InfoNCE (alpha = K)
degrades as K shrinks. :func:`run_sweep` measures both:

* every cell is a SiMo pretraining with ``LOSS.NAME loss LOSS.NUM_NEGATIVES K [LOSS.ALPHA alpha]
  SEED s``, run as a subprocess (``python -m pretrain.sweep``, i.e. :func:`cell_main`: the
  ``tools/pretrain.py`` run plus :class:`QueryGradNormHook`), then linear evaluation of its
  ``model_final.pth`` (``tools/lincls.py``, cached features), also a subprocess: each cell starts
  from a clean process (loggers, seeds, threads), and a cell is finished exactly when its
  ``lincls/results.json`` exists, so re-running the sweep skips finished cells and resumes a
  half-trained one from its last checkpoint;
* the reference the top-1 is read against (unless ``baseline=False``): per seed s, a randomly
  initialised backbone (torchvision's ``MODEL.ARCH`` built right after ``torch.manual_seed(s)``,
  saved once as ``random_init.pth``) under the identical linear evaluation (same config, overrides
  and SEED as the cells, ``--cached-features``); cheap, so the sweep runs these first, and each is
  finished exactly when its ``lincls/results.json`` exists, like a cell;
* ``OUT/sweep.csv`` (one row per cell x seed, then one ``random_init`` row per seed with top-1/top-5
  only), ``OUT/sweep.md`` (top-1 mean +- std per (loss, K), then the random-init top-1),
  ``OUT/sweep.png`` (top-1 and gradient norm vs K, log-x, one line per loss, error bars over seeds;
  the random-init top-1 as a dashed grey line with a +-std band).

Layout: ``OUT/cells/<loss>_k<K>_s<seed>/{pretrain,lincls}/`` (each a normal OUTPUT_DIR) and
``OUT/baseline/random_init_s<seed>/{random_init.pth,lincls/}``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from pretrain.config import load_pretrain_cfg
from pretrain.io import UserError, atomic_save, atomic_write_text, exit_on_user_error

__all__ = [
    "QueryGradNormHook",
    "SweepCell",
    "SweepBaseline",
    "SweepPlan",
    "plan_sweep",
    "write_random_init",
    "run_sweep",
    "collect_rows",
    "write_csv",
    "write_markdown",
    "write_plot",
    "summarize",
    "CSV_COLUMNS",
    "SWEEP_LOSSES",
    "BASELINE_LOSS",
    "cell_main",
]

logger = logging.getLogger(__name__)

# the losses whose K-dependence the sweep compares: InfoNCE (alpha = K) and EqCo (alpha fixed)
SWEEP_LOSSES = ("infonce", "eqco")
# the ``loss`` column of the random-init baseline's rows (no loss of pretrain.losses has this name)
BASELINE_LOSS = "random_init"
CSV_COLUMNS = (
    "loss",
    "k",
    "alpha",
    "seed",
    "top1",
    "top5",
    "knn_top1",
    "final_loss",
    "grad_norm",
    "pretrain_seconds",
)
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# The gradient norm of the loss w.r.t. the query (EqCo Theorem 2 / Fig. 2)
# --------------------------------------------------------------------------------------------


class QueryGradNormHook(HookBase):
    """Logs ``grad_norm_q``: the mean over queries of ``|| d l_i / d q_i ||_2``, the gradient of
    query i's own loss term ``l_i`` (the training loss is ``L = mean_i l_i``, so this is
    ``n * || dL / dq_i ||``, independent of the batch size) w.r.t. its L2-normalised embedding
    ``q_i = z_i / ||z_i||``. EqCo's Theorem 2: with alpha fixed its expectation does not depend
    on K; with InfoNCE it does.

    Uses only the method's public parts, no engine change: a forward hook on ``model.encoder_q``
    (the projection ``z``) and a wrapper around ``model.loss_fn`` (``(pos, neg, tau)``, where
    ``pos = q . k+`` and ``neg_j = q . k_j``). Because the loss depends on q only through those
    dot products, ``g = dL/dq = c+ k+ + sum_j c_j k_j`` with ``c = dL/d(pos, neg)``, and

    * its radial part is ``q . g = c+ pos + sum_j c_j neg_j`` (from the loss wrapper),
    * its tangential part is ``||z|| dL/dz`` (``dL/dz = (I - q q^T) g / ||z||``, from the
      forward hook),

    so ``||g||^2 = ||z||^2 ||dL/dz||^2 + (q . g)^2`` exactly (a test compares it with autograd on
    q). Measured every ``period`` iterations and at the last one (tensor hooks on those steps
    only: no GPU synchronisation on the others), averaged over processes, and written to the
    event storage in ``after_backward``, before the step's ``PeriodicWriter``, so it lands in
    ``metrics.json`` next to ``loss``. Methods whose loss is not one call per ``encoder_q`` output
    (SimCLR's concatenated views) are skipped with a warning.
    """

    def __init__(self, model: torch.nn.Module, period: int) -> None:
        self.model = model
        self.period = int(period)
        self._records: List[Dict[str, torch.Tensor]] = []
        self._active = False
        self._warned = False
        self._handle = None
        self._inner_loss: Optional[Callable[..., torch.Tensor]] = None

    # -- installation ------------------------------------------------------------------------

    def before_train(self) -> None:
        self._handle = self.model.encoder_q.register_forward_hook(self._on_projection)
        self._inner_loss = self.model.loss_fn
        self.model.loss_fn = self._loss_probe

    def after_train(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._inner_loss is not None:
            self.model.loss_fn = self._inner_loss
            self._inner_loss = None

    # -- per step ----------------------------------------------------------------------------

    def before_step(self) -> None:
        it = self.trainer.iter
        self._active = (it + 1) % self.period == 0 or it == self.trainer.max_iter - 1
        self._records = []

    def _on_projection(self, module: torch.nn.Module, inputs: Any, z: torch.Tensor) -> None:
        if not (self._active and torch.is_tensor(z) and z.requires_grad):
            return
        record: Dict[str, torch.Tensor] = {"z": z.detach()}

        def keep(grad: torch.Tensor) -> None:
            record["dz"] = grad.detach()

        z.register_hook(keep)
        self._records.append(record)

    def _loss_probe(
        self, pos: torch.Tensor, neg: torch.Tensor, *args: Any, **kw: Any
    ) -> torch.Tensor:
        assert self._inner_loss is not None
        if self._active and pos.requires_grad and neg.requires_grad:
            pending = [r for r in self._records if "pos" not in r]
            if pending:
                record = pending[0]
                record["pos"], record["neg"] = pos.detach(), neg.detach()

                def keep_pos(grad: torch.Tensor) -> None:
                    record["dpos"] = grad.detach()

                def keep_neg(grad: torch.Tensor) -> None:
                    record["dneg"] = grad.detach()

                pos.register_hook(keep_pos)
                neg.register_hook(keep_neg)
        return self._inner_loss(pos, neg, *args, **kw)

    def after_backward(self) -> None:
        if not self._active:
            return
        norms = [query_grad_norm(r) for r in self._records if _complete(r)]
        value = torch.stack(norms).mean() if norms else None
        if value is None and not self._warned:
            logger.warning(
                "grad_norm_q is not logged: this method's loss is not one call per query batch."
            )
            self._warned = True
        if comm.get_world_size() > 1:
            # every process takes part (same iterations) even if it has nothing to report
            device = self._records[0]["z"].device if self._records else torch.device("cpu")
            buf = torch.zeros(2, dtype=torch.float64, device=device)
            if value is not None:
                buf[0], buf[1] = value.double(), 1.0
            if dist.get_backend() == "nccl" and buf.device.type != "cuda":
                buf = buf.cuda()
            dist.all_reduce(buf)
            value = buf[0] / buf[1] if buf[1] > 0 else None
        if value is not None:
            get_event_storage().put_scalar("grad_norm_q", float(value), smoothing_hint=False)
        self._records = []


def _complete(record: Dict[str, torch.Tensor]) -> bool:
    need = ("z", "dz", "pos", "neg", "dpos", "dneg")
    return all(k in record for k in need) and record["z"].shape[0] == record["pos"].shape[0]


def query_grad_norm(record: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over queries of ``||d l_i / d q_i||`` from the captured tensors (see
    :class:`QueryGradNormHook`): ``n^2 (||z||^2 ||dL/dz||^2 + (c+ pos + sum_j c_j neg_j)^2)``."""
    z, dz = record["z"].float(), record["dz"].float()
    n = z.shape[0]
    tangential_sq = z.pow(2).sum(1) * dz.pow(2).sum(1)
    radial = record["dpos"].float() * record["pos"].float() + (
        record["dneg"].float() * record["neg"].float()
    ).sum(1)
    return (n * (tangential_sq + radial.pow(2)).sqrt()).mean()


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SweepCell:
    """One pretraining + linear evaluation: ``loss`` with ``k`` negatives per query, ``seed``.

    ``alpha`` is EqCo's alpha for ``eqco``; for ``infonce`` it is K (InfoNCE is EqCo with
    alpha = K, METHODS.md section 2), for other losses NaN (they have none)."""

    loss: str
    k: int
    alpha: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.loss}_k{self.k}_s{self.seed}"

    def overrides(self) -> List[str]:
        """The ``KEY VALUE`` pairs that make the base config this cell."""
        opts = ["LOSS.NAME", self.loss, "LOSS.NUM_NEGATIVES", str(self.k), "SEED", str(self.seed)]
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


def _unique(values: Iterable[Any]) -> List[Any]:
    out: List[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


@dataclasses.dataclass
class SweepPlan:
    """Everything :func:`run_sweep` needs, validated: the cells with their configs and the exact
    command lines of their two stages, and the random-init baselines (one per seed, or none) with
    their linear-eval command lines (``lincls_cmds`` holds both, by name)."""

    out: str
    cells: List[SweepCell]
    pretrain_cfgs: Dict[str, Any]  # cell name -> frozen pretraining config
    pretrain_cmds: Dict[str, List[str]]
    lincls_cmds: Dict[str, List[str]]  # cell or baseline name -> command line
    baselines: List[SweepBaseline] = dataclasses.field(default_factory=list)

    def cell_dir(self, cell: SweepCell) -> str:
        return os.path.join(self.out, "cells", cell.name)

    def pretrain_dir(self, cell: SweepCell) -> str:
        return os.path.join(self.cell_dir(cell), "pretrain")

    def baseline_dir(self, baseline: SweepBaseline) -> str:
        return os.path.join(self.out, "baseline", baseline.name)

    def random_init_path(self, baseline: SweepBaseline) -> str:
        """The baseline's weights (its MODEL.WEIGHTS), written by :func:`write_random_init`."""
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

    The linear evaluation inherits MODEL.ARCH, INPUT.SIZE, DATASETS.ROOT / TRAIN_SPLIT and SEED
    from the cell's pretraining config; ``lincls_opts`` come after them (and win). With
    ``baseline``, each seed s also gets the random-init baseline ``random_init_s<s>``: the same
    linear-eval command with MODEL.WEIGHTS its ``random_init.pth`` and NAME "random init"."""
    # imported here: pretrain.lincls pulls in transfer/, which the hook alone does not need
    from pretrain.lincls import load_lincls_cfg
    from pretrain.losses import LOSSES

    ks, losses, seeds = _unique(int(k) for k in ks), _unique(losses), _unique(int(s) for s in seeds)
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
    lincls_script = os.path.join(_REPO_ROOT, "tools", "lincls.py")
    if not os.path.isfile(lincls_script):
        raise UserError(
            f"{lincls_script} not found; run the sweep from a source checkout of this repository."
        )
    opts, lincls_opts = list(opts or []), list(lincls_opts or [])
    launch_args = list(launch_args or [])
    if len(opts) % 2:
        raise UserError(f"overrides must be KEY VALUE pairs; got an odd number: {' '.join(opts)}")
    out = os.path.abspath(out)
    cells = [
        SweepCell(x, k, _cell_alpha(x, k, alpha), s) for x in losses for k in ks for s in seeds
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

    for cell in cells:
        pre_dir = plan.pretrain_dir(cell)
        cell_opts = opts + cell.overrides() + ["OUTPUT_DIR", pre_dir, "NAME", cell.name]
        try:
            cfg = load_pretrain_cfg(config_file, cell_opts)
        except UserError as e:
            raise UserError(f"cell {cell.name}: {e}") from e
        if cfg.MODEL.METHOD != "simo":
            raise UserError(
                f"{config_file}: MODEL.METHOD is {cfg.MODEL.METHOD!r}, but the K-sweep varies "
                "LOSS.NUM_NEGATIVES, the in-batch negatives of SiMo; use MODEL.METHOD simo."
            )
        cfg.freeze()
        plan.pretrain_cfgs[cell.name] = cfg
        plan.pretrain_cmds[cell.name] = (
            [python, "-m", "pretrain.sweep", "--config-file", os.path.abspath(config_file)]
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
            cfg = plan.pretrain_cfgs[next(c.name for c in cells if c.seed == s)]
            base = SweepBaseline(cfg.MODEL.ARCH, s)
            plan.baselines.append(base)
            add_lincls(
                base.name, cfg, s,
                ["MODEL.WEIGHTS", plan.random_init_path(base)]
                + ["OUTPUT_DIR", plan.lincls_dir(base), "NAME", "random init"],
                f"the random-init baseline {base.name}",
            )  # fmt: skip
    return plan


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _last_iteration(metrics_path: str) -> Optional[int]:
    try:
        with open(metrics_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 4096, 0))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
        return int(json.loads(lines[-1])["iteration"]) + 1 if lines else None
    except (OSError, ValueError, KeyError, IndexError):
        return None


def _run_stage(
    cmd: List[str], log_path: str, describe: str, on_poll: Optional[Callable[[], None]] = None
) -> float:
    """Run one stage as a subprocess (its output to ``log_path``); returns its wall time.

    A failure raises :class:`UserError` with the last lines of the stage's output."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = dict(os.environ)
    # the children import this repository's packages even when it is not installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=2.0)
                    break
                except subprocess.TimeoutExpired:
                    if on_poll is not None:
                        on_poll()
        except BaseException:  # Ctrl-C: stop the child too; the cell resumes next time
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    seconds = time.perf_counter() - start
    if rc != 0:
        with open(log_path, errors="replace") as f:
            tail = "".join(f.readlines()[-5:]).strip()
        raise UserError(
            f"{describe} failed (exit status {rc}); its output is in {log_path}; "
            f"last lines:\n{tail}"
        )
    return seconds


def _add_seconds(path: str, key: str, seconds: float) -> None:
    data = _read_json(path) or {}
    data[key] = float(data.get(key, 0.0)) + seconds
    atomic_write_text(path, json.dumps(data, indent=2))


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_cell(
    plan: SweepPlan, cell: SweepCell, on_poll: Optional[Callable[[str], None]] = None
) -> None:
    """Pretrain (resuming from the cell's last checkpoint, if any) unless already done, then
    linear-evaluate. Wall times accumulate in ``<cell>/timing.json`` over attempts."""
    cell_dir = plan.cell_dir(cell)
    timing = os.path.join(cell_dir, "timing.json")
    pre_dir = plan.pretrain_dir(cell)
    os.makedirs(cell_dir, exist_ok=True)
    if not (
        os.path.isfile(os.path.join(pre_dir, "results.json"))
        and os.path.isfile(os.path.join(pre_dir, "model_final.pth"))
    ):
        metrics = os.path.join(pre_dir, "metrics.json")

        def poll_pretrain() -> None:
            if on_poll is not None:
                it = _last_iteration(metrics)
                on_poll(f"{cell.name}: pretraining" + (f", iteration {it}" if it else ""))

        start = time.perf_counter()
        try:
            _run_stage(
                plan.pretrain_cmds[cell.name],
                os.path.join(cell_dir, "pretrain.out"),
                f"pretraining of cell {cell.name}",
                poll_pretrain,
            )
        finally:
            _add_seconds(timing, "pretrain_seconds", time.perf_counter() - start)
    _run_lincls(plan, cell, f"cell {cell.name}", on_poll)


def _run_lincls(
    plan: SweepPlan, entry: SweepEntry, what: str, on_poll: Optional[Callable[[str], None]]
) -> None:
    """The linear-eval stage of a cell or baseline; its wall time accumulates in
    ``<entry>/timing.json`` (``lincls_seconds``)."""
    entry_dir = plan.entry_dir(entry)
    if on_poll is not None:
        on_poll(f"{entry.name}: linear eval")
    start = time.perf_counter()
    try:
        _run_stage(
            plan.lincls_cmds[entry.name],
            os.path.join(entry_dir, "lincls.out"),
            f"linear evaluation of {what}",
            (lambda: on_poll(f"{entry.name}: linear eval")) if on_poll else None,
        )
    finally:
        _add_seconds(
            os.path.join(entry_dir, "timing.json"), "lincls_seconds", time.perf_counter() - start
        )


def write_random_init(arch: str, seed: int, path: str) -> str:
    """Save (atomically) the state dict of ``getattr(torchvision.models, arch)()`` built right
    after ``torch.manual_seed(seed)``: torchvision's own initialisation, the same tensors for the
    same seed (and torch version). The caller's random state is left as it was."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = getattr(torchvision.models, arch)()
    atomic_save(net.state_dict(), path)
    return path


def run_baseline(
    plan: SweepPlan, baseline: SweepBaseline, on_poll: Optional[Callable[[str], None]] = None
) -> None:
    """Write the baseline's ``random_init.pth`` unless it exists, then linear-evaluate it."""
    os.makedirs(plan.baseline_dir(baseline), exist_ok=True)
    weights = plan.random_init_path(baseline)
    if not os.path.isfile(weights):
        write_random_init(baseline.arch, baseline.seed, weights)
    _run_lincls(plan, baseline, f"the random-init baseline {baseline.name}", on_poll)


def run_sweep(plan: SweepPlan, train: bool = True, progress: bool = True) -> Dict[str, Any]:
    """Run every unfinished random-init baseline of ``plan`` (first: cheap, and the reference
    for every top-1 that follows), then every unfinished cell, with one tqdm bar over both (its
    ETA is from the runs so far, so it is low while the baselines run), rewriting ``sweep.csv`` /
    ``sweep.md`` / ``sweep.png`` after each so partial results are visible. With
    ``train=False`` only the outputs are (re)written.

    Returns ``{"ran": [names], "skipped": [names], "rows": csv rows, "files": paths}`` (names of
    baselines and cells, baselines first)."""
    from tqdm import tqdm

    os.makedirs(plan.out, exist_ok=True)
    entries: List[SweepEntry] = [*plan.baselines, *plan.cells]
    done = [e for e in entries if plan.finished(e)]
    todo = [e for e in entries if not plan.finished(e)] if train else []
    if done:
        logger.info(
            "K-sweep: %d of %d runs (cells and random-init baselines) already finished, "
            "skipped: %s",
            len(done),
            len(entries),
            " ".join(e.name for e in done),
        )
    ran: List[str] = []
    if todo:
        bar = tqdm(
            total=len(entries),
            initial=len(done),
            desc="K-sweep",
            unit="run",
            disable=not progress,
            dynamic_ncols=True,
        )
        try:
            for entry in todo:
                bar.set_postfix_str(entry.name, refresh=True)
                run = run_baseline if isinstance(entry, SweepBaseline) else run_cell
                run(plan, entry, on_poll=lambda s: bar.set_postfix_str(s, refresh=True))
                ran.append(entry.name)
                bar.update(1)
                write_outputs(plan)
        finally:
            bar.close()
    files = write_outputs(plan)
    rows = collect_rows(plan)
    if not rows:
        logger.warning("K-sweep: no finished cell or baseline yet; nothing to tabulate.")
    return {"ran": ran, "skipped": [e.name for e in done], "rows": rows, "files": files}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def read_grad_norms(metrics_path: str) -> List[float]:
    """The logged ``grad_norm_q`` values of a run's ``metrics.json``, one per iteration (a
    resumed run may have written an iteration twice: the last entry wins)."""
    by_iter: Dict[int, float] = {}
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:  # a line cut by a kill mid-write
                    continue
                if "grad_norm_q" in entry and "iteration" in entry:
                    by_iter[int(entry["iteration"])] = float(entry["grad_norm_q"])
    return [by_iter[i] for i in sorted(by_iter)]


def collect_rows(plan: SweepPlan) -> List[Dict[str, Any]]:
    """One row per finished cell (CSV_COLUMNS): top-1/top-5 of the linear evaluation, the final
    pretraining loss, ``grad_norm`` = mean of the logged ``grad_norm_q`` over the run, and the
    wall time of the pretraining subprocess(es); then one row per finished random-init baseline:
    loss ``random_init``, its seed, top-1/top-5, the rest NaN (empty in the csv)."""
    rows = []
    for cell in plan.cells:
        if not plan.finished(cell):
            continue
        lin = _read_json(os.path.join(plan.lincls_dir(cell), "results.json")) or {}
        pre = _read_json(os.path.join(plan.pretrain_dir(cell), "results.json")) or {}
        timing = _read_json(os.path.join(plan.cell_dir(cell), "timing.json")) or {}
        norms = read_grad_norms(os.path.join(plan.pretrain_dir(cell), "metrics.json"))
        rows.append(
            {
                "loss": cell.loss,
                "k": cell.k,
                "alpha": cell.alpha,
                "seed": cell.seed,
                "top1": _float(lin.get("top1")),
                "top5": _float(lin.get("top5")),
                "knn_top1": _float(lin.get("knn_top1")),
                "final_loss": _float(pre.get("final_loss")),
                "grad_norm": sum(norms) / len(norms) if norms else math.nan,
                "pretrain_seconds": _float(timing.get("pretrain_seconds")),
            }
        )
    for base in plan.baselines:
        if not plan.finished(base):
            continue
        lin = _read_json(os.path.join(plan.lincls_dir(base), "results.json")) or {}
        row: Dict[str, Any] = {c: math.nan for c in CSV_COLUMNS}
        row.update(
            loss=BASELINE_LOSS,
            seed=base.seed,
            top1=_float(lin.get("top1")),
            top5=_float(lin.get("top5")),
            knn_top1=_float(lin.get("knn_top1")),
        )
        rows.append(row)
    return rows


def _float(x: Any) -> float:
    return math.nan if x is None else float(x)


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _mean_std(values: List[float]) -> tuple:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan, 0
    mean = sum(values) / len(values)
    # sample standard deviation over seeds (0 for a single seed)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var), len(values)


def _split_rows(
    rows: List[Dict[str, Any]],
) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """``(cell rows, random-init baseline rows)``."""
    cells = [r for r in rows if r["loss"] != BASELINE_LOSS]
    return cells, [r for r in rows if r["loss"] == BASELINE_LOSS]


def baseline_top1(rows: List[Dict[str, Any]], metric: str = "top1") -> tuple:
    """``(mean, std, n)`` of the random-init baseline's top-1 (or ``metric``) over seeds."""
    return _mean_std([r.get(metric, math.nan) for r in _split_rows(rows)[1]])


_METRICS = ("top1", "top5", "knn_top1", "grad_norm", "final_loss")


def summarize(rows: List[Dict[str, Any]]) -> Dict[tuple, Dict[str, float]]:
    """``(loss, k) -> {"top1": (mean, std, n), "top5": ..., "grad_norm": ..., "final_loss": ...}``
    over seeds (sample std), in the order the cells first appear; the random-init baseline's rows
    are left out (see :func:`baseline_top1`)."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in _split_rows(rows)[0]:
        groups.setdefault((r["loss"], r["k"]), []).append(r)
    return {
        key: {m: _mean_std([r.get(m, math.nan) for r in rs]) for m in _METRICS}
        for key, rs in groups.items()
    }


def write_csv(rows: List[Dict[str, Any]], path: str) -> str:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if _isnan(v) else v for k, v in r.items()})
    os.replace(tmp, path)
    return path


def _fmt(stat: tuple, digits: int) -> str:
    mean, std, n = stat
    if n == 0:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" + (f" (n={n})" if n != 1 else " (1 seed)")


def write_markdown(plan: SweepPlan, rows: List[Dict[str, Any]], path: str) -> str:
    """Top-1 (and the gradient norm, final loss) mean ± sample std over seeds per (loss, K);
    after the top-1 table, the random-init baseline's top-1 (mean ± sample std over seeds)."""
    cell_rows, base_rows = _split_rows(rows)
    stats = summarize(rows)
    losses = _unique(r["loss"] for r in cell_rows)
    ks = sorted(_unique(r["k"] for r in cell_rows))
    any_cfg = next(iter(plan.pretrain_cfgs.values()))
    alphas = {c.loss: c.alpha for c in plan.cells}
    head = " | ".join(_loss_label(x, alphas) for x in losses)
    finished = f"{len(cell_rows)} of {len(plan.cells)} cells"
    if plan.baselines:
        finished += f" and {len(base_rows)} of {len(plan.baselines)} random-init baselines"
    lines = [
        "# K-sweep: linear-eval top-1 vs negatives per query",
        "",
        f"SiMo {any_cfg.MODEL.ARCH}, {any_cfg.INPUT.SIZE} px, global batch "
        f"N={any_cfg.SOLVER.IMS_PER_BATCH}, data {any_cfg.DATASETS.ROOT}; "
        f"{finished} finished. Mean ± sample std over seeds.",
        "",
    ]
    for title, metric, digits in (
        ("Linear-eval top-1 (%)", "top1", 2),
        ("kNN top-1 of the frozen backbone (%), same features", "knn_top1", 2),
        ("Gradient norm of the loss w.r.t. q (mean over training)", "grad_norm", 3),
        ("Final pretraining loss", "final_loss", 3),
    ):
        lines += [f"## {title}", ""]
        if cell_rows:
            lines += [f"| K | {head} |", "|---|" + "---|" * len(losses)]
        else:
            lines.append("No cell finished yet.")
        for k in ks:
            entries = [
                _fmt(stats[(x, k)][metric], digits) if (x, k) in stats else "n/a" for x in losses
            ]
            lines.append(f"| {k} | " + " | ".join(entries) + " |")
        lines.append("")
        if metric in ("top1", "knn_top1") and plan.baselines:
            lines += [
                f"Random-init {_arch_label(plan.baselines[0].arch)}, same evaluation: "
                f"{_fmt(baseline_top1(rows, metric), 2)}",
                "",
            ]
    atomic_write_text(path, "\n".join(lines))
    return path


def _arch_label(arch: str) -> str:
    """``resnet18`` -> ``ResNet-18``; other torchvision names as they are."""
    digits = arch[len("resnet") :]
    return f"ResNet-{digits}" if arch.startswith("resnet") and digits.isdigit() else arch


def _loss_label(loss: str, alphas: Dict[str, float]) -> str:
    if loss == "eqco":
        return f"eqco (alpha={alphas[loss]:g})"
    return "infonce (alpha=K)" if loss == "infonce" else loss


def write_plot(rows: List[Dict[str, Any]], path: str) -> str:
    """Top-1 and gradient norm vs K (log-x), one line per loss, error bars = std over seeds; on
    the top-1 axis the random-init baseline's mean top-1 (dashed grey) with a ± std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell_rows, _ = _split_rows(rows)
    stats = summarize(rows)
    losses = _unique(r["loss"] for r in cell_rows)
    ks = sorted(_unique(r["k"] for r in cell_rows))
    alphas = {r["loss"]: r["alpha"] for r in cell_rows}
    base_mean, base_std, base_n = baseline_top1(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in (
        (axes[0], "top1", "linear-eval top-1 (%)"),
        (axes[1], "grad_norm", "mean ||dl/dq|| during pretraining"),
    ):
        for x in losses:
            pts = [(k, stats[(x, k)][metric]) for k in ks if (x, k) in stats]
            pts = [(k, s) for k, s in pts if s[2] > 0]
            if pts:
                ax.errorbar(
                    [k for k, _ in pts],
                    [s[0] for _, s in pts],
                    yerr=[s[1] for _, s in pts],
                    marker="o",
                    capsize=3,
                    label=_loss_label(x, alphas),
                )
        if metric == "top1" and base_n > 0:
            ax.axhspan(base_mean - base_std, base_mean + base_std, color="grey", alpha=0.2, lw=0)
            ax.axhline(base_mean, color="grey", linestyle="--", label="random init")
        if ks:  # a log axis needs positive data; with only baselines finished there is no K
            ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("K (negatives per query)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend()
    axes[0].set_title("top-1 vs K")
    axes[1].set_title("gradient norm w.r.t. q vs K")
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_outputs(plan: SweepPlan) -> Dict[str, str]:
    """``sweep.csv``, ``sweep.md``, ``sweep.png`` in the sweep's directory, from the finished
    cells and baselines (the csv always; the table and plot once either is finished)."""
    rows = collect_rows(plan)
    files = {"csv": write_csv(rows, os.path.join(plan.out, "sweep.csv"))}
    if rows:
        files["md"] = write_markdown(plan, rows, os.path.join(plan.out, "sweep.md"))
        files["png"] = write_plot(rows, os.path.join(plan.out, "sweep.png"))
    return files


# --------------------------------------------------------------------------------------------
# One cell's pretraining process: ``python -m pretrain.sweep`` (tools/pretrain.py + the hook)
# --------------------------------------------------------------------------------------------


@exit_on_user_error
def _pretrain_with_grad_norm(cfg: Any, args: Any) -> None:
    """One process of a cell's pretraining job: ``tools/pretrain.py``'s ``run`` plus
    :class:`QueryGradNormHook`."""
    from pretrain.engine import finish_distributed, setup_run
    from pretrain.pretrainer import Pretrainer

    setup_run(cfg, args)
    trainer = Pretrainer(cfg)
    if cfg.MODEL.COMPILE:
        logger.warning("MODEL.COMPILE: grad_norm_q is not logged (tensor hooks and compile clash).")
    else:
        trainer.trainer.register_hooks([QueryGradNormHook(trainer.model, cfg.LOG_PERIOD)])
    trainer.resume_or_load(resume=args.resume).train()
    finish_distributed()


def cell_main(argv: Optional[List[str]] = None) -> None:
    """``python -m pretrain.sweep --config-file F [--resume] [--num-gpus G] [KEY VALUE ...]``: the
    pretraining of one sweep cell (what the sweep runs; same arguments as tools/pretrain.py)."""
    from detectron2.engine import default_argument_parser

    from pretrain.engine import launch_from_args

    @exit_on_user_error
    def main() -> None:
        args = default_argument_parser().parse_args(argv)
        cfg = load_pretrain_cfg(args.config_file, args.opts)
        cfg.freeze()
        launch_from_args(_pretrain_with_grad_norm, args, cfg, args)

    main()


if __name__ == "__main__":
    # re-import so that spawned workers pickle ``pretrain.sweep.*``, not ``__main__.*``
    from pretrain.sweep import cell_main as _cell_main

    _cell_main()
