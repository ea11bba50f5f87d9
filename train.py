"""Train one method on one task: the paper's loop (docs/paper.md, "Training"), CPU, one GPU or many.

Reads data/<task>/ (prepare_data.py; prepared on first use when missing) and a T5 (Hub name or local
folder). Writes the run folder (runs.py): config.json, log.jsonl (every step's loss, lr, grad norm,
prompt norm mu_t of Eq. 4 and throughput; every validation; the end), best.pt and last.pt (trainable
state, optimizer, scheduler, RNG, data position; weights_only-loadable), prompt.pt (the folded P' of
the best checkpoint) and metrics.json (test metrics of the best checkpoint).

    python train.py --method ept                  # EPT on RTE, t5-base: the paper's setting
    # 4 GPUs, global batch 16
    torchrun --standalone --nproc_per_node=4 train.py --task boolq --method ept_star
    python train.py --task rte --method ept --dtype bf16   # bf16 autocast: not the paper's fp32
    python train.py --task rte --method ept --resume        # continue a killed run from its last.pt
    # SIGTERM / SIGUSR1 (preemption, scancel, SLURM's warning): last.pt at the next step boundary,
    # then exit 143 / 138 (128 + the signal); --resume continues from there, no step logged twice
    # a pack: 3 x 3 x 2 = 18 prompt runs sharing one T5, a folder each under --out-dir
    # (docs/training.md)
    python train.py --task rte --method pt ept ept_star --seed 0 1 2 --lr 0.3 0.1 \\
        --out-dir runs/sweep
    # CPU smoke run: random-weight t5-small from the real config, 30 steps
    python train.py --method ept --model ../shared/data/t5/t5-small --random-init \\
        --tokenizer ../shared/data/t5 --max-steps 30 --eval-every 30 --max-eval-examples 32

Loss: the mean over the non-pad target tokens of the whole global batch, the same whatever the
number of ranks or micro-batches (docs/training.md). One run or a pack, the loop is the same: each
run is an ept.multirun.Run (its module, AdamW, schedule, data position), and one ept.multirun.Pack
step trains them all on one frozen T5 (a lone run is a pack of one; `ft` trains T5 itself, always
alone).
"""
import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import model as M
from ept import batching, errors, files, multirun, options  # noqa: I001
from ept import evaluation as decoding, evaluation as metrics, tasks as registry  # eval's rename
from ept import pretrained, runfolder, runs, runtime, signals

# the flags live in ept/options.py: the drivers plan runs by them
options.parser.description = __doc__


class NonFiniteError(errors.Failure):
    """A NaN/inf loss, gradient, prompt or weight: the run stops (exit 1), best.pt and log whole."""


@errors.script
def main(argv=None):
    """Parse; claim and check every run's folder; load the task; build the runs; train them."""
    rank = int(os.environ.get("RANK", 0))
    with contextlib.redirect_stderr(io.StringIO()) if rank else contextlib.nullcontext():
        args = options.parser.parse_args(argv)  # a usage error: rank 0's message only
    runs_file, max_rows = (vars(args).pop(k) for k in options.PACK_OPTIONS)
    ranks = runtime.ranks()  # ranks.first(check): rank 0 first, so a failure is one sentence
    say = print if ranks.master else (lambda *a, **k: None)
    specs = ranks.first(lambda: options.sweep(args, runs_file), everyone=True)
    packed = runs_file is not None or len(specs) > 1
    specs = ranks.first(lambda: options.resolve_runs(args, specs, packed), everyone=True)
    jobs, left_out = [], []
    folders = [s.out_dir for s in specs]
    with signals.stop_on_signals(), runfolder.cleanup(folders, jobs, ranks.master):
        kept = ranks.first(lambda: open_folders(args, specs, packed, jobs, left_out, say))
        if not ranks.master:  # rank 0 claimed the folders; the others learn which runs train
            jobs[:] = [SimpleNamespace(args=specs[i], out_dir=Path(specs[i].out_dir), lock=None,
                                       resume_path=r) for i, r in kept]
        if not jobs and not packed:
            return {"out_dir": specs[0].out_dir, "finished": True}
        results = {}
        if not jobs:
            say(f"train: nothing left to train of the {len(specs)} runs")
        else:
            task = ranks.first(lambda: load_task(jobs[0].args, ranks, say), everyone=True)
            pack = ranks.first(lambda: build(jobs, task, ranks, say, packed, max_rows),
                               everyone=True)
            results = train(jobs, task, pack, ranks, say)
    if left_out:  # the pack is not finished: its command must not read as done
        raise runs.Busy(f"train: {len(left_out)} run(s) of the pack were left out, held by "
                        f"another process: {' '.join(left_out)}; run the same command again "
                        "once it is done")
    if not packed:
        return results[str(jobs[0].out_dir)]
    return {"runs": results, **({} if jobs else {"finished": True})}


