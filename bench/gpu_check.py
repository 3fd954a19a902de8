#!/usr/bin/env python
"""First run on a GPU: does every stage work on CUDA, and as fast as planned? (issue 25)

    python bench/gpu_check.py                  # on the GPU machine (one H100: a few min, <= 8)
    python bench/gpu_check.py --cpu            # dry run of every stage on the CPU (1-2 min)
    python bench/gpu_check.py --only simo_r50_throughput --batch 64 --data /data/imagenet

Prints one JSON line per check on stdout (``name``, ``ok`` true / false / null = no verdict, the
measured figures, ``target`` where there is one, ``seconds``; a failing check has ``error``, its
one-line exception, and its traceback goes to stderr), then a ``summary`` line. Exit status 0 when
every check with a verdict passed, 1 otherwise, 2 without a usable CUDA GPU (one sentence on
stderr; ``--cpu`` runs anyway). Every config sets MODEL.DEVICE cuda (cpu with ``--cpu``).

1. ``losses_cuda_vs_cpu``: SiMo/EqCo, MoCo v2/InfoNCE and SimCLR/DCL, each 4 steps of the real
   ``Pretrainer`` (ResNet-18, 64 px, N=32, float32, the same shapes images and seed) on CUDA and on
   the CPU, TF32 off and cuDNN deterministic: every step's loss equal within rel 1e-3. The CUDA
   run starts from the CPU run's initial weights (``init_identical`` says whether it had them
   anyway) and its lr is small (1e-4 effective, no warm-up): measured on CPU at random init, a
   1e-6 relative perturbation of the weights moves the 4th loss by <= 4e-5 at that lr, but by
   1e-2 at lr 0.004 (chaos no tolerance could tell from a bug). Reports the trainer class.
2. ``bf16_channels_last_vs_fp32``: one SiMo step with bf16 autocast + channels_last vs float32
   (TF32 off) from the same init: tests/pretrain/test_amp.py's setting (ResNet-18, 32 px, N=8;
   loss within 5 %, gradient cosine > 0.8, as measured there on CPU) and the R50 recipe at 224 px
   (N=32; loss within 5 % only: at random init the R50 gradient is chaotic, rounding only the
   *input images* to bf16 already gives a float32 gradient cosine of 0.45 on CPU).
3. ``simo_r50_throughput``: ``Pretrainer`` on simo_r50_200ep.yaml (ResNet-50, 224 px, bf16 +
   channels_last, SyncBN = BN on one GPU), ``--batch`` (128) images per step, ``--workers``
   loader workers (min(8, CPU cores)) over a generated ImageFolder (256 shapes JPEGs of 256 px,
   hard-linked to enough files that no epoch ends inside the timed steps; or ``--data``). images/s
   (queries, two crops each) over 40 steps after 10, with data loading (**target >= 2500 images/s
   on one H100**), then over 20 steps fed one fixed pinned uint8 batch (the GPU's own speed), and
   ``torch.cuda.max_memory_allocated``. A 256 px synthetic JPEG decodes faster than an ImageNet
   photo: for the loader's real speed pass ``--data`` an ImageNet root. The first of the two
   figures below the target with the second above it means the loader, not the GPU, is short.
4. ``det_r50_fpn_step``: configs/fpn_simo_1x.yaml (Faster R-CNN R50-FPN 4conv1fc, SyncBN = BN on
   one GPU) from random init (MODEL.WEIGHTS ""), the config's bf16 autocast (SOLVER.AMP.*:
   ``DeviceAMPTrainer``), 2 images per GPU of shapes scenes (640 px, square) trained at the
   config's multi-scale sizes scaled so each image has the pixels of a 4:3 COCO image at that
   shorter side (640..800 -> 739..924 square); s/iteration over 15 iterations after 5
   (**target <= 0.2 s**).
5. ``lincls``: ``pretrain.lincls.run_linear_eval`` (augmented, not cached) for 20 iterations on
   CUDA from check 1's CUDA SiMo checkpoint (else a random torchvision ResNet-18): ok when
   results.json holds a finite top-1.
6. ``convert_verify_cuda``: ``tools/convert.py CKPT OUT.pkl --verify`` on check 3's CUDA checkpoint
   (else check 1's): ok when the verification passes (max abs diff <= 1e-4; transfer/verify.py
   compares on the CPU, the GPU's part is the checkpoint a CUDA run wrote).
7. ``ddp_nccl``: with >= 2 GPUs, 2 NCCL processes (``pretrain.engine.launch_from_args``) vs one
   process holding the same global batch, float64 (tests/pretrain/test_distributed.py with
   NCCL): SiMo/EqCo and SimCLR/DCL loss, gradients and SyncBN running means within rel 1e-8, and
   MoCo's shuffling BN un-shuffling each process's keys exactly; else ok null ("skipped: 1 GPU").
   ``--cpu --cpu-ddp`` runs it with 2 gloo processes on the CPU.

``--cpu``: the same stages on the CPU with tiny sizes (ResNet-18, 32 px, N=8, 2-4 steps; the
detector as R18-FPN at 64 px in float32: bf16 convolutions are slow on CPUs without AVX512-BF16);
check 1 compares two CPU runs, the speed targets get no verdict (ok null). ``--out FILE`` also
appends the JSON lines to FILE; ``--results`` appends a table to bench/results.md
(bench/common.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# detectron2's import-time torch.jit.script calls (pytest.ini ignores the same warning)
warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from detectron2.engine import HookBase  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402

from bench.common import ROOT, append_result, versions  # noqa: E402
from pretrain.config import get_pretrain_cfg, load_pretrain_cfg, validate_pretrain_cfg  # noqa: E402
from pretrain.engine import create_ddp_model, launch_from_args, no_cuda_reason  # noqa: E402
from pretrain.engine.launch import environment  # noqa: E402
from pretrain.lincls import get_lincls_cfg, run_linear_eval  # noqa: E402
from pretrain.methods import ContrastiveMethod, build_method  # noqa: E402
from pretrain.pretrainer import Pretrainer  # noqa: E402
from transfer.shapes import make_shapes  # noqa: E402

CHECKS = (
    "losses_cuda_vs_cpu",
    "bf16_channels_last_vs_fp32",
    "simo_r50_throughput",
    "det_r50_fpn_step",
    "lincls",
    "convert_verify_cuda",
    "ddp_nccl",
)
LOSS_METHODS = (("simo", "eqco"), ("mocov2", "infonce"), ("simclr", "dcl"))
LOSS_RTOL = 1e-3  # check 1, per step
LOSS_LR = 1e-4  # check 1's effective lr (BASE_LR * N / 256)
AMP_LOSS_RTOL, AMP_GRAD_COSINE = 0.05, 0.8  # check 2, tests/pretrain/test_amp.py's bounds
TARGET_IMAGES_PER_S = 2500.0  # check 3, one H100
TARGET_DET_S_PER_ITER = 0.2  # check 4, one H100
DDP_RTOL = 1e-8  # check 7, float64
DDP_METHODS = (("simo", "eqco"), ("simclr", "dcl"))

# sizes of the GPU run and of the --cpu dry run
GPU_SIZES = dict(
    loss_size=64, loss_batch=32, loss_steps=4, loss_dim=128, loss_hidden=512, loss_queue=4096,
    loss_workers=2, shapes_px=96, shapes_train=160, shapes_val=50,
    amp_recipe=("resnet50", 224, 32),
    tp_arch="resnet50", tp_size=224, tp_batch=128, tp_image_px=256, tp_distinct=256,
    tp_warmup=10, tp_iters=40, tp_fixed_warmup=3, tp_fixed_iters=20,
    det_depth=50, det_image_px=640, det_scenes=16, det_warmup=5, det_iters=15,
    lincls_size=64, lincls_batch=32, lincls_iters=20,
)  # fmt: skip
CPU_SIZES = dict(
    loss_size=32, loss_batch=8, loss_steps=3, loss_dim=16, loss_hidden=32, loss_queue=64,
    loss_workers=0, shapes_px=48, shapes_train=40, shapes_val=20,
    amp_recipe=("resnet18", 32, 8),
    tp_arch="resnet18", tp_size=32, tp_batch=8, tp_image_px=48, tp_distinct=16,
    tp_warmup=1, tp_iters=2, tp_fixed_warmup=0, tp_fixed_iters=1,
    det_depth=18, det_image_px=64, det_scenes=4, det_warmup=1, det_iters=1,
    lincls_size=32, lincls_batch=8, lincls_iters=4,
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# shared helpers


class Context:
    """What the checks share: the device, the sizes, the work folder, and the checkpoints that
    checks 1 and 3 leave for checks 5 and 6."""

    def __init__(self, args: argparse.Namespace, work: str) -> None:
        self.args = args
        self.cpu = bool(args.cpu)
        self.device = torch.device("cpu") if self.cpu else torch.device("cuda", 0)
        self.kind = self.device.type  # MODEL.DEVICE of every config
        self.sizes = types.SimpleNamespace(**(CPU_SIZES if self.cpu else GPU_SIZES))
        if args.batch:
            self.sizes.tp_batch = args.batch
        self.work = work
        self.artifacts: Dict[str, str] = {}
        self._shapes: Optional[str] = None

    def path(self, *parts: str) -> str:
        path = os.path.join(self.work, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def shapes(self) -> str:
        """The small shapes ImageFolder of checks 1 and 5 (grey style, 5 classes), made once."""
        if self._shapes is None:
            s = self.sizes
            out = self.path("shapes")
            make_shapes(
                out, num_train=1, num_val=1, size=s.shapes_px, seed=0, voc=False,
                num_train_objects=s.shapes_train, num_val_objects=s.shapes_val,
            )  # fmt: skip
            self._shapes = os.path.join(out, "imagefolder")
        return self._shapes

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@contextlib.contextmanager
def exact_float32(enabled: bool = True) -> Iterator[None]:
    """True float32 on CUDA while inside: TF32 off, deterministic cuDNN without autotuning."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
        ) = saved


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def _opts(pairs: Dict[str, Any]) -> List[Any]:
    return [x for kv in pairs.items() for x in kv]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _tensor_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _cpu_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    return max(
        (float((a[k].double() - b[k].double()).abs().max()) for k in b if b[k].numel()),
        default=0.0,
    )


