"""Packs and drivers under faults (issue 20): nothing lost, nothing silently wrong.

    python -m pytest -q tests/test_packfaults.py          # ~3-4 min on 2 CPU cores

Covers, on a tiny random T5: every refusal a pack can meet changes no run's files (byte-compared before and
after); a pass-through flag means the same at --pack-size 1 and 2 (every flag a driver passes through, the
runs' config.json compared); the same run never twice in a driver grid; empty and odd run folders refused;
--no-test runs are finished runs with a row; a swept value through a driver refused up front; collecting
from a read-only runs folder; a lock held by a live process that is not ours; Ctrl-C (a real SIGINT) of
train.py, of a pack, of the in-process driver and of the pool: exit 130, one line, no traceback, locks gone,
last.pt whole, and the same command resumes.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_faults import fails, read_only  # noqa: F401 (read_only is a fixture)
from test_train import argv, write_task

import ablate
import train
from ept import files, grid, outputs, runfolder

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
STEPS = ("--max-steps", 4, "--eval-every", 2, "--dropout", 0)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("data"), "toy")


@pytest.fixture(scope="module")
def rte(rte_data_dir):
    return rte_data_dir


def tree(folder):
    """Every file under `folder` (lock files aside): its bytes' hash and modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def write_runs(path, entries):
    path.write_text(json.dumps(entries))
    return path


# --- 1. a refusal of a pack changes no run's files --------------------------------------------------------

@pytest.fixture(scope="module")
def pack(tmp_path_factory, toy, tiny_model_dir):
    """A finished pack of two runs, a (ept) and b (pt), with an eval/ folder in a; copied by each test."""
    root = tmp_path_factory.mktemp("pack")
    entries = [{"method": "ept", "out_dir": str(root / "a")}, {"method": "pt", "out_dir": str(root / "b")}]
    train.main([*argv(toy, tiny_model_dir, root, *STEPS), "--runs", str(write_runs(root / "runs.json", entries))])
    (root / "a" / "eval").mkdir()
    (root / "a" / "eval" / "scores.json").write_text("{}")
    return root


def unfinish(run):
    """A run stopped after its last checkpoint: last.pt, no metrics.json / prompt.pt."""
    for name in ("metrics.json", "prompt.pt"):
        (run / name).unlink()


def nan_weights(run):
    ckpt = torch.load(run / "last.pt", weights_only=False)
    ckpt["trainable"] = {k: torch.full_like(v, float("nan")) for k, v in ckpt["trainable"].items()}
    torch.save(ckpt, run / "last.pt")


# (how b is damaged, b's entry, the flag, the sentence): a is a good run that the call would otherwise touch
PACK_REFUSALS = {
    "truncated last.pt": (lambda b: (b / "last.pt").write_bytes((b / "last.pt").read_bytes()[:300]), {}, "--resume",
                          r"last\.pt"),
    "not a checkpoint": (lambda b: torch.save({"x": 1}, b / "last.pt"), {}, "--resume", "not a training checkpoint"),
    "NaN weights": (nan_weights, {}, "--resume", "NaN or inf weights"),
    "another method": (lambda b: None, {"method": "ept_star"}, "--resume", "another model or optimizer"),
    "past --max-steps": (lambda b: None, {"max_steps": 2}, "--resume", "past --max-steps 2"),
    "damaged log": (lambda b: (b / "log.jsonl").write_text("{oops\n" + (b / "log.jsonl").read_text()), {},
                    "--resume", "run log"),
    "damaged config": (lambda b: (b / "config.json").write_text('{"task": "toy",'), {}, "--resume",
                       "run configuration"),
    "results but no last.pt": (lambda b: (b / "last.pt").unlink(), {}, "--resume", "no last.pt to resume from"),
}


