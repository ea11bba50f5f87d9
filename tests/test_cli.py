"""What a user meets on the command line: --help with defaults in every script, one clear sentence for
an offline or bad start (once, under torchrun too), and nothing on disk after a refused start.

    python -m pytest -q tests/test_cli.py          # ~1 minute on 2 CPU cores (two torchrun groups)
"""
import argparse
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import argv, data_dir  # noqa: F401 (data_dir is a fixture shared with test_train)

from ept import grid, options, pack

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("ablate", "analyze", "bench", "bench_pack", "evaluate", "export", "fewshot", "make_tiny",
           "prepare_data", "report", "train")


def help_parser(module_name):
    """The ArgumentParser `module.main(["--help"])` builds, caught as it parses."""
    module = importlib.import_module(module_name)
    caught = []

    def catch(self, *a, **k):
        caught.append(self)
        raise SystemExit(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", catch)
        mp.setattr(argparse.ArgumentParser, "parse_known_args", catch)
        with pytest.raises(SystemExit):
            module.main(["--help"])
    return caught[0]


def option_help(text, action):
    """The --help text of one option: from its first line to the next option's."""
    name = action.option_strings[-1] if action.option_strings else action.dest
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"  {re.escape(name)}\b", line))
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"\s{2,}-|\S", lines[i])
                and not re.match(r"\s{8,}", lines[i])), len(lines))
    return " ".join(lines[start:end])


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default(script):
    """Every option with a value by default names it in --help (a flag or a None default says in words)."""
    parser = help_parser(script)
    text = parser.format_help()
    shown = 0
    for action in parser._actions:
        if action.default in (None, argparse.SUPPRESS) or action.nargs == 0 or action.default is False:
            continue
        assert "default" in option_help(text, action), f"{script} --help: {action.dest} hides its default"
        shown += 1
    if script == "train":
        for option, value in (("--model", "t5-base"), ("--method", "ept"), ("--batch-size", "16"),
                              ("--max-steps", "30000"), ("--eval-every", "1000")):
            action = next(a for a in parser._actions if option in a.option_strings)
            assert f"(default: {value})" in re.sub(r"\s+", " ", option_help(text, action))


@pytest.mark.parametrize("script", ["scripts/profile_step.py", "scripts/compile_buckets.py"])
def test_helper_scripts_help(script):
    """scripts/ answer --help (without running their benchmark) and name their defaults."""
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr
    if "profile_step" in script:
        assert "(default: 300)" in out.stdout


# --- offline: one sentence naming the flag, no retries -----------------------------------------------------

def offline_env():
    """Offline as a user without a network is told to be (HF_HUB_OFFLINE=1), an empty Hub cache, and no route
    to the Hub should the client try one anyway: an endpoint nothing listens on, no proxy."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in ("TRANSFORMERS_OFFLINE", "HTTPS_PROXY",
                                                                   "ALL_PROXY", "HTTP_PROXY")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
            "HF_HOME": os.environ.get("HF_HOME_EMPTY", "/nonexistent-hf-home"), "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1"}


def test_train_flags_are_never_abbreviated(capsys):
    """Issue 28: a prefix of a flag (`--max-step`, `--eval`) is a usage error, not a guess at one of its flags."""
    for flags in (["--max-step", "3"], ["--eval", "5"]):
        with pytest.raises(SystemExit) as err:
            options.parser.parse_args(flags)
        assert err.value.code == 2 and flags[0] in capsys.readouterr().err
    assert options.parser.parse_args(["--max-steps", "3"]).max_steps == 3


def test_a_mistyped_choice_is_a_two_line_usage_error():
    """Issue 29: a mistyped --method printed train.py's 24-line usage before the one useful line."""
    for script, args in (("train.py", ["--method", "eptt"]), ("ablate.py", ["nosuch"])):
        out = subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                             timeout=120)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 2 and "--help" in lines[0], out.stderr
        assert "invalid choice" in lines[1] and args[-1] in lines[1], out.stderr


