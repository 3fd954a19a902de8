"""The one training loop of every stage: detectron2's ``SimpleTrainer`` (``AMPTrainer`` with mixed
precision, on any device) driven by :class:`TrainingRun`, the base of the pretraining and
linear-eval runs (config, device, hooks, checkpointer, the checkpoint-and-stop on signals,
divergence message; resume and
``results.json`` from :class:`~pretrain.engine.run.RunMixin`, which the detection trainer
shares)."""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer, hooks
from detectron2.utils import comm

from pretrain.engine.hooks import (
    FiniteCheckHook,
    NonFiniteLossError,
    ProgressHook,
    build_writers,
    with_signal_checkpoint,
)
from pretrain.engine.launch import get_device
from pretrain.engine.run import RunMixin, prepare_output_dir
from pretrain.io import UserError

__all__ = ["build_trainer", "DeviceAMPTrainer", "ScalerState", "TrainingRun"]

logger = logging.getLogger(__name__)


def load_scaler_state(scaler: torch.amp.GradScaler, state: Dict[str, Any]) -> None:
    """Restore ``scaler`` from a checkpoint, also when SOLVER.AMP changed between the save and the
    resume (e.g. float16 -> bfloat16 after float16 overflowed, as the divergence message
    suggests): a disabled scaler saves ``{}``, and torch refuses to load ``{}`` into an enabled
    one; here the scale then starts afresh, or the saved one is left unused, and the log says so."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)
    elif scaler.is_enabled():
        logger.info(
            "The checkpoint was trained without float16 loss scaling: the GradScaler starts at its "
            "initial scale."
        )
    elif state:
        logger.info("The checkpoint's float16 loss scale is unused: this run has no loss scaling.")


class ScalerState:
    """A GradScaler as a checkpointable whose load survives a change of SOLVER.AMP
    (:func:`load_scaler_state`)."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler

    def state_dict(self) -> Dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        load_scaler_state(self.scaler, state)


class DeviceAMPTrainer(AMPTrainer):
    """detectron2's ``AMPTrainer`` on the device of the model's parameters: its ``run_step``
    asserts CUDA and autocasts with the deprecated ``torch.cuda.amp.autocast``; this one is the
    same step under ``torch.autocast(device_type)``, so the float16 / bfloat16 path (GradScaler,
    overflow steps) also runs, and is tested, on the CPU."""

    def __init__(self, *args: Any, device_type: str = "cuda", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.device_type = device_type

    def run_step(self) -> None:
        assert self.model.training, "[DeviceAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast(self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses, loss_dict = loss_dict, {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """detectron2's, restoring the scaler with :func:`load_scaler_state` (a checkpoint of a
        float32 or bfloat16 run has no, or an empty, scaler state)."""
        SimpleTrainer.load_state_dict(self, state_dict)
        load_scaler_state(self.grad_scaler, state_dict.get("grad_scaler", {}))


def build_trainer(
    model: torch.nn.Module,
    data_loader: Any,
    optimizer: torch.optim.Optimizer,
    *,
    amp_dtype: Optional[torch.dtype] = None,
    grad_scaler: Optional[torch.amp.GradScaler] = None,
    log_period: int = 1,
    device_type: str = "cuda",
) -> SimpleTrainer:
    """``SimpleTrainer``, or :class:`DeviceAMPTrainer` (autocast to ``amp_dtype`` on
    ``device_type``) when ``amp_dtype`` is set, as detectron2's ``DefaultTrainer`` chooses.
    ``model(batch)`` returns a dict of losses; the trainer zeroes the gradients before the
    forward. The losses are read back and gathered over processes every ``log_period``
    iterations only (detectron2's ``gather_metric_period``): the other steps never wait for the
    device."""
    common = dict(zero_grad_before_forward=True, gather_metric_period=log_period)
    if amp_dtype is None:
        return SimpleTrainer(model, data_loader, optimizer, **common)
    return DeviceAMPTrainer(
        model,
        data_loader,
        optimizer,
        grad_scaler=grad_scaler,
        precision=amp_dtype,
        device_type=device_type,
        **common,
    )


class TrainingRun(RunMixin):
    """What the pretraining and linear-eval runs share, like detectron2's ``DefaultTrainer``
    (whose loop it runs): the subclass builds data, model (:func:`create_ddp_model`), optimizer
    and scheduler, then calls :meth:`build_trainer` and sets :attr:`checkpointer`; this class owns
    the hooks every loop needs and the divergence message, :class:`RunMixin` the resume and
    ``results.json``.

    Subclasses set :attr:`stage` (used in messages), :attr:`max_iter`, :attr:`loader` (with
    ``epochs_done()``) and implement :meth:`build_hooks`; :meth:`after_resume` may check the
    restored state.
    """

    stage = "training"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.device = get_device(cfg.MODEL.DEVICE)
        self.start_iter = 0
        self.max_iter = 0
        prepare_output_dir(cfg.OUTPUT_DIR)

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
            device_type=self.device.type,
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
        """:meth:`build_hooks` and the checkpoint-and-stop on SIGTERM / SIGINT / SIGUSR1 after
        them, before the writer (:func:`~pretrain.engine.hooks.with_signal_checkpoint`)."""
        self.trainer.register_hooks(with_signal_checkpoint(self.build_hooks(), self.checkpointer))

    # ------------------------------------------------------------------ running
    def resumed_message(self) -> str:
        return f"Resumed at iteration {self.start_iter} (epoch {self.loader.epochs_done():.3f})"

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
                f"{self.stage} diverged: {e.what}; {kept}; lower SOLVER.BASE_LR (or check the "
                "data; with float16, try SOLVER.AMP.PRECISION bfloat16) and restart with --resume."
            ) from e
