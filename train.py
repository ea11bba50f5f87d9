"""Train one method on one task: the paper's loop (docs/paper.md, "Training"), CPU, one GPU or many.

Reads data/<task>/ (prepare_data.py; prepared on first use when missing) and a T5 (Hub name or local
folder). Writes the run folder (runs.py): config.json, log.jsonl (every step's loss, lr, grad norm,
prompt norm mu_t of Eq. 4 and throughput; every validation; the end), best.pt and last.pt (trainable
state, optimizer, scheduler, RNG, data position; weights_only-loadable), prompt.pt (the folded P' of
the best checkpoint) and metrics.json (test metrics of the best checkpoint).

    python train.py --method ept                  # EPT on RTE, t5-base: the paper's setting
    torchrun --standalone --nproc_per_node=4 train.py --task boolq --method ept_star   # global batch 16
    python train.py --task rte --method ept --dtype bf16    # bf16 autocast: faster, not the paper's fp32
    python train.py --task rte --method ept --resume        # continue a killed run from its last.pt
    # SIGTERM / SIGUSR1 (preemption, scancel, SLURM's warning signal): last.pt at the next step boundary,
    # then exit 143 / 138 (128 + the signal); --resume continues from there, no step logged twice
    # a pack: 3 x 3 x 2 = 18 prompt runs sharing one T5, one folder each under --out-dir (docs/training.md)
    python train.py --task rte --method pt ept ept_star --seed 0 1 2 --lr 0.3 0.1 --out-dir runs/rte_sweep
    # CPU smoke run: random-weight t5-small from the real config, 30 steps
    python train.py --method ept --model ../shared/data/t5/t5-small --random-init \\
        --tokenizer ../shared/data/t5 --max-steps 30 --eval-every 30 --max-eval-examples 32

Loss: the mean over the non-pad target tokens of the whole global batch, the same whatever the number
of ranks or micro-batches (docs/training.md).
"""
import argparse
import contextlib
import functools
import io
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import model as M
from ept import (
    errors,
    batching,
    cli,
    decoding,
    files,
    metrics,
    multirun,
    options,
    pretrained,
    registry,
    runs,
    runtime,
    signals,
)
from ept.optim import make_optimizer
from ept.runtime import rng_state, seed_everything, set_rng_state

options.parser.description = __doc__  # the flags live in ept/options.py: the drivers plan runs by them

CHECKPOINT_KEYS = {"step", "trainable", "optimizer", "scheduler", "rng", "data", "best_score", "best_step"}


class NonFiniteError(errors.Failure):
    """A NaN/inf loss, gradient, prompt or weight: the run stops (exit status 1) with best.pt and the log intact."""


# --- the run folder ---------------------------------------------------------------------------------

def open_run_folder(out_dir, resume, overwrite, say):
    """Decide what happens to an existing folder; nothing is written or deleted here (start_log does that, after
    every check). Returns the checkpoint to resume from, or None for a fresh start; 'finished' when a resumed
    run has already ended."""
    existing = [f for f in runs.RUN_FILES if (out_dir / f).exists()]
    if overwrite and existing:
        if not runs.is_run_folder(out_dir):
            raise errors.Failure(f"train: {out_dir} is not a run folder written by train.py; --overwrite "
                             "deletes only run folders: choose another --out-dir")
        return None  # start_log deletes them, once every check of every run has passed
    if existing and not resume:
        raise errors.Failure(f"train: {out_dir} already holds {', '.join(existing)}; "
                         "pass --resume to continue it or --overwrite to start over")
    if resume and runs.finished(out_dir):
        return "finished"
    if resume and (out_dir / "last.pt").exists():
        return out_dir / "last.pt"
    if resume and {"best.pt", "prompt.pt", "metrics.json"} & set(existing):
        raise errors.Failure(f"train: {out_dir} has results but no last.pt to resume from; "
                         "pass --overwrite to train it again")
    if resume and existing:  # killed before its first checkpoint: nothing to continue
        say(f"train: --resume, but {out_dir} has no last.pt yet: starting from scratch")  # start_log replaces them
    return None


def refuse_more_steps(out_dir, args):
    """A finished run asked for more training (--resume with a larger --max-steps or --epochs) is refused: its lr
    decayed linearly to 0 at its last step, and training on would need a schedule that is neither the old
    run's nor a fresh run of the new length (docs/training.md, "Resume")."""
    config = files.read_json(out_dir / "config.json", "run configuration")
    config = config if isinstance(config, dict) else {}
    for flag, key in (("--epochs", "epochs"), ("--max-steps", "max_steps")):
        was, now = config.get(key), getattr(args, key)
        if key == "max_steps" and (args.epochs is not None or config.get("epochs") is not None):
            continue  # an epoch count decides the steps
        if now is not None and (was is None or now > was):
            raise errors.Failure(f"train: {out_dir} finished with {flag} {was}; {flag} {now} asks for more, but its lr "
                             f"schedule ended at 0 there: keep {flag} {was}, or --overwrite to train {flag} {now} "
                             "from scratch (or another --out-dir)")


def trim_log(path, step):
    """On resume: keep the events up to the checkpoint's step; what a killed run logged after it is redone
    (a half-written last line included)."""
    if path.exists():
        keep = [e for e in files.read_jsonl(path, what="run log", torn_tail_ok=True,
                                            fix="repair or delete that line, then --resume again")
                if e.get("step", 0) <= step and e.get("event") != "end"]
        files.write_jsonl(path, keep)


def open_log(path, trackers):
    """log(event): one JSON line per event, flushed, and the same event to the optional trackers.
    No path (ranks other than 0): events go nowhere."""
    try:
        f = open(path, "a", buffering=1) if path else None
    except OSError as err:
        raise files.FileFault(f"train: cannot write {path}: {files.why(err)}") from None

    def log(event):
        if f:
            try:
                f.write(json.dumps(event) + "\n")
            except OSError as err:  # a full disk mid-run: one sentence; a torn last line is dropped on --resume
                raise files.FileFault(f"train: cannot write {path}: {files.why(err)}; free space, then "
                                      "--resume") from None
        for track in trackers:
            track(event)

    def close():
        try:
            if f:
                f.close()
        except OSError as err:  # the last buffered line could not be written
            raise files.FileFault(f"train: cannot write {path}: {files.why(err)}") from None
    log.close = close
    return log


