"""train.py end to end on a tiny T5 and tiny data written here (DESIGN.md format), through the real CLIs.

    python -m pytest -q tests/test_train.py              # ~2 minutes on 2 CPU cores
    python -m pytest -q tests/test_train.py -m "not slow"  # skip the torchrun and SIGKILL tests

Covers: files and log lines of a run, evaluate.py on it (also zero-shot transfer and new inputs), frozen
T5 weights bitwise unchanged, loss independent of padding (also padding to the max length and gradient
accumulation), SIGKILL + --resume == uninterrupted, the non-finite guard on a real overflow, the run
lock, and 2-process torchrun (gloo) == 1 process with the same global batch.
"""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import torch.nn.functional as F

import model as M
import train
from ept import outputs, runtime, tasks

REPO = Path(__file__).resolve().parents[1]


def token_nll(model, shift_right, input_ids, mask, labels, amp):
    """Summed cross-entropy over the non-pad target tokens (fp32), as train.train_step sums it."""
    with amp:
        logits = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=shift_right(labels),
                       use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
WORDS = "good bad fine awful great poor nice sad happy dull".split()
POSITIVE = {"good", "fine", "great", "nice", "happy"}


def write_task(data_dir, task="toy", sizes=(20, 12, 12), template="sentence: {}", seed=0):
    """A binary sentiment-ish task in prepare_data.py's format: <split>.jsonl + meta.json."""
    rng = random.Random(seed)
    root = Path(data_dir) / task
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in zip(("train", "validation", "test"), sizes):
        rows = []
        for i in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 14))]  # lengths vary: padding matters
            y = int(2 * sum(w in POSITIVE for w in words) >= len(words))
            rows.append({"source": template.format(" ".join(words)), "target": str(y), "label": y, "idx": i})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        splits[split] = n
    meta = {"task": task, "benchmark": "test", "source": {"kind": "local", "files": []}, "splits": splits,
            "labels": ["0", "1"], "metrics": ["acc", "f1"], "score": ["acc"], "max_length": 32,
            "max_target_length": 3, "data_seed": seed, "token_stats": {}, "fewshot": {}}
    (root / "meta.json").write_text(json.dumps(meta))
    return Path(data_dir)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_task(d, "toy")
    write_task(d, "toy2", template="premise: {} hypothesis: fine", seed=1)
    return d


def argv(data_dir, model_dir, out_dir, *extra):
    return ["--task", "toy", "--data-dir", str(data_dir), "--model", str(model_dir), "--out-dir", str(out_dir),
            "--batch-size", "8", "--eval-batch-size", "16", *map(str, extra)]


def run_cli(script, args, check=True, env=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True, env=env,
                          cwd=REPO, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def events(run_dir, kind=None):
    rows = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r["event"] == kind]


