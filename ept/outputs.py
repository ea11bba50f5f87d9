"""Run folders read back by the later stages, and the shared results files (not train.py's)."""
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

import model as M
from ept import cli, evaluation, files, runfolder, runtime, tasks

# load_run's way out when a run's T5 or tokenizer (a Hub name) cannot be loaded
RUN_FIX = ("a run trained on a Hub name needs it in the local Hugging Face cache (HF_HOME): "
           "load it once online")
# meta.json's "rule" of each few-shot set; absent: the old k per class. Table 3 (§5.2) is ambiguous
# ("k randomly selected samples, with the number of classes sampled consistently"): k in all is our
# reading, as the public EPT code takes k in total; STS-B follows that code (docs/data.md).
FEWSHOT_RULE = "k in all, classes balanced"
FEWSHOT_RULES = {"stsb": "k in all, at most ceil(k/2) each of score <= 2.5 and > 2.5, first-come"}


def old_fewshot_sets(meta):
    """meta.json's few-shot sets of an older rule (k per class; STS-B: k from the whole split)."""
    meta = meta if isinstance(meta, dict) else {}
    sets, rule = meta.get("fewshot"), FEWSHOT_RULES.get(meta.get("task"), FEWSHOT_RULE)
    return sorted(key for key, entry in (sets if isinstance(sets, dict) else {}).items()
                  if not isinstance(entry, dict) or entry.get("rule") != rule)


def old_fewshot_warning(data_dir, old):
    """One line for the sets `old` = {task: [keys]} drawn k per class, or None: none."""
    old = {task: keys for task, keys in old.items() if keys}
    named = [re.fullmatch(r"k(\d+)_seed(\d+)", key) for keys in old.values() for key in keys]
    ks, seeds = (sorted({int(m[i]) for m in named if m}) for i in (1, 2))
    return old and (f"warning: the few-shot files of {', '.join(old)} in {data_dir} were drawn "
                    "with an older rule, k examples per class (docs/data.md); prepared files are "
                    "rebuilt only with --overwrite: "
                    f"{tasks.prepare_command(data_dir, [*old], ks, seeds, True)}") or None


def read_config(run_dir, keys=("task", "method", "model", "tokenizer", "random_init", "seed",
                               "data_dir", "max_length", "meta")):
    """A run's config.json; one sentence if it lacks `keys` (what later stages rebuild it from)."""
    run_dir, fix = Path(run_dir), "; pass a folder train.py wrote"
    if not run_dir.is_dir():
        raise files.FileFault(f"no run folder {run_dir} "
                              f"({'a file' if run_dir.exists() else 'it does not exist'}){fix}")
    if not (run_dir / "config.json").exists():
        raise files.FileFault(f"{run_dir} is not a run folder (no config.json){fix}")
    config = files.read_json(run_dir / "config.json", "run configuration")
    missing = [k for k in keys if not isinstance(config, dict) or k not in config]
    if missing:
        raise files.FileFault((
            f"{run_dir} is not a run folder (its config.json is not train.py's, a model's perhaps)"
            if {"task", "method"} <= set(missing) else f"{run_dir / 'config.json'} is not a "
            f"train.py run configuration (no {', '.join(missing)})") + fix)
    return config


def status(run_dir):
    """'done' (runfolder.finished), 'failed' (failed.txt), 'partial' (config.json) or 'todo'."""
    run_dir = Path(run_dir)
    return ("done" if runfolder.finished(run_dir) else "failed"
            if (run_dir / runfolder.FAILED_NAME).exists() else "partial"
            if (run_dir / "config.json").exists() else "todo")


def failure(run_dir):
    """Why the run failed (failed.txt's sentence), or None: it did not, or was restarted since."""
    path = Path(run_dir) / runfolder.FAILED_NAME
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip() or "failed"
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"failed ({runfolder.FAILED_NAME} unreadable: {files.why(err)})"


def curves(run_dir, missing_ok=False):
    """(steps, μ_t per step, eval steps, validation scores) from one run's log.jsonl."""
    log = files.read_jsonl(Path(run_dir) / "log.jsonl", what="run log", torn_tail_ok=True,
                           missing_ok=missing_ok)
    train = [e for e in log if e.get("event") == "train" and e.get("prompt_norm") is not None]
    evals = [e for e in log if e.get("event") == "eval" and e.get("score") is not None
             and e.get("split", "validation") == "validation"]
    return ([e["step"] for e in train], [e["prompt_norm"] for e in train],
            [e["step"] for e in evals], [e["score"] for e in evals])