class _Clock(HookBase):
    """Wall time (device synchronised) at the start of each iteration of ``marks``, and
    ``actions[i](trainer)`` right after the mark of iteration ``i``. Windows end at the start of
    an iteration, never at the end of the last: the checkpointer hook saves model_final.pth then."""

    def __init__(self, ctx: Context, marks, actions=None) -> None:
        self.ctx, self.marks, self.actions = ctx, set(marks), dict(actions or {})
        self.times: Dict[int, float] = {}

    def before_step(self) -> None:
        i = self.trainer.iter
        if i in self.marks:
            self.ctx.sync()
            self.times[i] = time.perf_counter()
        if i in self.actions:
            self.actions[i](self.trainer)

    def seconds(self, start: int, end: int) -> float:
        """From the start of iteration ``start`` to the start of ``end``."""
        if start not in self.times or end not in self.times:
            raise RuntimeError(f"iterations {start} and {end} did not both start")
        return self.times[end] - self.times[start]


def _fallback_checkpoint(ctx: Context, arch: str) -> str:
    """A random-init torchvision ResNet state dict, for checks 5 and 6 when no run left one."""
    import torchvision

    path = ctx.path("fallback", f"{arch}_random.pth")
    if not os.path.exists(path):
        torch.manual_seed(0)
        torch.save(getattr(torchvision.models, arch)().state_dict(), path)
    return path


