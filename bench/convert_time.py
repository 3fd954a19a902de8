#!/usr/bin/env python
"""Time of converting a pretraining checkpoint to detectron2 weights (``transfer.convert``, what
tools/convert.py runs) against the bare file I/O of the same data, in one process:

    python bench/convert_time.py [--arch resnet50] [--rounds 3] [--warmup 1] [--threads 1]

Input: a SiMo checkpoint in our pretraining format (docs/formats.md), written in a temp dir by the
engine's own ``AtomicCheckpointer`` for a SiMo ``--arch`` model built by
``pretrain.methods.build_method`` from the default pretraining config, after one SGD step on a tiny
random batch (so BN statistics, the key encoder and the optimizer's momentum buffers hold real
values): ``model`` (``encoder_q`` with its MLP head, ``encoder_k``), ``optimizer``, ``iteration``
and ``meta`` (the scheduler / loader / RNG entries of a real run are a few numbers; left out).

Timed in alternating rounds (``--warmup`` untimed rounds, then the median of ``--rounds``):

* **convert**: ``transfer.convert.convert(ckpt, out.pkl, force=True)``: safe load
  (``weights_only``), recognition, backbone extraction, renaming, shape checks, sha256 of the
  source, provenance, pickle written with fsync and renamed into place (tools/convert.py without
  ``--verify``);
* **verify**: ``transfer.verify.verify_conversion(out.pkl, backbone)``: what ``--verify`` adds
  (build detectron2's ResNet, load the pickle through ``DetectionCheckpointer``, compare stem and
  res2..res5 with torchvision's on one 64 px image);
* **reference**: ``torch.load(ckpt, map_location="cpu", weights_only=True)``, then
  ``pickle.dump`` (protocol 4, as convert) of the same tensors convert writes (``encoder_q.*``
  without ``encoder_q.fc.*``) as numpy arrays (``Tensor.numpy()``, no copy) in a dict to a file in
  the same temp dir, flushed and fsynced: the file I/O that any converter has to do.

ratio = convert s / reference s (what recognition, checks, hashing and provenance cost on top of
the I/O). Prints the figures and appends them, with the checkpoint and output sizes, the machine,
versions and date, to bench/results.md.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench.common import RATIO_HEADER, append_result  # noqa: E402
from pretrain.config import ARCHS, get_pretrain_cfg  # noqa: E402
from pretrain.engine import AtomicCheckpointer  # noqa: E402
from pretrain.pretrainer import num_negatives_per_query  # noqa: E402
from pretrain.methods import build_method  # noqa: E402
from transfer.convert import convert  # noqa: E402
from transfer.verify import verify_conversion  # noqa: E402

BATCH = 4  # images of the one SGD step that fills the checkpoint's buffers
STEP_SIZE = 32  # pixels


def write_checkpoint(arch: str, out_dir: str) -> tuple[str, dict[str, torch.Tensor]]:
    """Write ``out_dir/model_final.pth`` as a SiMo pretraining run would; return its path and the
    query encoder's state dict (torchvision names, with the MLP head as ``fc``)."""
    cfg = get_pretrain_cfg()
    cfg.merge_from_list(
        ["MODEL.ARCH", arch, "SOLVER.IMS_PER_BATCH", BATCH, "LOSS.NUM_NEGATIVES", BATCH - 1]
    )
    torch.manual_seed(0)
    model = build_method(cfg, torch.device("cpu"))
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=0.03,
        momentum=cfg.SOLVER.MOMENTUM,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
    )
    g = torch.Generator().manual_seed(0)
    shape = (BATCH, 3, STEP_SIZE, STEP_SIZE)
    loss = model.losses(torch.randn(shape, generator=g), torch.randn(shape, generator=g))["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    meta = {
        "kind": "pretrain",
        "name": f"bench_simo_{arch}",
        "method": cfg.MODEL.METHOD,
        "arch": arch,
        "loss": cfg.LOSS.NAME,
        "tau": float(cfg.LOSS.TAU),
        "alpha": float(cfg.LOSS.ALPHA),
        "num_negatives": num_negatives_per_query(cfg),
        "epochs": 0.0,
        "iteration": 1,
        "ims_per_batch": BATCH,
    }
    AtomicCheckpointer(model, out_dir, meta_fn=lambda: meta, optimizer=opt).save(
        "model_final", iteration=0
    )
    encoder_q = {k: v.detach().clone() for k, v in model.encoder_q.state_dict().items()}
    return os.path.join(out_dir, "model_final.pth"), encoder_q