def load_run(run_dir, checkpoint="best", prompt=None, device=None):
    """(PromptedT5 with a FoldedPrompt or a fine-tuned T5, tokenizer, config) from a run folder."""
    run_dir, config, device = Path(run_dir), read_config(run_dir), device or runtime.ranks().device
    t5 = runtime.load_t5(config["model"], random_init=config["random_init"], seed=config["seed"],
                         fix=RUN_FIX)
    tokenizer = runtime.load_tokenizer(config["tokenizer"], fix=RUN_FIX)
    state_path, d = run_dir / f"{checkpoint}.pt", t5.config.d_model
    if config["method"] == "ft":  # the checkpoint holds all of T5
        if not state_path.exists():
            raise files.FileFault(f"{run_dir} has no {checkpoint}.pt (fine-tuned weights); was "
                                  "it pruned?")
        return M.PromptedT5(load_state(t5, state_path), None).to(device).eval(), tokenizer, config
    if config.get("t5_fingerprint") and runtime.t5_fingerprint(t5) != config["t5_fingerprint"]:
        raise cli.Failure(f"the T5 rebuilt from {config['model']!r} differs from the one "
                          f"{run_dir} was trained with (fingerprint mismatch); restore that "
                          "model or retrain the run")
    if prompt is None and checkpoint == "best" and (run_dir / "prompt.pt").exists():
        prompt, _ = load_folded_prompt(run_dir / "prompt.pt")
    elif prompt is None:  # fold P' from the checkpoint's reparameterization network, once
        if not state_path.exists():
            raise files.FileFault(f"{run_dir} has neither prompt.pt nor {checkpoint}.pt; "
                                  "the run has not finished a validation yet")
        try:
            module = M.build_prompt_module(config["method"], d, **M.prompt_options(config))
        except ValueError as err:
            raise files.FileFault(f"{run_dir / 'config.json'} has a wrong prompt option "
                                  f"({err})") from None
        with torch.no_grad():
            prompt = load_state(module, state_path)().detach()
    prompt = torch.as_tensor(prompt, dtype=torch.float32)
    if not torch.isfinite(prompt).all():
        raise cli.Failure(f"the prompt of {run_dir} holds NaN or inf values; retrain the run")
    if prompt.dim() != 2 or prompt.size(1) != d:
        raise cli.Failure(f"the prompt of {run_dir} has shape {tuple(prompt.shape)}, but "
                          f"{config['model']} needs (n, {d}); it belongs to another model")
    return M.PromptedT5(t5, M.FoldedPrompt(prompt)).to(device).eval(), tokenizer, config


def load_state(module, path):
    """`module` with the trainable state of checkpoint `path`; another model's: one sentence."""
    try:
        module.load_state_dict(files.load_torch(path)["trainable"])
    except (RuntimeError, KeyError, TypeError, IndexError) as err:
        raise files.FileFault(f"{path} does not fit the model its config.json builds "
                              f"({type(err).__name__}); it belongs to another run") from None
    return module


def run_dtype(config, device):  # the precision a run was trained in, on this device (bf16: CUDA)
    return config.get("dtype", "fp32") if torch.device(device).type == "cuda" else "fp32"


def score(net, tokenizer, data_dir, task, split, max_length, max_examples=None, **options):
    """(examples, predictions, metrics, seconds decoding) of `net` on data/<task>/<split>.jsonl."""
    meta = tasks.load_meta(data_dir, task)
    max_length = max_length or meta["max_length"]
    path = Path(data_dir) / task / f"{split}.jsonl"
    examples, ids, _ = tasks.read_split(meta, split, path, tokenizer, max_length, max_examples)
    t0 = time.time()
    preds = run_predictions(net, tokenizer, ids, meta, max_length=max_length, **options)
    return examples, preds, evaluation.compute_metrics(meta, preds, examples), time.time() - t0


