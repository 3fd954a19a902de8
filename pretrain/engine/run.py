"""What every training run shares, whichever loop it drives (:class:`TrainingRun`'s
``SimpleTrainer`` or detectron2's ``DefaultTrainer`` in :class:`transfer.trainer.Trainer`): the
OUTPUT_DIR every process sees (and no other live run holds), DistributedDataParallel on CPU as on
GPU, the resume decided by process 0, and ``results.json``."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional

import torch
from detectron2.engine.defaults import create_ddp_model as _d2_create_ddp_model
from detectron2.utils import comm

from pretrain.engine.launch import check_shared_output_dir
from pretrain.engine.lock import check_output_dir_free
from pretrain.io import atomic_write_text

__all__ = ["RunMixin", "create_ddp_model", "prepare_output_dir", "write_results"]

logger = logging.getLogger(__name__)


def prepare_output_dir(output_dir: str) -> None:
    """Create ``output_dir`` (main process) and make sure that every process sees it
    (collective, :func:`check_shared_output_dir`) and that no other live run holds its lock
    (:func:`~pretrain.engine.lock.check_output_dir_free`; the tools took it in ``setup_run``):
    call before any work, since every process must see the checkpoints process 0 writes there."""
    if comm.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
    check_shared_output_dir(output_dir)
    check_output_dir_free(output_dir)


def create_ddp_model(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """detectron2's ``create_ddp_model`` (DistributedDataParallel with more than one process,
    else ``model`` itself) with the device the model is on: detectron2 passes
    ``device_ids=[local rank]``, which DDP refuses for CPU modules (those get ``device_ids=None``,
    gloo processes) and which is the wrong GPU when each process sees only its own (srun with one
    GPU per task: local rank 3, the model on cuda:0)."""
    if "device_ids" not in kwargs:
        first = next(model.parameters(), None)
        if first is not None:
            cpu = first.device.type == "cpu"
            kwargs["device_ids"] = None if cpu else [first.device.index]
    return _d2_create_ddp_model(model, **kwargs)


def write_results(output_dir: str, results: Dict[str, Any]) -> str:
    """Write ``results.json`` atomically (main process only); returns its path."""
    path = os.path.join(output_dir, "results.json")
    if comm.is_main_process():
        atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return path


class RunMixin:
    """Resume and ``results.json`` for a run class with ``cfg``, ``checkpointer`` (an
    :class:`~pretrain.engine.AtomicCheckpointer`) and ``start_iter``: mixed into
    :class:`~pretrain.engine.TrainingRun` and into the detection trainer (before
    ``DefaultTrainer``, whose ``resume_or_load`` it replaces)."""

    cfg: Any
    checkpointer: Any
    start_iter: int
    # the checkpoint :meth:`resume_or_load` restored (None: the run started from iteration 0)
    resumed_from: Optional[str] = None

    def resume_or_load(self, resume: bool = True) -> "RunMixin":
        """With ``resume`` and a ``last_checkpoint`` in OUTPUT_DIR, restore everything the
        checkpointer holds and continue after its iteration; else :meth:`load_initial_weights`
        and start at 0. Collective: the main process decides which checkpoint (if any), every
        process loads that one and they agree on its iteration
        (:meth:`AtomicCheckpointer.resume_last`)."""
        found = self.checkpointer.resume_last() if resume else None
        if found is None:
            if resume:
                logger.info("No checkpoint in %s: starting from scratch.", self.cfg.OUTPUT_DIR)
            self.load_initial_weights()
            return self
        path, extra = found
        # the checkpoint stores the iteration that just finished
        self.start_iter = int(extra["iteration"]) + 1
        self.resumed_from = path
        self.after_resume(path)
        logger.info(self.resumed_message())
        return self

    def load_initial_weights(self) -> None:
        """Called when the run starts from iteration 0; the weights the run was built with stay
        (the detection trainer loads MODEL.WEIGHTS here)."""

    def after_resume(self, path: str) -> None:
        """Called after the state of checkpoint ``path`` was restored."""

    def resumed_message(self) -> str:
        """The log line after a resume."""
        return f"Resumed at iteration {self.start_iter}"

    def write_results(self, results: Dict[str, Any]) -> str:
        """Write OUTPUT_DIR/results.json (main process); returns its path."""
        return write_results(self.cfg.OUTPUT_DIR, results)
