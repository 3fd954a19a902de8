"""The transfer benchmark suite behind tools/benchmark.py: which config each benchmark runs for a
pre-training, and the runs of a suite (benchmark x seed) in one output folder, finished runs
skipped, unfinished ones resumed, run here or submitted to SLURM through tools/submit.py.

A benchmark is a detectron2 config family (docs/methods.md, "Transfer protocols"): the full-scale
leaf ``configs/<leaf>`` for a pre-training (``simo``, ``mocov2``, ``supervised``, ``random_init``)
and a CPU-sized version on the built-in shapes data (``--size shapes``). Every run is a plain
``tools/train_det.py`` run whose OUTPUT_DIR is ``<out>/<benchmark>/seed<k>`` and whose
``results.json`` carries ``"benchmark": <key>``, which is how tools/report.py builds its benchmark
table.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pretrain.io import UserError, read_json

__all__ = [
    "BENCHMARKS",
    "PRETRAININGS",
    "Benchmark",
    "BenchmarkRun",
    "config_path",
    "plan_runs",
    "run_suite",
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
TOOLS = os.path.join(ROOT, "tools")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its key (``--suite``, ``results.json``'s ``benchmark``), the report's column
    title, the full-scale leaf pattern (``{}`` = the pre-training) and its CPU-sized config on the
    shapes data, trained ``shapes_schedule`` times as long (2x schedules)."""

    key: str
    title: str
    leaf: str
    shapes: str
    shapes_schedule: int = 1
    masks: bool = False


BENCHMARKS: Dict[str, Benchmark] = {
    b.key: b
    for b in (
        Benchmark("voc", "VOC07+12 R50-C4", "voc_R_50_C4_24k_{}.yaml", "voc_C4_shapes_cpu.yaml"),
        Benchmark(
            "coco_c4_1x", "COCO Mask R-CNN R50-C4 1x", "coco_mask_R_50_C4_1x_{}.yaml",
            "coco_mask_C4_shapes_cpu.yaml", masks=True,
        ),
        Benchmark(
            "coco_c4_2x", "COCO Mask R-CNN R50-C4 2x", "coco_mask_R_50_C4_2x_{}.yaml",
            "coco_mask_C4_shapes_cpu.yaml", shapes_schedule=2, masks=True,
        ),
        Benchmark(
            "coco_fpn_1x", "COCO Mask R-CNN R50-FPN 1x", "coco_mask_R_50_FPN_1x_{}.yaml",
            "coco_mask_FPN_shapes_cpu.yaml", masks=True,
        ),
        Benchmark(
            "coco_fpn_2x", "COCO Mask R-CNN R50-FPN 2x", "coco_mask_R_50_FPN_2x_{}.yaml",
            "coco_mask_FPN_shapes_cpu.yaml", shapes_schedule=2, masks=True,
        ),
        Benchmark(
            "coco_fpn_4conv1fc_1x", "COCO Faster R-CNN R50-FPN 4conv1fc 1x (EqCo paper)",
            "fpn_{}_1x.yaml", "shapes_fpn_cpu.yaml",
        ),
    )
}  # fmt: skip
PRETRAININGS = ("simo", "mocov2", "supervised", "random_init")
SIZES = ("full", "shapes")


def parse_suite(text: str) -> List[Benchmark]:
    """``"voc,coco_c4_1x"`` (or ``"all"``) -> the benchmarks, in the given order."""
    keys = list(BENCHMARKS) if text.strip() == "all" else [k for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k.strip() not in BENCHMARKS]
    if unknown or not keys:
        raise UserError(
            f"--suite {text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; "
            f"give a comma-separated list of {', '.join(BENCHMARKS)} (or all)."
        )
    return [BENCHMARKS[k.strip()] for k in dict.fromkeys(keys)]


def config_path(bench: Benchmark, size: str, pretraining: str) -> str:
    """The config a run of ``bench`` uses: the pre-training's full-scale leaf, or the shapes
    config (one for every pre-training: only MODEL.WEIGHTS differs there)."""
    name = bench.shapes if size == "shapes" else bench.leaf.format(pretraining)
    path = os.path.join(CONFIGS, name)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such config for benchmark {bench.key!r} ({size} size).")
    return path


def _schedule_opts(bench: Benchmark, config: str, opts: Sequence[str]) -> List[str]:
    """At shapes size a 2x benchmark is its 1x config trained twice as long: MAX_ITER, STEPS and
    WARMUP_ITERS are not changed by the 1x -> 2x step in detectron2's model zoo, only MAX_ITER
    and STEPS are (x2)."""
    if bench.shapes_schedule == 1:
        return []
    from transfer.config import load_config  # detectron2's config stack; only needed here

    cfg = load_config(config, list(opts))
    k = bench.shapes_schedule
    steps = ",".join(str(k * s) for s in cfg.SOLVER.STEPS)
    return ["SOLVER.MAX_ITER", str(k * cfg.SOLVER.MAX_ITER), "SOLVER.STEPS", f"({steps},)"]


