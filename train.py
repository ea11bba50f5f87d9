"""Train one method on one task: the paper's loop (Appendix B.2 / REFERENCE §2), CPU, one GPU or many.

Reads data/<task>/{train,validation,test}.jsonl + meta.json (prepare_data.py) and a T5 (Hub name or
local folder). Writes the run folder: config.json, log.jsonl (one JSON object per event: every step's
loss, lr, grad norm, prompt norm mu_t (Eq. 4), throughput; every validation; the end), best.pt and
last.pt (trainable state, optimizer, scheduler, RNG, data position; weights_only-loadable), prompt.pt
(the folded P' of the best checkpoint) and metrics.json (test metrics of the best checkpoint).

    # CPU smoke run: random-weight t5-small from the real config, 30 steps
    python train.py --task rte --method ept --model ../shared/data/t5/t5-small --random-init \\
        --tokenizer ../shared/data/t5 --max-steps 30 --eval-every 30 --max-eval-examples 32
    # the paper's setting on one GPU (bf16 autocast, TF32, fused AdamW)
    python train.py --task rte --method ept --model t5-base
    # several GPUs: the global batch of 16 is split across ranks
    torchrun --standalone --nproc_per_node=4 train.py --task rte --method ept --model t5-base
    # resume a killed run from its last.pt (same flags)
    python train.py --task rte --method ept --model t5-base --resume

Loss: the mean over the non-pad target tokens of the whole global batch (HF's per-batch mean on one
device), the same whatever the number of ranks or micro-batches. See docs/training.md.
"""
import argparse
import hashlib
import json
import math
import os
import random
import resource
import shutil
import socket
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import evaluate as E
import model as M

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# data
group = parser.add_argument_group("data")
group.add_argument("--task", required=True, help="task name: data/<task>/ written by prepare_data.py")
group.add_argument("--data-dir", default="data", help="folder holding <task>/meta.json and the split files")
group.add_argument("--fewshot-k", type=int, default=None, help="train on train_k{K}_seed{S}.jsonl (Table 3)")
group.add_argument("--fewshot-seed", type=int, default=0, help="which few-shot sample (S above)")
group.add_argument("--max-length", type=int, default=None, help="max input tokens before the prompt (default: meta.json's)")
group.add_argument("--max-train-examples", type=int, default=None, help="use only the first N training rows (default: all)")
group.add_argument("--max-eval-examples", type=int, default=None, help="score only the first N validation/test rows (default: all)")
# model
group = parser.add_argument_group("model")
group.add_argument("--model", default="t5-base", help="Hub name or local folder of the (frozen) T5")
group.add_argument("--tokenizer", default=None, help="Hub name or folder of the tokenizer (default: --model)")
group.add_argument("--random-init", action="store_true", help="random T5 weights from the config (tests, speed only)")
group.add_argument("--method", default="ept", choices=M.METHODS, help="ft = full fine-tuning, else a prompt method")
group.add_argument("--prompt-length", type=int, default=10, help="prompt rows n for pt/ptuning/resprompt")
group.add_argument("--encoder", default="mlp", choices=M.ENCODERS, help="ptuning's reparameterization network")
group.add_argument("--hidden-size", type=int, default=None, help="EPT h / ResPrompt bottleneck (default: 1 / 400)")
group.add_argument("--broadcast", type=int, default=None, help="EPT rows n (default: 1 ept, 10 ept_star)")
group.add_argument("--layer-norm", action="store_true", help="EPT ablation: LayerNorm after the up layer (Figure 9)")
group.add_argument("--residual", action="store_true", help="EPT ablation: add P1 back (Figure 9)")
group.add_argument("--activation", default="none", choices=tuple(M.ACTIVATIONS), help="EPT ablation: between down and up")
group.add_argument("--depth", type=int, default=1, help="stacked EPT down-up blocks (Table 4: 2)")
group.add_argument("--init", default="uniform", choices=M.INITS, help="prompt init (Table 6)")
group.add_argument("--dropout", type=float, default=None, help="override T5's dropout rate (default: the config's, 0.1)")
# optimisation
group = parser.add_argument_group("optimisation")
group.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 0.3 prompts, 1e-5 ft)")
group.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases/norms)")
group.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps before the linear decay to 0")
group.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clipping (0 = off)")
group.add_argument("--batch-size", type=int, default=16, help="GLOBAL batch (examples per optimizer step, all ranks)")
group.add_argument("--micro-batch-size", type=int, default=None,
                   help="examples per forward pass on one rank; gradient accumulation above it (default: batch/ranks)")