@pytest.mark.parametrize("case", list(PACK_REFUSALS))
def test_a_pack_resume_refused_for_one_run_changes_no_run(case, pack, toy, tiny_model_dir, tmp_path):
    root = tmp_path / "pack"
    shutil.copytree(pack, root)
    damage, entry, flag, message = PACK_REFUSALS[case]
    for run in ("a", "b"):
        unfinish(root / run)
    damage(root / "b")
    before = tree(root)
    entries = [{"method": "ept", "out_dir": str(root / "a")}, {"method": "pt", "out_dir": str(root / "b"), **entry}]
    runs_file = write_runs(tmp_path / "runs.json", entries)
    fails(train.main, [*argv(toy, tiny_model_dir, root, *STEPS), "--runs", str(runs_file), flag], match=message)
    assert tree(root) == before  # a's config.json, log.jsonl, last.pt: as they were
    assert not list(root.glob(f"*/{runfolder.LOCK_NAME}"))


def test_a_pack_asked_for_more_steps_of_a_finished_run_changes_no_run(pack, toy, tiny_model_dir, tmp_path):
    root = tmp_path / "pack"
    shutil.copytree(pack, root)
    unfinish(root / "a")  # a would resume; b is finished and asked for 6 steps
    before = tree(root)
    entries = [{"method": "ept", "out_dir": str(root / "a"), "max_steps": 6},
               {"method": "pt", "out_dir": str(root / "b"), "max_steps": 6}]
    runs_file = write_runs(tmp_path / "runs.json", entries)
    fails(train.main, [*argv(toy, tiny_model_dir, root, "--eval-every", 2), "--runs", str(runs_file), "--resume"],
          match="finished with --max-steps 4; --max-steps 6 asks for more")
    assert tree(root) == before


def test_a_pack_overwrite_refused_for_one_folder_empties_no_other(pack, toy, tiny_model_dir, tmp_path):
    root = tmp_path / "pack"
    shutil.copytree(pack, root)
    (root / "b" / "config.json").write_text('{"model_type": "t5"}')  # b is no longer train.py's
    before = tree(root)
    runs_file = write_runs(tmp_path / "runs.json", [{"method": "ept", "out_dir": str(root / "a")},
                                                    {"method": "pt", "out_dir": str(root / "b")}])
    fails(train.main, [*argv(toy, tiny_model_dir, root, *STEPS), "--runs", str(runs_file), "--overwrite"],
          match="not a run folder written by train.py")
    assert tree(root) == before and (root / "a" / "eval" / "scores.json").exists()


def test_a_pack_without_resume_refused_for_one_run_creates_and_changes_nothing(pack, toy, tiny_model_dir, tmp_path):
    root = tmp_path / "pack"
    shutil.copytree(pack, root)
    unfinish(root / "b")  # a finished run is skipped; a started one needs --resume or --overwrite
    before = tree(root)
    runs_file = write_runs(tmp_path / "runs.json", [{"method": "ept", "out_dir": str(root / "new")},
                                                    {"method": "pt", "out_dir": str(root / "b")}])
    fails(train.main, [*argv(toy, tiny_model_dir, root, *STEPS), "--runs", str(runs_file)], match="already holds")
    assert tree(root) == before and not (root / "new").exists()


def test_overwrite_deletes_nothing_when_a_later_check_fails(pack, toy, tmp_path):
    """Solo and pack: --overwrite empties folders only once the model, data and every run passed their checks."""
    root = tmp_path / "pack"
    shutil.copytree(pack, root)
    before = tree(root)
    fails(train.main, [*argv(toy, tmp_path / "no-model", root / "a", *STEPS), "--overwrite"], match="no-model")
    runs_file = write_runs(tmp_path / "runs.json", [{"method": "ept", "out_dir": str(root / "a")},
                                                    {"method": "pt", "out_dir": str(root / "b")}])
    fails(train.main, [*argv(toy, tmp_path / "no-model", root, *STEPS), "--runs", str(runs_file), "--overwrite"],
          match="no-model")
    assert tree(root) == before


