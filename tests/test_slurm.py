"""ept/grid.py on SLURM: the sbatch scripts' text (always), and a plan of fake units on a real one-node SLURM cluster
(scripts/slurm_cluster.sh; skipped with the reason where it cannot start).

    python -m pytest -q tests/test_slurm.py                       # the cluster tests need root or a running cluster
    EPT_SLURM_TESTS=1 python -m pytest -q tests/test_slurm.py     # root: install SLURM if missing; never skip

The fake units (tests/fake_unit.py) keep the plan's contract: resumable, one row each, SIGTERM ->
checkpoint and exit. Each cluster test takes seconds; every wait is bounded.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ept import cli, grid

REPO = Path(__file__).resolve().parents[1]
FAKE = Path(__file__).resolve().with_name("fake_unit.py")


def fake(root, name, steps, *flags):
    """A plan line like the drivers' (`cd FOLDER && python ...`), where bash stays the unit's parent, as
    older bash does for every such line (bash 5.1+ execs the last command of a list): `|| exit $?`."""
    return " ".join(["cd", str(REPO), "&&", sys.executable, str(FAKE), str(root), name, str(steps), *flags,
                     "|| exit $?"])


def write_plan(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# --- the script's text: no cluster needed ----------------------------------------------------------

def test_sbatch_script_text(tmp_path):
    text = grid.sbatch_script(tmp_path / "t.plan", 12, job_name="table1", log_dir=tmp_path / "logs",
                               partition="gpu", time="4:00:00", max_parallel=4,
                               extra=["--account=nlp", "--cpus-per-task=2"])
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for want in ["--job-name=table1", "--array=0-11%4", "--gres=gpu:1", "--partition=gpu",
                 "--time=4:00:00", "--requeue", "--signal=B:USR1@300", "--cpus-per-task=2",
                 "--account=nlp", f"--output={tmp_path}/logs/table1-%A_%a.log", "--open-mode=append"]:
        assert f"#SBATCH {want}" in lines, want
    assert f"plan={tmp_path}/t.plan" in lines
    assert 'unit=$(sed -n "$((task + 1))p" "$plan")' in lines  # task i runs line i+1
    assert 'scontrol requeue "${SLURM_ARRAY_JOB_ID}_${task}"' in text
    # no GPU, no limit on tasks at once, no partition or time: no such lines
    bare = grid.sbatch_script(tmp_path / "t.plan", 3, job_name="x", log_dir=tmp_path, gpus_per_task=0)
    assert "#SBATCH --array=0-2\n" in bare
    assert not any(k in bare for k in ("--gres", "--gpus", "--partition", "--time", "--cpus"))
    assert "--gres=gpu:2" in grid.sbatch_script(tmp_path / "t", 1, job_name="x", log_dir=tmp_path,
                                                 gpus_per_task=2)
    assert "--dependency" not in bare  # after=: an earlier plan's array, each ended however it ended
    assert "#SBATCH --dependency=afterany:7:9_2\n" in grid.sbatch_script(
        tmp_path / "t", 1, job_name="x", log_dir=tmp_path, after=["7", "9_2"])


@pytest.mark.parametrize("text, seconds", [("90", 5400), ("10:30", 630), ("4:00:00", 14400),
                                           ("1-12", 129600), ("2-00:30:00", 174600),
                                           ("UNLIMITED", None), ("0", None)])
def test_time_seconds(text, seconds):
    assert grid.time_seconds(text) == seconds


@pytest.mark.parametrize("kw, message", [
    ({"time": "4:00"}, "not longer than the 300 s"),  # the signal would come before the job starts
    ({"time": "four hours"}, "not a SLURM time limit"),
    ({"partition": "a b"}, "cannot go on an #SBATCH line"),
    ({"extra": ["--qos=high\n#SBATCH --x"]}, "cannot go on an #SBATCH line"),
    ({"after": ["7 --x"]}, "not a SLURM job id"),
])
def test_sbatch_script_refuses(tmp_path, kw, message):
    with pytest.raises(cli.Failure, match=message):
        grid.sbatch_script(tmp_path / "t.plan", 2, job_name="x", log_dir=tmp_path, **kw)


def test_submit_one_sentence_errors(tmp_path, monkeypatch):
    plan = write_plan(tmp_path / "p.plan", ["true", "", "true"])
    with pytest.raises(cli.Failure, match="has an empty line"):
        grid.submit(plan, "true", gpus_per_task=0)
    plan = write_plan(tmp_path / "p.plan", ["true"])
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no sbatch
    with pytest.raises(cli.Failure, match="sbatch is not on PATH"):
        grid.submit(plan, "true", gpus_per_task=0)
    (tmp_path / "bin").mkdir()
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: gpu' >&2\nexit 1\n")
    sbatch.chmod(0o755)
    with pytest.raises(cli.Failure, match=r"sbatch refused the job array \(p.sbatch\): sbatch: error: invalid"):
        grid.submit(plan, "true", gpus_per_task=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "p.plan"]  # nothing written


def test_submit_writes_both_scripts_and_says_how_to_follow(tmp_path, monkeypatch, capsys):
    """The command line, against an sbatch that only records its calls: the array first, then the
    collect job naming the array's id in its afterany dependency."""
    (tmp_path / "bin").mkdir()
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/calls\ncat >> {tmp_path}/stdin\n"
                      f"wc -l < {tmp_path}/calls | awk '{{print 40 + $1 \";cluster\"}}'\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    plan = write_plan(tmp_path / "table1.plan", ["true", "false"])
    grid.main([str(plan), "--collect", "echo collected", "--slurm-gpus", "0", "--slurm-max-tasks", "1",
               "--slurm-option=--account=nlp", "--slurm-after", "39"])
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["--parsable", "--parsable"]  # each script on stdin, written once submitted
    out = capsys.readouterr().out
    assert "array job 41 (2 units, 1 at once, after job 39), collect job 42 after it" in out
    assert "squeue -j 41,42" in out and f"{tmp_path}/slurm-logs/table1-41_<task>.log" in out
    assert "scancel 41 42" in out
    array = (tmp_path / "table1.sbatch").read_text()
    assert "#SBATCH --array=0-1%1" in array and "#SBATCH --account=nlp" in array
    assert "#SBATCH --dependency=afterany:39" in array
    collect = (tmp_path / "table1.collect.sbatch").read_text()
    assert "#SBATCH --dependency=afterany:41" in collect and "#SBATCH --account=nlp" in collect
    assert collect.rstrip().endswith("echo collected")
    assert (tmp_path / "stdin").read_text() == array + collect


