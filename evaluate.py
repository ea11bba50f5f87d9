"""Evaluate a trained run: every metric of the paper, greedy decoding or rank classification.

Reads a run folder written by train.py (config.json, prompt.pt / best.pt / last.pt) and the
task's data folder written by prepare_data.py (<split>.jsonl, meta.json). Rebuilds T5, the
tokenizer and P' from config.json alone (a flag that overrides it is announced on stdout), and
uses only the folded prompt P' (no reparameterization network at inference). Writes
RUN_DIR/eval/<task>_<split>.metrics.json and .predictions.jsonl (atomically) and prints the metrics.

    python evaluate.py runs/rte_ept_t5-base_s0                           # test split, best checkpoint
    python evaluate.py runs/rte_ept_t5-base_s0 --split validation --eval-mode rank
    python evaluate.py runs/rte_ept_t5-base_s0 --task cb                 # zero-shot transfer (Figure 10)
    python evaluate.py runs/rte_ept_t5-base_s0 --input new.jsonl --output preds.jsonl   # new inputs

train.py validates with `run_predictions` and `compute_metrics` from here; the drivers and analyses
call `evaluate_run(run_dir, task=None, split="test", mode="generate", prompt=None)`.
"""
import argparse
import collections
import inspect
import json
import math
import re
import string
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import model as M
from ept import batching, cli, files, pretrained, runs, runtime

parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
parser.add_argument("run_dir", help="a run folder written by train.py")
# data
parser.add_argument("--split", default="test", choices=("test", "validation", "train"), help="which split to score")
parser.add_argument("--task", default=None, type=cli.name, help="evaluate on another task (zero-shot transfer); default: the run's")
parser.add_argument("--data-dir", default=None, help="data folder (default: the run's config.json data_dir)")
parser.add_argument("--max-eval-examples", type=cli.positive_int, default=None,
                    help="score only the first N examples (default: all)")
# model
parser.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which checkpoint's prompt to use")
# evaluation
parser.add_argument("--eval-mode", default="generate", choices=("generate", "rank"),
                    help="greedy generation, or rank classification over the label set (never invalid)")
parser.add_argument("--eval-batch-size", type=cli.positive_int, default=64, help="examples per forward pass")
# new inputs
parser.add_argument("--input", default=None, help="jsonl with a 'source' field, or .txt with one input per line")
parser.add_argument("--output", default=None, help="with --input: where the predictions go (jsonl)")


# --- metrics (scores in [0, 100], as the paper prints them) ---------------------------------------
# Every metric takes (predictions, examples, labels); an empty input scores 0.0 (never NaN in JSON).

def _binary(pred, target, labels, positive="1"):
    """(predicted positive, truly positive); a prediction outside the label set is the opposite of its
    target (docs/paper.md, "Training"), so it is always wrong."""
    truth = target == positive
    return ((pred == positive) if pred in labels else not truth), truth


def accuracy(preds, targets):
    return 100.0 * sum(p == t for p, t in zip(preds, targets)) / len(targets) if targets else 0.0


def binary_f1(preds, targets, labels=("0", "1"), positive="1"):
    tp = fp = fn = 0
    for p, t in zip(preds, targets):
        pp, tt = _binary(p, t, labels or ("0", "1"), positive)
        tp, fp, fn = tp + (pp and tt), fp + (pp and not tt), fn + (tt and not pp)
    return 100.0 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0  # no positives anywhere: 0, as sklearn


def macro_f1(preds, targets, labels=None):
    """Mean per-class F1 over the label-set classes that occur in targets or valid predictions; an invalid
    prediction is a false negative of its target class and a false positive of none."""
    labels = list(labels) if labels else sorted(set(targets))
    classes = [c for c in labels if c in set(targets) or c in set(preds)]
    f1s = []
    for c in classes:
        tp = sum(p == c and t == c for p, t in zip(preds, targets))
        fp = sum(p == c and t != c for p, t in zip(preds, targets))
        fn = sum(p != c and t == c for p, t in zip(preds, targets))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return 100.0 * sum(f1s) / len(f1s) if f1s else 0.0


