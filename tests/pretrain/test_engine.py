"""pretrain.engine: short runs on the shapes dataset, checkpoints, exact resume after a kill
mid-save, NaN stop, lr scaling, config errors, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

import pretrain.engine as engine
import pretrain.engine.checkpoint
from pretrain.config import get_pretrain_cfg, load_pretrain_cfg
from pretrain.engine import build_lr_multiplier
from pretrain.io import UserError, load_checkpoint
from pretrain.pretrainer import Pretrainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def shapes(shapes_folder):
    # the colour style: its background/colour shortcut makes instance discrimination easy, so the
    # loss of a 30-step run falls clearly (on the grey style, where only the shape tells images
    # apart, it takes hundreds of steps); this module tests the engine, not the features
    return shapes_folder(48, 16, 32, style="colour")


def _run(cfg, resume=False):
    seed_all_rng(cfg.SEED)  # what default_setup does on rank 0
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    trainer = Pretrainer(cfg).resume_or_load(resume=resume)
    return trainer, trainer.train()


def test_short_simo_run_lowers_loss_and_writes_outputs(shapes, tmp_path, tiny_pretrain_cfg):
    over = {"SOLVER.MAX_ITER": 120, "SOLVER.CHECKPOINT_PERIOD": 30}
    cfg = tiny_pretrain_cfg(shapes, tmp_path / "run", **over)
    trainer, results = _run(cfg)
    losses = [v for v, _ in trainer.trainer.storage.history("total_loss").values()]
    assert len(losses) == 120 and all(np.isfinite(losses))
    out = tmp_path / "run"
    # it learns: the two views' embeddings move together (alignment, health metric). Measured
    # over seeds 0-4, mean of the first vs the last 5 steps: in 120 steps it falls by 0.46 / 0.52 /
    # 0.27 / 0.42 / 0.79 on the 2026-12-03 Xeon; in 60 steps by 0.35-0.75 on one CPU but only
    # -0.04 to 0.25 on that Xeon (float trajectories differ by CPU), hence 120. The loss itself is
    # too noisy at N=8 to show a trend (it rises or falls by up to 0.5 with the augmentation draws).
    logged = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    align = [m["[metric]health/alignment"] for m in logged if "[metric]health/alignment" in m]
    assert len(align) == 120
    first, last = sum(align[:5]) / 5, sum(align[-5:]) / 5
    assert last < first - 0.15, (first, last)
    for name in ["metrics.json", "model_0000029.pth", "model_final.pth", "results.json"]:
        assert (out / name).is_file(), name
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == results
    assert results["kind"] == "pretrain" and results["name"] == "run"
    assert results["method"] == "simo" and results["loss"] == "eqco" and results["alpha"] == 256.0
    assert results["num_negatives"] == 4 and results["iterations"] == 120
    assert results["epochs"] == pytest.approx(120 / (48 // 8))
    assert results["final_loss"] == pytest.approx(float(np.median(losses[-20:])))
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert metrics[-1]["iteration"] == 119 and "[metric]images_per_s" in metrics[-1]
    # lr follows EqCo rule 2 (0.48 x 8 / 256) times the cosine multiplier
    sched = build_lr_multiplier(120, 0)
    for m in metrics[:5]:
        assert m["lr"] == pytest.approx(0.48 * 8 / 256 * sched(m["iteration"] / 120), rel=1e-6)

    ckpt = load_checkpoint(str(out / "model_final.pth"))  # weights_only
    meta = ckpt["meta"]
    assert meta == {
        "kind": "pretrain",
        "name": "run",
        "method": "simo",
        "arch": "resnet18",
        "loss": "eqco",
        "tau": 0.2,
        "alpha": 256.0,
        "num_negatives": 4,
        "epochs": 20.0,
        "iteration": 120,
        "ims_per_batch": 8,
    }
    keys = ckpt["model"].keys()
    assert "encoder_q.conv1.weight" in keys and "encoder_q.fc.0.weight" in keys
    assert "encoder_k.layer4.1.bn2.running_var" in keys
    assert {"optimizer", "scheduler", "loader", "rng", "iteration", "grad_scaler"} <= set(ckpt)
    assert ckpt["iteration"] == 119 and ckpt["scheduler"]["last_epoch"] == 120


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no cleanup of the temp file."""


def _run_killed_in_save(cfg, monkeypatch, dies):
    """Run ``cfg`` with ``atomic_save`` replaced by one that, where ``dies(path)`` (called for
    every save in order) is true, is killed instead of writing (:class:`_Killed`); the real save
    is back afterwards."""
    real_save = pretrain.engine.checkpoint.atomic_save

    def dying_save(obj, path):
        if dies(path):
            raise _Killed()
        real_save(obj, path)

    monkeypatch.setattr(pretrain.engine.checkpoint, "atomic_save", dying_save)
    with pytest.raises(_Killed):
        _run(cfg)
    monkeypatch.setattr(pretrain.engine.checkpoint, "atomic_save", real_save)


