"""Real signals to real training processes: SIGTERM / SIGINT / SIGUSR1 make a run write a
checkpoint at the end of its step (named like the periodic ones) and exit with 128 + the signal;
``--resume`` then continues exactly there (bit-identical weights). A second signal during the save
changes nothing; with two gloo processes one of them receiving the signal is enough (both stop at
the same step); a handler installed before ours (submitit's requeue) runs after the checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from detectron2.config import CfgNode
from detectron2.solver import LRMultiplier
from detectron2.utils import comm

from pretrain.engine import (
    AtomicCheckpointer,
    RNGStates,
    StoppedBySignal,
    TrainingRun,
    build_lr_multiplier,
    create_ddp_model,
)
from pretrain.io import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 180  # a hang fails the test instead of blocking the suite

# ---------------------------------------------------------------------------- the CLI, 1 process
CLI_ITERS = 8
PAUSE_AT = 3
# tools/pretrain.py, except that (1) after iteration PAUSE_AT's progress hook it writes READY and
# waits for GO (the test sends its signal in between: the stop step is known), and (2) its first
# torch.save (the stop checkpoint: no periodic one is due) sends the process a second SIGTERM
# before writing.
_PAUSED_CLI = """
import os, runpy, signal, sys, time, torch
import pretrain.engine.hooks as hooks
progress_after_step, real_save, saves = hooks.ProgressHook.after_step, torch.save, [0]
def after_step(self):
    progress_after_step(self)
    if self.trainer.iter == int(os.environ["PAUSE_AT"]):
        open(os.environ["READY"], "w").close()
        while not os.path.exists(os.environ["GO"]):
            time.sleep(0.01)
def save(obj, f, *args, **kwargs):
    saves[0] += 1
    if saves[0] == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_save(obj, f, *args, **kwargs)
hooks.ProgressHook.after_step, torch.save = after_step, save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **extra}


