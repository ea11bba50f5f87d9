"""The engine: plan files, the local pool (--gpus), train.py's stop on SIGTERM, the one-host run lock.

    python -m pytest -q tests/test_pool.py          # ~2-3 min on 2 CPU cores

Children are real processes (the plan's own lines, as a GPU node or an engine runs them) on a tiny random T5,
a few steps per run: 2 children give the in-process results; a SIGKILLed child's unit is resumed with nothing
lost or doubled; SIGINT of the launcher stops every child; SIGTERM stops train.py at a step boundary with
last.pt written and exit status 143, and --resume logs every step once.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ablate
from ept import cli, files, grid, outputs, runfolder

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--max-steps", "3", "--eval-every", "2", "--max-eval-examples", "6", "--eval-batch-size", "8",
         "--batch-size", "4", "--dropout", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
COMPARED = ("score", "test", "val_score", "best_step", "prompt_norm", "final_prompt_norm", "n_trainable", "variant",
            "task", "method", "seed", "init")
pytestmark = pytest.mark.usefixtures("one_thread")  # as the children's OMP_NUM_THREADS=1: the same arithmetic


@pytest.fixture(scope="module")
def data_dir(rte_data_dir):
    return rte_data_dir


def plan_argv(tiny_model_dir, data_dir, root, *extra):
    """Table 6's grid on RTE, one seed: 3 runs (init uniform, vocab, label)."""
    return ["init", "--model", str(tiny_model_dir), "--tasks", "rte", "--seeds", "0", "--data-dir", str(data_dir),
            "--runs-dir", str(root / "runs"), "--results-dir", str(root / "results"), *TRAIN, *map(str, extra)]


