"""SLURM (or local) submission of the training tools through submitit (tools/submit.py).

One submitit task per GPU runs the tool's own entry point (``tools/pretrain.py``'s ``main``,
``tools/lincls.py``'s ``main``, ``tools/train_det.py``'s ``cli``) with the tool's own arguments.
The process group comes from the job: submitit's ``JobEnvironment`` gives the hosts, ranks and
task counts, exported as ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``LOCAL_WORLD_SIZE``, which :func:`pretrain.engine.launch_from_args` reads as under torchrun (a
tool that launches with detectron2's ``launch`` instead gets the process group initialised here
first). On preemption or timeout submitit calls :meth:`ToolJob.checkpoint`, which requeues the same
job with ``--resume`` (never with ``--eval-only``, where ``--resume`` would change what is
evaluated): the run continues from the last checkpoint of its OUTPUT_DIR (DINO's
``run_with_submitit.py`` pattern).

Signals in a job: submitit handles its preemption signal (SLURM's ``--signal=USR2@<delay>``) and
only logs SIGTERM. While a tool's training loop runs, :class:`pretrain.engine.SignalCheckpointHook`
catches both first: on SIGUSR2 every task finishes its step and the run writes a checkpoint there,
then submitit's handler runs (rank 0 requeues with ``--resume`` and exits), so the requeued job
continues at that step, not at the last periodic checkpoint; on SIGTERM (``scancel``, a
pre-emption's first signal) the run writes the same checkpoint and exits with status 143, not
requeued. Outside the loop (set-up, final evaluation) submitit's handlers act alone.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pretrain.io import UserError

__all__ = [
    "TOOLS",
    "LAUNCH_FLAGS",
    "ToolJob",
    "ToolArgs",
    "parse_tool_args",
    "with_resume",
    "export_distributed_env",
    "build_executor",
    "slurm_parameters",
]

TOOLS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
# tool -> (file in tools/, entry point taking argv)
TOOLS: Dict[str, Tuple[str, str]] = {
    "pretrain": ("pretrain.py", "main"),
    "lincls": ("lincls.py", "main"),
    "train_det": ("train_det.py", "cli"),
}
# set by the job (nodes, tasks per node), not by the tool's arguments
LAUNCH_FLAGS = ("--num-gpus", "--num-machines", "--machine-rank", "--dist-url")


@dataclass
class ToolArgs:
    """What submission needs to know of a tool's arguments."""

    config_file: str
    opts: List[str]
    resume: bool
    eval_only: bool
    output_dir: str
    cfg: Any = field(repr=False, default=None)


def parse_tool_args(tool: str, argv: Sequence[str]) -> ToolArgs:
    """Parse (leniently: the tool parses again) and validate ``argv`` of ``tool`` as the tool
    will, loading its config: a bad key, value or path is one :class:`UserError` sentence here,
    before anything is queued. Launch flags (:data:`LAUNCH_FLAGS`) are refused."""
    if tool not in TOOLS:
        raise UserError(f"--tool {tool!r} is unknown; choose one of {tuple(TOOLS)}.")
    for flag in LAUNCH_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise UserError(
                f"{flag}: the job's processes come from --nodes and --gpus-per-node "
                "(one task per GPU); drop it from the tool's arguments."
            )
    from detectron2.engine import default_argument_parser

    parser = default_argument_parser()
    parser.add_argument("--config", dest="config_file")  # train_det's alias
    parser.add_argument("--cached-features", action="store_true")  # lincls
    parser.add_argument("--unsafe", action="store_true")
    parser.exit_on_error = False
    try:
        args, _unknown = parser.parse_known_args(list(argv))
    except (argparse.ArgumentError, SystemExit) as e:
        raise UserError(f"the {tool} arguments do not parse ({e}); see tools/{tool}.py -h.") from e
    opts = list(args.opts)
    for flag in ("--cached-features", "--unsafe") if tool == "lincls" else ():
        if flag in opts:  # the KEY VALUE list swallows flags after it; lincls takes these there
            opts.remove(flag)
            setattr(args, flag[2:].replace("-", "_"), True)
    if not args.config_file:
        raise UserError(f"the {tool} arguments need --config-file FILE.")
    cached = ["CACHED_FEATURES", "True"] if args.cached_features else []
    cfg = _load_cfg(tool, args.config_file, opts + cached)
    return ToolArgs(
        config_file=args.config_file,
        opts=opts,
        resume=bool(args.resume),
        eval_only=bool(args.eval_only),
        output_dir=cfg.OUTPUT_DIR,
        cfg=cfg,
    )


