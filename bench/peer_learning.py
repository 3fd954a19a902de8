#!/usr/bin/env python
"""A peer implementation as the oracle (issue 12): short SimCLR and MoCo v2 runs of ours
(:class:`pretrain.pretrainer.Pretrainer`) next to the same methods built from lightly's pieces in
a plain PyTorch loop, on identical data, backbone, augmentation, seed and budget, e.g.

    OMP_NUM_THREADS=2 python bench/peer_learning.py         # 400 iterations, seeds 0 1 2
    python bench/peer_learning.py --quick                   # 20 iterations, 1 seed: smoke test

Ours is configs/pretrain/peer_simclr_shapes_cpu.yaml / peer_mocov2_shapes_cpu.yaml (the CPU
demo's recipe, simo_shapes_cpu.yaml, with the method swapped), run in this process exactly as
tools/pretrain.py builds and trains it (``seed_all_rng(SEED)``, ``Pretrainer(cfg)``, ``train()``);
the peer reads every number it needs from the same config. Per seed and method the two sides
share:

* data: the shapes ImageFolder (``--data``; drawn with the demo's arguments if absent), through
  ``RobustImageFolder`` + ``TwoCropsTransform(moco_v2_transform(size, (min_scale, 1)))`` +
  ``build_train_loader(seed=SEED)``, the builder the Pretrainer uses: the same images in the same
  order with the same two views (per-sample seeds; checked: the peer's first batch is the
  reference batch below, which comes from a 0-worker loader);
* backbone: a fresh torchvision ResNet after ``seed_all_rng(SEED)`` on both sides, so the initial
  weights (head included) are identical (checked: max abs difference of every tensor);
* heads: ours fc-BN-ReLU-fc-BN (SimCLR) / fc-ReLU-fc (MoCo v2), 512 -> 128 for R18; lightly's
  ``SimCLRProjectionHead(batch_norm=True)`` / ``MoCoProjectionHead()`` of the same widths are the
  same layers (bias-free Linear before BN), built in the same order;
* loss: InfoNCE tau 0.2; lightly's ``NTXentLoss`` (in-batch 2N layout for SimCLR; with
  ``memory_bank_size=(QUEUE_SIZE, DIM)`` for MoCo v2, whose bank starts from our initial queue:
  both are random unit vectors, sharing them makes step 1 identical); MoCo v2 with lightly's
  ``deactivate_requires_grad`` and ``update_momentum`` (m = MODEL.MOMENTUM, before the forward,
  as in lightly's example and in ours);
* optimisation: SGD (lr = BASE_LR x N / 256, momentum, weight decay on every trained parameter),
  linear warm-up from WARMUP_FACTOR then cosine, set per iteration (written out here, not
  imported; checked against the lr our run logs), the same iterations;
* measurements: the single-step loss at every LOG_PERIOD-th iteration (ours: the value the
  trainer stores, from its event storage; metrics.json's ``total_loss`` is the median of the
  values logged within the last 20 iterations, the same number at LOG_PERIOD 20), the contrastive
  top-1 averaged over each LOG_PERIOD (ours: ``[metric]health/contrastive_top1`` of metrics.json;
  lightly's: the share of rows of the logits NTXentLoss feeds its cross-entropy whose positive
  strictly outranks every other entry), and the kNN top-1 of the backbone
  (:func:`pretrain.knn.knn_top1`, TEST.KNN_K / KNN_T, val against train with the eval
  transform) every TEST.KNN_PERIOD iterations and at the end (ours: its kNN monitor), plus once
  at iteration 0 (identical backbones).

Two exactness checks come first. Per method, ``--f64-steps`` steps of both sides in float64 in
one plain loop (ours: the method module the Pretrainer trains, with the SGD it builds): losses,
contrastive top-1, weights, key encoder and queue must agree to 1e-8 (measured: ~1e-11), i.e.
the two compute the same updates (in float32 the trajectories part within a few steps by chaos
alone, as two lightly runs 1e-7 apart do, so the learning runs can only agree statistically).
Per seed and method, the step-1 loss and contrastive top-1 of both (copies of the real runs'
models) on the same reference batch must agree to float32 rounding, and the lr of our run
(metrics.json) must equal the peer's schedule.

Output (``--out``): ``peer_learning.json`` (every curve, the checks, the summary),
``peer_learning.png`` (loss, contrastive top-1, kNN top-1; ours vs lightly, SimCLR and MoCo v2 side
by side; mean over seeds with a +-1 std band and each seed thin), ``peer_learning.md`` (the
tables), ``runs/`` (our runs' OUTPUT_DIRs without checkpoints), ``log.txt``. The tables and the
verdict are printed and appended to bench/results.md (not with ``--quick``, a smoke test).

Verdict, per method and metric (final kNN top-1 is the one the issue asks for): ours and lightly
agree within seed noise when |mean(ours) - mean(lightly)| <= 2 x pooled std, pooled std =
sqrt((s_ours^2 + s_lightly^2) / 2) with s the sample std over the seeds (needs >= 2 seeds).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import pretrain  # noqa: E402, F401  (first: silences the dependencies' import-time warnings)
import torch  # noqa: E402
import torchvision  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import ROOT, append_result, markdown_table  # noqa: E402
from pretrain.config import load_pretrain_cfg  # noqa: E402
from pretrain.data import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    RobustImageFolder,
    TwoCropsTransform,
    build_image_folder,
    build_train_loader,
    eval_transform,
    moco_v2_transform,
)
from pretrain.engine import get_device  # noqa: E402
from pretrain.io import read_metrics  # noqa: E402
from pretrain.knn import knn_top1  # noqa: E402
from pretrain.methods import build_method  # noqa: E402
from pretrain.pretrainer import Pretrainer  # noqa: E402

try:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead, SimCLRProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
except ImportError:  # pragma: no cover - a test-only dependency
    sys.exit("error: lightly is not installed; pip install lightly (see setup.py's test extras).")

METHODS = ("simclr", "mocov2")
LABELS = {"simclr": "SimCLR", "mocov2": "MoCo v2"}
IMPLS = ("ours", "lightly")
CONFIGS = {
    m: os.path.join(ROOT, "configs", "pretrain", f"peer_{m}_shapes_cpu.yaml") for m in METHODS
}
DEFAULT_DATA = os.path.join("datasets", "shapes", "imagefolder")
# tools/demo.sh's dataset: 400 / 100 scenes, 2000 / 1000 single-shape images, 128 px, seed 0
MAKE_SHAPES_ARGS = [
    "--num-train", "400", "--num-val", "100", "--num-train-objects", "2000",
    "--num-val-objects", "1000", "--size", "128", "--seed", "0",
]  # fmt: skip
# Costs measured on this project's 2-core CPU machine, 2 torch threads, idle (bench/README.md,
# "peer_learning.py"): seconds per training iteration (N=32, 64 px, R18; the same on both
# sides) and seconds per image of a kNN evaluation (train + val images, eval transform).
S_PER_ITER = {"simclr": 0.40, "mocov2": 0.30}
KNN_S_PER_IMAGE = 0.0035
SETUP_S = 5.0  # per run: building the Pretrainer / the peer, the step-1 check, loader start-up
F64_S_PER_STEP = 2.0  # the float64 check, both sides together
FINAL_POINTS = 5  # "final" loss / contrastive top-1 = mean of the last 5 logged values


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------
# lightly's side: plain PyTorch, lightly's pieces (as in lightly's examples/pytorch/*.py)
# ------------------------------------------------------------------------------------------


def lightly_backbone(arch: str, zero_init_residual: bool) -> tuple[nn.Module, int]:
    """torchvision ResNet without its classifier (``fc = Identity``: pooled, flattened
    features, what lightly's examples get from ``nn.Sequential(*children()[:-1])`` + flatten;
    kept a ResNet so that :func:`pretrain.knn.knn_top1` reads its backbone features)."""
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    in_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, in_dim


class LightlySimCLR(nn.Module):
    """lightly's SimCLR: backbone + ``SimCLRProjectionHead``."""

    def __init__(self, arch, zero_init_residual, hidden, dim, batch_norm):
        super().__init__()
        self.backbone, in_dim = lightly_backbone(arch, zero_init_residual)
        self.projection_head = SimCLRProjectionHead(in_dim, hidden, dim, batch_norm=batch_norm)

    def forward(self, x):
        return self.projection_head(self.backbone(x).flatten(start_dim=1))