# --- the runs: folders, task, model ---------------------------------------------------------------

def open_folders(args, specs, packed, jobs, left_out, say):
    """Each run's folder claimed and checked; the runs to train appended to `jobs`, and their
    (index, resume path) returned. A lone run another live process holds is refused (runs.Busy); a
    pack leaves it out (`left_out`) and skips its finished runs."""
    for i, spec in enumerate(specs):
        out_dir, resume = Path(spec.out_dir), args.resume or spec.resume
        try:
            lock = runfolder.claim_folder(out_dir, say)
        except runs.Busy as err:
            if not packed:
                raise
            say(f"train: left out of the pack: {err}")
            left_out.append(str(out_dir))
            continue
        job = SimpleNamespace(args=spec, out_dir=out_dir, lock=lock, index=i)
        jobs.append(job)
        skip = packed and not args.overwrite and runs.finished(out_dir)
        job.resume_path = ("finished" if skip else
                           runfolder.open_run_folder(out_dir, resume, args.overwrite, say))
        if job.resume_path == "finished":
            if resume:
                runfolder.refuse_more_steps(out_dir, spec)
            say(f"train: {out_dir} has finished already (see its metrics.json and log.jsonl); "
                + ("skipped" if packed else "nothing to do"))
            runfolder.close(jobs.pop())
    return [(job.index, job.resume_path) for job in jobs]


def prepare_if_missing(data_dir, task, tokenizer, say, source=None):
    """data/<task>/ prepared on first use by the prepare_data.py stage, run as a command."""
    folder = Path(data_dir) / task
    if (folder / "meta.json").exists():
        return
    if not registry.known(task):
        raise errors.Failure(f"train: unknown task {task!r} and no {folder / 'meta.json'}; "
                             f"tasks: {', '.join(registry.TASKS)}")
    command = ["--tasks", task, "--out", str(data_dir), "--tokenizer", tokenizer,
               *(["--source", source] if source else [])]
    say(f"train: {folder} is not prepared yet; preparing it now (python prepare_data.py "
        f"{' '.join(command)})", flush=True)
    script = Path(__file__).with_name("prepare_data.py")
    if subprocess.run([sys.executable, str(script), *command]).returncode:
        raise errors.Failure(f"train: {folder} could not be prepared "
                             "(prepare_data.py said why above)")


