"""A disk that fills up during a checkpoint save, in real runs of tools/pretrain.py: exit status 2
with one sentence naming the checkpoint, the free space and the size it needs; no partial file;
last_checkpoint and the earlier checkpoints byte-identical to before; with two processes, both
stop (none waits in the next collective). The full disk is a real small tmpfs where this machine
lets a test mount one (a user namespace), and an injected ENOSPC everywhere."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# sitecustomize.py of every Python process of the run (the spawned workers too): with
# FULL_AT_SAVE=N, the file object torch.save writes the N-th checkpoint into takes FULL_ROOM bytes
# and then raises ENOSPC from write(), as a file on a disk that just filled up does; torch's zip
# writer turns that into its own RuntimeError (the real path). Just before, the checkpoints and
# last_checkpoint of FULL_DIR are hashed into FULL_SNAPSHOT.
_SITECUSTOMIZE = """
import os
if os.environ.get("FULL_AT_SAVE"):
    import errno, hashlib, io, json, torch
    _real_save, _calls = torch.save, [0]

    class _DiskFillsUp:
        def __init__(self, f, room):
            self.f, self.room = f, room

        def write(self, data):
            data = memoryview(data).cast("B")
            if len(data) > self.room:
                self.f.write(data[: self.room])
                self.room = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    def _snapshot(folder, path):
        sums = {}
        for name in sorted(os.listdir(folder)):
            if name == "last_checkpoint" or name.startswith("model_"):
                with open(os.path.join(folder, name), "rb") as f:
                    sums[name] = hashlib.sha256(f.read()).hexdigest()
        with open(path, "w") as f:
            json.dump(sums, f)

    def save(obj, f, *args, **kwargs):
        # a file on disk: not pretrain.io's byte counter, nor the BytesIO of an object collective
        if isinstance(f, io.BufferedWriter):
            _calls[0] += 1
            if _calls[0] == int(os.environ["FULL_AT_SAVE"]):
                _snapshot(os.environ["FULL_DIR"], os.environ["FULL_SNAPSHOT"])
                f = _DiskFillsUp(f, int(os.environ["FULL_ROOM"]))
        return _real_save(obj, f, *args, **kwargs)

    torch.save = save
"""

# "error: PATH: could not be written (No space left on device): 1.2 GiB free in DIR, the file
# needs about 128.3 MiB; free some space there ..."
_MESSAGE = re.compile(
    r"^error: (?P<path>\S+): could not be written \((?P<why>[^)]+)\): "
    r"(?P<free>[\d.]+ [KMGT]?i?B) free in (?P<dir>\S+), the file needs about "
    r"(?P<needed>[\d.]+ [KMGT]?i?B); free some space there \(or set OUTPUT_DIR to a disk with "
    r"room\) and run again, with --resume to continue a training run from its last checkpoint\.$"
)
_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


@pytest.fixture(scope="module")
def pretrain_args(shapes_folder, tiny_pretrain_argv):
    """``pretrain_args(out)``: tools/pretrain.py --resume for 6 iterations, a checkpoint every 2
    (all kept), on the CPU."""
    root = shapes_folder(48, 16, 32)
    return lambda out: tiny_pretrain_argv(
        root, out, "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 2, "SOLVER.MAX_TO_KEEP", 0,
        "MODEL.DEVICE", "cpu",
    )  # fmt: skip


def _env(tmp_path, out, **extra):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(site), ROOT]),
        "FULL_DIR": str(out),
        "FULL_SNAPSHOT": str(tmp_path / "before.json"),
        **extra,
    }


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _bytes(figure: str) -> float:
    number, unit = figure.split()
    return float(number) * _UNITS[unit]


def _check_message(line: str, path: str) -> re.Match:
    m = _MESSAGE.match(line)
    assert m is not None, line
    assert m["path"] == path and m["dir"] == os.path.dirname(path), line
    assert m["why"] == "No space left on device", line
    return m


def _assert_as_before(out, tmp_path):
    """No partial file; last_checkpoint and every earlier checkpoint byte-identical to just
    before the failing save; the failed checkpoint not there."""
    before = json.loads((tmp_path / "before.json").read_text())
    assert set(before) == {"last_checkpoint", "model_0000001.pth"}, before
    names = os.listdir(out)
    assert not [n for n in names if n.startswith(".tmp_")], names
    assert sorted(n for n in names if n.endswith(".pth")) == ["model_0000001.pth"], names
    for name, digest in before.items():
        assert _sha256(out / name) == digest, name
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"


@pytest.mark.slow
def test_enospc_in_the_second_save(pretrain_args, tmp_path):
    """The second checkpoint's write fails after 1 MB: exit 2, one sentence, nothing lost."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, *pretrain_args(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(tmp_path, out, FULL_AT_SAVE="2", FULL_ROOM=str(10**6)),
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    m = _check_message(last, str(out / "model_0000003.pth"))
    # the size of a checkpoint of this run (the first one has the same tensors), to 0.1 MiB
    assert m["needed"] == f"{os.path.getsize(out / 'model_0000001.pth') / 1024**2:.1f} MiB"
    assert abs(_bytes(m["free"]) - shutil.disk_usage(out).free) < 2 * 1024**3  # a shared disk
    assert "Traceback" not in proc.stderr
    _assert_as_before(out, tmp_path)


