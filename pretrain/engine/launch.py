"""Starting the processes of a job and setting each one up: detectron2's ``launch`` or torchrun,
device choice, OUTPUT_DIR with log.txt / config.yaml, per-rank seeding."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist
from detectron2.engine import launch
from detectron2.engine.defaults import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

__all__ = ["launch_from_args", "finish_distributed", "get_device", "setup_run"]


def launch_from_args(main: Callable[..., Any], args: Any, *main_args: Any) -> None:
    """Run ``main(*main_args)`` on every process of the job described by ``args``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is initialised
    from the environment (NCCL with CUDA, else gloo) and ``main`` runs in this process. Otherwise
    detectron2's ``launch`` spawns ``--num-gpus`` processes per machine (it picks gloo when CUDA is
    absent, so ``--num-gpus 2`` also runs two CPU processes).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
        comm.create_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        comm.synchronize()
        main(*main_args)
        return
    try:
        launch(
            _run_worker,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(main, *main_args),
        )
    except torch.multiprocessing.ProcessExitedException as e:
        if e.exit_code == 2:  # a worker already printed its one-sentence UserError
            raise SystemExit(2) from None
        raise


def _run_worker(main: Callable[..., Any], *main_args: Any) -> None:
    """Body of every launched process. A spawned worker (world size > 1) ends with ``os._exit(0)``
    after tearing gloo/NCCL down and flushing its output: the normal interpreter exit runs the C++
    static destructors of the process-group backend, which now and then abort a finished worker
    ("terminate called without an active exception", SIGABRT) and fail a completed run."""
    main(*main_args)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        finish_distributed()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def finish_distributed() -> None:
    """Wait for every process, then tear the process group down. Without it a process that exits
    first can close gloo's sockets under a peer still shutting down, which aborts (SIGABRT) it."""
    if dist.is_available() and dist.is_initialized():
        comm.synchronize()
        dist.destroy_process_group()


def get_device() -> torch.device:
    """This process's CUDA device (its local rank) or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", comm.get_local_rank() if dist.is_initialized() else 0)
    return torch.device("cpu")


class _LogFileOnly(logging.Filter):
    """Keeps ``default_setup``'s environment dump, command line and full config out of the
    terminal (they stay in log.txt)."""

    PREFIXES = (
        "Environment info:",
        "Command line arguments:",
        "Contents of args.config_file",
        "Running with full config:",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


def setup_run(cfg: Any, args: Any) -> None:
    """detectron2's ``default_setup``: OUTPUT_DIR, ``log.txt`` (rank 0; ``log.txt.rankN`` for the
    others), the environment and the full config in the log (not on the terminal),
    ``config.yaml``, and seeding every RNG with ``SEED + rank``; this package's loggers
    (``pretrain.*``) also go to the console and ``log.txt``."""
    # the logger default_setup configures (setup_logger is cached: same arguments, same logger)
    d2_logger = setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank())
    for handler in d2_logger.handlers:  # all StreamHandlers: the console's writes to stdout
        if getattr(handler, "stream", None) in (sys.stdout, sys.stderr):
            handler.addFilter(_LogFileOnly())
    default_setup(cfg, args)
    setup_logger(
        cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="pretrain", abbrev_name="pt"
    )