def driver(*argv, **kw):
    return subprocess.Popen([sys.executable, str(REPO / "ablate.py"), *map(str, argv)], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def finish(proc, timeout=300, status=0):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == status, out[-4000:]
    return out


def events(run_dir, kind):
    return [e for e in files.read_jsonl(Path(run_dir) / "log.jsonl") if e["event"] == kind]


def results(root):
    rows = files.read_jsonl(root / "results" / "init.jsonl")
    assert len({r["run"] for r in rows}) == len(rows), "a doubled row"
    return {Path(r["run"]).name: {k: r.get(k) for k in COMPARED} for r in rows}


def assert_steps_once(root, n, steps=3):
    folders = sorted((root / "runs").iterdir())
    assert len(folders) == n
    for run in folders:
        assert outputs.status(run) == "done"
        assert [e["step"] for e in events(run, "train")] == list(range(1, steps + 1)), run.name  # no step twice
        assert not (run / runfolder.LOCK_NAME).exists()


def wait_for(predicate, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out" if proc.poll() is None else f"ended first: {proc.communicate()[0][-3000:]}")


@pytest.fixture(scope="module")
def in_process(tiny_model_dir, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    ablate.main(plan_argv(tiny_model_dir, data_dir, root))  # the plain driver: every unit in this process
    assert_steps_once(root, 3)
    return results(root)


# --- the plan -----------------------------------------------------------------------------------------

def test_plan_lines_run_by_hand_from_anywhere_idempotent_and_collected_once(tiny_model_dir, data_dir, tmp_path,
                                                                              in_process):
    """One line per unit, written once; a line run twice (from another folder) trains nothing twice; --collect
    appends each finished run's row once; another grid in the same results folder is refused."""
    argv = plan_argv(tiny_model_dir, data_dir, tmp_path, "--pack-size", "2")
    units = grid.make_units(*_plan(argv))
    grid.write_plan(tmp_path / "results" / "init.plan", units)
    lines = (tmp_path / "results" / "init.plan").read_text().splitlines()
    assert len(lines) == 2 and sorted(len(u.names) for u in units) == [1, 2]  # a pack of 2 and a solo run
    for line in [*lines, lines[0]]:  # each by hand from /, the first twice
        done = subprocess.run(["bash", "-c", line], cwd="/", env=ENV, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "finished already" in done.stdout
    assert not (tmp_path / "results" / "init.jsonl").exists()  # units write no rows
    for _ in range(2):
        ablate.main([*argv, "--collect"])
    assert results(tmp_path) == in_process and len(files.read_jsonl(tmp_path / "results" / "init.jsonl")) == 3
    assert_steps_once(tmp_path, 3)
    ablate.main(argv)  # the same grid again: the same plan, nothing to train
    assert (tmp_path / "results" / "init.plan").read_text().splitlines() == lines
    with pytest.raises(SystemExit, match="holds another plan .*delete it"):
        ablate.main([*argv[:argv.index("--seeds")], "--seeds", "1", *argv[argv.index("--seeds") + 2:]])


def _plan(argv):
    args, extra = ablate.parser.parse_known_args(argv)
    args.values = ablate.parse_values(args)
    return grid.plan_runs(ablate.init(args), args, extra), args, extra


def test_slurm_submits_the_plan_and_the_collect_line(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """--slurm calls grid.submit(plan, collect line, ...) and trains nothing here (test_slurm.py runs
    the array on a real SLURM)."""
    calls = []
    monkeypatch.setattr(grid, "submit", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(grid, "check", lambda: 1001)  # sbatch here, SLURM's default MaxArraySize
    argv = plan_argv(tiny_model_dir, data_dir, tmp_path, "--slurm", "--slurm-time", "1:00:00", "--slurm-max-tasks", 2)
    assert ablate.main(argv) == []
    (plan, collect), options = calls[0]
    assert plan == tmp_path / "results" / "init.plan" and len(plan.read_text().splitlines()) == 3
    assert collect.startswith(f"cd {os.getcwd()} && ") and collect.endswith(" --collect")
    assert options["time"] == "1:00:00" and options["max_parallel"] == 2 and options["gpus_per_task"] == 1
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):  # --slurm and --gpus: one of them
        ablate.main([*argv, "--gpus", "2"])


# --- the pool -----------------------------------------------------------------------------------------

def test_two_children_equal_the_in_process_run(in_process, tiny_model_dir, data_dir, tmp_path):
    """--slots 2: 2 CPU children (--gpus 2 on a machine without a GPU says "slot" alike)."""
    out = finish(driver(*plan_argv(tiny_model_dir, data_dir, tmp_path, "--slots", 2)))
    assert "3 unit(s) on 2 child process(es): slot 0 | slot 1" in out and "resuming it once" not in out
    assert {line.split()[1] for line in out.splitlines() if line.startswith("[u")} == {"slot"}
    assert {line.split()[2] for line in out.splitlines() if line.startswith("[u")} == {"0]", "1]"}
    assert "-> GPU" not in out
    assert_steps_once(tmp_path, 3)
    assert results(tmp_path) == in_process  # same scores, norms and steps as one process
    assert "init: 3 runs, 3 finished (3 rows added now), 0 not finished" in out


def test_each_child_a_torchrun_group(tiny_model_dir, data_dir, tmp_path):
    """--gpus 4 --nproc 2: 2 children, each unit a 2-rank torchrun group (gloo here)."""
    argv = plan_argv(tiny_model_dir, data_dir, tmp_path, "--gpus", 4, "--nproc", 2, "--values", "uniform", "vocab")
    out = finish(driver(*argv))
    assert "2 unit(s) on 2 child process(es): slot 0 | slot 1" in out and "resuming it once" not in out  # no GPU here
    assert "torchrun --standalone --nproc_per_node=2" in (tmp_path / "results" / "init.plan").read_text()
    for run in (tmp_path / "runs").iterdir():
        assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert_steps_once(tmp_path, 2)


def test_a_sigkilled_child_is_resumed_nothing_lost_or_doubled(tiny_model_dir, data_dir, tmp_path):
    argv = plan_argv(tiny_model_dir, data_dir, tmp_path, "--gpus", 2, "--max-steps", 40, "--save-every", 2,
                     "--eval-every", 20)
    launcher = driver(*argv)
    target = wait_for(lambda: next((p.parent for p in (tmp_path / "runs").glob("*/last.pt")), None), launcher)
    pid = lock_pid(target)  # the child's train.py
    os.kill(pid, signal.SIGKILL)
    out = finish(launcher)
    assert out.count("resuming it once") == 1 and "took over the stale lock" in out
    resumed = events(target, "resume")
    assert len(resumed) == 1 and 0 < resumed[0]["step"] < 40
    assert_steps_once(tmp_path, 3, steps=40)
    assert len(results(tmp_path)) == 3


def test_sigint_stops_every_child_and_a_rerun_resumes(tiny_model_dir, data_dir, tmp_path):
    argv = plan_argv(tiny_model_dir, data_dir, tmp_path, "--gpus", 2, "--max-steps", 400, "--save-every", 50,
                     "--eval-every", 400)
    launcher = driver(*argv)
    held = wait_for(lambda: [p for p in (tmp_path / "runs").glob("*/log.jsonl")
                             if p.stat().st_size and (p.parent / runfolder.LOCK_NAME).exists()][:2]
                    if len(list((tmp_path / "runs").glob("*/log.jsonl"))) >= 2 else None, launcher)
    pids = [lock_pid(p.parent) for p in held]
    launcher.send_signal(signal.SIGINT)
    out = finish(launcher, status=130)
    assert "SIGINT received: every child wrote last.pt and stopped. Run the same command again to resume." in out
    assert not any(_alive(pid) for pid in pids)  # every child ended before the launcher
    stopped = [p.parent for p in held]
    assert all((run / "last.pt").exists() and not (run / runfolder.LOCK_NAME).exists() for run in stopped)
    assert "SIGTERM received: stopped at step" in out


def test_subprocess_is_a_pool_of_one_child_and_sigterm_stops_it(tiny_model_dir, data_dir, tmp_path):
    """--subprocess (or --nproc > 1 without --gpus/--slots): units one at a time, each a child."""
    argv = plan_argv(tiny_model_dir, data_dir, tmp_path, "--subprocess", "--max-steps", 400, "--save-every", 50,
                     "--eval-every", 400)
    launcher = driver(*argv)
    held = wait_for(lambda: next((p.parent for p in (tmp_path / "runs").glob("*/log.jsonl")
                                  if p.stat().st_size and (p.parent / runfolder.LOCK_NAME).exists()), None), launcher)
    launcher.send_signal(signal.SIGTERM)
    out = finish(launcher, status=143)
    assert "3 unit(s) on 1 child process(es): slot 0" in out and "[u0 slot 0]" in out
    assert "SIGTERM received: every child wrote last.pt and stopped." in out
    assert (held / "last.pt").exists() and not (held / runfolder.LOCK_NAME).exists()


# --- train.py on SIGTERM --------------------------------------------------------------------------------

def test_sigterm_checkpoints_at_a_step_boundary_and_resume_logs_each_step_once(tiny_model_dir, data_dir, tmp_path):
    common = ["--task", "rte", "--method", "ept", "--model", str(tiny_model_dir), "--data-dir", str(data_dir),
              "--max-steps", "60", "--eval-every", "30", "--save-every", "30", "--max-eval-examples", "6",
              "--eval-batch-size", "8", "--batch-size", "4", "--dropout", "0"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run([sys.executable, "train.py", *common, "--out-dir", str(whole)], cwd=REPO, env=ENV, check=True,
                   capture_output=True)
    proc = subprocess.Popen([sys.executable, "train.py", *common, "--out-dir", str(cut)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (cut / "log.jsonl").exists() and len(events(cut, "train")) >= 5, proc)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc, status=143)
    step = torch.load(cut / "last.pt", weights_only=True)["step"]
    assert f"SIGTERM received: stopped at step {step}, last.pt written in {cut}" in out and 0 < step < 60
    assert [e["step"] for e in events(cut, "train")] == list(range(1, step + 1))  # the step boundary
    assert not (cut / runfolder.LOCK_NAME).exists() and not (cut / "metrics.json").exists()
    subprocess.run([sys.executable, "train.py", *common, "--out-dir", str(cut), "--resume"], cwd=REPO, env=ENV,
                   check=True, capture_output=True)
    assert [e["step"] for e in events(cut, "train")] == [e["step"] for e in events(whole, "train")]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, cut))
    assert a["score"] == b["score"] and a["best_step"] == b["best_step"]


def test_sigusr1_stops_a_pack_with_status_138_and_resume_continues_every_run(tiny_model_dir, data_dir, tmp_path):
    command = [sys.executable, "train.py", "--task", "rte", "--method", "pt", "ept", "--model", str(tiny_model_dir),
               "--data-dir", str(data_dir), "--max-steps", "40", "--eval-every", "20", "--save-every", "20",
               "--max-eval-examples", "6", "--eval-batch-size", "8", "--batch-size", "4", "--no-test",
               "--out-dir", str(tmp_path)]
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: any(len(events(p.parent, "train")) >= 3 for p in tmp_path.glob("*/log.jsonl")), proc)
    proc.send_signal(signal.SIGUSR1)
    out = finish(proc, status=138)
    assert "SIGUSR1 received: stopped at step" in out and "(exit status 138)" in out
    folders = sorted(tmp_path.iterdir())
    assert len(folders) == 2 and not list(tmp_path.glob(f"*/{runfolder.LOCK_NAME}"))
    steps = {torch.load(f / "last.pt", weights_only=True)["step"] for f in folders}
    assert len(steps) == 1 and 0 < steps.pop() < 40  # every live run saved at the same step boundary
    subprocess.run([*command, "--resume"], cwd=REPO, env=ENV, check=True, capture_output=True)
    for run in folders:
        assert [e["step"] for e in events(run, "train")] == list(range(1, 41)) and runfolder.finished(run)


# --- the run lock ----------------------------------------------------------------------------------

HOLD = "\n".join(["import fcntl, os, sys, time", "f = open(sys.argv[1], 'w')", "fcntl.flock(f, fcntl.LOCK_EX)",
                  "f.write(sys.argv[2].replace('PID', str(os.getpid())))", "f.flush()", "print(flush=True)",
                  "time.sleep(120)"])


def hold_lock(folder, text):
    """A live process (not this one) that holds `folder`'s run.lock, saying `text` (PID: its pid)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder / runfolder.LOCK_NAME), text],
                            stdout=subprocess.PIPE)
    proc.stdout.readline()  # it holds the lock now
    return proc


def lock_pid(folder):
    """The pid its run.lock names ("<host> <pid> <SLURM unit or ->")."""
    return int((folder / runfolder.LOCK_NAME).read_text().split()[1])


def _alive(pid):
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except ProcessLookupError:
        return False
    except OSError:
        return True


def test_a_run_started_twice_gets_one_sentence_and_a_dead_holder_is_taken_over(tmp_path):
    lock = runfolder.Lock(tmp_path, say=lambda m: None)
    with pytest.raises(runfolder.Busy, match=f"{tmp_path} is being written by pid {os.getpid()} on .*delete "):
        runfolder.Lock(tmp_path, say=lambda m: None)
    lock.release()
    assert not (tmp_path / runfolder.LOCK_NAME).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / runfolder.LOCK_NAME).write_text(f"{os.uname().nodename} {dead.pid} -\n")
    said = []
    runfolder.Lock(tmp_path, say=said.append).release()
    assert said and "took over the stale lock" in said[0]
    (tmp_path / runfolder.LOCK_NAME).write_text(f"{os.uname().nodename} {os.getpid()} -\n")  # a reused pid
    said = []
    runfolder.Lock(tmp_path, say=said.append).release()  # a live pid that does not hold it
    assert said and "took over the stale lock" in said[0]
    (tmp_path / runfolder.LOCK_NAME).write_text("another-host 1 -\n")  # another host's lock: not ours to judge
    with pytest.raises(runfolder.Busy):
        runfolder.Lock(tmp_path, say=said.append)


def test_a_live_holder_keeps_the_lock_even_within_one_slurm_job(tmp_path, monkeypatch):
    """Two `SLURM_JOB_ID=999 train.py` on one host never both train a folder; killed, the lock is taken."""
    monkeypatch.setenv("SLURM_JOB_ID", "999")
    holder = hold_lock(tmp_path, f"{os.uname().nodename} PID 999\n")
    try:
        with pytest.raises(runfolder.Busy, match=f"pid {holder.pid} .*SLURM job 999"):
            runfolder.Lock(tmp_path, say=lambda m: None)
        assert lock_pid(tmp_path) == holder.pid
    finally:
        holder.kill()
        holder.wait()
    said = []
    runfolder.Lock(tmp_path, say=said.append).release()  # SIGKILLed: the kernel freed its flock
    assert said and "took over the stale lock" in said[0]


def test_a_slurm_requeue_on_another_node_takes_its_own_lock(tmp_path, monkeypatch):
    """Another node's lock naming this process's SLURM job (a requeue: its node died) is taken, even
    while that node's flock lingers (an NFS lease, here a live holder); another job's stays."""
    monkeypatch.setenv("SLURM_JOB_ID", "999")
    (tmp_path / runfolder.LOCK_NAME).write_text("another-host 1 999\n")
    runfolder.Lock(tmp_path, say=lambda m: None).release()
    for job, taken in (("998", False), ("999", True)):
        holder = hold_lock(tmp_path, f"another-host 1 {job}\n")
        try:
            if taken:
                said = []
                lock = runfolder.Lock(tmp_path, say=said.append)
                assert "took over the stale lock of pid 1 on another-host (SLURM job 999)" in said[0]
                assert lock_pid(tmp_path) == os.getpid()
                lock.release()
            else:
                with pytest.raises(runfolder.Busy, match="pid 1 on another-host .*SLURM job 998"):
                    runfolder.Lock(tmp_path, say=lambda m: None)
        finally:
            holder.kill()
            holder.wait()


def test_pool_devices():
    args = ablate.parser.parse_args(["init", "--gpus", "4", "--nproc", "2"])
    os.environ["CUDA_VISIBLE_DEVICES"] = "4,5,6,7"
    try:
        assert grid.pool_devices(args) == ["4,5", "6,7"]  # each child a 2-GPU torchrun group
    finally:
        del os.environ["CUDA_VISIBLE_DEVICES"]
    assert grid.pool_devices(ablate.parser.parse_args(["init", "--gpus", "3"])) == ["0", "1", "2"]
    with pytest.raises(cli.Failure, match="not a multiple"):
        grid.pool_devices(ablate.parser.parse_args(["init", "--gpus", "3", "--nproc", "2"]))


# --- a failed run says why in its folder ------------------------------------------------------------

def test_a_nonfinite_run_writes_failed_txt_and_a_new_start_clears_it(tiny_model_dir, data_dir, tmp_path):
    """lr 1e30: a non-finite prompt norm at step 1; failed.txt holds train.py's sentence and outputs.status says
    'failed' (test_slurm_grid.py: the collect step names it); started again (--resume), the marker goes."""
    import train
    run = tmp_path / "run"
    common = ["--task", "rte", "--method", "ept", "--model", str(tiny_model_dir), "--data-dir", str(data_dir),
              "--out-dir", str(run), *TRAIN]
    with pytest.raises(SystemExit) as err:  # the non-finite Failure, as its script's one sentence
        train.main([*common, "--lr", "1e30"])
    assert outputs.status(run) == "failed" and outputs.failure(run) == err.value.code
    assert "non-finite prompt_norm at step 1" in outputs.failure(run)
    train.main([*common, "--lr", "0.3", "--resume"])  # no last.pt: it starts over, and finishes
    assert outputs.status(run) == "done" and outputs.failure(run) is None and not (run / runfolder.FAILED_NAME).exists()
