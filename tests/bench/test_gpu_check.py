"""bench/gpu_check.py, run as the maintainer runs it (a subprocess): without CUDA it refuses in one
sentence (exit 2); ``--cpu`` runs every stage on the CPU and prints one parseable JSON line per
check; a failing check is contained (ok false, one-line error, the others still run, exit 1); and
``--cpu --cpu-ddp`` runs the two-process check with gloo."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")
CHECKS = [
    "losses_cuda_vs_cpu",
    "bf16_channels_last_vs_fp32",
    "simo_r50_throughput",
    "det_r50_fpn_step",
    "lincls",
    "convert_verify_cuda",
    "ddp_nccl",
]


def _run(*args):
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT, timeout=900
    )


def _lines(proc):
    """Every stdout line as JSON (each must parse), by name."""
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    return lines, {line["name"]: line for line in lines}


def test_without_cuda_it_is_one_sentence_and_exit_2():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is usable here: the script runs its checks instead of refusing")
    proc = _run()
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # nothing else
    assert re.fullmatch(
        r"bench/gpu_check\.py needs a CUDA GPU: .+; run it with --cpu to exercise its stages on "
        r"the CPU",
        proc.stderr.strip(),
    )


@pytest.mark.slow
def test_cpu_dry_run_exercises_every_stage(tmp_path):
    """~1.5-2 min here (every stage: 6 short pretraining runs, a detector, a linear eval, a
    conversion subprocess)."""
    out = tmp_path / "lines.jsonl"
    proc = _run("--cpu", "--out", str(out), "--work-dir", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines, by_name = _lines(proc)
    assert [line["name"] for line in lines] == CHECKS + ["summary"]
    assert out.read_text().splitlines() == proc.stdout.splitlines()
    for line in lines[:-1]:
        assert line["seconds"] >= 0 and "error" not in line, line

    for name in ("losses_cuda_vs_cpu", "bf16_channels_last_vs_fp32", "lincls"):
        assert by_name[name]["ok"] is True, by_name[name]
    assert by_name["convert_verify_cuda"]["ok"] is True
    losses = by_name["losses_cuda_vs_cpu"]
    for method in ("simo/eqco", "mocov2/infonce", "simclr/dcl"):
        run = losses[method]
        assert len(run["losses_cpu"]) == 3 and run["losses_cpu"] == run["losses_cpu_rerun"]
        assert run["trainer"] == "SimpleTrainer" and run["init_identical"] is True
    amp = by_name["bf16_channels_last_vs_fp32"]["test_amp_setting"]
    assert amp["loss_rel_diff"] < 0.05 and amp["grad_cosine"] > 0.8
    assert by_name["convert_verify_cuda"]["max_abs_diff"] <= 1e-4
    assert math.isfinite(by_name["lincls"]["top1"])

    throughput = by_name["simo_r50_throughput"]
    assert throughput["ok"] is None and "2500" in throughput["target"]
    assert throughput["images_per_s"] > 0 and throughput["images_per_s_fixed_batch"] > 0
    # the R50 recipe's bf16 + channels_last through the device-generic AMP trainer
    assert throughput["trainer"] == "DeviceAMPTrainer" and throughput["precision"] == "bfloat16"
    det = by_name["det_r50_fpn_step"]
    assert det["ok"] is None and det["s_per_iter"] > 0 and "0.2" in det["target"]
    ddp = by_name["ddp_nccl"]
    assert ddp["ok"] is None and ddp["skipped"].startswith("skipped:")

    summary = by_name["summary"]
    assert summary["ok"] is True and summary["failed"] == []
    assert summary["no_verdict"] == ["simo_r50_throughput", "det_r50_fpn_step", "ddp_nccl"]


def test_a_failing_check_is_contained(tmp_path):
    """check 3 on an ImageFolder without images fails with one line; lincls still runs (from a
    random ResNet-18, as check 1 did not run) and the exit status is 1."""
    (tmp_path / "empty" / "train").mkdir(parents=True)
    proc = _run(
        "--cpu", "--only", "simo_r50_throughput,lincls", "--data", str(tmp_path / "empty")
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    lines, by_name = _lines(proc)
    assert [line["name"] for line in lines] == ["simo_r50_throughput", "lincls", "summary"]
    failed = by_name["simo_r50_throughput"]
    assert failed["ok"] is False and "\n" not in failed["error"] and failed["error"]
    assert by_name["lincls"]["ok"] is True
    assert by_name["lincls"]["weights"] == "random torchvision ResNet-18"
    assert by_name["summary"]["failed"] == ["simo_r50_throughput"]
    assert by_name["summary"]["ok"] is False


@pytest.mark.slow
def test_two_process_check_with_gloo():
    """Check 7's code with 2 gloo CPU processes (on a GPU machine the same code runs NCCL)."""
    proc = _run("--cpu", "--cpu-ddp", "--only", "ddp_nccl")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    _, by_name = _lines(proc)
    ddp = by_name["ddp_nccl"]
    assert ddp["ok"] is True and ddp["backend"] == "gloo"
    for method in ("simo/eqco", "simclr/dcl"):
        assert ddp[method]["same_tensors"] and ddp[method]["loss_rel_diff"] < 1e-8
        assert ddp[method]["grad_max_rel_diff"] < 1e-8
        assert ddp[method]["running_mean_max_rel_diff"] < 1e-8
    assert ddp["moco_shuffle_bn_eval_max_diff"] < 1e-10
    assert ddp["moco_shuffle_bn_train_min_diff"] > 1e-3
