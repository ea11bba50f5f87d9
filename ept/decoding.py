"""Decoding a prompted T5 and scoring it: greedy generation, rank classification, a run rebuilt from
its folder. train.py validates with `score_split`; evaluate.py, the analyses and the drivers call
`evaluate_run(run_dir, task=None, split="test", mode="generate", prompt=None)`.
"""
import inspect
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import model as M
from ept import batching, errors, files, metrics, pretrained, runs, runtime


@torch.no_grad()
def _by_batch(model, tokenizer, sources, step, batch_size, max_length, device, dtype, sort,
              progress):
    """[step(input_ids, mask) for each batch of `sources` (strings or token-id lists)], in the
    order of `sources`, the model in eval mode. `progress` labels a bar on stderr; None: no bar
    (inside train.py's own bar); TQDM_DISABLE=1 turns it off."""
    ids = (batching.encode(tokenizer, sources, max_length)
           if sources and isinstance(sources[0], str) else sources)
    out = {}
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(ids), desc=progress, unit="ex", dynamic_ncols=True,
               **({"disable": True} if progress is None else {}))
    for batch in batching.batches_by_length(ids, batch_size, sort,
                                            token_budget=not str(device).startswith("cuda")):
        input_ids, mask = batching.pad([ids[i] for i in batch], tokenizer.pad_token_id)
        with runtime.autocast(device, dtype):
            out.update(zip(batch, step(input_ids.to(device), mask.to(device))))
        bar.update(len(batch))
    bar.close()
    model.train(was_training)
    return [out[i] for i in range(len(ids))]


def predict(model, tokenizer, sources, *, max_new_tokens, batch_size=64, max_length=256,
            device="cpu", dtype="fp32", sort_by_length=True, progress=None):
    """Greedy decoding of `sources` (strings or token-id lists): batched, sorted by length, at most
    `max_new_tokens` new tokens, each row stops at `</s>`; special tokens skipped, stripped."""
    def step(input_ids, mask):
        gen = model.generate(input_ids, mask, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1)
        return [text.strip() for text in tokenizer.batch_decode(gen, skip_special_tokens=True)]
    return _by_batch(model, tokenizer, sources, step, batch_size, max_length, device, dtype,
                     sort_by_length, progress)