def test_end_to_end_train_then_evaluate(data_dir, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run_cli("train.py", argv(data_dir, tiny_model_dir, run, "--max-steps", 20, "--eval-every", 10))
    for name in ("config.json", "log.jsonl", "best.pt", "last.pt", "prompt.pt", "metrics.json"):
        assert (run / name).exists(), name
    assert not (run / "run.lock").exists()
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "ept" and config["lr"] == 0.3 and config["dtype"] == "fp32" and config["world_size"] == 1
    assert config["n_trainable"] == 2 * 32 + 32  # P1 (1, d) + down (d -> 1) + up (1 -> d), d = 32
    # only the options EPT takes (issue 29): no prompt_length, no reparam; its own are there
    assert "prompt_length" not in config and "reparam" not in config, config
    assert config["hidden_size"] == 1 and config["broadcast"] == 1 and config["init"] == "uniform"
    train_events = events(run, "train")
    assert [e["step"] for e in train_events] == list(range(1, 21))
    for e in train_events:
        assert {"loss", "lr", "grad_norm", "prompt_norm", "ept_s", "examples_per_s", "tokens_per_s"} <= set(e)
    assert train_events[0]["lr"] == pytest.approx(0.3) and train_events[-1]["lr"] == pytest.approx(0.3 / 20)
    evals = events(run, "eval")
    assert [e["step"] for e in evals] == [10, 20] and all({"acc", "f1", "score"} <= set(e) for e in evals)
    (end,) = events(run, "end")
    assert end["train_examples_per_s"] > 0 and end["train_tokens_per_s"] > 0 and end["peak_memory_mb"] > 0
    for name in ("best.pt", "last.pt"):
        state = torch.load(run / name, weights_only=True)
        assert {"trainable", "optimizer", "scheduler", "data", "best_score", "step"} <= set(state)
        assert set(state["trainable"]) == {"prompt", "blocks.0.down.weight", "blocks.0.up.weight"}  # small: no T5
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 20
    prompt, meta = outputs.load_folded_prompt(run / "prompt.pt")
    assert prompt.shape == (1, 32) and meta["step"] == end["best_step"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] == 12 and {"acc", "f1", "score"} <= set(metrics)

    # evaluate.py rebuilds everything from config.json and the folded prompt: the same test metrics
    run_cli("evaluate.py", [str(run)])
    again = json.loads((run / "eval" / "toy_test.metrics.json").read_text())
    assert again["score"] == metrics["score"] and again["acc"] == metrics["acc"]
    preds = [json.loads(line) for line in (run / "eval" / "toy_test.predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and {"source", "target", "prediction"} <= set(preds[0])
    out = run_cli("evaluate.py", [str(run), "--task", "toy2", "--eval-mode", "rank", "--split", "validation"]).stdout
    assert "zero-shot transfer" in out
    transfer = json.loads((run / "eval" / "toy2_validation.rank.metrics.json").read_text())
    assert transfer["train_task"] == "toy" and transfer["invalid"] == 0  # rank mode is never invalid
    (tmp_path / "new.txt").write_text("sentence: good good\nsentence: bad sad\n")
    run_cli("evaluate.py", [str(run), "--input", str(tmp_path / "new.txt"), "--output", str(tmp_path / "p.jsonl")])
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2


@pytest.mark.skipif(not (REPO / "prepare_data.py").exists() or not (REPO / "tests/fixtures/raw/multirc").is_dir(),
                    reason="prepare_data.py and its fixtures are not in this checkout")
def test_prepare_data_then_train_then_evaluate_multirc_fewshot(tiny_model_dir, tmp_path):
    """The three real CLIs in a row on prepare_data's MultiRC fixture: few-shot file (k = 4 in all < batch 8: one
    partial batch per epoch), F1a/EM grouped by question_id, rank-mode evaluation."""
    data = tmp_path / "data"
    run_cli("prepare_data.py", ["--source", "tests/fixtures/raw", "--tasks", "multirc", "--out", str(data),
                                "--tokenizer", str(tiny_model_dir), "--fewshot", "4", "--fewshot-seeds", "0"],
            env={"HF_HUB_OFFLINE": "1"})
    run = tmp_path / "run"
    run_cli("train.py", ["--task", "multirc", "--data-dir", str(data), "--model", str(tiny_model_dir), "--out-dir",
                         str(run), "--fewshot-k", "4", "--fewshot-seed", "0", "--batch-size", "8", "--max-steps", "4",
                         "--eval-every", "2", "--method", "ept_star"])
    config = json.loads((run / "config.json").read_text())
    assert config["train_size"] == 4 and config["steps_per_epoch"] == 1 and config["max_length"] == 348
    assert [e["epoch"] for e in events(run, "train")] == [1, 2, 3, 4]  # one (partial) batch per epoch
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"f1a", "em", "score"} <= set(metrics) and metrics["score"] == metrics["f1a"]
    run_cli("evaluate.py", [str(run), "--eval-mode", "rank"])
    ranked = json.loads((run / "eval" / "multirc_test.rank.metrics.json").read_text())
    assert ranked["invalid"] == 0 and ranked["n"] == metrics["n"]


def test_frozen_t5_unchanged_and_prompt_trained(data_dir, tiny_model_dir, tmp_path):
    out = train.main(argv(data_dir, tiny_model_dir, tmp_path / "run", "--method", "pt", "--max-steps", 5,
                          "--eval-every", 5, "--no-test"))
    fresh = runtime.load_t5(str(tiny_model_dir))
    trained = out["model"].t5.state_dict()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, trained[name]), name  # bitwise
    torch.manual_seed(0)
    initial = M.build_prompt_module("pt", 32, generator=torch.Generator().manual_seed(0)).prompt
    assert not torch.allclose(initial, out["model"].prompt_module.prompt.detach())
    assert out["config"]["n_trainable"] == 10 * 32
    assert "metrics.json" not in os.listdir(tmp_path / "run")  # --no-test
    saved = torch.load(tmp_path / "run" / "prompt.pt", weights_only=True)["prompt"]  # pt's P' is P:
    assert type(saved) is torch.Tensor and not saved.requires_grad  # a plain tensor, not the Parameter


def test_loss_independent_of_padding(data_dir, tiny_model_dir):
    tok = runtime.load_tokenizer(str(tiny_model_dir))
    net = M.PromptedT5(runtime.load_t5(str(tiny_model_dir)), M.build_prompt_module("ept_star", 32)).eval()
    _, src, tgt = tasks.read_split({}, "train", data_dir / "toy" / "train.jsonl", tok, 32)
    idx = list(range(8))
    shift = net.t5._shift_right
    own = token_nll(net, shift, *tasks.collate(idx, src, tgt, tok.pad_token_id), nullcontext())
    padded = token_nll(net, shift, *tasks.collate(idx, src, tgt, tok.pad_token_id, (32, 7)), nullcontext())
    alone = sum(token_nll(net, shift, *tasks.collate([i], src, tgt, tok.pad_token_id), nullcontext())
                for i in idx)
    assert max(map(len, (src[i] for i in idx))) < 32  # the padded batch really is longer
    assert padded.item() == pytest.approx(own.item(), rel=1e-5)
    assert alone.item() == pytest.approx(own.item(), rel=1e-5)


def test_fast_paths_give_the_plain_losses(data_dir, tiny_model_dir, tmp_path):
    """Gradient accumulation vs one batch (dropout off), through the CLI. (Own-longest padding vs padding to
    the max length, through the same train_step: tests/test_fastpaths.py.)"""
    common = ("--max-steps", 6, "--eval-every", 6, "--no-test", "--dropout", 0)
    runs = {name: train.main(argv(data_dir, tiny_model_dir, tmp_path / name, *common, *extra))
            for name, extra in (("plain", ()), ("accum", ("--micro-batch-size", 3)))}
    assert runs["accum"]["config"]["grad_accum_steps"] == 3
    plain = [e["loss"] for e in events(tmp_path / "plain", "train")]
    for name in ("accum",):
        assert [e["loss"] for e in events(tmp_path / name, "train")] == pytest.approx(plain, rel=1e-5)
        assert torch.allclose(runs[name]["model"].prompt(), runs["plain"]["model"].prompt(), rtol=1e-4, atol=1e-5)


def test_tokenized_splits_are_cached(data_dir, tiny_model_dir, monkeypatch):
    tok = runtime.load_tokenizer(str(tiny_model_dir))
    path = data_dir / "toy" / "validation.jsonl"
    tokenize = lambda: tasks.read_split({}, "validation", path, tok, 16)[1:]  # noqa: E731
    first = tokenize()
    assert list((data_dir / "toy" / "cache").glob("validation.*.pt"))
    monkeypatch.setattr(tasks, "encode", None)  # no tokenizing from here on
    monkeypatch.setattr(tasks.files, "load_torch", None)
    assert tokenize() == first  # memory
    monkeypatch.undo()
    monkeypatch.setattr(tasks, "encode", None)
    tasks._TOKENIZED.clear()
    assert tokenize() == first  # disk
    assert all(len(s) <= 16 and s[-1] == tok.eos_token_id for s in first[0])


def test_run_folder_lock_and_refusals(data_dir, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = train.runfolder.Lock(run)  # a live writer: this process
    with pytest.raises(SystemExit, match="being written"):
        train.main(argv(data_dir, tiny_model_dir, run, "--max-steps", 1))
    lock.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "run.lock").write_text(f"{socket.gethostname()} {dead.pid}\n")  # stale: its process is gone
    train.main(argv(data_dir, tiny_model_dir, run, "--max-steps", 2, "--eval-every", 2, "--no-test"))
    assert not (run / "run.lock").exists()
    with pytest.raises(SystemExit, match="--resume"):  # a finished folder is never silently overwritten
        train.main(argv(data_dir, tiny_model_dir, run, "--max-steps", 2))


def test_init_label_without_a_label_set_is_refused_before_any_file(data_dir, tiny_model_dir, tmp_path):
    write_task(tmp_path / "data", "open")
    meta_path = tmp_path / "data" / "open" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "labels": None}))
    for methods, inits in ((["ept"], ["label"]), (["ept", "pt"], ["uniform", "label"])):  # alone, a pack
        out = tmp_path / "runs" / "_".join(methods)
        with pytest.raises(SystemExit, match="--init label needs a task with a label set; open has none"):
            train.main(["--task", "open", "--data-dir", str(tmp_path / "data"), "--model", str(tiny_model_dir),
                        "--out-dir", str(out), "--method", *methods, "--init", *inits])
        assert not (tmp_path / "runs").exists()  # nothing written, the folders it made removed