def _load_cfg(tool: str, config_file: str, opts: List[str]) -> Any:
    if tool == "pretrain":
        from pretrain.config import load_pretrain_cfg

        return load_pretrain_cfg(config_file, opts)
    if tool == "lincls":
        from pretrain.lincls import load_lincls_cfg

        return load_lincls_cfg(config_file, opts)
    from transfer.config import load_config
    from transfer.datasets import check_datasets, register_datasets

    cfg = load_config(config_file, opts)
    register_datasets(cfg)
    check_datasets(cfg)
    return cfg


def check_world(tool: str, cfg: Any, world: int) -> None:
    """Reject, before queueing, a job whose process count the config cannot use."""
    if tool == "pretrain":
        n, g = cfg.SOLVER.IMS_PER_BATCH, cfg.MODEL.SYNC_BN_GROUP_SIZE
        if n % world:
            raise UserError(
                f"SOLVER.IMS_PER_BATCH={n} is not divisible by the job's {world} processes; "
                "pick a multiple of it."
            )
        if g > 1 and world > 1 and world % g:
            raise UserError(
                f"MODEL.SYNC_BN_GROUP_SIZE={g}: the job's {world} processes do not split into "
                f"groups of {g}; use a divisor of {world} (0 = all processes)."
            )


def with_resume(argv: Sequence[str]) -> List[str]:
    """``argv`` with ``--resume`` (unless present, or ``--eval-only``, where ``--resume`` would
    evaluate OUTPUT_DIR's last checkpoint instead of MODEL.WEIGHTS)."""
    argv = list(argv)
    if "--resume" in argv or "--eval-only" in argv:
        return argv
    return ["--resume"] + argv


def export_distributed_env() -> Dict[str, str]:
    """Export the torch.distributed ``env://`` variables of this submitit task (hosts, ranks and
    counts from ``JobEnvironment``; the port from ``MASTER_PORT`` if set, else derived from the
    job id) and return them. Every GPU of a node stays visible: ``LOCAL_RANK`` picks one."""
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return {
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
    }


def _init_process_group_from_env() -> None:
    """What :func:`pretrain.engine.launch_from_args` does under torchrun, for a tool that does
    not read the environment itself (its detectron2 ``launch`` then runs in this process)."""
    from pretrain.engine.launch import init_from_environment, resolve_device

    init_from_environment(resolve_device("auto"))