def open_trackers(args, out_dir, config):
    """Live curves in TensorBoard and/or Weights & Biases, off unless asked; log.jsonl stays the record.
    Every package is checked and W&B started before TensorBoard writes its file: a failed start leaves none."""
    trackers = []
    numbers = lambda e: {f"{e['event']}/{k}": v for k, v in e.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    if args.tensorboard is not None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise errors.Failure("train: --tensorboard needs the tensorboard package: pip install tensorboard") from None
    if args.wandb is not None:
        try:
            import wandb
        except ImportError:
            raise errors.Failure("train: --wandb needs the wandb package: pip install wandb") from None
        try:
            wandb_run = wandb.init(project=args.wandb, name=out_dir.name, config=config, dir=str(out_dir))
        except Exception as err:  # wandb's many error types (no login, no network), at its one boundary
            raise errors.Failure(f"train: --wandb could not start a Weights & Biases run ({type(err).__name__}: "
                             f"{pretrained._first_line(err)}); run `wandb login`, or WANDB_MODE=offline") from None
        trackers.append(lambda e: wandb_run.log(numbers(e), step=e.get("step", 0)))
    if args.tensorboard is not None:
        writer = SummaryWriter(args.tensorboard or str(out_dir / "tensorboard"))
        trackers.append(lambda e: [writer.add_scalar(k, v, e.get("step", 0)) for k, v in numbers(e).items()])
    return trackers


# --- data ---------------------------------------------------------------------------------------------

def prepare_if_missing(data_dir, task, tokenizer, say, source=None):
    """data/<task>/ prepared on first use by the prepare_data.py stage, run as a command (the Hub, or
    --source DIR): stages link by files on disk."""
    if (Path(data_dir) / task / "meta.json").exists():
        return
    if not registry.known(task):
        raise errors.Failure(f"train: unknown task {task!r} and no {Path(data_dir) / task / 'meta.json'}; "
                             f"tasks: {', '.join(registry.TASKS)}")
    command = ["--tasks", task, "--out", str(data_dir), "--tokenizer", tokenizer, *(["--source", source] if source else [])]
    say(f"train: {Path(data_dir) / task} is not prepared yet; preparing it now (python prepare_data.py "
        f"{' '.join(command)})", flush=True)
    script = Path(__file__).with_name("prepare_data.py")
    if subprocess.run([sys.executable, str(script), *command]).returncode:
        raise errors.Failure(f"train: {Path(data_dir) / task} could not be prepared (prepare_data.py said why above)")


check_split = batching.check_split  # a split file against its meta.json (batching.py)


class TrainData:
    """The training split as token ids; `batch(idx)` is a padded (input ids, mask, labels) batch."""

    def __init__(self, source_ids, target_ids, pad_id):
        self.source_ids, self.target_ids, self.pad_id = source_ids, target_ids, pad_id

    def __len__(self):
        return len(self.source_ids)

    def tokens(self, idx):
        return sum(len(self.target_ids[i]) for i in idx)

    def batch(self, idx):
        return batching.collate(idx, self.source_ids, self.target_ids, self.pad_id)


class DataOrder:
    """Where the loop is in the data: (epoch, index) into an order that is a pure function of (seed, epoch)."""

    def __init__(self, n, seed, batch_size, lengths=None, epoch=0, index=0):
        self.n, self.seed, self.batch_size, self.lengths = n, seed, batch_size, lengths
        self.epoch, self.index = epoch, index
        self.order = batching.epoch_order(n, seed, epoch, batch_size, lengths)

    def next_batch(self):
        batch = self.order[self.index:self.index + self.batch_size].tolist()  # the last one may be partial
        self.index += len(batch)
        if self.index >= self.n:
            self.epoch, self.index = self.epoch + 1, 0
            self.order = batching.epoch_order(self.n, self.seed, self.epoch, self.batch_size, self.lengths)
        return batch

    def state(self):
        return {"epoch": self.epoch, "index": self.index}


# --- one optimizer step -----------------------------------------------------------------------------

def token_nll(model, shift_right, input_ids, mask, labels, amp):
    """Summed cross-entropy over the non-pad target tokens (fp32), so the caller decides the mean."""
    with amp:
        logits = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=shift_right(labels), use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def train_step(model, raw_model, optimizer, scheduler, batch, data, *, amp, device, micro_batch_size,
               max_grad_norm=1.0, rank=0, world_size=1):
    """One optimizer step on the global `batch` (indices into `data`, a TrainData).

    This rank takes batch[rank::world_size] in micro-batches of `micro_batch_size` (gradient accumulation);
    each micro-batch's summed target NLL is scaled by world_size / (the global batch's target tokens), so
    DDP's average over ranks gives the token-mean loss of the whole batch. Then clipping at `max_grad_norm`
    (0 = off), AdamW and the schedule; a non-finite loss or gradient norm skips the update (the caller
    stops the run). `model` runs the forward (raw_model, compiled and/or DDP-wrapped).
    Returns (loss, grad norm, lr of this step, mean prompt row norm mu_t of Eq. 4 or None).
    """
    n_tokens = data.tokens(batch)  # global target tokens: every rank knows them
    shard = batch[rank::world_size]
    n_micro = math.ceil(math.ceil(len(batch) / world_size) / micro_batch_size)  # the same on every rank
    loss_sum = torch.zeros((), device=device)
    for micro in range(n_micro):
        idx = shard[micro * micro_batch_size:(micro + 1) * micro_batch_size]
        weight = 1.0 if idx else 0.0  # a rank short of examples still joins DDP's all-reduce
        input_ids, mask, labels = data.batch(idx or batch[:1])
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
    return loss, grad_norm, lr, prompt_norm


def nonfinite(loss=None, grad_norm=None, prompt_norm=None):
    """The names of the non-finite values among a step's loss, gradient norm and prompt norm."""
    return [name for name, v in (("loss", loss), ("grad_norm", grad_norm), ("prompt_norm", prompt_norm))
            if v is not None and not math.isfinite(v)]


def weights_finite(params):
    """All trainable weights finite (full fine-tuning can blow up with a finite loss): one reduction."""
    return bool(torch.stack([n.float() for n in torch._foreach_norm(params)]).isfinite().all()) if params else True


def set_dropout(t5, rate):
    """T5's dropout rate everywhere: the nn.Dropout modules and the float rate HF's attention keeps."""
    t5.config.dropout_rate = rate
    for module in t5.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = rate
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = rate


@torch.no_grad()
def validate(net, tokenizer, meta, examples, source_ids, ranks, *, mode, batch_size, max_length, dtype):
    """Scores of `net` on a split. Every rank decodes a strided shard; predictions are gathered so each rank
    scores the whole split (never an average of per-rank scores)."""
    preds = decoding.run_predictions(net, tokenizer, source_ids[ranks.rank::ranks.world_size], mode=mode,
                              labels=meta.get("labels"), max_new_tokens=meta["max_target_length"],
                              max_length=max_length, batch_size=batch_size, device=ranks.device, dtype=dtype)
    if ranks.world_size > 1:
        shards = [None] * ranks.world_size
        dist.all_gather_object(shards, preds)
        preds = [None] * len(examples)
        for r, part in enumerate(shards):
            preds[r::ranks.world_size] = part
    return metrics.compute_metrics(meta, preds, examples)


def decode_settings(args):
    """How validation and test decode: the run's eval mode, batch size, input length and precision."""
    return {"mode": args.eval_mode, "batch_size": args.eval_batch_size, "max_length": args.max_length, "dtype": args.dtype}


class Throughput:
    """Examples and tokens per second over the steady-state steps (the first `warm` steps are skipped)."""

    def __init__(self, warm):
        self.warm, self.steps, self.examples, self.tokens, self.seconds = warm, 0, 0, 0, 0.0

    def add(self, examples, tokens, seconds):
        self.steps += 1
        if self.steps > self.warm:
            self.examples, self.tokens, self.seconds = self.examples + examples, self.tokens + tokens, self.seconds + seconds

    def summary(self, device):
        if device.startswith("cuda"):
            peak_mb, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
        else:
            peak_mb, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"
        return {"train_examples_per_s": self.examples / max(self.seconds, 1e-9),
                "train_tokens_per_s": self.tokens / max(self.seconds, 1e-9), "train_time_s": self.seconds,
                "timed_steps": max(0, self.steps - self.warm), "peak_memory_mb": peak_mb, "peak_memory_kind": kind}


# --- the run ------------------------------------------------------------------------------------------

@errors.script
def main(argv=None):
    rank = int(os.environ.get("RANK", 0))
    with contextlib.redirect_stderr(io.StringIO()) if rank else contextlib.nullcontext():
        args = options.parser.parse_args(argv)  # a usage error: rank 0's message only
    runs_file, max_rows = (vars(args).pop(k) for k in options.PACK_OPTIONS)
    rank, local_rank, world_size, device = runtime.setup_distributed()
    ranks = SimpleNamespace(rank=rank, local_rank=local_rank, world_size=world_size, device=device, master=rank == 0)
    say = print if ranks.master else (lambda *a, **k: None)
    first = functools.partial(runtime.master_first, rank=rank, world_size=world_size)
    specs = first(lambda: options.sweep(args, runs_file), everyone=True)
    with signals.stop_on_signals():
        if runs_file is not None or len(specs) > 1:
            return main_pack(args, specs, ranks, say, max_rows)
        args = options.resolve(argparse.Namespace(**{**vars(specs[0]), "out_dir": args.out_dir}))  # what options.sweep() left:
        # an option that does not apply to the method at its default, as in a pack (config.json says what ran)
        args.out_dir = args.out_dir or str(Path("runs") / options.run_name(args))  # one naming rule, solo or pack
        if problem := cli.run_folder_problem(args.out_dir):
            raise errors.Failure(f"train: --out-dir {problem}")
        return main_run(args, ranks, say)


def main_run(args, ranks, say):
    """One run: its folder, task, model and loop. Under torchrun every check runs on rank 0 first
    (runtime.master_first): a failure is one sentence from rank 0, and the other ranks exit 1 without a word."""
    first = functools.partial(runtime.master_first, rank=ranks.rank, world_size=ranks.world_size)

    # --- the run folder: one writer (lock); fresh, resumed or overwritten; nothing written before the checks
    out_dir = Path(args.out_dir)
    created, lock = new_folders(out_dir), None

    def open_folder():
        nonlocal lock
        lock = claim_folder(out_dir, say)
        resume_path = open_run_folder(out_dir, args.resume, args.overwrite, say)
        if resume_path == "finished":
            refuse_more_steps(out_dir, args)
        return resume_path
    try:
        resume_path = first(open_folder)
        if resume_path == "finished":
            say(f"train: {out_dir} has finished already (see its metrics.json and log.jsonl); nothing to do")
            return {"out_dir": str(out_dir), "finished": True}
        task = first(lambda: load_task(args, ranks, say), everyone=True)
        run = first(lambda: build_run(args, task, ranks, resume_path, say), everyone=True)
        log = first(lambda: start_log(args, out_dir, run, task, ranks, resume_path, say), everyone=True)
        try:
            train_loop(args, out_dir, task, run, log, ranks)
            return finish(args, out_dir, task, run, log, ranks, say)
        finally:
            log.close()
    finally:
        if lock:
            lock.release()
            remove_if_empty(created)


def new_folders(out_dir):
    """The folders that creating `out_dir` makes, deepest first (what a failed start takes away again)."""
    return [p for p in (out_dir, *out_dir.parents) if not p.exists()]


def remove_if_empty(folders):
    """A start that failed before writing anything (offline, bad input) leaves no empty folder behind."""
    for folder in folders:
        try:
            folder.rmdir()  # only an empty folder: a run's files, or another process's, keep it
        except OSError:
            return


def claim_folder(out_dir, say):
    """Create the run folder and take its lock (runs.Busy, one sentence, when a live process holds it)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise files.FileFault(f"train: cannot create {out_dir}: {files.why(err)}") from None
    return runs.acquire_lock(out_dir, say)


# --- a pack: several prompt runs on one T5 (multirun.py does the math) --------------------------------


def open_pack_folders(args, specs, say):
    """Each run's folder claimed and checked as a solo run's (open_run_folder): a finished run is skipped, a
    run another live process holds is left out (`args.left_out`); one line each. Returns the runs to train
    (with .lock and .resume_path); the locks taken so far are in `args.pack_locks` for the caller to release.
    --resume, or a run's own "resume": true, resumes the runs that have a last.pt."""
    jobs = []
    for spec in specs:
        out_dir = Path(spec.out_dir)
        try:
            lock = claim_folder(out_dir, say)
        except runs.Busy as err:
            say(f"train: left out of the pack: {err}")
            args.left_out.append(str(out_dir))
            continue
        args.pack_locks.append(lock)
        resume_path = None if args.overwrite or not runs.finished(out_dir) else "finished"
        if resume_path is None:
            resume_path = open_run_folder(out_dir, args.resume or spec.resume, args.overwrite, say)
        if resume_path == "finished" and (args.resume or spec.resume):
            refuse_more_steps(out_dir, spec)
        if resume_path == "finished":
            say(f"train: {out_dir} has finished already (see its metrics.json and log.jsonl); skipped")
            lock.release()
            continue
        jobs.append(SimpleNamespace(args=spec, out_dir=out_dir, lock=lock, resume_path=resume_path))
    return jobs


def main_pack(args, specs, ranks, say, max_rows=None):
    """Several prompt runs at once on one task and one T5: their folders, the shared task and T5, the pack."""
    first = functools.partial(runtime.master_first, rank=ranks.rank, world_size=ranks.world_size)
    specs = first(lambda: options.resolve_pack(args, specs), everyone=True)
    args.pack_locks, args.left_out = [], []
    created = [folder for spec in specs for folder in new_folders(Path(spec.out_dir))]
    try:
        jobs = None

        def open_folders():
            nonlocal jobs
            jobs = open_pack_folders(args, specs, say)
            return [(specs.index(j.args), j.resume_path) for j in jobs]
        kept = first(open_folders)
        if not ranks.master:
            jobs = [SimpleNamespace(args=specs[i], out_dir=Path(specs[i].out_dir), lock=None, resume_path=r)
                    for i, r in kept]
        if not jobs:
            say(f"train: nothing left to train of the {len(specs)} runs")
            result = {"runs": {}, "finished": True}
        else:
            task = first(lambda: load_task(jobs[0].args, ranks, say), everyone=True)
            for job in jobs:
                job.args.max_length = jobs[0].args.max_length
            pack = first(lambda: build_pack(jobs, task, ranks, say, max_rows), everyone=True)
            result = train_pack(jobs, task, pack, ranks, say)
        if args.left_out:  # the pack is not finished: its command must not read as done
            raise runs.Busy(f"train: {len(args.left_out)} run(s) of the pack were left out, held by another "
                            f"process: {' '.join(args.left_out)}; run the same command again once it is done")
        return result
    finally:
        for lock in args.pack_locks:
            lock.release()
        if ranks.master:
            for folder in created:
                remove_if_empty([folder])


def build_pack(jobs, task, ranks, say, max_rows=None):
    """The shared T5 and every run's prompt module, optimizer and schedule (multirun.make_run: built as
    build_run builds a solo run's), fresh or from its own last.pt; each run's config.json and log.jsonl,
    written only once every run's checks have passed (a refusal for one run changes no run's files)."""
    first = jobs[0].args
    t5 = load_frozen_t5(first, task, first.seed).to(ranks.device)
    t5.train()  # T5's dropout stays active though frozen, as in a solo run
    names = [job.out_dir.name for job in jobs]
    for job in jobs:
        a = job.args
        job.steps_per_epoch, job.micro_batch_size, job.grad_accum_steps = batch_plan(a, len(task.data), ranks.world_size)
        job.run = multirun.make_run(
            t5, a.method, seed=a.seed, lr=a.lr, max_steps=a.max_steps, batch_size=a.batch_size,
            micro_batch_size=job.micro_batch_size, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
            max_grad_norm=a.max_grad_norm, group_by_length=a.group_by_length, init=a.init,
            label_ids=label_ids(a, task), name=str(job.out_dir), **M.prompt_options(vars(a)))
        job.raw_model = job.run.prompted(t5)  # what validate, start_log and finish take
        job.rng, job.resumed = None, job.resume_path is not None
        if job.resume_path:
            ckpt = read_checkpoint(job.resume_path, a.max_steps)
            restore(lambda: job.run.load_checkpoint_state(ckpt), job.resume_path, job.run.params)
            job.rng = rank_rng(ckpt, ranks, say)
        job.step = job.run.step
        if job.resume_path and ranks.master:
            check_resume_files(job.out_dir)
    for job in jobs:  # every run checked: only now does any run's folder change
        job.log = start_log(job.args, job.out_dir, job, task, ranks, job.resume_path, say,
                            extra={"pack": {"size": len(jobs), "runs": names}})
    compiled = torch.compile if first.compile else (lambda m: m)
    wrap = compiled
    if ranks.world_size > 1:
        wrap = lambda packed: DDP(compiled(packed), forward_sync_buffers=False,  # noqa: E731
                                  device_ids=[ranks.local_rank] if ranks.device.startswith("cuda") else None)
    return multirun.Pack(t5, [job.run for job in jobs], (task.data.source_ids, task.data.target_ids, task.data.pad_id),
                        device=ranks.device, amp=runtime.set_precision(first.dtype, ranks.device), rank=ranks.rank,
                        world_size=ranks.world_size, max_rows=max_rows, wrap=wrap)


def load_task(args, ranks, say):
    """The task's meta.json, tokenizer, training split (token ids) and validation split, checked. Under torchrun
    rank 0 runs it first (runtime.master_first), so the data is prepared before the other ranks read it."""
    tokenizer = pretrained.load_tokenizer(args.tokenizer, say)
    if ranks.master:
        prepare_if_missing(args.data_dir, args.task, args.tokenizer, say, args.source)
    meta = files.load_meta(args.data_dir, args.task)
    metrics.check_metrics(meta, Path(args.data_dir) / args.task / "meta.json")
    if args.eval_mode == "rank" and not meta.get("labels"):
        raise errors.Failure(f"train: --eval-mode rank needs a label set; {args.task} has open targets")
    args.max_length = args.max_length or meta["max_length"]
    folder = Path(args.data_dir) / args.task
    split = f"k{args.fewshot_k}_seed{args.fewshot_seed}" if args.fewshot_k else "train"
    train_file = folder / (f"train_{split}.jsonl" if args.fewshot_k else "train.jsonl")
    if not train_file.exists():
        raise errors.Failure(f"train: no {train_file}; prepare it with `python prepare_data.py --tasks {args.task} "
                         f"--out {args.data_dir} --overwrite --fewshot {args.fewshot_k} --fewshot-seeds {args.fewshot_seed}`")
    train_examples, train_src, train_tgt = batching.load_split(train_file, tokenizer, args.max_length, args.max_train_examples)
    check_split(meta, split, train_examples, train_file, args.max_train_examples is not None)
    if args.fewshot_k and ranks.master:
        old = [split] if split in registry.old_fewshot_sets(meta) else []
        if warning := registry.old_fewshot_warning(args.data_dir, {args.task: old}):
            say(f"train: {warning}")
    val_examples, val_src, _ = batching.load_split(folder / "validation.jsonl", tokenizer, args.max_length, args.max_eval_examples)
    check_split(meta, "validation", val_examples, folder / "validation.jsonl", args.max_eval_examples is not None)
    if not args.no_test:  # checked now, not after hours of training
        check_split(meta, "test", files.read_jsonl(folder / "test.jsonl", args.max_eval_examples, what="split file"),
                    folder / "test.jsonl", args.max_eval_examples is not None)
    return SimpleNamespace(tokenizer=tokenizer, meta=meta, folder=folder, train_file=train_file,
                           data=TrainData(train_src, train_tgt, tokenizer.pad_token_id),
                           lengths=[len(s) + len(t) for s, t in zip(train_src, train_tgt)],  # real tokens per example
                           val_examples=val_examples, val_src=val_src)


def batch_plan(args, n_train, world_size):
    """(steps per epoch, micro-batch size, accumulation steps) of a run; --epochs becomes args.max_steps."""
    steps_per_epoch = math.ceil(n_train / args.batch_size)  # the last batch of an epoch may be partial
    if args.epochs is not None:
        args.max_steps = math.ceil(args.epochs * steps_per_epoch)
    per_rank = math.ceil(args.batch_size / world_size)
    micro_batch_size = min(args.micro_batch_size or per_rank, per_rank)
    return steps_per_epoch, micro_batch_size, math.ceil(per_rank / micro_batch_size)


def load_frozen_t5(args, task, seed):
    """The T5 (random weights from `seed` with --random-init), checked against the tokenizer, its dropout set."""
    t5 = pretrained.load_t5(args.model, random_init=args.random_init, seed=seed)
    if len(task.tokenizer) > t5.config.vocab_size:
        raise errors.Failure(f"train: the tokenizer has {len(task.tokenizer)} tokens, the model {t5.config.vocab_size}")
    if args.dropout is not None:
        set_dropout(t5, args.dropout)
    return t5


def label_ids(args, task):
    """The label tokens --init label starts from (None without a label set)."""
    labels = task.meta.get("labels")
    if args.init == "label" and not labels:
        raise errors.Failure(f"train: --init label needs a task with a label set; {args.task} has none")
    return batching.label_token_ids(task.tokenizer, labels) if labels else None


def read_checkpoint(resume_path, max_steps):
    """A last.pt read whole and checked (its keys, its step) before anything in the run folder changes."""
    ckpt = files.load_torch(resume_path, fix="pass --overwrite to start over")
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= set(ckpt):
        raise files.FileFault(f"train: {resume_path} is not a training checkpoint (it lacks "
                              f"{', '.join(sorted(CHECKPOINT_KEYS - set(ckpt if isinstance(ckpt, dict) else ())))}); "
                              "pass --overwrite to start over")
    if ckpt["step"] > max_steps:
        raise errors.Failure(f"train: {resume_path} is at step {ckpt['step']}, past --max-steps {max_steps}; "
                         "resume with the same or a larger --max-steps, or --overwrite to start over")
    return ckpt


def restore(load, resume_path, params):
    """load() the checkpoint's trainable state, optimizer and schedule; one sentence when they do not fit."""
    try:
        load()
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise errors.Failure(f"train: {resume_path} holds another model or optimizer than these settings build "
                         f"({type(err).__name__}); resume with the run's own --method and prompt options "
                         f"(its config.json), or --overwrite to start over") from None
    if not weights_finite(params):
        raise errors.Failure(f"train: {resume_path} holds NaN or inf weights; --overwrite to start over")


def build_run(args, task, ranks, resume_path, say):
    """The seeded model (frozen T5 + prompt module), AdamW + schedule and the data order: fresh, or as
    last.pt left them (read whole and checked before anything in the run folder changes)."""
    steps_per_epoch, micro_batch_size, grad_accum_steps = batch_plan(args, len(task.data), ranks.world_size)
    t5 = load_frozen_t5(args, task, args.seed)
    labels = label_ids(args, task)
    torch.manual_seed(args.seed)  # default-initialised layers (Linear, LSTM) are seeded too
    prompt_module = M.build_prompt_module(
        args.method, t5.config.d_model, **M.prompt_options(vars(args)), init=args.init,
        embedding=t5.get_input_embeddings().weight, label_ids=labels,
        generator=torch.Generator().manual_seed(args.seed))
    raw_model = M.PromptedT5(t5, prompt_module).to(ranks.device)
    raw_model.train()  # T5's dropout stays active though frozen, as under the HF Trainer (docs/paper.md)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, args.lr, args.weight_decay, ranks.device.startswith("cuda"),
                                          args.max_steps, args.warmup_steps)
    run = SimpleNamespace(raw_model=raw_model, params=params, optimizer=optimizer, scheduler=scheduler,
                          step=0, best_score=-math.inf, best_step=None, rng=None,
                          order=DataOrder(len(task.data), args.seed, args.batch_size,
                                          task.lengths if args.group_by_length else None),
                          micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
                          steps_per_epoch=steps_per_epoch, resumed=resume_path is not None)
    if resume_path:
        ckpt = read_checkpoint(resume_path, args.max_steps)

        def load():
            raw_model.load_trainable_state_dict(ckpt["trainable"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        restore(load, resume_path, run.params)
        run.step, run.best_score, run.best_step = ckpt["step"], ckpt["best_score"], ckpt["best_step"]
        run.order = DataOrder(len(task.data), args.seed, args.batch_size, run.order.lengths, **ckpt["data"])
        run.rng = rank_rng(ckpt, ranks, say)
    return run


def rank_rng(ckpt, ranks, say):
    """This rank's RNG state in a checkpoint, or None (reseed) when another number of ranks wrote it."""
    if len(ckpt["rng"]) == ranks.world_size:
        return ckpt["rng"][ranks.rank]
    say(f"train: last.pt was written by {len(ckpt['rng'])} ranks, now {ranks.world_size}: RNG reseeded")
    return None


def start_log(args, out_dir, run, task, ranks, resume_path, say, extra=None):
    """config.json (rewritten; `extra`: more keys, a pack's) and log.jsonl (trimmed to the checkpoint on
    resume, then appended)."""
    run.config = {**vars(args), "world_size": ranks.world_size, "device": ranks.device,
                  "n_trainable": M.count_trainable(run.raw_model),
                  "t5_fingerprint": pretrained.t5_fingerprint(run.raw_model.t5), "train_file": str(task.train_file),
                  "train_size": len(task.data), "validation_size": len(task.val_examples),
                  "steps_per_epoch": run.steps_per_epoch, "micro_batch_size": run.micro_batch_size,
                  "grad_accum_steps": run.grad_accum_steps,
                  "meta": {k: task.meta.get(k) for k in ("labels", "metrics", "score", "max_length", "max_target_length")},
                  "torch": torch.__version__, **(extra or {})}
    log = open_log(None, [])
    if ranks.master:
        if resume_path and (out_dir / "config.json").exists():
            before = files.read_json(out_dir / "config.json", "run configuration")
            before = before if isinstance(before, dict) else {}
            changed = {k: (before.get(k), v) for k, v in run.config.items() if before.get(k) != v and k != "resume"}
            if changed:
                say(f"train: resuming with changed settings (was, now): {changed}")
        trackers = open_trackers(args, out_dir, run.config)
        for name in runs.RUN_FILES:  # temporary files of a writer killed mid-save (files.write_with); we hold the lock
            for tmp in out_dir.glob(f".{name}.tmp*"):
                tmp.unlink(missing_ok=True)
        (out_dir / runs.FAILED_NAME).unlink(missing_ok=True)  # started again: its last failure is history
        if resume_path:  # the log first: a damaged one stops the resume before config.json changes
            trim_log(out_dir / "log.jsonl", run.step)
        else:  # a fresh start: the log of a run killed before its first checkpoint goes only now
            clear_run_files(out_dir, args.overwrite, say)
        files.write_json(out_dir / "config.json", run.config)
        log = open_log(out_dir / "log.jsonl", trackers)
    log({"event": "resume" if resume_path else "setup", "step": run.step, "device": ranks.device,
         "world_size": ranks.world_size, "dtype": args.dtype, "n_trainable": run.config["n_trainable"],
         "train_size": len(task.data), "steps_per_epoch": run.steps_per_epoch, "max_steps": args.max_steps,
         "grad_accum_steps": run.grad_accum_steps})
    say(f"train: {args.method} on {args.task}, {run.config['n_trainable']:,} trainable parameters, "
        f"{len(task.data)} examples, {args.max_steps} steps, {ranks.world_size} rank(s) on {ranks.device}, "
        f"{args.dtype} -> {out_dir}")
    return log


def clear_run_files(out_dir, overwrite, say):
    """A fresh start, after every check passed: --overwrite deletes the old run's files (open_run_folder checked
    that train.py wrote them); otherwise only the log of a run killed before its first checkpoint is left."""
    existing = [f for f in runs.RUN_FILES if (out_dir / f).exists()]
    if overwrite and (existing or (out_dir / "eval").exists()):
        say(f"train: --overwrite: deleting {', '.join(existing + ['eval/'] * (out_dir / 'eval').exists())} "
            f"in {out_dir}")
        for f in existing:
            (out_dir / f).unlink()
        shutil.rmtree(out_dir / "eval", ignore_errors=True)
    (out_dir / "log.jsonl").unlink(missing_ok=True)


def check_resume_files(out_dir):
    """What start_log reads of a resumed run (config.json, log.jsonl), read now: a pack refuses a damaged one
    before any of its runs' files change."""
    if (out_dir / "config.json").exists():
        files.read_json(out_dir / "config.json", "run configuration")
    if (out_dir / "log.jsonl").exists():
        files.read_jsonl(out_dir / "log.jsonl", what="run log", torn_tail_ok=True,
                         fix="repair or delete that line, then --resume again")


def top_of_step(args, step, start_step, resumed):
    """What the loop does at the top of `step` before training on: "eval" (validate, then best.pt if
    improved and last.pt), "save" (last.pt) or None. A resumed step was validated before the kill."""
    due = step > start_step or (step > 0 and not resumed)
    if due and (step % args.eval_every == 0 or step == args.max_steps):
        return "eval"
    if due and step % (args.save_every or args.eval_every) == 0:
        return "save"
    return None


def validate_and_log(args, task, net, ranks, log, step):
    """Score `net` on the validation split and log the "eval" event; returns the metrics."""
    t0 = time.time()
    metrics = validate(net, task.tokenizer, task.meta, task.val_examples, task.val_src, ranks, **decode_settings(args))
    seconds = time.time() - t0
    log({"event": "eval", "step": step, "split": "validation", **metrics, "eval_time_s": seconds,
         "eval_examples_per_s": len(task.val_examples) / max(seconds, 1e-9)})
    return metrics


def train_event(step, loss, lr, grad_norm, prompt_norm, epoch, examples, tokens, seconds):
    """The "train" log event of one optimizer step."""
    return {"event": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "prompt_norm": prompt_norm,
            "epoch": epoch, "examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds}


def nonfinite_stop(log, out_dir, step, what, lr, best_step, master=True):
    """Log the "nonfinite" event of a run that must stop and say why in its failed.txt (rank 0; start_log
    removes it when the run starts again); returns the NonFiniteError that says why."""
    log({"event": "nonfinite", "step": step, "what": what})
    kept = (f"best.pt (step {best_step}) and log.jsonl in {out_dir} are intact" if best_step else
            f"no checkpoint was saved; log.jsonl in {out_dir} records it")
    err = NonFiniteError(f"train: non-finite {' and '.join(what)} at step {step} (lr {lr:g}); stopped. {kept}")
    if master:
        files.write_text(out_dir / runs.FAILED_NAME, f"{err}\n")
    return err


def rank_rng_states(ranks):
    """Every rank's RNG state (gathered under DDP), as a checkpoint keeps them."""
    rngs = [rng_state()]
    if ranks.world_size > 1:
        rngs = [None] * ranks.world_size
        dist.all_gather_object(rngs, rng_state())
    return rngs


def train_loop(args, out_dir, task, run, log, ranks):
    """The paper's loop: validate and save at the top (so the last step always is), then one optimizer step."""
    raw_model, optimizer, scheduler, order = run.raw_model, run.optimizer, run.scheduler, run.order
    step, best_score, best_step, start_step = run.step, run.best_score, run.best_step, run.step
    amp = runtime.set_precision(args.dtype, ranks.device)
    model = torch.compile(raw_model) if args.compile else raw_model
    if ranks.world_size > 1:
        # no buffer sync before each forward (T5's buffers never change); the deprecated broadcast_buffers
        # said the same with a FutureWarning
        model = DDP(model, device_ids=[ranks.local_rank] if ranks.device.startswith("cuda") else None,
                    forward_sync_buffers=False)
    if run.rng is not None:  # the dropout stream differs per rank
        set_rng_state(run.rng)
    else:
        seed_everything(args.seed + ranks.rank + 1_000_003 * step)  # fresh run: seed + rank

    def checkpoint(*names):
        if not weights_finite(run.params):  # never a NaN/inf state on disk (full fine-tuning can get there)
            stop(["weights"], scheduler.get_last_lr()[0])
        rngs = rank_rng_states(ranks)
        state = {"step": step, "trainable": raw_model.trainable_state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rngs, "data": order.state(),
                 "best_score": best_score, "best_step": best_step, "world_size": ranks.world_size}
        if ranks.master:
            for name in names:
                files.save_torch(out_dir / name, state)

    def stop(what, lr):  # every rank sees the same all-reduced loss: rank 0 says it
        err = nonfinite_stop(log, out_dir, step, what, lr, best_step, ranks.master)
        raise runtime.quiet_unless_master(err, ranks.rank)

    throughput = Throughput(warm=2 if args.max_steps - start_step >= 10 else 0)
    pbar = tqdm(total=args.max_steps, initial=step, dynamic_ncols=True, desc=out_dir.name,
                **({} if ranks.master else {"disable": True}))  # rank 0 only; TQDM_DISABLE=1 still works
    while True:
        last_step = step == args.max_steps
        due = top_of_step(args, step, start_step, run.resumed)
        if due == "eval":
            if not weights_finite(run.params):
                stop(["weights"], scheduler.get_last_lr()[0])
            metrics = validate_and_log(args, task, raw_model, ranks, log, step)
            pbar.set_postfix(score=f"{metrics['score']:.2f}")
            improved = metrics["score"] > best_score
            if improved:
                best_score, best_step = metrics["score"], step
            checkpoint(*(["best.pt"] if improved else []), "last.pt")
        elif due == "save":
            checkpoint("last.pt")
        if last_step:
            break
        sig = signals.stop_requested(ranks)
        if sig:  # preempted or cancelled: the state of this step boundary, then stop
            checkpoint("last.pt")
            raise signals.stopped(sig, step, out_dir)

        t0 = time.time()
        batch = order.next_batch()
        loss, grad_norm, lr, prompt_norm = train_step(
            model, raw_model, optimizer, scheduler, batch, task.data, amp=amp, device=ranks.device,
            micro_batch_size=run.micro_batch_size, max_grad_norm=args.max_grad_norm,
            rank=ranks.rank, world_size=ranks.world_size)
        step += 1
        seconds, tokens = time.time() - t0, sum(task.lengths[i] for i in batch)
        throughput.add(len(batch), tokens, seconds)
        log(train_event(step, loss, lr, grad_norm, prompt_norm, order.epoch, len(batch), tokens, seconds))
        pbar.update(1)
        pbar.set_postfix(loss=f"{loss:.4f}", norm=f"{prompt_norm:.3g}" if prompt_norm is not None else "-")
        if nonfinite(loss, grad_norm, prompt_norm):
            stop(nonfinite(loss, grad_norm, prompt_norm), lr)
    pbar.close()
    run.step, run.best_score, run.best_step, run.throughput = step, best_score, best_step, throughput.summary(ranks.device)


def train_pack(jobs, task, pack, ranks, say):
    """train_loop for the runs of a pack (a multirun.Pack): at the top of each step every run validates and
    saves as train_loop does (its own --eval-every / --save-every / --max-steps), a run at its last step
    finishes (prompt.pt, metrics.json), then one packed step trains every run still training. A non-finite
    run stops alone (its "nonfinite" event, its lock released); the others go on. Returns {folder: result}."""
    for job in jobs:
        job.start_step = job.run.step
        job.meter = Throughput(warm=2 if job.args.max_steps - job.start_step >= 10 else 0)
    rngs = [job.rng for job in sorted(jobs, key=lambda j: j.run.step) if job.rng is not None]
    if rngs:  # one RNG for the pack (dropout): that of the run furthest behind
        set_rng_state(rngs[0])
    else:
        seed_everything(jobs[0].args.seed + ranks.rank + 1_000_003 * min(job.run.step for job in jobs))
    live, results, faults = list(jobs), {}, []

    def stop(job, what, lr):
        pack.stop(job.run, "nonfinite")
        faults.append(str(nonfinite_stop(job.log, job.out_dir, job.run.step, what, lr, job.run.best_step,
                                         ranks.master)))
        say(faults[-1])
        live.remove(job)
        results[str(job.out_dir)] = {"out_dir": str(job.out_dir), "stopped": "nonfinite"}
        job.log.close()
        if job.lock:
            job.lock.release()

    def checkpoint(job, *names):
        if not weights_finite(job.run.params):
            return stop(job, ["weights"], job.run.scheduler.get_last_lr()[0])
        state = job.run.checkpoint_state(rank_rng_states(ranks), ranks.world_size)
        if ranks.master:
            for name in names:
                files.save_torch(job.out_dir / name, state)

    pbar = tqdm(total=max(job.args.max_steps for job in jobs), initial=min(job.run.step for job in jobs),
                dynamic_ncols=True, desc=f"pack of {len(jobs)}", **({} if ranks.master else {"disable": True}))
    while live:
        for job in list(live):
            run = job.run
            due = top_of_step(job.args, run.step, job.start_step, job.resumed)
            if due == "eval":
                metrics = validate_and_log(job.args, task, job.raw_model, ranks, job.log, run.step)
                improved = metrics["score"] > run.best_score
                if improved:
                    run.best_score, run.best_step = metrics["score"], run.step
                checkpoint(job, *(["best.pt"] if improved else []), "last.pt")
            elif due == "save":
                checkpoint(job, "last.pt")
            if job in live and run.step == job.args.max_steps:
                live.remove(job)
                job.step, job.best_score, job.best_step = run.step, run.best_score, run.best_step
                job.throughput = job.meter.summary(ranks.device)
                try:
                    results[str(job.out_dir)] = finish(job.args, job.out_dir, task, job, job.log, ranks, say)
                finally:
                    job.log.close()
                    if job.lock:
                        job.lock.release()
        if not live:
            break
        sig = signals.stop_requested(ranks)
        if sig:  # preempted or cancelled: every live run's state at this step boundary, then stop
            for job in list(live):  # (a run found non-finite here leaves `live`)
                checkpoint(job, "last.pt")
            for job in live:
                job.log.close()
            folders = " ".join(str(job.out_dir) for job in live)
            raise signals.stopped(sig, min((job.run.step for job in live), default=0), folders)
        t0 = time.time()
        records = pack.step()
        seconds = time.time() - t0
        for job in list(live):
            r = records[job.run.name]
            job.meter.add(r["examples"], r["tokens"], seconds)
            job.log(train_event(r["step"], r["loss"], r["lr"], r["grad_norm"], r["prompt_norm"], r["epoch"],
                                r["examples"], r["tokens"], seconds))
            if r["nonfinite"]:
                stop(job, r["nonfinite"], r["lr"])
        pbar.update(1)
    pbar.close()
    if faults:
        raise runtime.quiet_unless_master(NonFiniteError(
            f"train: {len(faults)} of the {len(jobs)} runs of the pack stopped; the others finished. "
            + " ".join(faults)), ranks.rank)
    return {"runs": results}


def finish(args, out_dir, task, run, log, ranks, say):
    """The end: the best checkpoint folded into P' (prompt.pt) and scored on test (metrics.json)."""
    if ranks.world_size > 1:
        dist.barrier()  # best.pt is complete on disk
    raw_model = run.raw_model
    raw_model.load_trainable_state_dict(files.load_torch(out_dir / "best.pt")["trainable"])
    with torch.no_grad():
        prompt = raw_model.prompt()
    net = raw_model
    if prompt is not None:
        net = M.PromptedT5(raw_model.t5, M.FoldedPrompt(prompt.float()))  # inference needs only P'
        if ranks.master:
            M.save_folded_prompt(out_dir / "prompt.pt", prompt, {"task": args.task, "method": args.method,
                                                                 "step": run.best_step, "score": run.best_score})
    test = None
    if not args.no_test:
        test_file = task.folder / "test.jsonl"
        examples, source_ids, _ = batching.load_split(test_file, task.tokenizer, args.max_length, args.max_eval_examples)
        check_split(task.meta, "test", examples, test_file, args.max_eval_examples is not None)
        metrics = validate(net, task.tokenizer, task.meta, examples, source_ids, ranks, **decode_settings(args))
        test = {"task": args.task, "split": "test", "mode": args.eval_mode, "checkpoint": "best",
                "best_step": run.best_step, "validation_score": run.best_score, **metrics}
        if ranks.master:
            files.write_json(out_dir / "metrics.json", test)
    t = run.throughput
    log({"event": "end", "step": run.step, **t, "best_step": run.best_step, "best_score": run.best_score,
         "test_score": test["score"] if test else None})
    say(f"train: done {out_dir.name}: best validation {run.best_score:.2f} at step {run.best_step}"
        + (f", test {test['score']:.2f}" if test else "")
        + f"; {t['train_examples_per_s']:.1f} examples/s, {t['train_tokens_per_s']:.0f} tokens/s, "
        f"peak memory {t['peak_memory_mb']:.0f} MiB ({t['peak_memory_kind']})")
    return {"out_dir": str(out_dir), "best_step": run.best_step, "best_score": run.best_score, "metrics": test,
            "throughput": t, "config": run.config, "model": raw_model}


if __name__ == "__main__":
    try:
        main()
    except SystemExit:  # a stop or a failure, its sentence printed: a further Ctrl-C while exiting is ignored
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the loop: locks released, files whole
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if int(os.environ.get("RANK", 0)) == 0:
            print("train: interrupted (Ctrl-C); last.pt, if any, is the last checkpoint, whole: run the same command "
                  "with --resume to continue", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:  # also after a failure: every rank stopped at the same point (runtime.master_first)
        if dist.is_initialized():
            dist.destroy_process_group()
