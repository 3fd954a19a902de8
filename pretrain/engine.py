"""The pretraining engine, built from detectron2's trainer, hooks and writers.

Reusable pieces (a supervised loop such as linear evaluation can use them as they are):

* :func:`launch_from_args` -- detectron2 ``launch`` (``--num-gpus/--num-machines/--machine-rank/
  --dist-url``; NCCL on GPUs, gloo on CPU) or, under ``torchrun``, the process group from the
  environment.
* :func:`setup_run` -- OUTPUT_DIR, ``log.txt``, ``config.yaml``, per-rank seeding (detectron2's
  ``default_setup``).
* :class:`AtomicCheckpointer` -- fvcore ``Checkpointer`` that writes atomically (temp + rename, a
  SIGKILL mid-save leaves the previous checkpoint intact) and loads with ``weights_only=True``.
* :class:`RNGStates` -- checkpointable torch/numpy/python/CUDA RNG states of every rank.
* :class:`NonFiniteLossError` / :func:`check_finite` -- stop on a NaN/inf loss before the update.
* :class:`ProgressHook`, :func:`build_writers` -- images/s, epoch, ETA line, metrics.json, events.
* :func:`write_results` -- ``results.json`` (docs/formats.md).
* :class:`pretrain.health.HealthHook` -- contrastive top-1, alignment, uniformity, embedding std
  of every step, logged at LOG_PERIOD; instance retrieval next to the kNN monitor.

:class:`Pretrainer` assembles them for the contrastive methods (like detectron2's
``DefaultTrainer``): ``Pretrainer(cfg).resume_or_load(resume).train()``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from detectron2.engine import SimpleTrainer, hooks, launch
from detectron2.engine.defaults import create_ddp_model, default_setup
from detectron2.solver import LRMultiplier
from detectron2.solver.lr_scheduler import WarmupParamScheduler
from detectron2.utils import comm
from detectron2.utils.events import (
    CommonMetricPrinter,
    EventStorage,
    JSONWriter,
    TensorboardXWriter,
)
from detectron2.utils.logger import setup_logger
from fvcore.common.checkpoint import Checkpointer
from fvcore.common.param_scheduler import CosineParamScheduler, ParamScheduler

from pretrain.config import effective_lr
from pretrain.data import (
    RobustImageFolder,
    TwoCropsTransform,
    build_image_folder,
    build_train_loader,
    count_bad_files,
    eval_transform,
    moco_v2_transform,
)
from pretrain.health import HealthHook, instance_retrieval_top1
from pretrain.io import (
    UserError,
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    remove_stale_temp_files,
)
from pretrain.knn import knn_top1
from pretrain.methods import ContrastiveMethod, build_method

__all__ = [
    "launch_from_args",
    "finish_distributed",
    "setup_run",
    "get_device",
    "AtomicCheckpointer",
    "RNGStates",
    "NonFiniteLossError",
    "check_finite",
    "ProgressHook",
    "build_writers",
    "build_lr_multiplier",
    "write_results",
    "ContrastiveTrainer",
    "Pretrainer",
    "num_negatives_per_query",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Launch and set-up
# --------------------------------------------------------------------------------------------


def launch_from_args(main: Callable[..., Any], args: Any, *main_args: Any) -> None:
    """Run ``main(*main_args)`` on every process of the job described by ``args``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is initialised
    from the environment (NCCL with CUDA, else gloo) and ``main`` runs in this process. Otherwise
    detectron2's ``launch`` spawns ``--num-gpus`` processes per machine (it picks gloo when CUDA is
    absent, so ``--num-gpus 2`` also runs two CPU processes).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
        comm.create_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        comm.synchronize()
        main(*main_args)
        return
    try:
        launch(
            _run_worker,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(main, *main_args),
        )
    except torch.multiprocessing.ProcessExitedException as e:
        if e.exit_code == 2:  # a worker already printed its one-sentence UserError
            raise SystemExit(2) from None
        raise