group.add_argument("--max-steps", type=int, default=30000, help="optimizer steps")
group.add_argument("--epochs", type=float, default=None, help="train this many epochs instead of --max-steps (Table 4)")
group.add_argument("--seed", type=int, default=0, help="seeds prompt init, data order, dropout (and random T5 weights)")
group.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
group.add_argument("--compile", action="store_true", help="torch.compile the training forward")
group.add_argument("--group-by-length", action="store_true",
                   help="batch similar lengths together within shuffled mega-batches of 50 batches (changes data order)")
group.add_argument("--pad-to-max-length", action="store_true",
                   help="pad every batch to --max-length as the reference stack does (benchmarks only)")
# evaluation
group = parser.add_argument_group("evaluation")
group.add_argument("--eval-every", type=int, default=1000, help="validate every N steps (and at the last step)")
group.add_argument("--eval-batch-size", type=int, default=64, help="examples per decoding batch")
group.add_argument("--eval-mode", default="generate", choices=("generate", "rank"),
                   help="greedy generation, or rank classification over the label set")
group.add_argument("--no-test", action="store_true", help="skip the final test evaluation")
# output
group = parser.add_argument_group("output")
group.add_argument("--out-dir", default=None, help="run folder (default: runs/{task}_{method}_{model}_s{seed})")
group.add_argument("--save-every", type=int, default=None, help="also write last.pt every N steps (default: --eval-every)")
group.add_argument("--resume", action="store_true", help="continue from out-dir/last.pt")
group.add_argument("--overwrite", action="store_true", help="delete an existing run folder's files first")

RUN_FILES = ("config.json", "log.jsonl", "best.pt", "last.pt", "prompt.pt", "metrics.json")


class NonFiniteError(SystemExit):
    """A NaN/inf loss, gradient or prompt: the run stops (exit status 1) with its best.pt and log intact."""


