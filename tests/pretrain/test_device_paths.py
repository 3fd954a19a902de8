"""The CUDA / NCCL code paths, reached on the CPU: float16 loss scaling (CPU autocast and
``torch.amp.GradScaler("cpu")``), the device of each process under torchrun / srun / mpirun
(environment variables), gathers of channels_last tensors and draws that every process must share
(gloo processes), MODEL.DEVICE, and device-neutral random states."""

import functools
import json
import logging
import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

import pretrain.engine.launch as launch
from pretrain.config import get_pretrain_cfg
from pretrain.engine import RNGStates
from pretrain.io import UserError
from pretrain.methods import ContrastiveMethod, build_method
from pretrain.methods.base import concat_all_gather
from pretrain.pretrainer import Pretrainer


@pytest.fixture(scope="module")
def shapes(shapes_folder):
    return shapes_folder(48, 16, 32, style="colour")


def _run(cfg):
    seed_all_rng(cfg.SEED)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    trainer = Pretrainer(cfg).resume_or_load(resume=False)
    return trainer, trainer.train()


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


class _Tiny(torch.nn.Module):
    """A linear layer whose loss is ``factor * mean(out^2)``; in float16 autocast the gradient of
    its output is float16, so a large loss scale overflows it (as a GPU run's first steps do)."""

    def __init__(self, factor=1.0):
        super().__init__()
        torch.manual_seed(0)  # the same weights whatever ran before in this process
        self.fc = torch.nn.Linear(4, 4)
        self.factor = factor

    def forward(self, x):
        return {"loss": self.factor * self.fc(x).float().pow(2).mean()}


def _loop(model, init_scale, max_iter=40, period=5, max_skipped=30):
    """detectron2's loop as the runs build it (:func:`pretrain.engine.build_trainer`) in float16
    CPU autocast with a GradScaler, and the FiniteCheckHook; returns the trainer."""
    from detectron2.engine import hooks

    from pretrain.engine import FiniteCheckHook, build_trainer

    g = torch.Generator().manual_seed(0)
    data = iter(lambda: torch.randn(8, 4, generator=g), None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    trainer = build_trainer(
        model, data, optimizer, amp_dtype=torch.float16, grad_scaler=scaler, log_period=period,
        device_type="cpu",
    )
    check = FiniteCheckHook(model.parameters(), period=period, max_skipped=max_skipped)
    trainer.register_hooks([hooks.IterationTimer(), check])
    trainer.train(0, max_iter)
    return trainer


def test_fp16_overflow_steps_are_skipped_and_counted_not_divergence():
    """Before: the gradients were checked right after the scaled backward, so the first overflow
    step (which the scaler skips) stopped the run as 'diverged'."""
    model = _Tiny()
    trainer = _loop(model, init_scale=2.0**40)
    scale = trainer.grad_scaler.get_scale()
    assert 1.0 <= scale < 2.0**17  # halved until float16 held the gradients
    hist = trainer.storage.history("amp/skipped_steps").values()
    skipped = [v for v, _ in hist]
    # log2(2^40 / scale) skipped steps (each halves the scale), counted and written every 5
    # iterations; the other steps trained
    assert skipped[-1] == 40 - round(torch.tensor(scale).log2().item()) and 20 <= skipped[-1] < 30
    assert len(skipped) == 8 and skipped == sorted(skipped)
    assert trainer.storage.history("amp/loss_scale").latest() == scale
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_long_run_of_skipped_steps_stops_the_run():
    from pretrain.engine import NonFiniteLossError

    # a loss of 1e38: its gradients overflow at any loss scale >= 1, every step is skipped
    with pytest.raises(NonFiniteLossError, match="overflowed in 6 consecutive steps") as e:
        _loop(_Tiny(factor=1e38), init_scale=1.0, max_iter=40, period=4, max_skipped=6)
    assert e.value.iteration == 0 and e.value.detected == 7  # the first read after step 6


def test_fp16_nan_loss_stops_the_run_before_its_update():
    from pretrain.engine import NonFiniteLossError

    model = _Tiny(factor=float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match="non-finite at iteration 0") as e:
        _loop(model, init_scale=2.0**16, period=3)
    assert e.value.detected == 2
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # all skipped


def test_fp16_pretraining_runs_with_cpu_autocast(shapes, tmp_path, tiny_pretrain_cfg, monkeypatch):
    """The whole run in float16 (CPU autocast, ~4 s a step here): the device-generic AMP trainer,
    the GradScaler in the checkpoint, the skipped steps in metrics.json."""
    monkeypatch.setattr(
        torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**13)
    )
    cfg = tiny_pretrain_cfg(
        shapes,
        tmp_path / "fp16",
        **{
            "MODEL.DEVICE": "cpu",
            "SOLVER.AMP.ENABLED": True,
            "SOLVER.AMP.PRECISION": "float16",
            "SOLVER.MAX_ITER": 5,
            "SOLVER.CHECKPOINT_PERIOD": 5,
            "TEST.RETRIEVAL_SIZE": 0,
        },
    )
    trainer, results = _run(cfg)
    assert type(trainer.trainer).__name__ == "DeviceAMPTrainer"
    scale = trainer.grad_scaler.get_scale()
    rows = [r for r in _metrics(cfg.OUTPUT_DIR) if "amp/skipped_steps" in r]
    # measured: 2^13 overflows twice on this model (fits at 2^11)
    assert len(rows) == 5 and rows[-1]["amp/skipped_steps"] == 13 - torch.tensor(scale).log2()
    assert rows[-1]["amp/skipped_steps"] >= 1 and rows[-1]["amp/loss_scale"] == scale
    final = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), weights_only=True)
    assert final["grad_scaler"]["scale"] == scale
    assert results["final_loss"] is not None