class LightlyMoCo(nn.Module):
    """lightly's MoCo v2: backbone + ``MoCoProjectionHead`` and their momentum copies
    (``deactivate_requires_grad``), updated with ``update_momentum``."""

    def __init__(self, arch, zero_init_residual, hidden, dim, batch_norm):
        super().__init__()
        self.backbone, in_dim = lightly_backbone(arch, zero_init_residual)
        self.projection_head = MoCoProjectionHead(in_dim, hidden, dim, batch_norm=batch_norm)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x):
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def forward_momentum(self, x):
        return self.projection_head_momentum(
            self.backbone_momentum(x).flatten(start_dim=1)
        ).detach()


class RecordingCrossEntropy(nn.CrossEntropyLoss):
    """lightly's NTXentLoss ends with ``self.cross_entropy(logits, labels)``; this one also keeps
    those logits, so lightly's contrastive top-1 comes from the numbers its loss used."""

    last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, logits, labels):
        self.last = (logits.detach(), labels.detach())
        return super().forward(logits, labels)


def top1_of_logits(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose label column is strictly above every other column (a tie fails)."""
    pos = logits.gather(1, labels[:, None])
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return (pos > others).all(dim=1).float().mean().item()


def lr_multiplier(it: int, max_iter: int, warmup: int, factor: float, end: float) -> float:
    """lr / (BASE_LR x N / 256) at iteration ``it`` (0-based): a cosine from 1 at 0 to ``end`` at
    ``max_iter``; during the first ``warmup`` iterations a line from ``factor`` up to the
    cosine's value at ``warmup`` (detectron2's WarmupParamScheduler, written out)."""

    def cosine(x):
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * x))

    x = it / max_iter
    if warmup <= 0:
        return cosine(x)
    w = min(warmup / max_iter, 1.0)
    if x >= w:
        return cosine(x)
    return factor + (cosine(w) - factor) * x / w


def to_float(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of views on ``device`` as float32: uint8 views (the fast two-crop pipeline, which
    leaves the normalisation to the model's device) get ToTensor's ``/ 255`` and Normalize's
    ImageNet mean / std, the same ops as the float pipeline; float views pass as they are."""
    x = x.to(device, non_blocking=True)
    if x.dtype != torch.uint8:
        return x
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    return x.to(torch.float32).div_(255).sub_(mean).div_(std)


