"""A driver's --slurm on the real one-node SLURM cluster (scripts/slurm_cluster.sh; the `cluster` fixture
of conftest.py skips with the reason where it cannot start), with train.py units on a tiny random T5.

    python -m pytest -q tests/test_slurm_grid.py        # ~1-2 min on 2 CPU cores; root or a running cluster

- A grid submitted with `ablate.py lr --slurm` gives the rows of the same grid run in this process (the same
  runs, the same scores, one row each), while one of its tasks is requeued by `scontrol requeue` mid-run (it
  resumes from last.pt, every step logged once) and one unit fails (lr 1e30: a non-finite prompt norm): that
  unit is FAILED in SLURM and in its log, its run folder's failed.txt says why, the collect job runs after
  the array anyway and names it, and the other units finish.
- `scancel` of the array and its collect job mid-run, then the same command again: what was left finishes.
Every wait is bounded; a test that times out cancels its jobs.
"""
import contextlib
import subprocess
from pathlib import Path

import pytest
from test_slurm import squeue, wait_for, wait_gone

import ablate
from ept import files, outputs, runfolder

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--max-eval-examples", "6", "--eval-batch-size", "8", "--batch-size", "4", "--dropout", "0"]
COMPARED = ("score", "test", "val_score", "best_step", "prompt_norm", "final_prompt_norm", "n_trainable",
            "variant", "task", "method", "seed", "lr", "init")
pytestmark = pytest.mark.usefixtures("one_thread")  # as the units' OMP_NUM_THREADS=1: the same arithmetic


@pytest.fixture(scope="module")
def data_dir(rte_data_dir):
    return rte_data_dir


@pytest.fixture
def unit_env(monkeypatch):
    """What sbatch passes on to the tasks (--export=ALL): one thread, no progress bars, offline."""
    for key, value in {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)


def grid(experiment, tiny_model_dir, data_dir, root, *extra):
    return [experiment, "--model", str(tiny_model_dir), "--tasks", "rte", "--methods", "ept", "--seeds", "0",
            "--data-dir", str(data_dir), "--runs-dir", str(root / "runs"), "--results-dir", str(root / "results"),
            *TRAIN, *map(str, extra)]


def submit(argv, capsys):
    """The driver's --slurm in this process; the (array, collect) job ids it printed."""
    ablate.main([*argv, "--slurm", "--slurm-gpus", "0"])  # no GPU here: no --gres line
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("submitted "))
    words = line.replace(",", " ").split()
    return words[words.index("array") + 2], words[words.index("collect") + 2]


def rows(root, experiment):
    found = files.read_jsonl(root / "results" / f"{experiment}.jsonl")
    assert len({r["run"] for r in found}) == len(found), "a doubled row"
    return {Path(r["run"]).name: {k: r.get(k) for k in COMPARED} for r in found}


def train_steps(run_dir):
    return [e["step"] for e in files.read_jsonl(run_dir / "log.jsonl", torn_tail_ok=True) if e["event"] == "train"]


@contextlib.contextmanager
def cancelled_on_error(*ids):
    """A test that fails while its jobs run leaves none behind."""
    try:
        yield
    except BaseException:
        subprocess.run(["scancel", *ids])
        raise


def plan_folders(root, experiment):
    """The run folder of each plan line (solo units: --out-dir), in order: array task i trains the i-th."""
    lines = (root / "results" / f"{experiment}.plan").read_text().splitlines()
    return [Path(line.split(" --out-dir ")[1].split()[0]) for line in lines]


def task_of(root, experiment, run_dir):
    return plan_folders(root, experiment).index(run_dir)


