#!/usr/bin/env python
"""Speed of one SiMo training step through the engine vs. a plain PyTorch step, and of the data
pipeline, e.g.

    python bench/pretrain_step.py --arch resnet50 --size 224 --batch 64 --amp bf16 # a GPU
    python bench/pretrain_step.py --arch resnet50 --size 64 --batch 32 --threads 2  # this CPU box

* engine step: ``Pretrainer``'s real trainer (detectron2's ``SimpleTrainer.run_step`` + all its
  hooks: timer, lr scheduler, progress, periodic checkpointer, metric writers, NaN check) fed one
  fixed in-memory batch, so data loading is excluded;
* reference step: the same model (a copy with the same weights) and batch in a bare
  ``loss = model(q, k); opt.zero_grad(); loss.backward(); opt.step()`` loop;
* the two are timed in alternating blocks (so background load hits both alike); the overhead
  ratio is median(engine s/iter) / median(reference s/iter) (target <= 1.05);
* data pipeline: images/s of the two-crop aug+ loader over ``--data`` (default: a fresh shapes
  ImageFolder, ``transfer.shapes.make_shapes`` with 400 scenes at 128 px, seed 0, as the demo's, in
  a temp dir) with 0 workers (main process) and with ``--workers`` workers, divided per worker.

Prints one JSON object (also written to --out if given) and appends to bench/results.md, with the
machine, versions and date: the engine vs reference s/iter and their ratio, the training images/s
of both with the precision actually used (AMP bf16/fp16 with ``--amp``, on a GPU or in the CPU's
autocast; else fp32), and the data pipeline images/s for 0 and ``--workers`` workers.
"""

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from bench.common import RATIO_HEADER, append_result  # noqa: E402
from pretrain.config import get_pretrain_cfg  # noqa: E402
from pretrain.data import (  # noqa: E402
    RobustImageFolder,
    TwoCropsTransform,
    build_train_loader,
    moco_v2_transform,
)
from pretrain.pretrainer import Pretrainer  # noqa: E402
from transfer.shapes import make_shapes  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_block(fn, iters, device):
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def bench_step(args, out_dir):
    cfg = get_pretrain_cfg()
    cfg.merge_from_list(
        [
            "MODEL.ARCH", args.arch, "INPUT.SIZE", args.size, "SOLVER.IMS_PER_BATCH", args.batch,
            "LOSS.NUM_NEGATIVES", min(16, args.batch - 1), "DATASETS.ROOT", args.data,
            "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", out_dir, "SOLVER.CHECKPOINT_PERIOD", 10**9,
            "SOLVER.AMP.ENABLED", args.amp != "none", "MODEL.CHANNELS_LAST", args.channels_last,
            "SOLVER.AMP.PRECISION", "float16" if args.amp == "fp16" else "bfloat16",
            # explicit, so that --amp on a machine without GPU times the CPU's autocast
            "MODEL.DEVICE", "cuda" if torch.cuda.is_available() else "cpu",
        ]
    )  # fmt: skip
    seed_all_rng(0)
    pt = Pretrainer(cfg)
    device = pt.device
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, args.size, args.size)
    im_q, im_k = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    labels = torch.zeros(args.batch, dtype=torch.long)
    if device.type == "cuda":
        im_q, im_k = im_q.pin_memory(), im_k.pin_memory()  # as the real loader delivers them
    pt.trainer.reset_data_loader(lambda: itertools.repeat(((im_q, im_k), labels)))

    ref_model = copy.deepcopy(pt.model)
    ref_opt = torch.optim.SGD(
        [p for p in ref_model.parameters() if p.requires_grad], lr=pt.lr, momentum=0.9,
        weight_decay=1e-4,
    )  # fmt: skip
    amp = getattr(pt.trainer, "precision", None)  # AMPTrainer's autocast dtype
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    cl = torch.channels_last if args.channels_last else torch.contiguous_format

    def ref_step():
        q = im_q.to(device, non_blocking=True).contiguous(memory_format=cl)
        k = im_k.to(device, non_blocking=True).contiguous(memory_format=cl)
        ref_opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = ref_model.losses(q, k)["loss"]
        scaler.scale(loss).backward()
        scaler.step(ref_opt)
        scaler.update()

    trainer = pt.trainer
    trainer.max_iter = 10**9  # the periodic checkpointer never fires
    it = itertools.count()

    def engine_step():  # exactly the body of TrainerBase.train's loop
        trainer.iter = next(it)
        trainer.before_step()
        trainer.run_step()
        trainer.after_step()

    engine_times, ref_times = [], []
    with EventStorage(0) as trainer.storage:
        trainer.before_train()
        _time_block(engine_step, args.warmup, device)
        _time_block(ref_step, args.warmup, device)
        for _ in range(args.rounds):
            engine_times.append(_time_block(engine_step, args.iters, device))
            ref_times.append(_time_block(ref_step, args.iters, device))
        trainer.iter = next(it)
        trainer.after_train()
    engine_s, ref_s = statistics.median(engine_times), statistics.median(ref_times)
    return {
        "engine_s_per_iter": engine_s,
        "reference_s_per_iter": ref_s,
        "engine_images_per_s": args.batch / engine_s,
        "reference_images_per_s": args.batch / ref_s,
        "overhead_ratio": engine_s / ref_s,
        "engine_s_per_iter_rounds": engine_times,
        "reference_s_per_iter_rounds": ref_times,
        "device": str(device),
        # what the step ran in (--amp on the CPU: the CPU's autocast)
        "precision": f"AMP {str(amp).removeprefix('torch.')}" if amp is not None else "fp32",
        "channels_last": bool(args.channels_last),
        "num_negatives": int(cfg.LOSS.NUM_NEGATIVES),
    }


