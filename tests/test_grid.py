"""Issue 28's grid defects, each held by a test that failed before the fix (no training: fake run
folders, fake units and a fake sbatch; seconds on 2 CPU cores).

    python -m pytest -q tests/test_grid.py
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import ablate
import fewshot
from ept import cli, files, grid, runfolder

REPO = Path(__file__).resolve().parents[1]


def folders(tmp_path, *more):
    return ["--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"), *more]


def refused(main, argv, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    return capsys.readouterr().err


# --- 1. no abbreviations where a driver passes flags ----------------------------------------------

@pytest.mark.parametrize("flag, value, full", [("--max-step", "6", "--max-steps"),
                                               ("--eval-ev", "3", "--eval-every")])
def test_an_abbreviated_pass_through_flag_is_refused_and_nothing_written(tmp_path, capsys, flag,
                                                                         value, full):
    err = refused(ablate.main, ["init", "--tasks", "rte", "--seeds", "0", *folders(tmp_path),
                                flag, value, "--dry-run"], capsys)
    assert f"{flag} is neither this script's flag nor train.py's" in err and full in err
    err = refused(fewshot.main, ["--tasks", "rte", "--shots", "4", "--seeds", "0", "--methods",
                                 "pt", "ept", "--pack-size", "2", *folders(tmp_path), flag, value,
                                 "--dry-run"], capsys)
    assert "abbreviations are refused" in err
    assert not tmp_path.joinpath("results").exists() and not tmp_path.joinpath("runs").exists()


@pytest.mark.parametrize("flag", ["--out-dir", "--runs"])
def test_out_dir_and_runs_are_not_pass_through_flags(tmp_path, capsys, flag):
    err = refused(ablate.main, ["init", "--tasks", "rte", "cb", "--seeds", "0",
                                *folders(tmp_path), flag, str(tmp_path / "x"), "--dry-run"], capsys)
    assert f"{flag} cannot be passed to train.py through a driver" in err
    assert not tmp_path.joinpath("results").exists()


# --- 2. a row says which training it came from; a retrained run's row is replaced ----------------

def fake_run(run_dir, score, **config):
    """A finished run folder as train.py leaves it (no prompt.pt: n_inference None)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    full = {"task": "rte", "method": "ept", "model": "t5-base", "seed": 0, "weight_decay": 1e-5,
            "dropout": 0.1, "batch_size": 16, "dtype": "fp32", "n_trainable": 769, **config}
    (run_dir / "config.json").write_text(json.dumps(full))
    (run_dir / "log.jsonl").write_text(json.dumps({"event": "eval", "step": 10, "score": score})
                                       + "\n")
    (run_dir / "metrics.json").write_text(json.dumps({"score": score}))


def collect(tmp_path, capsys, values=("uniform",)):
    args = ablate.parser.parse_args(["init", "--tasks", "rte", "--seeds", "0", "--model",
                                     "t5-base", "--values", *values, *folders(tmp_path)])
    plan = grid.plan_runs(ablate.init(args), args)
    rows, missing = grid.collect("init", plan, args)
    return plan, rows, missing, capsys.readouterr()


def test_a_retrained_runs_row_replaces_the_stale_one_and_carries_its_config(tmp_path, capsys):
    run = tmp_path / "runs" / "rte_ept_t5-base_s0"
    fake_run(run, 77.5)
    collect(tmp_path, capsys)
    fake_run(run, 11.5, weight_decay=0.5)  # deleted and trained again with --weight-decay 0.5
    _, rows, _, out = collect(tmp_path, capsys)
    assert "1 replaced: their run was trained again" in out.out
    written = files.read_jsonl(tmp_path / "results" / "init.jsonl")
    assert len(written) == 1 and written[0]["score"] == 11.5
    assert written[0]["config"]["weight_decay"] == 0.5 and written[0]["config"]["dtype"] == "fp32"
    assert written[0]["config"]["dropout"] == 0.1 and written[0]["config"]["batch_size"] == 16
    _, _, _, out = collect(tmp_path, capsys)  # unchanged: nothing added or replaced
    assert "(0 rows added now)" in out.out and len(files.read_jsonl(
        tmp_path / "results" / "init.jsonl")) == 1


# --- minor: a sub-grid's collect keeps the failures the whole grid recorded ----------------------

