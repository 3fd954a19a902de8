#!/usr/bin/env python
"""Self-supervised pretraining (SiMo / MoCo v2 / SimCLR-DCL / SimMoCo / SimCo), e.g.

    python tools/pretrain.py --config-file configs/pretrain/simo_shapes_cpu.yaml
    python tools/pretrain.py --config-file configs/pretrain/simo_r50_200ep.yaml --num-gpus 8 \\
        DATASETS.ROOT /data/imagenet
    python tools/pretrain.py --config-file ... --resume          # continue from OUTPUT_DIR
    torchrun --nproc_per_node 8 tools/pretrain.py --config-file ...
"""

import os
import sys

# `python tools/pretrain.py` puts tools/ first on sys.path, where this file would shadow the
# `pretrain` package it imports: drop that entry (the package is installed / on the path).
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import pretrain  # noqa: E402, F401  (first: silences the dependencies' import-time warnings)
from detectron2.engine import default_argument_parser  # noqa: E402

from pretrain.config import load_pretrain_cfg  # noqa: E402
from pretrain.engine import finish_distributed, launch_from_args, setup_run  # noqa: E402
from pretrain.io import exit_on_user_error  # noqa: E402
from pretrain.pretrainer import Pretrainer  # noqa: E402


@exit_on_user_error
def run(cfg, args) -> None:
    """One process of the job."""
    setup_run(cfg, args)
    Pretrainer(cfg).resume_or_load(resume=args.resume).train()
    finish_distributed()


@exit_on_user_error
def main(argv=None) -> None:
    args = default_argument_parser(epilog=__doc__).parse_args(argv)
    if args.eval_only:
        print(
            "error: --eval-only has no meaning for pretraining; run tools/lincls.py.",
            file=sys.stderr,
        )
        sys.exit(2)
    # validated here, before any process is spawned: a bad key or path costs nothing
    cfg = load_pretrain_cfg(args.config_file, args.opts)
    cfg.freeze()
    launch_from_args(run, args, cfg, args, device=cfg.MODEL.DEVICE)


if __name__ == "__main__":
    main()