# --------------------------------------------------------------------------------------------
# 1. losses on CUDA vs CPU


def _loss_cfg(ctx: Context, method: str, loss: str, kind: str, out: str):
    s = ctx.sizes
    n = s.loss_batch
    cfg = get_pretrain_cfg()
    cfg.merge_from_list(
        _opts({
            "MODEL.METHOD": method, "LOSS.NAME": loss, "MODEL.DEVICE": kind,
            "MODEL.ARCH": "resnet18", "MODEL.DIM": s.loss_dim, "MODEL.MLP_HIDDEN": s.loss_hidden,
            "MODEL.MLP_BN": method != "mocov2", "MODEL.NORM": "BN", "MODEL.MOMENTUM": 0.99,
            "LOSS.SYMMETRIC": method == "simclr", "LOSS.NUM_NEGATIVES": min(16, n - 1),
            "LOSS.QUEUE_SIZE": s.loss_queue, "INPUT.SIZE": s.loss_size,
            "DATASETS.ROOT": ctx.shapes(), "SOLVER.IMS_PER_BATCH": n,
            "SOLVER.BASE_LR": LOSS_LR * 256 / n, "SOLVER.WARMUP_EPOCHS": 0.0,
            "SOLVER.MAX_ITER": s.loss_steps, "SOLVER.CHECKPOINT_PERIOD": 10**6,
            "DATALOADER.NUM_WORKERS": s.loss_workers, "CUDNN_BENCHMARK": False, "LOG_PERIOD": 1,
            "TEST.RETRIEVAL_SIZE": 0, "OUTPUT_DIR": out, "SEED": 0,
        })
    )  # fmt: skip
    if "TF32" in cfg:  # read by setup_run only; exact_float32 is what this process runs with
        cfg.TF32 = False
    validate_pretrain_cfg(cfg, check_paths=False)
    return cfg


def _pretrain_losses(cfg, init: Optional[Dict[str, torch.Tensor]]):
    """Train ``cfg``; returns (per-step losses, trainer class, initial state, init max diff to
    ``init`` before it was loaded)."""
    seed_all_rng(cfg.SEED)
    pt = Pretrainer(cfg).resume_or_load(resume=False)
    start = _cpu_state(pt.model)
    diff = None
    if init is not None:
        diff = _max_diff(start, init)
        if diff != 0.0:  # start from the reference's weights anyway
            pt.model.load_state_dict(init)
    pt.train()
    history = pt.trainer.storage.history("total_loss").values()
    losses = [v for v, _ in sorted(history, key=lambda x: x[1])]
    trainer = type(pt.trainer).__name__
    del pt
    return losses, trainer, start, diff


def check_losses(ctx: Context) -> Dict[str, Any]:
    other = "cpu" if ctx.cpu else "cuda"
    label = "losses_cpu_rerun" if ctx.cpu else "losses_cuda"
    result: Dict[str, Any] = {
        "target": f"every step's loss within rel {LOSS_RTOL:g} (float32, TF32 off)",
        "compared": f"{other} vs cpu",
        "steps": ctx.sizes.loss_steps,
        "lr": LOSS_LR,
    }
    if ctx.cpu:
        result["note"] = "--cpu: both runs on the CPU (the same code path, no GPU kernels)"
    worst, ok = 0.0, True
    with exact_float32(not ctx.cpu):
        for method, loss in LOSS_METHODS:
            name = f"{method}/{loss}"
            ref_cfg = _loss_cfg(ctx, method, loss, "cpu", ctx.path("losses", method, "ref", ""))
            ref, ref_trainer, init, _ = _pretrain_losses(ref_cfg, None)
            out = ctx.path("losses", method, "device", "")
            got, trainer, _, init_diff = _pretrain_losses(
                _loss_cfg(ctx, method, loss, other, out), init
            )
            rel = [_rel(a, b) for a, b in zip(got, ref)]
            good = len(got) == len(ref) == ctx.sizes.loss_steps and max(rel) <= LOSS_RTOL
            ok = ok and good and all(math.isfinite(v) for v in got + ref)
            worst = max(worst, max(rel, default=float("inf")))
            result[name] = {
                "losses_cpu": ref,
                label: got,
                "max_rel_diff": max(rel, default=None),
                "trainer": trainer if trainer == ref_trainer else f"{trainer} / {ref_trainer}",
                "init_identical": init_diff == 0.0,
            }
            if method == "simo":
                ctx.artifacts["simo_r18"] = os.path.join(out, "model_final.pth")
                ctx.artifacts["simo_r18_device"] = other
    result["max_rel_diff"] = worst
    result["ok"] = ok
    return result


