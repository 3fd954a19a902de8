"""One live run per OUTPUT_DIR (pretrain/engine/lock.py): a second tools/pretrain.py into the
OUTPUT_DIR of a running one stops before writing anything (exit 2, one sentence naming the
holder) and the first is unaffected; a lock whose run is gone (dead or reused pid on this host, no
heartbeat from another host, an earlier run of a requeued SLURM job) is taken over with a warning,
by one taker only; every process of a job gets the same answer."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.engine import lock as lockmod
from pretrain.engine import prepare_output_dir
from pretrain.engine.lock import (
    LOCK_NAME,
    STALE_AFTER_S,
    RunLock,
    lock_output_dir,
    process_start_time,
    release_output_dir_locks,
)
from pretrain.io import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 180
HOST = socket.gethostname()

# tools/pretrain.py pausing after iteration 1 until the file GO exists (run A holds its lock and
# writes nothing meanwhile)
_PAUSED_CLI = """
import os, runpy, sys, time
import pretrain.engine.hooks as hooks
progress_after_step = hooks.ProgressHook.after_step
def after_step(self):
    progress_after_step(self)
    if self.trainer.iter == 1:
        open(os.environ["READY"], "w").close()
        while not os.path.exists(os.environ["GO"]):
            time.sleep(0.01)
hooks.ProgressHook.after_step = after_step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **extra}