def setup_distributed():
    """(rank, local_rank, world_size, device) from the torchrun environment; safe to call again."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, local_rank, world_size, device


# --- run folder: lock, files ----------------------------------------------------------------------

def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(out_dir):
    """run.lock created with O_EXCL: one writer per run folder. A lock whose process is gone on this host
    is stale and removed; a lock from another host must be removed by hand (see docs/training.md)."""
    path = out_dir / "run.lock"
    host = socket.gethostname()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner_host, owner_pid = (path.read_text().split() + ["?", "?"])[:2]
            if owner_host == host and owner_pid.isdigit() and not _alive(int(owner_pid)):
                print(f"train: removing stale lock {path} (pid {owner_pid} is gone)")
                path.unlink(missing_ok=True)
                continue
            raise SystemExit(f"train: {out_dir} is being written by {owner_host} pid {owner_pid} ({path}); "
                             f"if that run is dead, delete {path}")
        os.write(fd, f"{host} {os.getpid()}\n".encode())
        os.close(fd)
        return path
    raise SystemExit(f"train: could not take {path}")


def save_checkpoint(path, state):
    """torch.save to a temp file, then os.replace: a checkpoint is whole or absent, even under SIGKILL."""
    tmp = f"{path}.tmp{os.getpid()}"  # per process: DDP ranks may write one data cache at once
    torch.save(state, tmp)
    os.replace(tmp, path)


def rng_state():
    """Every RNG as tensors and plain values (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss], "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trim_log(path, step):
    """On resume: keep the events up to the checkpoint's step; what a killed run logged after it is redone."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    E.write_atomic(path, "".join(line + "\n" for line in keep))


# --- data -----------------------------------------------------------------------------------------

_TOKENIZED = {}  # (file, tokenizer, max_length) -> (source ids, target ids): tokenize each split once


def tokenizer_fingerprint(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else f"{type(tokenizer).__name__} {len(tokenizer)} {tokenizer.name_or_path}"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def tokenize_file(path, tokenizer, max_length):
    """Token ids of a split's sources (truncated on the right, `</s>` appended) and targets, cached in memory
    and in <data>/<task>/cache/ keyed by the file's content, the tokenizer and max_length."""
    path = Path(path)
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:12]
    key = (str(path.resolve()), digest, tokenizer_fingerprint(tokenizer), max_length)
    if key in _TOKENIZED:
        return _TOKENIZED[key]
    cache = path.parent / "cache" / f"{path.stem}.{digest}.{key[2]}.L{max_length}.pt"
    if cache.exists():
        state = torch.load(cache, weights_only=True)
        ids = tuple([t.tolist() for t in torch.split(state[f"{k}_ids"], state[f"{k}_lengths"].tolist())]
                    for k in ("source", "target"))
    else:
        rows = E.read_jsonl(path)
        ids = (E.encode(tokenizer, [r["source"] for r in rows], max_length),
               tokenizer([r["target"] for r in rows])["input_ids"] if rows else [])
        try:  # a read-only data folder just means no disk cache
            cache.parent.mkdir(exist_ok=True)
            save_checkpoint(cache, {f"{k}_{what}": torch.tensor([x for s in seqs for x in s] if what == "ids" else
                                                                 [len(s) for s in seqs], dtype=torch.int32)
                                    for k, seqs in zip(("source", "target"), ids) for what in ("ids", "lengths")})
        except OSError:
            pass
    _TOKENIZED[key] = ids
    return ids


def load_split(path, tokenizer, max_length, limit=None):
    """(examples, source ids, target ids) of one split file, the first `limit` rows."""
    examples = E.read_jsonl(path, limit)
    source_ids, target_ids = tokenize_file(path, tokenizer, max_length)
    return examples, source_ids[:len(examples)], target_ids[:len(examples)]


def epoch_order(n, seed, epoch, batch_size, lengths=None):
    """The example order of one epoch, a pure function of (seed, epoch): a resumed run sees the same data.
    With `lengths`, each shuffled mega-batch of 50 batches is sorted longest first (HF group_by_length)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    if lengths is None:
        return order
    mega = 50 * batch_size
    return np.concatenate([sorted(order[i:i + mega], key=lambda j: -lengths[j]) for i in range(0, n, mega)])


def collate(idx, source_ids, target_ids, pad_id, pad_to=(None, None)):
    """A batch padded to its own longest row (or to `pad_to`); label padding is -100 (no loss)."""
    input_ids, mask = E.pad([source_ids[i] for i in idx], pad_id, pad_to[0])
    labels, _ = E.pad([target_ids[i] for i in idx], -100, pad_to[1])
    return input_ids, mask, labels


def token_nll(model, shift_right, input_ids, mask, labels, amp):
    """Summed cross-entropy over the non-pad target tokens (fp32), so the caller decides the mean."""
    with amp:
        logits = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=shift_right(labels), use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def make_optimizer(params, lr, weight_decay, fused, max_steps, warmup_steps=0):
    """AdamW (weight decay not on biases/norms, as the HF Trainer) and HF's get_linear_schedule_with_warmup:
    linear warm-up over `warmup_steps`, then linear decay to 0 at `max_steps`."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused)

    def lr_lambda(s):
        if s < warmup_steps:
            return s / max(1, warmup_steps)
        return max(0.0, (max_steps - s) / max(1, max_steps - warmup_steps))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