def _load_tool(tool: str, tools_dir: str) -> Any:
    path = os.path.join(tools_dir, TOOLS[tool][0])
    spec = importlib.util.spec_from_file_location(f"_submitit_tool_{tool}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class ToolJob:
    """The submitted callable: one task of ``tools/<tool>.py argv`` in directory ``cwd``.

    Picklable (plain fields); submitit runs it in every task and, on preemption / timeout, calls
    :meth:`checkpoint` on global rank 0 and requeues what it returns."""

    tool: str
    argv: List[str]
    cwd: str
    output_dir: str = ""
    tools_dir: str = TOOLS_DIR

    def __call__(self) -> Optional[Dict[str, Any]]:
        os.chdir(self.cwd)  # relative DATASETS.ROOT / OUTPUT_DIR as at submission
        env = export_distributed_env()
        print(
            f"submitit task: tools/{TOOLS[self.tool][0]} {' '.join(self.argv)} "
            f"(rank {env['RANK']} of {env['WORLD_SIZE']}, local rank {env['LOCAL_RANK']}, "
            f"master {env['MASTER_ADDR']}:{env['MASTER_PORT']})",
            flush=True,
        )
        module = _load_tool(self.tool, self.tools_dir)
        if int(env["WORLD_SIZE"]) > 1 and not hasattr(module, "launch_from_args"):
            _init_process_group_from_env()
        try:
            getattr(module, TOOLS[self.tool][1])(list(self.argv))
        except SystemExit as e:
            # the tools' one-sentence errors (on this task's stderr) exit 2; any other exit
            # (submitit's requeue after a preemption signal) must go through untouched, without
            # waiting for the other processes (they are still training)
            if e.code != 2:
                raise
            raise RuntimeError(
                f"tools/{TOOLS[self.tool][0]} failed with exit status 2; its one-sentence error "
                "is the line starting with 'error:' in this task's stderr log."
            ) from None
        _finish_distributed()  # a tool that returns with the group alive (lincls, train_det)
        return self.results()

    def results(self) -> Optional[Dict[str, Any]]:
        """The run's results.json (``None`` if it has none, e.g. on ranks > 0 of a tool that
        returns before rank 0 wrote it)."""
        path = os.path.join(self.cwd, self.output_dir, "results.json")
        if not self.output_dir or not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on preemption / timeout (rank 0): the same job with ``--resume``.
        During training the run has just written a checkpoint at its current step (see the
        module's docstring); otherwise the state is its last checkpoint on disk."""
        from submitit.helpers import DelayedSubmission

        requeued = replace(self, argv=with_resume(self.argv))
        print(f"submitit: requeueing with {' '.join(requeued.argv)}", flush=True)
        return DelayedSubmission(requeued)


def _finish_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from pretrain.engine import finish_distributed

        finish_distributed()


def _literal(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def slurm_parameters(pairs: Sequence[Tuple[str, str]]) -> Dict[str, Any]:
    """``--slurm-KEY VALUE`` pairs -> submitit's ``slurm_key`` parameters (``-`` -> ``_``; values
    parsed as Python literals when they are one: ``--slurm-exclusive True``,
    ``--slurm-additional-parameters "{'reservation': 'x'}"``)."""
    return {"slurm_" + k.replace("-", "_"): _literal(v) for k, v in pairs}


def build_executor(
    job_dir: str,
    cluster: Optional[str],
    *,
    nodes: int,
    gpus_per_node: int,
    tasks_per_node: int,
    timeout_min: int,
    cpus_per_task: int,
    mem_gb: Optional[int] = None,
    partition: Optional[str] = None,
    signal_delay_s: int = 120,
    max_num_timeout: int = 30,
    name: str = "submitit",
    slurm: Optional[Dict[str, Any]] = None,
):
    """A submitit ``AutoExecutor`` (``cluster`` None = SLURM if available, else local) with one
    task per GPU; a bad ``slurm_*`` key is one :class:`UserError` sentence."""
    import submitit

    try:
        executor = submitit.AutoExecutor(
            folder=job_dir,
            cluster=cluster,
            slurm_max_num_timeout=max_num_timeout,
            local_max_num_timeout=max_num_timeout,
        )
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--cluster {cluster or 'auto'}: no such submitit executor here ({e}).")
    params: Dict[str, Any] = dict(
        name=name,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        tasks_per_node=tasks_per_node,
        cpus_per_task=cpus_per_task,
        timeout_min=timeout_min,
        slurm_signal_delay_s=signal_delay_s,
    )
    if mem_gb is not None:
        params["mem_gb"] = mem_gb
    if partition:
        params["slurm_partition"] = partition
    params.update(slurm or {})
    try:
        executor.update_parameters(**params)
    except (ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"submitit refused the job parameters: {msg}") from e
    return executor


def describe(job: Any, argv: Sequence[str]) -> str:
    """One line per fact of a submitted job, for the terminal."""
    paths = job.paths
    return "\n".join(
        [
            f"submitted job {job.job_id}: {' '.join(argv)}",
            f"  rank 0's logs: {paths.stdout} and {paths.stderr} (rank r: _r_log.*)",
            f"  job folder: {paths.folder}",
        ]
    )