class LightlyRun:
    """One method built from lightly's pieces with every number taken from our config."""

    def __init__(self, cfg, device, init_queue: torch.Tensor | None = None) -> None:
        m, loss, solver = cfg.MODEL, cfg.LOSS, cfg.SOLVER
        if loss.NAME != "infonce" or loss.MARGIN != 0 or m.HEAD_INIT_STD != 0:
            raise SystemExit("error: the peer runs plain InfoNCE with lightly's default init.")
        if m.METHOD == "mocov2" and loss.SYMMETRIC:
            raise SystemExit("error: lightly's MoCo loop is one-sided; set LOSS.SYMMETRIC false.")
        self.cfg, self.device, self.method = cfg, device, m.METHOD
        self.n = solver.IMS_PER_BATCH
        seed_all_rng(cfg.SEED)  # as tools/pretrain.py (default_setup) before the Pretrainer
        cls = LightlySimCLR if self.method == "simclr" else LightlyMoCo
        self.model = cls(m.ARCH, m.ZERO_INIT_RESIDUAL, m.MLP_HIDDEN, m.DIM, m.MLP_BN).to(device)
        if self.method == "simclr":
            self.criterion = NTXentLoss(temperature=loss.TAU)
        else:
            self.criterion = NTXentLoss(
                temperature=loss.TAU, memory_bank_size=(loss.QUEUE_SIZE, m.DIM)
            )
            if init_queue is not None:
                self.criterion.memory_bank.bank.copy_(init_queue)
        self.criterion.cross_entropy = RecordingCrossEntropy(reduction="mean")
        self.criterion.to(device)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),  # the momentum copies have no gradient: SGD skips them
            lr=solver.BASE_LR * self.n / 256,
            momentum=solver.MOMENTUM,
            weight_decay=solver.WEIGHT_DECAY,
        )
        self.dataset = build_image_folder(
            cfg.DATASETS.ROOT,
            cfg.DATASETS.TRAIN_SPLIT,
            TwoCropsTransform(
                moco_v2_transform(cfg.INPUT.SIZE, (cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE))
            ),
        )
        self.base_lr = solver.BASE_LR * self.n / 256
        per_epoch = len(self.dataset) // self.n
        self.warmup = (
            solver.WARMUP_ITERS
            if solver.WARMUP_ITERS > 0
            else round(solver.WARMUP_EPOCHS * per_epoch)
        )

    def loader(self, num_workers: int):
        c = self.cfg
        return build_train_loader(
            self.dataset,
            self.n,
            num_workers=num_workers,
            seed=max(c.SEED, 0),
            pin_memory=c.DATALOADER.PIN_MEMORY and self.device.type == "cuda",
            persistent_workers=c.DATALOADER.PERSISTENT_WORKERS,
            prefetch_factor=c.DATALOADER.PREFETCH_FACTOR,
        )

    def step_loss(self, model, criterion, x0, x1) -> torch.Tensor:
        """lightly's training step up to the loss (its examples' loop body)."""
        if self.method == "mocov2":
            m = self.cfg.MODEL.MOMENTUM
            update_momentum(model.backbone, model.backbone_momentum, m=m)
            update_momentum(model.projection_head, model.projection_head_momentum, m=m)
            return criterion(model(x0), model.forward_momentum(x1))
        return criterion(model(x0), model(x1))

    def first_step(self, batch) -> tuple[float, float]:
        """Step-1 loss and contrastive top-1 of copies of the model and the loss (the run itself
        is untouched)."""
        (x0, x1), _ = batch
        model, criterion = copy.deepcopy(self.model), copy.deepcopy(self.criterion)
        with torch.no_grad():
            x0, x1 = to_float(x0, self.device), to_float(x1, self.device)
            loss = self.step_loss(model, criterion, x0, x1).item()
        return loss, top1_of_logits(*criterion.cross_entropy.last)

    def knn(self, datasets) -> float:
        c = self.cfg
        return knn_top1(
            self.model.backbone,
            *datasets,
            self.device,
            batch_size=self.n,
            num_workers=min(c.DATALOADER.NUM_WORKERS, 4),
            k=c.TEST.KNN_K,
            t=c.TEST.KNN_T,
        )

    def train(self, datasets, reference_batch) -> dict:
        c = self.cfg
        max_iter, period, knn_period = c.SOLVER.MAX_ITER, c.LOG_PERIOD, c.TEST.KNN_PERIOD
        rec = {"iters": [], "loss": [], "top1": [], "lr": [], "knn": [], "step_s": []}
        losses, top1s = [], []
        batches = iter(self.loader(c.DATALOADER.NUM_WORKERS))
        self.model.train()
        start = time.perf_counter()
        knn_s = 0.0
        for it in range(max_iter):
            t0 = time.perf_counter()
            (x0, x1), _ = next(batches)
            if it == 0:
                (r0, r1), _ = reference_batch
                rec["first_batch_is_reference"] = bool(torch.equal(x0, r0) and torch.equal(x1, r1))
            lr = self.base_lr * lr_multiplier(
                it, max_iter, self.warmup, c.SOLVER.WARMUP_FACTOR, c.SOLVER.COSINE_END
            )
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad()
            x0, x1 = to_float(x0, self.device), to_float(x1, self.device)
            loss = self.step_loss(self.model, self.criterion, x0, x1)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
            top1s.append(top1_of_logits(*self.criterion.cross_entropy.last))
            rec["step_s"].append(time.perf_counter() - t0)
            if it == 0:
                rec["step1_loss"] = losses[0]
            done = it + 1
            if done % period == 0 or done == max_iter:
                rec["iters"].append(done)
                rec["loss"].append(losses[-1])
                rec["top1"].append(statistics.fmean(top1s))
                rec["lr"].append(lr)
                top1s = []
                log(
                    f"  lightly {self.method} seed {c.SEED}: iter {done}/{max_iter} loss "
                    f"{losses[-1]:.4f} contrastive top-1 {rec['top1'][-1]:.3f} lr {lr:.5f} "
                    f"{statistics.fmean(rec['step_s'][-period:]):.3f} s/iter"
                )
            if (knn_period > 0 and done % knn_period == 0) or done == max_iter:
                t1 = time.perf_counter()
                rec["knn"].append([done, self.knn(datasets)])
                knn_s += time.perf_counter() - t1
                top1 = rec["knn"][-1][1]
                log(f"  lightly {self.method} seed {c.SEED}: kNN top-1 at {done}: {top1:.2f}%")
        rec["wall_s"] = time.perf_counter() - start
        rec["knn_s"] = knn_s
        rec["s_per_iter"] = statistics.median(rec["step_s"][1:] or rec["step_s"])
        rec["all_losses"] = losses
        del batches
        return rec


# ------------------------------------------------------------------------------------------
# our side: the Pretrainer, as tools/pretrain.py runs it
# ------------------------------------------------------------------------------------------


def load_cfg(method: str, args, seed: int, out_dir: str):
    opts = [
        "DATASETS.ROOT", args.data, "SEED", seed, "OUTPUT_DIR", out_dir,
        "SOLVER.MAX_ITER", args.iters, "TEST.KNN_PERIOD", args.knn_period,
        "LOG_PERIOD", args.log_period,
    ]  # fmt: skip
    if args.workers is not None:
        opts += ["DATALOADER.NUM_WORKERS", args.workers]
    cfg = load_pretrain_cfg(CONFIGS[method], [str(o) for o in opts])
    cfg.freeze()
    return cfg


