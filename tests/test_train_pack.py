"""train.py with several runs at once (a pack, packing.py) on a tiny T5 and tiny data, through its CLI.

    python -m pytest -q tests/test_train_pack.py          # ~1 minute on 2 CPU cores

Covers: a sweep's run folders (names, config.json "pack", today's files); every run of a pack == the same
run trained alone (dropout 0, fp32: losses, prompt.pt, metrics.json); --runs FILE; one non-finite run
stops alone (exit status 1, its "nonfinite" event, the others finish); finished runs skipped, busy ones
left out, nothing left = exit 0; ft refused; SIGKILL of a pack + --resume == uninterrupted, run by run.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import REPO, argv, events, run_cli, write_task

import train
from ept import outputs

COMMON = ("--max-steps", 4, "--eval-every", 2, "--dropout", 0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("data"), "toy")


def losses(run_dir):
    return [(e["step"], e["loss"]) for e in events(run_dir, "train")]


def assert_same_run(a, b):
    """Two run folders trained the same: losses, grad norms, mu_t, validation, prompt.pt, metrics.json."""
    ea, eb = events(a, "train"), events(b, "train")
    assert [e["step"] for e in ea] == [e["step"] for e in eb]
    for key in ("loss", "grad_norm", "prompt_norm", "lr"):
        # rel 1e-4: train.py's step and the pack's sum the same terms in another order (float rounding)
        assert [e[key] for e in ea] == pytest.approx([e[key] for e in eb], rel=1e-4, abs=1e-6), key
    assert [(e["step"], e["score"]) for e in events(a, "eval")] == [(e["step"], e["score"]) for e in events(b, "eval")]
    pa, pb = outputs.load_folded_prompt(a / "prompt.pt")[0], outputs.load_folded_prompt(b / "prompt.pt")[0]
    assert torch.allclose(pa, pb, rtol=1e-4, atol=1e-6)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert ma.keys() == mb.keys() and all(ma[k] == pytest.approx(mb[k]) for k in ma)


def test_pack_equals_each_run_alone(data_dir, tiny_model_dir, tmp_path):
    """pt (n = 10), ept (n = 1) and ept_star (n = 10, h = 1): left-padded prompts of different lengths, 2 seeds."""
    out = tmp_path / "pack"
    result = train.main(argv(data_dir, tiny_model_dir, out, *COMMON, "--method", "pt", "ept", "ept_star",
                             "--seed", 0, 1))
    model = tiny_model_dir.name
    names = [f"toy_{m}_{model}_steps4_ev2_s{s}" for m in ("pt", "ept", "ept_star") for s in (0, 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert len(result["runs"]) == 6
    for name in names:
        run = out / name
        for f in ("config.json", "log.jsonl", "best.pt", "last.pt", "prompt.pt", "metrics.json"):
            assert (run / f).exists(), (name, f)
        assert not (run / "run.lock").exists()
        config = json.loads((run / "config.json").read_text())
        assert config["pack"] == {"size": 6, "runs": names} and "runs" not in config
        method, seed = config["method"], config["seed"]
        assert name == f"toy_{method}_{model}_steps4_ev2_s{seed}"
        alone = tmp_path / "alone" / name
        train.main(argv(data_dir, tiny_model_dir, alone, *COMMON, "--method", method, "--seed", seed))
        assert_same_run(run, alone)
        solo_config = json.loads((alone / "config.json").read_text())
        assert {k: v for k, v in config.items() if k not in ("pack", "out_dir")} == \
            {k: v for k, v in solo_config.items() if k != "out_dir"}


def test_pack_equals_the_run_alone_with_dropout_on(data_dir, tiny_model_dir, tmp_path, capsys):
    """T5's dropout on (the config's 0.1, the paper's setting): a run's masks are its own examples' (stateless),
    so a packed run still equals its solo run; and dropout does act (the losses differ from dropout 0)."""
    on = ("--max-steps", 4, "--eval-every", 2)
    out = tmp_path / "pack"
    train.main(argv(data_dir, tiny_model_dir, out, *on, "--method", "ept", "pt", "--seed", 1))
    name = f"toy_pt_{tiny_model_dir.name}_steps4_ev2_s1"
    table = capsys.readouterr().out.splitlines()[-3:]  # issue 29: the sweep ends with its runs' table
    assert table[0].split() == ["run", "best", "val", "step", "test", "mu_t", "end"]
    row = table[2].split()
    metrics = json.loads((out / name / "metrics.json").read_text())
    assert row[0] == name and float(row[3]) == pytest.approx(metrics["score"], abs=0.01)
    assert float(row[4]) == pytest.approx(events(out / name, "train")[-1]["prompt_norm"], abs=0.01)
    alone = tmp_path / "alone" / name
    train.main(argv(data_dir, tiny_model_dir, alone, *on, "--method", "pt", "--seed", 1))
    assert_same_run(out / name, alone)
    off = tmp_path / "off" / name
    train.main(argv(data_dir, tiny_model_dir, off, *COMMON, "--method", "pt", "--seed", 1))
    assert [x for _, x in losses(off)] != pytest.approx([x for _, x in losses(alone)], rel=1e-4)


def test_a_pack_whose_every_run_stopped_says_all(data_dir, tiny_model_dir, tmp_path):
    """Issue 28: "4 of the 4 runs stopped; the others finished" named others that did not exist."""
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps([{"method": "ept", "lr": 1e30, "warmup_steps": 1000, "seed": s} for s in (0, 1)]))
    with pytest.raises(SystemExit, match=r"all 2 runs of the pack stopped\. ") as err:
        train.main(argv(data_dir, tiny_model_dir, tmp_path / "pack", "--max-steps", 3, "--eval-every", 1, "--runs", spec))
    assert "the others" not in str(err.value)


def test_runs_file_faults_skips_and_refusals(data_dir, tiny_model_dir, tmp_path):
    """--runs FILE: run "bad" overflows (lr 1e30 after a warm-up step of lr 0) and stops alone at step 2."""
    out = tmp_path / "pack"
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps([{"method": "ept", "lr": 1e30, "warmup_steps": 1000, "out_dir": str(out / "bad")},
                                {"method": "pt", "seed": 1, "prompt_length": 3, "lr": 0.1},
                                {"method": "ept", "seed": 2, "hidden_size": 2, "task": "toy"}]))
    flags = ("--max-steps", 3, "--eval-every", 1, "--runs", spec)
    with pytest.raises(SystemExit, match="1 of the 3 runs of the pack stopped"):
        train.main(argv(data_dir, tiny_model_dir, out, *flags))
    model = tiny_model_dir.name
    good = [out / f"toy_pt_{model}_n3_lr0.1_steps3_ev1_s1", out / f"toy_ept_{model}_h2_steps3_ev1_s2"]
    (bad,) = events(out / "bad", "nonfinite")
    assert bad["step"] == 2 and "prompt_norm" in bad["what"]
    assert not (out / "bad" / "metrics.json").exists() and not (out / "bad" / "run.lock").exists()
    for run in good:
        assert (run / "metrics.json").exists() and [e["step"] for e in events(run, "eval")] == [1, 2, 3]
        assert json.loads((run / "config.json").read_text())["pack"]["size"] == 3

    # again with --resume: the finished runs are skipped, one held by a live process is left out, and the
    # command fails (its unit is not finished) naming the held folder
    lock = train.runfolder.Lock(out / "bad")  # a live writer: this process
    proc = run_cli("train.py", argv(data_dir, tiny_model_dir, out, *flags, "--resume"), check=False)
    assert proc.stdout.count("skipped") == 2 and "left out of the pack" in proc.stdout
    assert "nothing left to train" in proc.stdout and proc.returncode == 1
    assert f"1 run(s) of the pack were left out, held by another process: {out / 'bad'}" in proc.stderr
    lock.release()
    resumed = tmp_path / "resume.json"  # a run's own "resume": true (the drivers once wrote it; now accepted)
    resumed.write_text(json.dumps([{"method": "ept", "seed": 2, "hidden_size": 2, "resume": True}]))
    proc = run_cli("train.py", argv(data_dir, tiny_model_dir, out, "--max-steps", 3, "--eval-every", 1,
                                    "--runs", resumed))
    assert "skipped" in proc.stdout

    refusals = {"ft trains T5 itself": ("--method", "ept", "ft"),
                "shared by the runs": ("--runs", tmp_path / "shared.json"),
                "unknown option": ("--runs", tmp_path / "unknown.json"),
                "one value for --seed": ("--runs", spec, "--seed", 0, 1)}
    (tmp_path / "shared.json").write_text(json.dumps([{"method": "pt", "batch_size": 4}]))
    (tmp_path / "unknown.json").write_text(json.dumps([{"method": "pt", "colour": "red"}]))
    for message, extra in refusals.items():
        with pytest.raises(SystemExit, match=message):
            train.main(argv(data_dir, tiny_model_dir, tmp_path / "refused", "--max-steps", 1, *extra))
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_sigkill_of_a_pack_then_resume_equals_uninterrupted(data_dir, tiny_model_dir, tmp_path):
    """Real SIGKILL of a pack of 3 mid-run, then --resume: every run equals the uninterrupted pack's, and each
    resumed from its own last.pt (the runs may have been saved at different steps)."""
    flags = ("--max-steps", 120, "--eval-every", 60, "--save-every", 2, "--dropout", 0, "--no-test",
             "--method", "pt", "ept", "ept_star")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_cli("train.py", argv(data_dir, tiny_model_dir, whole, *flags))
    names = sorted(p.name for p in whole.iterdir())
    assert len(names) == 3
    cmd = [sys.executable, str(REPO / "train.py"), *argv(data_dir, tiny_model_dir, broken, *flags)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not all((broken / n / "last.pt").exists() for n in names) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    time.sleep(0.1)  # a few more steps, so the kill lands between checkpoints
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = {n: torch.load(broken / n / "last.pt", weights_only=True)["step"] for n in names}
    assert all(0 < s < 120 for s in killed_at.values()), killed_at
    assert all((broken / n / "run.lock").exists() for n in names)  # SIGKILL leaves stale locks
    run_cli("train.py", argv(data_dir, tiny_model_dir, broken, *flags, "--resume"))
    # Killed between two runs' last.pt writes, the runs resume at different steps: their batches then share
    # a forward with other mates' rows, padded to another length, which moves the float rounding (~1e-7,
    # README: the pack equals the solo step within rounding). In step, the resumed pack is bitwise the same.
    same = (lambda a, b: a == b) if len(set(killed_at.values())) == 1 else \
        (lambda a, b: a == pytest.approx(b, rel=1e-5, abs=1e-6))
    for n in names:
        assert [e["step"] for e in events(broken / n, "resume")] == [killed_at[n]]
        assert [s for s, _ in losses(whole / n)] == [s for s, _ in losses(broken / n)]
        assert same([v for _, v in losses(broken / n)], [v for _, v in losses(whole / n)]), killed_at
        assert same([e["prompt_norm"] for e in events(broken / n, "train")],
                    [e["prompt_norm"] for e in events(whole / n, "train")]), killed_at
        assert same(outputs.load_folded_prompt(broken / n / "prompt.pt")[0].flatten().tolist(),
                    outputs.load_folded_prompt(whole / n / "prompt.pt")[0].flatten().tolist()), killed_at
        assert not (broken / n / "run.lock").exists()


@pytest.mark.slow
def test_torchrun_pack_two_processes_equal_one(data_dir, tiny_model_dir, tmp_path):
    """A pack of 2 under torchrun (2 gloo ranks x 4 examples of each run) == the same pack in one process."""
    flags = ("--max-steps", 3, "--eval-every", 3, "--dropout", 0, "--eval-mode", "rank", "--method", "pt", "ept")
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("train.py", argv(data_dir, tiny_model_dir, one, *flags))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "train.py"), *argv(data_dir, tiny_model_dir, two, *flags)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in one.iterdir())
    assert len(names) == 2 and sorted(p.name for p in two.iterdir()) == names
    for n in names:
        assert json.loads((two / n / "config.json").read_text())["world_size"] == 2
        assert_same_run(one / n, two / n)