def test_offline_hub_fails_fast_with_the_flag(tmp_path):
    """A Hub name for the model, the tokenizer or a dataset, with HF_HUB_OFFLINE=1: the one sentence naming the
    flag (--model DIR, --tokenizer DIR, --source DIR) in under 5 s of loading, and no "Retrying in" lines."""
    code = ("import sys, time, datasets, prepare_data; from ept import cli, outputs, runtime, tasks as registry\n"  # imported first: the time is the load's
            "from transformers import AutoTokenizer, T5ForConditionalGeneration\n"
            "for what, call in (('model', lambda: runtime.load_t5('t5-small')),\n"
            "                   ('tokenizer', lambda: runtime.load_tokenizer('t5-small')),\n"
            "                   ('dataset', lambda: prepare_data.load_hub(prepare_data.TASKS['rte'])),\n"
            "                   ('run', lambda: runtime.load_t5('t5-small', fix=outputs.RUN_FIX))):\n"
            "    t0 = time.time()\n"
            "    try:\n"
            "        call()\n"
            "    except cli.Failure as err:\n"
            "        print(what, f'{time.time() - t0:.2f}', err, sep='\\t')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=offline_env(), capture_output=True,
                         text=True, timeout=300)
    assert "Retrying" not in out.stdout + out.stderr and "Traceback" not in out.stderr, out.stderr
    lines = dict((w, (float(t), msg)) for w, t, msg in (line.split("\t") for line in out.stdout.splitlines()
                                                        if "\t" in line))
    assert set(lines) == {"model", "tokenizer", "dataset", "run"}, out.stdout + out.stderr
    # evaluate.py and analyze.py rebuild a run's T5 from its config.json: no flag, the cache is the way out
    for what, flag in (("model", "--model DIR"), ("tokenizer", "--tokenizer DIR"), ("dataset", "--source DIR"),
                       ("run", "HF_HOME")):
        seconds, message = lines[what]
        assert seconds < 5, f"{what}: {seconds} s offline"
        assert flag in message and "HF_HUB_OFFLINE is set" in message and message.count("could not") == 1, message


def hub_failure(what, name, err):
    """The one sentence runtime.load makes of `err`, a failed load of the Hub name `name`."""
    from ept import cli, runtime

    def fail():
        raise err
    with pytest.raises(cli.Failure) as caught:
        runtime.load(what, name, fail)
    return str(caught.value)