def train_step(model, raw_model, optimizer, scheduler, batch, data, *, amp, device, micro_batch_size,
               pad_to=(None, None), max_grad_norm=1.0, rank=0, world_size=1):
    """One optimizer step on the global `batch` (indices into data = (source ids, target ids, pad id)).

    This rank takes batch[rank::world_size] in micro-batches of `micro_batch_size` (gradient accumulation);
    each micro-batch's summed target NLL is scaled by world_size / (the global batch's target tokens), so
    DDP's average over ranks gives the token-mean loss of the whole batch. Then clipping at `max_grad_norm`
    (0 = off), AdamW and the schedule; a non-finite loss or gradient norm skips the update (the caller
    stops the run). `model` is what runs the forward (raw_model, compiled and/or DDP-wrapped).
    Returns (loss, grad norm, lr of this step, mean prompt row norm mu_t of Eq. 4 or None, padded tokens).
    """
    source_ids, target_ids, pad_id = data
    n_tokens = sum(len(target_ids[i]) for i in batch)  # global target tokens: every rank knows them
    shard = batch[rank::world_size]
    n_micro = math.ceil(math.ceil(len(batch) / world_size) / micro_batch_size)  # the same on every rank
    loss_sum = torch.zeros((), device=device)
    padded = 0
    for micro in range(n_micro):
        idx = shard[micro * micro_batch_size:(micro + 1) * micro_batch_size]
        weight = 1.0 if idx else 0.0  # a rank short of examples still joins DDP's all-reduce
        input_ids, mask, labels = collate(idx or batch[:1], source_ids, target_ids, pad_id, pad_to)
        padded += input_ids.numel() + labels.numel()
        if world_size > 1:
            model.require_backward_grad_sync = micro == n_micro - 1
        nll = token_nll(model, raw_model.t5._shift_right, input_ids.to(device), mask.to(device), labels.to(device),
                        amp) * weight
        (nll * (world_size / n_tokens)).backward()
        loss_sum += nll.detach()
    if world_size > 1:
        dist.all_reduce(loss_sum)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    loss, grad_norm = torch.stack([loss_sum / n_tokens, grad_norm.float()]).tolist()  # one host sync
    lr = scheduler.get_last_lr()[0]
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        prompt = raw_model.prompt()
        prompt_norm = None if prompt is None else prompt.float().norm(dim=1).mean().item()  # Eq. (4)
    return loss, grad_norm, lr, prompt_norm, padded


def set_dropout(t5, rate):
    """T5's dropout rate everywhere: the nn.Dropout modules and the float rate HF's attention keeps."""
    t5.config.dropout_rate = rate
    for module in t5.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = rate
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = rate


def label_token_ids(tokenizer, labels):
    """Token ids of the label words for --init label (the bare '▁' piece of '▁', '0' dropped)."""
    ids = [i for seq in tokenizer(list(labels), add_special_tokens=False)["input_ids"] for i in seq
           if tokenizer.decode([i]).strip()]
    return list(dict.fromkeys(ids))


@torch.no_grad()
def validate(net, tokenizer, meta, examples, source_ids, args, device, dtype, rank, world_size):
    """Every rank decodes a strided shard; predictions are gathered so each rank computes the metrics on
    the whole split (never an average of per-rank scores)."""
    shard = source_ids[rank::world_size]
    preds = E.run_predictions(net, tokenizer, shard, mode=args.eval_mode, labels=meta.get("labels"),
                              max_new_tokens=meta["max_target_length"], max_length=args.max_length,
                              batch_size=args.eval_batch_size, device=device, dtype=dtype)
    if world_size > 1:
        shards = [None] * world_size
        dist.all_gather_object(shards, preds)
        preds = [None] * len(examples)
        for r, part in enumerate(shards):
            preds[r::world_size] = part
    return E.compute_metrics(meta, preds, examples), preds


