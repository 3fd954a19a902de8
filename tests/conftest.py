"""Shared by every test module."""
import os
import socket
import sys
import time

# `make test` is the CPU's suite on any machine, with 0, 1 or more GPUs: its numbers, exact resumes
# and gloo processes are the CPU's, and no test can land on a GPU another job holds. Set before
# anything initialises CUDA (torch reads it then). TEST_CUDA=1 (`make test-gpu`) lets the CUDA
# tests (marked gpu) see the GPUs.
if os.environ.get("TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

import pretrain  # noqa: F401, E402  (before tools/ goes on the path, below)

# The experiment code of tools/sweep.py and tools/mi_toy.py (tools/experiments/, not installed)
# is imported as those tools import it, `from experiments.X import ...`: tools/ is last on the
# path, after the `pretrain` package was imported (tools/pretrain.py cannot shadow it then).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
if TOOLS not in sys.path:
    sys.path.append(TOOLS)


@pytest.fixture(autouse=True)
def _one_thread():
    # On a 2-core machine shared with data-loader workers or subprocesses, oversubscribed OpenMP
    # threads crawl; one intra-op thread per test process is the fastest setting.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory):
    """``shapes_folder(num_train, num_val, size, style="grey")`` -> the ImageFolder root of a
    shapes dataset (seed 0) made once per test session for those arguments. Tests must not write
    into it."""
    from transfer.shapes import make_shapes

    made = {}

    def make(num_train: int, num_val: int, size: int, style: str = "grey") -> str:
        key = (num_train, num_val, size, style)
        if key not in made:
            out = tmp_path_factory.mktemp("shapes") / "shapes"
            make_shapes(
                str(out), num_train=num_train, num_val=num_val, size=size, seed=0, style=style
            )
            made[key] = str(out / "imagefolder")
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_pretrain_cfg():
    """``tiny_pretrain_cfg(root, out, **overrides)`` -> a pretraining config of a few-second SiMo
    run (ResNet-18 at 16 px, N=8, K=4, no workers, a log line per step) on the ImageFolder
    ``root``, writing to ``out``; ``overrides`` are ``KEY: value`` config pairs."""
    from pretrain.config import get_pretrain_cfg

    def make(root: str, out, **over):
        cfg = get_pretrain_cfg()
        opts = {
            "MODEL.ARCH": "resnet18",
            "MODEL.DIM": 16,
            "MODEL.MLP_HIDDEN": 32,
            "MODEL.MOMENTUM": 0.99,
            "INPUT.SIZE": 16,
            "DATASETS.ROOT": root,
            "SOLVER.IMS_PER_BATCH": 8,
            "SOLVER.BASE_LR": 0.48,
            "SOLVER.WARMUP_EPOCHS": 0.0,
            "LOSS.NUM_NEGATIVES": 4,
            "DATALOADER.NUM_WORKERS": 0,
            "MODEL.DEVICE": "cpu",  # the CPU's numbers (exact resume etc.) on a GPU machine too
            "CUDNN_BENCHMARK": False,
            "LOG_PERIOD": 1,
            "OUTPUT_DIR": str(out),
        }
        opts.update(over)
        cfg.merge_from_list([x for kv in opts.items() for x in kv])
        return cfg

    return make


@pytest.fixture(scope="session")
def tiny_pretrain_argv():
    """``tiny_pretrain_argv(root, out, *opts)`` -> the arguments (after the Python executable) of
    ``tools/pretrain.py --resume`` with configs/pretrain/simo_shapes_cpu.yaml scaled down to a
    few-second run (ResNet-18 at 16 px, N=8, K=4, no warmup, no kNN evaluation, no workers, a log
    line per step) on the ImageFolder ``root``, writing to ``out``. ``opts`` are the test's own
    ``KEY value`` pairs (SOLVER.MAX_ITER at least), made strings; they come before OUTPUT_DIR."""

    def make(root: str, out, *opts) -> list:
        return [
            os.path.join(TOOLS, "pretrain.py"),
            "--config-file", os.path.join(REPO, "configs", "pretrain", "simo_shapes_cpu.yaml"),
            "--resume",
            "MODEL.DIM", "16", "MODEL.MLP_HIDDEN", "32", "INPUT.SIZE", "16",
            "DATASETS.ROOT", str(root), "SOLVER.IMS_PER_BATCH", "8", "LOSS.NUM_NEGATIVES", "4",
            "SOLVER.WARMUP_EPOCHS", "0", "TEST.KNN_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0",
            "LOG_PERIOD", "1",
            *(str(x) for x in opts),
            "OUTPUT_DIR", str(out),
        ]  # fmt: skip

    return make


@pytest.fixture
def free_port() -> int:
    """A TCP port of 127.0.0.1 free a moment ago: the MASTER_PORT of a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def run_forked():
    """``run_forked(fn, args, nprocs, timeout_s=..., what=..., meanwhile=None)`` runs
    ``fn(rank, *args)`` in ``nprocs`` forked processes (fork: under --import-mode=importlib a test
    module is not importable by name, so a spawned process could not find ``fn``) and waits for
    them; ``meanwhile(deadline)``, if given, runs in the test's process while they start (the
    deadline is time.monotonic()'s). The test fails if they still run ``timeout_s`` seconds after
    the start (a hang: ``what`` names them) or if one fails; processes left are killed either
    way."""
    import torch.multiprocessing as mp

    def run(fn, args, nprocs, *, timeout_s, what, meanwhile=None):
        ctx = mp.start_processes(fn, args=args, nprocs=nprocs, start_method="fork", join=False)
        deadline = time.monotonic() + timeout_s
        try:
            if meanwhile is not None:
                meanwhile(deadline)
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    pytest.fail(f"{what}: the processes still run after {timeout_s} s (a hang)")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()

    return run
