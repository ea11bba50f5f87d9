"""Bad input and faults, as a user meets them: one sentence, a non-zero exit, no traceback, no hang, and no
file that existed before changed or removed (docs/training.md, "Faults and bad input"). Real faults: files
truncated, overwritten or emptied, bytes that are not UTF-8, a small or read-only file system (a tmpfs,
when this process may mount one), a learning rate that overflows the weights; no mocks.

    python -m pytest -q tests/test_faults.py          # ~1 minute on 2 CPU cores

Grouped by fault class: flags, paths, damaged files, edited data, run folder states, non-finite values,
the disk, and the command lines themselves (exit status and stderr).
"""
import contextlib
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import argv, data_dir  # noqa: F401 (data_dir is a fixture shared with test_train)
from conftest import save_folded_prompt

import ablate
import analyze
import evaluate
import export
import fewshot
import model as M
import prepare_data
import report
import train
from ept import cli, grid, outputs, runtime, tasks

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "raw"
STEPS = ("--max-steps", 4, "--eval-every", 2)


# --- helpers -------------------------------------------------------------------------------------

def fails(call, *args, match, code=None, **kwargs):
    """`call` ends with SystemExit: one line, matching `match`, a non-zero status. Returns the message."""
    with pytest.raises((SystemExit, cli.Failure)) as exc:  # a script's main, or the code beneath it
        call(*args, **kwargs)
    status = exc.value.code if isinstance(exc.value, SystemExit) else str(exc.value)
    if code is not None:
        assert status == code
    assert status not in (0, None)
    if isinstance(status, int):  # argparse: its one error line went to stderr
        return status
    message = str(status)
    assert "\n" not in message.strip() and "Traceback" not in message, message
    assert __import__("re").search(match, message), message
    return message


def snapshot(folder):
    """Every file under `folder`: its bytes' hash and modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@contextlib.contextmanager
def deadline(seconds):
    """A hang fails the test instead of stalling the suite."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s: a hang")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def mount_tmpfs(path, size):
    """A small tmpfs at `path` (root only); False where this process may not mount one."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB file system: what 'the disk is full' looks like, for real."""
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "256k"):
        pytest.skip("needs root to mount a small tmpfs")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.fixture
def read_only(tmp_path):
    """make(folder): `folder` copied onto a file system then made read-only (a remounted tmpfs as root,
    chmod otherwise: root ignores file modes, but not a read-only mount). Returns the read-only copy."""
    mounts = []

    def make(folder):
        disk = tmp_path / f"ro{len(mounts)}"
        if mount_tmpfs(disk, "64m"):
            mounts.append(disk)
            shutil.copytree(folder, disk / folder.name)
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        elif os.geteuid() != 0:
            shutil.copytree(folder, disk / folder.name)
            for p in sorted((disk / folder.name).rglob("*"), reverse=True) + [disk / folder.name, disk]:
                p.chmod(0o555 if p.is_dir() else 0o444)
        else:
            pytest.skip("root without mount: nothing here is read-only")
        return disk / folder.name
    yield make
    for disk in mounts:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    for p in tmp_path.rglob("*"):
        with contextlib.suppress(OSError):
            p.chmod(0o755)


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def done_run(tmp_path_factory, data_dir, tiny_model_dir):
    """A finished EPT* run (4 steps), copied by each test that damages it."""
    run = tmp_path_factory.mktemp("done") / "run"
    train.main(argv(data_dir, tiny_model_dir, run, "--method", "ept_star", *STEPS))
    return run


def copy_run(done_run, tmp_path, name="run"):
    shutil.copytree(done_run, tmp_path / name)
    return tmp_path / name


def copy_data(data_dir, tmp_path):
    shutil.copytree(data_dir, tmp_path / "data")
    return tmp_path / "data"


# --- flags: argparse types and ranges, before any work ---------------------------------------------