@torch.no_grad()
def label_nll(model, input_ids, mask, label_ids):
    """(B, L) summed NLL (incl. `</s>`) of each of the L label sequences `label_ids` (L, T; -100 =
    padding) for each of the B inputs. The encoder and the decoder's first step (the start token,
    shared by every label) run once per input; the cache they fill, cross-attention keys and values
    included, is repeated for the L labels, whose tokens are scored in one more decoder pass."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    t5, n_labels = model.t5, label_ids.size(0)
    embeds, mask = model.embed(input_ids, mask)  # (B, n+S, d), prompt included
    hidden = t5.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    start = torch.full((len(input_ids), 1), t5.config.decoder_start_token_id,
                       device=input_ids.device)
    cache_arg = ("cache" if "cache" in inspect.signature(t5.forward).parameters  # renamed in 5.2x
                 else "past_key_values")
    first = t5(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=start,
               use_cache=True, **{cache_arg: EncoderDecoderCache(DynamicCache(), DynamicCache())})
    logits = first.logits.repeat_interleave(n_labels, 0)  # (B*L, 1, V): example-major
    target = label_ids.repeat(len(input_ids), 1)  # (B*L, T)
    if target.size(1) > 1:
        cache = getattr(first, cache_arg)
        cache.batch_repeat_interleave(n_labels)
        rest = t5(encoder_outputs=(hidden.repeat_interleave(n_labels, 0),),
                  attention_mask=mask.repeat_interleave(n_labels, 0),
                  decoder_input_ids=target[:, :-1].masked_fill(target[:, :-1] == -100,
                                                               t5.config.pad_token_id),
                  use_cache=True, **{cache_arg: cache})
        logits = torch.cat([logits, rest.logits], 1)  # (B*L, T, V)
    nll = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=-100,
                          reduction="none")
    return nll.sum(1).view(len(input_ids), n_labels)


def rank_classify(model, tokenizer, sources, labels, *, batch_size=64, max_length=256,
                  device="cpu", dtype="fp32", progress=None):
    """Rank classification: the label string with the lowest summed NLL (incl. `</s>`) under T5,
    scored by `label_nll` for a batch of inputs at a time; never an invalid prediction."""
    label_ids, _ = batching.pad(batching.encode(tokenizer, labels, max_length), -100)  # (L, T)

    def step(input_ids, mask):
        nll = label_nll(model, input_ids, mask, label_ids.to(device))
        return [labels[k] for k in nll.argmin(1).tolist()]
    return _by_batch(model, tokenizer, sources, step, max(1, batch_size // len(labels)),
                     max_length, device, dtype, True, progress)


def load_run(run_dir, checkpoint="best", prompt=None, device=None):
    """(PromptedT5 with a FoldedPrompt or a fine-tuned T5, tokenizer, config) from a run folder."""
    run_dir = Path(run_dir)
    config = runs.read_config(run_dir)
    device = device or runtime.default_device()
    t5 = pretrained.load_t5(config["model"], random_init=config["random_init"], seed=config["seed"],
                            fix=pretrained.RUN_FIX)
    tokenizer = pretrained.load_tokenizer(config["tokenizer"], fix=pretrained.RUN_FIX)
    state_path = run_dir / f"{checkpoint}.pt"
    if config["method"] == "ft":  # the checkpoint holds all of T5
        if not state_path.exists():
            raise files.FileFault(f"{run_dir} has no {checkpoint}.pt (fine-tuned weights); "
                                  "was it pruned?")
        load_state(t5, files.load_torch(state_path), state_path)
        return M.PromptedT5(t5, None).to(device).eval(), tokenizer, config
    if config.get("t5_fingerprint") and pretrained.t5_fingerprint(t5) != config["t5_fingerprint"]:
        raise errors.Failure(f"the T5 rebuilt from {config['model']!r} differs from the one "
                             f"{run_dir} was trained with (fingerprint mismatch); restore that "
                             "model or retrain the run")
    if prompt is None and checkpoint == "best" and (run_dir / "prompt.pt").exists():
        prompt, _ = M.load_folded_prompt(run_dir / "prompt.pt")
    elif prompt is None:  # fold P' from the checkpoint's reparameterization network, once
        if not state_path.exists():
            raise files.FileFault(f"{run_dir} has neither prompt.pt nor {checkpoint}.pt; "
                                  "the run has not finished a validation yet")
        try:
            module = M.build_prompt_module(config["method"], t5.config.d_model,
                                           **M.prompt_options(config))
        except ValueError as err:
            raise files.FileFault(f"{run_dir / 'config.json'} has a wrong prompt option "
                                  f"({err})") from None
        load_state(module, files.load_torch(state_path), state_path)
        with torch.no_grad():
            prompt = module().detach()
    prompt = torch.as_tensor(prompt, dtype=torch.float32)
    if not torch.isfinite(prompt).all():
        raise errors.Failure(f"the prompt of {run_dir} holds NaN or inf values; retrain the run")
    if prompt.dim() != 2 or prompt.size(1) != t5.config.d_model:
        raise errors.Failure(f"the prompt of {run_dir} has shape {tuple(prompt.shape)}, but "
                             f"{config['model']} needs (n, {t5.config.d_model}); it belongs to "
                             "another model")
    return M.PromptedT5(t5, M.FoldedPrompt(prompt)).to(device).eval(), tokenizer, config


def load_state(module, checkpoint, path):
    """A checkpoint's trainable state into `module`; another model's checkpoint is one sentence."""
    try:
        module.load_state_dict(checkpoint["trainable"])
    except (RuntimeError, KeyError, TypeError, IndexError) as err:
        raise files.FileFault(f"{path} does not fit the model its config.json builds "
                              f"({type(err).__name__}); it belongs to another run") from None


def run_dtype(config, device):
    """The precision a run was trained in (config.json), on this device: bf16 needs CUDA."""
    return config.get("dtype", "fp32") if torch.device(device).type == "cuda" else "fp32"


def run_predictions(net, tokenizer, sources, meta, *, mode, **options):
    """Predictions by greedy decoding (at most meta's max_target_length tokens) or, for tasks with a
    label set (meta's labels), rank classification; `options`: batch_size, max_length, device,
    dtype and progress, as predict takes them."""
    if mode != "rank":
        return predict(net, tokenizer, sources, max_new_tokens=meta["max_target_length"], **options)
    if not meta.get("labels"):
        raise errors.Failure("--eval-mode rank needs a task with a label set (meta.json 'labels')")
    return rank_classify(net, tokenizer, sources, meta["labels"], **options)


def evaluate_run(run_dir, task=None, split="test", mode="generate", prompt=None, *,
                 checkpoint="best", data_dir=None, batch_size=64, max_examples=None, device=None,
                 write=True, tag=None, quiet=False):
    """Score a run on `split` of `task` (default: the run's own). `prompt` (l, d) overrides P'
    (Figure 4); files go to RUN_DIR/eval/<task>_<split>[.<tag>].{metrics.json,predictions.jsonl};
    tag defaults to 'rank' in rank mode. Returns the result dict (with 'score')."""
    say = (lambda *a: None) if quiet else print
    net, tokenizer, config = load_run(run_dir, checkpoint, prompt, device)
    device = device or runtime.default_device()
    task = task or config["task"]
    data_dir = str(data_dir or config["data_dir"])
    if data_dir != config["data_dir"]:
        say(f"evaluate: --data-dir {data_dir} overrides the run's {config['data_dir']}")
    meta = files.load_meta(data_dir, task)
    metrics.check_metrics(meta, Path(data_dir) / task / "meta.json")
    if mode == "rank" and not meta.get("labels"):
        raise errors.Failure(f"evaluate: --eval-mode rank needs a task with a label set; {task} "
                             "has open targets")
    max_length = config["max_length"] if task == config["task"] else meta["max_length"]
    if task != config["task"]:
        say(f"evaluate: zero-shot transfer of {config['task']}'s prompt to {task} "
            f"(max_length {max_length})")
    split_file = Path(data_dir) / task / f"{split}.jsonl"
    examples, source_ids, _ = batching.read_split(meta, split, split_file, tokenizer, max_length,
                                                  max_examples)
    t0 = time.time()
    preds = run_predictions(net, tokenizer, source_ids, meta, mode=mode, max_length=max_length,
                            batch_size=batch_size, device=device, dtype=run_dtype(config, device),
                            progress=None if quiet else f"evaluate {task} {split}")
    seconds = time.time() - t0
    result = {"task": task, "split": split, "mode": mode, "checkpoint": checkpoint,
              "run": str(run_dir), "train_task": config["task"],
              "prompt_override": prompt is not None,
              **metrics.compute_metrics(meta, preds, examples),
              "eval_examples_per_s": len(examples) / max(seconds, 1e-9)}
    if write:
        tag = tag or ("rank" if mode == "rank" else None)
        stem = Path(run_dir) / "eval" / (f"{task}_{split}" + (f".{tag}" if tag else ""))
        files.make_dir(stem.parent, "evaluation folder")
        files.write_jsonl(f"{stem}.predictions.jsonl", [
            {"idx": e.get("idx"), "source": e["source"], "target": e["target"], "prediction": p,
             "correct": p == e["target"]} for e, p in zip(examples, preds)])
        files.write_json(f"{stem}.metrics.json", result)
        say(f"evaluate: wrote {stem}.metrics.json and .predictions.jsonl")
    return result


def evaluate_frozen(model, task, split, data_dir, *, batch_size=64, device=None):
    """The frozen T5 `model` alone, no prompt and no run folder (the steering benchmark's floor):
    its metrics on `split` of `task` (greedy decoding, fp32)."""
    device = device or runtime.default_device()
    net = M.PromptedT5(pretrained.load_t5(model), None).to(device).eval()
    tokenizer = pretrained.load_tokenizer(model)
    meta = files.load_meta(data_dir, task)
    split_file = Path(data_dir) / task / f"{split}.jsonl"
    examples, source_ids, _ = batching.read_split(meta, split, split_file, tokenizer,
                                                  meta["max_length"])
    preds = run_predictions(net, tokenizer, source_ids, meta, mode="generate", device=device,
                            max_length=meta["max_length"], batch_size=batch_size, dtype="fp32")
    return {"task": task, "split": split, "model": str(model),
            **metrics.compute_metrics(meta, preds, examples)}


def score_split(net, tokenizer, meta, examples, source_ids, ranks, **options):
    """Scores of `net` on a split, decoded as `options` (decode_options) say. Every rank decodes a
    strided shard; predictions are gathered so each rank scores the whole split (never an average
    of per-rank scores)."""
    preds = run_predictions(net, tokenizer, source_ids[ranks.rank::ranks.world_size], meta,
                            device=ranks.device, **options)
    if ranks.world_size > 1:
        shards = [None] * ranks.world_size
        dist.all_gather_object(shards, preds)
        preds = [None] * len(examples)
        for r, part in enumerate(shards):
            preds[r::ranks.world_size] = part
    return metrics.compute_metrics(meta, preds, examples)


def decode_options(args):
    """How validation and test decode: the run's eval mode, batch size, input length, precision."""
    return {"mode": args.eval_mode, "batch_size": args.eval_batch_size,
            "max_length": args.max_length, "dtype": args.dtype}