def test_nonfinite_guard_stops_on_a_real_overflow(data_dir, tiny_model_dir, tmp_path):
    """lr 1e30 (warm-up: step 1 has lr 0, so one validation writes best.pt first): P' overflows fp32."""
    run = tmp_path / "run"
    proc = run_cli("train.py", argv(data_dir, tiny_model_dir, run, "--lr", "1e30", "--warmup-steps", 1000,
                                    "--eval-every", 1, "--max-steps", 50), check=False)
    assert proc.returncode == 1
    assert "non-finite prompt_norm at step 2" in proc.stderr
    (bad,) = events(run, "nonfinite")
    assert bad["step"] == 2 and "prompt_norm" in bad["what"]
    assert [e["step"] for e in events(run, "eval")] == [1]
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["step"] == 1 and all(torch.isfinite(t).all() for t in best["trainable"].values())
    assert not (run / "metrics.json").exists() and not (run / "run.lock").exists()


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(data_dir, tiny_model_dir, tmp_path):
    """Dropout stays on (0.1): its masks are functions of (seed, step, example), so last.pt needs no RNG state."""
    flags = ("--max-steps", 300, "--eval-every", 100, "--save-every", 2, "--method", "ptuning")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_cli("train.py", argv(data_dir, tiny_model_dir, whole, *flags))
    cmd = [sys.executable, str(REPO / "train.py"), *argv(data_dir, tiny_model_dir, broken, *flags)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (broken / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    time.sleep(0.05)  # a few more steps, so the kill lands between checkpoints
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (broken / "metrics.json").exists(), "the run finished before it could be killed"
    killed_at = torch.load(broken / "last.pt", weights_only=True)["step"]
    assert 0 < killed_at < 300 and (broken / "run.lock").exists()  # SIGKILL leaves a stale lock
    run_cli("train.py", argv(data_dir, tiny_model_dir, broken, *flags, "--resume"))
    assert torch.equal(outputs.load_folded_prompt(whole / "prompt.pt")[0], outputs.load_folded_prompt(broken / "prompt.pt")[0])
    assert json.loads((whole / "metrics.json").read_text()) == json.loads((broken / "metrics.json").read_text())
    losses = lambda run: [(e["step"], e["loss"], e["prompt_norm"]) for e in events(run, "train")]  # noqa: E731
    assert losses(whole) == losses(broken)  # the log was trimmed to the checkpoint and continued exactly
    assert [e["step"] for e in events(broken, "resume")] == [killed_at]


def stop_at(monkeypatch, at):
    """train.py stops at step `at` as on a real SIGUSR1 (sent during the step before): last.pt, exit 138."""
    step = train.train_step

    def interrupted(model, run, *rest):
        if run.step == at - 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return step(model, run, *rest)
    monkeypatch.setattr(train, "train_step", interrupted)


def test_stop_then_resume_of_an_old_checkpoint_equals_uninterrupted(data_dir, tiny_model_dir, tmp_path,
                                                                    monkeypatch):
    """Dropout on (0.1): a real SIGUSR1 during step 2 stops the run at step 2 with last.pt (exit 138); that
    last.pt, given the "rng" and "world_size" entries checkpoints had before dropout was stateless, resumes to
    the uninterrupted run's losses, mu_t and P' bitwise: nothing of the run is drawn from a global RNG."""
    flags = ("--max-steps", 4, "--eval-every", 2, "--method", "ptuning", "--no-test")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    want = train.main(argv(data_dir, tiny_model_dir, whole, *flags))
    with monkeypatch.context() as patch:
        stop_at(patch, 2)
        with pytest.raises(SystemExit) as stop:
            train.main(argv(data_dir, tiny_model_dir, broken, *flags))
    assert stop.value.code == 138
    last = torch.load(broken / "last.pt", weights_only=True)
    assert last["step"] == 2 and "rng" not in last
    torch.save({**last, "rng": [{"torch": torch.get_rng_state()}], "world_size": 1}, broken / "last.pt")
    torch.manual_seed(12345)  # the global RNG is in another state: it must not matter
    got = train.main(argv(data_dir, tiny_model_dir, broken, *flags, "--resume"))
    trace = lambda run: [(e["step"], e["loss"], e["prompt_norm"]) for e in events(run, "train")]  # noqa: E731
    assert trace(broken) == trace(whole) and [e["step"] for e in events(broken, "resume")] == [2]
    assert torch.equal(got["model"].prompt(), want["model"].prompt())


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    """Global batch 8: 2 ranks x 4 (gloo) vs 1 process x 8, dropout on (0.1: an example's masks do not depend
    on its rank). 20 training rows: the third batch of each epoch is partial (4 rows, 2 per rank). A run
    stopped at step 3 in one process and resumed on 2 ranks is the same run too (last.pt has no RNG state)."""
    flags = ("--max-steps", 6, "--eval-every", 3, "--method", "resprompt", "--eval-mode", "rank")
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("train.py", argv(data_dir, tiny_model_dir, one, *flags))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "train.py"), *argv(data_dir, tiny_model_dir, two, *flags)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    a, b = events(one, "train"), events(two, "train")
    assert [e["loss"] for e in a] == pytest.approx([e["loss"] for e in b], rel=1e-5)
    assert [e["grad_norm"] for e in a] == pytest.approx([e["grad_norm"] for e in b], rel=1e-4)
    assert torch.allclose(outputs.load_folded_prompt(one / "prompt.pt")[0], outputs.load_folded_prompt(two / "prompt.pt")[0],
                          rtol=1e-4, atol=1e-5)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    assert ma == mb and ma["n"] == 12  # predictions gathered from both ranks, never per-rank averages
    assert [e["score"] for e in events(one, "eval")] == [e["score"] for e in events(two, "eval")]
    half = tmp_path / "half"
    stop_at(monkeypatch, 3)
    with pytest.raises(SystemExit) as stop:
        train.main(argv(data_dir, tiny_model_dir, half, *flags))
    assert stop.value.code == 138 and torch.load(half / "last.pt", weights_only=True)["step"] == 3
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "train.py"), *argv(data_dir, tiny_model_dir, half, *flags, "--resume")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [e["loss"] for e in events(half, "train")] == pytest.approx([e["loss"] for e in a], rel=1e-5)
    assert torch.allclose(outputs.load_folded_prompt(one / "prompt.pt")[0], outputs.load_folded_prompt(half / "prompt.pt")[0],
                          rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_cuda_bf16_run(data_dir, tiny_model_dir, tmp_path):
    out = train.main(argv(data_dir, tiny_model_dir, tmp_path / "run", "--max-steps", 4, "--eval-every", 2))
    assert out["config"]["dtype"] == "bf16" and out["config"]["device"].startswith("cuda")
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in events(tmp_path / "run", "train"))
    assert events(tmp_path / "run", "end")[0]["peak_memory_kind"] == "cuda_max_memory_allocated"