def test_hub_failure_without_hf_hub_offline_is_one_sentence(monkeypatch):
    """HF_HUB_OFFLINE unset: the client's own failure (after its retries, ~25 s without a network: too slow to
    wait for here, so its errors are built as it raises them) is still the one sentence. No connection names
    the flag and HF_HUB_OFFLINE=1 (which then names every missing input at once); a refused name says so."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    from ept import runtime
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        raise OSError("We couldn't connect to the Hub") from LocalEntryNotFoundError("no connection")
    except OSError as err:
        no_connection = err
    for what, err, flag in (("model", no_connection, "--model DIR"), ("tokenizer", no_connection, "--tokenizer DIR"),
                            ("dataset", ConnectionError("Couldn't reach 'nyu-mll/glue'"), "--source DIR")):
        message = hub_failure(what, "no-such-org/x", err)
        assert message.startswith(f"could not load the {what} 'no-such-org/x': the Hugging Face Hub cannot be "
                                  f"reached and it is not in the local cache; pass {flag}"), message
        assert "export HF_HUB_OFFLINE=1" in message, message
    runtime.check_offline("no-such-org/m", "no-such-org/t", "no-such-org/d")  # unset: the loads decide
    message = hub_failure("model", "no-such-org/m", OSError("404 Repository Not Found"))
    assert message == ("could not load the model 'no-such-org/m': the Hub has no such name, or refused it "
                       "(OSError); pass --model DIR, a local T5 folder"), message
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Exception, match=r"HF_HUB_OFFLINE is set and these are not in the local cache: the tokenizer "
                                        r"'no-such-org/t' \(pass --tokenizer DIR.*; the dataset no-such-org/d \(pass "
                                        r"--source DIR.*; the model 'no-such-org/m' \(pass --model DIR"):
        runtime.check_offline("no-such-org/m", "no-such-org/t", "no-such-org/d")


def test_offline_cli_one_sentence_nothing_written(tmp_path):
    """train.py and prepare_data.py offline: exit 1, one sentence, no retries, and no folder left behind."""
    for argv, flag in ((["train.py", "--task", "rte", "--data-dir", "d", "--out-dir", "runs/x"], "--tokenizer DIR"),
                       (["prepare_data.py", "--tasks", "rte", "--out", "d"], "--tokenizer DIR")):
        out = subprocess.run([sys.executable, str(REPO / argv[0]), *argv[1:]], cwd=tmp_path, env=offline_env(),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 1, out.stderr
        assert flag in out.stderr and "Retrying" not in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert list(tmp_path.iterdir()) == [], f"{argv[0]} left {list(tmp_path.iterdir())}"


def test_offline_train_names_every_missing_input_in_one_sentence(tmp_path, tiny_model_dir):
    """Issue 29: offline, train.py names the tokenizer, the data and the model that are neither local nor
    cached in ONE sentence, each with its local flag (not one per round trip); a local one is not named."""
    run = [sys.executable, str(REPO / "train.py"), "--task", "rte", "--data-dir", "d", "--out-dir", "runs/x"]
    for extra, named, absent in (([], ("--tokenizer DIR", "--source DIR", "--model DIR"), ()),
                                 (["--tokenizer", str(tiny_model_dir)], ("--source DIR", "--model DIR"),
                                  ("--tokenizer DIR",))):
        out = subprocess.run(run + extra, cwd=tmp_path, env={**offline_env(), "HF_HUB_OFFLINE": "1"},
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert all(flag in out.stderr for flag in named), out.stderr
        assert not any(flag in out.stderr for flag in absent), out.stderr
        assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


# --- a failed start leaves nothing behind --------------------------------------------------------------

def test_failed_start_leaves_no_folder(tmp_path, data_dir, tiny_model_dir):
    """An offline --model (the tokenizer is a folder), a missing model folder, a pack with one: no run folder,
    no runs/ parent, exit 1 with one sentence."""
    cases = [(["--model", "t5-small", "--tokenizer", str(tiny_model_dir)], "--model DIR"),
             (["--model", str(tmp_path / "no-such-model")], "does not exist"),
             (["--model", "t5-small", "--tokenizer", str(tiny_model_dir), "--seed", "0", "1"], "--model DIR")]
    for extra, words in cases:
        out_dir = tmp_path / "runs" / "deep" / "x"
        args = [*argv(data_dir, tiny_model_dir, out_dir, "--max-steps", 2), *extra]
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=offline_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "runs").exists(), f"{extra}: {sorted(tmp_path.rglob('*'))}"


def test_failed_wandb_leaves_no_folder(tmp_path, data_dir, tiny_model_dir):
    """--wandb that cannot start (here: a wandb whose init fails, as without a login), with --tensorboard:
    one sentence, and neither a run folder nor a TensorBoard file."""
    stub = tmp_path / "stub"
    (stub / "wandb").mkdir(parents=True)
    (stub / "wandb" / "__init__.py").write_text("def init(**kw):\n    raise RuntimeError('api key not configured')\n")
    (stub / "tensorboard").mkdir()  # torch.utils.tensorboard imports only when the package is missing: fake it
    out_dir = tmp_path / "runs" / "x"
    env = {**offline_env(), "PYTHONPATH": f"{stub}{os.pathsep}{REPO}"}
    has_tb = subprocess.run([sys.executable, "-c", "import torch.utils.tensorboard"], env=env,
                            capture_output=True).returncode == 0
    args = [*argv(data_dir, tiny_model_dir, out_dir, "--max-steps", 2), "--wandb", "p",
            *(["--tensorboard"] if has_tb else [])]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "--wandb could not start" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists(), sorted(tmp_path.rglob("*"))


# --- torchrun: one sentence from rank 0, every rank out cleanly ------------------------------------------

def test_torchrun_failure_is_one_sentence(tmp_path, data_dir, tiny_model_dir):
    """2 gloo ranks: a check only rank 0 makes (the run folder holds files), one every rank makes (an offline
    --model) and a pack's: the sentence once, no rank's traceback, then torchrun's own summary, whose root
    cause is rank 0 with that sentence (issue 29: the entry point records it, as torch's @record does)."""
    (tmp_path / "runs" / "held").mkdir(parents=True)
    (tmp_path / "runs" / "held" / "log.jsonl").write_text("{}\n")
    offline = ["--model", "t5-small", "--tokenizer", str(tiny_model_dir)]
    for out, extra, sentence in (("held", [], "already holds log.jsonl"),
                                 ("new", offline, "pass --model DIR"),
                                 ("pack", [*offline, "--seed", "0", "1"], "pass --model DIR")):
        args = argv(data_dir, tiny_model_dir, tmp_path / "runs" / out, "--max-steps", 2, *extra)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(REPO / "train.py"), *args], cwd=tmp_path, env=offline_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        text = proc.stdout + proc.stderr
        ours = re.split(r"^[EW]\d{4} .*failed \(exitcode", proc.stderr, maxsplit=1, flags=re.M)[0]
        assert ours.count(sentence) == 1, text
        cause = proc.stderr.split("Root Cause (first observed failure):", 1)[-1]
        assert re.search(r"rank\s*: 0 ", cause) and sentence in cause and "PeerStopped" not in text, text
        assert "Traceback" not in ours and "Connection closed" not in text, ours
        assert [line for line in ours.splitlines() if line.strip() and not re.match(r"[EWI]\d{4} ", line)] == \
            [line for line in ours.splitlines() if sentence in line], ours
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["held"]