def build_ours(cfg) -> Pretrainer:
    if os.path.isdir(cfg.OUTPUT_DIR):
        shutil.rmtree(cfg.OUTPUT_DIR)  # a fresh run: metrics.json is appended to
    os.makedirs(cfg.OUTPUT_DIR)
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    seed_all_rng(cfg.SEED)  # what tools/pretrain.py's default_setup does (rank 0)
    return Pretrainer(cfg).resume_or_load(resume=False)


def train_ours(pt: Pretrainer, keep_checkpoints: bool) -> dict:
    cfg = pt.cfg
    max_iter = cfg.SOLVER.MAX_ITER
    start = time.perf_counter()
    results = pt.train()
    wall = time.perf_counter() - start
    storage = pt.trainer.storage
    metrics = read_metrics(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))
    raw_loss = {it + 1: v for v, it in storage.history("total_loss").values()}
    top1 = {it + 1: v for it, v in metrics.get("[metric]health/contrastive_top1", [])}
    lr = {it + 1: v for it, v in metrics.get("lr", [])}
    iters = sorted(top1)
    step_s = (
        [v for v, _ in storage.history("time").values()] if "time" in storage.histories() else []
    )
    rec = {
        "iters": iters,
        "loss": [raw_loss.get(i, float("nan")) for i in iters],
        "top1": [top1[i] for i in iters],
        "lr": [lr.get(i, float("nan")) for i in iters],
        # the periodic evaluations are stored at the 0-based iteration that ends a period, the
        # final one (EvalHook.after_train) at max_iter: both mean "after min(it + 1, max_iter)"
        "knn": [[min(it + 1, max_iter), v] for it, v in metrics.get("knn_top1", [])],
        "metrics_json_total_loss": [[it + 1, v] for it, v in metrics.get("total_loss", [])],
        "results_json_final_loss": results.get("final_loss"),
        "wall_s": wall,
        "s_per_iter": statistics.median(step_s) if step_s else wall / max(cfg.SOLVER.MAX_ITER, 1),
    }
    if not keep_checkpoints:
        for name in os.listdir(cfg.OUTPUT_DIR):
            if name.endswith(".pth") or name == "last_checkpoint":
                os.remove(os.path.join(cfg.OUTPUT_DIR, name))
    return rec


def max_abs_diff_init(ours_encoder: dict, lightly_model: nn.Module, suffix: str = "") -> float:
    """Max |difference| over every tensor of our encoder_q (backbone + fc head) and lightly's
    backbone + projection head (names mapped: fc.i <-> projection_head.layers.i); with
    ``suffix="_momentum"`` our encoder_k against lightly's momentum copies."""
    theirs = {}
    backbone, head = f"backbone{suffix}.", f"projection_head{suffix}.layers."
    for k, v in lightly_model.state_dict().items():
        if k.startswith(backbone):
            theirs[k[len(backbone) :]] = v
        elif k.startswith(head):
            theirs["fc." + k[len(head) :]] = v
    if set(theirs) != set(ours_encoder):
        return float("inf")
    worst = 0.0
    for k, v in ours_encoder.items():
        if v.shape != theirs[k].shape:
            return float("inf")
        if v.numel():
            worst = max(worst, (v.double() - theirs[k].double().to(v.device)).abs().max().item())
    return worst


def float64_check(method: str, args, seed: int, device: torch.device) -> dict:
    """``args.f64_steps`` training steps of both sides in float64, in one plain loop, from the
    same weights (and MoCo queue), on the same batches with the same lr: ours is the method
    module the Pretrainer trains (``build_method``, its ``losses``) with the SGD the Pretrainer
    builds, lightly's is :class:`LightlyRun`'s model, loss and momentum update.

    In float32 the two trajectories part within a few steps by chaos alone (two lightly runs
    whose weights differ by 1e-7 relative do the same), so the learning runs can only agree
    statistically; in float64 rounding stays far below what these steps can amplify, so any
    difference in what the two compute (loss, gradient, momentum update, queue, weight decay,
    SGD momentum, schedule) shows as a loss or weight difference here."""
    cfg = load_cfg(method, args, seed, os.path.join(args.out, "f64_check"))
    seed_all_rng(seed)
    ours = build_method(cfg, device)
    queue = ours.queue.detach().clone() if method == "mocov2" else None
    peer = LightlyRun(cfg, device, init_queue=queue)
    ours.double()
    peer.model.double()
    peer.criterion.double()
    solver = cfg.SOLVER
    opt = torch.optim.SGD(
        [p for p in ours.parameters() if p.requires_grad],
        lr=peer.base_lr,
        momentum=solver.MOMENTUM,
        weight_decay=solver.WEIGHT_DECAY,
    )
    batches = iter(peer.loader(0))
    loss_ours, loss_lightly, top1_ours, top1_lightly = [], [], [], []
    for it in range(args.f64_steps):
        (x0, x1), _ = next(batches)
        x0, x1 = to_float(x0, device).double(), to_float(x1, device).double()
        lr = peer.base_lr * lr_multiplier(
            it, solver.MAX_ITER, peer.warmup, solver.WARMUP_FACTOR, solver.COSINE_END
        )
        for group in opt.param_groups + peer.optimizer.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss = ours.losses(x0, x1)["loss"]
        loss.backward()
        opt.step()
        loss_ours.append(loss.item())
        top1_ours.append(float(ours.stats.get("health/contrastive_top1", float("nan"))))
        peer.optimizer.zero_grad()
        loss = peer.step_loss(peer.model, peer.criterion, x0, x1)
        loss.backward()
        peer.optimizer.step()
        loss_lightly.append(loss.item())
        top1_lightly.append(top1_of_logits(*peer.criterion.cross_entropy.last))
    out = {
        "method": method,
        "seed": seed,
        "steps": args.f64_steps,
        "loss_ours": loss_ours,
        "loss_lightly": loss_lightly,
        "loss_max_abs_diff": max(
            (abs(a - b) for a, b in zip(loss_ours, loss_lightly, strict=True)), default=0.0
        ),
        "weights_max_abs_diff": max_abs_diff_init(ours.encoder_q.state_dict(), peer.model),
        "top1_ours": top1_ours,
        "top1_lightly": top1_lightly,
        "top1_max_abs_diff": max(
            (abs(a - b) for a, b in zip(top1_ours, top1_lightly, strict=True)), default=0.0
        ),
    }
    if method == "mocov2":
        out["key_weights_max_abs_diff"] = max_abs_diff_init(
            ours.encoder_k.state_dict(), peer.model, suffix="_momentum"
        )
        bank = peer.criterion.memory_bank.bank
        out["queue_max_abs_diff"] = (ours.queue - bank.to(ours.queue)).abs().max().item()
    out["exact"] = out["loss_max_abs_diff"] < 1e-8 and all(
        out.get(k, 0.0) < 1e-8
        for k in (
            "weights_max_abs_diff",
            "key_weights_max_abs_diff",
            "queue_max_abs_diff",
            "top1_max_abs_diff",
        )
    )
    return out


