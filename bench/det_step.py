#!/usr/bin/env python
"""Overhead of the detection engine (transfer.trainer.Trainer = detectron2 DefaultTrainer + our
hooks) against a minimal plain-PyTorch loop over the same model, data loader and optimizer, in
one process.

    python bench/det_step.py [--iters 10] [--size 128] [--batch 4]

Prints s/iter of both and their ratio (engine / reference; 1.00 = no overhead) as a markdown row,
and appends it to bench/results.md with the machine, versions and date. On a GPU (MODEL.DEVICE
cuda) the same figures are the detection s/iter there.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from detectron2.engine import HookBase  # noqa: E402
from detectron2.solver import build_optimizer  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from bench.common import RATIO_HEADER, append_result  # noqa: E402
from transfer.config import load_config  # noqa: E402
from transfer.datasets import register_datasets  # noqa: E402
from transfer.shapes import make_shapes  # noqa: E402
from transfer.trainer import Trainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(args: argparse.Namespace, tmp: str) -> tuple[float, float]:
    """(reference s/iter, engine s/iter), with the shapes data and outputs under ``tmp``."""
    os.environ["DETECTRON2_DATASETS"] = tmp
    make_shapes(os.path.join(tmp, "shapes"), num_train=64, num_val=4, size=args.size, seed=0)
    total = args.warmup + args.iters
    cfg = load_config(
        os.path.join(ROOT, "configs", "shapes_fpn_cpu.yaml"),
        ["SOLVER.MAX_ITER", str(total), "SOLVER.IMS_PER_BATCH", str(args.batch),
         "DATASETS.TEST", "()", "TEST.PRECISE_BN.ENABLED", "False", "SOLVER.CHECKPOINT_PERIOD",
         "100000", "OUTPUT_DIR", os.path.join(tmp, "out"), "DATALOADER.NUM_WORKERS", "1",
         "MODEL.DEVICE", "cuda" if torch.cuda.is_available() else "cpu"],
    )  # fmt: skip
    register_datasets(cfg)
    cfg.freeze()

    # reference: forward/backward/step over the same loader, nothing else
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    loader = iter(Trainer.build_train_loader(cfg))
    with EventStorage():
        for i in range(total):
            if i == args.warmup:
                t0 = time.perf_counter()
            loss = sum(model(next(loader)).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    ref = (time.perf_counter() - t0) / args.iters

    # engine: the real Trainer with its hooks (timer, lr scheduler, writers, checkpointer)
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    clock = {}

    class Clock(HookBase):  # wall time between the first timed and the last step's start
        def before_step(self):
            if self.trainer.iter in (args.warmup, total - 1):
                clock[self.trainer.iter] = time.perf_counter()

    trainer.register_hooks([Clock()])
    trainer.train()
    eng = (clock[total - 1] - clock[args.warmup]) / (args.iters - 1)
    return ref, eng


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    if args.iters < 2:
        sys.exit("error: --iters must be at least 2 (the engine is timed between step starts).")
    with tempfile.TemporaryDirectory(prefix="bench_det_") as tmp:
        ref, eng = measure(args, tmp)
    row = (
        f"| train_det step (R50-FPN 4conv1fc, {args.size}px, batch {args.batch}, "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}) | {ref:.3f} s/iter | {eng:.3f} s/iter "
        f"| {eng / ref:.3f} |"
    )
    print(row)
    append_result("det_step", [(RATIO_HEADER, [row])])


if __name__ == "__main__":
    main()
