#!/usr/bin/env python
"""Linear evaluation of a pretrained ResNet (MoCo protocol: frozen backbone in eval mode, one fc,
SGD lr 30, 100 epochs, drops at 60/80), e.g.

    python tools/lincls.py --config-file configs/lincls/r50_100ep.yaml --num-gpus 8 \\
        MODEL.WEIGHTS output/pretrain/simo_r50_200ep/model_final.pth DATASETS.ROOT /data/imagenet
    python tools/lincls.py --config-file configs/lincls/shapes_cpu.yaml --cached-features \\
        MODEL.WEIGHTS output/pretrain/simo_shapes_cpu/model_final.pth
    python tools/lincls.py --config-file ... --resume            # continue from OUTPUT_DIR
    python tools/lincls.py --config-file ... --eval-only MODEL.WEIGHTS <linear-eval checkpoint>

MODEL.WEIGHTS may be our pretraining checkpoint, an official MoCo checkpoint or a torchvision state
dict. --cached-features trains the fc on features of center crops extracted once: fast, but NOT the
paper protocol (no augmentation). configs/lincls/shapes_cpu.yaml (the demo) and r50_100ep_bn.yaml
put a BatchNorm before the fc with lr 0.1 x batch / 256 (MODEL.HEAD_BN, MAE's probe; not MoCo's
protocol).
"""
import os
import sys

# `python tools/lincls.py` puts tools/ first on sys.path, where tools/pretrain.py would shadow the
# `pretrain` package: drop that entry (the package is installed / on the path).
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from detectron2.engine import default_argument_parser  # noqa: E402

from pretrain.engine import launch_from_args, setup_run  # noqa: E402
from pretrain.io import UserError, exit_on_user_error  # noqa: E402
from pretrain.lincls import (  # noqa: E402
    LinearEvaluator,
    evaluate_weights,
    load_lincls_cfg,
    load_pretrained,
)


def weights_path(cfg, args) -> str:
    """MODEL.WEIGHTS, or with ``--eval-only --resume`` the last checkpoint of OUTPUT_DIR
    (detectron2's meaning of the pair)."""
    if not (args.eval_only and args.resume):
        return cfg.MODEL.WEIGHTS
    last = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
    if not os.path.isfile(last):
        raise UserError(f"{last}: not found; --eval-only --resume needs a finished run.")
    with open(last) as f:
        return os.path.join(cfg.OUTPUT_DIR, f.read().strip())


@exit_on_user_error
def run(cfg, args) -> None:
    """One process of the job."""
    setup_run(cfg, args)
    if args.eval_only:
        evaluate_weights(cfg, weights_path(cfg, args), unsafe=args.unsafe)
    else:
        LinearEvaluator(cfg, unsafe=args.unsafe).resume_or_load(resume=args.resume).train()


@exit_on_user_error
def main(argv=None) -> None:
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument(
        "--cached-features",
        action="store_true",
        help="extract features once (center crops) and train the fc on them: fast, NOT the paper "
        "protocol (sets CACHED_FEATURES True)",
    )
    parser.add_argument(
        "--unsafe",
        action="store_true",
        help="allow MODEL.WEIGHTS files that need code execution to load (only files you trust)",
    )
    args = parser.parse_args(argv)
    # the trailing KEY VALUE list swallows everything after it; accept our flags there too
    for flag in ("--cached-features", "--unsafe"):
        if flag in args.opts:
            args.opts.remove(flag)
            setattr(args, flag[2:].replace("-", "_"), True)
    opts = list(args.opts) + (["CACHED_FEATURES", "True"] if args.cached_features else [])
    # validated here, before any process is spawned: a bad key, path or checkpoint costs nothing
    # and gives one sentence instead of a failure in every spawned process
    cfg = load_lincls_cfg(args.config_file, opts)
    cfg.freeze()
    load_pretrained(weights_path(cfg, args), cfg.MODEL.ARCH, unsafe=args.unsafe)
    launch_from_args(run, args, cfg, args, device=cfg.MODEL.DEVICE)


if __name__ == "__main__":
    main()