def test_script_forwards_sigterm_without_slurm(tmp_path):
    """The batch shell's trap, run by hand (SLURM_ARRAY_TASK_ID=1): SIGTERM reaches the unit, which
    checkpoints; the shell waits for it and exits with the unit's status; a rerun resumes it."""
    plan = write_plan(tmp_path / "p.plan", [fake(tmp_path, "u0", 1), fake(tmp_path, "u1", 200)])
    script = tmp_path / "p.sbatch"
    script.write_text(grid.sbatch_script(plan, 2, job_name="p", log_dir=tmp_path, gpus_per_task=0))
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1"}
    shell = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    steps = tmp_path / "u1" / "steps.log"
    wait_for(lambda: steps.exists() and len(steps.read_text().split()) >= 2, 20, "the unit's steps")
    shell.send_signal(signal.SIGTERM)  # the batch shell alone, as --signal=B: and Ctrl-C (SIGINT) do
    out, _ = shell.communicate(timeout=20)
    assert shell.returncode == 143, out
    assert "unit stopped by SIGTERM" in out
    assert not (tmp_path / "u0").exists()  # line 2 ran, not line 1
    done = int((tmp_path / "u1" / "ckpt").read_text())
    assert done == len(steps.read_text().split())  # checkpointed after the step in progress
    shell = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    wait_for(lambda: len(steps.read_text().split()) >= done + 2, 20, "the resumed unit's steps")
    shell.send_signal(signal.SIGINT)
    out, _ = shell.communicate(timeout=20)
    assert shell.returncode == 143 and "unit stopped by SIGINT" in out, out
    resumed = int((tmp_path / "u1" / "ckpt").read_text())
    assert [int(s) for s in steps.read_text().split()] == list(range(resumed))  # each step once


# --- a real cluster ----------------------------------------------------------------------------------

def wait_for(ready, timeout, what):
    end = time.time() + timeout
    while not ready():
        if time.time() > end:
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(0.2)


def squeue(*ids):
    done = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T"],
                          capture_output=True, text=True)
    return done.stdout.split("\n") if done.stdout.strip() else []


def wait_gone(*ids, timeout=60):
    try:
        wait_for(lambda: not squeue(*ids), timeout, f"end of jobs {ids} (squeue: {squeue(*ids)})")
    except AssertionError:
        subprocess.run(["scancel", *ids])
        raise


