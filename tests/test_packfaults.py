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

import ablate
import files
import runs
import train
from test_faults import fails, read_only  # noqa: F401 (read_only is a fixture)
from test_train import argv, write_task

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
STEPS = ("--max-steps", 4, "--eval-every", 2, "--dropout", 0)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("data"), "toy")


@pytest.fixture(scope="module")
def rte(tmp_path_factory, tiny_model_dir):
    import prepare_data
    out = tmp_path_factory.mktemp("rte")
    prepare_data.main(["--source", str(REPO / "tests" / "fixtures" / "raw"), "--tasks", "rte", "--out", str(out),
                       "--tokenizer", str(tiny_model_dir)])
    return out


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
    assert not list(root.glob(f"*/{runs.LOCK_NAME}"))


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
    assert not (root / "a" / "metrics.json").exists() and runs.finished(root / "a")
