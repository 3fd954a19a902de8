#!/usr/bin/env python
r"""Fine-tune and evaluate Faster R-CNN R50-FPN from converted weights (detectron2's train_net.py
shape).

    python tools/train_det.py --config configs/fpn_simo_1x.yaml --num-gpus 8 MODEL.WEIGHTS simo.pkl
    python tools/train_det.py --config-file configs/shapes_fpn_cpu.yaml --num-gpus 1 \
        MODEL.WEIGHTS w.pkl
    python tools/train_det.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_final.pth
"""
import os
import sys

# `python tools/X.py` puts tools/ first on sys.path, where tools/pretrain.py would shadow the
# `pretrain` package: drop that entry (the package is installed / on the path).
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import logging  # noqa: E402

import torch  # noqa: E402

from transfer.config import load_config, resolve_device_and_norm  # noqa: E402  (first: quiets d2)
from transfer.datasets import check_datasets, register_datasets  # noqa: E402
from transfer.trainer import (  # noqa: E402
    SafeDetectionCheckpointer,
    Trainer,
    check_weights,
    write_results,
)
from detectron2.engine import default_argument_parser, launch  # noqa: E402
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from pretrain.engine import setup_run  # noqa: E402
from pretrain.io import UserError, exit_on_user_error  # noqa: E402


def setup(args):
    cfg = load_config(args.config_file, args.opts)
    resolve_device_and_norm(cfg, comm.get_world_size())
    register_datasets(cfg)
    check_datasets(cfg)
    cfg.freeze()
    setup_run(cfg, args)  # detectron2's default_setup, environment dump in log.txt only
    return cfg


@exit_on_user_error  # also in each spawned worker process
def main(args):
    cfg = setup(args)
    Trainer.unsafe_weights = args.unsafe
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR, unsafe=args.unsafe)
        if not (args.resume and checkpointer.has_checkpoint()):
            provenance = check_weights(cfg, model, args.unsafe)
        else:
            provenance = {"name": os.path.basename(cfg.OUTPUT_DIR.rstrip("/"))}
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        write_results(cfg, results, provenance, iteration=-1)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results

    trainer = Trainer(cfg)
    provenance = check_weights(cfg, trainer.model, args.unsafe)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    results = getattr(trainer, "_last_eval_results", None)
    if results is None:  # every rank runs the final evaluation in EvalHook; rank 0 keeps it
        results = {}
    write_results(cfg, results, provenance, iteration=trainer.iter)
    return results


@exit_on_user_error
def cli(argv=None):
    parser = default_argument_parser()
    parser.add_argument(
        "--config", dest="config_file", metavar="FILE", help="alias of --config-file"
    )
    parser.add_argument(
        "--unsafe",
        action="store_true",
        help="allow MODEL.WEIGHTS files that need code execution to load",
    )
    args = parser.parse_args(argv)
    if args.num_gpus * args.num_machines > 1 and not torch.cuda.is_available():
        raise UserError(
            f"--num-gpus {args.num_gpus}: no GPU here; on CPU run detection with --num-gpus 1."
        )
    logging.getLogger("detectron2").info("Command Line Args: %s", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    cli()