def load_task(args, ranks, say):
    """The task's meta.json, tokenizer, training split (token ids) and validation split, checked.
    Rank 0 runs it first (ranks.first): the data is prepared before the other ranks read it."""
    tokenizer = pretrained.load_tokenizer(args.tokenizer, say)
    if ranks.master:
        prepare_if_missing(args.data_dir, args.task, args.tokenizer, say, args.source)
    meta = files.load_meta(args.data_dir, args.task)
    metrics.check_metrics(meta, Path(args.data_dir) / args.task / "meta.json")
    if args.eval_mode == "rank" and not meta.get("labels"):
        raise errors.Failure(f"train: --eval-mode rank needs a label set; {args.task} has open "
                             "targets")
    args.max_length = args.max_length or meta["max_length"]
    folder = Path(args.data_dir) / args.task
    split = f"k{args.fewshot_k}_seed{args.fewshot_seed}" if args.fewshot_k else "train"
    train_file = folder / (f"train_{split}.jsonl" if args.fewshot_k else "train.jsonl")
    if not train_file.exists():
        raise errors.Failure(f"train: no {train_file}; prepare it with `" + registry.prepare_command(
            args.data_dir, [args.task], [args.fewshot_k], [args.fewshot_seed], overwrite=True) + "`")
    limit, eval_limit = args.max_train_examples, args.max_eval_examples
    _, train_src, train_tgt = batching.read_split(meta, split, train_file, tokenizer,
                                                  args.max_length, limit)
    if args.fewshot_k and ranks.master:
        old = [split] if split in registry.old_fewshot_sets(meta) else []
        if warning := registry.old_fewshot_warning(args.data_dir, {args.task: old}):
            say(f"train: {warning}")
    val = batching.read_split(meta, "validation", folder / "validation.jsonl", tokenizer,
                              args.max_length, eval_limit)[:2]
    test = None if args.no_test else batching.read_split(  # checked now, not after training
        meta, "test", folder / "test.jsonl", tokenizer, args.max_length, eval_limit)[:2]
    return SimpleNamespace(tokenizer=tokenizer, meta=meta, folder=folder, train_file=train_file,
                           data=(train_src, train_tgt, tokenizer.pad_token_id), val=val, test=test)


def build(jobs, task, ranks, say, packed, max_rows=None):
    """The T5 the runs share and each run (multirun.make_run), fresh or from its last.pt; only once
    every run's checks have passed are their config.json and log.jsonl written (start_log)."""
    first = jobs[0].args
    t5 = pretrained.load_t5(first.model, random_init=first.random_init, seed=first.seed)
    pretrained.check_vocab(task.tokenizer, t5)
    pretrained.set_dropout(t5, first.dropout)
    t5 = t5.to(ranks.device).train()  # dropout on though frozen, as under the HF Trainer (paper.md)
    label_ids = batching.label_ids(task.tokenizer, task.meta.get("labels"))  # for --init label
    for job in jobs:
        a, job.resumed = job.args, job.resume_path is not None
        if a.init == "label" and label_ids is None:
            raise errors.Failure(f"train: --init label needs a task with a label set; {a.task} "
                                 "has none")
        a.max_length = first.max_length
        job.steps_per_epoch, job.micro_batch_size, job.grad_accum_steps = options.batch_plan(
            a, len(task.data[0]), ranks.world_size)
        job.run = multirun.make_run(
            t5, a.method, seed=a.seed, lr=a.lr, max_steps=a.max_steps, batch_size=a.batch_size,
            micro_batch_size=job.micro_batch_size, weight_decay=a.weight_decay, init=a.init,
            warmup_steps=a.warmup_steps, max_grad_norm=a.max_grad_norm, name=str(job.out_dir),
            group_by_length=a.group_by_length, **M.prompt_options(vars(a)),
            label_ids=label_ids)
        job.net = job.run.prompted(t5)  # what validation, start_log and finish take
        job.rng = runfolder.resume(job, ranks, say) if job.resume_path else None
        job.step = job.start_step = job.run.step
        job.meter = runtime.Throughput(warm=2 if a.max_steps - job.start_step >= 10 else 0)
    extra = {"pack": {"size": len(jobs), "runs": [j.out_dir.name for j in jobs]}} if packed else {}
    for job in jobs:  # every run checked: only now does any run's folder change
        job.log = runfolder.start_log(job, task, ranks, say, **extra)

    def wrap(net):  # under DDP no buffer sync before each forward: T5's buffers never change
        net = torch.compile(net) if first.compile else net
        if ranks.world_size == 1:
            return net
        cuda = ranks.device.startswith("cuda")
        return DDP(net, forward_sync_buffers=False, device_ids=[ranks.local_rank] if cuda else None)
    return multirun.Pack(t5, [job.run for job in jobs], task.data, device=ranks.device,
                         amp=runtime.set_precision(first.dtype, ranks.device), rank=ranks.rank,
                         world_size=ranks.world_size, max_rows=max_rows, wrap=wrap)