def matthews_corr(preds, targets, labels=None):
    """Matthews correlation (Gorodkin's K-class form; the usual MCC for two classes). With two labels an
    invalid prediction becomes the other label; with more it is a class of its own (always wrong)."""
    labels = list(labels) if labels else sorted(set(targets))
    if len(labels) == 2:
        preds = [p if p in labels else labels[1 - labels.index(t)] if t in labels else p for p, t in zip(preds, targets)]
    s, c = len(targets), sum(p == t for p, t in zip(preds, targets))
    pk, tk = collections.Counter(preds), collections.Counter(targets)
    cov_pt = c * s - sum(pk[k] * tk[k] for k in tk)
    den = math.sqrt((s * s - sum(v * v for v in pk.values())) * (s * s - sum(v * v for v in tk.values())))
    return 100.0 * cov_pt / den if den else 0.0  # a constant prediction or target: 0, as sklearn


def to_float(text, default=-1.0):
    """STS-B predictions as numbers; a non-numeric one becomes -1.0, outside the 0..5 range of the gold
    scores, as the T5 code base's `string_to_float` postprocessor does (Raffel et al. 2020)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return default
    return value if math.isfinite(value) else default


def _pearson(x, y):
    n = len(x)
    if n < 2:
        return 0.0
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0  # constant input: 0, not NaN


def _ranks(x):
    """1-based ranks, ties get their average rank (scipy.stats.rankdata 'average')."""
    order = sorted(range(len(x)), key=x.__getitem__)
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(preds, targets):
    return 100.0 * _pearson([to_float(p) for p in preds], [float(t) for t in targets])


def spearman(preds, targets):
    return 100.0 * _pearson(_ranks([to_float(p) for p in preds]), _ranks([float(t) for t in targets]))


def multirc_em(preds, targets, question_ids):
    """Exact match per question: all of a question's answers right (MultiRC; invalid = wrong)."""
    right = collections.defaultdict(lambda: True)
    for p, t, q in zip(preds, targets, question_ids):
        right[q] = right[q] and p == t
    return 100.0 * sum(right.values()) / len(right) if right else 0.0


def normalize_answer(text):
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _squad_f1(pred, gold):
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_em(preds, answers):
    scores = [max(float(normalize_answer(p) == normalize_answer(a)) for a in golds) for p, golds in zip(preds, answers)]
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


def squad_f1(preds, answers):
    scores = [max(_squad_f1(p, a) for a in golds) for p, golds in zip(preds, answers)]
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


def _answers(ex):
    return ex.get("answers") or [ex["target"]]  # MRQA rows carry every gold answer


METRICS = {  # DESIGN.md metric names -> f(predictions, examples, labels)
    "acc": lambda p, ex, lab: accuracy(p, [e["target"] for e in ex]),
    "f1": lambda p, ex, lab: binary_f1(p, [e["target"] for e in ex], lab),
    "macro_f1": lambda p, ex, lab: macro_f1(p, [e["target"] for e in ex], lab),
    "mcc": lambda p, ex, lab: matthews_corr(p, [e["target"] for e in ex], lab),
    "pearson": lambda p, ex, lab: pearson(p, [e["target"] for e in ex]),
    "spearman": lambda p, ex, lab: spearman(p, [e["target"] for e in ex]),
    "f1a": lambda p, ex, lab: binary_f1(p, [e["target"] for e in ex], lab),
    "em": lambda p, ex, lab: multirc_em(p, [e["target"] for e in ex], [e["question_id"] for e in ex]),
    "squad_em": lambda p, ex, lab: squad_em(p, [_answers(e) for e in ex]),
    "squad_f1": lambda p, ex, lab: squad_f1(p, [_answers(e) for e in ex]),
}


def check_metrics(meta, path):
    """meta.json names only metrics this file computes (an edited one would fail after the whole run)."""
    unknown = [m for m in meta["metrics"] if m not in METRICS]
    if unknown:
        raise files.FileFault(f"{path} names unknown metrics {unknown}; known: {', '.join(METRICS)}. "
                              "Rebuild the task with prepare_data.py --overwrite")