@dataclass
class BenchmarkRun:
    """One run of the suite: benchmark x seed, its OUTPUT_DIR and the train_det arguments."""

    bench: Benchmark
    seed: int
    output_dir: str
    args: List[str]

    def finished(self) -> bool:
        """True when OUTPUT_DIR holds this benchmark's detection results.json."""
        res = read_json(os.path.join(self.output_dir, "results.json"))
        return (
            isinstance(res, dict)
            and res.get("kind") == "detection"
            and res.get("benchmark") == self.bench.key
            and res.get("seed", self.seed) == self.seed
        )


def plan_runs(
    suite: Sequence[Benchmark],
    seeds: Sequence[int],
    out: str,
    *,
    pretraining: str,
    weights: Optional[str],
    size: str = "full",
    num_gpus: int = 1,
    opts: Sequence[str] = (),
) -> List[BenchmarkRun]:
    """The runs of ``suite`` x ``seeds`` in ``out``, in order (benchmark by benchmark)."""
    if pretraining not in PRETRAININGS:
        raise UserError(f"--pretraining {pretraining!r}: choose one of {', '.join(PRETRAININGS)}.")
    if size not in SIZES:
        raise UserError(f"--size {size!r}: choose one of {', '.join(SIZES)}.")
    if weights is not None and not os.path.isfile(weights):
        raise UserError(f"--weights {weights}: no such file; give the output of tools/convert.py.")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {' '.join(map(str, seeds))}: a seed is repeated.")
    common: List[str] = []
    if weights is not None:
        common += ["MODEL.WEIGHTS", weights]
    elif pretraining == "random_init":
        common += ["MODEL.WEIGHTS", ""]
    common += list(opts)
    runs = []
    for bench in suite:
        config = config_path(bench, size, pretraining)
        bench_opts = common + (_schedule_opts(bench, config, common) if size == "shapes" else [])
        for seed in seeds:
            output_dir = os.path.join(out, bench.key, f"seed{seed}")
            run_opts = bench_opts + ["SEED", str(seed), "BENCHMARK", bench.key, "OUTPUT_DIR",
                                     output_dir]  # fmt: skip
            args = ["--config-file", config, "--num-gpus", str(num_gpus), "--resume", *run_opts]
            runs.append(BenchmarkRun(bench, seed, output_dir, args))
    return runs


def _command(run: BenchmarkRun, submit: Optional[str]) -> List[str]:
    if submit is None:
        return [sys.executable, os.path.join(TOOLS, "train_det.py"), *run.args]
    # tools/submit.py sets the processes from the job: drop --num-gpus
    i = run.args.index("--num-gpus")
    tool_args = run.args[:i] + run.args[i + 2 :]
    return [
        sys.executable, os.path.join(TOOLS, "submit.py"), "--tool", "train_det",
        *shlex.split(submit), "--", *tool_args,
    ]  # fmt: skip


def run_suite(
    runs: Sequence[BenchmarkRun],
    *,
    submit: Optional[str] = None,
    keep_going: bool = False,
    dry_run: bool = False,
    log: Any = print,
) -> Dict[str, List[Tuple[str, int]]]:
    """Run (or submit) every unfinished run in order; returns ``{"skipped", "ran", "failed"}``
    lists of ``(output_dir, exit status)``. A failed run stops the suite (with ``keep_going``, the
    others still run) with one sentence naming its log."""
    outcome: Dict[str, List[Tuple[str, int]]] = {"skipped": [], "ran": [], "failed": []}
    for i, run in enumerate(runs, 1):
        where = f"[{i}/{len(runs)}] {run.bench.key} seed {run.seed} -> {run.output_dir}"
        if run.finished():
            log(f"{where}: finished before, skipped")
            outcome["skipped"].append((run.output_dir, 0))
            continue
        cmd = _command(run, submit)
        log(f"{where}: {'submitting' if submit else 'running'}\n  " + shlex.join(cmd))
        if dry_run:
            continue
        status = subprocess.call(cmd)
        if status == 0:
            outcome["ran"].append((run.output_dir, status))
            continue
        outcome["failed"].append((run.output_dir, status))
        logfile = os.path.join(run.output_dir, "log.txt")
        message = f"{where} failed (exit status {status}); its log is {logfile}."
        if not keep_going:
            raise UserError(message + " Fix it and run the same command again: finished runs "
                            "are skipped, this one resumes.")
        log(message)
    return outcome