def test_amp_without_a_gpu_is_one_sentence(shapes, tmp_path, tiny_pretrain_cfg):
    cfg = tiny_pretrain_cfg(
        shapes, tmp_path / "amp", **{"SOLVER.AMP.ENABLED": True, "MODEL.DEVICE": "auto"}
    )
    if torch.cuda.is_available():
        pytest.skip("a GPU is usable here: AMP runs on it")
    with pytest.raises(UserError, match="SOLVER.AMP.ENABLED asks for mixed precision on a GPU"):
        Pretrainer(cfg)


# ------------------------------------------------------------------ 2. the device of a process


def test_model_device_resolution(monkeypatch):
    assert launch.get_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="MODEL.DEVICE 'gpu' is unknown"):
        launch.resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch.get_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="MODEL.DEVICE cuda needs a usable CUDA GPU, but"):
        launch.resolve_device("cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES is empty"):
        launch.resolve_device("cuda")
    # with CUDA, the device is the current one (the launcher set it to the local rank's GPU),
    # never GPU 0 by default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert launch.get_device("auto") == torch.device("cuda", 3)
    assert launch.get_device("cuda") == torch.device("cuda", 3)
    cfg = get_pretrain_cfg()
    cfg.MODEL.DEVICE = "gpu"
    from pretrain.config import validate_run_config

    with pytest.raises(UserError, match="MODEL.DEVICE 'gpu' is unknown"):
        validate_run_config(cfg)


_LAUNCH_VARS = (
    "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID",
    "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
)  # fmt: skip