# --------------------------------------------------------------------------------------------
# 2. bf16 autocast + channels_last vs float32


def _amp_step(cfg, device: torch.device, size: int, n: int, amp: bool):
    cfg = cfg.clone()
    cfg.MODEL.CHANNELS_LAST = amp
    torch.manual_seed(0)
    model = build_method(cfg, device)
    g = torch.Generator().manual_seed(1)
    views = (torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        loss = model((views, None))["loss"]
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    nhwc = model.encoder_q.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    return loss.detach(), grads.double().cpu(), nhwc


def _amp_compare(ctx: Context, arch: str, size: int, n: int, small_head: bool) -> Dict[str, Any]:
    cfg = get_pretrain_cfg()
    cfg.MODEL.ARCH, cfg.MODEL.DEVICE = arch, ctx.kind
    cfg.SOLVER.IMS_PER_BATCH, cfg.LOSS.NUM_NEGATIVES = n, min(16, n - 1)
    if small_head:  # tests/pretrain/test_amp.py's model
        cfg.MODEL.DIM, cfg.MODEL.MLP_HIDDEN, cfg.LOSS.NUM_NEGATIVES = 16, 32, 4
    with exact_float32(ctx.device.type == "cuda"):
        ref, ref_grads, _ = _amp_step(cfg, ctx.device, size, n, amp=False)
        got, grads, nhwc = _amp_step(cfg, ctx.device, size, n, amp=True)
    return {
        "setting": f"{arch}, {size} px, N={n}" + (", DIM 16, MLP 32, K=4" if small_head else ""),
        "loss_fp32": float(ref),
        "loss_bf16_channels_last": float(got),
        "loss_rel_diff": _rel(float(got), float(ref)),
        "grad_cosine": float(F.cosine_similarity(grads, ref_grads, dim=0)),
        "loss_dtype": str(got.dtype).removeprefix("torch."),
        "finite": bool(torch.isfinite(grads).all() and torch.isfinite(got)),
        "weights_channels_last": nhwc,
    }


def check_amp(ctx: Context) -> Dict[str, Any]:
    small = _amp_compare(ctx, "resnet18", 32, 8, small_head=True)
    small["ok"] = (
        small["finite"]
        and small["weights_channels_last"]
        and small["loss_dtype"] == "float32"
        and small["loss_rel_diff"] < AMP_LOSS_RTOL
        and small["grad_cosine"] > AMP_GRAD_COSINE
    )
    recipe = _amp_compare(ctx, *ctx.sizes.amp_recipe, small_head=False)
    recipe["ok"] = recipe["finite"] and recipe["loss_rel_diff"] < AMP_LOSS_RTOL
    recipe["note"] = "grad_cosine not judged: the float32 gradient of a random-init R50 is chaotic"
    return {
        "ok": small["ok"] and recipe["ok"],
        "target": (
            f"test_amp setting: loss rel diff < {AMP_LOSS_RTOL:g} and gradient cosine > "
            f"{AMP_GRAD_COSINE:g}; recipe setting: loss rel diff < {AMP_LOSS_RTOL:g}"
        ),
        "test_amp_setting": small,
        "recipe_setting": recipe,
    }


# --------------------------------------------------------------------------------------------
# 3. ResNet-50 SiMo throughput


def _throughput_data(ctx: Context, images: int) -> str:
    """ImageFolder root with at least ``images`` training JPEGs: ``tp_distinct`` shapes images,
    hard-linked (copied where links fail) under new names up to the count."""
    s = ctx.sizes
    out = ctx.path("throughput_data")
    make_shapes(
        out, num_train=1, num_val=1, size=s.tp_image_px, seed=1, voc=False,
        num_train_objects=s.tp_distinct, num_val_objects=5,
    )  # fmt: skip
    root = os.path.join(out, "imagefolder")
    train = os.path.join(root, "train")
    files = sorted(
        os.path.join(d, f) for d, _, names in os.walk(train) for f in names if f.endswith(".jpg")
    )
    for i in range(max(images - len(files), 0)):
        src = files[i % len(files)]
        dst = os.path.join(os.path.dirname(src), f"copy{i:07d}.jpg")
        try:
            os.link(src, dst)
        except OSError:
            import shutil

            shutil.copyfile(src, dst)
    return root


def check_throughput(ctx: Context) -> Dict[str, Any]:
    s, args = ctx.sizes, ctx.args
    n, workers = s.tp_batch, args.workers
    loader_steps = s.tp_warmup + s.tp_iters
    fixed_start = loader_steps + s.tp_fixed_warmup
    # + 1 untimed last iteration, which writes model_final.pth
    max_iter = fixed_start + s.tp_fixed_iters + 1
    if args.data:
        root = args.data
    else:  # no epoch ends inside the timed steps: room for them and for the prefetched batches
        root = _throughput_data(ctx, (loader_steps + 2 * max(workers, 1) + 2) * n)
    opts = {
        "MODEL.DEVICE": ctx.kind, "SOLVER.IMS_PER_BATCH": n, "DATASETS.ROOT": root,
        "LOSS.NUM_NEGATIVES": min(16, n - 1), "SOLVER.MAX_ITER": max_iter,
        "SOLVER.CHECKPOINT_PERIOD": 10**6, "DATALOADER.NUM_WORKERS": workers,
        "LOG_PERIOD": max_iter, "OUTPUT_DIR": ctx.path("throughput", ""), "TEST.KNN_PERIOD": 0,
    }  # fmt: skip
    if ctx.cpu:
        opts.update({"MODEL.ARCH": s.tp_arch, "INPUT.SIZE": s.tp_size, "MODEL.MLP_HIDDEN": 512})
    cfg = load_pretrain_cfg(
        os.path.join(ROOT, "configs", "pretrain", "simo_r50_200ep.yaml"), _opts(opts)
    )
    fixed_batch = None

    def to_fixed_batch(trainer) -> None:  # after the loader's timed steps: one in-memory batch
        trainer.reset_data_loader(lambda: itertools.repeat(fixed_batch))

    g = torch.Generator().manual_seed(0)
    shape = (n, 3, cfg.INPUT.SIZE, cfg.INPUT.SIZE)
    views = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=g) for _ in range(2)]
    if ctx.device.type == "cuda":
        views = [v.pin_memory() for v in views]  # as the real loader hands them over
        torch.cuda.reset_peak_memory_stats(ctx.device)
    fixed_batch = (tuple(views), torch.zeros(n, dtype=torch.long))
    with cudnn_benchmark(cfg.CUDNN_BENCHMARK):
        seed_all_rng(cfg.SEED)
        pt = Pretrainer(cfg).resume_or_load(resume=False)
        clock = _Clock(
            ctx, (s.tp_warmup, loader_steps, fixed_start, max_iter - 1),
            actions={loader_steps: to_fixed_batch},
        )  # fmt: skip
        pt.trainer.register_hooks([clock])
        pt.train()
    ips = n * s.tp_iters / clock.seconds(s.tp_warmup, loader_steps)
    result = {
        "images_per_s": ips,
        "target": f">= {TARGET_IMAGES_PER_S:g} images/s (one H100)",
        "images_per_s_fixed_batch": n * s.tp_fixed_iters / clock.seconds(fixed_start, max_iter - 1),
        "trainer": type(pt.trainer).__name__,
        "precision": str(getattr(pt.trainer, "precision", "float32")).removeprefix("torch."),
        "channels_last": bool(cfg.MODEL.CHANNELS_LAST),
        "setting": (
            f"{cfg.MODEL.ARCH} SiMo, {cfg.INPUT.SIZE} px, N={n}, K={cfg.LOSS.NUM_NEGATIVES}, "
            f"{workers} workers, {s.tp_iters} steps after {s.tp_warmup} (fixed batch: "
            f"{s.tp_fixed_iters} after {s.tp_fixed_warmup})"
        ),
        "data": args.data or f"generated shapes JPEGs, {s.tp_image_px} px",
    }
    if ctx.device.type == "cuda":
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
        result["ok"] = ips >= TARGET_IMAGES_PER_S
    else:
        result["ok"] = None
        result["note"] = "--cpu: figures of a tiny CPU run, not judged"
    ctx.artifacts["simo_throughput"] = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    ctx.artifacts["simo_throughput_device"] = ctx.kind
    del pt
    return result


