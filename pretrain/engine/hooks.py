"""Hooks of every training loop: stop before an update with a non-finite loss or gradient (float16
overflow steps that the GradScaler skips are counted, not fatal), checkpoint and stop at the end
of the step on SIGTERM / SIGINT / SIGUSR1 (and submitit's preemption signal), progress (images/s,
epoch, ETA) and the writers (log line, metrics.json, tensorboard)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
from detectron2.engine import hooks
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

__all__ = [
    "NonFiniteLossError",
    "FiniteCheckHook",
    "MAX_CONSECUTIVE_SKIPPED",
    "STOP_SIGNALS",
    "StoppedBySignal",
    "SignalCheckpointHook",
    "with_signal_checkpoint",
    "ProgressHook",
    "build_writers",
]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training cannot go on from iteration ``iteration``: the loss (hence its gradients) became
    NaN/inf, or, with float16 loss scaling, ``skipped`` consecutive steps overflowed (the
    GradScaler skipped them all). Raised at iteration ``detected`` (>= ``iteration``), before its
    optimizer step and before any checkpoint of an iteration >= ``iteration`` was written."""

    def __init__(
        self, iteration: int, detected: Optional[int] = None, skipped: int = 0
    ) -> None:
        self.iteration = iteration
        self.detected = iteration if detected is None else detected
        self.skipped = skipped
        if skipped:
            what = (
                f"float16 gradients overflowed in {skipped} consecutive steps up to iteration "
                f"{iteration} (the GradScaler skipped every one of them)"
            )
        else:
            what = f"the loss became non-finite at iteration {iteration}"
        self.what = what
        super().__init__(what)


