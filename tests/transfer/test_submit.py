"""tools/submit.py (submitit): the job's parameters and sbatch script, one-sentence refusals before
anything is queued, the requeue callable (--resume), and with submitit's local executor a tiny
2-process CPU pretraining run and a preempted run that is requeued, resumes and finishes."""

import importlib.util
import json
import os
import signal
import time

import pytest

from transfer.submit import ToolJob, parse_tool_args, slurm_parameters, with_resume

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "pretrain", "simo_shapes_cpu.yaml")


def _submit_main():
    spec = importlib.util.spec_from_file_location(
        "submit_tool", os.path.join(ROOT, "tools", "submit.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _tiny(root, out, max_iter, checkpoint_period):
    """Tool arguments of a few-second SiMo run (ResNet-18 at 16 px, N=8, K=4)."""
    return ["--config-file", CONFIG] + [
        str(x)
        for kv in {
            "DATASETS.ROOT": root,
            "OUTPUT_DIR": out,
            "MODEL.ARCH": "resnet18",
            "MODEL.DIM": 16,
            "MODEL.MLP_HIDDEN": 32,
            "INPUT.SIZE": 16,
            "SOLVER.IMS_PER_BATCH": 8,
            "SOLVER.MAX_ITER": max_iter,
            "SOLVER.WARMUP_EPOCHS": 0.0,
            "SOLVER.CHECKPOINT_PERIOD": checkpoint_period,
            "LOSS.NUM_NEGATIVES": 4,
            "DATALOADER.NUM_WORKERS": 0,
            "TEST.KNN_PERIOD": 0,
            "LOG_PERIOD": 1,
        }.items()
        for x in kv
    ]


def test_checkpoint_requeues_the_same_job_with_resume(tmp_path):
    job = ToolJob("pretrain", ["--config-file", "c.yaml", "SEED", "1"], str(tmp_path), "out")
    delayed = job.checkpoint()
    requeued = delayed.function
    assert isinstance(requeued, ToolJob) and delayed.args == () and delayed.kwargs == {}
    assert requeued.argv == ["--resume", "--config-file", "c.yaml", "SEED", "1"]
    assert (requeued.tool, requeued.cwd, requeued.output_dir) == ("pretrain", str(tmp_path), "out")
    assert job.argv == ["--config-file", "c.yaml", "SEED", "1"]  # the original is untouched
    # a second preemption does not add a second --resume; --eval-only never gets one (it would
    # evaluate OUTPUT_DIR's last checkpoint instead of MODEL.WEIGHTS)
    assert requeued.checkpoint().function.argv == requeued.argv
    eval_only = ["--eval-only", "MODEL.WEIGHTS", "w"]
    assert with_resume(eval_only) == eval_only
    # submitit pickles what checkpoint returns
    delayed.dump(tmp_path / "requeued.pkl")
    assert type(delayed).load(tmp_path / "requeued.pkl").function == requeued


def test_parse_tool_args_reads_output_dir_and_flags(shapes_folder, tmp_path):
    root = shapes_folder(48, 16, 32)
    args = parse_tool_args("pretrain", ["--resume"] + _tiny(root, tmp_path / "run", 2, 1))
    assert args.resume and not args.eval_only and args.output_dir == str(tmp_path / "run")
    assert slurm_parameters([("constraint", "volta32gb"), ("exclusive", "True")]) == {
        "slurm_constraint": "volta32gb",
        "slurm_exclusive": True,
    }


@pytest.mark.parametrize(
    "extra,tool_extra,fragment",
    [
        ([], ["--num-gpus", "8"], "--num-gpus: the job's processes come from --nodes"),
        ([], ["MODEL.NO_SUCH_KEY", "1"], "unknown config key MODEL.NO_SUCH_KEY"),
        (["--tasks-per-node", "3"], [], "SOLVER.IMS_PER_BATCH=8 is not divisible by the job's 3"),
        (["--tasks-per-node", "4"], ["MODEL.SYNC_BN_GROUP_SIZE", "3"], "groups of 3"),
        (["--tasks-per-node", "2", "--gpus-per-node", "4"], [], "one task per GPU"),
        (["--slurm-constraint"], [], "--slurm-constraint: unknown option"),
    ],
)
def test_bad_input_is_one_sentence_before_anything_is_queued(
    shapes_folder, tmp_path, capsys, extra, tool_extra, fragment
):
    root = shapes_folder(48, 16, 32)
    gpus = [] if "--gpus-per-node" in extra else ["--gpus-per-node", "0"]
    argv = ["--tool", "pretrain", "--cluster", "local", *gpus, *extra, "--"]
    with pytest.raises(SystemExit) as e:
        _submit_main()(argv + _tiny(root, tmp_path / "run", 2, 1) + tool_extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_missing_separator_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        _submit_main()(["--tool", "pretrain", "--config-file", "x.yaml"])
    assert e.value.code == 2 and "after --" in capsys.readouterr().err


def test_slurm_dry_run_writes_one_task_per_gpu(shapes_folder, tmp_path, capsys, monkeypatch):
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # no srun here
    root = shapes_folder(48, 16, 32)
    argv = "--tool pretrain --cluster slurm --nodes 2 --gpus-per-node 4 --partition learnfair "
    argv += "--timeout-min 60 --slurm-constraint volta32gb --slurm-qos=high --dry-run --"
    tool = _tiny(root, tmp_path / "run", 2, 1)
    _submit_main()(argv.split() + tool)
    out = capsys.readouterr().out
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=learnfair",
        "#SBATCH --time=60",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --constraint=volta32gb",
        "#SBATCH --qos=high",
        "#SBATCH --cpus-per-task=10",
        "#SBATCH --job-name=pretrain:run",
    ):
        assert line in out, line
    assert f"--output={tmp_path / 'run' / 'submitit'}" in out
    assert "on requeue: tools/pretrain.py --resume --config-file" in out


@pytest.mark.slow
def test_local_two_process_pretraining(shapes_folder, free_port, tmp_path, capsys, monkeypatch):
    """submitit's local executor, 2 CPU tasks: the process group comes from JobEnvironment."""
    monkeypatch.setenv("MASTER_PORT", str(free_port))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = shapes_folder(48, 16, 32)
    out = tmp_path / "run"
    argv = ["--tool", "pretrain", "--cluster", "local", "--gpus-per-node", "0"]
    argv += ["--tasks-per-node", "2", "--timeout-min", "5", "--wait", "--"]
    results = _submit_main()(argv + _tiny(root, out, 3, 2))
    assert results["iterations"] == 3 and results["final_loss"] > 0
    assert json.loads((out / "results.json").read_text())["iterations"] == 3
    assert "2 processes, global batch N=8" in (out / "log.txt").read_text()
    assert (out / "log.txt.rank1").exists()
    logs = sorted(os.listdir(out / "submitit"))
    assert len([f for f in logs if f.endswith("_log.out")]) == 2  # one log per task


def _task_pid(controller_pid, timeout=60):
    """The (only) task process the local controller started."""
    path = f"/proc/{controller_pid}/task/{controller_pid}/children"
    end = time.time() + timeout
    while time.time() < end:
        with open(path) as f:
            children = f.read().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("the local job started no task")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_local_preempted_job_requeues_with_resume_and_finishes(
    shapes_folder, tmp_path, monkeypatch
):
    """A preemption signal (SIGUSR2, what SLURM sends) to the running task: the run writes a
    checkpoint at the end of its step, then submitit's handler calls ToolJob.checkpoint, the job
    is requeued with --resume, resumes at the next step (not at the last periodic checkpoint)
    and finishes."""
    import submitit

    root = shapes_folder(48, 16, 32)
    out = tmp_path / "run"
    tool_argv = _tiny(root, out, 24, 4)
    executor = submitit.AutoExecutor(folder=str(out / "submitit"), cluster="local")
    executor.update_parameters(timeout_min=10, tasks_per_node=1, gpus_per_node=0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    job = executor.submit(ToolJob("pretrain", tool_argv, os.getcwd(), output_dir=str(out)))
    task = _task_pid(job._process.pid)
    end = time.time() + 120
    while not (out / "last_checkpoint").exists():  # the run saved model_0000003.pth
        assert time.time() < end and job.state == "RUNNING", job.stderr()
        time.sleep(0.05)
    os.kill(task, signal.SIGUSR2)
    results = job.results()[0]
    assert results["iterations"] == 24
    log = (out / "log.txt").read_text()
    stdout = job.stdout()
    assert "requeueing with --resume --config-file" in stdout
    assert "Resumed at iteration" in log, stdout
    resumed_at = int(log.split("Resumed at iteration ")[1].split()[0])
    stopped_at = int(log.split("Stopped by SIGUSR2 at iteration ")[1].split(";")[0])
    assert 0 < resumed_at < 24 and resumed_at == stopped_at + 1
    assert f"checkpoint {out / f'model_{stopped_at:07d}.pth'} written" in log
    assert (out / "model_final.pth").exists()


FAKE_TOOL = '''
import json, os
import torch
import torch.distributed as dist

def cli(argv):
    """A tool launching with detectron2's launch (no launch_from_args): the job's process group
    must already be there."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    out = {k: os.environ[k] for k in keys}
    out["world"] = dist.get_world_size() if dist.is_initialized() else 1
    t = torch.ones(1) * (int(os.environ["RANK"]) + 1)
    dist.all_reduce(t)
    out["sum"], out["cwd"] = t.item(), os.getcwd()
    with open(argv[0] + "." + os.environ["RANK"], "w") as f:
        json.dump(out, f)
'''


@pytest.mark.slow
def test_local_job_initialises_the_group_for_a_tool_without_launch_from_args(
    free_port, tmp_path, monkeypatch
):
    import submitit

    monkeypatch.setenv("MASTER_PORT", str(free_port))
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "train_det.py").write_text(FAKE_TOOL)
    executor = submitit.AutoExecutor(folder=str(tmp_path / "submitit"), cluster="local")
    executor.update_parameters(timeout_min=3, tasks_per_node=2, gpus_per_node=0)
    job = ToolJob("train_det", ["out"], str(tmp_path), tools_dir=str(tools))
    assert executor.submit(job).results() == [None, None]
    for rank in range(2):
        got = json.loads((tmp_path / f"out.{rank}").read_text())
        assert got == {
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "world": 2,
            "sum": 3.0,
            "cwd": str(tmp_path),
        }
