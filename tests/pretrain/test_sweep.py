"""tools/sweep.py with its experiment code (tools/experiments/ksweep_*) and the gradient-norm probe
it reads (pretrain.grad_norm, TEST.GRAD_NORM): the probe equals autograd and TEST.GRAD_NORM
registers it, bad sweeps fail before running, a cell runs tools/pretrain.py (TEST.GRAD_NORM True)
and tools/lincls.py beside tools/sweep.py, the random-init baseline is planned (or not,
--no-baseline) with the cells' linear-eval command and its weights are deterministic per seed, and a
2-cell sweep with its baseline writes sweep.csv/md/png and skips (or completes) finished cells and
baselines on re-run."""
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from detectron2.utils.events import EventStorage

from pretrain.config import get_pretrain_cfg
from pretrain.grad_norm import QueryGradNormHook
from pretrain.io import UserError
from pretrain.methods import build_method

# the experiment code beside the tools (tools/experiments/): tests/conftest.py puts tools/ on
# the path as tools/sweep.py and tools/mi_toy.py do
from experiments.ksweep_plan import SweepBaseline, plan_sweep
from experiments.ksweep_results import CSV_COLUMNS
from experiments.ksweep_run import run_sweep, write_random_init

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(ROOT, "tools")

LINCLS_CFG = os.path.join(ROOT, "configs", "lincls", "shapes_cpu.yaml")
SWEEP_CFG = os.path.join(ROOT, "configs", "pretrain", "sweep_shapes_cpu.yaml")