def _run_worker(main: Callable[..., Any], *main_args: Any) -> None:
    """Body of every launched process. A spawned worker (world size > 1) ends with ``os._exit(0)``
    after tearing gloo/NCCL down and flushing its output: the normal interpreter exit runs the C++
    static destructors of the process-group backend, which now and then abort a finished worker
    ("terminate called without an active exception", SIGABRT) and fail a completed run."""
    main(*main_args)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        finish_distributed()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def finish_distributed() -> None:
    """Wait for every process, then tear the process group down. Without it a process that exits
    first can close gloo's sockets under a peer still shutting down, which aborts (SIGABRT) it."""
    if dist.is_available() and dist.is_initialized():
        comm.synchronize()
        dist.destroy_process_group()


def get_device() -> torch.device:
    """This process's CUDA device (its local rank) or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", comm.get_local_rank() if dist.is_initialized() else 0)
    return torch.device("cpu")


def setup_run(cfg: Any, args: Any) -> None:
    """detectron2's ``default_setup``: OUTPUT_DIR, ``log.txt`` (rank 0; ``log.txt.rankN`` for the
    others), the environment and the full config in the log, ``config.yaml``, and seeding every RNG
    with ``SEED + rank``; this package's loggers (``pretrain.*``) also go to the console and
    ``log.txt``."""
    default_setup(cfg, args)
    setup_logger(
        cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="pretrain", abbrev_name="pt"
    )


# --------------------------------------------------------------------------------------------
# Checkpointing
# --------------------------------------------------------------------------------------------


class AtomicCheckpointer(Checkpointer):
    """fvcore ``Checkpointer`` with atomic writes, ``weights_only`` loads and a ``meta`` entry.

    ``save`` must be called on every process (as detectron2's ``PeriodicCheckpointer`` hook does):
    collecting the state may be collective (:class:`RNGStates`); only the main process writes.
    ``meta_fn()`` returns the ``meta`` dict of docs/formats.md, stored with every checkpoint.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        save_dir: str = "",
        *,
        meta_fn: Optional[Callable[[], Dict[str, Any]]] = None,
        save_to_disk: Optional[bool] = None,
        **checkpointables: Any,
    ) -> None:
        if save_to_disk is None:
            save_to_disk = comm.is_main_process()
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.meta_fn = meta_fn

    def save(self, name: str, **kwargs: Any) -> None:
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        if self.meta_fn is not None:
            data["meta"] = self.meta_fn()
        if not self.save_dir or not self.save_to_disk:
            return
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        atomic_save(data, path)
        self.tag_last_checkpoint(basename)

    def remove_stale_temp_files(self) -> None:
        """Delete the temp files of saves that were killed mid-write (main process only)."""
        if self.save_dir and self.save_to_disk:
            stale = remove_stale_temp_files(self.save_dir)
            if stale:
                self.logger.info(
                    "Removed %d partial file(s) of interrupted saves: %s",
                    len(stale),
                    ", ".join(stale),
                )

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if resume:
            self.remove_stale_temp_files()
        return super().resume_or_load(path, resume=resume)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        # written after the checkpoint it names and replaced atomically, so it never points to a
        # partial file nor is itself half-written
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def _load_file(self, f: str) -> Dict[str, Any]:
        # fvcore's documented extension point for the file format: refuse pickled code
        return load_checkpoint(f)


class RNGStates:
    """Checkpointable RNG states of every process: torch (CPU and CUDA), numpy, python, plus named
    ``torch.Generator``s (e.g. the negatives sampler). ``state_dict`` is collective."""

    def __init__(self, generators: Optional[Dict[str, torch.Generator]] = None) -> None:
        self.generators = dict(generators or {})

    def _local(self) -> Dict[str, Any]:
        np_state = np.random.get_state()
        py_state = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            # numpy's and python's states as tensors/lists: loadable with weights_only=True
            "numpy": {
                "key": np_state[0],
                "pos": int(np_state[2]),
                "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                "has_gauss": int(np_state[3]),
                "cached_gaussian": float(np_state[4]),
            },
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "generators": {k: g.get_state() for k, g in self.generators.items()},
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def state_dict(self) -> Dict[str, Any]:
        return {"per_rank": comm.all_gather(self._local())}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        per_rank = state["per_rank"]
        rank = comm.get_rank()
        if len(per_rank) != comm.get_world_size():
            logger.warning(
                "Checkpoint holds RNG states of %d processes, this run has %d: the random streams "
                "continue but not bit-exactly.",
                len(per_rank),
                comm.get_world_size(),
            )
        s = per_rank[rank % len(per_rank)]
        torch.set_rng_state(s["torch"])
        n = s["numpy"]
        np.random.set_state(
            (
                n["key"],
                n["keys"].numpy().astype(np.uint32),
                n["pos"],
                n["has_gauss"],
                n["cached_gaussian"],
            )
        )
        random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
        for k, g in self.generators.items():
            if k in s["generators"]:
                g.set_state(s["generators"][k])
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state(s["cuda"])


