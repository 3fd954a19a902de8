#!/usr/bin/env python
r"""Fine-tune and evaluate Faster R-CNN R50-FPN from converted weights (detectron2's train_net.py
shape).

    python tools/train_det.py --config configs/fpn_simo_1x.yaml --num-gpus 8 MODEL.WEIGHTS simo.pkl
    python tools/train_det.py --config-file configs/shapes_fpn_cpu.yaml --num-gpus 1 \
        MODEL.WEIGHTS w.pkl
    python tools/train_det.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_final.pth
    torchrun --nproc_per_node 8 tools/train_det.py --config configs/fpn_simo_1x.yaml ...

Processes are started as for pretraining (pretrain.engine.launch_from_args: detectron2's ``launch``,
or the torchrun environment); without GPUs ``--num-gpus N`` runs N gloo processes on the CPU, with
SyncBN as detectron2's NaiveSyncBatchNorm.
"""
import os
import sys

# `python tools/X.py` puts tools/ first on sys.path, where tools/pretrain.py would shadow the
# `pretrain` package: drop that entry (the package is installed / on the path).
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import logging  # noqa: E402

from transfer.config import launch_device, load_config, resolve_device_and_norm  # noqa: E402  (first: quiets d2)
from transfer.datasets import check_datasets, register_datasets  # noqa: E402
from transfer.trainer import (  # noqa: E402
    SafeDetectionCheckpointer,
    Trainer,
    check_weights,
    write_results,
)
from detectron2.engine import default_argument_parser  # noqa: E402
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from pretrain.engine import (  # noqa: E402
    finish_distributed,
    launch_from_args,
    prepare_output_dir,
    setup_run,
)
from pretrain.io import exit_on_user_error  # noqa: E402


def setup(args):
    cfg = load_config(args.config_file, args.opts)
    resolve_device_and_norm(cfg, comm.get_world_size())
    register_datasets(cfg)
    check_datasets(cfg)
    cfg.freeze()
    setup_run(cfg, args)  # detectron2's default_setup, environment dump in log.txt only
    prepare_output_dir(cfg.OUTPUT_DIR)  # as every run: every process must see the checkpoints
    return cfg


@exit_on_user_error  # also in each spawned worker process
def main(args):
    cfg = setup(args)
    Trainer.unsafe_weights = args.unsafe
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR, unsafe=args.unsafe)
        # with --resume, the last checkpoint of OUTPUT_DIR as the main process sees it
        last = checkpointer.last_checkpoint_of_main_process() if args.resume else None
        if last is None:
            provenance = check_weights(cfg, model, args.unsafe)
            checkpointer.load(cfg.MODEL.WEIGHTS, checkpointables=[])
        else:
            provenance = {"name": os.path.basename(cfg.OUTPUT_DIR.rstrip("/"))}
            checkpointer.load(last)
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


def run(args):
    """One process of the job: :func:`main`, then wait for the others and leave the group."""
    main(args)
    finish_distributed()


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
    logging.getLogger("detectron2").info("Command Line Args: %s", args)
    # read here for the launcher (CPU jobs run gloo processes that do not see the GPUs); each
    # process loads it again in setup()
    device = launch_device(load_config(args.config_file, args.opts))
    launch_from_args(run, args, args, device=device)


if __name__ == "__main__":
    cli()