class _HideNonFiniteTraceback(logging.Filter):
    """detectron2's ``TrainerBase.train`` logs every exception with its traceback; the run classes
    turn :class:`NonFiniteLossError` into one sentence, so its traceback is left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, NonFiniteLossError)


# float16 steps the GradScaler may skip in a row before the run is declared diverged: each skip
# halves the loss scale, so 30 in a row take the default 2^16 down to 2^-14 (gradients of an
# ordinary loss never overflow at such a scale; a loss that stays NaN/inf skips every step)
MAX_CONSECUTIVE_SKIPPED = 30


class FiniteCheckHook(hooks.HookBase):
    """Stop the run when the loss or the gradients of a step are not finite; with float16 loss
    scaling, count the overflow steps the GradScaler skips and stop only on a non-finite loss or
    on ``max_skipped`` skipped steps in a row.

    The loss is read by a forward hook on the trainer's model (the sum of the loss dict it
    returns in training mode). Every step the checks run on the device and record the first bad
    iteration in a device tensor, without reading it back:

    * without loss scaling (float32, bfloat16): after the backward, the loss and one fused
      ``torch._foreach_norm`` of the gradients must be finite;
    * with an enabled ``GradScaler`` (``SOLVER.AMP.PRECISION float16``): an inf/NaN gradient is an
      ordinary overflow that the scaler handles (it skips the update and halves its scale), so
      only the loss must be finite; after the step, a step whose scale went down was skipped,
      counted in ``amp/skipped_steps`` (with ``amp/loss_scale``, written every ``period``), and
      ``max_skipped`` skipped steps in a row stop the run.

    The host reads the record every ``period`` iterations (LOG_PERIOD), at every
    ``checkpoint_period`` iteration and at the last one, before that step's update (the run of
    skipped steps: after its skipped update) and save, and raises :class:`NonFiniteLossError`: no
    checkpoint ever holds weights updated with a non-finite gradient. Every process stops at the
    same iteration without a collective: the gradients are all-reduced and the loss scale follows
    them, so all processes see the same overflows (and a NaN loss makes NaN gradients).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        period: int = 1,
        checkpoint_period: int = 0,
        max_skipped: int = MAX_CONSECUTIVE_SKIPPED,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.period = max(int(period), 1)
        self.checkpoint_period = int(checkpoint_period)
        self.max_skipped = int(max_skipped)
        self._filter = _HideNonFiniteTraceback()
        self._handle: Any = None
        self._reset()

    def _reset(self) -> None:
        self._loss: Optional[torch.Tensor] = None
        self._first_bad: Optional[torch.Tensor] = None  # -1, or the first bad iteration
        self._run_start: Optional[torch.Tensor] = None  # first iteration of the skipped run
        self._scale_before: Optional[torch.Tensor] = None
        self._run: Optional[torch.Tensor] = None  # consecutive skipped steps
        self._long_run: Optional[torch.Tensor] = None  # start of the first too-long run, or -1
        self._skipped: Optional[torch.Tensor] = None  # skipped steps in this run of train()
        self._skipped_logged = 0

    def _grad_scaler(self) -> Optional[torch.amp.GradScaler]:
        scaler = getattr(self.trainer, "grad_scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def before_train(self) -> None:
        self._reset()
        logging.getLogger("detectron2.engine.train_loop").addFilter(self._filter)
        self._handle = self.trainer.model.register_forward_hook(self._capture_loss)

    def after_train(self) -> None:
        logging.getLogger("detectron2.engine.train_loop").removeFilter(self._filter)
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _capture_loss(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if module.training and isinstance(output, dict):
            losses = [v.detach().float().sum() for v in output.values() if torch.is_tensor(v)]
            if losses:
                self._loss = torch.stack(losses).sum()

    def _due(self, it: int) -> bool:
        return (
            (it + 1) % self.period == 0
            or (self.checkpoint_period > 0 and (it + 1) % self.checkpoint_period == 0)
            or it >= self.trainer.max_iter - 1
        )

    def _record(self, finite: torch.Tensor, it: int) -> None:
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=finite.device)
        # -1 while every step was finite, else the first bad iteration (no host read)
        self._first_bad = torch.where((self._first_bad < 0) & ~finite, it, self._first_bad)

    def _loss_finite(self, device: torch.device) -> torch.Tensor:
        if self._loss is None:
            return torch.ones((), dtype=torch.bool, device=device)
        return self._loss.isfinite()

    def after_backward(self) -> None:
        scaler = self._grad_scaler()
        if scaler is not None:
            # the scale this step's backward used (the scaler's own tensor, no host read)
            self._scale_before = scaler._scale.clone() if scaler._scale is not None else None
        grads = [] if scaler is not None else [p.grad for p in self.params if p.grad is not None]
        if not grads and self._loss is None:
            return
        it = self.trainer.iter
        device = grads[0].device if grads else self._loss.device
        finite = self._loss_finite(device)
        if grads:  # scaled gradients may overflow: the scaler's business, checked after the step
            finite = finite & torch.stack(torch._foreach_norm(grads)).isfinite().all()
        self._record(finite, it)
        if self._due(it):
            first = int(self._first_bad)  # the one host read, once per period
            if first >= 0:
                raise NonFiniteLossError(first, detected=it)

    def check_now(self) -> None:
        """Raise :class:`NonFiniteLossError` if any step so far had a non-finite loss or gradient
        (one host read): before a checkpoint at an iteration that is not due (a stop on a
        signal), so that no checkpoint ever holds weights updated with a non-finite gradient."""
        if self._first_bad is not None:
            first = int(self._first_bad)
            if first >= 0:
                raise NonFiniteLossError(first, detected=self.trainer.iter)

    def after_step(self) -> None:
        scaler = self._grad_scaler()
        if scaler is None or self._scale_before is None:
            return
        it = self.trainer.iter
        scale = scaler._scale
        skipped = (scale < self._scale_before).long()  # update() halved it: the step was skipped
        if self._run is None:
            zero = torch.zeros((), dtype=torch.long, device=scale.device)
            self._run, self._skipped = zero, zero
            self._run_start, self._long_run = zero - 1, zero - 1
        self._skipped = self._skipped + skipped
        self._run_start = torch.where(self._run == 0, it, self._run_start)
        self._run = (self._run + 1) * skipped
        # the first iteration of the first run of max_skipped skipped steps, else -1
        long_run = (self._long_run < 0) & (self._run >= self.max_skipped)
        self._long_run = torch.where(long_run, self._run_start, self._long_run)
        if not self._due(it):
            return
        # the one host read, once per period (the loss was checked after the backward)
        first_long_run, skipped_total = torch.stack([self._long_run, self._skipped]).tolist()
        loss_scale = float(scale)
        self.trainer.storage.put_scalar("amp/skipped_steps", skipped_total, smoothing_hint=False)
        self.trainer.storage.put_scalar("amp/loss_scale", loss_scale, smoothing_hint=False)
        if skipped_total > self._skipped_logged:
            logger.info(
                "float16: %d step(s) skipped by the GradScaler (gradient overflow) so far; loss "
                "scale now %g",
                skipped_total,
                loss_scale,
            )
            self._skipped_logged = skipped_total
        if first_long_run >= 0:
            raise NonFiniteLossError(first_long_run, detected=it, skipped=self.max_skipped)


# the signals after which a run writes a checkpoint at the end of its step and stops; the exit
# status is 128 + the signal number, what a shell reports for a process killed by it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StoppedBySignal(SystemExit):
    """The run stopped on signal ``signum`` after writing its checkpoint; exit status 128 +
    ``signum``. ``chained``: what the handler that was installed before ours (submitit's
    requeue) raised when called after the checkpoint, to be raised in its place once the
    processes have left the process group (:func:`pretrain.engine.launch.end_stopped_run`)."""

    def __init__(self, signum: int, message: str, chained: Optional[BaseException] = None):
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message
        self.chained = chained


def _preempt_signal() -> Optional[int]:
    """submitit's preemption / timeout signal (``SUBMITIT_PREEMPT_SIGNAL``, default USR2), when
    a Python handler (submitit's requeue) is installed for it in this process; else None."""
    sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    if sig is None or sig in STOP_SIGNALS:
        return None
    return sig if callable(signal.getsignal(sig)) else None


class SignalCheckpointHook(hooks.HookBase):
    """On SIGTERM, SIGINT or SIGUSR1, finish the current step, write a checkpoint named like the
    periodic ones (``model_{iter:07d}.pth``, so that ``--resume`` continues exactly at the next
    iteration), log ``stopped by SIGTERM at iteration N; checkpoint ... written; rerun with
    --resume to continue`` and stop with :class:`StoppedBySignal` (exit status 128 + signal).

    The handlers (installed for the loop only, in the main thread) only record the first signal:
    a second one during the save changes nothing and the save (atomic) completes. Every process
    stops at the same step: after each step the recorded signal number is max-reduced over
    processes on detectron2's gloo group (one integer on the host: a GPU run never waits for the
    device), so one process receiving it is enough. A signal during the last iteration lets the
    run finish.

    Inside a submitit job, whose handler for its preemption signal (SIGUSR2 unless
    ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise) checkpoints the job and requeues it, that signal
    is caught as well: the run first writes its checkpoint, then submitit's handler is called
    (on process 0 it requeues the job with ``--resume`` and exits), so the requeued job resumes at
    the step where this one stopped, not at the last periodic checkpoint. Any other Python
    handler installed before ours (e.g. submitit's, which only logs SIGTERM) is called after the
    checkpoint in the same way.

    Put it after every other hook but the writer (:func:`with_signal_checkpoint`): the
    checkpointer and evaluation have done their part of the step when it saves, and the writer
    writes the step once, at the end of the loop. The run's :class:`FiniteCheckHook`, if any, is
    asked first, so a step with a non-finite gradient is never saved.
    """

    def __init__(self, checkpointer: Any, file_prefix: str = "model") -> None:
        self.checkpointer = checkpointer
        self.file_prefix = file_prefix
        self._received = 0  # the first signal received; the only thing the handler touches
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if not self._received:
            self._received = signum

    def before_train(self) -> None:
        self._received = 0
        if threading.current_thread() is not threading.main_thread():
            logger.debug("Training outside the main thread: no checkpoint on signals.")
            return
        preempt = _preempt_signal()
        for sig in STOP_SIGNALS + ((preempt,) if preempt is not None else ()):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def after_train(self) -> None:
        self._restore()
        if self._received and self.trainer.iter + 1 >= self.trainer.max_iter:
            logger.info(
                "%s came during the last iteration: the run finishes.",
                signal.Signals(self._received).name,
            )

    def _agreed_signal(self) -> int:
        """The largest signal number recorded by any process (0: none), the same everywhere."""
        if comm.get_world_size() == 1:
            return self._received
        flag = torch.tensor([self._received], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=comm._get_global_gloo_group())
        return int(flag.item())

    def after_step(self) -> None:
        signum = self._agreed_signal()
        it = self.trainer.iter
        if not signum or it + 1 >= self.trainer.max_iter:
            return
        for hook in self.trainer._hooks:
            if isinstance(hook, FiniteCheckHook):
                hook.check_now()
        name = f"{self.file_prefix}_{it:07d}"
        self.checkpointer.save(name, iteration=it)  # every process: collecting may be collective
        comm.synchronize()  # every process leaves once the file is written
        path = os.path.join(self.checkpointer.save_dir, f"{name}.pth")
        signame = signal.Signals(signum).name
        message = (
            f"stopped by {signame} at iteration {it}; checkpoint {path} written; rerun with "
            "--resume to continue"
        )
        logger.warning(message[0].upper() + message[1:] + ".")
        previous = self._previous.get(signum)
        self._restore()
        chained: Optional[BaseException] = None
        if callable(previous) and previous is not signal.default_int_handler:
            try:
                previous(signum, None)  # e.g. submitit: requeue with --resume, then exit
            except BaseException as e:  # noqa: B036  (raised again after the group is left)
                chained = e
        raise StoppedBySignal(signum, message, chained)


def with_signal_checkpoint(
    loop_hooks: List[Optional[hooks.HookBase]], checkpointer: Any
) -> List[hooks.HookBase]:
    """``loop_hooks`` (Nones dropped) with a :class:`SignalCheckpointHook` of ``checkpointer``
    after every hook but the trailing ``PeriodicWriter``: on a stop the writer skips its
    ``after_step`` and writes that step once in its ``after_train`` (written twice, detectron2's
    progress line divides by zero iterations)."""
    ret = [h for h in loop_hooks if h is not None]
    at = len(ret)
    while at > 0 and isinstance(ret[at - 1], hooks.PeriodicWriter):
        at -= 1
    ret.insert(at, SignalCheckpointHook(checkpointer))
    return ret


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