def compute_metrics(meta, predictions, examples):
    """{metric: value for meta['metrics']} + 'score' (mean of meta['score']) + counts."""
    assert len(predictions) == len(examples), (len(predictions), len(examples))
    labels = meta.get("labels")
    out = {name: METRICS[name](predictions, examples, labels) for name in meta["metrics"]}
    out["score"] = sum(out[name] for name in meta["score"]) / len(meta["score"])
    out["n"] = len(examples)
    if labels:
        out["invalid"] = sum(p not in labels for p in predictions)  # predictions outside the label set
    return out


# --- decoding ------------------------------------------------------------------------------------

@torch.no_grad()
def progress_bar(n, desc):
    """A bar over `n` examples on stderr, or none when `desc` is None (inside train.py's own bar);
    TQDM_DISABLE=1 turns it off."""
    return tqdm(total=n, desc=desc, unit="ex", dynamic_ncols=True, **({"disable": True} if desc is None else {}))


def predict(model, tokenizer, sources, *, max_new_tokens, batch_size=64, max_length=256, device="cpu",
            dtype="fp32", sort_by_length=True, progress=None):
    """Greedy decoding of `sources` (strings or token-id lists): batched, sorted by length, at most
    `max_new_tokens` new tokens, each row stops at `</s>`; special tokens skipped, stripped. `progress`: the
    label of a progress bar (None: no bar)."""
    ids = batching.encode(tokenizer, sources, max_length) if sources and isinstance(sources[0], str) else sources
    out = [""] * len(ids)
    was_training = model.training
    model.eval()
    bar = progress_bar(len(ids), progress)
    for batch in batching.batches_by_length(ids, batch_size, sort_by_length, token_budget=not str(device).startswith("cuda")):
        input_ids, mask = batching.pad([ids[i] for i in batch], tokenizer.pad_token_id)
        with runtime.autocast(device, dtype):
            gen = model.generate(input_ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1)
        for i, text in zip(batch, tokenizer.batch_decode(gen, skip_special_tokens=True)):
            out[i] = text.strip()
        bar.update(len(batch))
    bar.close()
    model.train(was_training)
    return out