def _dead_pid():
    """The pid of a process of this host that has exited (and was reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(proc.stdout)


def _write_lock(out, mtime=None, **fields):
    """A lock file as another run would leave it (``fields`` over a plausible document)."""
    os.makedirs(out, exist_ok=True)
    doc = {
        "host": HOST, "pid": 1, "proc_start": None, "boot_id": None,
        "started": "2000-01-01 00:00:00 +0000", "slurm_job": None, "slurm_restart": 0,
        "token": "theirs",
    }  # fmt: skip
    doc.update(fields)
    path = os.path.join(out, LOCK_NAME)
    with open(path, "w") as f:
        json.dump(doc, f)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _holder(out):
    with open(os.path.join(out, LOCK_NAME)) as f:
        return json.load(f)


@pytest.fixture(autouse=True)
def _release():
    yield
    release_output_dir_locks()


# ------------------------------------------------------------------------------ real processes
@pytest.fixture(scope="module")
def cli_runs(shapes_folder, tiny_pretrain_argv, tmp_path_factory):
    """Run A (paused after iteration 1, holding the lock), run B into A's OUTPUT_DIR meanwhile,
    then A to its end; and, at the same time, run C into an OUTPUT_DIR with the lock of a dead
    process of this host. No periodic checkpoint."""
    root = shapes_folder(48, 16, 32)

    def cli_args(out, max_iter):
        return tiny_pretrain_argv(
            root, out, "SOLVER.MAX_ITER", max_iter, "SOLVER.CHECKPOINT_PERIOD", 1000
        )

    tmp = tmp_path_factory.mktemp("lock_cli")
    out_a, out_c = tmp / "a", tmp / "c"
    ready, go = tmp / "ready", tmp / "go"
    dead = _dead_pid()
    _write_lock(out_c, pid=dead, proc_start=12345)
    a = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_CLI, *cli_args(out_a, 4)],
        cwd=ROOT, env=_env(READY=str(ready), GO=str(go)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    c = subprocess.Popen(
        [sys.executable, *cli_args(out_c, 2)],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_S
    while not ready.exists():
        assert a.poll() is None, a.communicate()[1][-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    lock_doc = _holder(out_a)
    before = {f: (out_a / f).read_bytes() for f in os.listdir(out_a)}
    b = subprocess.run(
        [sys.executable, *cli_args(out_a, 4)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    after_b = {f: (out_a / f).read_bytes() for f in os.listdir(out_a)}
    a_alive_after_b = a.poll() is None
    go.touch()
    a_out, a_err = a.communicate(timeout=TIMEOUT_S)
    c_out = c.communicate(timeout=TIMEOUT_S)[0]
    return {
        "a": a, "a_err": a_err, "lock": lock_doc, "b": b, "unchanged": before == after_b,
        "a_alive_after_b": a_alive_after_b, "out_a": out_a, "dead": dead, "c": c,
        "c_out": c_out, "out_c": out_c,
    }  # fmt: skip


def test_second_run_into_a_live_runs_output_dir_stops_before_writing(cli_runs):
    a, b, out = cli_runs["a"], cli_runs["b"], cli_runs["out_a"]
    assert cli_runs["lock"]["pid"] == a.pid and cli_runs["lock"]["host"] == HOST
    assert b.returncode == 2, b.stderr[-4000:]
    err = b.stderr.strip()
    assert err.startswith(
        f"error: OUTPUT_DIR {out} is in use by another run (process {a.pid} on {HOST}, since "
    )
    assert err.endswith(
        f"; lock file {out / LOCK_NAME}): wait for that run to end, or choose another OUTPUT_DIR."
    )
    assert "\n" not in err
    assert cli_runs["unchanged"]  # no log line, config or checkpoint of B in A's OUTPUT_DIR
    # A went on, to the end, alone
    assert cli_runs["a_alive_after_b"]
    assert a.returncode == 0, cli_runs["a_err"][-4000:]
    assert json.loads((out / "results.json").read_text())["iterations"] == 4
    assert (out / "log.txt").read_text().count("Running with full config") == 1
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(cli_runs):
    c, out = cli_runs["c"], cli_runs["out_c"]
    assert c.returncode == 0, cli_runs["c_out"][-4000:]
    warning = (
        f"Took over the lock {out / LOCK_NAME} of process {cli_runs['dead']} on {HOST}, since "
        f"2000-01-01 00:00:00 +0000: process {cli_runs['dead']} is gone."
    )
    assert warning in cli_runs["c_out"] and warning in (out / "log.txt").read_text()
    assert json.loads((out / "results.json").read_text())["iterations"] == 2
    assert not (out / LOCK_NAME).exists()


# --------------------------------------------------------------------------- the lock's rules
def test_other_hosts_lock_is_stale_only_without_a_heartbeat(tmp_path):
    fresh, old = tmp_path / "fresh", tmp_path / "old"
    _write_lock(fresh, host="elsewhere", pid=4242, mtime=time.time() - 60)
    with pytest.raises(UserError) as e:
        lock_output_dir(str(fresh))
    assert str(e.value).startswith(
        f"OUTPUT_DIR {fresh} is in use by another run (process 4242 on elsewhere, since "
    )
    assert _holder(fresh)["token"] == "theirs"  # refused: untouched
    _write_lock(old, host="elsewhere", pid=4242, mtime=time.time() - STALE_AFTER_S - 600)
    lock = lock_output_dir(str(old))
    assert lock.takeover == (
        f"took over the lock {old / LOCK_NAME} of process 4242 on elsewhere, since 2000-01-01 "
        "00:00:00 +0000: its heartbeat is 20 min old (more than 10 min: that run is gone)."
    )
    doc = _holder(old)
    assert (doc["host"], doc["pid"], doc["token"]) == (HOST, os.getpid(), lock.token)
    assert doc["proc_start"] == process_start_time(os.getpid())


def test_reused_pid_and_requeued_slurm_job_are_stale(tmp_path, monkeypatch):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        start = process_start_time(sleeper.pid)
        live, reused = tmp_path / "live", tmp_path / "reused"
        _write_lock(live, pid=sleeper.pid, proc_start=start)
        with pytest.raises(UserError, match=f"process {sleeper.pid} on {HOST}"):
            lock_output_dir(str(live))
        _write_lock(reused, pid=sleeper.pid, proc_start=start - 1)
        lock = lock_output_dir(str(reused))
        assert lock.takeover.endswith(
            f": process {sleeper.pid} is gone (its pid now belongs to another process)."
        )
    finally:
        sleeper.kill()
        sleeper.wait()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    requeued, other_job = tmp_path / "requeued", tmp_path / "other_job"
    _write_lock(requeued, host="node1", slurm_job="77", slurm_restart=0)
    lock = lock_output_dir(str(requeued))
    assert lock.takeover.endswith(": it was an earlier run of SLURM job 77, which was requeued.")
    _write_lock(other_job, host="node1", slurm_job="78", slurm_restart=0)
    with pytest.raises(UserError, match="process 1 on node1"):
        lock_output_dir(str(other_job))


def test_heartbeat_touches_the_lock_and_notices_a_takeover(tmp_path, caplog):
    lock = lock_output_dir(str(tmp_path))
    path = tmp_path / LOCK_NAME
    os.utime(path, (1.0, 1.0))
    assert lock.heartbeat() and time.time() - path.stat().st_mtime < STALE_AFTER_S
    _write_lock(tmp_path, host="elsewhere", pid=7)  # another run took it over
    assert not lock.heartbeat()
    assert "is now held by process 7 on elsewhere" in caplog.text
    release_output_dir_locks()
    assert _holder(tmp_path)["pid"] == 7  # not ours any more: left alone


def test_lock_is_released_and_retaken_in_one_process(tmp_path):
    first = lock_output_dir(str(tmp_path))
    assert lock_output_dir(str(tmp_path)) is first  # a second stage of the same process
    assert release_output_dir_locks() == [str(tmp_path / LOCK_NAME)]
    assert not (tmp_path / LOCK_NAME).exists()
    assert lock_output_dir(str(tmp_path)).takeover is None


def test_in_process_runs_check_the_lock_without_taking_it(tmp_path):
    """TrainingRun / run_linear_eval started in-process (prepare_output_dir) refuse another live
    run's OUTPUT_DIR, take no lock (they have no end to release it at), pass their own."""
    held, stale, ours = tmp_path / "held", tmp_path / "stale", tmp_path / "ours"
    _write_lock(held, host="elsewhere", pid=5, mtime=time.time())
    with pytest.raises(UserError, match=f"OUTPUT_DIR {held} is in use by another run"):
        prepare_output_dir(str(held))
    _write_lock(stale, pid=_dead_pid())
    prepare_output_dir(str(stale))
    assert _holder(stale)["token"] == "theirs"
    lock = lock_output_dir(str(ours))
    prepare_output_dir(str(ours))
    assert _holder(ours)["token"] == lock.token