@pytest.mark.parametrize("module,args", [
    (train, ["--batch-size", "0"]), (train, ["--eval-every", "0"]), (train, ["--lr", "-1"]), (train, ["--lr", "inf"]),
    (train, ["--lr", "nan"]), (train, ["--dropout", "1.5"]), (train, ["--prompt-length", "0"]),
    (train, ["--hidden-size", "0"]), (train, ["--broadcast", "0"]), (train, ["--micro-batch-size", "0"]),
    (train, ["--max-length", "0"]), (train, ["--epochs", "0"]), (train, ["--max-train-examples", "0"]),
    (train, ["--max-eval-examples", "0"]), (train, ["--max-steps", "-3"]), (train, ["--seed", "-1"]),
    (train, ["--task", "../rte"]), (train, ["--task", "/tmp/rte"]), (train, ["--batch-size", "two"]),
    (evaluate, ["run", "--eval-batch-size", "0"]), (evaluate, ["run", "--task", "a/b"]),
    (prepare_data, ["--fewshot", "0"]), (prepare_data, ["--fewshot-seeds", "-1"]), (prepare_data, ["--data-seed", "x"]),
    (ablate, ["init", "--seeds", "-1"]), (ablate, ["init", "--nproc", "0"]), (ablate, ["table4", "--epochs", "0"]),
    (ablate, ["structure", "--values", "sideways"]), (ablate, ["hidden", "--values", "0"]),
    (ablate, ["lr", "--values", "fast"]), (ablate, ["table1", "--values", "1"]), (ablate, ["init", "--tasks", "../x"]),
    (ablate, ["init", "--tasks", "nosuchtask", "--dry-run"]), (ablate, ["init", "--max-steps", "0", "--dry-run"]),
    (ablate, ["init", "--no-such-flag", "--dry-run"]),
    (fewshot, ["--shots", "0"]), (fewshot, ["--steps", "0"]), (fewshot, ["--seeds", "-2"]),
    (analyze, ["subset", "--lengths", "0"]), (analyze, ["all", "--top-k", "0"]), (analyze, ["all", "--methods", "x"]),
])
def test_a_wrong_flag_is_one_argparse_error(module, args, tmp_path, capsys):
    assert fails(module.main, args + ["--results-dir", str(tmp_path)] * (module is ablate), match="", code=2) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert ": error: " in err[-1], err
    assert not list(tmp_path.iterdir())  # nothing written


def test_zero_is_never_the_default_in_the_prompt_builder():
    for option in ("prompt_length", "hidden_size", "broadcast", "depth"):
        with pytest.raises(ValueError, match=f"{option} must be an integer >= 1"):
            M.build_prompt_module("ept_star" if option != "prompt_length" else "pt", 8, **{option: 0})
    assert M.build_prompt_module("ept_star", 8)().shape == (10, 8)  # None: the paper's defaults
    assert M.build_prompt_module("pt", 8, prompt_length=3)().shape == (3, 8)


# --- paths: missing, wrong kind, not what the stage expects ----------------------------------------

def test_model_and_tokenizer_paths(tmp_path, tiny_model_dir, capsys):
    fails(runtime.load_t5, tmp_path / "nope", match=r"no model folder .*nope \(it does not exist\)")
    fails(runtime.load_t5, tiny_model_dir / "config.json", match="is a file; pass the model folder")
    fails(runtime.load_t5, tmp_path, match="holds no config.json: it is not a T5 model folder")
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, damaged)
    (damaged / "config.json").write_text('{"d_model": ')  # half-written
    fails(runtime.load_t5, damaged, match=r"config.json is not valid JSON")
    shutil.copy(tiny_model_dir / "config.json", damaged / "config.json")
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    fails(runtime.load_t5, damaged, match=r"the model in .*damaged cannot be loaded, its files are damaged")
    (damaged / "tokenizer.json").write_text("{bad")
    fails(runtime.load_tokenizer, damaged, match=r"the tokenizer in .* cannot be loaded.*pass --tokenizer DIR")
    # a model folder without a vocabulary: the parent's, said aloud; with none there, an error
    parent = tmp_path / "models"
    bare = parent / "t5"
    bare.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", bare)
    fails(runtime.load_tokenizer, bare, match="holds no tokenizer.*pass --tokenizer DIR")
    shutil.copy(tiny_model_dir / "tokenizer.json", parent)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", parent)
    capsys.readouterr()
    assert runtime.load_tokenizer(bare)("good")["input_ids"]
    assert f"holds no vocabulary; using the one in {parent}" in capsys.readouterr().out