def test_a_sub_grid_collect_keeps_the_other_runs_failures(tmp_path, capsys):
    vocab = tmp_path / "runs" / "rte_ept_t5-base_init-vocab_s0"
    vocab.mkdir(parents=True)
    (vocab / "config.json").write_text("{}")
    (vocab / runfolder.FAILED_NAME).write_text("non-finite prompt_norm at step 1")
    fake_run(tmp_path / "runs" / "rte_ept_t5-base_s0", 50.0)
    collect(tmp_path, capsys, ("uniform", "vocab"))
    failed = tmp_path / "results" / "init.failed.json"
    assert list(json.loads(failed.read_text())) == [str(vocab)]
    collect(tmp_path, capsys, ("uniform",))  # the sub-grid: none of its runs failed
    assert list(json.loads(failed.read_text())) == [str(vocab)]


# --- minor: the exit status is the summary's -----------------------------------------------------

def test_a_unit_another_driver_finished_is_not_a_failure(tmp_path, capsys, monkeypatch):
    """A second driver's unit is refused (the run lock) while the first trains it; by collect time
    it is finished: the summary says "0 not finished", and the exit status is 0."""
    run = tmp_path / "runs" / "rte_ept_t5-base_s0"

    def refused_then_finished(experiment, unit, args, i, n):
        fake_run(run, 60.0)  # the other driver finished it meanwhile
        return unit.names
    monkeypatch.setattr(grid, "run_unit", refused_then_finished)
    rows = ablate.main(["init", "--tasks", "rte", "--seeds", "0", "--values", "uniform",
                        "--model", "t5-base", *folders(tmp_path)])
    assert len(rows) == 1 and "0 not finished" in capsys.readouterr().out


# --- 8. every check before the plan file is written ---------------------------------------------

@pytest.mark.parametrize("argv, visible, message", [
    (["--gpus", "3", "--nproc", "2"], None, "not a multiple of --nproc"),
    (["--gpus", "4"], "0,1", "CUDA_VISIBLE_DEVICES lists 2")])
def test_a_failed_pool_check_writes_no_plan(tmp_path, monkeypatch, argv, visible, message):
    if visible:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(cli.Failure, match=message):
        ablate.main.__wrapped__(["init", "--tasks", "rte", "--seeds", "0", "--model", "t5-base",
                                 *folders(tmp_path), *argv])
    assert not (tmp_path / "results" / "init.plan").exists()


def test_slurm_without_sbatch_writes_no_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nobin"))
    with pytest.raises(cli.Failure, match="sbatch is not on PATH"):
        ablate.main.__wrapped__(["init", "--tasks", "rte", "--seeds", "0", "--model", "t5-base",
                                 "--slurm", *folders(tmp_path)])
    assert not (tmp_path / "results").exists()


def test_a_bad_slurm_option_writes_no_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{fake_slurm(tmp_path, 1001)}:{os.environ['PATH']}")
    with pytest.raises(cli.Failure, match="time limit 4 is not longer than the 300 s"):
        ablate.main.__wrapped__(["init", "--tasks", "rte", "--seeds", "0", "--model", "t5-base",
                                 "--slurm", "--slurm-time", "4", *folders(tmp_path)])
    assert not (tmp_path / "results").exists() and not (tmp_path / "n").exists()


# --- minor: a truncated runs file of a pack is written again ------------------------------------

def test_a_truncated_pack_runs_file_is_rewritten(tmp_path):
    args = ablate.parser.parse_args(["init", "--tasks", "rte", "--seeds", "0", "--model",
                                     "t5-base", "--pack-size", "3", *folders(tmp_path)])
    units = grid.make_units(grid.plan_runs(ablate.init(args), args), args, [])
    path = Path(args.results_dir) / "init.plan"
    grid.write_plan(path, units)
    runs_file = units[0].runs_file
    whole = runs_file.read_text()
    runs_file.write_text(whole[:40])  # a crash mid-write of an older version, a full disk
    grid.write_plan(path, units)
    assert runs_file.read_text() == whole


# --- found by SLURM=1 SMOKE=1 PACK_SIZE=8: a pack's --runs entries hold per-run options only ---

def test_a_pack_of_the_steering_grid_passes_its_batch_size_as_a_flag(tmp_path):
    """The steering grid sets batch_size 32 per spec; train.py refuses it in a --runs entry (one
    batch for a pack), so a pack gives it once on the command line."""
    from ept import options
    args = ablate.parser.parse_args(["steer", "--pack-size", "4", *folders(tmp_path)])
    units = grid.make_units(grid.plan_runs(ablate.steer(args), args), args, [])
    packs = [u for u in units if u.runs_text]
    assert packs and all(u.argv[u.argv.index("--batch-size") + 1] == "32" for u in packs)
    for unit in packs:
        for entry in json.loads(unit.runs_text):
            assert set(entry) - {"out_dir"} <= set(options.PER_RUN), entry