# --------------------------------------------------------------------------------------------
# 4. detection step


def check_det(ctx: Context) -> Dict[str, Any]:
    from transfer.config import load_config, resolve_device_and_norm
    from transfer.datasets import register_datasets
    from transfer.trainer import Trainer

    s = ctx.sizes
    data = ctx.path("det", "")
    make_shapes(os.path.join(data, "shapes"), num_train=s.det_scenes, num_val=1,
                size=s.det_image_px, seed=0, voc=False)  # fmt: skip
    total = s.det_warmup + s.det_iters + 1  # the last iteration, untimed, saves model_final
    opts = {
        "MODEL.WEIGHTS": "", "MODEL.DEVICE": ctx.kind, "SOLVER.AMP.ENABLED": not ctx.cpu,
        "SOLVER.IMS_PER_BATCH": 2, "SOLVER.REFERENCE_WORLD_SIZE": 0, "SOLVER.MAX_ITER": total,
        "SOLVER.STEPS": "()", "SOLVER.CHECKPOINT_PERIOD": 10**6,
        "DATASETS.TRAIN": "('shapes_train',)", "DATASETS.TEST": "()",
        "TEST.PRECISE_BN.ENABLED": False, "TEST.EVAL_PERIOD": 0,
        "DATALOADER.NUM_WORKERS": min(4, os.cpu_count() or 1), "SEED": 0,
        "OUTPUT_DIR": ctx.path("det_out", ""),
    }  # fmt: skip
    if ctx.cpu:
        opts.update({
            "MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
            "INPUT.MIN_SIZE_TRAIN": "(64,)", "INPUT.MAX_SIZE_TRAIN": 128,
            "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 200, "MODEL.RPN.POST_NMS_TOPK_TRAIN": 64,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32, "DATALOADER.NUM_WORKERS": 0,
        })  # fmt: skip
    cfg = load_config(os.path.join(ROOT, "configs", "fpn_simo_1x.yaml"), _opts(opts))
    if not ctx.cpu:  # square images with the pixels of a 4:3 COCO image at each shorter side
        sides = cfg.INPUT.MIN_SIZE_TRAIN
        cfg.INPUT.MIN_SIZE_TRAIN = tuple(round(m * (4 / 3) ** 0.5) for m in sides)
    resolve_device_and_norm(cfg, 1)
    with environment(DETECTRON2_DATASETS=data), cudnn_benchmark(False):
        register_datasets(cfg)
        cfg.freeze()
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        torch.manual_seed(0)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        clock = _Clock(ctx, (s.det_warmup, total - 1))
        trainer.register_hooks([clock])
        trainer.train()
    s_per_iter = clock.seconds(s.det_warmup, total - 1) / s.det_iters
    result = {
        "s_per_iter": s_per_iter,
        "target": f"<= {TARGET_DET_S_PER_ITER:g} s/iteration (one H100)",
        "trainer": type(trainer._trainer).__name__,
        "setting": (
            f"R{cfg.MODEL.RESNETS.DEPTH}-FPN 4conv1fc, 2 images, train sizes "
            f"{tuple(cfg.INPUT.MIN_SIZE_TRAIN)} (max {cfg.INPUT.MAX_SIZE_TRAIN}), AMP "
            f"{cfg.SOLVER.AMP.ENABLED}, {s.det_iters} iterations after {s.det_warmup}"
        ),
    }
    if ctx.device.type == "cuda":
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
        result["ok"] = s_per_iter <= TARGET_DET_S_PER_ITER
    else:
        result["ok"] = None
        result["note"] = "--cpu: R18-FPN at 64 px in float32 (AMP is CUDA-only), not judged"
    del trainer
    return result