# --------------------------------------------------------------------------------------------
# Training step, stop on NaN, progress
# --------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; raised before the optimizer step so no weight is corrupted."""

    def __init__(self, iteration: int, values: Dict[str, float]) -> None:
        self.iteration = iteration
        self.values = values
        super().__init__(f"the loss became non-finite at iteration {iteration} ({values})")


def check_finite(loss_dict: Dict[str, torch.Tensor], iteration: int) -> None:
    """Raise :class:`NonFiniteLossError` on every process if any process has a non-finite loss.

    The flag is all-reduced so all processes stop at the same iteration (a lone process stopping
    would leave the others blocked in the next collective).
    """
    total = sum(v.detach().float() for v in loss_dict.values())
    bad = (~torch.isfinite(total)).float().reshape(1)
    if comm.get_world_size() > 1:
        dist.all_reduce(bad)
    if bad.item() > 0:
        raise NonFiniteLossError(iteration, {k: float(v.detach()) for k, v in loss_dict.items()})


class ContrastiveTrainer(SimpleTrainer):
    """detectron2 ``SimpleTrainer`` whose step feeds a two-view batch ``((im_q, im_k), labels)`` to
    ``model(im_q, im_k) -> {losses}``, with optional autocast (bf16/fp16 + GradScaler), NHWC
    inputs, and a NaN/inf stop before the update."""

    def __init__(
        self,
        model: torch.nn.Module,
        data_loader: Any,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        amp_dtype: Optional[torch.dtype] = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__(model, data_loader, optimizer, zero_grad_before_forward=True)
        self.device = device
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        use_scaler = amp_dtype == torch.float16
        self.grad_scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def run_step(self) -> None:
        assert self.model.training, "model was switched to eval mode"
        start = time.perf_counter()
        (im_q, im_k), _labels = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        im_q, im_k = self._to_device(im_q), self._to_device(im_k)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        ):
            loss_dict = self.model(im_q, im_k)
        losses = sum(loss_dict.values())
        check_finite(loss_dict, self.iter)
        self.grad_scaler.scale(losses).backward()
        self.after_backward()
        SimpleTrainer.write_metrics(loss_dict, data_time, self.iter)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def train(self, start_iter: int, max_iter: int) -> None:
        """detectron2's ``TrainerBase.train`` loop; a non-finite loss ends it with one error line
        instead of a traceback (hooks' ``after_train`` still run, no checkpoint is written)."""
        self.iter = self.start_iter = start_iter
        self.max_iter = max_iter
        logger.info("Starting training from iteration %d", start_iter)
        with EventStorage(start_iter) as self.storage:
            try:
                self.before_train()
                for self.iter in range(start_iter, max_iter):
                    self.before_step()
                    self.run_step()
                    self.after_step()
                self.iter += 1
            except NonFiniteLossError as e:
                logger.error("Stopping: %s.", e)
                raise
            except Exception:
                logger.exception("Exception during training:")
                raise
            finally:
                self.after_train()


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


def build_lr_multiplier(
    max_iter: int, warmup_iters: int, warmup_factor: float = 0.001, cosine_end: float = 0.0
) -> ParamScheduler:
    """Linear warm-up over ``warmup_iters`` then cosine decay to ``cosine_end`` at ``max_iter``
    (fvcore schedulers, a multiplier of the base lr; detectron2's ``LRScheduler`` hook applies it).
    """
    cosine = CosineParamScheduler(1.0, cosine_end)
    if warmup_iters <= 0:
        return cosine
    return WarmupParamScheduler(cosine, warmup_factor, min(warmup_iters / max_iter, 1.0))


def warmup_iterations(cfg, iters_per_epoch: int) -> int:
    """``SOLVER.WARMUP_ITERS`` if set (> 0), else ``SOLVER.WARMUP_EPOCHS`` epochs in iterations."""
    if cfg.SOLVER.WARMUP_ITERS > 0:
        return int(cfg.SOLVER.WARMUP_ITERS)
    return int(round(cfg.SOLVER.WARMUP_EPOCHS * iters_per_epoch))