# ------------------------------------------------------------------------------------------
# data, orchestration
# ------------------------------------------------------------------------------------------


def ensure_data(data: str) -> None:
    """``data`` must hold train/ and val/; if it does not exist at all, draw the demo's dataset
    (tools/make_shapes.py into its parent folder, as tools/demo.sh does)."""
    if os.path.isdir(os.path.join(data, "train")) and os.path.isdir(os.path.join(data, "val")):
        return
    if os.path.exists(data) or os.path.basename(os.path.normpath(data)) != "imagefolder":
        raise SystemExit(f"error: {data} has no train/ and val/ folders; pass an ImageFolder root.")
    parent = os.path.dirname(os.path.normpath(data))
    log(f"{data} is absent: drawing the demo's shapes dataset into {parent} (~5 s)")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "make_shapes.py"), "--out", parent]
    subprocess.run(cmd + MAKE_SHAPES_ARGS, check=True, stdout=subprocess.DEVNULL)


def make_subset(data: str, out: str, per_class: tuple[int, int]) -> str:
    """An ImageFolder of symlinks to the first ``per_class`` (train, val) images of every class."""
    root = os.path.join(out, "data_subset")
    if os.path.isdir(root):
        shutil.rmtree(root)
    for split, n in zip(("train", "val"), per_class, strict=True):
        for cls in sorted(os.listdir(os.path.join(data, split))):
            src = os.path.join(data, split, cls)
            if not os.path.isdir(src):
                continue
            os.makedirs(os.path.join(root, split, cls))
            for name in sorted(os.listdir(src))[:n]:
                os.symlink(
                    os.path.abspath(os.path.join(src, name)), os.path.join(root, split, cls, name)
                )
    return root


def knn_points(iters: int, knn_period: int) -> list[int]:
    pts = [0] + [i for i in range(knn_period, iters + 1, knn_period)] if knn_period > 0 else [0]
    return pts if pts[-1] == iters else pts + [iters]


def estimate_s(args, n_images: int) -> float:
    """Seconds for the whole run from the measured costs (S_PER_ITER, KNN_S_PER_IMAGE, ...)."""
    knn = KNN_S_PER_IMAGE * n_images
    per_seed = knn  # kNN at iteration 0
    for m in args.methods:
        per_seed += 2 * SETUP_S
        per_seed += 2 * (
            args.iters * S_PER_ITER[m] + (len(knn_points(args.iters, args.knn_period)) - 1) * knn
        )
    return len(args.seeds) * per_seed + len(args.methods) * args.f64_steps * F64_S_PER_STEP