# a tiny SiMo: 16 px crops of 32 px shapes, batch 8, 3 iterations
TINY = [
    "MODEL.DIM", "16", "MODEL.MLP_HIDDEN", "32", "INPUT.SIZE", "16",
    "SOLVER.IMS_PER_BATCH", "8", "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100",
    "LOG_PERIOD", "1", "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip
TINY_LINCLS = [
    "SOLVER.EPOCHS", "2", "SOLVER.IMS_PER_BATCH", "16", "TEST.IMS_PER_BATCH", "32",
    "TEST.EVAL_PERIOD_EPOCHS", "0", "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def shapes(shapes_folder):
    return shapes_folder(48, 20, 32)


@pytest.mark.parametrize("loss", ["eqco", "infonce"])
def test_grad_norm_probe_equals_autograd_on_q(loss):
    cfg = get_pretrain_cfg()
    cfg.merge_from_list(
        ["MODEL.ARCH", "resnet18", "MODEL.DIM", "16", "MODEL.MLP_HIDDEN", "32", "LOSS.NAME", loss]
        + ["LOSS.NUM_NEGATIVES", "5", "MODEL.MOMENTUM", "0.9", "SOLVER.IMS_PER_BATCH", "8"]
    )
    torch.manual_seed(0)
    model = build_method(cfg, torch.device("cpu")).train()
    inner_loss = model.loss_fn
    im_q, im_k = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = model.generator.get_state()

    hook = QueryGradNormHook(model, period=1)
    hook.trainer = SimpleNamespace(iter=0, max_iter=1)
    with EventStorage(0) as storage:
        hook.before_train()
        hook.before_step()
        model(((im_q, im_k), None))["loss"].backward()
        hook.after_backward()
        hook.after_train()
        probed = storage.latest()["grad_norm_q"][0]
    assert model.loss_fn is inner_loss  # the wrapper is removed after training

    # reference: the same step with q exposed, d l_i / d q_i = N * dL/dq_i (L = mean_i l_i)
    model.load_state_dict(state)
    model.generator.set_state(gen)
    model.zero_grad()
    model.momentum_update()
    q = model.embed_q(im_q)
    q.retain_grad()
    model.pair_loss(q, model.embed_k(im_k)).backward()
    reference = (q.grad.norm(dim=1) * q.shape[0]).mean().item()
    assert probed == pytest.approx(reference, rel=1e-4)
    assert reference > 0.1


@pytest.mark.parametrize("on", [False, True])
def test_grad_norm_key_registers_the_hook(on, shapes, tmp_path, tiny_pretrain_cfg):
    from pretrain.pretrainer import Pretrainer

    cfg = tiny_pretrain_cfg(shapes, tmp_path / "run", **{"TEST.GRAD_NORM": on})
    assert get_pretrain_cfg().TEST.GRAD_NORM is False  # off by default
    trainer = Pretrainer(cfg)
    probes = [h for h in trainer.trainer._hooks if isinstance(h, QueryGradNormHook)]
    assert len(probes) == int(on)
    if on:
        assert probes[0].model is trainer.model and probes[0].period == cfg.LOG_PERIOD


def test_cells_run_the_tools_beside_the_sweep(shapes, tmp_path):
    plan = plan_sweep(
        SWEEP_CFG, ks=[4], losses=["eqco"], seeds=[0], out=str(tmp_path / "sweep"),
        opts=TINY + ["DATASETS.ROOT", shapes], lincls_config=LINCLS_CFG,
    )  # fmt: skip
    pre = plan.pretrain_cmds["eqco_k4_s0"]
    assert pre[:2] == [sys.executable, os.path.join(TOOLS, "pretrain.py")]
    assert "pretrain.sweep" not in " ".join(pre)
    opts = dict(zip(pre[pre.index("--resume") + 1 :: 2], pre[pre.index("--resume") + 2 :: 2]))
    assert opts["TEST.GRAD_NORM"] == "True" and opts["LOSS.NUM_NEGATIVES"] == "4"
    assert plan.pretrain_cfgs["eqco_k4_s0"].TEST.GRAD_NORM is True
    for cmd in plan.lincls_cmds.values():
        assert cmd[:2] == [sys.executable, os.path.join(TOOLS, "lincls.py")]


def test_k_that_does_not_fit_the_batch_fails_before_running(shapes, tmp_path):
    out = tmp_path / "sweep"
    with pytest.raises(UserError, match=r"cell infonce_k8_s0: LOSS.NUM_NEGATIVES=8 .* batch"):
        plan_sweep(
            SWEEP_CFG, ks=[4, 8], losses=["infonce"], seeds=[0], out=str(out),
            opts=TINY + ["DATASETS.ROOT", shapes], lincls_config=LINCLS_CFG,
        )  # fmt: skip
    assert not out.exists()
    with pytest.raises(UserError, match="MODEL.METHOD is 'simclr'.* simo or mocov2"):
        plan_sweep(
            SWEEP_CFG, ks=[4], losses=["eqco"], seeds=[0], out=str(out),
            opts=TINY + ["DATASETS.ROOT", shapes, "MODEL.METHOD", "simclr"],
            lincls_config=LINCLS_CFG,
        )  # fmt: skip
    with pytest.raises(UserError, match="--loss 'nce' is unknown"):
        plan_sweep(SWEEP_CFG, ks=[4], losses=["nce"], seeds=[0], out=str(out))


def test_mocov2_sweep_varies_the_queue_length(shapes, tmp_path):
    """With MODEL.METHOD mocov2, K is the queue length: K = 64 runs at a batch of 8."""
    plan = plan_sweep(
        SWEEP_CFG, ks=[4, 64], losses=["infonce", "eqco"], seeds=[0], out=str(tmp_path / "s"),
        opts=TINY + ["DATASETS.ROOT", shapes, "MODEL.METHOD", "mocov2"], lincls_config=LINCLS_CFG,
    )  # fmt: skip
    assert [c.name for c in plan.cells] == ["infonce_k4_s0", "infonce_k64_s0", "eqco_k4_s0",
                                            "eqco_k64_s0"]
    for cell in plan.cells:
        cfg = plan.pretrain_cfgs[cell.name]
        assert cfg.SOLVER.IMS_PER_BATCH == 8 and cfg.LOSS.QUEUE_SIZE == cell.k
        assert cfg.LOSS.NAME == cell.loss
        assert cell.alpha == (256.0 if cell.loss == "eqco" else cell.k)
    assert "LOSS.QUEUE_SIZE" in plan.pretrain_cmds["eqco_k64_s0"]


def test_cli_refuses_bad_input_with_one_sentence(shapes, tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "sweep.py"), "--config-file", SWEEP_CFG]
        + ["--k", "300", "--loss", "eqco", "--seeds", "0", "--out", str(tmp_path / "s")]
        + ["DATASETS.ROOT", shapes]
        + ["SOLVER.IMS_PER_BATCH", "8"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "error: cell eqco_k300_s0: LOSS.NUM_NEGATIVES=300" in proc.stderr
    assert "Traceback" not in proc.stderr


def _opts_without(cmd, keys):
    """``cmd`` minus the ``KEY VALUE`` pairs of ``keys`` (and their values)."""
    out, skip = [], False
    for i, x in enumerate(cmd):
        if skip:
            skip = False
        elif x in keys and i > cmd.index("--resume"):
            skip = True
        else:
            out.append(x)
    return out


def test_baseline_is_planned_per_seed_with_the_cells_linear_eval(shapes, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    kw = dict(
        ks=[4], losses=["infonce", "eqco"], seeds=[0, 1], out=str(out),
        opts=TINY + ["DATASETS.ROOT", shapes], lincls_config=LINCLS_CFG, lincls_opts=TINY_LINCLS,
    )  # fmt: skip
    plan = plan_sweep(SWEEP_CFG, **kw)
    assert plan.baselines == [SweepBaseline("resnet18", 0), SweepBaseline("resnet18", 1)]
    for base in plan.baselines:
        name = f"random_init_s{base.seed}"
        assert base.name == name
        base_dir = out / "baseline" / name
        assert plan.random_init_path(base) == str(base_dir / "random_init.pth")
        assert plan.lincls_dir(base) == str(base_dir / "lincls")
        cmd = plan.lincls_cmds[name]
        opts = dict(zip(cmd[cmd.index("--resume") + 1 :: 2], cmd[cmd.index("--resume") + 2 :: 2]))
        assert opts["MODEL.WEIGHTS"] == str(base_dir / "random_init.pth")
        assert opts["OUTPUT_DIR"] == str(base_dir / "lincls")
        assert opts["NAME"] == "random init" and opts["SEED"] == str(base.seed)
        # the same command as the cells of its seed, weights, output and name aside
        changed = ("MODEL.WEIGHTS", "OUTPUT_DIR", "NAME")
        for cell in plan.cells:
            if cell.seed == base.seed:
                assert _opts_without(cmd, changed) == _opts_without(
                    plan.lincls_cmds[cell.name], changed
                )
    assert not out.exists()  # planning writes nothing

    no_base = plan_sweep(SWEEP_CFG, baseline=False, **kw)
    assert no_base.baselines == []
    assert sorted(no_base.lincls_cmds) == sorted(c.name for c in no_base.cells)

    # tools/sweep.py --no-baseline plans none, the default plans one per seed
    spec = importlib.util.spec_from_file_location("sweep_cli", os.path.join(ROOT, "tools/sweep.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    # tools/ is on the path (for tools/experiments) but tools/pretrain.py never shadows the package
    assert os.path.basename(cli.pretrain.__file__) == "__init__.py"
    planned = []

    def fake_run_sweep(plan, train=True):
        planned.append(plan)
        return {"ran": [], "skipped": [], "rows": [], "files": {}}

    monkeypatch.setattr(cli, "run_sweep", fake_run_sweep)
    # setup_logger would stop the "pretrain" loggers propagating (caplog in other tests)
    monkeypatch.setattr(cli, "setup_logger", lambda **kw: None)
    argv = ["--config-file", SWEEP_CFG, "--k", "4", "--loss", "eqco", "--seeds", "0", "1"]
    argv += ["--out", str(out), "--lincls-config", LINCLS_CFG, "DATASETS.ROOT", shapes] + TINY
    cli.main(argv)
    cli.main(["--no-baseline"] + argv)
    assert [b.name for b in planned[0].baselines] == ["random_init_s0", "random_init_s1"]
    assert planned[1].baselines == []


def test_random_init_is_deterministic_per_seed(tmp_path):
    rng = torch.get_rng_state()
    paths = [
        write_random_init("resnet18", seed, str(tmp_path / f"{i}.pth"))
        for i, seed in enumerate((0, 0, 1))
    ]
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random state is untouched
    first, again, other = (torch.load(p, weights_only=True) for p in paths)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["conv1.weight"], other["conv1.weight"])
    assert not list(tmp_path.glob(".tmp_*"))  # written through atomic_save


def _mtimes(paths):
    return {p: os.stat(p).st_mtime_ns for p in paths}


@pytest.mark.slow
def test_two_cell_sweep_writes_outputs_and_skips_finished_cells(shapes, tmp_path):
    out = tmp_path / "sweep"
    plan = plan_sweep(
        SWEEP_CFG, ks=[4], losses=["infonce", "eqco"], seeds=[0], out=str(out), alpha=256.0,
        opts=TINY + ["DATASETS.ROOT", shapes], lincls_config=LINCLS_CFG, lincls_opts=TINY_LINCLS,
    )  # fmt: skip
    first = run_sweep(plan, progress=False)
    # the random-init baseline runs first
    assert first["ran"] == ["random_init_s0", "infonce_k4_s0", "eqco_k4_s0"]
    assert first["skipped"] == []
    for name in ("sweep.csv", "sweep.md", "sweep.png"):
        assert (out / name).is_file(), name
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(out / "sweep.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    # the baseline's row: seed and top-1/top-5 of its linear evaluation, nothing else
    base_row = rows.pop()
    base_dir = out / "baseline" / "random_init_s0"
    base_lin = json.loads((base_dir / "lincls" / "results.json").read_text())
    assert base_lin["name"] == "random init"
    assert base_row["loss"] == "random_init" and base_row["seed"] == "0"
    assert float(base_row["top1"]) == pytest.approx(base_lin["top1"])
    assert 0 <= float(base_row["top1"]) <= 100
    assert float(base_row["top5"]) == pytest.approx(base_lin["top5"])
    for col in ("k", "alpha", "final_loss", "grad_norm", "pretrain_seconds"):
        assert base_row[col] == "", col
    # its weights: torchvision's resnet18 after torch.manual_seed(0), the same when made again
    made = torch.load(base_dir / "random_init.pth", weights_only=True)
    again = write_random_init("resnet18", 0, str(tmp_path / "again.pth"))
    again = torch.load(again, weights_only=True)
    assert made.keys() == again.keys() and all(torch.equal(made[k], again[k]) for k in made)
    assert [(r["loss"], int(r["k"]), float(r["alpha"]), int(r["seed"])) for r in rows] == [
        ("infonce", 4, 4.0, 0),  # InfoNCE = EqCo with alpha = K
        ("eqco", 4, 256.0, 0),
    ]
    for r in rows:
        cell = out / "cells" / f"{r['loss']}_k4_s0"
        lin = json.loads((cell / "lincls" / "results.json").read_text())
        pre = json.loads((cell / "pretrain" / "results.json").read_text())
        assert float(r["top1"]) == pytest.approx(lin["top1"]) and 0 <= float(r["top1"]) <= 100
        assert float(r["top5"]) == pytest.approx(lin["top5"])
        assert float(r["knn_top1"]) == pytest.approx(lin["knn_top1"])
        assert 0 <= float(r["knn_top1"]) <= 100
        assert float(r["final_loss"]) == pytest.approx(pre["final_loss"])
        assert pre["loss"] == r["loss"] and pre["num_negatives"] == 4 and pre["iterations"] == 3
        # grad_norm_q is logged at every iteration (LOG_PERIOD 1); the csv holds their mean
        metrics = (cell / "pretrain" / "metrics.json").read_text().splitlines()
        logged = [json.loads(x) for x in metrics if x]
        norms = [m["grad_norm_q"] for m in logged if "grad_norm_q" in m]
        assert len(norms) == 3 and all(math.isfinite(v) and v > 0 for v in norms)
        assert float(r["grad_norm"]) == pytest.approx(sum(norms) / 3)
        assert float(r["pretrain_seconds"]) > 0
    md = (out / "sweep.md").read_text()
    assert "| K | infonce (alpha=K) | eqco (alpha=256) |" in md
    top1 = {r["loss"]: float(r["top1"]) for r in rows}
    row = f"| 4 | {top1['infonce']:.2f} ± 0.00 (1 seed) | {top1['eqco']:.2f} ± 0.00 (1 seed) |"
    assert row in md
    base_line = (
        "Random-init ResNet-18, same evaluation: "
        f"{float(base_row['top1']):.2f} ± 0.00 (1 seed)"
    )
    base_knn = (
        "Random-init ResNet-18, same evaluation: "
        f"{float(base_row['knn_top1']):.2f} ± 0.00 (1 seed)"
    )
    knn = {r["loss"]: float(r["knn_top1"]) for r in rows}
    knn_row = f"| 4 | {knn['infonce']:.2f} ± 0.00 (1 seed) | {knn['eqco']:.2f} ± 0.00 (1 seed) |"
    assert base_line in md and knn_row in md
    assert md.index(row) < md.index(base_line) < md.index("## kNN top-1")
    assert md.index("## kNN top-1") < md.index(knn_row) < md.index(base_knn, md.index("## kNN"))
    assert md.index(base_knn, md.index("## kNN")) < md.index("## Gradient norm")

    # re-run: nothing trains again, the outputs are the same
    watched = [
        str(out / "cells" / c / d / f)
        for c in ("infonce_k4_s0", "eqco_k4_s0")
        for d, f in (("pretrain", "model_final.pth"), ("lincls", "results.json"))
    ]
    base_watched = [str(base_dir / "random_init.pth"), str(base_dir / "lincls" / "results.json")]
    before, csv_before = _mtimes(watched + base_watched), (out / "sweep.csv").read_text()
    second = run_sweep(plan, progress=False)
    assert second["ran"] == []
    assert second["skipped"] == ["random_init_s0", "infonce_k4_s0", "eqco_k4_s0"]
    assert _mtimes(watched + base_watched) == before
    assert (out / "sweep.csv").read_text() == csv_before

    # a cell whose linear eval is missing is completed without pretraining again
    lincls_results = out / "cells" / "eqco_k4_s0" / "lincls" / "results.json"
    lincls_results.unlink()
    third = run_sweep(plan, progress=False)
    assert third["ran"] == ["eqco_k4_s0"]
    assert third["skipped"] == ["random_init_s0", "infonce_k4_s0"]
    assert lincls_results.is_file()
    assert _mtimes(watched[:3] + base_watched) == {p: before[p] for p in watched[:3] + base_watched}


def test_infonce_at_k_equal_alpha_is_the_eqco_cell(shapes, tmp_path):
    """InfoNCE with K = alpha negatives is the EqCo loss (shift log(alpha/K) = 0): the sweep runs
    that cell once, as EqCo's, and reads the InfoNCE cell from the same directories."""
    plan = plan_sweep(
        SWEEP_CFG, ks=[4, 8], losses=["infonce", "eqco"], seeds=[0, 1], out=str(tmp_path / "s"),
        alpha=8.0, opts=TINY + ["DATASETS.ROOT", shapes, "MODEL.METHOD", "mocov2"],
        lincls_config=LINCLS_CFG,
    )  # fmt: skip
    assert len(plan.cells) == 8
    assert [c.name for c in plan.runs] == ["infonce_k4_s0", "infonce_k4_s1", "eqco_k4_s0",
                                           "eqco_k4_s1", "eqco_k8_s0", "eqco_k8_s1"]
    twin = next(c for c in plan.cells if c.name == "infonce_k8_s1")
    assert twin.same_as == "eqco_k8_s1" and twin not in plan.runs
    eqco = next(c for c in plan.runs if c.name == "eqco_k8_s1")
    assert plan.cell_dir(twin) == plan.cell_dir(eqco)
    assert "infonce_k8_s1" not in plan.pretrain_cmds and "infonce_k8_s1" not in plan.lincls_cmds
    # with only InfoNCE in the sweep there is no twin: K = alpha runs as InfoNCE
    alone = plan_sweep(
        SWEEP_CFG, ks=[8], losses=["infonce"], seeds=[0], out=str(tmp_path / "t"), alpha=8.0,
        opts=TINY + ["DATASETS.ROOT", shapes, "MODEL.METHOD", "mocov2"], lincls_config=LINCLS_CFG,
    )  # fmt: skip
    assert [c.name for c in alone.runs] == ["infonce_k8_s0"]
