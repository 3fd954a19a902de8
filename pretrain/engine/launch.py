"""Starting the processes of a job and setting each one up: detectron2's ``launch`` or torchrun,
device choice, OUTPUT_DIR (its lock, log.txt / config.yaml), per-rank seeding, the check that
every process sees the same OUTPUT_DIR, and the end of a job: locks released, the process group
left also when a signal stopped the run."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
import uuid
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from detectron2.engine import launch
from detectron2.engine.defaults import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from pretrain.config import DEVICES
from pretrain.engine.hooks import STOP_SIGNALS, StoppedBySignal
from pretrain.engine.lock import lock_output_dir, release_output_dir_locks
from pretrain.io import UserError

__all__ = [
    "launch_from_args",
    "finish_distributed",
    "get_device",
    "resolve_device",
    "amp_dtype",
    "autocast_to",
    "local_rank_and_size",
    "init_from_environment",
    "environment",
    "setup_run",
    "set_tf32",
    "check_shared_output_dir",
    "end_stopped_run",
]


def launch_from_args(
    main: Callable[..., Any], args: Any, *main_args: Any, device: str = "auto"
) -> None:
    """Run ``main(*main_args)`` on every process of the job described by ``args``.

    ``device`` is the config's MODEL.DEVICE (auto | cuda | cpu, :func:`resolve_device`): a CPU job
    runs gloo processes that cannot see the GPUs, also on a GPU machine (so ``--num-gpus 2`` with
    MODEL.DEVICE cpu is two CPU processes, as in the tests), a CUDA job one NCCL process per GPU.

    Under ``torchrun`` (or ``srun`` / ``mpirun`` with ``WORLD_SIZE`` exported: ``WORLD_SIZE`` > 1 in
    the environment) the process group is initialised from the environment and ``main`` runs in
    this process, on the GPU of its local rank (:func:`local_rank_and_size`). Otherwise
    detectron2's ``launch`` spawns ``--num-gpus`` processes per machine.
    """
    kind = resolve_device(device)
    if _env_world_size() > 1 and not dist.is_initialized():
        init_from_environment(kind)
        try:
            main(*main_args)
        except StoppedBySignal as e:
            end_stopped_run(e)
        finally:
            release_output_dir_locks()
        return
    hide_gpus = kind == "cpu" and args.num_gpus * args.num_machines > 1
    try:
        # the spawned workers inherit the environment: without visible GPUs detectron2's
        # worker picks gloo and does not assert --num-gpus <= the GPU count
        with environment(CUDA_VISIBLE_DEVICES="" if hide_gpus else None):
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
        if e.exit_code in {128 + s for s in STOP_SIGNALS}:  # stopped by a signal, checkpointed
            raise SystemExit(e.exit_code) from None
        raise


@contextlib.contextmanager
def environment(**values: Optional[str]) -> Iterator[None]:
    """Set the environment variables of ``values`` that are not None, restore them after."""
    saved = {k: os.environ.get(k) for k, v in values.items() if v is not None}
    try:
        for k, v in values.items():
            if v is not None:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# where each launcher puts the rank, the local rank and the local world size; the job is the one
# WORLD_SIZE describes (torchrun, our submitit jobs; export it from SLURM_NTASKS under srun)
_RANK_NAMES = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
_LOCAL_RANK_NAMES = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")
_LOCAL_SIZE_NAMES = ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE")


def _env_int(name: str) -> Optional[int]:
    """``int`` of the environment variable ``name`` (SLURM writes e.g. ``8(x2)``), or None."""
    value = os.environ.get(name, "").split("(")[0].split(",")[0].strip()
    return int(value) if value.isdigit() else None


def _first_env_int(names: Tuple[str, ...]) -> Optional[int]:
    """The value of the first of ``names`` that is set (as :func:`_env_int`), or None."""
    values = [_env_int(name) for name in names]
    return next((v for v in values if v is not None), None)


def _env_world_size() -> int:
    return _env_int("WORLD_SIZE") or 1


def local_rank_and_size() -> Tuple[int, int, int, int]:
    """``(rank, world_size, local_rank, local_world_size)`` of a job started by torchrun, srun or
    mpirun with ``WORLD_SIZE`` set: each value from the first variable of torchrun's, SLURM's or
    Open MPI's names that is set. Without a local rank every process of a machine would take GPU
    0: that is one sentence. An unknown local world size is -1; :func:`init_from_environment`
    then counts the processes on each host."""
    world = _env_world_size()
    rank, local = _first_env_int(_RANK_NAMES), _first_env_int(_LOCAL_RANK_NAMES)
    if rank is None or local is None:
        missing = " / ".join(_RANK_NAMES if rank is None else _LOCAL_RANK_NAMES)
        raise UserError(
            f"WORLD_SIZE={world} is set but none of {missing} is: start the job with torchrun, "
            "srun or mpirun (they set the rank and local rank of every process), or unset "
            "WORLD_SIZE."
        )
    local_size = _first_env_int(_LOCAL_SIZE_NAMES)
    return rank, world, local, -1 if local_size is None else local_size


def _cuda_index(local_rank: int) -> int:
    """The GPU of local rank ``local_rank``: the local rank among all of a machine's GPUs, or
    the only visible one when the launcher gave each process its own (``CUDA_VISIBLE_DEVICES``
    per task, e.g. srun ``--gpus-per-task 1``)."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise UserError(
        f"local rank {local_rank} has no GPU of its own: this process sees {count} GPUs; start "
        "at most one process per GPU (e.g. torchrun --nproc_per_node <GPUs>)."
    )