def test_train_first_use_preparation_takes_source(tmp_path, tiny_model_dir):
    """train.py on a task not prepared yet: offline, the sentence names --source DIR, which train.py takes;
    with it the task is prepared from the official files and the run trains."""
    base = [sys.executable, str(REPO / "train.py"), "--task", "rte", "--data-dir", "d", "--model", str(tiny_model_dir),
            "--out-dir", "runs/x", "--max-steps", "1", "--eval-every", "1", "--max-eval-examples", "4", "--no-test"]
    proc = subprocess.run(base, cwd=tmp_path, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "pass --source DIR" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = subprocess.run([*base, "--source", str(REPO / "tests" / "fixtures" / "raw")], cwd=tmp_path,
                          env=offline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "prepare_data.py --tasks rte --out d" in proc.stdout and "--source" in proc.stdout
    assert (tmp_path / "d" / "rte" / "meta.json").exists() and (tmp_path / "runs" / "x" / "log.jsonl").exists()


# --- a finished run asked for more -----------------------------------------------------------------------

def folder_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_resume_with_another_lr_or_schedule_is_refused(tmp_path, data_dir, tiny_model_dir, one_thread):
    """Issue 28 item 7: an unfinished run resumed with another --lr or a smaller --max-steps would continue
    last.pt's schedule while config.json recorded the new value: one sentence naming both values, nothing
    changed; with its own values it resumes."""
    import train
    out = tmp_path / "run"
    flags = ("--max-steps", 4, "--eval-every", 2, "--max-eval-examples", 4, "--no-test")
    train.main(argv(data_dir, tiny_model_dir, out, *flags))
    log = out / "log.jsonl"  # unfinished: its log cut back to step 2, last.pt at step 4
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if '"end"' not in line))
    before = folder_bytes(out)
    for change, said in ((("--lr", 0.01), r"--lr 0\.3 \(now 0\.01\)"), (("--max-steps", 5), r"--max-steps 4 \(now 5\)")):
        with pytest.raises(SystemExit, match=said + r".*--overwrite"):
            train.main(argv(data_dir, tiny_model_dir, out, *flags, "--resume", *change))
        assert folder_bytes(out) == before
    config = (out / "config.json").read_text()
    (out / "config.json").write_text("[1, 2]\n")  # issue 28: valid JSON, not an object: refused, not rewritten
    with pytest.raises(SystemExit, match=r"config\.json is valid JSON but not a run configuration"):
        train.main(argv(data_dir, tiny_model_dir, out, *flags, "--resume"))
    assert (out / "config.json").read_text() == "[1, 2]\n"
    (out / "config.json").write_text(config)
    assert train.main(argv(data_dir, tiny_model_dir, out, *flags, "--resume"))["best_step"] in (2, 4)


