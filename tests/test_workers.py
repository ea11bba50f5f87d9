"""Several workers on one plan: the run-folder lock (heartbeat, race-free takeover), the drivers' workers.

    python -m pytest -q tests/test_workers.py          # ~70 s on 2 CPU cores

Workers are real processes (the drivers' own command line, as a GPU node or a SLURM task runs them) on a
tiny random T5, a few steps per run: 2 and 3 workers train every run exactly once and give one worker's
results; a SIGKILLed worker's run is taken over by another worker and finished, nothing lost or doubled;
two processes never hold one run folder at once, even when they race for a dead writer's lock.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ablate
import files
import runs

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--max-steps", "3", "--eval-every", "2", "--max-eval-examples", "6", "--eval-batch-size", "8",
         "--batch-size", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
COMPARED = ("score", "test", "val_score", "best_step", "prompt_norm", "final_prompt_norm", "n_trainable", "variant",
            "task", "method", "seed", "init")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers' OMP_NUM_THREADS=1: the same arithmetic, the same results
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_model_dir):
    import prepare_data
    out = tmp_path_factory.mktemp("data")
    prepare_data.main(["--source", str(REPO / "tests" / "fixtures" / "raw"), "--tasks", "rte", "stsb", "--out", str(out),
                       "--tokenizer", str(tiny_model_dir)])
    return out


def plan_argv(tiny_model_dir, data_dir, root, *extra):
    """Table 6's grid on RTE, one seed: 3 runs (init uniform, vocab, label)."""
    return ["init", "--model", str(tiny_model_dir), "--tasks", "rte", "--seeds", "0", "--data-dir", str(data_dir),
            "--runs-dir", str(root / "runs"), "--results-dir", str(root / "results"), "--poll", "0.3", *TRAIN,
            *map(str, extra)]