# --- 5. a plan larger than MaxArraySize: several arrays, one after another, then collect ----------

def fake_slurm(tmp_path, max_array):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho 'MaxArraySize            = {max_array}'\n")
    (bin_dir / "sbatch").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        n=$(cat {tmp_path}/n 2>/dev/null || echo 100); echo $((n + 1)) > {tmp_path}/n
        cat > {tmp_path}/script.$n; echo $n
        """))
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def test_a_plan_past_max_array_size_is_several_arrays_in_a_row(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", f"{fake_slurm(tmp_path, 3)}:{os.environ['PATH']}")
    plan = tmp_path / "p.plan"
    plan.write_text("".join(f"echo unit {i}\n" for i in range(7)))
    array, collect_id = grid.submit(plan, "echo collect", gpus_per_task=0, after=["42"])
    scripts = [(tmp_path / f"script.{n}").read_text() for n in range(100, 104)]
    assert [s.count("#SBATCH --array=") for s in scripts[:3]] == [1, 1, 1]
    assert "#SBATCH --array=0-2\n" in scripts[0] and "#SBATCH --array=0-0\n" in scripts[2]
    assert "--dependency=afterany:42\n" in scripts[0] and "--dependency=afterany:100\n" in \
        scripts[1] and "--dependency=afterany:101\n" in scripts[2]
    assert '$((task + 4))' in scripts[1] and '$((task + 7))' in scripts[2]
    assert "#SBATCH --dependency=afterany:100:101:102\n" in scripts[3]  # the collect job
    assert (array, collect_id) == ("102", "103")
    out = capsys.readouterr().out
    assert "array job 102 (7 units in 3 arrays" in out and "collect job 103 after it" in out
    for k, first in enumerate((0, 3, 6)):  # each array's task 0 runs its first line
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": "0"}
        ran = subprocess.run(["bash", str(tmp_path / f"p.{k}.sbatch")], env=env, text=True,
                             capture_output=True)
        assert f"unit {first}\n" in ran.stdout


# --- 6. the pool does not retry a unit that failed for good (failed.txt) ------------------------

def fake_unit(tmp_path, index, script):
    run_dir = tmp_path / f"run{index}"
    unit = grid.Unit(index, [run_dir.name], [run_dir], [], 1)
    unit.command = [sys.executable, "-c", script.replace("RUN", repr(str(run_dir)))]
    return unit


def test_the_pool_does_not_retry_a_unit_that_failed_for_good(tmp_path, capsys):
    counting = ("import os, pathlib; r = pathlib.Path(RUN); r.mkdir(exist_ok=True); "
                "open(r / 'starts', 'a').write('x'); ")
    nonfinite = fake_unit(tmp_path, 0, counting + "(r / 'failed.txt').write_text('non-finite'); "
                                                  "raise SystemExit(1)")
    killed = fake_unit(tmp_path, 1, counting + "raise SystemExit(137)")
    grid.run_pool("lr", [nonfinite, killed], ["", ""])
    assert (tmp_path / "run0" / "starts").read_text() == "x"  # not started again
    assert (tmp_path / "run1" / "starts").read_text() == "xx"  # resumed once
    out = capsys.readouterr()
    assert "unit 0 failed for good" in out.err and "unit 1 failed again" in out.err
    assert "-> slot 0" in out.out and "GPU" not in out.out  # no GPU here: the pool says slot


# --- minor: SIGUSR1 to the pool launcher reaches every child, which checkpoints ------------------

def test_the_pool_forwards_sigusr1_and_exits_138_with_a_message(tmp_path):
    child = ("import os, signal, sys, time, pathlib; r = pathlib.Path(RUN); r.mkdir(); "
             "signal.signal(signal.SIGUSR1, lambda *a: (r.joinpath('usr1').write_text('x'), "
             "sys.exit(138))); r.joinpath('ready').write_text('x'); time.sleep(60)")
    launcher = textwrap.dedent(f"""\
        import sys; sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'tests')!r})
        from pathlib import Path
        from test_grid import fake_unit
        from ept import grid
        tmp = Path({str(tmp_path)!r})
        grid.run_pool("x", [fake_unit(tmp, i, {child!r}) for i in range(2)], ["", ""])
        """)
    proc = subprocess.Popen([sys.executable, "-c", launcher], text=True, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not all((tmp_path / f"run{i}" / "ready").exists() for i in range(2)):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 138, err
    assert "SIGUSR1 received: every child wrote last.pt and stopped" in err
    assert all((tmp_path / f"run{i}" / "usr1").exists() for i in range(2))