def _two_processes(args, env, port):
    """Runs ``args`` (after the Python executable) as two gloo processes started as srun /
    torchrun start them (WORLD_SIZE, RANK, ... in the environment ``env``), with no launcher that
    kills one when the other exits; (exit status, stderr) of each. A hang fails here."""
    env = {**env, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
        )
        for rank in range(2)
    ]
    try:
        stderr = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, err) for p, err in zip(procs, stderr)]


@pytest.mark.slow
def test_enospc_with_two_processes_stops_both(pretrain_args, free_port, tmp_path):
    """Two gloo processes started as srun / torchrun start them. Only process 0 writes; its
    failure stops process 1 too, with the same sentence and exit status, instead of leaving it in
    the next all-reduce."""
    out = tmp_path / "out"
    env = _env(tmp_path, out, FULL_AT_SAVE="2", FULL_ROOM=str(10**6))
    path = str(out / "model_0000003.pth")
    lines = []
    for returncode, err in _two_processes(pretrain_args(out), env, free_port):
        assert returncode == 2, err[-4000:]
        lines.append(err.strip().splitlines()[-1])
        _check_message(lines[-1], path)
        assert "Traceback" not in err, err[-4000:]
    assert lines[0] == lines[1]
    _assert_as_before(out, tmp_path)


def _can_mount_tmpfs(where) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs '{where}'"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