def _release_in_child(result_file):
    with open(result_file, "w") as f:
        json.dump(release_output_dir_locks(), f)


def test_a_forked_child_leaves_the_parents_lock_alone(tmp_path):
    """A data-loader worker forked from the run's process 0 ends without touching its lock."""
    lock = lock_output_dir(str(tmp_path / "run"))
    child = mp.get_context("fork").Process(
        target=_release_in_child, args=(str(tmp_path / "released.json"),)
    )
    child.start()
    child.join(TIMEOUT_S)
    assert json.loads((tmp_path / "released.json").read_text()) == []
    assert _holder(tmp_path / "run")["token"] == lock.token


def _take(index, out, barrier, result_dir):
    barrier.wait()
    try:
        RunLock(out).acquire()
        result = "took"
    except UserError as e:
        result = str(e)
    with open(os.path.join(result_dir, str(index)), "w") as f:
        f.write(result)
    barrier.wait()  # the winner holds its lock until every taker has looked


def test_one_taker_wins_a_stale_lock(tmp_path):
    out = tmp_path / "run"
    _write_lock(out, pid=_dead_pid())
    results = tmp_path / "results"
    results.mkdir()
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_take, args=(i, str(out), barrier, str(results))) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    answers = [(results / str(i)).read_text() for i in range(4)]
    assert answers.count("took") == 1, answers
    winner = _holder(out)["pid"]
    assert winner in [p.pid for p in procs]
    for answer in answers:
        assert answer == "took" or f"(process {winner} on {HOST}, since " in answer


def _job(rank, out, init_file, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        lock_output_dir(out)
        result = "took"
    except UserError as e:
        result = str(e)
    with open(os.path.join(result_dir, f"{rank}"), "w") as f:
        f.write(result)
    dist.barrier()
    dist.destroy_process_group()


def test_every_process_of_a_job_gets_process_0s_answer(tmp_path):
    out = tmp_path / "run"
    _write_lock(out, host="elsewhere", pid=99, mtime=time.time())
    mp.start_processes(
        _job, args=(str(out), str(tmp_path / "init"), str(tmp_path)), nprocs=2,
        start_method="fork", join=True,
    )  # fmt: skip
    r0, r1 = (tmp_path / "0").read_text(), (tmp_path / "1").read_text()
    assert r0 == r1 and "(process 99 on elsewhere, since " in r0


def test_unreadable_lock_is_refused_until_old(tmp_path, monkeypatch):
    path = tmp_path / LOCK_NAME
    path.write_text("not json")
    with pytest.raises(UserError, match="a process whose lock file cannot be read"):
        lock_output_dir(str(tmp_path))
    monkeypatch.setattr(lockmod, "STALE_AFTER_S", 0.0)
    os.utime(path, (1.0, 1.0))
    assert "the lock is not readable" in lock_output_dir(str(tmp_path)).takeover