def driver(*argv, **kw):
    return subprocess.Popen([sys.executable, str(REPO / "ablate.py"), *map(str, argv)], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def events(run_dir, kind):
    return [e for e in files.read_jsonl(Path(run_dir) / "log.jsonl") if e["event"] == kind]


def results(root):
    rows = files.read_jsonl(root / "results" / "init.jsonl")
    assert len({r["run"] for r in rows}) == len(rows), "a doubled row"
    return {Path(r["run"]).name: {k: r.get(k) for k in COMPARED} for r in rows}


def assert_trained_once(root, n):
    folders = sorted((root / "runs").iterdir())
    assert len(folders) == n
    for run in folders:
        assert runs.status(run) == "done"
        assert len(events(run, "setup")) == 1 and not events(run, "resume"), run.name  # one training, whole
        assert [p.name for p in run.iterdir() if "lock" in p.name or p.name == runs.FAILED] == []


@pytest.fixture(scope="module")
def one_worker(tiny_model_dir, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    ablate.main(plan_argv(tiny_model_dir, data_dir, root))  # the plain driver: one worker, this process
    assert_trained_once(root, 3)
    return results(root)


@pytest.mark.parametrize("flags", [("--gpus", 2), ("--workers", 3)])
def test_workers_train_every_run_once_with_one_workers_results(flags, one_worker, tiny_model_dir, data_dir, tmp_path):
    """--gpus 2 on a CPU: 2 workers pinned to "GPUs" 0 and 1 (CUDA_VISIBLE_DEVICES means nothing here)."""
    workers = flags[1]
    out = finish(driver(*plan_argv(tiny_model_dir, data_dir, tmp_path, *flags)))
    assert "exited with status" not in out and "broke" not in out
    assert out.count("] train rte_") == 3  # every run claimed once: no worker started a run another held
    assert len({line.split()[0] for line in out.splitlines() if "] train rte_" in line}) == min(workers, 3)
    assert_trained_once(tmp_path, 3)
    assert results(tmp_path) == one_worker  # same scores, norms and steps as one worker in one process
    assert "init: 3 runs, 3 trained now, 0 already finished, 0 failed" in out


def test_sigkilled_worker_is_taken_over_and_nothing_is_lost_or_doubled(tiny_model_dir, data_dir, tmp_path):
    """Worker 0 is SIGKILLed (its process group: the worker and its train.py) mid-run; worker 1, once its own
    runs are done, finds worker 0's run held by a dead process, takes the stale lock over and resumes it."""
    argv = plan_argv(tiny_model_dir, data_dir, tmp_path, "--max-steps", 60, "--save-every", 2, "--eval-every", 30)
    victim = driver(*argv, "--subprocess", "--worker", 0, start_new_session=True)  # train.py in a child process
    runs_dir = tmp_path / "runs"
    deadline = time.time() + 180
    target = None
    while target is None and time.time() < deadline and victim.poll() is None:
        started = [p for p in runs_dir.glob("*/last.pt")] if runs_dir.exists() else []
        target = started[0].parent if started else None
        time.sleep(0.05)
    assert target is not None, "worker 0 never started a run"
    other = driver(*argv, "--worker", 1)  # train.main in-process; starts at the plan's second run
    time.sleep(0.5)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (target / "metrics.json").exists(), "the run finished before it could be killed"
    killed_at = torch.load(target / "last.pt", weights_only=True)["step"]
    assert 0 < killed_at < 60 and (target / "run.lock").exists()  # a dead writer's lock
    out = finish(other)
    assert f"took over the stale lock {target / 'run.lock'}" in out
    assert "init w1: 3 runs, 3 trained now (3 by this worker), 0 already finished, 0 failed" in out
    rows = results(tmp_path)
    assert set(rows) == {p.name for p in runs_dir.iterdir()} and len(rows) == 3  # nothing lost, nothing doubled
    assert len(events(target, "setup")) == 1 and [e["step"] for e in events(target, "resume")] == [killed_at]
    assert [e["step"] for e in events(target, "train")] == list(range(1, 61))  # the log continues, no step twice
    assert not list(target.glob("*lock*"))


def test_each_worker_a_torchrun_group(tiny_model_dir, data_dir, tmp_path):
    """--gpus 4 --nproc 2: 2 workers, each run a 2-rank torchrun group (gloo here) that adopts its worker's lock."""
    argv = plan_argv(tiny_model_dir, data_dir, tmp_path, "--gpus", 4, "--nproc", 2, "--values", "uniform", "vocab")
    out = finish(driver(*argv))
    assert "init: 2 workers on GPUs 0,1 | 2,3" in out and "exited with status" not in out
    assert {line.split()[0] for line in out.splitlines() if "] train rte_" in line} == {"[w0", "[w1"}
    for run in (tmp_path / "runs").iterdir():
        assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert_trained_once(tmp_path, 2)
    assert len(results(tmp_path)) == 2


def test_a_run_that_fails_is_tried_once_per_session(tiny_model_dir, data_dir, tmp_path, capsys):
    """STS-B has no label words, so --init label fails: one worker tries it, records failed.json, and neither
    the other worker nor the final collection tries it again; a later call does."""
    argv = plan_argv(tiny_model_dir, data_dir, tmp_path, "--workers", 2, "--values", "uniform", "label")
    argv[argv.index("rte")] = "stsb"
    proc = driver(*argv)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "exited with status" not in out, out[-3000:]
    failed = tmp_path / "runs" / f"stsb_ept_{Path(tiny_model_dir).name}_init-label_steps3_ev2_s0"
    assert out.count(f"] train {failed.name}") == 1  # tried once, by one worker
    assert json.loads((failed / runs.FAILED).read_text())["reason"] and not (failed / "run.lock").exists()
    assert f"FAILED: {failed.name}" in out and "init: 2 runs, 1 trained now, 0 already finished, 1 failed" in out
    assert len(files.read_jsonl(tmp_path / "results" / "init.jsonl")) == 1
    i = argv.index("--workers")
    del argv[i:i + 2]
    with pytest.raises(SystemExit):  # a new call (a new session; here one worker in this process) tries it again
        ablate.main(argv)
    assert capsys.readouterr().out.count(f"] train {failed.name}") == 1


# --- the lock -----------------------------------------------------------------------------------------

RACE = r"""
import json, os, sys, time
sys.path.insert(0, {repo!r})
import runs
folders, out, go = {folders!r}, {out!r}, {go!r}
open(go + ".ready." + str(os.getpid()), "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
t0 = float(open(go).read())
for i, folder in enumerate(folders):  # round i: every process at the same instant, on one stale lock
    while time.time() < t0 + 0.25 * i:
        pass
    try:
        lock = runs.acquire_lock(folder, say=lambda m: None, heartbeat=False)
        won = True
    except runs.Busy:
        won = False
    with open(out, "a") as f:
        f.write(json.dumps({{"folder": folder, "pid": os.getpid(), "won": won}}) + "\n")
time.sleep(max(0.0, t0 + 0.25 * len(folders) + 1 - time.time()))  # the winners stay alive until all are done
"""

MUTEX = r"""
import os, sys, time
sys.path.insert(0, {repo!r})
import runs
folder, log, rounds = {folder!r}, {log!r}, {rounds}
done = 0
while done < rounds:
    try:
        lock = runs.acquire_lock(folder, say=lambda m: None, heartbeat=False)
    except runs.Busy:
        time.sleep(0.001)
        continue
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"enter {{os.getpid()}}\n".encode())
    time.sleep(0.002)
    os.write(fd, f"exit {{os.getpid()}}\n".encode())
    os.close(fd)
    done += 1
    if done % 3:
        lock.release()
    else:  # leave the lock as a writer that died on another host would: the others race to take it over
        with open(lock.path, "w") as f:
            f.write(f"elsewhere 1 dead-{{os.getpid()}}-{{done}}\n")
        os.utime(lock.path, (time.time() - 3600, time.time() - 3600))
"""


def spawn(code):
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**ENV, "EPT_LOCK_TIMEOUT": "60"})