# --- the loop -------------------------------------------------------------------------------------

def train(jobs, task, pack, ranks, say):
    """The paper's loop for every run of the pack: at the top of each step a run validates and saves
    when due (validate_and_save) and finishes at its last; then one pack step trains the others."""
    restore_rng(jobs, ranks)
    live, results, faults = list(jobs), {}, []
    bar = tqdm(total=max(j.args.max_steps for j in jobs), initial=min(j.run.step for j in jobs),
               desc=jobs[0].out_dir.name if len(jobs) == 1 else f"pack of {len(jobs)}",
               dynamic_ncols=True,  # rank 0 only; TQDM_DISABLE=1 still works
               **({} if ranks.master else {"disable": True}))

    def drop(job, what, lr):  # a non-finite run stops alone
        pack.stop(job.run, "nonfinite")
        faults.append(str(nonfinite_stop(job, what, lr, ranks.master)))
        live.remove(job)
        results[str(job.out_dir)] = {"out_dir": str(job.out_dir), "stopped": "nonfinite"}
        runfolder.close(job)

    while live:
        for job in list(live):
            if not validate_and_save(job, task, ranks, bar):
                drop(job, ["weights"], job.run.scheduler.get_last_lr()[0])
            elif job.run.step == job.args.max_steps:
                live.remove(job)
                results[str(job.out_dir)] = finish(job, task, ranks, say)
                runfolder.close(job)
        if not live:
            break
        if sig := signals.stop_requested(ranks):  # preempted or cancelled: every live run's last.pt
            for job in live:  # never a NaN/inf state on disk
                if runfolder.weights_finite(job.run.params):
                    runfolder.save_checkpoint(job, ranks, "last.pt")
            raise signals.stopped(sig, live)
        t0 = time.time()
        records = pack.step()  # one optimizer step of every live run
        seconds = time.time() - t0
        for job in list(live):
            r = records[job.run.name]
            job.meter.add(r["examples"], r["tokens"], seconds)
            job.log(train_event(r, seconds))
            if r["nonfinite"]:
                drop(job, r["nonfinite"], r["lr"])
        bar.update(1)
        if len(jobs) == 1 and live:
            norm = r["prompt_norm"]
            bar.set_postfix(loss=f"{r['loss']:.4f}", norm="-" if norm is None else f"{norm:.3g}")
    bar.close()
    if faults:  # all-reduced, so every rank meets them: rank 0 says why, the others exit 1 quietly
        head = (f"train: {len(faults)} of the {len(jobs)} runs of the pack stopped; the others "
                "finished. ") if len(jobs) > 1 else ""
        raise NonFiniteError(head + " ".join(faults)) if ranks.master else runtime.PeerStopped()
    return results


def restore_rng(jobs, ranks):
    """One RNG for the pack (dropout): the run furthest behind's, or seed + rank when fresh."""
    rngs = [job.rng for job in sorted(jobs, key=lambda j: j.run.step) if job.rng is not None]
    if rngs:
        runtime.set_rng_state(rngs[0])
    else:
        step = min(j.run.step for j in jobs)
        runtime.seed_everything(jobs[0].args.seed + ranks.rank + 1_000_003 * step)


def validate_and_save(job, task, ranks, bar):
    """The top of a run's step: validate (then best.pt if improved, and last.pt) every --eval-every
    steps and at the last, or save last.pt every --save-every steps; a resumed step was validated
    before the kill. False when the weights are not finite: the run stops (no NaN/inf on disk)."""
    args, run = job.args, job.run
    due = run.step > job.start_step or (run.step > 0 and not job.resumed)
    evaluate = due and (run.step % args.eval_every == 0 or run.step == args.max_steps)
    if not (evaluate or due and run.step % (args.save_every or args.eval_every) == 0):
        return True
    if not runfolder.weights_finite(run.params):
        return False
    improved = False
    if evaluate:
        t0 = time.time()
        scores = decoding.score_split(job.net, task.tokenizer, task.meta, *task.val, ranks,
                                      **decoding.decode_options(args))
        seconds = time.time() - t0
        job.log({"event": "eval", "step": run.step, "split": "validation", **scores,
                 "eval_time_s": seconds,
                 "eval_examples_per_s": len(task.val[0]) / max(seconds, 1e-9)})
        bar.set_postfix(score=f"{scores['score']:.2f}")
        improved = scores["score"] > run.best_score
        if improved:
            run.best_score, run.best_step = scores["score"], run.step
    runfolder.save_checkpoint(job, ranks, *(["best.pt"] if improved else []), "last.pt")
    return True