# --------------------------------------------------------------------------------------------
# 5. linear evaluation


def check_lincls(ctx: Context) -> Dict[str, Any]:
    s = ctx.sizes
    weights = ctx.artifacts.get("simo_r18")
    source = f"check 1's {ctx.artifacts.get('simo_r18_device')} SiMo run"
    if not weights or not os.path.isfile(weights):
        weights, source = _fallback_checkpoint(ctx, "resnet18"), "random torchvision ResNet-18"
    out = ctx.path("lincls", "")
    cfg = get_lincls_cfg()
    cfg.merge_from_list(
        _opts({
            "MODEL.ARCH": "resnet18", "MODEL.WEIGHTS": weights, "MODEL.DEVICE": ctx.kind,
            "INPUT.SIZE": s.lincls_size, "DATASETS.ROOT": ctx.shapes(),
            "SOLVER.IMS_PER_BATCH": s.lincls_batch, "SOLVER.MAX_ITER": s.lincls_iters,
            "SOLVER.CHECKPOINT_PERIOD_EPOCHS": 1000.0, "TEST.IMS_PER_BATCH": 2 * s.lincls_batch,
            "DATALOADER.NUM_WORKERS": 0 if ctx.cpu else 2, "CUDNN_BENCHMARK": False,
            "LOG_PERIOD": s.lincls_iters, "OUTPUT_DIR": out,
        })
    )  # fmt: skip
    run_linear_eval(cfg, cached=False)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    top1 = results.get("top1")
    return {
        "ok": isinstance(top1, (int, float)) and math.isfinite(top1),
        "top1": top1,
        "top5": results.get("top5"),
        "knn_top1": results.get("knn_top1"),
        "weights": source,
        "iterations": s.lincls_iters,
        "target": "runs and writes results.json with a finite top-1",
    }


# --------------------------------------------------------------------------------------------
# 6. conversion with --verify


def check_convert(ctx: Context) -> Dict[str, Any]:
    for key, check in (("simo_throughput", 3), ("simo_r18", 1)):
        ckpt = ctx.artifacts.get(key)
        if ckpt and os.path.isfile(ckpt):
            source = f"check {check}'s {ctx.artifacts[key + '_device']} SiMo run"
            break
    else:
        ckpt, source = _fallback_checkpoint(ctx, "resnet18"), "random torchvision ResNet-18"
    out = ctx.path("convert", "converted.pkl")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "convert.py"), ckpt, out, "--verify"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    text = proc.stdout + proc.stderr
    match = re.search(r"verify: max abs diff ([0-9.eE+-]+)", proc.stdout)
    passed = proc.returncode == 0 and match is not None and "): OK" in proc.stdout
    result = {
        "ok": passed,
        "max_abs_diff": float(match.group(1)) if match else None,
        "target": "verify passes (detectron2 vs torchvision, max abs diff <= 1e-4)",
        "checkpoint": source,
        "note": "transfer/verify.py compares on the CPU; the checkpoint is the device's part",
    }
    if not passed:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        result["error"] = f"tools/convert.py exited {proc.returncode}: " + (
            lines[-1] if lines else "no output"
        )
    return result


# --------------------------------------------------------------------------------------------
# 7. two NCCL processes vs one


def _ddp_cfg(method: str, loss: str):
    """tests/pretrain/test_distributed.py's model."""
    cfg = get_pretrain_cfg()
    cfg.MODEL.METHOD, cfg.LOSS.NAME = method, loss
    cfg.MODEL.ARCH, cfg.MODEL.DIM, cfg.MODEL.MLP_HIDDEN = "resnet18", 16, 32
    cfg.MODEL.MOMENTUM = 0.9
    cfg.LOSS.NUM_NEGATIVES, cfg.LOSS.SYMMETRIC = 5, method != "simo"
    cfg.SOLVER.IMS_PER_BATCH = 8
    return cfg


def _ddp_views() -> tuple:
    g = torch.Generator().manual_seed(7)
    return tuple(torch.randn(8, 3, 16, 16, generator=g).double() for _ in range(2))