def test_grid_on_slurm_equals_in_process_with_a_requeue_and_a_failed_unit(
        cluster, tiny_model_dir, data_dir, tmp_path, unit_env, capsys):
    steps = 150  # ~3 s of steps on a tiny T5: time to requeue the task mid-run
    argv = lambda root: grid("lr", tiny_model_dir, data_dir, root, "--values", "0.3", "0.1", "1e30",  # noqa: E731
                             "--max-steps", steps, "--eval-every", 75)
    here, there = tmp_path / "here", tmp_path / "slurm"
    with pytest.raises(SystemExit) as stop:  # the lr 1e30 run fails in this process too: exit 1
        ablate.main(argv(here))
    assert stop.value.code == 1
    capsys.readouterr()
    array, collect = submit(argv(there), capsys)
    tag = tiny_model_dir.name
    named = f"steps{steps}_ev75_s0"  # the pass-through flags name the runs (docs/training.md, "Run names")
    target = there / "runs" / f"rte_ept_{tag}_{named}"  # lr 0.3, ept's default: no lr tag
    bad = there / "runs" / f"rte_ept_{tag}_lr1e+30_{named}"
    with cancelled_on_error(array, collect):
        i = task_of(there, "lr", target)
        wait_for(lambda: (target / "log.jsonl").exists() and len(train_steps(target)) >= 3, 60,
                 f"steps of {target.name}")
        subprocess.run(["scontrol", "requeue", f"{array}_{i}"], check=True, capture_output=True)
    wait_gone(array, collect, timeout=150)

    # the same runs, the same scores, one row each; the failed run is in neither
    assert rows(there, "lr") == rows(here, "lr") and len(rows(here, "lr")) == 2
    # the requeued task: stopped, started again, resumed from last.pt, every step logged once
    assert train_steps(target) == list(range(1, steps + 1))
    resumed = [e for e in files.read_jsonl(target / "log.jsonl") if e["event"] == "resume"]
    assert len(resumed) == 1 and 0 < resumed[0]["step"] < steps
    logs = there / "results" / "slurm-logs"
    log = (logs / f"ept-lr-{array}_{i}.log").read_text()
    assert "start 2" in log and "unit stopped by SIGTERM" in log and log.rstrip().endswith("unit finished"), log
    # the failed unit: FAILED in SLURM and in its log, its folder says why, the collect job names it
    assert outputs.status(bad) == "failed" and "non-finite prompt_norm at step 1" in outputs.failure(bad)
    j = task_of(there, "lr", bad)
    assert "unit failed (exit 1)" in (logs / f"ept-lr-{array}_{j}.log").read_text()
    report = (logs / f"ept-lr-collect-{collect}.log").read_text()
    states = {line.split(":")[0]: line.split(": ")[1] for line in report.splitlines() if line.startswith("task ")}
    assert states == {f"task {k}": "FAILED" if k == j else "COMPLETED" for k in range(3)}, report  # all ended
    assert "lr: 3 runs, 2 finished (2 rows added now), 1 not finished (1 failed)" in report, report
    assert f"lr: FAILED {bad.name}: train: non-finite prompt_norm at step 1" in report
    assert files.read_json(there / "results" / "lr.failed.json") == {str(bad): outputs.failure(bad)}
    import report  # which lists it in index.md (test_experiments.py)
    assert report.failed_runs(there / "results") == [("lr", str(bad), outputs.failure(bad))]
    for run in (there / "runs").iterdir():
        assert not (run / runfolder.LOCK_NAME).exists()


def test_cancelled_array_then_the_same_command_finishes_what_was_left(
        cluster, tiny_model_dir, data_dir, tmp_path, unit_env, capsys):
    steps = 300
    argv = grid("init", tiny_model_dir, data_dir, tmp_path, "--values", "uniform", "vocab", "--max-steps", steps,
                "--eval-every", steps)
    array, collect = submit(argv, capsys)
    folders = plan_folders(tmp_path, "init")
    started = lambda: all((f / "log.jsonl").exists() and len(train_steps(f)) >= 3 for f in folders)  # noqa: E731
    try:
        wait_for(started, 60, "steps of both units")
    finally:
        subprocess.run(["scancel", array, collect], check=True)
    wait_gone(array, collect)
    stopped = [f for f in folders if not runfolder.finished(f)]
    assert stopped and all((f / "last.pt").exists() for f in stopped)
    assert not (tmp_path / "results" / "init.jsonl").exists()  # the collect job was cancelled too
    plan = (tmp_path / "results" / "init.plan").read_text()
    array2, collect2 = submit(argv, capsys)  # the same command: the same plan, a new array
    assert array2 != array and (tmp_path / "results" / "init.plan").read_text() == plan
    wait_gone(array2, collect2, timeout=120)
    for run in folders:
        assert runfolder.finished(run) and train_steps(run) == list(range(1, steps + 1)), run.name  # no step twice
        resumed = [e for e in files.read_jsonl(run / "log.jsonl") if e["event"] == "resume"]
        assert len(resumed) == (run in stopped)
    assert len(rows(tmp_path, "init")) == 2  # one row each
    report = (tmp_path / "results" / "slurm-logs" / f"ept-init-collect-{collect2}.log").read_text()
    assert "init: 2 runs, 2 finished (2 rows added now), 0 not finished" in report, report
    assert not squeue(array, collect, array2, collect2)