@pytest.mark.slow
def test_real_small_disk(pretrain_args, tmp_path):
    """A 200 MiB tmpfs (in a user namespace) as OUTPUT_DIR: the first checkpoint (128 MiB) fits,
    the second does not. What the run left is examined inside the namespace (the mount goes
    away with it)."""
    small = tmp_path / "small"
    small.mkdir()
    if not _can_mount_tmpfs(small):
        pytest.skip("this machine does not let a test mount a tmpfs (no user namespaces)")
    report = tmp_path / "report"
    report.mkdir()
    check = (
        "import json, os, sys; from pretrain.io import load_checkpoint; d = sys.argv[1]; "
        "print(json.dumps(sorted(os.listdir(d)))); "
        "print(open(os.path.join(d, 'last_checkpoint')).read()); "
        "print(load_checkpoint(os.path.join(d, 'model_0000001.pth'))['iteration'])"
    )
    args = " ".join(f"'{a}'" for a in pretrain_args(small))
    script = (
        f"mount -t tmpfs -o size=200m tmpfs '{small}' || exit 99; "
        f"'{sys.executable}' {args} > '{report}/stdout' 2> '{report}/stderr'; "
        f"echo $? > '{report}/rc'; "
        f"'{sys.executable}' -c \"{check}\" '{small}' > '{report}/check'"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    stderr = (report / "stderr").read_text()
    assert (report / "rc").read_text().strip() == "2", stderr[-4000:]
    m = _check_message(stderr.strip().splitlines()[-1], str(small / "model_0000003.pth"))
    assert _bytes(m["free"]) < _bytes(m["needed"]) < 200 * 1024**2
    names, last, iteration = (report / "check").read_text().splitlines()
    names = json.loads(names)
    assert not [n for n in names if n.startswith(".tmp_")], names
    assert [n for n in names if n.endswith(".pth")] == ["model_0000001.pth"], names
    assert (last, iteration) == ("model_0000001.pth", "1")
    assert not os.listdir(small)  # the tmpfs went away with the namespace


# ------------------------------------------------------------------ pretrain.io, in-process
def test_unrelated_failures_are_not_disguised(tmp_path):
    """Only a failure of the write itself becomes the sentence: an object that cannot be
    serialized, or a RuntimeError while there is room, is raised as it is; no temp file left."""
    import torch

    from pretrain.io import atomic_open, atomic_save

    with pytest.raises(AttributeError):  # a local function cannot be pickled
        atomic_save({"fn": lambda: 0}, str(tmp_path / "a.pth"))
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(str(tmp_path / "b.txt"), size=lambda: 10) as f:
            f.write("x")
            raise RuntimeError("boom")
    atomic_save({"w": torch.zeros(3)}, str(tmp_path / "c.pth"))
    assert sorted(os.listdir(tmp_path)) == ["c.pth"]


def test_errno_lost_by_torch_and_unwritable_folder(tmp_path, monkeypatch):
    """A RuntimeError of torch's writer without the OSError behind it counts as a full disk when
    the free space is below the checkpoint's size; a folder that cannot be written is a sentence
    of its own (mkstemp fails: EACCES, EROFS)."""
    import errno

    from pretrain import io

    monkeypatch.setattr(shutil, "disk_usage", lambda d: SimpleNamespace(total=100, free=10))
    error = io.write_error(
        str(tmp_path / "m.pth"), RuntimeError("unexpected pos 64 vs 0"), written=4, needed=2000
    )
    assert str(error) == (
        f"{tmp_path / 'm.pth'}: could not be written (No space left on device): 10 B free in "
        f"{tmp_path}, the file needs about 2.0 KiB; free some space there (or set OUTPUT_DIR to "
        "a disk with room) and run again, with --resume to continue a training run from its last "
        "checkpoint."
    )
    assert io.write_error(str(tmp_path / "m.pth"), RuntimeError("x"), needed=5) is None

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / ".tmp_x"))

    monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    with pytest.raises(io.UserError) as e:
        io.atomic_write_text(str(tmp_path / "results.json"), "{}")
    assert str(e.value) == (
        f"{tmp_path / 'results.json'}: could not be written (Read-only file system); make "
        f"{tmp_path} writable (or set OUTPUT_DIR to a folder you can write) and run again."
    )


@pytest.mark.slow
def test_enospc_in_a_two_process_detection_run_stops_both(free_port, tmp_path):
    """The same for tools/train_det.py, where detectron2 checkpoints on process 0 only: every
    process calls save (transfer.trainer.Trainer.build_hooks), so process 1 stops with process 0's
    sentence rather than dying in (gloo) or waiting on (NCCL) the next collective."""
    from transfer.shapes import make_shapes

    datasets = tmp_path / "datasets"
    make_shapes(str(datasets / "shapes"), num_train=8, num_val=2, size=64, seed=0, voc=False)
    out = tmp_path / "det"
    env = _env(tmp_path, out, FULL_AT_SAVE="1", FULL_ROOM=str(10**5),
               DETECTRON2_DATASETS=str(datasets))  # fmt: skip
    args = [
        os.path.join(ROOT, "tools", "train_det.py"),
        "--config-file", os.path.join(ROOT, "configs", "shapes_fpn_cpu.yaml"),
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.DEVICE", "cpu",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.CHECKPOINT_PERIOD", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST",
        "64", "DATALOADER.NUM_WORKERS", "0", "TEST.PRECISE_BN.ENABLED", "False",
        "OUTPUT_DIR", str(out),
    ]  # fmt: skip
    lines = []
    for returncode, err in _two_processes(args, env, free_port):
        assert returncode == 2, err[-4000:]
        lines.append(err.strip().splitlines()[-1])
        _check_message(lines[-1], str(out / "model_0000001.pth"))
    assert lines[0] == lines[1]
    assert not [n for n in os.listdir(out) if n.startswith("model_") or ".tmp" in n]
