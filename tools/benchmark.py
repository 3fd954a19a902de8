#!/usr/bin/env python
"""Run the transfer benchmarks SSL backbones are compared on, from one converted backbone, into one
output folder (docs/usage.md, "Transfer benchmarks"), e.g.

    python tools/benchmark.py --weights output/simo_r50_200ep.pkl --suite voc,coco_fpn_1x \\
        --seeds 0 1 2 3 4 --num-gpus 8
    python tools/benchmark.py --weights output/simo_r50_200ep.pkl --suite all \\
        --submit "--nodes 1 --gpus-per-node 8 --partition learnfair --timeout-min 4320"
    python tools/benchmark.py --pretraining random_init --suite voc --size shapes \\
        --seeds 0 1 2 --out output/benchmarks/random_init

Benchmarks: voc (VOC07+12 Faster R-CNN R50-C4 24k, MoCo's protocol), coco_c4_1x / coco_c4_2x (COCO
Mask R-CNN R50-C4), coco_fpn_1x / coco_fpn_2x (COCO Mask R-CNN R50-FPN, SyncBN in backbone and
FPN), coco_fpn_4conv1fc_1x (the EqCo paper's Faster R-CNN). Each run is tools/train_det.py with
the pre-training's config (configs/<benchmark>_<pretraining>.yaml; --size shapes: the CPU-sized
config on the built-in shapes data), SEED k and OUTPUT_DIR <out>/<benchmark>/seed<k>. Running the
same command again skips finished runs and resumes the others. Trailing KEY VALUE pairs go to
every run. Then: python tools/report.py <pretraining dirs> <out> ... for the benchmark table.
"""

import argparse
import os
import sys

# `python tools/X.py` puts tools/ first on sys.path, where tools/pretrain.py would shadow the
# `pretrain` package: drop that entry (the packages are installed / on the path).
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from pretrain.io import exit_on_user_error  # noqa: E402
from transfer.benchmark import PRETRAININGS, SIZES, parse_suite, plan_runs, run_suite  # noqa: E402


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--weights", help="converted weights (tools/convert.py); default: the config's")
    p.add_argument(
        "--pretraining", choices=PRETRAININGS, default=None,
        help="which configs' conventions (default: simo with --weights, else random_init)",
    )
    p.add_argument("--suite", default="voc", help="comma-separated benchmarks, or all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per SEED")
    p.add_argument("--size", choices=SIZES, default="full", help="shapes: the CPU-sized configs")
    p.add_argument("--out", help="output folder (default: output/benchmarks/<weights name>)")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per run (local runs)")
    p.add_argument("--submit", metavar="ARGS", help="submit each run with tools/submit.py ARGS")
    p.add_argument("--keep-going", action="store_true", help="run the others after a failure")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    args = p.parse_args(argv)
    pretraining = args.pretraining or ("simo" if args.weights else "random_init")
    name = os.path.splitext(os.path.basename(args.weights))[0] if args.weights else pretraining
    out = args.out or os.path.join("output", "benchmarks", name)
    runs = plan_runs(
        parse_suite(args.suite), args.seeds, out, pretraining=pretraining, weights=args.weights,
        size=args.size, num_gpus=args.num_gpus, opts=args.opts,
    )  # fmt: skip
    outcome = run_suite(runs, submit=args.submit, keep_going=args.keep_going, dry_run=args.dry_run)
    ran = "submitted" if args.submit else "ran"
    print(
        f"{len(runs)} runs in {out}: {len(outcome['ran'])} {ran}, {len(outcome['skipped'])} "
        f"finished before, {len(outcome['failed'])} failed"
        + ("" if args.dry_run else f"; table: python tools/report.py {out} ...")
    )
    if outcome["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