def init_from_environment(kind: str) -> None:
    """Join the process group the environment describes: NCCL on this process's GPU (its local
    rank's, set before the group exists) for CUDA, gloo for the CPU; then detectron2's local
    process group, which ``comm.get_local_rank()`` reads."""
    rank, world, local, local_size = local_rank_and_size()
    if "MASTER_ADDR" not in os.environ:
        if local_size != world and _env_int("SLURM_NNODES") != 1:
            raise UserError(
                "MASTER_ADDR is not set: export MASTER_ADDR (the host of rank 0) and MASTER_PORT "
                "for a job of several machines (torchrun sets both)."
            )
        os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ.setdefault("MASTER_PORT", "29500")
    if kind == "cuda":
        torch.cuda.set_device(_cuda_index(local))
    dist.init_process_group(
        backend="nccl" if kind == "cuda" else "gloo",
        init_method="env://",
        rank=rank,
        world_size=world,
    )
    if local_size < 0:  # the launcher did not say: count the processes on this host
        hosts = comm.all_gather(socket.gethostname())
        local_size = hosts.count(hosts[rank])
        on_host = [r for r, h in enumerate(hosts) if h == hosts[rank]]
        if on_host != list(range(on_host[0], on_host[0] + local_size)):
            raise UserError(
                f"the ranks on {hosts[rank]} are {on_host}, not consecutive: set "
                "LOCAL_WORLD_SIZE, or start the job with torchrun / srun, which number the "
                "processes of a machine consecutively."
            )
    comm.create_local_process_group(local_size)
    if comm.get_local_rank() != local:
        raise UserError(
            f"process {rank}: the launcher says local rank {local}, but ranks are grouped "
            f"{local_size} per machine, which makes it {comm.get_local_rank()}; check "
            "LOCAL_WORLD_SIZE / SLURM_NTASKS_PER_NODE."
        )
    comm.synchronize()


def _run_worker(main: Callable[..., Any], *main_args: Any) -> None:
    """Body of every launched process. A spawned worker (world size > 1) ends with ``os._exit(0)``
    (128 + the signal after a stop on a signal, :func:`end_stopped_run`) after tearing gloo/NCCL
    down and flushing its output: the normal interpreter exit runs the C++ static destructors of
    the process-group backend, which now and then abort a finished worker ("terminate called
    without an active exception", SIGABRT) and fail a completed run. The OUTPUT_DIR lock
    :func:`setup_run` took is released however ``main`` ends."""
    # decided before ``main``, which may already have torn the process group down itself
    spawned = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    code = 0
    try:
        main(*main_args)
    except StoppedBySignal as e:
        if not spawned:
            end_stopped_run(e)  # raises: this process's exit
        # the checkpoint is written: the launcher's SIGTERM to the workers still running once
        # one has exited with 128 + signal must not cut this one's shutdown short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            end_stopped_run(e)
        except SystemExit as stop:  # the worker's exit status, after the shutdown below
            code = stop.code if isinstance(stop.code, int) else 1
    finally:
        release_output_dir_locks()
    if spawned:
        finish_distributed()  # nothing left to do if main already did it
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def end_stopped_run(stop: StoppedBySignal) -> None:
    """The end of a run that a signal stopped after its checkpoint (every process raised
    ``stop``, at the same step): leave the process group together, then exit with 128 + the
    signal, or raise what the handler installed before ours raised (submitit's requeue exit).
    The OUTPUT_DIR lock goes first: the checkpoint is on disk, the next run may start."""
    release_output_dir_locks()
    finish_distributed()
    if stop.chained is not None:
        raise stop.chained
    raise SystemExit(stop.code)


