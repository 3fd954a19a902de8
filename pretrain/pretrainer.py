"""One pretraining run (like detectron2's ``DefaultTrainer``): two-view data, the contrastive
method, SGD with warm-up + cosine, checkpoints, the kNN / retrieval monitor and the health
metrics, on the shared loop of :class:`pretrain.engine.TrainingRun`::

    Pretrainer(cfg).resume_or_load(resume=args.resume).train()
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List

import torch
from detectron2.engine import hooks
from detectron2.solver import LRMultiplier
from detectron2.utils import comm

from pretrain.config import effective_lr
from pretrain.data import (
    RobustImageFolder,
    build_image_folder,
    build_train_loader,
    count_bad_files,
    eval_transform,
    moco_v2_transform,
    two_crops_transform,
    use_device_augment,
)
from pretrain.engine import (
    AtomicCheckpointer,
    RNGStates,
    ScalerState,
    TrainingRun,
    amp_dtype,
    build_lr_multiplier,
    create_ddp_model,
    warmup_iterations,
)
from pretrain.grad_norm import QueryGradNormHook
from pretrain.health import HealthHook, split_retrieval
from pretrain.io import UserError, read_json
from pretrain.knn import knn_top1
from pretrain.methods import ContrastiveMethod, build_method, method_class

__all__ = ["Pretrainer", "num_negatives_per_query"]

logger = logging.getLogger(__name__)


def num_negatives_per_query(cfg: Any) -> int:
    """How many negatives each query is contrasted with (declared by each method)."""
    return method_class(cfg.MODEL.METHOD).num_negatives(cfg)


class Pretrainer(TrainingRun):
    """Data, model, optimizer, schedule, checkpointing and hooks of one pretraining run.

    Call on every process after :func:`pretrain.engine.setup_run`::

        trainer = Pretrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
    """

    stage = "training"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.name = cfg.NAME or os.path.basename(os.path.normpath(cfg.OUTPUT_DIR))
        self.dataset = build_image_folder(
            cfg.DATASETS.ROOT,
            cfg.DATASETS.TRAIN_SPLIT,
            two_crops_transform(
                moco_v2_transform(cfg.INPUT.SIZE, (cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE)),
                on_device=use_device_augment(cfg.INPUT.DEVICE_AUGMENT, self.device),
            ),
        )
        cuda = self.device.type == "cuda"
        self.loader = build_train_loader(
            self.dataset,
            cfg.SOLVER.IMS_PER_BATCH,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
            seed=0,
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
        per_query = cfg.MODEL.METHOD == "simo" and not cfg.LOSS.SHARED_NEGATIVES
        if per_query and cfg.SOLVER.IMS_PER_BATCH > 1024:
            # measured on one core: 0.4 ms at N = 256, 11 ms at 1024, 290 ms at 4096 (docs/gpus.md)
            logger.warning(
                "LOSS.SHARED_NEGATIVES False at a global batch of %d: the per-query negatives draw "
                "N x (N - 1) numbers on the CPU every step (~290 ms at N = 4096); consider "
                "LOSS.SHARED_NEGATIVES True (the released SiMo code's selection).",
                cfg.SOLVER.IMS_PER_BATCH,
            )
        # no buffer broadcast at every forward: with SyncBN over all processes the BN buffers
        # stay identical, the queue is built from gathered keys, and with BN groups
        # (MODEL.SYNC_BN_GROUP_SIZE) or per-process BN each process keeps its own statistics
        # (the checkpoint holds rank 0's)
        # device_ids=None: DDP leaves the inputs where they are; the method's forward moves the
        # views itself, and the device path's augmentation parameters stay on the host (were DDP
        # to move them, reading their kernel sizes would make the host wait every step)
        train_model = create_ddp_model(self.model, broadcast_buffers=False, device_ids=None)
        if cfg.MODEL.COMPILE:
            train_model = torch.compile(train_model)
        self.lr = effective_lr(cfg)
        optimizer = torch.optim.SGD(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=self.lr,
            momentum=cfg.SOLVER.MOMENTUM,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
        self.build_trainer(train_model, optimizer, amp_dtype(cfg, self.device))
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
            grad_scaler=ScalerState(self.grad_scaler),
            loader=self.loader,
            rng=RNGStates({"model": self.model.generator}),
        )
        self.register_hooks()
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
        ret = self.loop_hooks(self.scheduler, cfg.SOLVER.CHECKPOINT_PERIOD)
        if cfg.TEST.KNN_PERIOD > 0:
            ret.append(hooks.EvalHook(cfg.TEST.KNN_PERIOD, self.knn_eval))
        if cfg.TEST.GRAD_NORM:
            if cfg.MODEL.COMPILE:
                logger.warning(
                    "TEST.GRAD_NORM: grad_norm_q is not logged with MODEL.COMPILE (tensor hooks "
                    "and compile clash)."
                )
            else:
                # on every process: the value is averaged over processes
                ret.append(QueryGradNormHook(self.model, cfg.LOG_PERIOD))
        if comm.is_main_process():
            # the health averages of the steps since the last write, just before the writer
            ret.append(HealthHook(self.model, cfg.LOG_PERIOD))
        ret.append(self.writer_hook())
        return ret

    def knn_eval(self) -> Dict[str, float]:
        """kNN top-1 of DATASETS.VAL_SPLIT against DATASETS.TRAIN_SPLIT (eval transforms), and
        the instance-retrieval top-1 on TEST.RETRIEVAL_SIZE val images (if > 0)."""
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
            "kNN monitor after %d iterations: top-1 %.2f%%%s",
            min(self.trainer.iter + 1, self.max_iter),
            top1,
            retrieval,
        )
        self.last_knn_top1 = top1
        self.last_instance_retrieval_top1 = out.get("instance_retrieval_top1")
        return out

    def instance_retrieval(self) -> float:
        """:func:`pretrain.health.split_retrieval` top-1 of the query encoder on
        TEST.RETRIEVAL_SIZE evenly spaced val images, with the pretraining augmentation and view
        seeds that are the same for every run (not SEED): the linear eval of any backbone with the
        same TEST.RETRIEVAL_SIZE and crop scales measures the same thing (pretrained vs random
        init, paired)."""
        cfg = self.cfg
        top1, _ = split_retrieval(
            self.model.encoder_q,
            cfg.DATASETS.ROOT,
            cfg.DATASETS.VAL_SPLIT,
            cfg.INPUT.SIZE,
            (cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE),
            self.device,
            size=cfg.TEST.RETRIEVAL_SIZE,
            batch_size=max(cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(), 1),
            num_workers=min(cfg.DATALOADER.NUM_WORKERS, 4),
        )
        return top1

    def describe(self) -> Dict[str, Any]:
        """What this run is, shared by the checkpoint's ``meta`` and ``results.json``
        (docs/formats.md)."""
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
            "ims_per_batch": int(cfg.SOLVER.IMS_PER_BATCH),
        }

    def meta(self) -> Dict[str, Any]:
        """The checkpoint's ``meta`` dict: :meth:`describe` and the iterations completed (the
        checkpoint's top-level "iteration" is the last index)."""
        return {**self.describe(), "iteration": int(self.trainer.iter) + 1}

    def train(self) -> Dict[str, Any]:
        """Run to ``max_iter``; returns (and writes on the main process) ``results.json``.

        A non-finite loss raises :class:`UserError` naming the iteration and the last good
        checkpoint (nothing is saved after the divergence)."""
        final_loss = None
        if self.start_iter >= self.max_iter:
            logger.info("Already trained for %d iterations; nothing to do.", self.max_iter)
            # the checkpoint just resumed from (deciding again would read the file again)
            last = self.resumed_from
            if last is not None and os.path.basename(last) != "model_final.pth":
                # killed between the last periodic save and the final one (the hook writes both
                # after the last step): the resumed state is the final state, write it
                logger.info("%s is the last checkpoint; writing model_final.pth from it.", last)
                self.trainer.iter = self.max_iter - 1  # the iteration its meta names
                self.checkpointer.save("model_final", iteration=self.max_iter - 1)
            previous = read_json(os.path.join(self.cfg.OUTPUT_DIR, "results.json")) or {}
            final_loss = previous.get("final_loss")
        else:
            self.run_loop()
            history = self.trainer.storage.histories().get("total_loss")
            if comm.is_main_process() and history is not None:
                # the median of the last 20 logged losses (read every LOG_PERIOD iterations)
                final_loss = float(history.median(20))
        bad = count_bad_files(self.dataset)
        if bad:
            logger.warning("%d unreadable training images were skipped (listed above).", bad)
        results = {
            **self.describe(),
            "iterations": int(self.max_iter),
            "final_loss": final_loss,
            "skipped_images": bad,
            "knn_top1": getattr(self, "last_knn_top1", None),
            "instance_retrieval_top1": getattr(self, "last_instance_retrieval_top1", None),
        }
        self.write_results(results)
        return results
