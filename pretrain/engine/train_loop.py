"""The one training loop of every stage: detectron2's ``SimpleTrainer`` (``AMPTrainer`` with mixed
precision on CUDA) driven by :class:`TrainingRun`, the base of the pretraining and linear-eval runs
(config, device, hooks, checkpointer, resume, divergence message, ``results.json``)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer, hooks
from detectron2.utils import comm

from pretrain.engine.hooks import FiniteCheckHook, NonFiniteLossError, ProgressHook, build_writers
from pretrain.engine.launch import check_shared_output_dir, get_device
from pretrain.io import UserError, atomic_write_text

__all__ = ["build_trainer", "TrainingRun", "write_results"]

logger = logging.getLogger(__name__)


def build_trainer(
    model: torch.nn.Module,
    data_loader: Any,
    optimizer: torch.optim.Optimizer,
    *,
    amp_dtype: Optional[torch.dtype] = None,
    grad_scaler: Optional[torch.amp.GradScaler] = None,
    log_period: int = 1,
) -> SimpleTrainer:
    """``SimpleTrainer``, or ``AMPTrainer`` (autocast to ``amp_dtype``, CUDA only) when
    ``amp_dtype`` is set, as detectron2's ``DefaultTrainer`` chooses. ``model(batch)`` returns a
    dict of losses; the trainer zeroes the gradients before the forward. The losses are read
    back and gathered over processes every ``log_period`` iterations only (detectron2's
    ``gather_metric_period``): the other steps never wait for the device."""
    common = dict(zero_grad_before_forward=True, gather_metric_period=log_period)
    if amp_dtype is None:
        return SimpleTrainer(model, data_loader, optimizer, **common)
    return AMPTrainer(
        model, data_loader, optimizer, grad_scaler=grad_scaler, precision=amp_dtype, **common
    )


def write_results(output_dir: str, results: Dict[str, Any]) -> str:
    """Write ``results.json`` atomically (main process only); returns its path."""
    path = os.path.join(output_dir, "results.json")
    if comm.is_main_process():
        atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return path


class TrainingRun:
    """What every training stage shares, like detectron2's ``DefaultTrainer`` (whose loop it
    runs): the subclass builds data, model, optimizer and scheduler, then calls
    :meth:`build_trainer` and :meth:`build_checkpointer`; this class owns the hooks every loop
    needs, resume, the divergence message and ``results.json``.

    Subclasses set :attr:`stage` (used in messages), :attr:`max_iter`, :attr:`loader` (with
    ``epochs_done()``) and implement :meth:`build_hooks`; :meth:`after_resume` may check the
    restored state.
    """

    stage = "training"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.device = get_device()
        self.start_iter = 0
        self.max_iter = 0
        if comm.is_main_process():
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        # before any work: every process must see the checkpoints process 0 writes
        check_shared_output_dir(cfg.OUTPUT_DIR)

    # ------------------------------------------------------------------ set-up (subclass calls)
    def build_trainer(
        self,
        train_model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        amp_dtype: Optional[torch.dtype] = None,
    ) -> SimpleTrainer:
        """The detectron2 trainer of :attr:`loader` (see :func:`build_trainer`). Its
        ``grad_scaler`` (disabled unless float16) is checkpointed, so resume restores it."""
        self.optimizer = optimizer
        self.grad_scaler = torch.amp.GradScaler(
            self.device.type, enabled=amp_dtype == torch.float16
        )
        self.trainer = build_trainer(
            train_model,
            self.loader,
            optimizer,
            amp_dtype=amp_dtype,
            grad_scaler=self.grad_scaler,
            log_period=self.cfg.LOG_PERIOD,
        )
        return self.trainer

    def loop_hooks(self, scheduler: Any, checkpoint_period: int) -> List[hooks.HookBase]:
        """Timer, lr schedule, NaN/inf stop, progress and periodic checkpoints: the hooks every
        stage starts with (:attr:`checkpointer` must exist).

        The checkpointer hook runs on every process (collecting the state is collective, see
        :class:`RNGStates`); only the main process writes, and only it deletes the checkpoints
        beyond SOLVER.MAX_TO_KEEP: on the other processes fvcore would delete the same files of
        the shared OUTPUT_DIR again, racing with the main process."""
        max_keep = self.cfg.SOLVER.MAX_TO_KEEP if self.cfg.SOLVER.MAX_TO_KEEP > 0 else None
        if not comm.is_main_process():
            max_keep = None
        return [
            hooks.IterationTimer(),
            hooks.LRScheduler(self.optimizer, scheduler),
            FiniteCheckHook(
                (p for group in self.optimizer.param_groups for p in group["params"]),
                period=self.cfg.LOG_PERIOD,
                checkpoint_period=checkpoint_period,
            ),
            ProgressHook(self.cfg.SOLVER.IMS_PER_BATCH, self.loader.epochs_done),
            hooks.PeriodicCheckpointer(self.checkpointer, checkpoint_period, max_to_keep=max_keep),
        ]

    def writer_hook(self) -> Optional[hooks.HookBase]:
        """Progress line, metrics.json and tensorboard every LOG_PERIOD (main process); put it
        last, so that it writes what the other hooks stored this step."""
        if not comm.is_main_process():
            return None
        return hooks.PeriodicWriter(
            build_writers(self.cfg.OUTPUT_DIR, self.max_iter), self.cfg.LOG_PERIOD
        )

    def build_hooks(self) -> List[hooks.HookBase]:
        raise NotImplementedError

    def register_hooks(self) -> None:
        self.trainer.register_hooks([h for h in self.build_hooks() if h is not None])

    # ------------------------------------------------------------------ running
    def resume_or_load(self, resume: bool = True) -> "TrainingRun":
        """With ``resume`` and a ``last_checkpoint`` in OUTPUT_DIR, restore everything the
        checkpointer holds and continue after its iteration; else start at 0. Collective: the
        main process decides which checkpoint (if any), every process loads that one and they
        agree on its iteration (:meth:`AtomicCheckpointer.resume_last`)."""
        found = self.checkpointer.resume_last() if resume else None
        if found is not None:
            path, extra = found
            self.start_iter = int(extra["iteration"]) + 1
            self.after_resume(path)
            logger.info(
                "Resumed at iteration %d (epoch %.3f)", self.start_iter, self.loader.epochs_done()
            )
        elif resume:
            logger.info("No checkpoint in %s: starting from scratch.", self.cfg.OUTPUT_DIR)
        return self

    def after_resume(self, path: str) -> None:
        """Called after the state of checkpoint ``path`` was restored."""

    def run_loop(self) -> None:
        """``trainer.train(start_iter, max_iter)``; a non-finite loss becomes one
        :class:`UserError` sentence naming the iteration and the last good checkpoint (nothing
        is saved after the divergence)."""
        try:
            self.trainer.train(self.start_iter, self.max_iter)
        except NonFiniteLossError as e:
            last = None
            if self.checkpointer.has_checkpoint():
                last = self.checkpointer.get_checkpoint_file()
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
            raise UserError(
                f"{self.stage} diverged: the loss became non-finite at iteration {e.iteration}; "
                f"{kept}; lower SOLVER.BASE_LR (or check the data) and restart with --resume."
            ) from e

    def write_results(self, results: Dict[str, Any]) -> str:
        return write_results(self.cfg.OUTPUT_DIR, results)