@torch.no_grad()
def label_nll(model, input_ids, mask, label_ids):
    """(B, L) summed NLL (incl. `</s>`) of each of the L label sequences `label_ids` (L, T; -100 = padding)
    for each of the B inputs. The encoder runs once per input; the decoder's first step (the start token,
    shared by every label) runs once per input too and fills the cache, cross-attention keys and values
    included, which is then repeated for the L labels: the label tokens are scored in one more decoder pass
    without recomputing cross-attention over the input for every label."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    t5, n_labels = model.t5, label_ids.size(0)
    embeds, mask = model.embed(input_ids, mask)  # (B, n+S, d), prompt included
    hidden = t5.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    start = torch.full((len(input_ids), 1), t5.config.decoder_start_token_id, device=input_ids.device)
    cache_arg = "cache" if "cache" in inspect.signature(t5.forward).parameters else "past_key_values"  # renamed in 5.2x
    first = t5(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=start, use_cache=True,
               **{cache_arg: EncoderDecoderCache(DynamicCache(), DynamicCache())})
    logits = first.logits.repeat_interleave(n_labels, 0)  # (B*L, 1, V): example-major
    target = label_ids.repeat(len(input_ids), 1)  # (B*L, T)
    if target.size(1) > 1:
        cache = getattr(first, cache_arg)
        cache.batch_repeat_interleave(n_labels)
        rest = t5(encoder_outputs=(hidden.repeat_interleave(n_labels, 0),), attention_mask=mask.repeat_interleave(n_labels, 0),
                  decoder_input_ids=target[:, :-1].masked_fill(target[:, :-1] == -100, t5.config.pad_token_id),
                  use_cache=True, **{cache_arg: cache})
        logits = torch.cat([logits, rest.logits], 1)  # (B*L, T, V)
    nll = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=-100, reduction="none")
    return nll.sum(1).view(len(input_ids), n_labels)


@torch.no_grad()
def rank_classify(model, tokenizer, sources, labels, *, batch_size=64, max_length=256, device="cpu", dtype="fp32",
                  progress=None):
    """Rank classification: the label string with the lowest summed NLL (incl. `</s>`) under T5, scored by
    `label_nll` for a batch of inputs at a time; never an invalid prediction."""
    ids = batching.encode(tokenizer, sources, max_length) if sources and isinstance(sources[0], str) else sources
    label_ids, _ = batching.pad(batching.encode(tokenizer, labels, max_length), -100)  # (L, T), -100 = no loss
    out = [""] * len(ids)
    was_training = model.training
    model.eval()
    bar = progress_bar(len(ids), progress)
    for batch in batching.batches_by_length(ids, max(1, batch_size // len(labels)), True, not str(device).startswith("cuda")):
        input_ids, mask = batching.pad([ids[i] for i in batch], tokenizer.pad_token_id)
        with runtime.autocast(device, dtype):
            nll = label_nll(model, input_ids.to(device), mask.to(device), label_ids.to(device))
        for i, k in zip(batch, nll.argmin(1).tolist()):
            out[i] = labels[k]
        bar.update(len(batch))
    bar.close()
    model.train(was_training)
    return out


# --- rebuilding a run -----------------------------------------------------------------------------

def load_run(run_dir, checkpoint="best", prompt=None, device=None):
    """(PromptedT5 with a FoldedPrompt (or fine-tuned T5), tokenizer, config) from a run folder alone."""
    run_dir = Path(run_dir)
    config = runs.read_config(run_dir)
    device = device or runtime.default_device()
    t5 = pretrained.load_t5(config["model"], random_init=config["random_init"], seed=config["seed"],
                            fix=pretrained.RUN_FIX)
    tokenizer = pretrained.load_tokenizer(config["tokenizer"], fix=pretrained.RUN_FIX)
    state_path = run_dir / f"{checkpoint}.pt"
    if config["method"] == "ft":  # the checkpoint holds all of T5
        if not state_path.exists():
            raise files.FileFault(f"{run_dir} has no {checkpoint}.pt (fine-tuned weights); was it pruned?")
        load_state(t5, files.load_torch(state_path), state_path)
        net = M.PromptedT5(t5, None)
    else:
        if config.get("t5_fingerprint") and pretrained.t5_fingerprint(t5) != config["t5_fingerprint"]:
            raise SystemExit(f"the T5 rebuilt from {config['model']!r} differs from the one {run_dir} "
                             "was trained with (fingerprint mismatch); restore that model or retrain the run")
        if prompt is None and checkpoint == "best" and (run_dir / "prompt.pt").exists():
            prompt, _ = M.load_folded_prompt(run_dir / "prompt.pt")
        elif prompt is None:  # fold P' from the checkpoint's reparameterization network, once
            if not state_path.exists():
                raise files.FileFault(f"{run_dir} has neither prompt.pt nor {checkpoint}.pt; the run has not "
                                      "finished a validation yet")
            try:
                module = M.build_prompt_module(config["method"], t5.config.d_model, **M.prompt_options(config))
            except ValueError as err:
                raise files.FileFault(f"{run_dir / 'config.json'} has a wrong prompt option ({err})") from None
            load_state(module, files.load_torch(state_path), state_path)
            with torch.no_grad():
                prompt = module().detach()
        prompt = torch.as_tensor(prompt, dtype=torch.float32)
        if not torch.isfinite(prompt).all():
            raise SystemExit(f"the prompt of {run_dir} holds NaN or inf values; retrain the run")
        if prompt.dim() != 2 or prompt.size(1) != t5.config.d_model:
            raise SystemExit(f"the prompt of {run_dir} has shape {tuple(prompt.shape)}, but {config['model']} "
                             f"needs (n, {t5.config.d_model}); it belongs to another model")
        net = M.PromptedT5(t5, M.FoldedPrompt(prompt))
    return net.to(device).eval(), tokenizer, config


def load_state(module, checkpoint, path):
    """A checkpoint's trainable state into `module`; another model's checkpoint is one sentence."""
    try:
        module.load_state_dict(checkpoint["trainable"])
    except (RuntimeError, KeyError, TypeError, IndexError) as err:
        raise files.FileFault(f"{path} does not fit the model its config.json builds ({type(err).__name__}); "
                              "it belongs to another run") from None


def run_dtype(config, device):
    """The precision a run was trained in (config.json), on this device: bf16 needs CUDA."""
    dtype = config.get("dtype", "fp32")
    return dtype if torch.device(device).type == "cuda" else "fp32"


def run_predictions(net, tokenizer, sources, *, mode, labels, max_new_tokens, max_length, batch_size, device, dtype,
                    progress=None):
    """Predictions by greedy decoding or, for tasks with a label set, rank classification."""
    if mode == "rank":
        if not labels:
            raise SystemExit("--eval-mode rank needs a task with a label set (meta.json 'labels')")
        return rank_classify(net, tokenizer, sources, labels, batch_size=batch_size, max_length=max_length,
                             device=device, dtype=dtype, progress=progress)
    return predict(net, tokenizer, sources, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   max_length=max_length, device=device, dtype=dtype, progress=progress)


def evaluate_run(run_dir, task=None, split="test", mode="generate", prompt=None, *, checkpoint="best",
                 data_dir=None, batch_size=64, max_examples=None, device=None, write=True, tag=None, quiet=False):
    """Score a run on `split` of `task` (default: the run's own). `prompt` (l, d) overrides P' (Figure 4);
    files go to RUN_DIR/eval/<task>_<split>[.<tag>].{metrics.json,predictions.jsonl}; tag defaults to
    'rank' in rank mode. Returns the metrics dict (with 'score')."""
    say = (lambda *a: None) if quiet else print
    net, tokenizer, config = load_run(run_dir, checkpoint, prompt, device)
    device = device or runtime.default_device()
    dtype = run_dtype(config, device)
    task = task or config["task"]
    data_dir = str(data_dir or config["data_dir"])
    if data_dir != config["data_dir"]:
        say(f"evaluate: --data-dir {data_dir} overrides the run's {config['data_dir']}")
    meta = files.load_meta(data_dir, task)
    check_metrics(meta, Path(data_dir) / task / "meta.json")
    if mode == "rank" and not meta.get("labels"):
        raise SystemExit(f"evaluate: --eval-mode rank needs a task with a label set; {task} has open targets")
    max_length = config["max_length"] if task == config["task"] else meta["max_length"]
    if task != config["task"]:
        say(f"evaluate: zero-shot transfer of {config['task']}'s prompt to {task} (max_length {max_length})")
    split_file = Path(data_dir) / task / f"{split}.jsonl"
    examples, source_ids, _ = batching.load_split(split_file, tokenizer, max_length, max_examples)
    batching.check_split(meta, split, examples, split_file, max_examples is not None)
    t0 = time.time()
    preds = run_predictions(net, tokenizer, source_ids, mode=mode, labels=meta.get("labels"),
                            max_new_tokens=meta["max_target_length"], max_length=max_length,
                            batch_size=batch_size, device=device, dtype=dtype,
                            progress=None if quiet else f"evaluate {task} {split}")
    seconds = time.time() - t0
    metrics = {"task": task, "split": split, "mode": mode, "checkpoint": checkpoint, "run": str(run_dir),
               "train_task": config["task"], "prompt_override": prompt is not None,
               **compute_metrics(meta, preds, examples), "eval_examples_per_s": len(examples) / max(seconds, 1e-9)}
    if write:
        tag = tag or ("rank" if mode == "rank" else None)
        stem = Path(run_dir) / "eval" / (f"{task}_{split}" + (f".{tag}" if tag else ""))
        files.make_dir(stem.parent, "evaluation folder")
        files.write_jsonl(f"{stem}.predictions.jsonl", [
            {"idx": e.get("idx"), "source": e["source"], "target": e["target"], "prediction": p,
             "correct": p == e["target"]} for e, p in zip(examples, preds)])
        files.write_json(f"{stem}.metrics.json", metrics)
        say(f"evaluate: wrote {stem}.metrics.json and .predictions.jsonl")
    return metrics


@torch.no_grad()
def evaluate_frozen(model, task, split, data_dir, *, batch_size=64, device=None):
    """The frozen T5 `model` alone, no prompt and no run folder (the steering benchmark's floor): its
    metrics on `split` of `task` (greedy decoding, fp32)."""
    device = device or runtime.default_device()
    net = M.PromptedT5(pretrained.load_t5(model), None).to(device).eval()
    tokenizer = pretrained.load_tokenizer(model)
    meta = files.load_meta(data_dir, task)
    split_file = Path(data_dir) / task / f"{split}.jsonl"
    examples, source_ids, _ = batching.load_split(split_file, tokenizer, meta["max_length"])
    batching.check_split(meta, split, examples, split_file, False)
    preds = run_predictions(net, tokenizer, source_ids, mode="generate", labels=meta.get("labels"),
                            max_new_tokens=meta["max_target_length"], max_length=meta["max_length"],
                            batch_size=batch_size, device=device, dtype="fp32")
    return {"task": task, "split": split, "model": str(model), **compute_metrics(meta, preds, examples)}


TEXT_SUFFIXES = ("", ".txt", ".text", ".tsv", ".csv", ".md")  # read as one input a line


def read_inputs(path):
    """New inputs: a .jsonl of objects with a 'source' string, or a text file with one input a line."""
    path = Path(path)
    if path.suffix not in (".jsonl", *TEXT_SUFFIXES):
        raise files.FileFault(f"--input {path}: a {path.suffix} file is neither a .jsonl of {{\"source\": ...}} "
                              "rows nor a text file with one input a line; convert it to one of those")
    if path.suffix == ".jsonl":
        rows = files.read_jsonl(path, what="input file")
        bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r.get("source"), str)), None)
        if bad:
            raise files.FileFault(f"{path}: row {bad} has no 'source' string; each row needs one")
    else:
        rows = [{"source": line.strip()} for line in files.read_text(path, "input file").splitlines() if line.strip()]
    if not rows:
        raise files.FileFault(f"{path} holds no inputs")
    return rows


def predict_file(run_dir, input_path, output_path, *, checkpoint="best", mode="generate", batch_size=64, device=None):
    """Run the trained prompt on new inputs: jsonl rows with 'source', or a .txt with one input a line."""
    rows = read_inputs(input_path)
    if Path(output_path).resolve() == Path(input_path).resolve():
        raise SystemExit(f"--output {output_path} is the input file; name another file")
    net, tokenizer, config = load_run(run_dir, checkpoint, None, device)
    device = device or runtime.default_device()
    meta = config["meta"]  # train.py keeps the task's labels and lengths in config.json
    preds = run_predictions(net, tokenizer, [r["source"] for r in rows], mode=mode, labels=meta.get("labels"),
                            max_new_tokens=meta["max_target_length"], max_length=config["max_length"],
                            batch_size=batch_size, device=device, dtype=run_dtype(config, device), progress="predict")
    files.write_jsonl(output_path, [{**r, "prediction": p} for r, p in zip(rows, preds)])
    return preds


def main(argv=None):
    args = parser.parse_args(argv)
    if args.input:
        out = args.output or f"{Path(args.input).with_suffix('')}.predictions.jsonl"
        preds = predict_file(args.run_dir, args.input, out, checkpoint=args.checkpoint, mode=args.eval_mode,
                             batch_size=args.eval_batch_size)
        print(f"evaluate: {len(preds)} predictions -> {out}")
        return preds
    metrics = evaluate_run(args.run_dir, args.task, args.split, args.eval_mode, checkpoint=args.checkpoint,
                           data_dir=args.data_dir, batch_size=args.eval_batch_size, max_examples=args.max_eval_examples)
    print(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    main()