def test_resume_after_kill_mid_save_is_exact(shapes, tmp_path, monkeypatch, tiny_pretrain_cfg):
    over = {"SOLVER.MAX_ITER": 4, "SOLVER.CHECKPOINT_PERIOD": 2}
    _run(tiny_pretrain_cfg(shapes, tmp_path / "straight", **over))
    straight = load_checkpoint(str(tmp_path / "straight" / "model_final.pth"))

    calls = []

    def dies(path):
        calls.append(path)
        if len(calls) < 2:
            return False
        # the checkpoint after iteration 4: die with half a temp file written
        tmp = os.path.join(os.path.dirname(path), ".tmp_" + os.path.basename(path))
        with open(tmp, "wb") as f:
            f.write(b"\x80\x02half a checkpoint")
        return True

    killed_dir = tmp_path / "killed"
    _run_killed_in_save(tiny_pretrain_cfg(shapes, killed_dir, **over), monkeypatch, dies)
    assert (killed_dir / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (killed_dir / "model_0000003.pth").exists()

    torch.manual_seed(12345)  # a fresh process would not share the RNG state either
    trainer, results = _run(tiny_pretrain_cfg(shapes, killed_dir, **over), resume=True)
    assert trainer.start_iter == 2 and results["iterations"] == 4
    resumed = load_checkpoint(str(killed_dir / "model_final.pth"))
    assert resumed["model"].keys() == straight["model"].keys()
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    for s_ref, s_got in zip(
        straight["optimizer"]["state"].values(),
        resumed["optimizer"]["state"].values(),
        strict=True,
    ):
        assert torch.equal(s_ref["momentum_buffer"], s_got["momentum_buffer"])
    assert resumed["loader"] == straight["loader"] == {"epoch": 0, "batch": 4}
    assert torch.equal(
        resumed["rng"]["per_rank"][0]["generators"]["model"],
        straight["rng"]["per_rank"][0]["generators"]["model"],
    )


def test_kill_between_the_last_periodic_save_and_the_final_one(
    shapes, tmp_path, monkeypatch, tiny_pretrain_cfg
):
    # the checkpoint hook saves model_0000003.pth, then model_final.pth, after the last step; a
    # kill in between left a finished run whose resume had nothing to do and never wrote
    # model_final.pth (seen in test_kill.py's random SIGKILLs)
    over = {"SOLVER.MAX_ITER": 4, "SOLVER.CHECKPOINT_PERIOD": 2}
    _run(tiny_pretrain_cfg(shapes, tmp_path / "straight", **over))
    straight = load_checkpoint(str(tmp_path / "straight" / "model_final.pth"))

    out = tmp_path / "killed"
    _run_killed_in_save(
        tiny_pretrain_cfg(shapes, out, **over),
        monkeypatch,
        lambda path: os.path.basename(path) == "model_final.pth",
    )
    assert (out / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (out / "model_final.pth").exists()

    trainer, results = _run(tiny_pretrain_cfg(shapes, out, **over), resume=True)
    assert trainer.start_iter == 4 and results["iterations"] == 4
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    final = load_checkpoint(str(out / "model_final.pth"))
    assert final["iteration"] == straight["iteration"] == 3
    assert final["meta"] == straight["meta"] | {"name": "killed"}
    for k, v in straight["model"].items():
        assert torch.equal(v, final["model"][k]), k


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shapes, tmp_path, tiny_pretrain_cfg):
    cfg = tiny_pretrain_cfg(
        shapes,
        tmp_path / "nan",
        **{"SOLVER.MAX_ITER": 20, "SOLVER.CHECKPOINT_PERIOD": 1, "SOLVER.BASE_LR": 1e30},
    )
    with pytest.raises(UserError, match=r"non-finite at iteration (\d+)") as info:
        _run(cfg)
    stopped = int(info.value.args[0].split("iteration ")[1].split(";")[0])
    assert 0 < stopped < 20
    out = tmp_path / "nan"
    last = (out / "last_checkpoint").read_text()
    assert last == f"model_{stopped - 1:07d}.pth" and last in str(info.value)
    assert load_checkpoint(str(out / last))["meta"]["iteration"] == stopped
    assert (
        not (out / f"model_{stopped:07d}.pth").exists() and not (out / "model_final.pth").exists()
    )


def test_lr_scaling_and_schedule():
    cfg = get_pretrain_cfg()
    from pretrain.config import effective_lr

    for n in (64, 256, 4096):
        cfg.SOLVER.IMS_PER_BATCH = n
        assert effective_lr(cfg) == pytest.approx(0.03 * n / 256)
    cfg.LOSS.NUM_NEGATIVES = 1  # K does not enter the lr (rule 2 scales with N only)
    assert effective_lr(cfg) == pytest.approx(0.03 * 4096 / 256)
    sched = build_lr_multiplier(max_iter=100, warmup_iters=10, warmup_factor=0.001)
    assert sched(0.0) == pytest.approx(0.001 * 1.0)
    assert sched(0.1) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(0.1 * torch.pi))).item())
    assert sched(0.99) < 0.001


