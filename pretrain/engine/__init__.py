"""The training engine shared by every stage, built from detectron2's trainer, hooks and writers
(see docs/ARCHITECTURE.md):

* :mod:`.launch` -- detectron2 ``launch`` or torchrun, device, OUTPUT_DIR / log.txt / config.yaml,
  the check that every process sees the same OUTPUT_DIR;
* :mod:`.lock` -- one live run per OUTPUT_DIR (``run.lock``, taken over when its run is gone);
* :mod:`.checkpoint` -- atomic fvcore ``Checkpointer`` (resume decided by process 0) and the RNG
  states of every process;
* :mod:`.hooks` -- stop on NaN/inf, checkpoint and stop on SIGTERM / SIGINT / SIGUSR1, progress
  with ETA, the writers;
* :mod:`.schedule` -- warm-up + cosine learning rate;
* :mod:`.run` -- what every run shares whichever loop it drives (:class:`RunMixin`: resume decided
  by process 0, ``results.json``; OUTPUT_DIR preparation, DDP on CPU as on GPU), also used by the
  detection trainer :class:`transfer.trainer.Trainer`;
* :mod:`.train_loop` -- ``SimpleTrainer`` / :class:`DeviceAMPTrainer` and :class:`TrainingRun`,
  the base of :class:`pretrain.pretrainer.Pretrainer` and :class:`pretrain.lincls.LinearEvaluator`.
"""

from pretrain.engine.checkpoint import AtomicCheckpointer, RNGStates
from pretrain.engine.hooks import (
    FiniteCheckHook,
    NonFiniteLossError,
    ProgressHook,
    SignalCheckpointHook,
    StoppedBySignal,
    build_writers,
    with_signal_checkpoint,
)
from pretrain.engine.launch import (
    amp_dtype,
    end_stopped_run,
    autocast_to,
    check_shared_output_dir,
    finish_distributed,
    get_device,
    launch_from_args,
    no_cuda_reason,
    resolve_device,
    setup_run,
)
from pretrain.engine.lock import (
    RunLock,
    check_output_dir_free,
    lock_output_dir,
    release_output_dir_locks,
)
from pretrain.engine.run import RunMixin, create_ddp_model, prepare_output_dir, write_results
from pretrain.engine.schedule import build_lr_multiplier, warmup_iterations
from pretrain.engine.train_loop import DeviceAMPTrainer, ScalerState, TrainingRun, build_trainer

__all__ = [
    "launch_from_args",
    "finish_distributed",
    "get_device",
    "resolve_device",
    "no_cuda_reason",
    "amp_dtype",
    "autocast_to",
    "setup_run",
    "check_shared_output_dir",
    "end_stopped_run",
    "RunLock",
    "lock_output_dir",
    "check_output_dir_free",
    "release_output_dir_locks",
    "AtomicCheckpointer",
    "RNGStates",
    "NonFiniteLossError",
    "FiniteCheckHook",
    "ProgressHook",
    "SignalCheckpointHook",
    "StoppedBySignal",
    "with_signal_checkpoint",
    "build_writers",
    "build_lr_multiplier",
    "warmup_iterations",
    "build_trainer",
    "DeviceAMPTrainer",
    "ScalerState",
    "RunMixin",
    "TrainingRun",
    "create_ddp_model",
    "prepare_output_dir",
    "write_results",
]