def test_resume_finished_run_with_more_steps_is_refused(tmp_path, data_dir, tiny_model_dir, one_thread):
    """--resume of a finished run with a larger --max-steps: one sentence naming the flag and both values,
    nothing changed; the same --max-steps: finished, nothing to do; a pack holding it: refused the same way."""
    import train
    out = tmp_path / "run"
    flags = ("--max-steps", 2, "--eval-every", 2, "--max-eval-examples", 4)
    train.main(argv(data_dir, tiny_model_dir, out, *flags))
    before = folder_bytes(out)
    with pytest.raises(SystemExit, match=r"finished with --max-steps 2; --max-steps 4 asks for more.*--overwrite"):
        train.main(argv(data_dir, tiny_model_dir, out, *flags, "--resume", "--max-steps", 4))
    with pytest.raises(SystemExit, match=r"finished without --epochs \(--max-steps 2\); --epochs 3 asks for more.*"
                                         r"drop --epochs, or --overwrite"):  # issue 28: was "keep --epochs None"
        train.main(argv(data_dir, tiny_model_dir, out, *flags, "--resume", "--epochs", 3))
    assert train.main(argv(data_dir, tiny_model_dir, out, *flags, "--resume"))["finished"]
    runs_file = tmp_path / "runs.json"
    runs_file.write_text('[{"method": "ept", "out_dir": "%s"}, {"method": "pt", "out_dir": "%s"}]'
                         % (out, tmp_path / "other"))
    with pytest.raises(SystemExit, match=r"--max-steps 4 asks for more"):
        train.main(argv(data_dir, tiny_model_dir, tmp_path, *flags, "--resume", "--max-steps", 4, "--runs", runs_file))
    assert folder_bytes(out) == before and not (tmp_path / "other").exists()


# --- run names: one rule, what runs, only what applies -----------------------------------------------------

def test_solo_and_sweep_runs_are_named_by_one_rule(tmp_path, data_dir, tiny_model_dir, one_thread, monkeypatch,
                                                   capsys):
    """The same flags name a solo run's folder as they name a sweep's (runs/..._steps2_ev2_s0), and each
    "done" line names its run."""
    import train
    monkeypatch.chdir(tmp_path)
    flags = ["--task", "toy", "--data-dir", str(data_dir), "--model", str(tiny_model_dir), "--batch-size", "8",
             "--max-steps", "2", "--eval-every", "2", "--max-eval-examples", "4", "--no-test"]
    train.main([*flags, "--seed", "0"])
    train.main([*flags, "--seed", "1", "2"])
    model = Path(tiny_model_dir).name
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [f"toy_ept_{model}_steps2_ev2_s{s}" for s in range(3)]
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train: done")]
    assert [line.split(":")[1].split()[-1] for line in done] == [f"toy_ept_{model}_steps2_ev2_s{s}" for s in range(3)]