def train_event(r, seconds):
    """The "train" log event of one optimizer step (r: the run's record of the pack step)."""
    keys = ("step", "loss", "lr", "grad_norm", "prompt_norm", "epoch")
    return {"event": "train", **{k: r[k] for k in keys}, "examples_per_s": r["examples"] / seconds,
            "tokens_per_s": r["tokens"] / seconds,
            **({"ept_s": r["ept_s"]} if r.get("ept_s") is not None else {})}


def nonfinite_stop(job, what, lr, master=True):
    """Log the "nonfinite" event of a run that must stop and say why in its failed.txt (rank 0;
    start_log removes it when the run starts again); returns the NonFiniteError that says why."""
    step, best_step, out_dir = job.run.step, job.run.best_step, job.out_dir
    job.log({"event": "nonfinite", "step": step, "what": what})
    kept = (f"best.pt (step {best_step}) and log.jsonl in {out_dir} are intact" if best_step else
            f"no checkpoint was saved; log.jsonl in {out_dir} records it")
    err = NonFiniteError(f"train: non-finite {' and '.join(what)} at step {step} (lr {lr:g}); "
                         f"stopped. {kept}")
    if master:
        files.write_text(out_dir / runs.FAILED_NAME, f"{err}\n")
    return err


def finish(job, task, ranks, say):
    """The end of a run: best.pt folded into P' (prompt.pt), the test split scored with P' alone."""
    args, out_dir, run, trained = job.args, job.out_dir, job.run, job.net
    t = job.meter.summary(ranks.device)
    if ranks.world_size > 1:
        dist.barrier()  # best.pt is complete on disk
    trained.load_trainable_state_dict(files.load_torch(out_dir / "best.pt")["trainable"])
    with torch.no_grad():
        prompt = trained.prompt()
    net = trained if prompt is None else M.PromptedT5(trained.t5, M.FoldedPrompt(prompt.float()))
    if prompt is not None and ranks.master:
        M.save_folded_prompt(out_dir / "prompt.pt", prompt, {
            "task": args.task, "method": args.method, "step": run.best_step,
            "score": run.best_score})
    test = None
    if not args.no_test:
        scores = decoding.score_split(net, task.tokenizer, task.meta, *task.test, ranks,
                                      **decoding.decode_options(args))
        test = {"task": args.task, "split": "test", "mode": args.eval_mode, "checkpoint": "best",
                "best_step": run.best_step, "validation_score": run.best_score, **scores}
        if ranks.master:
            files.write_json(out_dir / "metrics.json", test)
    job.log({"event": "end", "step": run.step, **t, "best_step": run.best_step,
             "best_score": run.best_score, "test_score": test["score"] if test else None})
    say(f"train: done {out_dir.name}: best validation {run.best_score:.2f} at step {run.best_step}"
        + (f", test {test['score']:.2f}" if test else "")
        + f"; {t['train_examples_per_s']:.1f} examples/s, {t['train_tokens_per_s']:.0f} tokens/s, "
        f"peak memory {t['peak_memory_mb']:.0f} MiB ({t['peak_memory_kind']})")
    return {"out_dir": str(out_dir), "best_step": run.best_step, "best_score": run.best_score,
            "metrics": test, "throughput": t, "config": job.config, "model": trained}


if __name__ == "__main__":
    signals.run(main)  # Ctrl-C outside the loop: exit 130, files whole; the process group ended