def test_live_curves_are_optional_and_fed_the_logged_events(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    """--tensorboard / --wandb: off by default; a clear error without the package; with it, every numeric
    value of every log.jsonl event reaches the tracker at its step (log.jsonl stays the record)."""
    import importlib.util
    import types
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(SystemExit, match="pip install tensorboard"):
            train.main(argv(data_dir, tiny_model_dir, tmp_path / "tb", "--max-steps", 2, "--tensorboard"))
        assert not (tmp_path / "tb" / "config.json").exists()  # nothing written before the refusal
    logged = []
    fake = types.SimpleNamespace(init=lambda **kw: types.SimpleNamespace(
        log=lambda values, step: logged.append((step, values)), config=kw["config"]))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train.main(argv(data_dir, tiny_model_dir, tmp_path / "wb", "--max-steps", 3, "--eval-every", 3, "--no-test",
                    "--wandb", "proj"))
    losses = [(e["step"], e["loss"]) for e in events(tmp_path / "wb", "train")]
    assert [(s, v["train/loss"]) for s, v in logged if "train/loss" in v] == losses
    assert any("eval/score" in v for _, v in logged)
    plain = tmp_path / "plain"
    train.main(argv(data_dir, tiny_model_dir, plain, "--max-steps", 1, "--no-test"))
    assert not (plain / "tensorboard").exists() and json.loads((plain / "config.json").read_text())["wandb"] is None