def test_a_tokenizer_that_maps_text_to_unk_is_refused(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2},
                                                                              unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(tmp_path)  # a vocabulary of special tokens only: every word is <unk>
    fails(runtime.load_tokenizer, tmp_path, match="maps plain English to <unk>")


def test_stages_given_the_wrong_folder(done_run, tiny_model_dir, data_dir, tmp_path):
    for folder, message in ((tmp_path / "nope", "no run folder .*nope"), (tiny_model_dir, "is not a run folder"),
                            (tiny_model_dir / "config.json", "no run folder .*a file")):
        fails(evaluate.main, [str(folder)], match=message)
        fails(export.main, [str(folder), str(tmp_path / "out")], match=message)
    assert not (tmp_path / "out").exists()
    before = snapshot(tiny_model_dir)
    fails(train.main, argv(data_dir, tiny_model_dir, tiny_model_dir, "--overwrite"),  # --overwrite on a model folder
          match="is not a run folder written by train.py; --overwrite deletes only run folders")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "log.jsonl").write_text("mine\n")
    (other / "thesis.tex").write_text("mine\n")
    fails(train.main, argv(data_dir, tiny_model_dir, other, "--overwrite"), match="not a run folder")
    assert snapshot(tiny_model_dir) == before and (other / "log.jsonl").read_text() == "mine\n"
    fails(train.main, argv(data_dir, tiny_model_dir, tmp_path / "r", "--task", "nosuch"), match="unknown task 'nosuch'")
    fails(train.main, argv(data_dir, tiny_model_dir, tmp_path / "r", "--model", tmp_path / "nomodel"),
          match="no model folder")
    fails(report.main, ["--results", str(tmp_path), "--out", str(tiny_model_dir / "config.json")],
          match="cannot create the report folder .*a file of that name is in the way")
    fails(analyze.main, ["all", "--results-dir", str(tmp_path / "none")], match="no results folder")
    fails(prepare_data.main, ["--tasks", "cb", "--source", str(tmp_path / "none"), "--out", str(tmp_path / "d"),
                              "--tokenizer", str(tiny_model_dir)], match="missing folder")
    fails(prepare_data.main, ["--tasks", "cb", "--source", str(FIXTURES), "--out", str(tiny_model_dir / "config.json"),
                              "--tokenizer", str(tiny_model_dir)], match="a file of that name is in the way")
    (tmp_path / "d2").mkdir()
    (tmp_path / "d2" / "cb").write_text("mine")  # a file where the task's folder goes
    fails(prepare_data.main, ["--tasks", "cb", "--source", str(FIXTURES), "--out", str(tmp_path / "d2"),
                              "--tokenizer", str(tiny_model_dir)], match="cb: a file of that name is in the way")
    assert (tmp_path / "d2" / "cb").read_text() == "mine" and len(list((tmp_path / "d2").iterdir())) == 1
    fails(fewshot.main, ["--data-dir", str(data_dir), "--tasks", "toy", "--shots", "4", "--seeds", "0"], match="",
          code=2)  # the k-shot samples are not prepared: said before the first run


