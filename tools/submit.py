#!/usr/bin/env python
"""Submit pretraining, linear evaluation or detection to SLURM through submitit (one task per
GPU; preempted or timed-out jobs are requeued with --resume), e.g.

    python tools/submit.py --tool pretrain --nodes 1 --gpus-per-node 8 --partition learnfair \\
        --timeout-min 4320 -- --config-file configs/pretrain/simo_r50_200ep.yaml \\
        DATASETS.ROOT /data/imagenet
    python tools/submit.py --tool lincls --nodes 1 --gpus-per-node 8 --partition P -- \\
        --config-file configs/lincls/r50_100ep.yaml MODEL.WEIGHTS output/.../model_final.pth
    python tools/submit.py --tool train_det --nodes 1 --gpus-per-node 8 --partition P -- \\
        --config configs/fpn_simo_1x.yaml MODEL.WEIGHTS simo.pkl
    python tools/submit.py --tool pretrain --cluster local --gpus-per-node 0 --tasks-per-node 2 \\
        --wait -- --config-file configs/pretrain/simo_shapes_cpu.yaml    # this machine, CPU

Everything after ``--`` is the tool's own command line, validated here (config, keys, paths)
before anything is queued; --num-gpus/--num-machines/--machine-rank/--dist-url are the job's
business. Any submitit SLURM parameter passes as --slurm-KEY VALUE (--slurm-constraint volta32gb,
--slurm-qos high, --slurm-account A, --slurm-exclusive True, ...). Logs and submitit's pickles go
to --job-dir (default OUTPUT_DIR/submitit); the run itself writes to its OUTPUT_DIR as always.
"""

import argparse
import os
import sys

# `python tools/submit.py` puts tools/ first on sys.path, where tools/pretrain.py would shadow the
# `pretrain` package: drop that entry (the package is installed / on the path).
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import pretrain  # noqa: E402, F401  (first: silences the dependencies' import-time warnings)
from pretrain.io import UserError, exit_on_user_error  # noqa: E402
from transfer.submit import (  # noqa: E402
    TOOLS,
    ToolJob,
    build_executor,
    check_world,
    describe,
    parse_tool_args,
    slurm_parameters,
    with_resume,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --tool {pretrain,lincls,train_det} [options] [--slurm-KEY VALUE ...] "
        "-- TOOL_ARGS",
    )
    p.add_argument("--tool", required=True, choices=tuple(TOOLS))
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="one task per GPU")
    p.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        help="default: --gpus-per-node (must equal it with GPUs); without GPUs, CPU processes",
    )
    p.add_argument("--cpus-per-task", type=int, default=10)
    p.add_argument("--mem-gb", type=int, default=None, help="per node (default: SLURM's)")
    p.add_argument("--partition", default=None)
    p.add_argument("--timeout-min", type=int, default=4320)
    p.add_argument(
        "--signal-delay-s",
        type=int,
        default=120,
        help="SLURM sends the requeue signal this long before the time limit",
    )
    p.add_argument(
        "--max-num-timeout", type=int, default=30, help="requeues after timeouts before giving up"
    )
    p.add_argument("--job-dir", default=None, help="submitit folder (default OUTPUT_DIR/submitit)")
    p.add_argument("--name", default=None, help="job name (default <tool>:<OUTPUT_DIR name>)")
    p.add_argument(
        "--cluster",
        default=None,
        choices=("slurm", "local", "debug"),
        help="default: SLURM if srun is here, else local",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="validate and print the job; submit nothing"
    )
    p.add_argument("--wait", action="store_true", help="wait for the job and print its results")
    return p


def parse(argv):
    """(submit options, --slurm-* pairs, tool argv)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv and not {"-h", "--help"} & set(argv):
        raise UserError("put the tool's own arguments after --, e.g. -- --config-file FILE.")
    i = argv.index("--") if "--" in argv else len(argv)
    own, tool_argv = argv[:i], argv[i + 1 :]
    args, rest = build_parser().parse_known_args(own)
    pairs, j = [], 0
    while j < len(rest):
        a = rest[j]
        if a.startswith("--slurm-") and "=" in a:
            key, value = a[len("--slurm-") :].split("=", 1)
            pairs.append((key, value))
            j += 1
        elif a.startswith("--slurm-") and j + 1 < len(rest):
            pairs.append((a[len("--slurm-") :], rest[j + 1]))
            j += 2
        else:
            raise UserError(
                f"{a}: unknown option; see tools/submit.py -h (tool arguments go after --)."
            )
    if args.tasks_per_node is None:
        args.tasks_per_node = max(args.gpus_per_node, 1)
    if args.gpus_per_node > 0 and args.tasks_per_node != args.gpus_per_node:
        raise UserError(
            f"--tasks-per-node {args.tasks_per_node} with --gpus-per-node {args.gpus_per_node}: "
            "one task per GPU; set them equal (or --gpus-per-node 0 for CPU processes)."
        )
    if min(args.nodes, args.tasks_per_node, args.timeout_min) < 1 or args.gpus_per_node < 0:
        raise UserError("--nodes, --tasks-per-node and --timeout-min must be >= 1.")
    return args, pairs, tool_argv


@exit_on_user_error
def main(argv=None):
    args, pairs, tool_argv = parse(argv)
    tool = parse_tool_args(args.tool, tool_argv)
    world = args.nodes * args.tasks_per_node
    check_world(args.tool, tool.cfg, world)
    job_dir = args.job_dir or os.path.join(tool.output_dir, "submitit")
    name = args.name or f"{args.tool}:{os.path.basename(os.path.normpath(tool.output_dir))}"
    job = ToolJob(
        args.tool,
        tool_argv,
        os.getcwd(),
        output_dir=tool.output_dir,
        tools_dir=os.path.dirname(os.path.abspath(__file__)),
    )
    executor = build_executor(
        job_dir,
        args.cluster,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        timeout_min=args.timeout_min,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        partition=args.partition,
        signal_delay_s=args.signal_delay_s,
        max_num_timeout=args.max_num_timeout,
        name=name,
        slurm=slurm_parameters(pairs),
    )
    command = f"tools/{TOOLS[args.tool][0]} {' '.join(tool_argv)}"
    if args.dry_run:
        print(f"would submit ({executor.cluster}, {world} processes): {command}")
        print(f"  on requeue: tools/{TOOLS[args.tool][0]} {' '.join(with_resume(tool_argv))}")
        print(f"  job folder: {executor.folder}")
        inner = getattr(executor, "_executor", executor)
        if executor.cluster == "slurm":
            print(inner._make_submission_file_text(inner._submitit_command_str, "dry-run"))
        else:
            print(f"  parameters: {inner.parameters}")
        return None
    submitted = executor.submit(job)
    print(describe(submitted, [command]), flush=True)
    if args.wait:
        results = submitted.results()[0]  # rank 0; raises with the task's error if one failed
        print(f"job {submitted.job_id} finished; results.json: {results}")
        return results
    return submitted


if __name__ == "__main__":
    main()
