#!/usr/bin/env python
"""K-sweep: pretraining + linear evaluation (cached features) for every (loss, K, seed), e.g.

    python tools/make_shapes.py --out datasets/shapes \\
        --num-train-objects 2000 --num-val-objects 1000
    python tools/sweep.py --config-file configs/pretrain/sweep_mocov2_shapes_cpu.yaml \\
        --k 4 16 64 256 --loss infonce eqco --alpha 256 --seeds 0 1 2 --out output/sweep_mocov2

K is MoCo v2's queue length (LOSS.QUEUE_SIZE) or SiMo's in-batch negatives per query
(LOSS.NUM_NEGATIVES, K <= N - 1), by the config's MODEL.METHOD; InfoNCE at K = alpha is the EqCo
cell of that K (the same loss), run once. Other forms:
    python tools/sweep.py ... --out output/sweep SOLVER.EPOCHS 2      # KEY VALUE: pretraining cfg
    python tools/sweep.py ... --lincls-opt SOLVER.EPOCHS 50            # linear-eval cfg overrides
    python tools/sweep.py ... --eval-only      # only rewrite sweep.csv/md/png from finished runs
    python tools/sweep.py ... --no-baseline    # without the random-init baseline

Before the cells, a random-init baseline per seed: a randomly initialised MODEL.ARCH (torchvision's
init after torch.manual_seed(seed)) under the same linear evaluation, the reference the cells'
top-1 is read against. Re-running the same command skips finished cells and baselines (those with
lincls/results.json) and resumes an interrupted cell from its last checkpoint. Writes
OUT/sweep.csv, OUT/sweep.md and OUT/sweep.png; each cell's runs are in
OUT/cells/<loss>_k<K>_s<seed>/{pretrain,lincls}/, each baseline's in
OUT/baseline/random_init_s<seed>/{random_init.pth,lincls/}.
"""
import os
import re
import sys

_TOOLS = os.path.dirname(os.path.abspath(__file__))
# `python tools/sweep.py` puts tools/ first on sys.path, where tools/pretrain.py would shadow the
# `pretrain` package: drop that entry (the package is installed).
if sys.path and os.path.abspath(sys.path[0] or ".") == _TOOLS:
    sys.path.pop(0)

import pretrain  # noqa: E402, F401  (first: silences the dependencies' import-time warnings)
from detectron2.engine import default_argument_parser  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from pretrain.io import UserError, exit_on_user_error  # noqa: E402

# the experiment code beside this file (tools/experiments/, not installed): tools/ goes back on
# the path, last, now that the `pretrain` package is imported
if _TOOLS not in sys.path:
    sys.path.append(_TOOLS)
from experiments.ksweep_plan import SWEEP_LOSSES, plan_sweep  # noqa: E402
from experiments.ksweep_run import run_sweep  # noqa: E402


_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*$")


def _split_values(values, is_value):
    """argparse's nargs='+' also swallows the trailing KEY VALUE overrides: give them back."""
    for i, v in enumerate(values):
        if not is_value(v):
            return values[:i], values[i:]
    return values, []


def _is_int(v: str) -> bool:
    try:
        int(v)
        return True
    except ValueError:
        return False


@exit_on_user_error
def main(argv=None) -> None:
    parser = default_argument_parser(epilog=__doc__)
    parser.set_defaults(config_file="configs/pretrain/sweep_mocov2_shapes_cpu.yaml")
    parser.add_argument(
        "--k", nargs="+", default=["4", "16", "64", "256"], help="negatives per query (K)"
    )
    parser.add_argument("--loss", nargs="+", default=list(SWEEP_LOSSES), help="LOSS.NAME values")
    parser.add_argument("--alpha", type=float, default=256.0, help="EqCo alpha (eqco cells only)")
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2"], help="SEED values")
    parser.add_argument("--out", default="output/sweep", help="sweep directory (%(default)s)")
    parser.add_argument(
        "--lincls-config",
        default="configs/lincls/shapes_cpu.yaml",
        help="linear-eval config; MODEL.ARCH, INPUT.SIZE, DATASETS.ROOT, SEED come from the cell",
    )
    parser.add_argument(
        "--lincls-opt",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="a linear-eval config override (repeatable)",
    )
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the random-init baseline (a randomly initialised backbone, same linear eval)",
    )
    args = parser.parse_args(argv)
    # --eval-only here: rewrite the outputs from the finished runs, train nothing; the sweep
    # always resumes, so --resume changes nothing
    trailing = []
    ks, rest = _split_values(args.k, _is_int)
    trailing += rest
    losses, rest = _split_values(args.loss, lambda v: not _CONFIG_KEY.match(v))
    trailing += rest
    seeds, rest = _split_values(args.seeds, _is_int)
    trailing += rest
    if args.num_machines > 1:
        raise UserError("--num-machines: the sweep runs on one machine; use --num-gpus there.")
    setup_logger(name="pretrain")
    setup_logger(name="experiments")
    plan = plan_sweep(
        args.config_file,
        ks=[int(k) for k in ks],
        losses=losses,
        seeds=[int(s) for s in seeds],
        out=args.out,
        alpha=args.alpha,
        opts=trailing + list(args.opts),
        lincls_config=args.lincls_config,
        lincls_opts=[x for kv in args.lincls_opt for x in kv],
        launch_args=["--num-gpus", str(args.num_gpus)] if args.num_gpus > 1 else [],
        baseline=not args.no_baseline,
    )
    result = run_sweep(plan, train=not args.eval_only)
    print(
        f"K-sweep: ran {len(result['ran'])} cell(s)/baseline(s), skipped "
        f"{len(result['skipped'])} finished; "
        + ", ".join(result["files"].values())
    )


if __name__ == "__main__":
    main()
