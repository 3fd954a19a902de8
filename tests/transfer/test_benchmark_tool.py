"""tools/benchmark.py / transfer.benchmark: which config and overrides each run of a suite gets,
the skip of finished runs, and one sentence for bad input or a failed run."""

import json
import os
import subprocess
import sys

import pytest

from pretrain.io import UserError
from transfer.benchmark import BENCHMARKS, parse_suite, plan_runs, run_suite

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _opts(run) -> dict:
    args = run.args[run.args.index("--resume") + 1 :]
    return dict(zip(args[::2], args[1::2]))


def test_plan_configs_seeds_and_2x_schedule_at_cpu_size(tmp_path):
    weights = tmp_path / "w.pkl"
    weights.write_bytes(b"x")
    runs = plan_runs(parse_suite("voc,coco_c4_2x"), [0, 3], str(tmp_path / "out"),
                     pretraining="simo", weights=str(weights), size="shapes",
                     opts=["MODEL.RESNETS.DEPTH", "18"])  # fmt: skip
    assert [(r.bench.key, r.seed) for r in runs] == [
        ("voc", 0), ("voc", 3), ("coco_c4_2x", 0), ("coco_c4_2x", 3)
    ]
    assert runs[0].args[:5] == [
        "--config-file", os.path.join(ROOT, "configs", "voc_C4_shapes_cpu.yaml"), "--num-gpus",
        "1", "--resume",
    ]  # fmt: skip
    voc, c4_2x = _opts(runs[1]), _opts(runs[3])
    assert voc == {"MODEL.WEIGHTS": str(weights), "MODEL.RESNETS.DEPTH": "18", "SEED": "3",
                   "BENCHMARK": "voc", "OUTPUT_DIR": str(tmp_path / "out" / "voc" / "seed3")}
    # coco_mask_C4_shapes_cpu.yaml trains 80 iterations with steps at 55 and 70: 2x doubles both
    assert (c4_2x["SOLVER.MAX_ITER"], c4_2x["SOLVER.STEPS"]) == ("160", "(110,140,)")
    assert runs[3].args[1].endswith("coco_mask_C4_shapes_cpu.yaml")
    # full size: the pre-training's leaf; random init clears MODEL.WEIGHTS
    full = plan_runs([BENCHMARKS["coco_fpn_1x"]], [0], "o", pretraining="random_init",
                     weights=None, num_gpus=8)  # fmt: skip
    assert full[0].args[1].endswith("coco_mask_R_50_FPN_1x_random_init.yaml")
    assert full[0].args[3] == "8" and _opts(full[0])["MODEL.WEIGHTS"] == ""


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: parse_suite("voc,imagenet"), r"--suite 'voc,imagenet': unknown imagenet; give"),
        (lambda: plan_runs(parse_suite("voc"), [0, 0], "o", pretraining="simo", weights=None),
         r"--seeds 0 0: a seed is repeated"),
        (lambda: plan_runs(parse_suite("voc"), [0], "o", pretraining="simo", weights="nope.pkl"),
         r"--weights nope.pkl: no such file"),
    ],
)  # fmt: skip
def test_bad_input_is_one_sentence(call, match):
    with pytest.raises(UserError, match=match):
        call()


def test_finished_runs_are_skipped_and_a_failure_names_its_log(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    runs = plan_runs(parse_suite("voc"), [0, 1], str(out), pretraining="random_init",
                     weights=None, size="shapes")  # fmt: skip
    done = out / "voc" / "seed0"
    done.mkdir(parents=True)
    (done / "results.json").write_text(json.dumps(
        {"kind": "detection", "benchmark": "voc", "seed": 0, "bbox": {"AP": 1.0}}))
    assert runs[0].finished() and not runs[1].finished()
    # a results.json of another benchmark or seed does not count
    (done / "results.json").write_text(json.dumps({"kind": "detection", "benchmark": "voc",
                                                   "seed": 1}))  # fmt: skip
    assert not runs[0].finished()
    (done / "results.json").write_text(json.dumps({"kind": "detection", "benchmark": "voc",
                                                   "seed": 0}))  # fmt: skip
    # seed 1 fails for real: train_det finds no shapes data there (one sentence, exit status 2)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "no_datasets"))
    with pytest.raises(UserError, match=r"\[2/2\] voc seed 1 -> \S+seed1 failed \(exit status "
                                        r"2\); its log is \S+seed1/log.txt"):  # fmt: skip
        run_suite(runs)
    assert "[1/2] voc seed 0 -> " in capsys.readouterr().out


def test_cli_dry_run_prints_the_commands(tmp_path):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--pretraining",
         "random_init", "--suite", "voc,coco_fpn_2x", "--seeds", "0", "1", "--out",
         str(tmp_path), "--dry-run"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0] == f"[1/4] voc seed 0 -> {tmp_path}/voc/seed0: running"
    assert "configs/voc_R_50_C4_24k_random_init.yaml --num-gpus 1 --resume" in lines[1]
    assert "coco_mask_R_50_FPN_2x_random_init.yaml" in r.stdout
    assert lines[-1] == f"4 runs in {tmp_path}: 0 ran, 0 finished before, 0 failed"