def test_four_tasks_run_at_once(cluster, tmp_path):
    """A 4-task array runs at once: each task waits (10 s at most) until all four have started."""
    flags = tmp_path / "started"
    flags.mkdir()
    line = (f"touch {flags}/$SLURM_ARRAY_TASK_ID; for i in $(seq 100); do "
            f"[ $(ls {flags} | wc -l) -ge 4 ] && exit 0; sleep 0.1; done; exit 1")
    plan = write_plan(tmp_path / "p.plan", [line] * 4)
    array, collect = grid.submit(plan, "true", gpus_per_task=0)
    wait_gone(array, collect)
    logs = sorted((tmp_path / "slurm-logs").glob(f"p-{array}_*.log"))
    assert len(logs) == 4
    for log in logs:
        assert "unit finished" in log.read_text(), log.read_text()


def test_plan_finishes_and_collect_runs_after(cluster, tmp_path):
    """Two units finish, one fails; the collect job runs after all three (afterany), appends one row per
    finished unit and names the failed one; the task log and SLURM's state say it failed."""
    root = tmp_path / "units"
    plan = write_plan(tmp_path / "p.plan", [fake(root, "u0", 5), fake(root, "u1", 5, "--fail"),
                                            fake(root, "u2", 10)])
    array, collect = grid.submit(plan, f"{sys.executable} {FAKE} --collect {root}", gpus_per_task=0,
                                  max_parallel=2)
    assert (tmp_path / "p.sbatch").exists() and (tmp_path / "p.collect.sbatch").exists()
    wait_gone(array, collect)
    rows = [json.loads(line) for line in (root / "rows.jsonl").read_text().splitlines()]
    assert sorted(r["unit"] for r in rows) == ["u0", "u2"]  # one row each
    collected = json.loads((root / "collected.json").read_text())
    assert collected["done"] == ["u0", "u2"] and collected["failed"] == ["u1"]
    last = max([r["end"] for r in rows] + [(root / "u1" / "failed.txt").stat().st_mtime])
    assert collected["start"] >= last  # after every task
    logs = tmp_path / "slurm-logs"
    assert "unit failed (exit 3)" in (logs / f"p-{array}_1.log").read_text()
    report = (logs / f"p-collect-{collect}.log").read_text()
    assert "task 1: FAILED" in report and "task 0: COMPLETED" in report, report
    assert "failed: u1" in report


def check_resumed(root, name, steps, starts):
    """Every step done once, in order; the unit started `starts` times, each from its checkpoint."""
    done = [int(s) for s in (root / name / "steps.log").read_text().split()]
    assert done == list(range(steps))
    begun = [int(line.split()[0]) for line in (root / name / "starts.log").read_text().splitlines()]
    assert len(begun) == starts and begun[0] == 0 and all(b > 0 for b in begun[1:]), begun
    rows = [json.loads(line)["unit"] for line in (root / "rows.jsonl").read_text().splitlines()]
    assert rows.count(name) == 1


@pytest.mark.parametrize("how", ["scontrol requeue", "USR1"])
def test_requeued_task_resumes(cluster, tmp_path, how):
    """scontrol requeue of a running task (SIGTERM to everything), or the time limit's USR1 (sent to the
    batch shell alone, as --signal=B: does; the shell requeues its own task): the unit checkpoints,
    the task runs again and resumes; no step is done twice and the row is appended once."""
    root = tmp_path / "units"
    plan = write_plan(tmp_path / "p.plan", [fake(root, "u0", 3), fake(root, "u1", 25)])
    array, collect = grid.submit(plan, f"{sys.executable} {FAKE} --collect {root}", gpus_per_task=0)
    steps = root / "u1" / "steps.log"
    wait_for(lambda: steps.exists() and len(steps.read_text().split()) >= 3, 30, "steps of unit 1")
    if how == "USR1":
        signal_it = ["scancel", "--batch", "--signal=USR1", f"{array}_1"]
    else:
        signal_it = ["scontrol", "requeue", f"{array}_1"]
    subprocess.run(signal_it, check=True, capture_output=True)
    wait_gone(array, collect)
    check_resumed(root, "u1", 25, starts=2)
    log = (tmp_path / "slurm-logs" / f"p-{array}_1.log").read_text()
    assert "start 2" in log and "unit finished" in log, log
    if how == "USR1":
        assert "requeueing this task" in log
    assert json.loads((root / "collected.json").read_text())["done"] == ["u0", "u1"]


