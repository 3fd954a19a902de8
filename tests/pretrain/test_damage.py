"""--resume past damaged checkpoints (a truncated copy, garbage bytes, a file that is gone): the
run continues from the newest checkpoint that loads, with a warning naming each one skipped and
why, keeps them as *.damaged, and ends with the weights of an uninterrupted run; when none loads,
one sentence and exit status 2, with every file left as it was. Real runs of tools/pretrain.py,
then the walk itself (order, model_final, last_checkpoint) and the detection checkpointer on a
tiny model."""

import logging
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from pretrain.engine import AtomicCheckpointer
from pretrain.io import UserError, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_ITER = 6  # checkpoints after iterations 1, 3, 5, and model_final


@pytest.fixture(scope="module")
def run(tiny_pretrain_argv):
    """``run(root, out)``: tools/pretrain.py --resume for MAX_ITER iterations, a checkpoint every
    2 (all kept), on the CPU."""

    def run(root, out):
        args = tiny_pretrain_argv(
            root, out, "SOLVER.MAX_ITER", MAX_ITER, "SOLVER.CHECKPOINT_PERIOD", 2,
            "SOLVER.MAX_TO_KEEP", 0, "MODEL.DEVICE", "cpu",
        )  # fmt: skip
        return subprocess.run(
            [sys.executable, *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT},
            timeout=600,
        )

    return run