@pytest.mark.parametrize(
    "opts,message",
    [
        (["MODEL.DEPTH", "50"], "unknown config key MODEL.DEPTH; check the spelling"),
        (["SOLVER.IMS_PER_BATCH", "'many'"], "Type mismatch"),
        (["LOSS.NUM_NEGATIVES", "300"], "LOSS.NUM_NEGATIVES=300 is larger than the 255"),
        (["LOSS.ALPHA", "0"], "LOSS.ALPHA must be > 0"),
        (["LOSS.ALPHA", "-3.0"], "LOSS.ALPHA must be > 0"),
        (["DATASETS.ROOT", "/nonexistent/imagenet"], "/nonexistent/imagenet/train is not a folder"),
        (["MODEL.METHOD", "byol"], "MODEL.METHOD 'byol' is unknown"),
        (["LOSS.QUEUE_SIZE", "0", "MODEL.METHOD", "mocov2"], "LOSS.QUEUE_SIZE must be >= 1"),
        (["SOLVER.IMS_PER_BATCH"], "KEY VALUE pairs"),
    ],
)
def test_bad_config_is_one_clear_user_error(opts, message, shapes):
    base = ["DATASETS.ROOT", shapes] if "DATASETS.ROOT" not in opts else []
    with pytest.raises(UserError) as info:
        load_pretrain_cfg("", base + opts)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_every_shipped_config_loads():
    folder = os.path.join(ROOT, "configs", "pretrain")
    names = sorted(f for f in os.listdir(folder) if f.endswith(".yaml"))
    assert "simo_r50_200ep.yaml" in names and "simo_shapes_cpu.yaml" in names
    for name in names:
        cfg = load_pretrain_cfg(os.path.join(folder, name), check_paths=False)
        assert cfg.MODEL.METHOD in ("simo", "mocov2", "simclr", "simmoco", "simco"), name
    paper = load_pretrain_cfg(os.path.join(folder, "simo_r50_200ep.yaml"), check_paths=False)
    assert (paper.SOLVER.IMS_PER_BATCH, paper.LOSS.NUM_NEGATIVES, paper.LOSS.ALPHA) == (
        256,
        16,
        256,
    )
    assert (paper.SOLVER.BASE_LR, paper.SOLVER.EPOCHS, paper.LOSS.TAU) == (0.03, 200, 0.2)
    alpha = load_pretrain_cfg(
        os.path.join(folder, "simo_r50_200ep_alpha65536.yaml"), check_paths=False
    )
    assert alpha.LOSS.ALPHA == 65536.0 and alpha.MODEL.METHOD == "simo"


def test_released_simo_config_is_the_released_run():
    """configs/pretrain/simo_r50_200ep_released.yaml: all 255 other keys of N=256 as negatives,
    one shared draw per step, plain InfoNCE, zero-init residual, N(0, 0.01) head, 10 warm-up
    iterations; the paper's config keeps K=16, EqCo alpha=256 and an epoch-based warm-up."""
    folder = os.path.join(ROOT, "configs", "pretrain")
    rel = load_pretrain_cfg(os.path.join(folder, "simo_r50_200ep_released.yaml"), check_paths=False)
    assert rel.MODEL.METHOD == "simo" and rel.SOLVER.IMS_PER_BATCH == 256
    assert (rel.LOSS.NAME, rel.LOSS.NUM_NEGATIVES) == ("infonce", 255)
    assert rel.LOSS.SHARED_NEGATIVES
    assert rel.MODEL.ZERO_INIT_RESIDUAL and rel.MODEL.HEAD_INIT_STD == 0.01
    assert (rel.SOLVER.BASE_LR, rel.SOLVER.WEIGHT_DECAY, rel.LOSS.TAU) == (0.03, 1e-4, 0.2)
    assert engine.warmup_iterations(rel, iters_per_epoch=5004) == 10
    paper = load_pretrain_cfg(os.path.join(folder, "simo_r50_200ep.yaml"), check_paths=False)
    assert engine.warmup_iterations(paper, iters_per_epoch=5004) == 5 * 5004
    assert not paper.MODEL.ZERO_INIT_RESIDUAL and not paper.LOSS.SHARED_NEGATIVES
    official = load_pretrain_cfg(
        os.path.join(folder, "simmoco_r50_200ep_official.yaml"), check_paths=False
    )
    assert official.LOSS.LOCAL_NEGATIVES and not official.LOSS.SYMMETRIC
    assert (official.MODEL.NORM, official.SOLVER.WEIGHT_DECAY) == ("BN", 5e-4)
    assert official.SOLVER.WARMUP_EPOCHS == 10.0