@pytest.mark.parametrize(
    "env,expected",
    [
        # torchrun
        (
            {"WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"},
            (9, 16, 1, 8),
        ),
        # srun with WORLD_SIZE exported: SLURM's rank, local rank and tasks per node ("8(x2)")
        (
            {"WORLD_SIZE": "16", "SLURM_PROCID": "10", "SLURM_LOCALID": "2",
             "SLURM_NTASKS_PER_NODE": "8(x2)"},
            (10, 16, 2, 8),
        ),
        # mpirun
        (
            {"WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
             "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
            (3, 4, 1, 2),
        ),
        # no local world size: -1, counted from the host names once the group is up
        ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3"}, (3, 4, 3, -1)),
    ],
)  # fmt: skip
def test_rank_and_local_rank_from_each_launcher(monkeypatch, env, expected):
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launch.local_rank_and_size() == expected


def test_missing_local_rank_is_one_sentence(monkeypatch):
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(UserError, match="WORLD_SIZE=8 is set but none of LOCAL_RANK / SLURM_"):
        launch.local_rank_and_size()


def test_gpu_of_a_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert launch._cuda_index(5) == 5
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU per task (srun)
    assert launch._cuda_index(5) == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(UserError, match="local rank 5 has no GPU of its own"):
        launch._cuda_index(5)


def _env_worker(rank, port, out_dir):
    # what srun gives each task (SLURM_LOCALID), with WORLD_SIZE / RANK exported and no
    # LOCAL_RANK / LOCAL_WORLD_SIZE
    for name in _LAUNCH_VARS:
        os.environ.pop(name, None)
    os.environ.update(
        WORLD_SIZE="2", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NNODES="1",
        MASTER_PORT=str(port),
    )
    os.environ.pop("MASTER_ADDR", None)
    torch.set_num_threads(1)

    def main():
        seen = (comm.get_rank(), comm.get_local_rank(), comm.get_local_size())
        torch.save(torch.tensor(seen), os.path.join(out_dir, f"rank{rank}.pt"))

    launch.launch_from_args(main, types.SimpleNamespace(), device="cpu")
    launch.finish_distributed()


def test_local_ranks_under_srun_without_local_world_size(free_port, tmp_path):
    """Before: LOCAL_WORLD_SIZE defaulted to 1, so every process had local rank 0 (GPU 0)."""
    mp.start_processes(
        _env_worker, args=(free_port, str(tmp_path)), nprocs=2, start_method="fork", join=True
    )
    seen = [torch.load(tmp_path / f"rank{r}.pt").tolist() for r in range(2)]
    assert seen == [[0, 0, 2], [1, 1, 2]]


def test_cpu_jobs_hide_the_gpus_from_spawned_workers(monkeypatch):
    """MODEL.DEVICE cpu with --num-gpus 2: detectron2's workers must not see a GPU (they would
    pick NCCL and assert the GPU count); the parent's environment is restored afterwards."""
    seen = []

    def fake_launch(worker, num_gpus, **kw):
        seen.append((num_gpus, os.environ.get("CUDA_VISIBLE_DEVICES")))

    monkeypatch.setattr(launch, "launch", fake_launch)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    args = types.SimpleNamespace(num_gpus=2, num_machines=1, machine_rank=0, dist_url="auto")
    launch.launch_from_args(print, args, device="cpu")
    launch.launch_from_args(print, types.SimpleNamespace(**{**vars(args), "num_gpus": 1}))
    assert seen == [(2, ""), (1, "0,1")]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_shapes_configs_are_device_neutral():
    from pretrain.config import load_pretrain_cfg
    from transfer.config import load_config

    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    assert load_config(os.path.join(root, "shapes_fpn_cpu.yaml"), []).MODEL.DEVICE == "auto"
    for name in ("simo_shapes_cpu.yaml", "sweep_shapes_cpu.yaml"):
        path = os.path.join(root, "pretrain", name)
        assert load_pretrain_cfg(path, check_paths=False).MODEL.DEVICE == "auto"


# ------------------------------------------------------------------ 3./4. gathers and draws


def _moco_cfg():
    cfg = get_pretrain_cfg()
    cfg.MODEL.METHOD, cfg.LOSS.NAME = "mocov2", "infonce"
    cfg.MODEL.ARCH, cfg.MODEL.DIM, cfg.MODEL.MLP_HIDDEN = "resnet18", 16, 32
    cfg.MODEL.MLP_BN, cfg.MODEL.NORM, cfg.MODEL.SHUFFLE_BN = False, "BN", True
    cfg.LOSS.QUEUE_SIZE, cfg.SOLVER.IMS_PER_BATCH = 16, 8
    return cfg


def _simo_shared_cfg():
    cfg = get_pretrain_cfg()
    cfg.MODEL.ARCH, cfg.MODEL.DIM, cfg.MODEL.MLP_HIDDEN = "resnet18", 16, 32
    cfg.MODEL.NORM = "BN"
    cfg.LOSS.NUM_NEGATIVES, cfg.LOSS.SHARED_NEGATIVES, cfg.SOLVER.IMS_PER_BATCH = 3, True, 8
    return cfg


def _views():
    g = torch.Generator().manual_seed(7)
    return torch.randn(8, 3, 16, 16, generator=g).double(), torch.randn(8, 3, 16, 16, generator=g)


def _simo_shared_loss(rank, world, generator_seed):
    torch.manual_seed(0)
    model = build_method(_simo_shared_cfg(), torch.device("cpu")).double().eval()
    model.generator.manual_seed(generator_seed)
    n = 8 // world
    im_q, im_k = _views()
    loss = model.losses(im_q[rank * n : (rank + 1) * n], im_k.double()[rank * n : (rank + 1) * n])
    return loss["loss"].detach()


def _gather_worker(rank, init_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    out = {}
    # channels_last images of every process, gathered (MoCo's shuffling BN with CHANNELS_LAST)
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5) + 1000 * rank
    gathered = concat_all_gather(x.contiguous(memory_format=torch.channels_last))
    out["gathered"] = gathered.contiguous()
    out["gathered_nhwc"] = torch.tensor(gathered.is_contiguous(memory_format=torch.channels_last))
    # MoCo's shuffle with per-process generators that disagree (rank 1's is seeded otherwise): the
    # permutation is process 0's everywhere, so un-shuffling gives each process its own keys
    torch.manual_seed(0)
    moco = build_method(_moco_cfg(), torch.device("cpu")).double().eval()
    moco.generator.manual_seed(100 + rank)
    local = _views()[0][rank * 4 : (rank + 1) * 4]
    out["shuffle_diff"] = (moco.embed_k(local) - ContrastiveMethod.embed_k(moco, local)).abs().max()
    # SiMo's shared negatives with disagreeing generators: process 0's draw for every query
    losses = [torch.zeros((), dtype=torch.float64) for _ in range(2)]
    dist.all_gather(losses, _simo_shared_loss(rank, 2, generator_seed=100 + rank))
    out["simo_shared"] = torch.stack(losses).mean()
    if rank == 0:
        torch.save(out, result_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def gather_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gather")
    result_file = str(tmp / "results.pt")
    mp.start_processes(
        _gather_worker,
        args=(str(tmp / "init"), result_file),
        nprocs=2,
        start_method="fork",
        join=True,
    )
    return torch.load(result_file, weights_only=True)


def test_channels_last_gather_keeps_every_pixel_in_place(gather_results):
    expected = torch.cat(
        [torch.arange(120, dtype=torch.float32).view(2, 3, 4, 5) + 1000 * r for r in range(2)]
    )
    assert torch.equal(gather_results["gathered"], expected)
    assert bool(gather_results["gathered_nhwc"])  # the result keeps the input's memory format


def test_gather_receives_in_the_layout_it_sends(monkeypatch):
    """NCCL copies bytes: the receive buffers must have the strides of what is sent. Before, an
    NHWC tensor was sent as NCHW bytes into NHWC buffers (gloo happens to reorder it right)."""
    sent = []

    def all_gather(out, x):
        sent.append(x)
        assert all(o.shape == x.shape and o.stride() == x.stride() for o in out)
        for o in out:
            o.copy_(x)

    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    got = concat_all_gather(x)
    assert sent[0].is_contiguous() and torch.equal(got, torch.cat([x, x]))
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_shuffle_permutation_is_process_0s_everywhere(gather_results):
    assert gather_results["shuffle_diff"] < 1e-12


def test_shared_negatives_are_process_0s_everywhere(gather_results):
    # one process holding the global batch, with process 0's generator state
    alone = _simo_shared_loss(0, 1, generator_seed=100)
    torch.testing.assert_close(gather_results["simo_shared"], alone, rtol=1e-10, atol=1e-12)
    # not vacuous: another draw gives another loss
    assert not torch.allclose(_simo_shared_loss(0, 1, generator_seed=101), alone, rtol=1e-6)


# ------------------------------------------------------------------ 4. device-neutral RNG state


def test_negatives_generator_is_a_cpu_generator_and_its_state_resumes_anywhere(caplog):
    cfg = _simo_shared_cfg()
    torch.manual_seed(0)
    model = build_method(cfg, torch.device("cpu"))
    assert model.generator.device.type == "cpu"
    model.generator.manual_seed(5)
    state = RNGStates({"model": model.generator}).state_dict()
    expected = torch.randperm(100, generator=model.generator)
    # resumed (on whatever device the model is): the same draws
    other = build_method(cfg, torch.device("cpu"))
    RNGStates({"model": other.generator}).load_state_dict(state)
    assert torch.equal(torch.randperm(100, generator=other.generator), expected)
    # a CUDA (Philox, 16-byte) generator state, as an older GPU run saved it: a warning, the run
    # goes on from its seed instead of failing in set_state
    state["per_rank"][0]["generators"]["model"] = torch.zeros(16, dtype=torch.uint8)
    before = other.generator.get_state()
    with caplog.at_level(logging.WARNING, logger="pretrain.engine.checkpoint"):
        RNGStates({"model": other.generator}).load_state_dict(state)
    assert "generator state (16 bytes) is not that of this run's CPU generator" in caplog.text
    assert torch.equal(other.generator.get_state(), before)


def test_tf32_key_sets_both_backends():
    from pretrain.engine.launch import set_tf32

    assert get_pretrain_cfg().TF32 is True
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        set_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_ddp_wraps_the_model_on_the_gpu_it_is_on(monkeypatch):
    """detectron2 passes device_ids=[local rank]; with one visible GPU per process (srun) local
    rank 3's model is on cuda:0."""
    import pretrain.engine.run as run

    seen = {}
    monkeypatch.setattr(run, "_d2_create_ddp_model", lambda model, **kw: seen.update(kw))

    class OnCuda0(torch.nn.Module):
        def parameters(self, recurse=True):
            yield types.SimpleNamespace(device=torch.device("cuda", 0))

    run.create_ddp_model(OnCuda0(), broadcast_buffers=False)
    assert seen == {"device_ids": [0], "broadcast_buffers": False}
    run.create_ddp_model(torch.nn.Linear(2, 2))
    assert seen["device_ids"] is None


def test_every_stage_has_the_tf32_key():
    from pretrain.lincls.config import get_lincls_cfg
    from transfer.config import get_transfer_cfg

    assert get_lincls_cfg().TF32 is True and get_transfer_cfg().TF32 is True


def test_resume_after_switching_amp_precision(shapes, tmp_path, tiny_pretrain_cfg):
    """The divergence message says: with float16, try bfloat16 and restart with --resume. A
    checkpoint's scaler state must load whatever SOLVER.AMP the resumed run has (before: torch
    refused the empty state of a disabled scaler, or the saved one, with a traceback)."""
    out = tmp_path / "switch"
    common = {"MODEL.DEVICE": "cpu", "SOLVER.CHECKPOINT_PERIOD": 2, "TEST.RETRIEVAL_SIZE": 0}
    _run(tiny_pretrain_cfg(shapes, out, **common, **{"SOLVER.MAX_ITER": 2}))  # float32
    fp16 = {"SOLVER.AMP.ENABLED": True, "SOLVER.AMP.PRECISION": "float16"}
    cfg = tiny_pretrain_cfg(shapes, out, **common, **fp16, **{"SOLVER.MAX_ITER": 3})
    seed_all_rng(cfg.SEED)
    trainer = Pretrainer(cfg).resume_or_load(resume=True)
    assert trainer.start_iter == 2 and trainer.grad_scaler.get_scale() == 2.0**16
    trainer.train()
    saved = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["grad_scaler"]
    assert saved["scale"] > 0  # a float16 scaler's state now
    # and back: float16 checkpoint -> bfloat16 (no scaler) resumes too
    bf16 = {"SOLVER.AMP.ENABLED": True, "SOLVER.AMP.PRECISION": "bfloat16"}
    cfg = tiny_pretrain_cfg(shapes, out, **common, **bf16, **{"SOLVER.MAX_ITER": 4})
    trainer = Pretrainer(cfg).resume_or_load(resume=True)
    assert trainer.start_iter == 3 and not trainer.grad_scaler.is_enabled()


def test_detection_trainer_state_loads_across_amp_modes():
    from pretrain.engine import build_trainer

    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    amp = build_trainer(model, iter([]), opt, amp_dtype=torch.float16, grad_scaler=scaler,
                        device_type="cpu")  # fmt: skip
    amp.load_state_dict({"iteration": 5, "optimizer": opt.state_dict()})  # a float32 run's
    assert scaler.get_scale() == 8.0
    bf16 = torch.amp.GradScaler("cpu", enabled=False)
    amp_bf16 = build_trainer(model, iter([]), opt, amp_dtype=torch.bfloat16, grad_scaler=bf16,
                             device_type="cpu")  # fmt: skip
    amp_bf16.load_state_dict(amp.state_dict())  # a float16 run's state into bfloat16
    assert not bf16.is_enabled()