def test_cancelled_plan_finishes_when_submitted_again(cluster, tmp_path):
    """scancel of the whole array (and its collect job) mid-run; the same plan submitted again finishes
    what was left: the interrupted units resume, the finished one is not run again."""
    root = tmp_path / "units"
    plan = write_plan(tmp_path / "p.plan",
                      [fake(root, "u0", 2), fake(root, "u1", 60), fake(root, "u2", 60)])
    collect_cmd = f"{sys.executable} {FAKE} --collect {root}"
    array, collect = grid.submit(plan, collect_cmd, gpus_per_task=0, max_parallel=2)
    steps = root / "u1" / "steps.log"
    wait_for(lambda: steps.exists() and len(steps.read_text().split()) >= 3, 30, "steps of unit 1")
    subprocess.run(["scancel", array, collect], check=True)
    wait_gone(array, collect)
    assert not (root / "u1" / "result.json").exists()  # it was stopped, not finished
    assert not (root / "collected.json").exists()
    array2, collect2 = grid.submit(plan, collect_cmd, gpus_per_task=0, max_parallel=2)
    wait_gone(array2, collect2)
    check_resumed(root, "u1", 60, starts=2)
    for name in ("u0", "u2"):  # u0 finished in the first array; u2 started in either
        assert [int(s) for s in (root / name / "steps.log").read_text().split()] == \
            list(range(2 if name == "u0" else 60))
    assert len((root / "u0" / "starts.log").read_text().splitlines()) == 1
    assert json.loads((root / "collected.json").read_text())["done"] == ["u0", "u1", "u2"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("EPT_SLURM_SLOW") != "1", reason="a minute or two: EPT_SLURM_SLOW=1")
def test_time_limit_signal_requeues_and_resumes(cluster, tmp_path):
    """SLURM's own --signal=B:USR1 at a real time limit (2 min, the signal 60 s before it, which SLURM
    may send up to 60 s early): the task requeues itself and its unit resumes until it finishes."""
    root = tmp_path / "units"
    plan = write_plan(tmp_path / "p.plan", [fake(root, "u0", 600)])  # 60 s of steps: over one start
    array, collect = grid.submit(plan, f"{sys.executable} {FAKE} --collect {root}", gpus_per_task=0,
                                  time="2", signal_s=60)
    wait_gone(array, collect, timeout=300)
    starts = len((root / "u0" / "starts.log").read_text().splitlines())
    assert starts >= 2
    check_resumed(root, "u0", 600, starts=starts)
    log = (tmp_path / "slurm-logs" / f"p-{array}_0.log").read_text()
    assert log.count("time limit near") == starts - 1 and "unit finished" in log, log


def test_run_all_slurm_submits_the_sections_in_order_then_the_report(tmp_path):
    """SLURM=1 bash run_all.sh, with stand-in drivers that print slurm.py's "submitted" line and a stand-in
    sbatch: each section's driver gets --slurm and the pass-throughs, each array after the previous
    section's (--slurm-after), and the report job after every collect job."""
    shutil.copy(REPO / "run_all.sh", tmp_path)
    calls = tmp_path / "calls"
    stand_in = ("import os, sys\n"
                f"f = open({str(calls)!r}, 'a'); f.write(' '.join(sys.argv) + '\\n'); f.close()\n"
                f"n = len(open({str(calls)!r}).read().splitlines())\n"
                "print(f'submitted ept-x: array job {100 + 2 * n} (3 units), collect job {101 + 2 * n} after it')\n")
    for name in ("ablate.py", "fewshot.py", "prepare_data.py"):
        (tmp_path / name).write_text(stand_in)
    (tmp_path / "bin").mkdir()
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/sbatch.args\necho '999;cluster'\n")
    sbatch.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM": "1",
           "SECTIONS": "table1 lr", "SLURM_TIME": "1:00:00", "SLURM_OPTS": "--account=nlp --qos=x"}
    done = subprocess.run(["bash", str(tmp_path / "run_all.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    table1, lr = calls.read_text().splitlines()[1:]  # after prepare_data.py (setup)
    assert table1.startswith("ablate.py table1 ") and lr.startswith("ablate.py lr ")
    for call in (table1, lr):
        assert "--slurm --slurm-gpus 1 --slurm-time 1:00:00 --slurm-option=--account=nlp --slurm-option=--qos=x" \
            in call
    assert "--slurm-after" not in table1 and lr.endswith("--slurm-after 104")  # table1's array
    args = (tmp_path / "sbatch.args").read_text().splitlines()
    assert "--dependency=afterany:105:107" in args and "--gres=gpu:1" in args and "--time=1:00:00" in args
    assert args[-2:] == ["--wrap", "SLURM=0 PART=report bash run_all.sh"] and "--account=nlp" in args
    assert "submitted ept-report: job 999 after the collect jobs 105 107" in done.stdout