def test_a_pack_overwrite_that_passes_deletes_eval_too(pack, toy, tiny_model_dir, tmp_path, capsys):
    root = tmp_path / "pack"
    shutil.copytree(pack, root)
    runs_file = write_runs(tmp_path / "runs.json", [{"method": "ept", "out_dir": str(root / "a")},
                                                    {"method": "pt", "out_dir": str(root / "b")}])
    train.main([*argv(toy, tiny_model_dir, root, *STEPS), "--runs", str(runs_file), "--overwrite", "--no-test"])
    assert "deleting" in capsys.readouterr().out and not (root / "a" / "eval").exists()
    assert not (root / "a" / "metrics.json").exists() and runfolder.finished(root / "a")


# --- 2. a pass-through flag means the same whatever the pack size -------------------------------------------

def pass_through_a(model):
    """Every train.py flag a driver passes through (the driver's own: --task(s), --method(s), --model, --seed(s),
    --data-dir, --out-dir/--runs-dir; --resume it adds; --overwrite it refuses), each at a value not its default."""
    return ["--max-steps", "3", "--eval-every", "2", "--save-every", "1", "--prompt-length", "4", "--reparam", "lstm",
            "--hidden-size", "3", "--broadcast", "2", "--layer-norm", "--residual", "--activation", "tanh",
            "--depth", "2", "--extra-layer", "--init", "vocab", "--dropout", "0.05", "--lr", "0.2",
            "--weight-decay", "0.02", "--warmup-steps", "1", "--max-grad-norm", "0.5", "--batch-size", "4",
            "--micro-batch-size", "2", "--max-length", "64", "--max-train-examples", "20", "--max-eval-examples", "6",
            "--eval-batch-size", "5", "--eval-mode", "rank", "--no-test", "--group-by-length", "--dtype", "tf32",
            "--random-init", "--tokenizer", str(model), "--pack-max-rows", "64"]


PASS_THROUGH_B = ["--epochs", "1", "--eval-every", "3", "--max-train-examples", "12", "--batch-size", "4",
                  "--max-eval-examples", "6", "--no-test", "--source", "unused"]  # --epochs instead of --max-steps


def configs(root):
    """{run name: config.json} of every run under root/runs, less what says where and how it was packed."""
    return {run.name: {k: v for k, v in files.read_json(run / "config.json").items() if k not in ("pack", "out_dir")}
            for run in sorted((root / "runs").iterdir())}


