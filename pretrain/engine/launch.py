"""Starting the processes of a job and setting each one up: detectron2's ``launch`` or torchrun,
device choice, OUTPUT_DIR with log.txt / config.yaml, per-rank seeding, and the check that every
process sees the same OUTPUT_DIR."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from detectron2.engine import launch
from detectron2.engine.defaults import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from pretrain.io import UserError

__all__ = [
    "launch_from_args",
    "finish_distributed",
    "get_device",
    "setup_run",
    "check_shared_output_dir",
]


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
    # decided before ``main``, which may already have torn the process group down itself
    spawned = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    main(*main_args)
    if spawned:
        finish_distributed()  # nothing left to do if main already did it
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


def _sees(path: str, token: str, wait_s: float) -> bool:
    """True once ``path`` holds ``token``, polling for up to ``wait_s`` seconds (a network file
    system may show a new file to other machines a moment later)."""
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(OSError):
            with open(path) as f:
                if f.read() == token:
                    return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def check_shared_output_dir(output_dir: str, *, wait_s: float = 2.0) -> None:
    """Make sure every process of the job sees the OUTPUT_DIR of process 0 (collective; nothing
    to do on a single process).

    Checkpoints are written by process 0 only and ``--resume`` is decided by process 0, so a job
    whose machines each have their own OUTPUT_DIR (node-local disks) would train on from different
    states, or wait forever in mismatched collectives. Process 0 writes a file with a random name
    and content into ``output_dir``; after a collective every process looks for it (for up to
    ``wait_s`` seconds); the answers are all-gathered, so that every process raises the same
    one-sentence :class:`UserError` instead of one of them hanging.
    """
    if comm.get_world_size() == 1:
        return
    token: Optional[str] = None
    error: Optional[str] = None
    if comm.is_main_process():
        token = f".shared_output_dir_{uuid.uuid4().hex}"
        try:
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, token), "w") as f:
                f.write(token)
        except OSError as e:
            error = f"{type(e).__name__}: {e.strerror or e}"
    # every process waits here until process 0 has written (or failed to write) the file
    main_dir, token, error = comm.all_gather((output_dir, token, error))[0]
    seen = error is None and _sees(os.path.join(output_dir, token), token, wait_s)
    views = comm.all_gather((seen, socket.gethostname()))
    if comm.is_main_process() and error is None:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(output_dir, token))
    if error is not None:
        raise UserError(f"cannot write to OUTPUT_DIR {main_dir} ({error}); check the path.")
    blind = [f"{rank} (on {host})" for rank, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise UserError(
            f"OUTPUT_DIR {main_dir} is not shared by all processes: process(es) "
            f"{', '.join(blind)} do not see the file that process 0 (on {views[0][1]}) wrote "
            "there; put OUTPUT_DIR on a file system that every machine mounts at the same path "
            "(checkpoints and --resume need it)."
        )