def evaluate_run(run_dir, task=None, split="test", mode="generate", prompt=None, *,
                 checkpoint="best", data_dir=None, batch_size=64, max_examples=None, device=None,
                 write=True, quiet=False):
    """Score a run on `split` of `task` (default: the run's own); `prompt` (l, d) overrides P'
    (Figure 4). Writes RUN_DIR/eval/<task>_<split>[.rank].{metrics.json,predictions.jsonl}."""
    say = (lambda *a: None) if quiet else print
    net, tokenizer, config = load_run(run_dir, checkpoint, prompt, device)
    device, task = device or runtime.ranks().device, task or config["task"]
    data_dir, own = str(data_dir or config["data_dir"]), task == config["task"]
    if data_dir != config["data_dir"]:
        say(f"evaluate: --data-dir {data_dir} overrides the run's {config['data_dir']}")
    if not own:
        say(f"evaluate: zero-shot transfer of {config['task']}'s prompt to {task} (max_length "
            f"{tasks.load_meta(data_dir, task)['max_length']})")
    examples, preds, scores, seconds = score(
        net, tokenizer, data_dir, task, split, config["max_length"] if own else None, max_examples,
        mode=mode, batch_size=batch_size, device=device, dtype=run_dtype(config, device),
        progress=None if quiet else f"evaluate {task} {split}")
    result = {"task": task, "split": split, "mode": mode, "checkpoint": checkpoint,
              "run": str(run_dir), "train_task": config["task"],
              "prompt_override": prompt is not None, **scores,
              "eval_examples_per_s": len(examples) / max(seconds, 1e-9)}
    if write:
        stem = Path(run_dir) / "eval" / (f"{task}_{split}" + (".rank" if mode == "rank" else ""))
        files.make_dir(stem.parent, "evaluation folder")
        files.write_jsonl(f"{stem}.predictions.jsonl", [
            {"idx": e.get("idx"), "source": e["source"], "target": e["target"], "prediction": p,
             "correct": p == e["target"]} for e, p in zip(examples, preds)])
        files.write_json(f"{stem}.metrics.json", result)
        say(f"evaluate: wrote {stem}.metrics.json and .predictions.jsonl")
    return result


def write_folder(path, fill):
    """A whole folder at once: `fill(tmp)` fills a folder beside `path`, then swapped in whole."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise files.FileFault(f"cannot write the folder {path}: a file of that name is in the way")
    tmp, old = (path.with_name(f".{path.name}.{os.getpid()}.{end}") for end in ("tmp", "old"))
    try:
        for p in (tmp, old):
            shutil.rmtree(p, ignore_errors=True)  # left by a killed run
        tmp.mkdir()
        fill(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as err:  # the old folder back in its place
        if old.exists() and not path.exists():
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, OSError):
            raise
        raise files.FileFault(f"cannot write {path}: {files.why(err)}") from None
    shutil.rmtree(old, ignore_errors=True)
    return path


def append_lines(path, lines):
    """Whole lines in one fsynced O_APPEND write (none torn or interleaved), after a newline."""
    if not lines:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            fresh = "\n" if size and os.pread(fd, 1, size - 1) != b"\n" else ""  # an editor's
            os.write(fd, (fresh + "".join(lines)).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise files.FileFault(f"cannot append to {path}: {files.why(err)}") from None


RESULTS_FIX = ("delete that line and rerun the experiment's driver (ablate.py / fewshot.py): it "
               "writes the row of each finished run that has none")


def append_jsonl(path, rows):
    append_lines(path, [json.dumps(r, ensure_ascii=False) + "\n" for r in rows])


def load_folded_prompt(path):
    """(P' (n, d), meta) of a run's prompt.pt (train.finish writes it); a NaN prompt refused."""
    state = files.load_torch(path, "folded prompt")
    prompt = state.get("prompt") if isinstance(state, dict) else None
    if not torch.is_tensor(prompt) or prompt.dim() != 2:
        raise files.FileFault(f"{path} is not a folded prompt (a dict with an (n, d) 'prompt' "
                              "tensor)")
    if not torch.isfinite(prompt).all():
        raise files.FileFault(f"the prompt in {path} holds NaN or inf values; retrain the run")
    return prompt, state.get("meta", {})


def run_predictions(net, tokenizer, sources, meta, *, mode, progress=None, **options):
    """`evaluation.predict` as the task's meta.json says: greedy (mode 'generate') or over its
    labels (mode 'rank'; train.py refuses a task without labels before it trains); `progress`: a
    bar's label (TQDM_DISABLE=1 hides it)."""
    if mode == "rank" and not meta.get("labels"):
        raise cli.Failure(f"--eval-mode rank needs a label set; {meta.get('task')} has none")
    bar = iter if progress is None else lambda batches: tqdm(batches, desc=progress, unit="batch",
                                                             dynamic_ncols=True)
    return evaluation.predict(net, tokenizer, sources, max_new_tokens=meta["max_target_length"],
                              labels=meta["labels"] if mode == "rank" else None, progress=bar,
                              **options)