def test_claimants_of_a_dead_writers_lock_take_it_over_exactly_once(tmp_path):
    """8 rounds, 4 processes started at the same instant on a stale lock: exactly one wins each round."""
    folders = []
    for i in range(8):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        if i % 2:  # another host, no heartbeat for an hour
            (folder / "run.lock").write_text("elsewhere 4242 tok\n")
            os.utime(folder / "run.lock", (time.time() - 3600, time.time() - 3600))
        else:  # this host, a pid that is gone
            dead = subprocess.Popen([sys.executable, "-c", "pass"])
            dead.wait()
            (folder / "run.lock").write_text(f"{socket.gethostname()} {dead.pid}\n")  # the old two-field lock
        folders.append(str(folder))
    out, go = tmp_path / "race.jsonl", tmp_path / "go"
    procs = [spawn(RACE.format(repo=str(REPO), folders=folders, out=str(out), go=str(go))) for _ in range(4)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("go.ready.*"))) < 4 and time.time() < deadline:  # all imported
        time.sleep(0.05)
    (tmp_path / "go.tmp").write_text(repr(time.time() + 0.5))
    os.replace(tmp_path / "go.tmp", go)
    for p in procs:
        assert p.wait(timeout=120) == 0
    rows = files.read_jsonl(out)
    assert len(rows) == 32
    for folder in folders:
        winners = [r["pid"] for r in rows if r["folder"] == folder and r["won"]]
        assert len(winners) == 1, (folder, winners)
        owner = runs.read_owner(Path(folder) / "run.lock")
        assert owner.pid == str(winners[0]) and owner.host == socket.gethostname()
        assert [p.name for p in Path(folder).iterdir()] == ["run.lock"]  # no takeover marker left behind


def test_two_processes_never_hold_one_run_folder_at_once(tmp_path):
    """3 processes take and give back one folder's lock 20 times each; every third time the holder leaves it
    as a dead writer from another host would, so the others race to take it over. Their time inside never
    overlaps."""
    folder, log = tmp_path / "run", tmp_path / "inside.log"
    folder.mkdir()
    procs = [spawn(MUTEX.format(repo=str(REPO), folder=str(folder), log=str(log), rounds=20)) for _ in range(3)]
    for p in procs:
        assert p.wait(timeout=180) == 0
    lines = [line.split() for line in log.read_text().splitlines()]
    assert len(lines) == 120
    for i in range(0, len(lines), 2):  # enter A, exit A, enter B, exit B, ...: never two inside at once
        (enter, who), (leave, again) = lines[i], lines[i + 1]
        assert enter == "enter" and leave == "exit" and who == again, lines[i:i + 4]
    assert len({who for _, who in lines}) == 3


