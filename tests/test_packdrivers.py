"""The drivers pack prompt runs: grouping, the dry run's packed GPU-hours, a driver run in packs.

    python -m pytest -q tests/test_packdrivers.py          # ~30 s on 2 CPU cores

The grouping and the dry-run arithmetic need no training. The driver tests train a tiny T5 for a few
steps: one through a stand-in for `train.py --runs` (each entry of the runs file trained by train.main
alone), which checks the driver's side (units of packs, one row per run, equal rows with packing off), one
through train.py's own --runs, and one that SIGKILLs a driver mid-pack and runs the same command again.
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
import fewshot
import costs  # scripts/costs.py
from ept import files, options, outputs, runfolder
from ept import grid as ept_grid

TRAIN = ["--max-steps", "3", "--eval-every", "2", "--max-eval-examples", "6", "--eval-batch-size", "8",
         "--batch-size", "4", "--dropout", "0"]
REPO = Path(__file__).resolve().parents[1]
HAS_RUNS = "--runs" in options.parser._option_string_actions


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def plan_of(specs, runs_dir=Path("runs")):
    plan = {}
    for s in specs:
        settings = {k: v for k, v in s.items() if k != "_row"}
        plan.setdefault(options.run_name(settings), (settings, s.get("_row"), runs_dir / options.run_name(settings)))
    return plan


# --- grouping ---------------------------------------------------------------------------------------

def test_packs_share_task_model_and_data_never_ft_and_respect_the_size():
    args = ablate.parser.parse_args(["table1", "--models", "t5-base", "t5-large", "--tasks", "rte", "cb",
                                     "--seeds", "0", "1", "2"])
    plan = plan_of(ablate.table1(args))
    packs = ept_grid.make_packs(plan, list(plan), lambda model: 4)
    assert sorted(n for p in packs for n in p) == sorted(plan)  # every run once
    for pack in packs:
        specs = [plan[n][0] for n in pack]
        assert 1 <= len(pack) <= 4
        assert len({(s["task"], s["model"]) for s in specs}) == 1
        if any(s["method"] == "ft" for s in specs):
            assert len(pack) == 1
    ft = [p for p in packs if plan[p[0]][0]["method"] == "ft"]
    assert len(ft) == 2 * 2 * 3  # every ft run alone
    # 5 prompt methods x 3 seeds = 15 runs per (task, model): packs of 4, 4, 4, 3
    assert sorted(len(p) for p in packs if p not in ft) == [3] * 4 + [4] * 12
    # size 1 (a CPU): no packing at all; a bigger size: one pack per (task, model)
    assert all(len(p) == 1 for p in ept_grid.make_packs(plan, list(plan), lambda model: 1))
    assert sorted(len(p) for p in ept_grid.make_packs(plan, list(plan), lambda m: 16) if len(p) > 1) == [15] * 4
    # a per-model size: t5-large packs smaller
    sized = ept_grid.make_packs(plan, list(plan), lambda m: 2 if m == "t5-large" else 16)
    assert max(len(p) for p in sized if plan[p[0]][0]["model"] == "t5-large") == 2


def test_few_shot_files_are_kept_apart():
    args = fewshot.parser.parse_args(["--tasks", "rte", "--shots", "4", "16", "--seeds", "0", "1"])
    plan = plan_of(fewshot.specs(args))
    packs = ept_grid.make_packs(plan, list(plan), lambda model: 16)
    for pack in packs:
        assert len({(plan[n][0]["fewshot_k"], plan[n][0]["fewshot_seed"]) for n in pack}) == 1
    # 2 shots x 2 samples, each: one pack of the 5 prompt methods and one ft run
    assert sorted(len(p) for p in packs) == [1] * 4 + [5] * 4


def test_schedule_keeps_runs_apart():
    a = ept_grid.spec("multirc", "ept", "t5-base", 0, epochs=20, eval_every=100)
    b = ept_grid.spec("multirc", "pt", "t5-base", 0, epochs=10, eval_every=100)
    c = ept_grid.spec("multirc", "pt", "t5-base", 1, epochs=20, eval_every=100)
    plan = plan_of([a, b, c])
    assert sorted(map(len, ept_grid.make_packs(plan, list(plan), lambda m: 8))) == [1, 2]


def test_pack_size_rule():
    assert ept_grid.memory_pack_size("t5-small", 80) == ept_grid.memory_pack_size("t5-base", 80) == 16
    assert ept_grid.memory_pack_size("t5-large", 80) == 8
    assert ept_grid.memory_pack_size("t5-base", 24) == 6 and ept_grid.memory_pack_size("t5-large", 16) == 1
    args = ablate.parser.parse_args(["init"])
    assert costs.dry_pack_size(args, "t5-large") == ept_grid.memory_pack_size("t5-large", ept_grid.ASSUMED_GPU_GB)
    if not torch.cuda.is_available():
        assert ept_grid.pack_size(args, "t5-base") == 1  # a CPU: no packing
    args = ablate.parser.parse_args(["init", "--pack-size", "3"])
    assert ept_grid.pack_size(args, "t5-base") == costs.dry_pack_size(args, "t5-large") == 3


def test_pack_argv_shares_the_data_and_gives_each_run_its_folder(tmp_path):
    specs = [ept_grid.spec("cb", "ept", "t5-base", 0, fewshot_k=4, fewshot_seed=0, max_steps=10000, lr=0.3),
             ept_grid.spec("cb", "pt", "t5-base", 0, fewshot_k=4, fewshot_seed=0, max_steps=10000, lr=0.3)]
    dirs = [tmp_path / options.run_name(s) for s in specs]
    argv, entries = ept_grid.pack_argv(specs, dirs, "data", ["--dtype", "bf16"], tmp_path / "p.json")
    assert "--out-dir" not in argv and argv[-2:] == ["--runs", str(tmp_path / "p.json")]
    assert argv[argv.index("--fewshot-k") + 1] == "4" and argv[argv.index("--task") + 1] == "cb"
    assert "--dtype" in argv and "--method" not in argv and "--seed" not in argv
    assert entries[0] == {"method": "ept", "seed": 0, "max_steps": 10000, "lr": 0.3, "out_dir": str(dirs[0])}
    assert entries[1]["out_dir"].endswith("cb_pt_t5-base_steps10000_k4_fs0_s0") and "resume" not in entries[1]
    # every entry's keys are train.py options
    for entry in entries:
        assert all(f"--{k.replace('_', '-')}" in options.parser._option_string_actions for k in entry)


# --- the dry run's arithmetic ---------------------------------------------------------------------------

def test_dry_run_packed_hours_are_the_model(tmp_path, capsys):
    common = ["--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")]
    ablate.main(["hidden", "--tasks", "rte", "--dry-run", "--pack-size", "4", *common])
    out = capsys.readouterr().out
    rows = [line.split("\t") for line in (tmp_path / "dry_run.tsv").read_text().splitlines()]
    assert len(rows) == 21  # 7 hidden sizes x 3 seeds
    packs = {}
    for row in rows:
        packs.setdefault(row[8], []).append(row)
    assert sorted(map(len, packs.values())) == [1, 4, 4, 4, 4, 4]
    floor = 16 / 214.49  # t5-base, H200, bf16: the measured host-bound step
    flops = costs.step_flops("t5-base", False)
    assert 1.2e12 < flops < 1.6e12  # ~1.4 TFLOP per t5-base RTE step of 16
    compute = {"bf16": flops / (989e12 * 0.4), "fp32": flops / (67e12 * 0.4)}
    steps = 30000
    for members in packs.values():
        r = len(members)
        evals = [float(m[2]) - steps * floor / 3600 for m in members]  # the measured estimate's validation
        assert all(e > 0 for e in evals)
        for precision, (u, p) in {"fp32": (4, 5), "bf16": (6, 7)}.items():
            for m, e in zip(members, evals):
                assert float(m[u]) == pytest.approx(steps * max(floor, compute[precision]) / 3600 + e, abs=1e-4)
                packed = (steps * max(floor, r * compute[precision]) / 3600 + sum(evals)) / r
                assert float(m[p]) == pytest.approx(packed, abs=1e-4)
    assert all(float(m[6]) == pytest.approx(float(m[2]), abs=1e-4) for m in rows)  # bf16 solo = the measured step
    sums = {k: sum(float(m[k]) for m in rows) for k in (4, 5, 6, 7)}
    assert (f"fp32 {sums[4]:.1f} unpacked, {sums[5]:.1f} packed; bf16 {sums[6]:.1f} unpacked, {sums[7]:.1f} packed"
            in out)
    assert "packs=6 (sizes 4/1; --pack-size 4)" in out and "not measured" in out
    assert f"gpu_hours={sums[5]:.1f} at fp32 (packed;" in out  # the headline: the default precision, named
    ablate.main(["hidden", "--tasks", "rte", "--dry-run", "--pack-size", "4", *common, "--dtype", "bf16",
                 "--slurm-max-tasks", "3"])
    out = capsys.readouterr().out
    assert f"gpu_hours={sums[7]:.1f} at bf16 (packed;" in out and "or 3 SLURM array tasks at once" in out
    assert sums[7] < sums[6] / 2.5  # bf16 packs of 4: the host floor is shared by 4 runs


def test_dry_run_packs_only_what_is_left(tmp_path, capsys):
    common = ["--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")]
    args = ablate.parser.parse_args(["init", "--tasks", "rte", "--seeds", "0"])
    done = options.run_name({k: v for k, v in ablate.init(args)[0].items() if k != "_row"})
    (tmp_path / "runs" / done).mkdir(parents=True)
    (tmp_path / "runs" / done / "metrics.json").write_text("{}")
    if outputs.status(tmp_path / "runs" / done) != "done":
        pytest.skip("outputs.status needs more than metrics.json for 'done'")
    ablate.main(["init", "--tasks", "rte", "--seeds", "0", "--dry-run", "--pack-size", "8", *common])
    out = capsys.readouterr().out
    assert "to_train=2 packs=1 (sizes 2;" in out


# --- a driver run in packs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(rte_data_dir):
    return rte_data_dir


def fake_pack_cli(calls):
    """A stand-in for train.py --runs FILE: each entry trained alone by train.py (shared flags + its own)."""
    real = ept_grid.run_in_process

    def run(argv):
        argv = list(argv)
        if "--runs" not in argv:
            calls.append(("solo", Path(argv[argv.index("--out-dir") + 1]).name))
            return real(argv)
        i = argv.index("--runs")
        entries = json.loads(Path(argv[i + 1]).read_text())
        shared = argv[:i] + argv[i + 2:]
        calls.append(("pack", [Path(e["out_dir"]).name for e in entries]))
        return max(real(ept_grid.train_argv({k: v for k, v in entry.items() if k != "out_dir"}, entry["out_dir"],
                                         None, shared)) for entry in entries)
    return run


def rows_without_paths(rows):
    """The rows' results: not the folder, nor its config.json (a pack's runs record their pack) and its hash."""
    return sorted((json.dumps({k: v for k, v in r.items() if k not in ("run", "config", "training")}, sort_keys=True,
                              default=str) for r in rows))


def test_driver_trains_in_packs_and_writes_the_same_rows(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    grid = ["hidden", "--model", str(tiny_model_dir), "--tasks", "rte", "--values", "1", "5", "--seeds", "0", "1",
            "--data-dir", str(data_dir)]
    solo = ablate.main([*grid, "--runs-dir", str(tmp_path / "a" / "runs"), "--results-dir", str(tmp_path / "a" / "res"),
                        *TRAIN])
    assert len(solo) == 4

    root = tmp_path / "b"
    calls = []
    monkeypatch.setattr(ept_grid, "run_in_process", fake_pack_cli(calls))
    packed = ablate.main([*grid, "--runs-dir", str(root / "runs"), "--results-dir", str(root / "res"),
                          "--pack-size", "2", *TRAIN])
    assert [kind for kind, _ in calls] == ["pack", "pack"] and sorted(n for _, p in calls for n in p) == \
        sorted(Path(r["run"]).name for r in solo)
    assert rows_without_paths(packed) == rows_without_paths(solo)
    assert len((root / "res" / "hidden.jsonl").read_text().splitlines()) == 4  # one row per run
    assert not list((root / "runs").glob(f"*/{runfolder.LOCK_NAME}"))  # every lock released

    calls.clear()  # a second call trains nothing
    again = ablate.main([*grid, "--runs-dir", str(root / "runs"), "--results-dir", str(root / "res"),
                         "--pack-size", "2", *TRAIN])
    assert calls == [] and rows_without_paths(again) == rows_without_paths(solo)
    assert len((root / "res" / "hidden.jsonl").read_text().splitlines()) == 4


def test_a_driver_killed_mid_pack_resumes_through_the_same_command(tiny_model_dir, data_dir, tmp_path):
    """The bug of issue 17: an interrupted pack's runs must resume through train.py --runs (it once refused the
    "resume" key the driver wrote). SIGKILL the driver mid-pack, run the same command: the rows equal an
    uninterrupted run's, every step logged once."""
    grid = ["init", "--model", str(tiny_model_dir), "--tasks", "rte", "--methods", "ept", "--seeds", "0",
            "--values", "uniform", "vocab", "--data-dir", str(data_dir), "--pack-size", "2", *TRAIN,
            "--max-steps", "40", "--save-every", "2", "--eval-every", "20"]
    whole = ablate.main([*grid, "--runs-dir", str(tmp_path / "a" / "runs"), "--results-dir", str(tmp_path / "a" / "r")])
    cut = [*grid, "--runs-dir", str(tmp_path / "b" / "runs"), "--results-dir", str(tmp_path / "b" / "r")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "ablate.py"), *cut], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and len(list((tmp_path / "b" / "runs").glob("*/last.pt"))) < 2:
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no checkpoint, no lock released
    out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    assert not list((tmp_path / "b" / "runs").glob("*/metrics.json")), "the pack finished before the kill"
    again = ablate.main(cut)  # the same command: the pack resumes from each run's last.pt
    assert rows_without_paths(again) == rows_without_paths(whole)
    for run in (tmp_path / "b" / "runs").iterdir():
        steps = [e["step"] for e in files.read_jsonl(run / "log.jsonl") if e["event"] == "train"]
        assert steps == list(range(1, 41)) and not (run / runfolder.LOCK_NAME).exists()


@pytest.mark.skipif(not HAS_RUNS, reason="train.py --runs lands with the pack CLI")
def test_driver_packs_through_train_py_runs(tiny_model_dir, data_dir, tmp_path):
    grid = ["init", "--model", str(tiny_model_dir), "--tasks", "rte", "--methods", "ept", "pt", "--seeds", "0",
            "--values", "uniform", "vocab", "--data-dir", str(data_dir), *TRAIN]
    solo = ablate.main([*grid, "--runs-dir", str(tmp_path / "a" / "runs"), "--results-dir", str(tmp_path / "a" / "r")])
    packed = ablate.main([*grid, "--runs-dir", str(tmp_path / "b" / "runs"), "--results-dir", str(tmp_path / "b" / "r"),
                          "--pack-size", "2"])
    assert len(solo) == len(packed) == 4
    by_name = {Path(r["run"]).name: r for r in solo}
    for row in packed:
        ref = by_name[Path(row["run"]).name]
        for key in ("score", "val_score", "prompt_norm", "final_prompt_norm"):  # dropout 0, fp32: equal
            if ref[key] is None:
                assert row[key] is None
            else:
                assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key
        assert row["n_trainable"] == ref["n_trainable"] and row["method"] == ref["method"]
