"""Real SIGKILLs of tools/pretrain.py (at random moments, and inside a checkpoint save), then
--resume: the run finishes with the iteration count and the weights of an uninterrupted run, and
no checkpoint on disk is ever corrupt."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from pretrain.io import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_ITER = 12

# Runs tools/pretrain.py with torch.save replaced by one that writes part of the file and then
# SIGKILLs its own process on the DIE_AT_SAVE-th call: a kill at the worst moment of a save.
_DIE_IN_SAVE = """
import os, runpy, signal, sys, torch
real_save, calls, die_at = torch.save, [0], int(os.environ["DIE_AT_SAVE"])
def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == die_at:
        f.write(b"PK\\x03\\x04 half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def cli_args(shapes_folder, tiny_pretrain_argv):
    """``cli_args(out)``: tools/pretrain.py --resume for MAX_ITER iterations, a checkpoint after
    each, the newest 2 kept."""
    root = shapes_folder(48, 16, 32)
    return lambda out: tiny_pretrain_argv(
        root, out, "SOLVER.MAX_ITER", MAX_ITER, "SOLVER.CHECKPOINT_PERIOD", 1,
        "SOLVER.MAX_TO_KEEP", 2,
    )  # fmt: skip


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **extra}


def _run_to_end(args):
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def _assert_consistent(out):
    """Every checkpoint on disk loads, and last_checkpoint names one of them."""
    names = sorted(
        f for f in os.listdir(out) if f.endswith(".pth") and not f.startswith(".tmp_")
    )
    for name in names:
        ckpt = load_checkpoint(os.path.join(out, name))  # raises on a truncated file
        assert {"model", "optimizer", "iteration", "meta"} <= set(ckpt), name
    last = out / "last_checkpoint"
    if last.exists():
        assert last.read_text() in names, (last.read_text(), names)
    return names


def _iterations_logged(out):
    path = out / "metrics.json"
    if not path.exists():
        return 0
    return len([line for line in path.read_text().splitlines() if line.strip()])


@pytest.mark.slow
def test_sigkill_at_random_moments_and_inside_a_save_then_resume(cli_args, tmp_path):
    _run_to_end(cli_args(tmp_path / "straight"))
    straight = load_checkpoint(str(tmp_path / "straight" / "model_final.pth"))

    out = tmp_path / "killed"
    args = cli_args(out)
    # 1) killed inside the 3rd save (the checkpoint after iteration 3), half a file on disk
    proc = subprocess.run(
        [sys.executable, "-c", _DIE_IN_SAVE, *args],
        capture_output=True,
        cwd=ROOT,
        env=_env(DIE_AT_SAVE="3"),
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    assert any(f.startswith(".tmp_") for f in os.listdir(out)), "no partial file was left"
    assert _assert_consistent(out) == ["model_0000000.pth", "model_0000001.pth"]

    # 2) killed at random moments once training has started, a few times, each resuming
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        before = _iterations_logged(out)
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 300
        while _iterations_logged(out) <= before and proc.poll() is None:
            assert time.monotonic() < deadline, "the resumed run did not make progress"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        _assert_consistent(out)
    assert kills >= 1

    # 3) the last resume finishes; partial files are gone; same run as without the kills
    _run_to_end(args)
    assert not [f for f in os.listdir(out) if f.startswith(".tmp_")]
    results = json.loads((out / "results.json").read_text())
    assert results["iterations"] == MAX_ITER
    final = load_checkpoint(str(out / "model_final.pth"))
    assert final["meta"]["iteration"] == MAX_ITER and final["iteration"] == MAX_ITER - 1
    for k, v in straight["model"].items():
        assert torch.equal(v, final["model"][k]), k
    log = (out / "log.txt").read_text()
    assert "Removed 1 partial file(s) of interrupted saves" in log