@pytest.mark.parametrize("flags", ["a", "b"])
def test_every_pass_through_flag_means_the_same_at_any_pack_size(flags, rte, tiny_model_dir, tmp_path):
    extra = pass_through_a(tiny_model_dir) if flags == "a" else PASS_THROUGH_B
    grid = ["table1", "--models", str(tiny_model_dir), "--tasks", "rte", "--methods", "pt", "ptuning", "resprompt",
            "ept", "--seeds", "0", "--data-dir", str(rte), *extra]
    found = {}
    for size, more in (("1", ()), ("2", ()), *((("pool", ("--pack-size", "2", "--gpus", "2")),) if flags == "a" else ())):
        root = tmp_path / size
        argv = [*grid, "--runs-dir", str(root / "runs"), "--results-dir", str(root / "results"),
                *(more or ("--pack-size", size))]
        if size == "pool":
            proc = subprocess.run([sys.executable, str(REPO / "ablate.py"), *argv], cwd=REPO, env=ENV,
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        else:
            rows = ablate.main(argv)
            assert len(rows) == 4 and all(r["tested"] is False and r["score"] is None for r in rows)
        found[size] = configs(root)
    assert len(found["1"]) == 4
    packed = [files.read_json(tmp_path / "2" / "runs" / name / "config.json")["pack"]["size"] for name in found["2"]]
    assert packed == [2, 2, 2, 2]  # the comparison is of packs against solo runs
    for size in found:
        assert found[size] == found["1"], size
    config = next(iter(found["1"].values()))
    for flag, value in zip(extra, extra[1:] + ["-"]):  # and each flag is what the run ran with
        key = flag[2:].replace("-", "_")
        if flag.startswith("--") and key in config and key not in ("prompt_length", "reparam", "hidden_size",
                                                                    "broadcast", "layer_norm", "residual",
                                                                    "activation", "depth", "extra_layer", "init"):
            assert config[key] == (True if value.startswith("--") or value == "-" else type(config[key])(value)), key


# --- 3. the same run never twice in a driver grid -------------------------------------------------------------

def test_a_driver_grid_trains_a_run_once_whatever_options_do_not_apply(tmp_path):
    args = ablate.parser.parse_args(["table1", "--models", "t5-base", "--tasks", "rte", "--methods", "pt", "ept",
                                     "ept_star", "--seeds", "0", "--runs-dir", str(tmp_path)])
    plan = grid.plan_runs(ablate.table1(args), args, ["--prompt-length", "5", "--hidden-size", "7"])
    assert sorted(plan) == ["rte_ept_star_t5-base_h7_s0", "rte_ept_t5-base_h7_s0", "rte_pt_t5-base_n5_s0"]
    args = ablate.parser.parse_args(["hidden", "--model", "t5-base", "--tasks", "rte", "--methods", "pt", "ept",
                                     "--values", "1", "5", "--seeds", "0"])
    plan = grid.plan_runs(ablate.hidden(args), args)
    pt = [name for name in plan if name.startswith("rte_pt_")]
    assert len(plan) == 3 and pt == ["rte_pt_t5-base_s0"]  # PT has no h: one PT run, not two


# --- 5. paths -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out_dir,match", [
    ("", "empty"), (".", "names no folder"), ("/", "names no folder"), ("x/..", "names no folder"),
    (7, r"must be a folder path \(a string\), not 7"), (None, "must be a folder path"), (["a"], "must be a folder"),
])
def test_a_runs_file_out_dir_must_name_a_folder(out_dir, match, toy, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs_file = write_runs(tmp_path / "runs.json", [{"method": "pt", "out_dir": str(tmp_path / "ok")},
                                                    {"method": "ept", "out_dir": out_dir}])
    fails(train.main, [*argv(toy, tiny_model_dir, tmp_path / "parent", *STEPS), "--runs", str(runs_file)], match=match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.json"]  # nothing trained, nothing created


@pytest.mark.parametrize("out_dir", ["", " ", ".", "./", "..", "a/.."])
def test_out_dir_must_name_a_run_folder(out_dir, toy, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status = fails(train.main, argv(toy, tiny_model_dir, out_dir, *STEPS), match="folder")
    assert status == 2 if not out_dir.strip() else True
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--runs-dir", "--results-dir"])
def test_driver_folders_are_never_empty(flag, capsys):
    fails(ablate.main, ["init", "--dry-run", flag, ""], match="", code=2)
    assert "empty path" in capsys.readouterr().err


# --- 6. driver pass-throughs that break the bookkeeping ------------------------------------------------------

@pytest.mark.parametrize("extra,message", [
    (["--hidden-size", "1", "5"], "--hidden-size 1 5: a driver passes one value to every run"),
    (["--lr", "0.1", "0.3"], "--lr 0.1 0.3: a driver passes one value"),
    (["--seed", "1"], "--seed is the grid's own: pass --seeds"),
    (["--method", "pt"], "--method is the grid's own: pass --methods"),
])
def test_a_sweep_passed_through_a_driver_is_refused_up_front(extra, message, tmp_path, capsys):
    fails(ablate.main, ["init", "--tasks", "rte", "--runs-dir", str(tmp_path / "r"), "--results-dir",
                        str(tmp_path / "res"), *extra], match="", code=2)
    assert message in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_a_pass_through_lr_is_train_pys_not_lr_search(tmp_path):
    args, extra = ablate.parser.parse_known_args(["table1", "--lr", "0.1"])
    assert not args.lr_search and extra == ["--lr", "0.1"]


def test_no_test_runs_are_finished_runs_with_a_row(rte, tiny_model_dir, tmp_path, capsys):
    grid = ["init", "--model", str(tiny_model_dir), "--tasks", "rte", "--seeds", "0", "--values", "uniform",
            "--data-dir", str(rte), "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "res"),
            "--max-steps", "2", "--eval-every", "2", "--max-eval-examples", "6", "--batch-size", "4", "--no-test"]
    rows = ablate.main(grid)
    out = capsys.readouterr()
    assert "NOT FINISHED" not in out.err and "1 finished (1 rows added now)" in out.out
    row, = files.read_jsonl(tmp_path / "res" / "init.jsonl")
    assert row["tested"] is False and row["score"] is None and row["test"] is None and row["val_score"] is not None
    assert rows[0]["run"] == row["run"] and outputs.status(row["run"]) == "done"
    assert ablate.main([*grid, "--collect"]) and len(files.read_jsonl(tmp_path / "res" / "init.jsonl")) == 1
    ablate.main([*grid, "--dry-run"])
    assert "  done  " in capsys.readouterr().out


# --- 7. read-only and stuck states ----------------------------------------------------------------------------

def test_collecting_from_a_read_only_runs_folder(rte, tiny_model_dir, tmp_path, read_only, capsys):
    grid = ["table1", "--models", str(tiny_model_dir), "--tasks", "rte", "--methods", "ft", "ept", "--seeds", "0",
            "--data-dir", str(rte), "--max-steps", "2", "--eval-every", "2", "--max-eval-examples", "6",
            "--batch-size", "4"]
    ablate.main([*grid, "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "res")])
    frozen = read_only(tmp_path / "runs")
    before = tree(frozen)
    for call in (["--collect"], []):  # --collect alone, and a driver call that finds every run finished
        res = tmp_path / f"res{len(call)}"
        rows = ablate.main([*grid, "--runs-dir", str(frozen), "--results-dir", str(res), *call])
        assert len(rows) == 2 and len(files.read_jsonl(res / "table1.jsonl")) == 2
    message = fails(ablate.main, [*grid, "--runs-dir", str(frozen), "--results-dir", str(tmp_path / "res3"),
                                  "--collect", "--prune-ft-checkpoints"], match="cannot delete .*read-only")
    assert "its row is written" in message and tree(frozen) == before


def test_a_lock_held_by_a_live_process_that_is_not_ours(toy, rte, tiny_model_dir, tmp_path):
    """A live process holding the lock (here a sleeping child): one sentence naming the lock file, the holder and
    the way out, at once (no wait), from train.py alone, a pack and a driver."""
    run, held = tmp_path / "run", tmp_path / "druns" / "rte_ept_tiny-t50_init-vocab_steps2_ev2_s0"
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom ept import files, runfolder\n"
                                "locks = [runfolder.Lock(files.make_dir(d)) for d in sys.argv[1:]]\n"
                                "print(flush=True)\ntime.sleep(120)", str(run), str(held)], cwd=REPO,
                               stdout=subprocess.PIPE)
    sleeper.stdout.readline()  # it holds both folders' run.lock
    try:
        host = os.uname().nodename
        t0 = time.time()
        proc = subprocess.run([sys.executable, "train.py", *argv(toy, tiny_model_dir, run, *STEPS)], cwd=REPO,
                              env=ENV, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and time.time() - t0 < 60
        line = proc.stderr.strip()
        assert f"is being written by pid {sleeper.pid} on {host}" in line and f"delete {run / runfolder.LOCK_NAME}" in line
        runs_file = write_runs(tmp_path / "runs.json", [{"method": "pt", "out_dir": str(tmp_path / "other")},
                                                        {"method": "ept", "out_dir": str(run)}])
        proc = subprocess.run([sys.executable, "train.py", *argv(toy, tiny_model_dir, tmp_path, *STEPS), "--runs",
                               str(runs_file)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert f"pid {sleeper.pid}" in proc.stdout and str(run / runfolder.LOCK_NAME) in proc.stdout
        assert "left out" in proc.stderr and "run the same command again once it is done" in proc.stderr
        assert runfolder.finished(tmp_path / "other") and not (run / "config.json").exists()
        # a driver: the same sentence for that unit, the others trained, exit 1 naming it
        args = ["init", "--model", str(tiny_model_dir), "--tasks", "rte", "--seeds", "0", "--values", "uniform",
                "vocab", "--data-dir", str(rte), "--runs-dir", str(tmp_path / "druns"), "--results-dir",
                str(tmp_path / "dres"), "--max-steps", "2", "--eval-every", "2", "--max-eval-examples", "6"]
        proc = subprocess.run([sys.executable, "ablate.py", *args], cwd=REPO, env=ENV, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert f"pid {sleeper.pid}" in proc.stderr and f"NOT FINISHED (see each folder's log.jsonl): {held.name}" \
            in proc.stderr
    finally:
        sleeper.kill()
        sleeper.wait()


# --- 8. Ctrl-C -------------------------------------------------------------------------------------------------

LONG = ["--max-steps", "400", "--eval-every", "400", "--save-every", "5", "--batch-size", "4", "--max-eval-examples",
        "6", "--eval-batch-size", "8", "--dropout", "0"]


def interrupt(proc, ready, times=1, timeout=180):
    """SIGINT `proc` once `ready()` holds (Ctrl-C: the terminal sends SIGINT); its (status, output)."""
    deadline = time.time() + timeout
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    for _ in range(times):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    out = proc.communicate(timeout=300)[0]
    return proc.returncode, out


def checkpoint_step(path):
    """A last.pt read whole, with every key --resume checks: its step."""
    ckpt = files.load_torch(path)
    assert set(runfolder.CHECKPOINT_KEYS) <= set(ckpt), sorted(ckpt)
    return ckpt["step"]


def train_steps(run):
    return [e["step"] for e in files.read_jsonl(run / "log.jsonl", torn_tail_ok=True) if e["event"] == "train"] \
        if (run / "log.jsonl").exists() else []


@pytest.mark.parametrize("kind", ["solo", "pack", "solo twice"])
def test_ctrl_c_of_train_py(kind, toy, tiny_model_dir, tmp_path):
    extra = ("--method", "pt", "ept") if kind == "pack" else ()
    command = [sys.executable, "train.py", *argv(toy, tiny_model_dir, tmp_path / "out", *LONG, *extra)]
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    n = 2 if extra else 1

    def folders():
        out = tmp_path / "out"
        return ([out] if out.exists() else []) if not extra else sorted(out.iterdir()) if out.exists() else []
    status, out = interrupt(proc, lambda: len(folders()) == n and all(len(train_steps(f)) >= 7 for f in folders()),
                            times=2 if "twice" in kind else 1)
    assert status == 130 and "Traceback" not in out, out[-3000:]
    assert "run the same command with --resume" in out
    for run in folders():
        assert not (run / runfolder.LOCK_NAME).exists() and not list(run.glob(".*.tmp*"))
        step = checkpoint_step(run / "last.pt")  # whole, a checkpoint --resume takes
        assert step >= 5
        if "twice" not in kind:
            assert train_steps(run)[-1] == step  # stopped at the step boundary it saved


@pytest.mark.parametrize("how", ["in-process", "subprocess", "pool"])
def test_ctrl_c_of_a_driver(how, rte, tiny_model_dir, tmp_path):
    args = ["init", "--model", str(tiny_model_dir), "--tasks", "rte", "--seeds", "0", "--values", "uniform", "vocab",
            "--data-dir", str(rte), "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "res"),
            *LONG, *{"in-process": (), "subprocess": ("--subprocess",), "pool": ("--gpus", "2")}[how]]
    proc = subprocess.Popen([sys.executable, "ablate.py", *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    status, out = interrupt(proc, lambda: any(len(train_steps(f)) >= 7 for f in (tmp_path / "runs").glob("*")))
    assert status == 130 and "Traceback" not in out, out[-3000:]
    assert "run the same command again to resume" in out.lower()
    assert not list((tmp_path / "runs").glob(f"*/{runfolder.LOCK_NAME}"))
    saved = list((tmp_path / "runs").glob("*/last.pt"))
    assert saved and all(checkpoint_step(p) >= 0 for p in saved)  # whole checkpoints
    assert max(checkpoint_step(p) for p in saved) >= 7