def finish_distributed() -> None:
    """Wait for every process, then tear the process group down. Without it a process that exits
    first can close gloo's sockets under a peer still shutting down, which aborts (SIGABRT) it."""
    if dist.is_available() and dist.is_initialized():
        comm.synchronize()
        dist.destroy_process_group()


def no_cuda_reason() -> str:
    """Why ``torch.cuda.is_available()`` is False, as far as can be told from here."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return "CUDA_VISIBLE_DEVICES is empty"
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU: no GPU, or "
        "an NVIDIA driver older than that CUDA needs (see nvidia-smi)"
    )


def resolve_device(name: str, key: str = "MODEL.DEVICE") -> str:
    """``"cuda"`` or ``"cpu"`` for the config value ``name`` (auto | cuda | cpu): auto is CUDA
    when a GPU is usable, else the CPU; cuda without a usable GPU is one sentence, never a silent
    CPU run."""
    if name not in DEVICES:
        raise UserError(f"{key} {name!r} is unknown; choose one of {DEVICES}.")
    if name == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if name == "auto":
        return "cpu"
    raise UserError(
        f"{key} cuda needs a usable CUDA GPU, but {no_cuda_reason()}; set {key} cpu to run on "
        "the CPU."
    )


def amp_dtype(cfg: Any, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``cfg.SOLVER.AMP`` (ENABLED, PRECISION) for a run on ``device``,
    None for float32; every stage's config has these keys and MODEL.DEVICE. Mixed precision is a
    GPU setting: on the CPU it runs only when MODEL.DEVICE says cpu explicitly (the CPU's
    autocast, how the tests reach it); ``auto`` that found no usable GPU is one sentence, not a
    silent change of numerics (pretraining, lincls, detection)."""
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    if device.type != "cuda" and cfg.MODEL.DEVICE != "cpu":
        raise UserError(
            f"SOLVER.AMP.ENABLED asks for mixed precision on a GPU, but {no_cuda_reason()}; set "
            "SOLVER.AMP.ENABLED False to run in float32 on the CPU (or MODEL.DEVICE cpu for the "
            "CPU's autocast)."
        )
    return getattr(torch, cfg.SOLVER.AMP.PRECISION)


def autocast_to(device: torch.device, dtype: Optional[torch.dtype]) -> torch.autocast:
    """Autocast to ``dtype`` (:func:`amp_dtype`) on ``device``'s type, or autocast off (float32)
    when ``dtype`` is None: a frozen backbone's precision outside the training step."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def get_device(name: str = "auto") -> torch.device:
    """This process's device for MODEL.DEVICE ``name`` (:func:`resolve_device`): the current CUDA
    device (the launcher set it to the local rank's GPU) or the CPU."""
    if resolve_device(name) == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def set_tf32(enabled: bool) -> None:
    """TensorFloat-32 for float32 matmuls and cuDNN convolutions (the TF32 config key); no effect
    without an Ampere or newer GPU."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


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
    """The lock of OUTPUT_DIR (:func:`pretrain.engine.lock.lock_output_dir`: a second run into
    it stops here, before anything is written, with one sentence naming the run that holds it;
    released when the launched job ends), then detectron2's ``default_setup``: OUTPUT_DIR,
    ``log.txt`` (rank 0; ``log.txt.rankN`` for the
    others), the environment and the full config in the log (not on the terminal),
    ``config.yaml``, and seeding every RNG with ``SEED + rank``; TF32 as the config says; this
    package's loggers (``pretrain.*``) also go to the console and ``log.txt``."""
    # first, before anything is written there: one live run per OUTPUT_DIR (collective)
    lock = lock_output_dir(cfg.OUTPUT_DIR)
    # the logger default_setup configures (setup_logger is cached: same arguments, same logger)
    d2_logger = setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank())
    for handler in d2_logger.handlers:  # all StreamHandlers: the console's writes to stdout
        if getattr(handler, "stream", None) in (sys.stdout, sys.stderr):
            handler.addFilter(_LogFileOnly())
    default_setup(cfg, args)
    set_tf32(cfg.TF32)
    setup_logger(
        cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="pretrain", abbrev_name="pt"
    )
    if lock is not None and lock.takeover:
        logging.getLogger("pretrain.engine.lock").warning(
            lock.takeover[0].upper() + lock.takeover[1:]
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