def _ddp_step(method: str, loss: str, device: torch.device, rank: int, world: int):
    """One float64 forward/backward on this process's share of the global batch of 8."""
    torch.manual_seed(0)
    model = build_method(_ddp_cfg(method, loss), device).double()
    net = create_ddp_model(model, broadcast_buffers=False)
    n = 8 // world
    im_q, im_k = (v[rank * n : (rank + 1) * n] for v in _ddp_views())
    out = net(((im_q, im_k), None))["loss"]
    out.backward()
    grads = {k: p.grad.detach().cpu() for k, p in model.named_parameters() if p.grad is not None}
    means = {k: v.detach().cpu() for k, v in model.state_dict().items() if "running_mean" in k}
    return out.detach(), grads, means


def _moco_shuffle_diffs(device: torch.device, rank: int, world: int) -> tuple:
    cfg = _ddp_cfg("mocov2", "infonce")
    cfg.MODEL.MLP_BN, cfg.MODEL.NORM, cfg.MODEL.SHUFFLE_BN, cfg.LOSS.QUEUE_SIZE = (
        False, "BN", True, 16,
    )  # fmt: skip
    torch.manual_seed(0)
    moco = build_method(cfg, device).double().eval()
    n = 8 // world
    local = _ddp_views()[1][rank * n : (rank + 1) * n].to(device)
    eval_diff = (moco.embed_k(local) - ContrastiveMethod.embed_k(moco, local)).abs().max()
    moco.train()  # with batch statistics the shuffled keys differ: the shuffle happened
    with torch.no_grad():
        direct = ContrastiveMethod.embed_k(moco, local)
    train_diff = (moco.embed_k(local) - direct).abs().max()
    return float(eval_diff), float(train_diff)


def _ddp_worker(result_file: str) -> None:
    """Body of each of the two processes (spawned: module level)."""
    sys.stdout = sys.stderr  # stdout carries the JSON lines of the parent only
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    rank, world = comm.get_rank(), comm.get_world_size()
    results: Dict[str, Any] = {}
    for method, loss in DDP_METHODS:
        out, grads, means = _ddp_step(method, loss, device, rank, world)
        losses = [torch.zeros(1, dtype=out.dtype, device=device) for _ in range(world)]
        dist.all_gather(losses, out.reshape(1))
        results[f"{method}/{loss}"] = {
            "loss": torch.cat(losses).mean().cpu(), "grads": grads, "running_means": means,
        }  # fmt: skip
    diffs = torch.tensor(_moco_shuffle_diffs(device, rank, world), dtype=torch.float64)
    all_diffs = [torch.zeros_like(diffs.to(device)) for _ in range(world)]
    dist.all_gather(all_diffs, diffs.to(device))
    results["shuffle_eval_diff"] = float(torch.stack(all_diffs)[:, 0].max())
    results["shuffle_train_diff"] = float(torch.stack(all_diffs)[:, 1].min())
    if rank == 0:
        torch.save(results, result_file)
    comm.synchronize()


def check_ddp(ctx: Context) -> Dict[str, Any]:
    if ctx.cpu and not ctx.args.cpu_ddp:
        return {"ok": None, "skipped": "skipped: --cpu (add --cpu-ddp for 2 gloo CPU processes)"}
    gpus = torch.cuda.device_count() if not ctx.cpu else 0
    if not ctx.cpu and gpus < 2:
        return {"ok": None, "skipped": f"skipped: {gpus} GPU"}
    result_file = ctx.path("ddp", "results.pt")
    args = types.SimpleNamespace(num_gpus=2, num_machines=1, machine_rank=0, dist_url="auto")
    launch_from_args(_ddp_worker, args, result_file, device=ctx.kind)
    got = torch.load(result_file, weights_only=True)
    result: Dict[str, Any] = {
        "backend": "gloo" if ctx.cpu else "nccl",
        "target": (
            f"2 processes vs 1 in float64: loss, gradients, SyncBN running means within rel "
            f"{DDP_RTOL:g}; MoCo shuffling BN: keys un-shuffled exactly (eval), shuffled (train)"
        ),
    }
    ok = True
    for method, loss in DDP_METHODS:  # one process holding the global batch, on this GPU
        ref_loss, ref_grads, ref_means = _ddp_step(method, loss, ctx.device, 0, 1)
        two = got[f"{method}/{loss}"]
        loss_rel = _rel(float(two["loss"]), float(ref_loss))
        same_keys = two["grads"].keys() == ref_grads.keys() and len(ref_grads) > 60
        same_keys = same_keys and two["running_means"].keys() == ref_means.keys()
        grad_rel = mean_rel = float("inf")
        if same_keys:
            grad_rel = max(_tensor_rel(two["grads"][k], g) for k, g in ref_grads.items())
            mean_rel = max(_tensor_rel(two["running_means"][k], m) for k, m in ref_means.items())
        good = same_keys and max(loss_rel, grad_rel, mean_rel) <= DDP_RTOL
        ok = ok and good
        result[f"{method}/{loss}"] = {
            "loss_rel_diff": loss_rel,
            "grad_max_rel_diff": grad_rel,
            "running_mean_max_rel_diff": mean_rel,
            "same_tensors": same_keys,
            "ok": good,
        }
    result["moco_shuffle_bn_eval_max_diff"] = got["shuffle_eval_diff"]
    result["moco_shuffle_bn_train_min_diff"] = got["shuffle_train_diff"]
    ok = ok and got["shuffle_eval_diff"] < 1e-10 and got["shuffle_train_diff"] > 1e-3
    result["ok"] = ok
    return result