def run_all(args) -> dict:
    device = get_device()
    # the kNN sets, as our monitor builds them (Pretrainer.knn_eval): train and val split, eval
    # transform; the configs of both methods share INPUT.SIZE and the splits
    cfg = load_cfg(args.methods[0], args, args.seeds[0], args.out)
    datasets = tuple(
        RobustImageFolder(os.path.join(cfg.DATASETS.ROOT, split), eval_transform(cfg.INPUT.SIZE))
        for split in (cfg.DATASETS.TRAIN_SPLIT, cfg.DATASETS.VAL_SPLIT)
    )
    f64 = []
    if args.f64_steps > 0:
        log(f"\n=== float64 check: {args.f64_steps} steps of both sides, seed {args.seeds[0]}")
        for method in args.methods:
            t0 = time.perf_counter()
            c = float64_check(method, args, args.seeds[0], device)
            extra = "".join(
                f", {k.removesuffix('_max_abs_diff').replace('_', ' ')} {c[k]:.2g}"
                for k in ("key_weights_max_abs_diff", "queue_max_abs_diff")
                if k in c
            )
            log(
                f"  {LABELS[method]}: losses {c['loss_ours'][0]:.6f} ... {c['loss_ours'][-1]:.6f}; "
                f"max |diff| loss {c['loss_max_abs_diff']:.2g}, weights "
                f"{c['weights_max_abs_diff']:.2g}{extra}: "
                f"{'the same updates' if c['exact'] else 'DIFFERENT updates'} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
            f64.append(c)
    runs: list[dict] = []
    checks: list[dict] = []
    knn0: dict[int, float] = {}
    init_backbone: dict[int, dict] = {}
    for seed in args.seeds:
        for method in args.methods:
            run_dir = os.path.join(args.out, "runs", f"seed{seed}", f"ours_{method}")
            cfg = load_cfg(method, args, seed, run_dir)
            log(f"\n=== seed {seed}, {LABELS[method]}: building both sides")
            pt = build_ours(cfg)
            ours_init = {k: v.detach().clone() for k, v in pt.model.encoder_q.state_dict().items()}
            queue = pt.model.queue.detach().clone() if method == "mocov2" else None
            peer = LightlyRun(cfg, device, init_queue=queue)
            init_diff = max_abs_diff_init(ours_init, peer.model)
            if init_diff != 0:
                log(
                    f"  WARNING: the initial weights differ (max |diff| {init_diff:.3g}); the kNN "
                    "top-1 at iteration 0 is measured on lightly's backbone"
                )
            # the reference batch: the first one of the train loader, from a 0-worker copy
            reference = next(iter(peer.loader(0)))
            (q, k), labels = reference
            ours_copy = copy.deepcopy(pt.model)  # train mode, as in the run: batch statistics
            with torch.no_grad():
                ours_first = ours_copy(((q.to(device), k.to(device)), labels))["loss"].item()
            ours_top1 = float(ours_copy.stats.get("health/contrastive_top1", float("nan")))
            del ours_copy
            peer_first, peer_top1 = peer.first_step(reference)
            # kNN at iteration 0: the backbones are identical, and with one seed so is every
            # method's (checked), so it is measured once per seed
            backbone = {k: v for k, v in ours_init.items() if not k.startswith("fc.")}
            same_as_before = seed in init_backbone and all(
                torch.equal(v, init_backbone[seed][k]) for k, v in backbone.items()
            )
            if not same_as_before:
                t0 = time.perf_counter()
                knn0[seed] = peer.knn(datasets)
                init_backbone[seed] = backbone
                took = time.perf_counter() - t0
                log(f"  kNN top-1 at iteration 0 (both sides): {knn0[seed]:.2f}% ({took:.1f} s)")
            check = {
                "method": method,
                "seed": seed,
                "init_max_abs_diff": init_diff,
                "step1_loss_ours": ours_first,
                "step1_loss_lightly": peer_first,
                "step1_abs_diff": abs(ours_first - peer_first),
                "step1_top1_ours": ours_top1,
                "step1_top1_lightly": peer_top1,
            }
            log(
                f"  checks: initial weights max |diff| {init_diff:.3g}; step-1 loss on the same "
                f"batch: ours {ours_first:.6f}, lightly {peer_first:.6f} "
                f"(|diff| {check['step1_abs_diff']:.2g}); contrastive top-1 ours {ours_top1:.4f}, "
                f"lightly {peer_top1:.4f}"
            )
            log(f"=== seed {seed}, {LABELS[method]}: ours (Pretrainer, {cfg.OUTPUT_DIR})")
            ours = train_ours(pt, args.keep_checkpoints)
            del pt
            gc.collect()
            log(f"=== seed {seed}, {LABELS[method]}: lightly")
            theirs = peer.train(datasets, reference)
            del peer
            gc.collect()
            for impl, rec in (("ours", ours), ("lightly", theirs)):
                rec["knn"] = [[0, knn0[seed]]] + rec["knn"]
                runs.append({"impl": impl, "method": method, "seed": seed, **rec})
            common = sorted(set(ours["iters"]) & set(theirs["iters"]))
            lr_diff = max(
                (
                    abs(ours["lr"][ours["iters"].index(i)] - theirs["lr"][theirs["iters"].index(i)])
                    for i in common
                ),
                default=float("nan"),
            )
            check.update(
                lr_max_abs_diff=lr_diff,
                first_batch_is_reference=theirs.get("first_batch_is_reference"),
                first_logged_iter=common[0] if common else None,
                first_logged_loss_ours=ours["loss"][0] if common else None,
                first_logged_loss_lightly=theirs["loss"][0] if common else None,
            )
            checks.append(check)
            log(
                f"  lr max |diff| over the logged iterations {lr_diff:.3g}; lightly's first batch "
                f"is the reference batch: {check['first_batch_is_reference']}; loss at iteration "
                f"{check['first_logged_iter']}: ours {check['first_logged_loss_ours']:.4f}, "
                f"lightly {check['first_logged_loss_lightly']:.4f}"
            )
    return {"runs": runs, "checks": checks, "f64": f64}


# ------------------------------------------------------------------------------------------
# summary, tables, plot
# ------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(values: list[float], digits: int = 1) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f} +- {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def summarize(runs: list[dict], methods, seeds) -> dict:
    """Per (method, impl): final loss, final contrastive top-1 (%), kNN at each point; and the
    verdicts per method and metric."""
    per = {}
    for m in methods:
        for impl in IMPLS:
            rs = sorted(
                (r for r in runs if r["method"] == m and r["impl"] == impl), key=lambda r: r["seed"]
            )
            if not rs:
                continue
            per[(m, impl)] = {
                "seeds": [r["seed"] for r in rs],
                "final_loss": [statistics.fmean(r["loss"][-FINAL_POINTS:]) for r in rs],
                "final_top1": [100 * statistics.fmean(r["top1"][-FINAL_POINTS:]) for r in rs],
                "final_knn": [r["knn"][-1][1] for r in rs],
                "knn": {
                    it: [dict(map(tuple, r["knn"])).get(it) for r in rs] for it, _ in rs[0]["knn"]
                },
                "s_per_iter": [r["s_per_iter"] for r in rs],
                "wall_s": [r["wall_s"] for r in rs],
            }
    verdicts = []
    for m in methods:
        if (m, "ours") not in per or (m, "lightly") not in per:
            continue
        o, t = per[(m, "ours")], per[(m, "lightly")]
        for key, name, digits in (
            ("final_knn", "final kNN top-1 (%)", 1),
            ("final_loss", "final loss", 3),
            ("final_top1", "final contrastive top-1 (%)", 1),
        ):
            (mo, so), (mt, st) = mean_std(o[key]), mean_std(t[key])
            diff = mo - mt
            paired = [a - b for a, b in zip(o[key], t[key], strict=True)]
            if len(o[key]) < 2:
                pooled, agree = float("nan"), None
            else:
                pooled = math.sqrt((so**2 + st**2) / 2)
                agree = abs(diff) <= 2 * pooled
            verdicts.append(
                {
                    "method": m,
                    "metric": name,
                    "key": key,
                    "ours": o[key],
                    "lightly": t[key],
                    "mean_diff": diff,
                    "paired_diffs": paired,
                    "pooled_std": pooled,
                    "agree": agree,
                    "digits": digits,
                }
            )
    return {"per": per, "verdicts": verdicts}


def verdict_word(v: dict) -> str:
    if v["agree"] is None:
        return "no verdict (needs >= 2 seeds)"
    return "agree" if v["agree"] else "DIFFER"


def verdict_lines(summary: dict) -> list[str]:
    lines = []
    for v in summary["verdicts"]:
        if v["key"] != "final_knn":
            continue
        d = v["digits"]
        n = len(v["ours"])
        rule = (
            f"|diff| {abs(v['mean_diff']):.{d}f} {'<=' if v['agree'] else '>'} 2 x pooled std "
            f"{2 * v['pooled_std']:.{d}f}"
            if v["agree"] is not None
            else f"diff {v['mean_diff']:+.{d}f}"
        )
        lines.append(
            f"VERDICT {LABELS[v['method']]}: final kNN top-1 ours {fmt(v['ours'], d)} vs lightly "
            f"{fmt(v['lightly'], d)} ({n} seed{'s' if n > 1 else ''}): {rule}: {verdict_word(v)}"
        )
    return lines


def tables(summary: dict, checks: list[dict], f64: list[dict]) -> list[tuple[list[str], list[str]]]:
    per = summary["per"]
    points = sorted({it for s in per.values() for it in s["knn"]})
    head = ["method", "implementation", "seeds", "final loss", "final contrastive top-1 (%)"]
    head += [f"kNN top-1 @{it}" for it in points] + ["s/iter", "wall per run (s)"]
    rows = []
    for (m, impl), s in per.items():
        cells = [
            LABELS[m],
            impl,
            " ".join(map(str, s["seeds"])),
            fmt(s["final_loss"], 3),
            fmt(s["final_top1"]),
        ]
        cells += [fmt(s["knn"].get(it, [])) for it in points]
        cells += [fmt(s["s_per_iter"], 3), fmt(s["wall_s"], 0)]
        rows.append("| " + " | ".join(cells) + " |")
    vhead = [
        "method",
        "metric",
        "ours",
        "lightly",
        "ours - lightly per seed",
        "mean diff",
        "2 x pooled std",
        "verdict",
    ]
    vrows = []
    for v in summary["verdicts"]:
        d = v["digits"]
        cells = [
            LABELS[v["method"]],
            v["metric"],
            fmt(v["ours"], d),
            fmt(v["lightly"], d),
            " ".join(f"{x:+.{d}f}" for x in v["paired_diffs"]),
            f"{v['mean_diff']:+.{d}f}",
            "-" if v["agree"] is None else f"{2 * v['pooled_std']:.{d}f}",
            verdict_word(v),
        ]
        vrows.append("| " + " | ".join(cells) + " |")
    chead = [
        "method", "seed", "initial weights max abs diff", "step-1 loss ours / lightly (abs diff)",
        "step-1 contrastive top-1 ours / lightly", "first logged loss ours / lightly",
        "lr max abs diff", "same first batch",
    ]  # fmt: skip
    crows = []
    for c in checks:
        cells = [
            LABELS[c["method"]],
            str(c["seed"]),
            f"{c['init_max_abs_diff']:.3g}",
            f"{c['step1_loss_ours']:.6f} / {c['step1_loss_lightly']:.6f} "
            f"({c['step1_abs_diff']:.2g})",
            f"{c['step1_top1_ours']:.4f} / {c['step1_top1_lightly']:.4f}",
            f"@{c['first_logged_iter']}: {c['first_logged_loss_ours']:.4f} / "
            f"{c['first_logged_loss_lightly']:.4f}",
            f"{c['lr_max_abs_diff']:.3g}",
            str(c["first_batch_is_reference"]).lower(),
        ]
        crows.append("| " + " | ".join(cells) + " |")
    out = [(head, rows), (vhead, vrows), (chead, crows)]
    if f64:
        fhead = [
            "method", "float64 steps", "loss per step (ours)", "max abs diff: loss",
            "contrastive top-1", "weights", "key encoder", "queue", "same updates",
        ]  # fmt: skip
        frows = []
        for c in f64:
            cells = [
                LABELS[c["method"]],
                str(c["steps"]),
                " ".join(f"{x:.4f}" for x in c["loss_ours"]),
                f"{c['loss_max_abs_diff']:.2g}",
                f"{c['top1_max_abs_diff']:.2g}",
                f"{c['weights_max_abs_diff']:.2g}",
                f"{c['key_weights_max_abs_diff']:.2g}" if "key_weights_max_abs_diff" in c else "-",
                f"{c['queue_max_abs_diff']:.2g}" if "queue_max_abs_diff" in c else "-",
                "yes" if c["exact"] else "NO",
            ]
            frows.append("| " + " | ".join(cells) + " |")
        out.append((fhead, frows))
    return out


def plot(runs: list[dict], methods, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"ours": "tab:blue", "lightly": "tab:orange"}
    rows = (
        ("loss", "loss (single step)"),
        ("top1", "contrastive top-1 (%)"),
        ("knn", "kNN top-1 (%)"),
    )
    fig, axes = plt.subplots(len(rows), len(methods), figsize=(6 * len(methods), 10), squeeze=False)
    for col, m in enumerate(methods):
        for row, (key, ylabel) in enumerate(rows):
            ax = axes[row][col]
            for impl in IMPLS:
                rs = [r for r in runs if r["method"] == m and r["impl"] == impl]
                if not rs:
                    continue
                if key == "knn":
                    xs = [it for it, _ in rs[0]["knn"]]
                    ys = [[v for _, v in r["knn"]] for r in rs]
                else:
                    xs = rs[0]["iters"]
                    scale = 100.0 if key == "top1" else 1.0
                    ys = [[scale * v for v in r[key]] for r in rs]
                n = min(len(y) for y in ys)
                xs, ys = xs[:n], [y[:n] for y in ys]
                for y in ys:
                    ax.plot(xs, y, color=colours[impl], alpha=0.25, linewidth=0.8)
                mean = [statistics.fmean(col_) for col_ in zip(*ys, strict=True)]
                std = [
                    statistics.stdev(col_) if len(col_) > 1 else 0.0
                    for col_ in zip(*ys, strict=True)
                ]
                marker = "o" if key == "knn" else None
                ax.plot(
                    xs,
                    mean,
                    color=colours[impl],
                    linewidth=2,
                    marker=marker,
                    label=f"{impl} (n={len(ys)})",
                )
                ax.fill_between(
                    xs, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                    color=colours[impl], alpha=0.15,
                )  # fmt: skip
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(LABELS[m])
            if row == len(rows) - 1:
                ax.set_xlabel("iteration")
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="ImageFolder root (default: %(default)s; drawn if absent)",
    )
    p.add_argument(
        "--out", default=None, help="output folder (default: output/peer_learning[_quick])"
    )
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (--quick: 0)")
    p.add_argument(
        "--iters", type=int, default=None, help="iterations per run (default 400; --quick 20)"
    )
    p.add_argument("--knn-period", type=int, default=None, help="default 100 (--quick: 10)")
    p.add_argument("--log-period", type=int, default=None, help="default 20 (--quick: 5)")
    p.add_argument(
        "--workers", type=int, default=None, help="loader workers (default: the config's 1)"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    p.add_argument(
        "--subset", nargs=2, type=int, metavar=("TRAIN", "VAL"), default=None,
        help="use only the first TRAIN / VAL images of every class (symlinks under --out)",
    )  # fmt: skip
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 20 iterations, seed 0, 64 / 20 images per class",
    )
    p.add_argument(
        "--f64-steps",
        type=int,
        default=None,
        help="steps of the float64 check per method (default 10, --quick 4; 0: skip)",
    )
    p.add_argument("--keep-checkpoints", action="store_true", help="keep our runs' model_final.pth")
    p.add_argument("--no-results-md", action="store_true", help="do not append to bench/results.md")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "seeds": [0] if quick else [0, 1, 2],
        "iters": 20 if quick else 400,
        "knn_period": 10 if quick else 100,
        "log_period": 5 if quick else 20,
        "subset": [64, 20] if quick else None,
        "f64_steps": 4 if quick else 10,
        "out": os.path.join("output", "peer_learning_quick" if quick else "peer_learning"),
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if quick:
        args.no_results_md = True
    return args