def write_results(output_dir: str, results: Dict[str, Any]) -> str:
    """Write ``results.json`` atomically (main process only); returns its path."""
    path = os.path.join(output_dir, "results.json")
    if comm.is_main_process():
        atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# The pretraining run
# --------------------------------------------------------------------------------------------


def num_negatives_per_query(cfg: Any) -> Optional[int]:
    """How many negatives each query is contrasted with, per method."""
    n = cfg.SOLVER.IMS_PER_BATCH
    return {
        "simo": cfg.LOSS.NUM_NEGATIVES,
        "mocov2": cfg.LOSS.QUEUE_SIZE,
        "simclr": 2 * n - 2,
        "simmoco": n - 1,
        "simco": n - 1,
    }.get(cfg.MODEL.METHOD)


class Pretrainer:
    """Data, model, optimizer, schedule, checkpointing and hooks of one pretraining run.

    Call on every process after :func:`setup_run`::

        trainer = Pretrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
    """

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.device = get_device()
        self.name = cfg.NAME or os.path.basename(os.path.normpath(cfg.OUTPUT_DIR))
        self.dataset = build_image_folder(
            cfg.DATASETS.ROOT,
            cfg.DATASETS.TRAIN_SPLIT,
            TwoCropsTransform(
                moco_v2_transform(cfg.INPUT.SIZE, (cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE))
            ),
        )
        cuda = self.device.type == "cuda"
        self.loader = build_train_loader(
            self.dataset,
            cfg.SOLVER.IMS_PER_BATCH,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
            seed=max(cfg.SEED, 0),
            pin_memory=cfg.DATALOADER.PIN_MEMORY and cuda,
            persistent_workers=cfg.DATALOADER.PERSISTENT_WORKERS,
            prefetch_factor=cfg.DATALOADER.PREFETCH_FACTOR,
        )
        self.iters_per_epoch = self.loader.batches_per_epoch
        if cfg.SOLVER.MAX_ITER > 0:
            self.max_iter = cfg.SOLVER.MAX_ITER
        else:
            self.max_iter = max(int(round(cfg.SOLVER.EPOCHS * self.iters_per_epoch)), 1)
        self.model: ContrastiveMethod = build_method(cfg, self.device)
        ddp_kwargs: Dict[str, Any] = {"broadcast_buffers": False}
        if not cuda:
            ddp_kwargs["device_ids"] = None
        # SyncBN keeps buffers identical across processes and the queue is built from gathered
        # keys, so DDP need not re-broadcast buffers at every forward
        train_model = create_ddp_model(self.model, **ddp_kwargs)
        if cfg.MODEL.COMPILE:
            train_model = torch.compile(train_model)
        self.lr = effective_lr(cfg)
        self.optimizer = torch.optim.SGD(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=self.lr,
            momentum=cfg.SOLVER.MOMENTUM,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
        amp_dtype = None
        if cfg.SOLVER.AMP.ENABLED:
            if cuda:
                amp_dtype = getattr(torch, cfg.SOLVER.AMP.PRECISION)
            else:
                logger.warning("SOLVER.AMP.ENABLED is ignored on CPU; training in float32.")
        self.trainer = ContrastiveTrainer(
            train_model,
            self.loader,
            self.optimizer,
            device=self.device,
            amp_dtype=amp_dtype,
            channels_last=cfg.MODEL.CHANNELS_LAST,
        )
        warmup_iters = warmup_iterations(cfg, self.iters_per_epoch)
        self.scheduler = LRMultiplier(
            self.optimizer,
            build_lr_multiplier(
                self.max_iter, warmup_iters, cfg.SOLVER.WARMUP_FACTOR, cfg.SOLVER.COSINE_END
            ),
            self.max_iter,
        )
        # top-level entries of docs/formats.md; the iteration comes from PeriodicCheckpointer
        self.checkpointer = AtomicCheckpointer(
            self.model,
            cfg.OUTPUT_DIR,
            meta_fn=self.meta,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            grad_scaler=self.trainer.grad_scaler,
            loader=self.loader,
            rng=RNGStates({"model": self.model.generator}),
        )
        self.trainer.register_hooks(self.build_hooks())
        self.start_iter = 0
        logger.info(
            "%s: %d images, %d processes, global batch N=%d, %d iterations/epoch, %d iterations "
            "(%.2f epochs); effective lr = BASE_LR %.4g x N/256 = %.4g (EqCo rule 2); warm-up %d "
            "iterations",
            cfg.MODEL.METHOD,
            len(self.dataset),
            comm.get_world_size(),
            cfg.SOLVER.IMS_PER_BATCH,
            self.iters_per_epoch,
            self.max_iter,
            self.max_iter / max(self.iters_per_epoch, 1),
            cfg.SOLVER.BASE_LR,
            self.lr,
            warmup_iters,
        )

    def build_hooks(self) -> List[hooks.HookBase]:
        cfg = self.cfg
        max_keep = cfg.SOLVER.MAX_TO_KEEP if cfg.SOLVER.MAX_TO_KEEP > 0 else None
        ret: List[Optional[hooks.HookBase]] = [
            hooks.IterationTimer(),
            hooks.LRScheduler(self.optimizer, self.scheduler),
            ProgressHook(cfg.SOLVER.IMS_PER_BATCH, self.loader.epochs_done),
            hooks.PeriodicCheckpointer(
                self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_to_keep=max_keep
            ),
        ]
        if cfg.TEST.KNN_PERIOD > 0:
            ret.append(hooks.EvalHook(cfg.TEST.KNN_PERIOD, self.knn_eval))
        if comm.is_main_process():
            # the health averages of the steps since the last write, just before the writer
            ret.append(HealthHook(self.model, cfg.LOG_PERIOD))
            # last, so that it writes what the other hooks put into the storage this step
            ret.append(
                hooks.PeriodicWriter(build_writers(cfg.OUTPUT_DIR, self.max_iter), cfg.LOG_PERIOD)
            )
        return [h for h in ret if h is not None]

    def knn_eval(self) -> Dict[str, float]:
        """kNN top-1 of DATASETS.VAL_SPLIT against DATASETS.TRAIN_SPLIT (eval transforms), and
        the instance-retrieval top-1 on the first TEST.RETRIEVAL_SIZE val images (if > 0)."""
        cfg = self.cfg
        tf = eval_transform(cfg.INPUT.SIZE)
        train = RobustImageFolder(os.path.join(cfg.DATASETS.ROOT, cfg.DATASETS.TRAIN_SPLIT), tf)
        val = RobustImageFolder(os.path.join(cfg.DATASETS.ROOT, cfg.DATASETS.VAL_SPLIT), tf)
        if train.classes != val.classes:
            raise UserError(
                f"{val.root}: its class folders differ from those of {train.root}; the kNN monitor "
                "needs the same classes (or set TEST.KNN_PERIOD 0)."
            )
        top1 = knn_top1(
            self.model.encoder_q,
            train,
            val,
            self.device,
            batch_size=max(cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(), 1),
            num_workers=min(cfg.DATALOADER.NUM_WORKERS, 4),
            k=cfg.TEST.KNN_K,
            t=cfg.TEST.KNN_T,
        )
        out = {"knn_top1": top1}
        retrieval = ""
        if cfg.TEST.RETRIEVAL_SIZE > 0:
            out["instance_retrieval_top1"] = self.instance_retrieval()
            retrieval = f"; instance retrieval top-1 {out['instance_retrieval_top1']:.2f}%"
        logger.info(
            "kNN monitor at iteration %d: top-1 %.2f%%%s", self.trainer.iter, top1, retrieval
        )
        self.last_knn_top1 = top1
        self.last_instance_retrieval_top1 = out.get("instance_retrieval_top1")
        return out

    def instance_retrieval(self) -> float:
        """:func:`pretrain.health.instance_retrieval_top1` of the query encoder on the first
        TEST.RETRIEVAL_SIZE val images, with the pretraining augmentation and per-image seeds
        fixed for the whole run (derived from SEED)."""
        cfg = self.cfg
        tf = moco_v2_transform(cfg.INPUT.SIZE, (cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE))
        val = RobustImageFolder(os.path.join(cfg.DATASETS.ROOT, cfg.DATASETS.VAL_SPLIT), tf)
        return instance_retrieval_top1(
            self.model.encoder_q,
            val,
            self.device,
            size=cfg.TEST.RETRIEVAL_SIZE,
            seed=max(cfg.SEED, 0),
            batch_size=max(cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(), 1),
            num_workers=min(cfg.DATALOADER.NUM_WORKERS, 4),
        )

    def meta(self) -> Dict[str, Any]:
        """The checkpoint's ``meta`` dict (docs/formats.md)."""
        cfg = self.cfg
        return {
            "kind": "pretrain",
            "name": self.name,
            "method": cfg.MODEL.METHOD,
            "arch": cfg.MODEL.ARCH,
            "loss": cfg.LOSS.NAME,
            "tau": float(cfg.LOSS.TAU),
            "alpha": float(cfg.LOSS.ALPHA) if cfg.LOSS.NAME == "eqco" else None,
            "num_negatives": num_negatives_per_query(cfg),
            "epochs": float(self.loader.epochs_done()),
            # iterations completed (the checkpoint's top-level "iteration" is the last index)
            "iteration": int(self.trainer.iter) + 1,
            "ims_per_batch": int(cfg.SOLVER.IMS_PER_BATCH),
        }

    def resume_or_load(self, resume: bool = True) -> "Pretrainer":
        """With ``resume`` and a ``last_checkpoint`` in OUTPUT_DIR, restore everything (weights,
        optimizer, iteration, loader position, queue, RNG states, scaler); else start at 0."""
        if resume:
            self.checkpointer.remove_stale_temp_files()
        if resume and self.checkpointer.has_checkpoint():
            extra = self.checkpointer.resume_or_load("", resume=True)
            self.start_iter = int(extra["iteration"]) + 1
            logger.info(
                "Resumed at iteration %d (epoch %.3f)", self.start_iter, self.loader.epochs_done()
            )
        elif resume:
            logger.info("No checkpoint in %s: starting from scratch.", self.cfg.OUTPUT_DIR)
        return self

    def train(self) -> Dict[str, Any]:
        """Run to ``max_iter``; returns (and writes on the main process) ``results.json``.

        A non-finite loss raises :class:`UserError` naming the iteration and the last good
        checkpoint (nothing is saved after the divergence)."""
        final_loss = None
        if self.start_iter >= self.max_iter:
            logger.info("Already trained for %d iterations; nothing to do.", self.max_iter)
            previous = os.path.join(self.cfg.OUTPUT_DIR, "results.json")
            if os.path.isfile(previous):
                with open(previous) as f:
                    final_loss = json.load(f).get("final_loss")
        else:
            try:
                self.trainer.train(self.start_iter, self.max_iter)
            except NonFiniteLossError as e:
                last = None
                if self.checkpointer.has_checkpoint():
                    last = self.checkpointer.get_checkpoint_file()
                kept = (
                    f"the last good checkpoint is {last}" if last else "no checkpoint was written"
                )
                raise UserError(
                    f"training diverged: the loss became non-finite at iteration {e.iteration}; "
                    f"{kept}; lower SOLVER.BASE_LR (or check the data) and restart with --resume."
                ) from e
            history = self.trainer.storage.histories().get("total_loss")
            if comm.is_main_process() and history is not None:
                final_loss = float(history.median(20))
        bad = count_bad_files(self.dataset)
        if bad:
            logger.warning("%d unreadable training images were skipped (listed above).", bad)
        results = {
            "kind": "pretrain",
            "name": self.name,
            "method": self.cfg.MODEL.METHOD,
            "loss": self.cfg.LOSS.NAME,
            "tau": float(self.cfg.LOSS.TAU),
            "alpha": float(self.cfg.LOSS.ALPHA) if self.cfg.LOSS.NAME == "eqco" else None,
            "num_negatives": num_negatives_per_query(self.cfg),
            "epochs": float(self.loader.epochs_done()),
            "iterations": int(self.max_iter),
            "final_loss": final_loss,
            "arch": self.cfg.MODEL.ARCH,
            "ims_per_batch": int(self.cfg.SOLVER.IMS_PER_BATCH),
            "skipped_images": bad,
            "knn_top1": getattr(self, "last_knn_top1", None),
            "instance_retrieval_top1": getattr(self, "last_instance_retrieval_top1", None),
        }
        write_results(self.cfg.OUTPUT_DIR, results)
        return results