def _cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "pretrain.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_cli_bad_key_exits_with_one_sentence(tmp_path):
    proc = _cli("--config-file", "configs/pretrain/simo_shapes_cpu.yaml", "LOSS.ALPHAA", "3")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: command-line override: unknown config key LOSS.ALPHAA; check the spelling "
        "against pretrain/config.py."
    ]


@pytest.mark.slow
def test_cli_two_cpu_processes_and_resume(shapes, tmp_path):
    """The real CLI: 2 gloo processes (detectron2 launch picks gloo without CUDA, SyncBN becomes
    NaiveSyncBatchNorm), then --resume continues to a longer schedule."""
    common = [
        "MODEL.ARCH", "resnet18", "MODEL.DIM", "16", "MODEL.MLP_HIDDEN", "32", "INPUT.SIZE", "16",
        "DATASETS.ROOT", shapes, "SOLVER.IMS_PER_BATCH", "8", "LOSS.NUM_NEGATIVES", "4",
        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "ddp"),
        "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.WARMUP_EPOCHS", "0",
        "MODEL.DEVICE", "cpu",  # gloo processes that do not see a GPU, also on a GPU machine
    ]  # fmt: skip
    proc = _cli("--num-gpus", "2", "--dist-url", "auto", *common, "SOLVER.MAX_ITER", "2")
    assert proc.returncode == 0, proc.stderr[-6000:]
    first = load_checkpoint(str(tmp_path / "ddp" / "model_final.pth"))
    assert first["meta"]["iteration"] == 2 and len(first["rng"]["per_rank"]) == 2
    proc = _cli(
        "--num-gpus", "2", "--dist-url", "auto", "--resume", *common, "SOLVER.MAX_ITER", "3"
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert load_pretrain_cfg(str(tmp_path / "ddp" / "config.yaml")).SOLVER.MAX_ITER == 3
    log = (tmp_path / "ddp" / "log.txt").read_text()
    assert "Resumed at iteration 2" in log and "World size: 2" in log
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["iterations"] == 3 and results["ims_per_batch"] == 8


@pytest.mark.parametrize(
    "method,loss", [("simo", "eqco"), ("mocov2", "infonce"), ("simclr", "dcl")]
)
def test_steps_between_log_periods_never_wait_for_the_device(
    method, loss, shapes, tmp_path, tiny_pretrain_cfg, monkeypatch
):
    """Outside every LOG_PERIOD-th step (and the last), a training step reads nothing back from
    the device (.item(), .cpu(), bool/int/float of a tensor, ...) and runs no collective besides
    the loss's own gathers: metrics, the NaN/inf check and the health values are read once per
    period. Counted in the main process (the data pipeline runs in a worker)."""
    over = {
        "MODEL.METHOD": method,
        "LOSS.NAME": loss,
        "LOSS.QUEUE_SIZE": 16,
        "SOLVER.MAX_ITER": 8,
        "SOLVER.CHECKPOINT_PERIOD": 100,
        "LOG_PERIOD": 4,
        "DATALOADER.NUM_WORKERS": 1,
    }
    cfg = tiny_pretrain_cfg(shapes, tmp_path / method, **over)
    seed_all_rng(cfg.SEED)
    run = Pretrainer(cfg)
    now = [-1]  # the iteration being run (-1: set-up)
    reads = []

    class Mark(HookBase):
        def before_step(self):
            now[0] = self.trainer.iter

    mark = Mark()
    mark.trainer = run.trainer
    run.trainer._hooks.insert(0, mark)
    loading = [False]  # the sampler's host-side work at epoch starts is data loading, not a read

    def batches():
        it = iter(run.loader)
        while True:
            loading[0] = True
            batch = next(it)
            loading[0] = False
            yield batch

    run.trainer.reset_data_loader(batches)
    for name in ("item", "cpu", "tolist", "numpy", "__float__", "__bool__", "__int__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            if not loading[0]:
                reads.append((now[0], _name))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    for module, names in ((torch.distributed, ("all_reduce", "broadcast", "barrier", "gather")),
                          (comm, ("gather", "all_gather", "synchronize", "reduce_dict"))):
        for name in names:
            real = getattr(module, name)

            def counting_call(*args, _real=real, _name=name, **kwargs):
                reads.append((now[0], _name))
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, name, counting_call)
    run.train()
    monkeypatch.undo()
    steps = {it for it, _ in reads if it >= 0}
    assert steps <= {3, 7}, sorted(reads)  # (3 + 1) % 4 == 0, and the last iteration
    assert {3, 7} <= steps  # they do read: the check counts what it claims to