def count_images(root: str) -> int:
    return sum(len(files) for _, _, files in os.walk(root, followlinks=True))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ensure_data(args.data)
    os.makedirs(args.out, exist_ok=True)
    if args.subset:
        args.data = make_subset(args.data, args.out, tuple(args.subset))
    setup_logger(os.path.join(args.out, "log.txt"), name="detectron2", abbrev_name="d2")
    setup_logger(os.path.join(args.out, "log.txt"), name="pretrain", abbrev_name="pt")
    n_train = count_images(os.path.join(args.data, "train"))
    n_val = count_images(os.path.join(args.data, "val"))
    est = estimate_s(args, n_train + n_val)
    log(
        f"peer_learning: {', '.join(LABELS[m] for m in args.methods)} x (ours, lightly) x seeds "
        f"{args.seeds}, {args.iters} iterations each, kNN at "
        f"{knn_points(args.iters, args.knn_period)} on {n_val} val / {n_train} train images "
        f"({args.data}), torch threads {torch.get_num_threads()}"
    )
    log(
        f"estimated runtime: {est / 60:.1f} min (from the 2-core machine's costs with 2 threads, "
        f"idle: {S_PER_ITER} s/iter, {KNN_S_PER_IMAGE * 1000:.1f} ms per kNN image)"
    )
    start = time.perf_counter()
    result = run_all(args)
    total = time.perf_counter() - start
    summary = summarize(result["runs"], args.methods, args.seeds)
    tabs = tables(summary, result["checks"], result["f64"])
    verdicts = verdict_lines(summary)
    text = "\n\n".join(markdown_table(h, r) for h, r in tabs)
    log("\n" + text + "\n")
    for line in verdicts:
        log(line)
    log(f"total runtime: {total / 60:.1f} min (estimated {est / 60:.1f} min)")

    title = (
        f"ours (Pretrainer) vs lightly, R18 64 px N=32, {args.iters} iterations, "
        f"seeds {args.seeds}, {n_train} train / {n_val} val images"
    )
    png = os.path.join(args.out, "peer_learning.png")
    plot(result["runs"], args.methods, png, title)
    serial = {
        "args": {k: v for k, v in vars(args).items()},
        "configs": {m: os.path.relpath(CONFIGS[m], ROOT) for m in args.methods},
        "total_s": total,
        "estimated_s": est,
        "verdicts": verdicts,
        "summary": {
            "per": {f"{m}/{impl}": s for (m, impl), s in summary["per"].items()},
            "verdicts": summary["verdicts"],
        },
        "checks": result["checks"],
        "float64_check": result["f64"],
        "runs": result["runs"],
    }
    with open(os.path.join(args.out, "peer_learning.json"), "w") as f:
        json.dump(serial, f, indent=1)
    with open(os.path.join(args.out, "peer_learning.md"), "w") as f:
        f.write(text + "\n\n" + "\n".join(f"- {v}" for v in verdicts) + "\n")
    log(f"wrote {png}, peer_learning.json and peer_learning.md in {args.out}")
    if not args.no_results_md:
        notes = [
            f"data: {args.data} ({n_train} train / {n_val} val images); configs: "
            + ", ".join(f"`{os.path.relpath(CONFIGS[m], ROOT)}`" for m in args.methods)
            + f"; {args.iters} iterations, kNN every {args.knn_period} (k, t of the config)",
            "ours = Pretrainer (metrics.json); lightly = NTXentLoss, SimCLRProjectionHead / "
            "MoCoProjectionHead, update_momentum in a plain loop; same data order and views, "
            "initial weights, schedule",
            f"final loss / contrastive top-1 = mean of the last {FINAL_POINTS} logged values "
            "(single-step loss; top-1 averaged over each log period); mean +- sample std over "
            "seeds",
            "verdict rule: agree if |mean(ours) - mean(lightly)| <= 2 x pooled std, pooled std = "
            "sqrt((s_ours^2 + s_lightly^2) / 2)",
            *(
                f"float64 check, {LABELS[c['method']]}: {c['steps']} steps, max abs diff of the "
                f"losses {c['loss_max_abs_diff']:.2g}, of the weights "
                f"{c['weights_max_abs_diff']:.2g}: "
                f"{'the same updates' if c['exact'] else 'DIFFERENT updates'}"
                for c in result["f64"]
            ),
            *verdicts,
            f"plot: {os.path.relpath(os.path.abspath(png), ROOT)}; total {total / 60:.1f} min",
        ]
        append_result("peer_learning.py: ours vs lightly (SimCLR, MoCo v2)", tabs, notes)
        log("appended to bench/results.md")


if __name__ == "__main__":
    main()