def test_evaluate_input_files(done_run, tmp_path):
    run = str(done_run)
    cases = {"new.json": ('["a", "b"]', r"a \.json file is neither a \.jsonl"),
             "rows.jsonl": ('["a"]\n', "line 1 is not a JSON object"),
             "nosource.jsonl": ('{"text": "a"}\n', "row 1 has no 'source' string"),
             "empty.txt": ("\n\n", "holds no inputs"),
             "latin1.txt": (b"caf\xe9\n", "byte 3 is not UTF-8")}
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        fails(evaluate.main, [run, "--input", str(path)], match=message)
    fails(evaluate.main, [run, "--input", str(tmp_path / "none.txt")], match="does not exist")
    (tmp_path / "ok.txt").write_text("sentence: good\n")
    fails(evaluate.main, [run, "--input", str(tmp_path / "ok.txt"), "--output", str(tmp_path / "no" / "p.jsonl")],
          match=r"cannot write .*p\.jsonl: the folder .*no does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*cases, "ok.txt"])  # no output anywhere


# --- damaged files: truncated, half-written, not JSON, not UTF-8 --------------------------------------

def test_damaged_run_files(done_run, tmp_path):
    run = copy_run(done_run, tmp_path)
    prompt = run / "prompt.pt"
    prompt.write_bytes(prompt.read_bytes()[:200])
    fails(evaluate.main, [str(run)], match=r"the folded prompt .*prompt\.pt is damaged")
    fails(export.main, [str(run), str(tmp_path / "out")], match=r"prompt\.pt is damaged")
    shutil.copy(run / "best.pt", prompt)  # a checkpoint where the folded prompt belongs
    fails(evaluate.main, [str(run)], match="is not a folded prompt")
    (run / "config.json").write_text('{"task": "toy", "method"')
    fails(evaluate.main, [str(run)], match=r"config\.json is not valid JSON")
    fails(export.main, [str(run), str(tmp_path / "out")], match=r"config\.json is not valid JSON")
    assert not (tmp_path / "out").exists()


def test_resume_from_damaged_files_changes_nothing(done_run, data_dir, tiny_model_dir, tmp_path):
    run = copy_run(done_run, tmp_path)
    (run / "metrics.json").unlink()  # unfinished: a resume would continue it
    resume = argv(data_dir, tiny_model_dir, run, "--method", "ept_star", "--max-steps", 4, "--eval-every", 2,
                  "--resume")  # its own --max-steps: another would change its lr schedule (refused, issue 28)
    last, log = (run / "last.pt").read_bytes(), (run / "log.jsonl").read_text().splitlines()

    def truncated():
        (run / "last.pt").write_bytes(last[:len(last) // 2])

    def not_a_checkpoint():
        shutil.copy(run / "prompt.pt", run / "last.pt")

    def damaged_log():
        (run / "last.pt").write_bytes(last)
        (run / "log.jsonl").write_text("\n".join(log[:2] + ["{not json"] + log[2:]) + "\n")

    for damage, extra, message in (
            (truncated, (), r"last\.pt is damaged .*pass --overwrite to start over"),
            (not_a_checkpoint, (), r"last\.pt is not a training checkpoint"),
            (lambda: (run / "last.pt").write_bytes(last), ("--method", "pt"), "holds another model or optimizer"),
            (damaged_log, (), r"the run log .*log\.jsonl is damaged: line 3")):
        damage()
        before = snapshot(run)
        fails(train.main, [*resume, *extra], match=message)
        assert snapshot(run) == before  # config.json not rewritten, log.jsonl not appended, nothing deleted


def test_a_half_written_last_log_line_does_not_block_resume(done_run, data_dir, tiny_model_dir, tmp_path):
    run = copy_run(done_run, tmp_path)
    (run / "metrics.json").unlink()
    with open(run / "log.jsonl", "a") as f:
        f.write('{"event": "train", "step": 5, "lo')  # the writer was killed mid-line
    out = train.main(argv(data_dir, tiny_model_dir, run, "--method", "ept_star", "--max-steps", 4, "--eval-every", 2,
                          "--resume"))  # its own --max-steps (issue 28): the torn line is dropped, the run ends
    lines = (run / "log.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines) and out["best_step"] is not None
    assert [json.loads(line)["step"] for line in lines if '"train"' in line] == [1, 2, 3, 4]


def test_a_damaged_tokenization_cache_is_rebuilt(data_dir, tiny_model_dir, tmp_path, capsys):
    data = copy_data(data_dir, tmp_path)
    tok = runtime.load_tokenizer(tiny_model_dir)
    path = data / "toy" / "validation.jsonl"
    tokenize = lambda: tasks.read_split({}, "validation", path, tok, 32)[1:]  # noqa: E731
    good = tokenize()
    tasks._TOKENIZED.clear()
    (cache,) = (data / "toy" / "cache").glob("validation.*.pt")
    for damage in (cache.read_bytes()[:100], b"", b"not a checkpoint"):
        cache.write_bytes(damage)
        capsys.readouterr()
        assert tokenize() == good
        assert "is damaged; tokenizing validation.jsonl again" in capsys.readouterr().out
        tasks._TOKENIZED.clear()
    torch.save({"source_ids": torch.zeros(3, dtype=torch.int32)}, cache)  # a valid file, the wrong content
    assert tokenize() == good
    tasks._TOKENIZED.clear()  # the right format, one row short: never a run on misaligned ids
    short = [(torch.tensor([x for s in side[:-1] for x in s], dtype=torch.int32), torch.tensor([*map(len, side[:-1])]))
             for side in good]
    torch.save(short, cache)
    capsys.readouterr()
    assert tokenize() == good and "is damaged" in capsys.readouterr().out


def test_raw_files_that_are_not_utf8_or_json(tmp_path, tiny_model_dir):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "cb", src / "cb")
    train_file = src / "cb" / "train.jsonl"
    text = train_file.read_bytes()
    second = text.index(b"\n") + 1
    train_file.write_bytes(text[:second + 20] + b"\xff\xfe" + text[second + 20:])  # latin-1 damage on line 2
    args = ["--tasks", "cb", "--source", str(src), "--out", str(tmp_path / "out"), "--tokenizer", str(tiny_model_dir)]
    fails(prepare_data.main, args, match=rf"{train_file}: line 2, byte {second + 20} \(0xff\) is not UTF-8")
    train_file.write_bytes(text)
    prepare_data.main(args)
    meta = tmp_path / "out" / "cb" / "meta.json"
    meta.write_text("{")  # a damaged meta.json: the next run says so instead of a traceback
    before = snapshot(tmp_path / "out")
    fails(prepare_data.main, args, match=r"meta\.json is not valid JSON")
    assert snapshot(tmp_path / "out") == before
    gz = src / "cb" / "train.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(text)
    gz.write_bytes(gz.read_bytes()[:60])  # truncated download
    fails(lambda: list(prepare_data._lines(gz)), match=r"cannot read .*train\.jsonl\.gz.*(truncated|fetch it again)")


# --- edited data: the split files no longer match meta.json ------------------------------------------

@pytest.mark.parametrize("edit,message", [
    (lambda d: (d / "validation.jsonl").write_text(""), r"validation\.jsonl holds no rows; the best checkpoint would"),
    (lambda d: (d / "train.jsonl").write_text("".join((d / "train.jsonl").read_text().splitlines(True)[:-3])),
     r"train\.jsonl has 17 rows but meta\.json says 20"),
    (lambda d: (d / "validation.jsonl").write_text((d / "validation.jsonl").read_text().replace('"target": "1"',
                                                                                               '"target": "yes"')),
     r"validation\.jsonl has the target 'yes', outside the task's labels"),
    (lambda d: (d / "test.jsonl").write_text((d / "test.jsonl").read_text() + '{"source": "x", "target": "0"}\n'),
     r"test\.jsonl has 13 rows but meta\.json says 12"),
    (lambda d: (d / "meta.json").write_text(json.dumps({**json.loads((d / "meta.json").read_text()), "metrics": ["bleu"],
                                                        "score": ["bleu"]})), r"has missing or wrong entries \(metrics\)"),
    (lambda d: (d / "meta.json").write_text(json.dumps({"task": "toy"})), r"has missing or wrong entries \(splits,"),
    (lambda d: (d / "train.jsonl").write_text('{"source": "a"}\n'), "row 1 lacks a 'source' or 'target' string"),
])
def test_edited_data_is_refused_before_training(edit, message, data_dir, tiny_model_dir, tmp_path):
    data = copy_data(data_dir, tmp_path)
    edit(data / "toy")
    run = tmp_path / "run"
    fails(train.main, argv(data, tiny_model_dir, run, *STEPS), match=message)
    assert not run.exists()  # refused before anything was written, the folder included


def test_evaluate_checks_the_split_too(done_run, data_dir, tmp_path):
    data = copy_data(data_dir, tmp_path)
    (data / "toy" / "test.jsonl").write_text("")
    fails(evaluate.main, [str(done_run), "--data-dir", str(data)], match=r"test\.jsonl holds no rows")


# --- run folder states: finished, past --max-steps, killed early -------------------------------------

def test_resuming_a_finished_run_changes_nothing(done_run, data_dir, tiny_model_dir, tmp_path, capsys):
    run = copy_run(done_run, tmp_path)
    before = snapshot(run)
    for _ in range(2):
        out = train.main(argv(data_dir, tiny_model_dir, run, "--method", "ept_star", *STEPS, "--resume"))
        assert out["finished"] and "has finished already" in capsys.readouterr().out
    assert snapshot(run) == before
    for name in ("best.pt", "last.pt"):  # pruned checkpoints (ablate.py --prune-ft-checkpoints)
        (run / name).unlink()
    before = snapshot(run)
    train.main(argv(data_dir, tiny_model_dir, run, "--method", "ept_star", *STEPS, "--resume"))
    assert snapshot(run) == before  # metrics.json, log.jsonl (one 'end'), eval/ all kept
    assert (run / "log.jsonl").read_text().count('"event": "end"') == 1


def test_resume_past_max_steps_is_refused_not_a_hang(done_run, data_dir, tiny_model_dir, tmp_path):
    run = copy_run(done_run, tmp_path)
    (run / "metrics.json").unlink()  # killed after its last checkpoint (step 4)
    before = snapshot(run)
    with deadline(60):
        fails(train.main, argv(data_dir, tiny_model_dir, run, "--method", "ept_star", "--max-steps", 2, "--resume"),
              match=r"last\.pt is at step 4, past --max-steps 2")
    assert snapshot(run) == before


def test_resume_of_a_run_killed_before_its_first_checkpoint(data_dir, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"task": "toy", "method": "ept", "n_trainable": 96}))
    (run / "log.jsonl").write_text('{"event": "setup", "step": 0}\n')
    before = snapshot(run)
    fails(train.main, argv(data_dir, tiny_model_dir, run, "--task", "nosuch", "--resume"), match="unknown task")
    assert snapshot(run) == before  # a failed start deletes nothing
    train.main(argv(data_dir, tiny_model_dir, run, "--max-steps", 2, "--eval-every", 2, "--no-test", "--resume"))
    assert (run / "log.jsonl").read_text().count('"event": "setup"') == 1  # started over


def test_export_keeps_an_existing_adapter(done_run, tmp_path):
    out = tmp_path / "adapter"
    export.main([str(done_run), str(out)])
    before = snapshot(out)
    fails(export.main, [str(done_run), str(out)], match="already holds an adapter; pass --overwrite")
    assert snapshot(out) == before
    export.main([str(done_run), str(out), "--overwrite"])
    assert set(snapshot(out)) == set(before)
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    (mixed / "notes.txt").write_text("mine")
    fails(export.main, [str(done_run), str(mixed), "--overwrite"], match="not an adapter export")
    assert (mixed / "notes.txt").read_text() == "mine"


# --- results and analyses: a failure never replaces a good file -------------------------------------

def test_analyze_computes_everything_before_writing(done_run, tmp_path):
    results = tmp_path / "results"
    run = copy_run(done_run, tmp_path)
    row = {"run": str(run), "task": "toy", "method": "ept_star", "seed": 0, "model_tag": "tiny", "lr": 0.3}
    (results / "analysis").mkdir(parents=True)
    (results / "table1.jsonl").write_text(json.dumps(row) + "\n")
    (results / "analysis" / "norms.json").write_text('{"norms": {"good": "old"}}\n')
    before = snapshot(results)
    (run / "prompt.pt").write_bytes(b"")  # norms would work; cosine, subset, ... fail on this
    fails(analyze.main, ["all", "--model", "tiny", "--results-dir", str(results), "--tasks", "toy", "--methods",
                         "ept_star"],
          match=r"prompt\.pt is damaged")
    assert snapshot(results) == before
    fails(analyze.main, ["norms", "--model", "t5-base", "--results-dir", str(results)],
          match="the rows there are for tiny: pass --model")
    (results / "table1.jsonl").write_text('{"run": "x"}\n')
    fails(analyze.main, ["norms", "--model", "tiny", "--results-dir", str(results)],
          match=r"table1\.jsonl is damaged: row 1 has no task")


def test_report_on_damaged_results(tmp_path):
    results = tmp_path / "results"
    (results / "analysis").mkdir(parents=True)
    (results / "table1.jsonl").write_text('{"run": "r", "task": "rte", "method": "ept"}\n')
    fails(report.main, ["--results", str(results), "--out", str(tmp_path / "report")],
          match=r"table1\.jsonl is damaged: row 1 has no seed, score, model_tag, lr")
    (results / "table1.jsonl").write_text('{"run": "r", "task": "rte", "method": "ept", "seed": 0, "score": "high", '
                                          '"model_tag": "t5-base", "lr": 0.3}\n')
    fails(report.main, ["--results", str(results), "--out", str(tmp_path / "report")], match="the score 'high'")
    (results / "table1.jsonl").unlink()
    (results / "analysis" / "cosine.json").write_text('{"model": "t5-base"}')
    fails(report.main, ["--results", str(results), "--out", str(tmp_path / "report")],
          match=r"cosine\.json holds no 'cosine' results; rerun")


def test_a_row_appended_after_a_last_line_without_newline_starts_a_fresh_line(tmp_path):
    """An editor or a copy that drops the final newline must not glue the next row onto the last one."""
    results = tmp_path / "results" / "init.jsonl"
    results.parent.mkdir()
    results.write_text('{"run": "a", "score": 1}\n{"run": "b", "score": 2}')  # the last newline lost
    assert grid.append_row_once(results, {"run": "c", "score": 3})
    outputs.append_jsonl(results, [{"run": "d", "score": 4}])
    outputs.append_lines(tmp_path / "new.tsv", ["x\n"])  # an empty or new file gets no leading newline
    assert (tmp_path / "new.tsv").read_text() == "x\n"
    assert [json.loads(line)["run"] for line in results.read_text().splitlines()] == ["a", "b", "c", "d"]
    assert not grid.append_row_once(results, {"run": "b", "score": 2})  # once per run, as before


def test_a_results_file_cut_short_is_one_sentence_naming_the_line_and_the_way_out(tmp_path):
    """A last line cut mid-row (a truncated copy): the drivers and report.py refuse the file in one sentence that
    names the line and the fix, and change nothing (deleting the line is safe: the row is written again)."""
    results = tmp_path / "results"
    results.mkdir()
    row = {"run": "r", "task": "rte", "method": "ept", "seed": 0, "score": 1.0, "model_tag": "t5-base", "init": "vocab"}
    text = json.dumps(row) + "\n" + json.dumps({**row, "run": "s"})[:30]
    (results / "init.jsonl").write_text(text)
    for call in (lambda: grid.append_row_once(results / "init.jsonl", {**row, "run": "t"}),
                 lambda: report.main(["--results", str(results), "--out", str(tmp_path / "report")])):
        fails(call, match=r"init\.jsonl is damaged: line 2 \(the last line, without its newline: cut short\) is "
                          r"not valid JSON .*delete that line and rerun the experiment's driver")
        assert (results / "init.jsonl").read_text() == text


# --- non-finite values: never validated, saved or used ------------------------------------------------

def test_full_fine_tuning_blow_up_never_reaches_a_checkpoint(data_dir, tiny_model_dir, tmp_path):
    """lr 1e30: the weights overflow on the first step while the loss of that step was finite."""
    for extra in (("--eval-every", 1), ("--eval-every", 100, "--save-every", 1)):  # validation / plain last.pt
        run = tmp_path / f"ft{len(extra)}"
        fails(train.main, argv(data_dir, tiny_model_dir, run, "--method", "ft", "--lr", "1e30", "--max-steps", 5,
                               *extra), match="non-finite weights at step 1 .*no checkpoint was saved")
        assert not (run / "best.pt").exists() and not (run / "last.pt").exists() and not (run / "run.lock").exists()
        assert '"event": "nonfinite"' in (run / "log.jsonl").read_text()


def test_a_nan_prompt_is_never_evaluated_or_exported(done_run, tmp_path):
    run = copy_run(done_run, tmp_path)
    prompt, meta = outputs.load_folded_prompt(run / "prompt.pt")
    save_folded_prompt(run / "prompt.pt", prompt * float("nan"), meta)
    fails(evaluate.main, [str(run)], match="holds NaN or inf values")
    fails(export.main, [str(run), str(tmp_path / "out")], match="holds NaN or inf values")
    last = torch.load(run / "last.pt", weights_only=True)
    last["trainable"] = {k: v * float("inf") for k, v in last["trainable"].items()}
    torch.save(last, run / "last.pt")
    fails(evaluate.main, [str(run), "--checkpoint", "last"], match="holds NaN or inf values")
    fails(export.main, [str(run), str(tmp_path / "out"), "--checkpoint", "last"], match="holds NaN or inf values")
    assert not (tmp_path / "out").exists()


# --- the disk: read-only, full -----------------------------------------------------------------------

def test_read_only_folders(done_run, data_dir, tiny_model_dir, read_only, tmp_path):
    run = read_only(done_run)
    before = snapshot(run)
    fails(evaluate.main, [str(run)], match="cannot (create|write) .*(read-only|permission denied)")
    fails(train.main, argv(data_dir, tiny_model_dir, run, "--resume"), match="(read-only|permission denied)")
    fails(export.main, [str(done_run), str(run / "adapter")], match="(read-only|permission denied)")
    assert snapshot(run) == before
    data = copy_data(data_dir, tmp_path)
    shutil.rmtree(data / "toy" / "cache", ignore_errors=True)
    data = read_only(data)  # a read-only data folder only means no tokenization cache
    out = train.main(argv(data, tiny_model_dir, tmp_path / "ok", "--max-steps", 2, "--eval-every", 2,
                          "--no-test"))
    assert out["best_step"] == 2


def test_a_full_disk(done_run, data_dir, tiny_model_dir, small_disk, tmp_path):
    """A run whose checkpoints do not fit (full fine-tuning: T5 + AdamW state), and a data folder whose rebuild
    does not fit: one sentence each, no temporary file left, the old data folder whole."""
    run = small_disk / "run"
    fails(train.main, argv(data_dir, tiny_model_dir, run, "--method", "ft", "--max-steps", 2, "--eval-every", 2),
          match=r"cannot write .*(best|last)\.pt: the disk is full")
    assert not [p.name for p in run.iterdir() if "tmp" in p.name or p.name == "run.lock"]
    shutil.rmtree(run)
    args = ["--tasks", "cb", "--source", str(FIXTURES), "--out", str(small_disk / "data"), "--tokenizer",
            str(tiny_model_dir)]
    prepare_data.main(args)
    before = snapshot(small_disk / "data")
    filler = small_disk / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    fails(prepare_data.main, [*args, "--overwrite", "--fewshot", "4"], match=r"cannot write .*cb: the disk is full")
    assert snapshot(small_disk / "data") == before and sorted(p.name for p in (small_disk / "data").iterdir()) == ["cb"]


# --- the command lines themselves: exit status, one line on stderr, the recipe ----------------------

def run_cli(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def test_cli_exit_status_and_one_line(done_run, tmp_path):
    bad = tmp_path / "run"
    shutil.copytree(done_run, bad)
    (bad / "prompt.pt").write_bytes((bad / "prompt.pt").read_bytes()[:100])
    proc = run_cli("evaluate.py", bad)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "prompt.pt is damaged" in proc.stderr


def test_run_all_names_the_failing_stage(tmp_path):
    """run_all.sh stops at the first failing stage with one line naming it (a stand-in stage fails here)."""
    shutil.copy(REPO / "run_all.sh", tmp_path)
    (tmp_path / "ablate.py").write_text("raise SystemExit('ablate: a stand-in failure')\n")
    proc = subprocess.run(["bash", str(tmp_path / "run_all.sh")], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1"}, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and lines[0] == "ablate: a stand-in failure"
    assert lines[-1].startswith("run_all.sh: stage failed (exit 1) at line") and "python ablate.py table1" in lines[-1]