def test_options_that_do_not_apply_neither_multiply_nor_name_runs():
    """--method pt ept --prompt-length 5 10: PT twice (n5 and the default n10), EPT once (it has no prompt
    length); --hidden-size does not name a PT run; model.OPTIONS decides."""
    import model as M
    args = options.parser.parse_args(["--task", "rte", "--method", "pt", "ept", "--prompt-length", "5", "10",
                                    "--model", "t5-base"])
    specs = pack.sweep(args)
    assert [Path(s.out_dir).name for s in specs] == ["rte_pt_t5-base_n5_s0", "rte_pt_t5-base_s0", "rte_ept_t5-base_s0"]
    args = options.parser.parse_args(["--method", "pt", "ept", "ptuning", "--hidden-size", "1", "5", "--reparam",
                                    "mlp", "lstm"])
    names = [Path(s.out_dir).name for s in pack.sweep(args)]
    assert names == ["rte_pt_t5-base_s0", "rte_ept_t5-base_s0", "rte_ept_t5-base_h5_s0", "rte_ptuning_t5-base_s0",
                     "rte_ptuning_t5-base_lstm_s0"]
    assert all(M.applies(k, "ept") for k in ("hidden_size", "broadcast", "depth")) and not M.applies("prompt_length", "ept")


def test_driver_names_say_what_runs(tmp_path, capsys):
    """A pass-through --max-steps / --eval-every wins over the driver's own value, in the name too: a SMOKE
    few-shot run of 6 steps is ..._steps6_ev3_k4_fs0_s0, not ..._steps10000_..."""
    import fewshot
    assert grid.passed_through(["--max-steps", "6", "--eval-every=3", "--dtype", "bf16"]) == \
        {"max_steps": 6, "eval_every": 3}
    fewshot.main(["--dry-run", "--tasks", "cb", "--shots", "4", "--seeds", "0", "--methods", "ept", "--model", "t5-base",
                  "--data-dir", str(tmp_path / "d"), "--runs-dir", str(tmp_path / "runs"), "--results-dir",
                  str(tmp_path / "r"), "--max-steps", "6", "--eval-every", "3"])
    out = capsys.readouterr().out
    assert "cb_ept_t5-base_steps6_ev3_k4_fs0_s0" in out, out
    assert "steps10000" not in out


# --- progress bars ------------------------------------------------------------------------------------------

def test_progress_bars_for_long_work_and_tqdm_disable(tiny_model_dir):
    """evaluate.py's decoding and prepare_data's row conversion draw a bar on stderr (none inside train.py's
    validation, none for a few rows), and TQDM_DISABLE=1 (read when tqdm is imported) turns them off."""
    code = ("import model, prepare_data as P; from ept import evaluation as decoding, outputs, runtime\n"
            f"net = model.PromptedT5(runtime.load_t5({str(tiny_model_dir)!r}))\n"
            f"tok = runtime.load_tokenizer({str(tiny_model_dir)!r})\n"
            "rows = [dict(sentence1='a b', sentence2='c', label=0, idx=i) for i in range(P.BAR_ROWS)]\n"
            "outputs.run_predictions(net, tok, ['one two', 'three'], {'max_target_length': 2, 'labels': None},\n"
            "                        mode='generate', progress='evaluate toy test')\n"
            "P.to_records(P.TASKS['rte'], rows, 'train')\n"
            "P.to_records(P.TASKS['rte'], rows[:10], 'small')\n"
            "decoding.predict(net, tok, ['one two', 'three'], max_new_tokens=2)  # train.py's validation: no bar\n")
    env = {k: v for k, v in offline_env().items() if k != "TQDM_DISABLE"}  # a bar whatever the caller's env
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    err = done.stderr
    assert done.returncode == 0, err[-3000:]
    assert "evaluate toy test" in err and "rte: train" in err and "rte: small" not in err, err
    assert err.count("evaluate") == err.count("evaluate toy test")
    code = ("import prepare_data as P; from ept import tasks as registry\n"
            "P.to_records(P.TASKS['rte'], [dict(sentence1='a', sentence2='b', label=0, idx=i) for i in range(P.BAR_ROWS)], 'train')")
    out = subprocess.run([sys.executable, "-c", code], env={**offline_env(), "TQDM_DISABLE": "1"}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "rte: train" not in out.stderr, out.stderr
