"""Multi-node correctness of the shared engine (pretrain.engine.TrainingRun), with two gloo
processes on CPU: only process 0 deletes old checkpoints, resume is decided by process 0, and
OUTPUT_DIRs that the processes do not share (node-local disks) are one clear error on every
process instead of a hang."""

import json
import os

import pytest
import torch
import torch.distributed as dist
from detectron2.config import CfgNode
from detectron2.engine import hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.solver import LRMultiplier
from detectron2.utils import comm

from pretrain.engine import AtomicCheckpointer, RNGStates, TrainingRun, build_lr_multiplier
from pretrain.io import UserError, load_checkpoint

TIMEOUT_S = 120  # a hang fails the test instead of blocking the suite


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 1)

    def forward(self, batch):
        x, y = batch
        return {"loss": ((self.fc(x) - y) ** 2).mean()}


class _Loader:
    """Endless batches of 2 random samples, different on each process."""

    def __init__(self, rank: int) -> None:
        self.g = torch.Generator().manual_seed(rank)

    def __iter__(self):
        while True:
            yield torch.randn(2, 4, generator=self.g), torch.randn(2, 1, generator=self.g)

    def epochs_done(self) -> float:
        return 0.0


class TinyRun(TrainingRun):
    """The smallest TrainingRun: a linear layer under DDP, the engine's hooks and checkpointer
    (with the collective RNG states), nothing else."""

    stage = "tiny"

    def __init__(self, cfg: CfgNode, max_iter: int) -> None:
        super().__init__(cfg)
        torch.manual_seed(0)
        self.net = _Net()
        self.loader = _Loader(comm.get_rank())
        self.max_iter = max_iter
        opt = torch.optim.SGD(self.net.parameters(), lr=0.1)
        self.build_trainer(create_ddp_model(self.net, device_ids=None), opt)
        self.scheduler = LRMultiplier(opt, build_lr_multiplier(max_iter, 0), max_iter)
        self.checkpointer = AtomicCheckpointer(
            self.net, cfg.OUTPUT_DIR, optimizer=opt, scheduler=self.scheduler, rng=RNGStates()
        )
        self.register_hooks()

    def build_hooks(self):
        return self.loop_hooks(self.scheduler, self.cfg.SOLVER.CHECKPOINT_PERIOD)


def _cfg(out: str, max_to_keep: int = 0) -> CfgNode:
    return CfgNode(
        {
            "OUTPUT_DIR": out,
            "LOG_PERIOD": 1,
            "MODEL": {"DEVICE": "cpu"},
            "SOLVER": {"MAX_TO_KEEP": max_to_keep, "IMS_PER_BATCH": 4, "CHECKPOINT_PERIOD": 1},
        }
    )


class _RecordingPathManager:
    """The checkpointer hook's path manager, recording what it deletes."""

    def __init__(self, inner) -> None:
        self.inner, self.removed = inner, []

    def exists(self, path):
        return self.inner.exists(path)

    def rm(self, path):
        self.removed.append(os.path.basename(path))
        self.inner.rm(path)


def _retention(rank, out):
    run = TinyRun(_cfg(out, max_to_keep=1), max_iter=4)
    (ckpt_hook,) = [h for h in run.trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    recorder = ckpt_hook.path_manager = _RecordingPathManager(ckpt_hook.path_manager)
    run.run_loop()
    return {"max_to_keep": ckpt_hook.max_to_keep, "removed": recorder.removed}


def _train_then_resume(rank, out):
    TinyRun(_cfg(out), max_iter=2).resume_or_load(resume=True).run_loop()
    comm.synchronize()
    run = TinyRun(_cfg(out), max_iter=4)
    if rank == 1:  # this process's own view of OUTPUT_DIR says "no checkpoint": not asked
        run.checkpointer.has_checkpoint = lambda: False
        run.checkpointer.get_checkpoint_file = lambda: os.path.join(out, "model_0000000.pth")
    run.resume_or_load(resume=True)
    start = run.start_iter
    run.run_loop()
    return {"start_iter": start, "weights": run.net.fc.weight.detach().flatten().tolist()}


def _node_local(rank, out):
    TinyRun(_cfg(out), max_iter=2).resume_or_load(resume=True).run_loop()
    return {"trained": True}


SCENARIOS = {"retention": _retention, "resume": _train_then_resume, "node_local": _node_local}


def _worker(rank, scenario, outs, init_file, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = SCENARIOS[scenario](rank, outs[rank])
    except UserError as e:
        result = {"error": str(e)}
    with open(os.path.join(result_dir, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture
def two_processes(tmp_path, run_forked):
    """``two_processes(scenario, outs)`` runs ``scenario`` on two gloo processes: their results,
    or a failure after TIMEOUT_S."""

    def run(scenario, outs):
        result_dir = tmp_path / f"results_{scenario}"
        result_dir.mkdir()
        run_forked(
            _worker, (scenario, outs, str(tmp_path / f"init_{scenario}"), str(result_dir)), 2,
            timeout_s=TIMEOUT_S, what=scenario,
        )  # fmt: skip
        return [json.loads((result_dir / f"{r}.json").read_text()) for r in range(2)]

    return run


def test_only_rank_0_deletes_old_checkpoints(two_processes, tmp_path):
    out = str(tmp_path / "run")
    r0, r1 = two_processes("retention", [out, out])
    assert (r0["max_to_keep"], r1["max_to_keep"]) == (1, None)
    assert r0["removed"] == ["model_0000000.pth", "model_0000001.pth", "model_0000002.pth"]
    assert r1["removed"] == []  # the other process never touches the shared folder
    kept = sorted(f for f in os.listdir(out) if f.endswith(".pth"))
    assert kept == ["model_0000003.pth", "model_final.pth"]
    # saving stays collective: the RNG states of both processes are in the checkpoint
    ckpt = load_checkpoint(os.path.join(out, "model_final.pth"))
    assert ckpt["iteration"] == 3 and len(ckpt["rng"]["per_rank"]) == 2


def test_resume_is_decided_by_rank_0(two_processes, tmp_path):
    out = str(tmp_path / "run")
    r0, r1 = two_processes("resume", [out, out])
    assert r0["start_iter"] == r1["start_iter"] == 2
    assert r0["weights"] == r1["weights"]  # both continued from the same state, in step
    assert load_checkpoint(os.path.join(out, "model_final.pth"))["iteration"] == 3


def test_node_local_output_dirs_are_one_error_on_every_rank(two_processes, tmp_path):
    outs = [str(tmp_path / "node0" / "run"), str(tmp_path / "node1" / "run")]
    r0, r1 = two_processes("node_local", outs)
    assert r0 == r1 and "error" in r0
    msg = r0["error"]
    assert msg.startswith(f"OUTPUT_DIR {outs[0]} is not shared by all processes: process(es) 1 ")
    assert "every machine mounts" in msg and msg.count(". ") == 0 and "\n" not in msg
    # before any work: nothing was trained or saved, and the check left no file behind
    assert os.listdir(outs[0]) == []
    assert not os.path.exists(os.path.join(outs[1], "model_final.pth"))
