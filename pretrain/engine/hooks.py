"""Hooks of every training loop: stop before an update with a non-finite gradient, progress
(images/s, epoch, ETA) and the writers (log line, metrics.json, tensorboard)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterable, List, Optional

import torch
from detectron2.engine import hooks
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

__all__ = ["NonFiniteLossError", "FiniteCheckHook", "ProgressHook", "build_writers"]


class NonFiniteLossError(RuntimeError):
    """The loss (hence its gradients) became NaN/inf at ``iteration``; raised before the
    optimizer step of iteration ``detected`` (>= ``iteration``), and before any checkpoint of an
    iteration >= ``iteration`` was written."""

    def __init__(self, iteration: int, detected: Optional[int] = None) -> None:
        self.iteration = iteration
        self.detected = iteration if detected is None else detected
        super().__init__(f"the loss became non-finite at iteration {iteration} (NaN/inf gradients)")


class _HideNonFiniteTraceback(logging.Filter):
    """detectron2's ``TrainerBase.train`` logs every exception with its traceback; the run classes
    turn :class:`NonFiniteLossError` into one sentence, so its traceback is left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, NonFiniteLossError)


class FiniteCheckHook(hooks.HookBase):
    """Stop the run when a step's gradients are not all finite (a NaN/inf loss makes them so).

    Every step, after the backward, one fused ``torch._foreach_norm`` on the device records the
    first bad iteration in a device tensor, without reading it back. The host reads it every
    ``period`` iterations (LOG_PERIOD), at every ``checkpoint_period`` iteration and at the last
    one, before that step's update and save, and raises :class:`NonFiniteLossError`: no
    checkpoint ever holds weights updated with a non-finite gradient. Every process stops at the
    same iteration without a collective: DDP has already averaged the gradients, so all processes
    check the same values.
    """

    def __init__(
        self, params: Iterable[torch.Tensor], period: int = 1, checkpoint_period: int = 0
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.period = max(int(period), 1)
        self.checkpoint_period = int(checkpoint_period)
        self._first_bad: Optional[torch.Tensor] = None
        self._filter = _HideNonFiniteTraceback()

    def before_train(self) -> None:
        self._first_bad = None
        logging.getLogger("detectron2.engine.train_loop").addFilter(self._filter)

    def after_train(self) -> None:
        logging.getLogger("detectron2.engine.train_loop").removeFilter(self._filter)

    def _due(self, it: int) -> bool:
        return (
            (it + 1) % self.period == 0
            or (self.checkpoint_period > 0 and (it + 1) % self.checkpoint_period == 0)
            or it >= self.trainer.max_iter - 1
        )

    def after_backward(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        it = self.trainer.iter
        finite = torch.stack(torch._foreach_norm(grads)).isfinite().all()
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=finite.device)
        # -1 while every step was finite, else the first bad iteration (no host read)
        self._first_bad = torch.where((self._first_bad < 0) & ~finite, it, self._first_bad)
        if self._due(it):
            first = int(self._first_bad)  # the one host read, once per period
            if first >= 0:
                raise NonFiniteLossError(first, detected=it)


class ProgressHook(hooks.HookBase):
    """Puts ``[metric]images_per_s`` (global images per second of wall time, data loading
    included) and ``[metric]epoch`` into the event storage, so the progress line printed by
    ``CommonMetricPrinter`` reads ``eta: ... iter: ... total_loss: ... [metric]epoch: ...
    [metric]images_per_s: ... lr: ...``."""

    def __init__(self, ims_per_batch: int, epochs_done: Callable[[], float]) -> None:
        self.ims_per_batch = ims_per_batch
        self.epochs_done = epochs_done
        self._last: Optional[float] = None

    def before_train(self) -> None:
        self._last = time.perf_counter()

    def after_step(self) -> None:
        now = time.perf_counter()
        storage = self.trainer.storage
        if self._last is not None and now > self._last:
            storage.put_scalar("[metric]images_per_s", self.ims_per_batch / (now - self._last))
        storage.put_scalar("[metric]epoch", self.epochs_done(), smoothing_hint=False)
        self._last = now


def build_writers(output_dir: str, max_iter: int) -> List[Any]:
    """Progress line with ETA (``CommonMetricPrinter``), ``metrics.json``, tensorboard events."""
    return [
        CommonMetricPrinter(max_iter),
        JSONWriter(os.path.join(output_dir, "metrics.json")),
        TensorboardXWriter(output_dir),
    ]