def main(argv=None):
    args = parser.parse_args(argv)
    if args.max_steps < 1 and args.epochs is None:
        raise SystemExit("train: --max-steps must be at least 1")
    rank, local_rank, world_size, device = setup_distributed()
    master_process = rank == 0
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    say = print if master_process else (lambda *a, **k: None)

    # --- resolve the defaults that depend on other flags
    meta = E.load_meta(args.data_dir, args.task)
    if args.eval_mode == "rank" and not meta.get("labels"):
        raise SystemExit(f"train: --eval-mode rank needs a label set; {args.task} has open targets")
    args.max_length = args.max_length or meta["max_length"]
    args.lr = args.lr if args.lr is not None else (1e-5 if args.method == "ft" else 0.3)  # Appendix B.2
    args.tokenizer = args.tokenizer or args.model
    if args.out_dir is None:
        fewshot = f"_k{args.fewshot_k}fs{args.fewshot_seed}" if args.fewshot_k else ""
        args.out_dir = f"runs/{args.task}{fewshot}_{args.method}_{Path(args.model).name}_s{args.seed}"
    if args.dtype == "auto":
        dtype = "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        dtype_reason = ("CUDA: bf16 autocast (T5 overflows in fp16)" if dtype == "bf16" else
                        "CPU: fp32 (bf16 autocast is slow on CPUs)" if device_type == "cpu" else "GPU without bf16: fp32")
    else:
        dtype, dtype_reason = args.dtype, "--dtype"
    amp = E.autocast(device, dtype)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (trainable prompt, loss) on TF32 cores
        torch.backends.cudnn.allow_tf32 = True

    # --- the run folder: one writer (lock), fresh / resumed / overwritten
    out_dir = Path(args.out_dir)
    lock = None
    if master_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = acquire_lock(out_dir)
    try:
        if master_process:
            existing = [f for f in RUN_FILES if (out_dir / f).exists()]
            if existing and not (args.resume or args.overwrite):
                raise SystemExit(f"train: {out_dir} already holds {', '.join(existing)}; "
                                 "pass --resume to continue it or --overwrite to start over")
            for tmp in out_dir.glob("*.tmp*"):  # half-written files of a killed run (never read)
                tmp.unlink()
            if args.overwrite or (args.resume and not (out_dir / "last.pt").exists()):
                for f in existing:
                    (out_dir / f).unlink()
                shutil.rmtree(out_dir / "eval", ignore_errors=True)
        if world_size > 1:
            dist.barrier()
        resume_path = out_dir / "last.pt" if args.resume and (out_dir / "last.pt").exists() else None
        if args.resume and resume_path is None:
            say(f"train: --resume but no {out_dir}/last.pt: starting from scratch")

        # --- tokenizer, data
        tokenizer = M.load_tokenizer(args.tokenizer)
        probe = tokenizer("the cat sat on the mat")["input_ids"]
        if all(i == tokenizer.unk_token_id for i in probe[:-1]):
            raise SystemExit(f"train: the tokenizer from {args.tokenizer!r} maps plain text to <unk>; pass --tokenizer DIR")
        data = Path(args.data_dir) / args.task
        train_file = data / (f"train_k{args.fewshot_k}_seed{args.fewshot_seed}.jsonl" if args.fewshot_k else "train.jsonl")
        train_examples, train_src, train_tgt = load_split(train_file, tokenizer, args.max_length, args.max_train_examples)
        val_examples, val_src, _ = load_split(data / "validation.jsonl", tokenizer, args.max_length, args.max_eval_examples)
        n_train = len(train_examples)
        if n_train == 0:
            raise SystemExit(f"train: {train_file} is empty")
        lengths = [len(s) + len(t) for s, t in zip(train_src, train_tgt)]  # real tokens per example
        pad_to = (args.max_length, max(meta["max_target_length"], max(map(len, train_tgt)))) if args.pad_to_max_length else (None, None)
        steps_per_epoch = math.ceil(n_train / args.batch_size)  # the last batch of an epoch may be partial
        if args.epochs is not None:
            args.max_steps = max(1, math.ceil(args.epochs * steps_per_epoch))
        per_rank = math.ceil(args.batch_size / world_size)
        micro_batch_size = min(args.micro_batch_size or per_rank, per_rank)
        grad_accum_steps = math.ceil(per_rank / micro_batch_size)  # train_step's micro-batches, for the log

        # --- model: frozen T5 (+ prompt encoder), all seeded
        t5 = M.load_t5(args.model, random_init=args.random_init, seed=args.seed)
        if len(tokenizer) > t5.config.vocab_size:
            raise SystemExit(f"train: tokenizer has {len(tokenizer)} tokens, the model {t5.config.vocab_size}")
        if args.dropout is not None:
            set_dropout(t5, args.dropout)
        fingerprint = E.t5_fingerprint(t5)
        labels = meta.get("labels")
        if args.init == "label" and not labels:
            raise SystemExit(f"train: --init label needs a task with a label set; {args.task} has none")
        torch.manual_seed(args.seed)  # default-initialised layers (Linear, LSTM) are seeded too
        encoder = M.build_prompt_encoder(
            args.method, t5.config.d_model, **E.encoder_kwargs(vars(args)), init=args.init,
            embedding=t5.get_input_embeddings().weight, label_ids=label_token_ids(tokenizer, labels) if labels else None,
            generator=torch.Generator().manual_seed(args.seed))
        raw_model = M.PromptedT5(t5, encoder).to(device)
        raw_model.train()  # T5's dropout stays active though frozen, as under the HF Trainer (REFERENCE §2)
        params = [p for p in raw_model.parameters() if p.requires_grad]
        n_trainable = M.count_trainable(raw_model)
        max_steps = args.max_steps
        optimizer, scheduler = make_optimizer(params, args.lr, args.weight_decay, device_type == "cuda", max_steps,
                                              args.warmup_steps)

        # --- state: fresh or from last.pt
        step, epoch, index, best_score, best_step = 0, 0, 0, -math.inf, None
        rng = None
        if resume_path:
            ckpt = torch.load(resume_path, map_location="cpu", weights_only=True)
            raw_model.load_trainable_state_dict(ckpt["trainable"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            step, epoch, index = ckpt["step"], ckpt["data"]["epoch"], ckpt["data"]["index"]
            best_score, best_step = ckpt["best_score"], ckpt["best_step"]
            rng = ckpt["rng"][rank] if len(ckpt["rng"]) == world_size else None
            if rng is None:
                say(f"train: last.pt was written by {len(ckpt['rng'])} ranks, now {world_size}: RNG reseeded")
        start_step = step

        config = {**vars(args), "world_size": world_size, "device": device, "dtype": dtype, "dtype_reason": dtype_reason,
                  "n_trainable": n_trainable, "t5_fingerprint": fingerprint, "train_file": str(train_file),
                  "train_size": n_train, "validation_size": len(val_examples), "steps_per_epoch": steps_per_epoch,
                  "micro_batch_size": micro_batch_size, "grad_accum_steps": grad_accum_steps,
                  "meta": {k: meta.get(k) for k in ("labels", "metrics", "score", "max_length", "max_target_length")},
                  "torch": torch.__version__}
        log_path = out_dir / "log.jsonl"
        log_file = None
        if master_process:
            old = out_dir / "config.json"
            if resume_path and old.exists():
                before = json.loads(old.read_text())
                changed = {k: (before.get(k), v) for k, v in config.items() if before.get(k) != v and k != "resume"}
                if changed:
                    say(f"train: resuming with changed settings (was, now): {changed}")
            E.write_json(out_dir / "config.json", config)
            if resume_path:
                trim_log(log_path, step)
            log_file = open(log_path, "a", buffering=1)

        def log(event):
            if log_file:
                log_file.write(json.dumps(event) + "\n")

        setup = {"event": "resume" if resume_path else "setup", "step": step, "device": device, "world_size": world_size,
                 "dtype": dtype, "dtype_reason": dtype_reason, "n_trainable": n_trainable, "train_size": n_train,
                 "steps_per_epoch": steps_per_epoch, "max_steps": max_steps, "grad_accum_steps": grad_accum_steps}
        log(setup)
        say(f"train: {args.method} on {args.task}, {n_trainable:,} trainable parameters, {n_train} examples, "
            f"{max_steps} steps, {world_size} rank(s) on {device}, {dtype} ({dtype_reason}) -> {out_dir}")

        # --- wrap for speed / DDP; the dropout RNG stream differs per rank
        model = torch.compile(raw_model) if args.compile else raw_model
        if world_size > 1:
            model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, broadcast_buffers=False)
        if rng is not None:
            set_rng_state(rng)
        else:
            seed = args.seed + rank + 1_000_003 * step  # fresh run: seed + rank
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)

        def checkpoint_state():
            rngs = [rng_state()]
            if world_size > 1:
                rngs = [None] * world_size
                dist.all_gather_object(rngs, rng_state())
            return {"step": step, "trainable": raw_model.trainable_state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rngs, "data": {"epoch": epoch, "index": index},
                    "best_score": best_score, "best_step": best_step, "world_size": world_size}

        # --- the loop: validate/save at the top (so the last step always is), then one optimizer step
        save_every = args.save_every or args.eval_every
        order = epoch_order(n_train, args.seed, epoch, args.batch_size, lengths if args.group_by_length else None)
        timed = {"examples": 0, "tokens": 0, "seconds": 0.0}
        warm_steps = 2 if max_steps - start_step >= 10 else 0
        pbar = tqdm(total=max_steps, initial=step, dynamic_ncols=True, desc=out_dir.name,
                    **({} if master_process else {"disable": True}))  # rank 0 only; TQDM_DISABLE=1 still works
        while True:
            last_step = step == max_steps
            fresh = not (resume_path and step == start_step)  # the resumed step was validated before the kill
            if fresh and step > 0 and (step % args.eval_every == 0 or last_step):
                t0 = time.time()
                metrics, _ = validate(raw_model, tokenizer, meta, val_examples, val_src, args, device, dtype, rank, world_size)
                seconds = time.time() - t0
                log({"event": "eval", "step": step, "split": "validation", **metrics, "eval_time_s": seconds,
                     "eval_examples_per_s": len(val_examples) / max(seconds, 1e-9)})
                pbar.set_postfix(score=f"{metrics['score']:.2f}")
                improved = metrics["score"] > best_score
                if improved:
                    best_score, best_step = metrics["score"], step
                state = checkpoint_state()
                if master_process:
                    if improved:
                        save_checkpoint(out_dir / "best.pt", state)
                    save_checkpoint(out_dir / "last.pt", state)
            elif fresh and step > 0 and step % save_every == 0:
                state = checkpoint_state()
                if master_process:
                    save_checkpoint(out_dir / "last.pt", state)
            if last_step:
                break

            # one optimizer step on the global batch order[index:index+batch_size], sharded rank::world_size
            t0 = time.time()
            batch = order[index:index + args.batch_size].tolist()
            loss, grad_norm, lr, prompt_norm, _ = train_step(
                model, raw_model, optimizer, scheduler, batch, (train_src, train_tgt, tokenizer.pad_token_id),
                amp=amp, device=device, micro_batch_size=micro_batch_size, pad_to=pad_to,
                max_grad_norm=args.max_grad_norm, rank=rank, world_size=world_size)
            step += 1
            index += len(batch)
            if index >= n_train:  # next epoch: a fresh order, a function of (seed, epoch) alone
                epoch, index = epoch + 1, 0
                order = epoch_order(n_train, args.seed, epoch, args.batch_size, lengths if args.group_by_length else None)
            seconds = time.time() - t0
            tokens = sum(lengths[i] for i in batch)
            if step - start_step > warm_steps:  # steady state only: skip the warm-up steps (compile, allocator)
                timed["examples"] += len(batch)
                timed["tokens"] += tokens
                timed["seconds"] += seconds
            log({"event": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "prompt_norm": prompt_norm,
                 "epoch": epoch, "examples_per_s": len(batch) / seconds, "tokens_per_s": tokens / seconds})
            pbar.update(1)
            pbar.set_postfix(loss=f"{loss:.4f}", norm=f"{prompt_norm:.3g}" if prompt_norm is not None else "-")
            bad = [name for name, v in (("loss", loss), ("grad_norm", grad_norm), ("prompt_norm", prompt_norm))
                   if v is not None and not math.isfinite(v)]
            if bad:
                log({"event": "nonfinite", "step": step, "what": bad, "loss": str(loss), "grad_norm": str(grad_norm),
                     "prompt_norm": str(prompt_norm)})
                raise NonFiniteError(f"train: non-finite {' and '.join(bad)} at step {step} (lr {lr:g}); stopped. "
                                     f"best.pt (step {best_step}) and log.jsonl in {out_dir} are intact")
        pbar.close()

        # --- the end: throughput, memory, the best checkpoint folded and scored on test
        if device_type == "cuda":
            peak_mb, peak_kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
        else:
            peak_mb, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"
        throughput = {"train_examples_per_s": timed["examples"] / max(timed["seconds"], 1e-9),
                      "train_tokens_per_s": timed["tokens"] / max(timed["seconds"], 1e-9),
                      "train_time_s": timed["seconds"], "timed_steps": max(0, step - start_step - warm_steps),
                      "peak_memory_mb": peak_mb, "peak_memory_kind": peak_kind}
        if world_size > 1:
            dist.barrier()  # best.pt is complete on disk
        best = torch.load(out_dir / "best.pt", map_location="cpu", weights_only=True)
        raw_model.load_trainable_state_dict(best["trainable"])
        test_metrics = None
        with torch.no_grad():
            prompt = raw_model.prompt()
        if prompt is not None:
            net = M.PromptedT5(raw_model.t5, M.FoldedPrompt(prompt.float()))  # inference needs only P'
            if master_process:
                M.save_folded_prompt(out_dir / "prompt.pt", prompt, {"task": args.task, "method": args.method,
                                                                     "step": best_step, "score": best_score})
        else:
            net = raw_model
        if not args.no_test:
            test_examples, test_src, _ = load_split(data / "test.jsonl", tokenizer, args.max_length, args.max_eval_examples)
            metrics, _ = validate(net, tokenizer, meta, test_examples, test_src, args, device, dtype, rank, world_size)
            test_metrics = {"task": args.task, "split": "test", "mode": args.eval_mode, "checkpoint": "best",
                            "best_step": best_step, "validation_score": best_score, **metrics}
            if master_process:
                E.write_json(out_dir / "metrics.json", test_metrics)
        log({"event": "end", "step": step, **throughput, "best_step": best_step, "best_score": best_score,
             "test_score": test_metrics["score"] if test_metrics else None})
        say(f"train: done. best validation {best_score:.2f} at step {best_step}"
            + (f", test {test_metrics['score']:.2f}" if test_metrics else "")
            + f"; {throughput['train_examples_per_s']:.1f} examples/s, {throughput['train_tokens_per_s']:.0f} tokens/s, "
            f"peak memory {peak_mb:.0f} MiB ({peak_kind})")
        return {"out_dir": str(out_dir), "best_step": best_step, "best_score": best_score, "metrics": test_metrics,
                "throughput": throughput, "config": config, "model": raw_model}
    finally:
        if master_process:
            if "log_file" in locals() and log_file:
                log_file.close()
            if lock:
                lock.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
