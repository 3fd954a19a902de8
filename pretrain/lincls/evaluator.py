"""One linear-evaluation run: :class:`LinearEvaluator` assembles data, frozen backbone, fc,
optimizer, lr schedule, checkpoints and hooks, trains, evaluates, runs the sanity check and
writes ``results.json`` (docs/methods.md, "Linear evaluation"; outputs: docs/formats.md).

Schedule: SGD momentum 0.9, lr as configured (:func:`pretrain.lincls.config.lincls_lr`: 30 for
MoCo, not scaled with the batch size), lr x GAMMA at the first iteration of each LR_DROP_EPOCHS
epoch; top-1 / top-5 on the val split at the end (and every TEST.EVAL_PERIOD_EPOCHS); then the
kNN top-1 of the frozen backbone (TEST.KNN) and the comparison of every backbone tensor with
MODEL.WEIGHTS. With MODEL.HEAD_BN the head's BatchNorm is folded into the fc of
``model_final.pth`` (a plain torchvision state dict); the periodic checkpoints keep it unfolded
for ``--resume``, and a checkpoint whose head does not match MODEL.HEAD_BN is refused with one
sentence.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from detectron2.engine import hooks
from detectron2.evaluation.evaluator import inference_context
from detectron2.utils import comm
from torch.utils.data import Dataset

from pretrain.config import PretrainCfgNode
from pretrain.data import build_train_loader, count_bad_files
from pretrain.engine import (
    AtomicCheckpointer,
    RNGStates,
    ScalerState,
    TrainingRun,
    amp_dtype,
    autocast_to,
    create_ddp_model,
)
from pretrain.io import UserError
from pretrain.lincls.config import lincls_lr
from pretrain.lincls.data import (
    CachedFeatures,
    FeatureDataset,
    build_datasets,
    extract_cached,
    per_rank_batch,
)
from pretrain.lincls.metrics import (
    evaluate_features,
    evaluate_images,
    frozen_knn_top1,
    frozen_retrieval,
    knn_results,
    percent,
)
from pretrain.lincls.model import BatchNormLinear, LinearClassifier
from pretrain.lincls.weights import (
    BackboneChangedError,
    PretrainedWeights,
    build_linear_model,
    check_backbone_unchanged,
    default_name,
    load_pretrained,
)

__all__ = ["LinearEvaluator"]

# the package's logger: log.txt names these lines pretrain.lincls, as before the split
logger = logging.getLogger("pretrain.lincls")

_PROTOCOL = {
    False: "MoCo protocol",
    True: "CACHED FEATURES of center crops: fast, not the paper protocol",
}
# a head BatchNorm in a checkpoint's model (MODEL.HEAD_BN, unfolded)
_HEAD_BN_KEY = "fc.bn.running_mean"


class _HeadCheckpointer(AtomicCheckpointer):
    """The run's checkpointer, which lets ``match_head(path, checkpoint)`` check (and adapt) the
    fc before a checkpoint's model is restored into it."""

    def __init__(self, *args: Any, match_head: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.match_head = match_head
        self._loading = ""

    def load(self, path: str, checkpointables: list[str] | None = None) -> dict[str, Any]:
        self._loading = path
        return super().load(path, checkpointables)

    def _load_model(self, checkpoint: Any) -> Any:
        self.match_head(self._loading, checkpoint)
        return super()._load_model(checkpoint)


class LinearEvaluator(TrainingRun):
    """Data, frozen backbone, fc, optimizer, schedule, checkpoints and hooks of one linear eval,
    on the shared loop of :class:`pretrain.engine.TrainingRun`.

    Call on every process (after :func:`pretrain.engine.setup_run` for log.txt/config.yaml)::

        results = LinearEvaluator(cfg).resume_or_load(resume=True).train()

    Args:
        cfg: a config from :func:`load_lincls_cfg`.
        unsafe: allow MODEL.WEIGHTS files that need code execution to load (trusted files only).
        weights: an already loaded :class:`PretrainedWeights` (sweeps); default: MODEL.WEIGHTS.
        features: cached mode only: the :attr:`features` of an earlier evaluator with the same
            MODEL.WEIGHTS, INPUT and DATASETS (sweeps over the fc's hyper-parameters then skip
            the extraction).
    """

    stage = "linear eval"

    def __init__(
        self,
        cfg: PretrainCfgNode,
        unsafe: bool = False,
        weights: PretrainedWeights | None = None,
        features: CachedFeatures | None = None,
    ) -> None:
        super().__init__(cfg)
        # SOLVER.AMP / MODEL.CHANNELS_LAST: the frozen backbone's autocast dtype (None: float32)
        # and memory format, in training and in every evaluation pass but the retrieval, which
        # stays float32 as the pretraining's monitor computes it; refused before any loading
        self.amp_dtype = amp_dtype(cfg, self.device)
        self.channels_last = bool(cfg.MODEL.CHANNELS_LAST)
        self.cached = bool(cfg.CACHED_FEATURES)
        self.weights = weights or load_pretrained(cfg.MODEL.WEIGHTS, cfg.MODEL.ARCH, unsafe)
        self.name = default_name(cfg, self.weights)
        self.train_set, self.val_set = build_datasets(cfg)
        self.num_classes = len(self.train_set.classes)
        seed = cfg.SEED if cfg.SEED >= 0 else int(torch.randint(0, 2**31, ()).item())
        self.head_bn = bool(cfg.MODEL.HEAD_BN)
        self.net = build_linear_model(
            cfg.MODEL.ARCH, self.num_classes, self.weights, seed, head_bn=self.head_bn
        )
        self.lr = lincls_lr(cfg)
        self.net.to(self.device)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        cuda = self.device.type == "cuda"
        self.test_per_rank = per_rank_batch(cfg.TEST.IMS_PER_BATCH, "TEST.IMS_PER_BATCH")
        workers = cfg.DATALOADER.NUM_WORKERS

        self.features: CachedFeatures | None = None
        if self.cached:
            self.features = features or self._extract(workers)
            sizes = (len(self.features.train_labels), len(self.features.val_labels))
            if sizes != (len(self.train_set), len(self.val_set)):
                raise UserError(
                    "the cached features passed in do not match the datasets' sizes; extract "
                    "them with the same DATASETS and MODEL.WEIGHTS."
                )
            train_data: Dataset = FeatureDataset(
                self.features.train, self.features.train_labels, self.train_set.root
            )
            workers = 0  # in memory already: worker processes would only copy the tensors
        else:
            train_data = self.train_set
        self.loader = build_train_loader(
            train_data,
            cfg.SOLVER.IMS_PER_BATCH,
            num_workers=workers,
            seed=max(cfg.SEED, 0),
            pin_memory=cfg.DATALOADER.PIN_MEMORY and cuda,
            persistent_workers=cfg.DATALOADER.PERSISTENT_WORKERS,
            prefetch_factor=cfg.DATALOADER.PREFETCH_FACTOR,
        )
        ipe = self.iters_per_epoch = self.loader.batches_per_epoch
        self.max_iter = cfg.SOLVER.MAX_ITER or max(int(round(cfg.SOLVER.EPOCHS * ipe)), 1)

        # DDP over the fc only: the frozen backbone has no gradient to synchronise
        self.model = LinearClassifier(
            self.net,
            create_ddp_model(self.net.fc, broadcast_buffers=False),
            from_features=self.cached,
            channels_last=self.channels_last,
        )
        params = [p for p in self.net.parameters() if p.requires_grad]
        assert len(params) == 2, "only fc.weight and fc.bias are trained"  # as MoCo's main_lincls
        self.build_trainer(
            self.model,
            torch.optim.SGD(
                params,
                lr=self.lr,
                momentum=cfg.SOLVER.MOMENTUM,
                weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            ),
            self.amp_dtype,
        )
        # lr x GAMMA at the first iteration of each drop epoch (MoCo adjusts per epoch)
        self.milestones = [int(round(e * ipe)) for e in cfg.SOLVER.LR_DROP_EPOCHS]
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, self.milestones, gamma=cfg.SOLVER.GAMMA
        )
        self.checkpointer = _HeadCheckpointer(
            self.net,
            cfg.OUTPUT_DIR,
            match_head=self._match_head,
            meta_fn=self.meta,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            grad_scaler=ScalerState(self.grad_scaler),
            loader=self.loader,
            rng=RNGStates(),
        )
        self.last_eval: dict[str, float] = {}
        self.last_knn_top1: float | None = None
        # results.json's instance_retrieval_top1 / retrieval_images, once retrieval_eval ran
        self.last_retrieval: dict[str, Any] = {}
        self.register_hooks()
        logger.info(
            "Linear eval (%s) of %s [%s checkpoint %s]: %s, %d train / %d val images, %d classes, "
            "%d processes, global batch %d, %d iterations/epoch, %d iterations (%.2f epochs); "
            "lr %.4g (%s), x%g at iterations %s; backbone in %s%s, %sfc in float32",
            _PROTOCOL[self.cached],
            self.name,
            self.weights.kind,
            self.weights.path,
            cfg.MODEL.ARCH,
            len(self.train_set),
            len(self.val_set),
            self.num_classes,
            comm.get_world_size(),
            cfg.SOLVER.IMS_PER_BATCH,
            ipe,
            self.max_iter,
            self.max_iter / max(ipe, 1),
            self.lr,
            (
                f"SOLVER.BASE_LR {cfg.SOLVER.BASE_LR:g} x {cfg.SOLVER.IMS_PER_BATCH} / "
                f"{cfg.SOLVER.REFERENCE_BATCH}"
                if cfg.SOLVER.REFERENCE_BATCH > 0
                else "as configured, not scaled with the batch size"
            ),
            cfg.SOLVER.GAMMA,
            self.milestones,
            "float32" if self.amp_dtype is None else f"{cfg.SOLVER.AMP.PRECISION} autocast",
            ", channels_last" if self.channels_last else "",
            "BatchNorm (no affine, MODEL.HEAD_BN) + " if self.head_bn else "",
        )

    def _extract(self, workers: int) -> CachedFeatures:
        logger.info(
            "Extracting features of %d train + %d val images (center crops, eval mode)...",
            len(self.train_set),
            len(self.val_set),
        )
        with autocast_to(self.device, self.amp_dtype):  # features come back float32
            return extract_cached(
                self.net, self.train_set, self.val_set, self.device, self.test_per_rank, workers
            )

    def _epochs_to_iters(self, epochs: float) -> int:
        return max(int(round(epochs * self.iters_per_epoch)), 1) if epochs > 0 else 0

    def build_hooks(self) -> list[hooks.HookBase]:
        cfg = self.cfg
        ret = self.loop_hooks(
            self.scheduler, self._epochs_to_iters(cfg.SOLVER.CHECKPOINT_PERIOD_EPOCHS)
        )
        # periodic evals, and the final one after the last iteration
        eval_period = self._epochs_to_iters(cfg.TEST.EVAL_PERIOD_EPOCHS)
        ret.append(hooks.EvalHook(eval_period, self.evaluate))
        ret.append(self.writer_hook())
        return ret

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Top-1 / top-5 (%) on the val split (collective); also kept in :attr:`last_eval`.

        The whole model is in eval mode meanwhile (the head's BatchNorm on its running
        statistics) and back in its training mode afterwards."""
        with inference_context(self.model):
            if self.cached:
                f = self.features
                acc = evaluate_features(self.net.fc, f.val, f.val_labels, self.device)
            else:
                acc = evaluate_images(
                    self.net,
                    self.val_set,
                    self.device,
                    self.test_per_rank,
                    self.cfg.DATALOADER.NUM_WORKERS,
                    self.amp_dtype,
                    self.channels_last,
                )
        self.last_eval = acc
        logger.info(
            "Val top-1 %.2f%%, top-5 %.2f%% (%d images) after %.2f epochs",
            acc["top1"],
            acc["top5"],
            len(self.val_set),
            self.loader.epochs_done(),
        )
        return {"val": acc}

    def knn_eval(self) -> float | None:
        """Weighted kNN top-1 (%) of the frozen backbone, val against train (:func:`knn_accuracy`
        with TEST.KNN_K / KNN_T), or None when TEST.KNN is False; also kept in
        :attr:`last_knn_top1` (collective).

        Cached mode reuses :attr:`features` (both splits already through the eval transform);
        the image protocol extracts both splits once with the eval transform."""
        self.last_knn_top1 = frozen_knn_top1(
            self.net,
            self.cfg,
            self.val_set,
            self.num_classes,
            self.device,
            self.test_per_rank,
            self.features,
            self.amp_dtype,
        )
        return self.last_knn_top1

    def retrieval_eval(self) -> dict[str, Any]:
        """Instance retrieval of the frozen backbone on TEST.RETRIEVAL_SIZE val images
        (:func:`frozen_retrieval`: its results.json keys, None when it is 0); also kept in
        :attr:`last_retrieval`."""
        self.last_retrieval = frozen_retrieval(self.net, self.cfg, self.device, self.test_per_rank)
        return self.last_retrieval

    def meta(self) -> dict[str, Any]:
        """The checkpoint's ``meta`` (docs/formats.md): kind ``lincls``, the last val accuracy
        and the ``meta`` of the pre-training checkpoint under ``pretrain``."""
        cfg = self.cfg
        return {
            "kind": "lincls",
            "name": self.name,
            "arch": cfg.MODEL.ARCH,
            "num_classes": self.num_classes,
            "top1": self.last_eval.get("top1"),
            "top5": self.last_eval.get("top5"),
            "knn_top1": self.last_knn_top1,
            "instance_retrieval_top1": self.last_retrieval.get("instance_retrieval_top1"),
            "seed": int(cfg.SEED),
            "epochs": float(self.loader.epochs_done()),
            "iteration": int(self.trainer.iter) + 1,
            "ims_per_batch": int(cfg.SOLVER.IMS_PER_BATCH),
            "lr": self.lr,
            "head_bn": self.head_bn,
            "head_bn_folded": self.head_bn and not isinstance(self.net.fc, BatchNormLinear),
            "cached_features": self.cached,
            "weights": os.path.abspath(self.weights.path),
            "pretrain": dict(self.weights.meta),
        }

    def _match_head(self, path: str, checkpoint: Any) -> None:
        """Before ``checkpoint`` (of ``path``) is restored: its fc must have been trained as
        MODEL.HEAD_BN says, else one sentence; a finished MODEL.HEAD_BN run's ``model_final.pth``
        holds the folded plain fc, which replaces :class:`BatchNormLinear` (nothing is trained
        any more)."""
        model = checkpoint.get("model") if isinstance(checkpoint, dict) else None
        meta = checkpoint.get("meta") if isinstance(checkpoint, dict) else None
        if not isinstance(model, dict):
            return  # fvcore's own checks report it
        meta = meta if isinstance(meta, dict) else {}
        unfolded = _HEAD_BN_KEY in model
        trained_bn = unfolded or meta.get("head_bn") is True  # before HEAD_BN: no "head_bn"
        if trained_bn != self.head_bn:
            old = "" if "head_bn" in meta else " (a run from before MODEL.HEAD_BN existed)"
            raise UserError(
                f"{path}: its fc was trained {'with' if trained_bn else 'without'} the head "
                f"BatchNorm{old}, but MODEL.HEAD_BN is {self.head_bn}; resume with "
                f"MODEL.HEAD_BN {trained_bn} or use a fresh OUTPUT_DIR."
            )
        if self.head_bn and not unfolded:
            iterations = int(checkpoint.get("iteration", -1)) + 1
            if iterations < self.max_iter:
                raise UserError(
                    f"{path}: its fc holds the head BatchNorm folded in after {iterations} "
                    f"iterations (a finished run), so it cannot train on to {self.max_iter}; "
                    "use a fresh OUTPUT_DIR to train longer."
                )
            fc = self.net.fc  # a plain fc like the file's, which is loaded into it next
            self.net.fc = torch.nn.Linear(fc.in_features, fc.out_features, device=fc.weight.device)

    def after_resume(self, path: str) -> None:
        """The restored fc must sit on the backbone of MODEL.WEIGHTS."""
        try:
            check_backbone_unchanged(self.net, self.weights.backbone, self.weights.path)
        except BackboneChangedError as e:
            raise UserError(
                f"{path}: its backbone is not the one in MODEL.WEIGHTS {self.weights.path}; "
                "resume with the same MODEL.WEIGHTS or use a fresh OUTPUT_DIR."
            ) from e

    @contextlib.contextmanager
    def _fc_threads(self) -> Iterator[None]:
        """One intra-op thread while training the fc on cached features on CPU.

        A [32, 512] x [512, C] step is far too small to split: extra threads only add
        synchronisation, which costs 10x in wall time on a busy machine (measured on 2 shared
        cores: 1200 steps 0.7 s with 1 thread, 6-9 s with 2). Restored afterwards."""
        if not (self.cached and self.device.type == "cpu"):
            yield
            return
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)

    def train(self) -> dict[str, Any]:
        """Train to ``max_iter``, evaluate, run the sanity check, save ``model_final.pth`` with
        the accuracy in its meta and write ``results.json`` (returned)."""
        if self.start_iter >= self.max_iter:
            logger.info("Already trained for %d iterations; evaluating.", self.max_iter)
            self.trainer.iter = self.max_iter - 1
            self.evaluate()
        else:
            with self._fc_threads():
                self.run_loop()
            self.trainer.iter = self.max_iter - 1  # TrainerBase leaves it at max_iter
        # before the sanity check, which then covers their forward passes too
        self.knn_eval()
        self.retrieval_eval()
        checked = check_backbone_unchanged(self.net, self.weights.backbone, self.weights.path)
        logger.info("Sanity check passed: %d backbone tensors equal MODEL.WEIGHTS.", checked)
        if isinstance(self.net.fc, BatchNormLinear):
            # the export: a plain torchvision state dict, the head's BatchNorm folded into the fc
            self.net.fc = self.net.fc.folded().eval()
            logger.info("Folded the head's BatchNorm into the fc of model_final.pth.")
        # the hook saved model_final before the final eval; save it again with top-1 in meta
        self.checkpointer.save("model_final", iteration=self.max_iter - 1)
        bad = count_bad_files(self.train_set) + count_bad_files(self.val_set)
        if bad:
            logger.warning("%d unreadable images were skipped (listed above).", bad)
        results = {
            "kind": "lincls",
            "name": self.name,
            "top1": self.last_eval["top1"],
            "top5": self.last_eval["top5"],
            **knn_results(self.cfg, self.last_knn_top1),
            **self.last_retrieval,
            "seed": int(self.cfg.SEED),
            "weights": os.path.abspath(self.weights.path),
            "pretrain": dict(self.weights.meta),
            "arch": self.cfg.MODEL.ARCH,
            "input_kind": self.weights.kind,
            "num_classes": self.num_classes,
            "val_images": len(self.val_set),
            "epochs": float(self.loader.epochs_done()),
            "iterations": int(self.max_iter),
            "ims_per_batch": int(self.cfg.SOLVER.IMS_PER_BATCH),
            "lr": float(self.lr),
            "head_bn": self.head_bn,
            "cached_features": self.cached,
            "protocol": "cached" if self.cached else "moco",
            "skipped_images": bad,
        }
        self.write_results(results)
        logger.info(
            "Linear eval of %s: top-1 %.2f%%, top-5 %.2f%%, kNN top-1 %s, instance retrieval "
            "top-1 %s (%d val images, SEED %d) -> %s",
            self.name,
            results["top1"],
            results["top5"],
            percent(results["knn_top1"]),
            percent(results["instance_retrieval_top1"]),
            results["val_images"],
            results["seed"],
            os.path.join(self.cfg.OUTPUT_DIR, "results.json"),
        )
        return results