def _wait_for(path, proc):
    deadline = time.monotonic() + TIMEOUT_S
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def cli_runs(shapes_folder, tiny_pretrain_argv, tmp_path_factory):
    """An uninterrupted run, and a run sent SIGTERM during iteration PAUSE_AT (and a second one
    inside its checkpoint save), then resumed to the end; both started at once. CLI_ITERS
    iterations, no periodic checkpoint."""
    root = shapes_folder(48, 16, 32)

    def cli_args(out):
        return tiny_pretrain_argv(
            root, out, "SOLVER.MAX_ITER", CLI_ITERS, "SOLVER.CHECKPOINT_PERIOD", 1000
        )

    tmp = tmp_path_factory.mktemp("signals_cli")
    straight = subprocess.Popen(
        [sys.executable, *cli_args(tmp / "straight")],
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out = tmp / "stopped"
    ready, go = tmp / "ready", tmp / "go"
    proc = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_CLI, *cli_args(out)],
        cwd=ROOT,
        env=_env(PAUSE_AT=str(PAUSE_AT), READY=str(ready), GO=str(go)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(ready, proc)
    proc.send_signal(signal.SIGTERM)
    go.touch()
    stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    stopped = {
        "returncode": proc.returncode,
        "output": stdout + stderr,
        "files": sorted(os.listdir(out)),
        "last_checkpoint": (out / "last_checkpoint").read_text(),
        "checkpoint": load_checkpoint(str(out / f"model_{PAUSE_AT:07d}.pth")),
    }
    resumed = subprocess.run(
        [sys.executable, *cli_args(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert straight.wait(timeout=TIMEOUT_S) == 0, straight.stderr.read()[-4000:]
    return {
        "stopped": stopped,
        "resumed_log": (out / "log.txt").read_text(),
        "final": load_checkpoint(str(out / "model_final.pth")),
        "straight": load_checkpoint(str(tmp / "straight" / "model_final.pth")),
        "out": out,
    }


def test_sigterm_writes_a_checkpoint_at_the_step_and_exits_143(cli_runs):
    stopped, out = cli_runs["stopped"], cli_runs["out"]
    assert stopped["returncode"] == 128 + signal.SIGTERM, stopped["output"][-4000:]
    name = f"model_{PAUSE_AT:07d}.pth"
    message = (
        f"Stopped by SIGTERM at iteration {PAUSE_AT}; checkpoint {out / name} written; rerun "
        "with --resume to continue."
    )
    assert message in stopped["output"]
    # named like a periodic checkpoint, the only one (none was due), complete although a second
    # SIGTERM came during its save; no partial file, and the OUTPUT_DIR lock was released
    assert [f for f in stopped["files"] if f.endswith(".pth")] == [name]
    assert stopped["last_checkpoint"] == name
    assert stopped["checkpoint"]["iteration"] == PAUSE_AT
    assert stopped["checkpoint"]["meta"]["iteration"] == PAUSE_AT + 1
    assert not [f for f in stopped["files"] if f.startswith(".tmp_") or f == "run.lock"]
    assert "Traceback" not in stopped["output"]


def test_resume_after_sigterm_is_bit_identical(cli_runs):
    assert f"Resumed at iteration {PAUSE_AT + 1} " in cli_runs["resumed_log"]
    final, straight = cli_runs["final"], cli_runs["straight"]
    assert final["iteration"] == straight["iteration"] == CLI_ITERS - 1
    assert final["model"].keys() == straight["model"].keys()
    for k, v in straight["model"].items():
        assert torch.equal(v, final["model"][k]), k


# ------------------------------------------------------------------- the engine, gloo processes
ITERS = 12


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 1)

    def forward(self, batch):
        x, y = batch
        return {"loss": ((self.fc(x) - y) ** 2).mean()}


class _Loader:
    """Batch i of process r is drawn from a generator seeded by (r, i): resumable from the step
    count (the same on every process), which the checkpoint holds. With ``pause``, every process
    writes ``ready.<rank>`` before fetching batch ``pause_at`` and waits for ``go``."""

    def __init__(self, rank: int, pause: str = "", pause_at: int = -1) -> None:
        self.rank, self.step, self.pause, self.pause_at = rank, 0, pause, pause_at

    def __iter__(self):
        while True:
            if self.pause and self.step == self.pause_at:
                open(os.path.join(self.pause, f"ready.{self.rank}"), "w").close()
                while not os.path.exists(os.path.join(self.pause, "go")):
                    time.sleep(0.01)
            g = torch.Generator().manual_seed(1000 * self.rank + self.step)
            self.step += 1
            yield torch.randn(2, 4, generator=g), torch.randn(2, 1, generator=g)

    def epochs_done(self) -> float:
        return 0.0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state["step"])


class _TinyRun(TrainingRun):
    """A linear layer under DDP with the engine's hooks and checkpointer (RNG states gathered)."""

    stage = "tiny"

    def __init__(self, out: str, pause: str = "", pause_at: int = -1) -> None:
        super().__init__(
            CfgNode(
                {
                    "OUTPUT_DIR": out,
                    "LOG_PERIOD": 1,
                    "MODEL": {"DEVICE": "cpu"},
                    "SOLVER": {"MAX_TO_KEEP": 0, "IMS_PER_BATCH": 4, "CHECKPOINT_PERIOD": 1000},
                }
            )
        )
        torch.manual_seed(0)
        self.net = _Net()
        self.loader = _Loader(comm.get_rank(), pause, pause_at)
        self.max_iter = ITERS
        opt = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)
        self.build_trainer(create_ddp_model(self.net, device_ids=None), opt)
        self.scheduler = LRMultiplier(opt, build_lr_multiplier(ITERS, 0), ITERS)
        self.checkpointer = AtomicCheckpointer(
            self.net, out, optimizer=opt, scheduler=self.scheduler, loader=self.loader,
            rng=RNGStates(),
        )  # fmt: skip
        self.register_hooks()

    def build_hooks(self):
        return self.loop_hooks(self.scheduler, self.cfg.SOLVER.CHECKPOINT_PERIOD)


def _worker(rank, world, out, init_file, result_dir, pause, pause_at, previous_handler):
    torch.set_num_threads(1)
    with open(os.path.join(result_dir, f"pid.{rank}"), "w") as f:
        f.write(str(os.getpid()))
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
        )
    calls = []
    if previous_handler:  # as submitit installs for its preemption signal (SIGUSR2)

        def requeue(signum, frame):
            calls.append(os.path.exists(os.path.join(out, f"model_{pause_at:07d}.pth")))
            raise SystemExit(-1)

        signal.signal(signal.SIGUSR2, requeue)
    run = _TinyRun(out, pause, pause_at).resume_or_load(resume=True)
    result = {"start_iter": run.start_iter, "stopped": None}
    try:
        run.run_loop()
    except StoppedBySignal as e:
        result.update(
            stopped=e.code,
            message=e.message,
            iteration=run.trainer.iter,
            chained=None if e.chained is None else repr(e.chained),
            previous_called_after_save=calls,
        )
    result["sigterm_handler_restored"] = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with open(os.path.join(result_dir, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture
def launch(tmp_path, run_forked):
    """``launch(tag, world, out, signum=None, to_rank=0, pause_at=PAUSE_AT, previous=False)``
    runs _TinyRun on ``world`` processes into ``out`` and returns their results; with ``signum``,
    every process pauses before batch ``pause_at`` and only process ``to_rank`` is sent
    ``signum`` there."""

    def launch(tag, world, out, signum=None, to_rank=0, pause_at=PAUSE_AT, previous=False):
        result_dir = tmp_path / f"results_{tag}"
        result_dir.mkdir()
        pause = str(result_dir) if signum else ""

        def send_signal(deadline):
            ready = [result_dir / f"ready.{r}" for r in range(world)]
            while not all(p.exists() for p in ready):
                assert time.monotonic() < deadline, "the processes never reached the pause"
                time.sleep(0.02)
            os.kill(int((result_dir / f"pid.{to_rank}").read_text()), signum)
            (result_dir / "go").touch()

        run_forked(
            _worker,
            (world, str(out), str(tmp_path / f"init_{tag}"), str(result_dir), pause, pause_at,
             previous),
            world, timeout_s=TIMEOUT_S, what=tag, meanwhile=send_signal if signum else None,
        )  # fmt: skip
        return [json.loads((result_dir / f"{r}.json").read_text()) for r in range(world)]

    return launch


def _weights(path):
    return load_checkpoint(path)["model"]


def test_two_processes_stop_together_when_one_gets_the_signal(launch, tmp_path):
    straight = tmp_path / "straight"
    launch("straight", 2, straight)
    out = tmp_path / "run"
    # only process 1 (not the one that writes) receives SIGUSR1, while fetching batch PAUSE_AT
    r0, r1 = launch("stop", 2, out, signal.SIGUSR1, to_rank=1)
    assert r0["stopped"] == r1["stopped"] == 128 + signal.SIGUSR1
    assert r0["iteration"] == r1["iteration"] == PAUSE_AT
    assert r0["message"] == r1["message"] == (
        f"stopped by SIGUSR1 at iteration {PAUSE_AT}; checkpoint {out}/model_{PAUSE_AT:07d}.pth "
        "written; rerun with --resume to continue"
    )
    assert r0["sigterm_handler_restored"] and r1["sigterm_handler_restored"]
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == [
        f"model_{PAUSE_AT:07d}.pth"
    ]
    ckpt = load_checkpoint(str(out / f"model_{PAUSE_AT:07d}.pth"))
    assert ckpt["iteration"] == PAUSE_AT and len(ckpt["rng"]["per_rank"]) == 2
    # the resume continues at the next step on both processes, to the uninterrupted weights
    r0, r1 = launch("resume", 2, out)
    assert r0["start_iter"] == r1["start_iter"] == PAUSE_AT + 1
    assert r0["stopped"] is None and r1["stopped"] is None
    final, reference = _weights(out / "model_final.pth"), _weights(straight / "model_final.pth")
    for k, v in reference.items():
        assert torch.equal(v, final[k]), k


def test_sigint_exits_130_and_the_handlers_are_restored(launch, tmp_path):
    (r,) = launch("sigint", 1, tmp_path / "run", signal.SIGINT)
    assert r["stopped"] == 130 and r["iteration"] == PAUSE_AT and r["chained"] is None
    assert r["sigterm_handler_restored"]
    assert (tmp_path / "run" / "last_checkpoint").read_text() == f"model_{PAUSE_AT:07d}.pth"


def test_submitit_handler_runs_after_the_checkpoint(launch, tmp_path):
    """A Python handler already installed for SIGUSR2 (submitit's requeue: it exits) is called
    once the checkpoint is on disk; what it raised is kept for after the process group ends."""
    (r,) = launch("usr2", 1, tmp_path / "run", signal.SIGUSR2, previous=True)
    assert r["stopped"] == 128 + signal.SIGUSR2 and r["iteration"] == PAUSE_AT
    assert r["previous_called_after_save"] == [True]
    assert r["chained"] == "SystemExit(-1)"