# --------------------------------------------------------------------------------------------
# running the checks


RUNNERS: Dict[str, Callable[[Context], Dict[str, Any]]] = {
    "losses_cuda_vs_cpu": check_losses,
    "bf16_channels_last_vs_fp32": check_amp,
    "simo_r50_throughput": check_throughput,
    "det_r50_fpn_step": check_det,
    "lincls": check_lincls,
    "convert_verify_cuda": check_convert,
    "ddp_nccl": check_ddp,
}


def _jsonable(value: Any) -> Any:
    """JSON without NaN / Infinity (strict parsers reject them): non-finite floats as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def run_check(name: str, ctx: Context) -> Dict[str, Any]:
    """One check, its failure contained: ok false with the one-line error."""
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stray prints must not mix with the JSON
            result = RUNNERS[name](ctx)
    except Exception as e:  # noqa: BLE001  (one failing check must not hide the others)
        traceback.print_exc(file=sys.stderr)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        result = {"ok": False, "error": f"{type(e).__name__}: {first}".rstrip(": ")}
    if result.get("error") and result.get("ok") is not False:
        result["ok"] = False
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"name": name, "ok": result.pop("ok"), **result,
            "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip


def _figures(result: Dict[str, Any]) -> str:
    """The headline figures of a check, for the markdown table."""
    keys = ("max_rel_diff", "images_per_s", "images_per_s_fixed_batch", "s_per_iter",
            "max_memory_allocated_gib", "top1", "max_abs_diff", "error")  # fmt: skip
    parts = [result["skipped"]] if "skipped" in result else []
    for key in keys:
        if key in result and result[key] is not None:
            v = result[key]
            parts.append(f"{key} {v:.4g}" if isinstance(v, float) else f"{key} {v}")
    if result["name"] == "bf16_channels_last_vs_fp32" and "test_amp_setting" in result:
        for setting in ("test_amp_setting", "recipe_setting"):
            r = result[setting]
            parts.append(f"{setting}: loss {r['loss_rel_diff']:.2%}, cos {r['grad_cosine']:.3f}")
    return "; ".join(parts).replace("|", "/")


def write_results_md(lines: List[Dict[str, Any]], summary: Dict[str, Any]) -> None:
    verdict = {True: "pass", False: "**FAIL**", None: "-"}
    rows = [
        f"| {r['name']} | {verdict[r['ok']]} | {_figures(r)} | {r.get('target', '-')} "
        f"| {r['seconds']} |"
        for r in lines
    ]
    append_result(
        "gpu_check",
        [(("check", "ok", "figures", "target", "s"), rows)],
        notes=[f"{summary['device']}; {summary['seconds']} s in all; exit status "
               f"{0 if summary['ok'] else 1}"],  # fmt: skip
    )


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cpu", action="store_true", help="dry run of every stage on the CPU")
    p.add_argument("--cpu-ddp", action="store_true", help="with --cpu: run check 7 with gloo")
    p.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(CHECKS)}")
    p.add_argument("--batch", type=int, default=0, help="check 3's images per step (128)")
    p.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="check 3's loader workers"
    )
    p.add_argument("--data", default="", help="check 3's ImageFolder root (default: generated)")
    p.add_argument(
        "--threads",
        type=int,
        default=-1,
        help="torch intra-op threads (default: 1 with --cpu, as the tests: on a small shared "
        "machine oversubscribed OpenMP threads crawl; torch's default on the GPU machine)",
    )
    p.add_argument("--work-dir", default="", help="keep data and run outputs here (default: temp)")
    p.add_argument("--out", default="", help="also append the JSON lines to this file")
    p.add_argument("--results", action="store_true", help="append a table to bench/results.md")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        p.error(f"--only: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    if args.batch and args.batch < 2:
        p.error(f"--batch {args.batch}: SiMo needs at least 2 images per step")
    if args.data and not os.path.isdir(os.path.join(args.data, "train")):
        p.error(f"--data {args.data}: no train/ folder; pass an ImageFolder root")
    if not args.cpu and not torch.cuda.is_available():
        print(
            f"bench/gpu_check.py needs a CUDA GPU: {no_cuda_reason()}; run it with --cpu to "
            "exercise its stages on the CPU",
            file=sys.stderr,
        )
        return 2
    threads = args.threads if args.threads >= 0 else (1 if args.cpu else 0)
    if threads:
        torch.set_num_threads(threads)
    stdout = sys.stdout
    start = time.perf_counter()
    lines = []
    with contextlib.ExitStack() as stack:
        work = args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_"))
        os.makedirs(work, exist_ok=True)
        ctx = Context(args, work)
        for i, name in enumerate(names, 1):
            print(f"[gpu_check] {i}/{len(names)} {name} ...", file=sys.stderr, flush=True)
            result = run_check(name, ctx)
            lines.append(result)
            text = json.dumps(_jsonable(result))
            print(text, file=stdout, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(text + "\n")
    failed = [r["name"] for r in lines if r["ok"] is False]
    summary = {
        "name": "summary",
        "ok": not failed,
        "passed": [r["name"] for r in lines if r["ok"] is True],
        "failed": failed,
        "no_verdict": [r["name"] for r in lines if r["ok"] is None],
        "device": torch.cuda.get_device_name(0) if not args.cpu else "cpu (--cpu)",
        "versions": versions(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    text = json.dumps(summary)
    print(text, file=stdout, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    if args.results:
        write_results_md(lines, summary)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