def test_heartbeat_keeps_the_lock_fresh_and_notices_a_takeover(tmp_path, monkeypatch):
    monkeypatch.setenv("EPT_LOCK_HEARTBEAT", "0.05")
    monkeypatch.setenv("EPT_LOCK_TIMEOUT", "0.5")
    said = []
    lock = runs.acquire_lock(tmp_path, say=said.append)
    path = tmp_path / "run.lock"
    os.utime(path, (time.time() - 100, time.time() - 100))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 0.3  # refreshed by the heartbeat
    with pytest.raises(runs.Busy):
        runs.acquire_lock(tmp_path, say=said.append)  # a live holder
    assert runs.holder(tmp_path).token == lock.text.split()[2]
    lock.check()
    path.write_text("elsewhere 1 theirs\n")  # taken over (this process was judged dead)
    time.sleep(0.3)
    assert lock.lost and "lost the lock" in said[-1]
    with pytest.raises(runs.LockLost):
        lock.check()
    lock.release()
    assert path.read_text() == "elsewhere 1 theirs\n"  # someone else's lock is never deleted
    os.utime(path, (time.time() - 10, time.time() - 10))  # no heartbeat for 10 s > EPT_LOCK_TIMEOUT
    assert runs.holder(tmp_path) is None
    fresh = runs.acquire_lock(tmp_path, say=said.append, heartbeat=False)
    assert "took over the stale lock" in said[-1] and "no heartbeat" in said[-1]
    fresh.release()
    assert not path.exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_dead_child_not_yet_reaped_holds_nothing(tmp_path):
    """A worker that died before its launcher reaped it is a zombie: its pid exists, its lock is stale."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while time.time() < deadline and b") Z" not in Path(f"/proc/{child.pid}/stat").read_bytes():
        time.sleep(0.02)
    (tmp_path / "run.lock").write_text(f"{socket.gethostname()} {child.pid} tok\n")
    assert runs.holder(tmp_path) is None
    (tmp_path / "run.lock").write_text(f"{socket.gethostname()} {os.getpid()} tok\n")
    assert runs.holder(tmp_path).pid == str(os.getpid())
    child.wait()


def test_a_claimed_lock_is_adopted_by_train_py_only(tmp_path, monkeypatch):
    """A worker takes the lock, then starts train.py, which adopts that lock (and no other)."""
    claim = runs.acquire_lock(tmp_path, heartbeat=False)
    with pytest.raises(runs.Busy):
        runs.acquire_lock(tmp_path, heartbeat=False, inherit="somebody else's lock\n")
    with runs.handed_to_child(claim):
        assert os.environ[runs.INHERIT_ENV] == claim.text
        adopted = runs.acquire_lock(tmp_path, heartbeat=False, inherit=os.environ[runs.INHERIT_ENV])
    assert runs.INHERIT_ENV not in os.environ
    assert adopted.text != claim.text and runs.read_owner(tmp_path / "run.lock").text == adopted.text
    claim.release()  # no longer the worker's: left alone
    assert (tmp_path / "run.lock").exists()
    adopted.release()
    assert not (tmp_path / "run.lock").exists()


# --- launching and the plan's wall time ------------------------------------------------------------------

def test_one_worker_per_gpu_each_pinned(monkeypatch, capsys):
    args = ablate.parser.parse_args(["init", "--gpus", "4", "--nproc", "2"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert ablate.worker_devices(args) == ["4,5", "6,7"]  # each worker a 2-GPU torchrun group
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert ablate.worker_devices(ablate.parser.parse_args(["init", "--gpus", "3"])) == ["0", "1", "2"]
    assert ablate.worker_devices(ablate.parser.parse_args(["init", "--workers", "2"])) == [None, None]
    with pytest.raises(SystemExit, match="multiple"):
        ablate.worker_devices(ablate.parser.parse_args(["init", "--gpus", "3", "--nproc", "2"]))
    args = ablate.parser.parse_args(["init", "--gpus", "2"])
    args.command = [sys.executable, "-c", "import os, sys; print(os.environ['CUDA_VISIBLE_DEVICES'], sys.argv[1:])"]
    ablate.launch_workers("init", args, ablate.worker_devices(args), time.time())
    out = capsys.readouterr().out
    assert "[w0 gpu 0] 0 ['--worker', '0']" in out and "[w1 gpu 1] 1 ['--worker', '1']" in out


def test_dry_run_gives_the_wall_time_on_the_gpus(tmp_path, capsys):
    common = ["--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")]
    ablate.main(["hidden", "--dry-run", *common])
    one = capsys.readouterr().out
    ablate.main(["hidden", "--dry-run", "--gpus", "8", "--nproc", "2", *common])
    eight = capsys.readouterr().out
    args = ablate.parser.parse_args(["hidden"])
    plan = {ablate.run_name(s): (s, None, None) for s in
            ({k: v for k, v in s.items() if k != "_row"} for s in ablate.hidden(args))}
    hours = ablate.plan_hours(plan, args, [])
    total, longest = sum(hours.values()), max(hours.values())
    assert f"gpu_hours={total:.1f}" in one and f"wall ~{total:.1f}-{total + longest:.1f} h on 1 GPU(s)" in one
    low, high = max(total / 8, longest / 2), total / 8 + longest / 2
    assert f"wall ~{low:.1f}-{high:.1f} h on 8 GPU(s) = 4 worker(s) x 2" in eight