def reference(ckpt: str, out: str) -> int:
    """The bare I/O: safe load, then pickle the backbone tensors as numpy (fsynced); returns how
    many tensors were written."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    weights = {
        k: v.numpy()
        for k, v in state.items()
        if k.startswith("encoder_q.") and not k.startswith("encoder_q.fc.")
    }
    with open(out, "wb") as f:
        pickle.dump({"model": weights}, f, protocol=4)
        f.flush()
        os.fsync(f.fileno())
    return len(weights)


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", default="resnet50", choices=ARCHS, help="ResNet of the checkpoint")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        sys.exit("error: --rounds must be at least 1 and --warmup at least 0.")
    if args.threads:
        torch.set_num_threads(args.threads)

    times: dict[str, list[float]] = {"convert": [], "verify": [], "reference": []}
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        ckpt, encoder_q = write_checkpoint(args.arch, tmp)
        out, ref_out = os.path.join(tmp, "converted.pkl"), os.path.join(tmp, "reference.pkl")
        for i in range(args.warmup + args.rounds):
            t_ref, n_ref = _timed(lambda: reference(ckpt, ref_out))
            t_conv, report = _timed(lambda: convert(ckpt, out, force=True))
            t_ver, max_diff = _timed(lambda: verify_conversion(out, encoder_q))
            if i >= args.warmup:
                times["reference"].append(t_ref)
                times["convert"].append(t_conv)
                times["verify"].append(t_ver)
        if n_ref != report["num_tensors"]:
            sys.exit(
                f"error: the reference wrote {n_ref} tensors, convert {report['num_tensors']}."
            )
        ckpt_mb, out_mb = os.path.getsize(ckpt) / 2**20, os.path.getsize(out) / 2**20

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["convert"] / med["reference"]
    what = (
        f"{args.arch} SiMo checkpoint ({ckpt_mb:.0f} MiB) -> detectron2 .pkl ({out_mb:.0f} MiB, "
        f"{report['num_tensors']} tensors)"
    )
    overhead = [
        f"| convert, {what} | {med['reference']:.3f} s | {med['convert']:.3f} s | {ratio:.3f} |"
    ]
    seconds = [
        f"| convert (tools/convert.py without --verify) | {med['convert']:.3f} |",
        f"| verify (what --verify adds) | {med['verify']:.3f} |",
        (
            "| reference: torch.load(weights_only) + pickle.dump of the tensors as numpy "
            f"| {med['reference']:.3f} |"
        ),
    ]
    for line in overhead + seconds:
        print(line)
    print(
        f"checkpoint {ckpt_mb:.1f} MiB, output {out_mb:.1f} MiB, verify max abs diff {max_diff:.2e}"
    )

    def fmt(v: list[float]) -> str:
        return " ".join(f"{t:.3f}" for t in v)

    append_result(
        "convert_time",
        [(RATIO_HEADER, overhead), (("what", "s (median)"), seconds)],
        notes=[
            (
                f"median of {args.rounds} alternating rounds after {args.warmup} untimed; per "
                f"round convert {fmt(times['convert'])}, verify {fmt(times['verify'])}, "
                f"reference {fmt(times['reference'])}; ratio = convert / reference"
            ),
            (
                f"checkpoint {ckpt_mb:.1f} MiB (model: encoder_q, encoder_k; SGD momentum; meta), "
                f"output {out_mb:.1f} MiB; verify max abs diff {max_diff:.2e}"
            ),
        ],
    )


if __name__ == "__main__":
    main()