@pytest.fixture(scope="module")
def straight(shapes_folder, run, tmp_path_factory):
    """(data root, OUTPUT_DIR) of an uninterrupted run: model_0000001/3/5.pth, model_final.pth."""
    root = shapes_folder(48, 16, 32)
    out = tmp_path_factory.mktemp("straight")
    proc = run(root, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, out


def _copy(straight, out, names, last):
    """A run folder as an interrupted run left it: ``names`` from the uninterrupted run and
    last_checkpoint naming ``last``."""
    out.mkdir()
    for name in names:
        shutil.copy(straight / name, out / name)
    (out / "last_checkpoint").write_text(last)


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path.read_bytes()


def _garbage(path, n=4096):
    data = random.Random(0).randbytes(n)
    path.write_bytes(data)
    return data


def _same_weights(a, b):
    a, b = load_checkpoint(str(a))["model"], load_checkpoint(str(b))["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_truncated_newest_checkpoint(straight, run, tmp_path):
    """Killed after the checkpoint of iteration 3, which a copy then truncated: resume from
    iteration 1's, warn, keep the truncated file as model_0000003.pth.damaged, and finish with
    the uninterrupted run's weights."""
    root, ref = straight
    out = tmp_path / "run"
    _copy(ref, out, ["model_0000001.pth", "model_0000003.pth"], "model_0000003.pth")
    truncated = _truncate(out / "model_0000003.pth")
    proc = run(root, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = (out / "log.txt").read_text()
    bad = out / "model_0000003.pth"
    assert (
        f"Skipping a damaged checkpoint: {bad}: not a readable PyTorch checkpoint (is it the "
        "right file?) (RuntimeError: PytorchStreamReader failed reading zip archive: failed "
        "finding central directory)." in log
    )
    assert "Renamed the damaged checkpoint model_0000003.pth to model_0000003.pth.damaged" in log
    assert f"Resuming from {out / 'model_0000001.pth'}, the newest checkpoint that loads" in log
    assert "Resumed at iteration 2 " in log
    assert (out / "model_0000003.pth.damaged").read_bytes() == truncated  # kept as it was
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    _same_weights(out / "model_final.pth", ref / "model_final.pth")
    _same_weights(out / "model_0000003.pth", ref / "model_0000003.pth")  # written again


@pytest.mark.slow
def test_last_checkpoint_names_garbage(straight, run, tmp_path):
    """last_checkpoint names a model_final.pth of garbage bytes (a bad sector, a bad copy): the
    newest checkpoint that loads is iteration 3's."""
    root, ref = straight
    out = tmp_path / "run"
    _copy(ref, out, ["model_0000001.pth", "model_0000003.pth"], "model_final.pth")
    garbage = _garbage(out / "model_final.pth")
    proc = run(root, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = (out / "log.txt").read_text()
    assert (
        f"Skipping a damaged checkpoint: {out / 'model_final.pth'}: not a PyTorch checkpoint "
        "(neither a torch.save zip archive nor a pickle)" in log
    )
    assert "Resumed at iteration 4 " in log
    assert (out / "model_final.pth.damaged").read_bytes() == garbage
    _same_weights(out / "model_final.pth", ref / "model_final.pth")


@pytest.mark.slow
def test_no_checkpoint_loads(straight, run, tmp_path):
    """Every checkpoint damaged: one sentence, exit 2, nothing renamed or changed."""
    root, ref = straight
    out = tmp_path / "run"
    _copy(ref, out, ["model_0000001.pth"], "model_0000003.pth")
    before = {
        "model_0000001.pth": _truncate(out / "model_0000001.pth", keep=0.9),
        "model_0000003.pth": _garbage(out / "model_0000003.pth"),
        "last_checkpoint": b"model_0000003.pth",
    }
    proc = run(root, out)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {out}: none of its checkpoints loads (model_0000003.pth, model_0000001.pth: see "
        "the warnings above); restore one from a backup, or delete last_checkpoint to start from "
        "scratch."
    )
    for name, data in before.items():
        assert (out / name).read_bytes() == data, name
    assert sorted(n for n in os.listdir(out) if "pth" in n) == sorted(before)[1:]


# ------------------------------------------------------------------ the walk, on a tiny model
def _tiny_checkpoints(folder, iterations, final=None):
    """A checkpointer of a linear layer in ``folder`` with a checkpoint per iteration (its
    weight filled with the iteration) and, with ``final``, a model_final.pth of that iteration."""
    net = torch.nn.Linear(2, 2)
    ckpt = AtomicCheckpointer(net, str(folder))
    for it in iterations:
        torch.nn.init.constant_(net.weight, float(it))
        ckpt.save(f"model_{it:07d}", iteration=it)
    if final is not None:
        torch.nn.init.constant_(net.weight, float(final))
        ckpt.save("model_final", iteration=final)
    return ckpt, net


@pytest.fixture
def checkpointer_log(caplog):
    """caplog of the checkpointer's (fvcore's) logger, which detectron2's setup_logger may have
    cut off from the root logger in this process."""
    logger = logging.getLogger("fvcore.common.checkpoint")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_walk_order_and_last_checkpoint(tmp_path, checkpointer_log):
    """A model_final.pth counts as the iteration inside it (here an earlier, shorter run's 4),
    after a numbered checkpoint of a later iteration; last_checkpoint ends up naming the one
    chosen; a second damaged file of the same name becomes *.damaged.1."""
    ckpt, net = _tiny_checkpoints(tmp_path, [3, 5, 7], final=4)
    (tmp_path / "last_checkpoint").write_text("model_0000007.pth")
    _truncate(tmp_path / "model_0000007.pth")
    _garbage(tmp_path / "model_0000005.pth")
    (tmp_path / "model_0000005.pth.damaged").write_bytes(b"from before")
    torch.nn.init.zeros_(net.weight)
    path, extra = ckpt.resume_last()
    assert os.path.basename(path) == "model_final.pth" and extra["iteration"] == 4
    assert torch.equal(net.weight, torch.full((2, 2), 4.0))
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint",
        "model_0000003.pth",
        "model_0000005.pth.damaged",
        "model_0000005.pth.damaged.1",
        "model_0000007.pth.damaged",
        "model_final.pth",
    ]
    assert (tmp_path / "model_0000005.pth.damaged").read_bytes() == b"from before"
    # each once: the records may reach caplog twice (its handler here and on the root logger)
    messages = list(dict.fromkeys(r.getMessage() for r in checkpointer_log.records))
    skipped = [m for m in messages if m.startswith("Skipping")]
    assert [s.split(": ")[1] for s in skipped] == [
        str(tmp_path / "model_0000007.pth"),
        str(tmp_path / "model_0000005.pth"),
    ]
    # a later call (the "already trained" check) finds the same one, reading nothing else
    assert ckpt.last_checkpoint_of_main_process() == path


def test_last_checkpoint_names_a_missing_file(tmp_path, checkpointer_log):
    ckpt, net = _tiny_checkpoints(tmp_path, [1, 3])
    (tmp_path / "last_checkpoint").write_text("model_0000005.pth")
    path, extra = ckpt.resume_last()
    assert os.path.basename(path) == "model_0000003.pth" and extra["iteration"] == 3
    assert f"{tmp_path / 'last_checkpoint'} names 'model_0000005.pth', which does not exist" in (
        checkpointer_log.text
    )
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    for name in ("model_0000001.pth", "model_0000003.pth"):
        os.unlink(tmp_path / name)
    (tmp_path / "last_checkpoint").write_text("model_0000005.pth")
    with pytest.raises(UserError) as e:
        ckpt.resume_last()
    assert str(e.value) == (
        f"{tmp_path / 'last_checkpoint'} names 'model_0000005.pth', which does not exist, and "
        f"{tmp_path} holds no other checkpoint; put the file back, or delete last_checkpoint to "
        "start from scratch."
    )
    os.unlink(tmp_path / "last_checkpoint")  # no last_checkpoint: start from scratch, as before
    assert ckpt.resume_last() is None


def test_detection_checkpointer_walks_back(tmp_path):
    """transfer's SafeDetectionCheckpointer (DefaultTrainer's checkpointer, through its own file
    reader) resumes past a damaged newest checkpoint too."""
    from transfer.trainer import SafeDetectionCheckpointer

    net = torch.nn.Linear(2, 2)
    ckpt = SafeDetectionCheckpointer(net, str(tmp_path))
    for it in (19, 39):
        torch.nn.init.constant_(net.weight, float(it))
        ckpt.save(f"model_{it:07d}", iteration=it)
    _truncate(tmp_path / "model_0000039.pth", keep=0.3)
    torch.nn.init.zeros_(net.weight)
    path, extra = ckpt.resume_last()
    assert path == str(tmp_path / "model_0000019.pth") and extra["iteration"] == 19
    assert torch.equal(net.weight, torch.full((2, 2), 19.0))
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint",
        "model_0000019.pth",
        "model_0000039.pth.damaged",
    ]