def bench_data(args):
    dataset = RobustImageFolder(
        os.path.join(args.data, "train"), TwoCropsTransform(moco_v2_transform(args.size))
    )
    result = {}
    for workers in sorted({0, args.workers}):
        loader = build_train_loader(dataset, args.batch, num_workers=workers, seed=0)
        batches = iter(loader)
        next(batches)  # worker start-up and first batch excluded
        start = time.perf_counter()
        for _ in range(args.data_batches):
            next(batches)
        ips = args.batch * args.data_batches / (time.perf_counter() - start)
        result[f"workers_{workers}_images_per_s"] = ips
        result[f"workers_{workers}_images_per_s_per_worker"] = ips / max(workers, 1)
        del batches, loader
    return result


def write_results_md(args, step, data):
    """Append the step (engine vs reference) and throughput tables to bench/results.md."""
    what = (
        f"{args.arch} SiMo, {args.size} px, N={args.batch}, K={step['num_negatives']}, "
        f"{step['device']}, {step['precision']}"
        + (", channels_last" if step["channels_last"] else "")
    )
    overhead = [
        (
            f"| training step, engine vs bare loop ({what}) "
            f"| {step['reference_s_per_iter']:.3f} s/iter | {step['engine_s_per_iter']:.3f} s/iter "
            f"| {step['overhead_ratio']:.3f} |"
        )
    ]
    throughput = [
        f"| training step, engine ({what}) | {step['engine_images_per_s']:.1f} | - |",
        f"| training step, bare loop ({what}) | {step['reference_images_per_s']:.1f} | - |",
    ]
    for workers in sorted({0, args.workers}):
        label = "0 workers (main process)" if workers == 0 else f"{workers} worker(s)"
        throughput.append(
            f"| data pipeline, two {args.size} px crops, {label} "
            f"| {data[f'workers_{workers}_images_per_s']:.1f} "
            f"| {data[f'workers_{workers}_images_per_s_per_worker']:.1f} |"
        )
    rounds = " ".join(f"{t:.3f}" for t in step["engine_s_per_iter_rounds"])
    ref_rounds = " ".join(f"{t:.3f}" for t in step["reference_s_per_iter_rounds"])
    append_result(
        "pretrain_step",
        [(RATIO_HEADER, overhead), (("what", "images/s", "images/s per worker"), throughput)],
        notes=[
            (
                f"s/iter = median of {args.rounds} alternating blocks of {args.iters} steps "
                f"(engine: {rounds}; reference: {ref_rounds}); ratio = engine / reference"
            ),
            f"data: {args.data or 'shapes ImageFolder (400 scenes, 128 px) in a temp dir'}",
        ],
    )


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32, help="images per step (this process)")
    p.add_argument("--iters", type=int, default=5, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=3, help="alternating engine/reference blocks")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    p.add_argument("--workers", type=int, default=1, help="loader workers for the data benchmark")
    p.add_argument("--data-batches", type=int, default=5)
    p.add_argument(
        "--data", default="", help="ImageFolder root (default: a fresh shapes one in a temp dir)"
    )
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--out", default="", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.data and not os.path.isdir(os.path.join(args.data, "train")):
        sys.exit(f"error: {args.data}/train not found; pass an ImageFolder root to --data.")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_pretrain_") as tmp:
        run_args = copy.copy(args)
        if not args.data:
            make_shapes(os.path.join(tmp, "shapes"), num_train=400, num_val=4, size=128, seed=0)
            run_args.data = os.path.join(tmp, "shapes", "imagefolder")
        os.makedirs(os.path.join(tmp, "out"))
        step = bench_step(run_args, os.path.join(tmp, "out"))
        data = bench_data(run_args)
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "step": step,
        "data": data,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    write_results_md(args, step, data)


if __name__ == "__main__":
    main()
