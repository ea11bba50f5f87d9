"""A run folder over its life: claimed (one writer), checked before anything in it changes, started
(config.json, log.jsonl), resumed from last.pt, and left without an empty folder when a start fails.
The files themselves are ept/runs.py's (names, status, lock); train.py calls these in order.
"""
import contextlib
import importlib
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

import model as M
from ept import errors, files, pretrained, runs, runtime

# last.pt / best.pt, as train.Run.state writes them (checked on --resume)
CHECKPOINT_KEYS = ("step", "trainable", "optimizer", "scheduler", "rng", "data", "best_score",
                   "best_step", "world_size")


def open_run_folder(out_dir, resume, overwrite, say):
    """The checkpoint to resume from, None for a fresh start, or 'finished' (resumed, ended).
    Nothing is written or deleted here: start_log does that, after every check."""
    existing = [f for f in runs.RUN_FILES if (out_dir / f).exists()]
    if overwrite and existing:
        if not runs.is_run_folder(out_dir):
            raise errors.Failure(f"train: {out_dir} is not a run folder written by train.py; "
                                 "--overwrite deletes only run folders: choose another --out-dir")
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
    if resume and existing:  # killed before its first checkpoint: start_log replaces its files
        say(f"train: --resume, but {out_dir} has no last.pt yet: starting from scratch")
    return None


def refuse_more_steps(out_dir, args):
    """A finished run asked for more training (--resume with a larger --max-steps or --epochs) is
    refused: its lr decayed linearly to 0 at its last step, and training on would need a schedule
    that is neither the old run's nor a fresh run of the new length (docs/training.md, "Resume")."""
    config = files.read_json(out_dir / "config.json", "run configuration")
    config = config if isinstance(config, dict) else {}
    for flag, key in (("--epochs", "epochs"), ("--max-steps", "max_steps")):
        was, now = config.get(key), getattr(args, key)
        if key == "max_steps" and (args.epochs is not None or config.get("epochs") is not None):
            continue  # an epoch count decides the steps
        if now is not None and (was is None or now > was):
            ran = (f"with {flag} {was:g}" if was is not None else
                   f"without {flag} (--max-steps {config.get('max_steps')})")
            keep = f"keep {flag} {was:g}" if was is not None else f"drop {flag}"
            raise errors.Failure(f"train: {out_dir} finished {ran}; {flag} {now:g} asks for more, "
                                 f"but its lr schedule ended at 0 there: {keep}, or --overwrite to "
                                 f"train {flag} {now:g} from scratch (or another --out-dir)")


def read_log(path):
    """A run's log.jsonl, to resume it: its events (a half-written last line dropped)."""
    return files.read_jsonl(path, what="run log", torn_tail_ok=True,
                            fix="repair or delete that line, then --resume again")


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
            except OSError as err:  # a full disk: one sentence; a torn last line goes on --resume
                raise files.FileFault(f"train: cannot write {path}: {files.why(err)}; free space, "
                                      "then --resume") from None
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
    """Live curves in TensorBoard and/or W&B when asked (log.jsonl stays the record). Both packages
    are checked and W&B started before TensorBoard writes its file: a failed start leaves none."""
    trackers, package = [], {}
    numbers = lambda e: {f"{e['event']}/{k}": v for k, v in e.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    for flag, module in (("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")):
        if getattr(args, flag) is None:
            continue
        try:
            package[flag] = importlib.import_module(module)
        except ImportError:
            raise errors.Failure(f"train: --{flag} needs the {flag} package: "
                                 f"pip install {flag}") from None
    if args.wandb is not None:
        try:
            wandb_run = package["wandb"].init(project=args.wandb, name=out_dir.name, config=config,
                                              dir=str(out_dir))
        # wandb's many error types (no login, no network), at its one boundary
        except Exception as err:
            raise errors.Failure(f"train: --wandb could not start a Weights & Biases run "
                                 f"({type(err).__name__}: {pretrained._first_line(err)}); run "
                                 "`wandb login`, or WANDB_MODE=offline") from None
        trackers.append(lambda e: wandb_run.log(numbers(e), step=e.get("step", 0)))
    if args.tensorboard is not None:
        folder = args.tensorboard or str(out_dir / "tensorboard")
        writer = package["tensorboard"].SummaryWriter(folder)
        trackers.append(lambda e: [writer.add_scalar(k, v, e.get("step", 0))
                                   for k, v in numbers(e).items()])
    return trackers


def weights_finite(params):
    """All trainable weights finite (ft can blow up with a finite loss): one reduction."""
    return (bool(torch.stack([n.float() for n in torch._foreach_norm(params)]).isfinite().all())
            if params else True)


def claim_folder(out_dir, say):
    """Create the run folder and take its lock (runs.Busy when a live process holds it)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise files.FileFault(f"train: cannot create {out_dir}: {files.why(err)}") from None
    return runs.acquire_lock(out_dir, say)


def read_checkpoint(resume_path, max_steps):
    """A last.pt read whole and checked (its keys: CHECKPOINT_KEYS; its step) before the run folder
    changes."""
    ckpt = files.load_torch(resume_path, fix="pass --overwrite to start over")
    missing = set(CHECKPOINT_KEYS) - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise files.FileFault(f"train: {resume_path} is not a training checkpoint (it lacks "
                              f"{', '.join(sorted(missing))}); pass --overwrite to start over")
    if ckpt["step"] > max_steps:
        raise errors.Failure(f"train: {resume_path} is at step {ckpt['step']}, past --max-steps "
                             f"{max_steps}; resume with the run's own --max-steps, or "
                             "--overwrite to start over")
    return ckpt


def resume(run, path, ranks, say):
    """Load last.pt (`path`) into `run` (refused when it does not fit or is not finite), and on rank
    0 read its config.json and log.jsonl now: a damaged one stops a pack before any run's files
    change. run.rng: this rank's RNG state; None (reseed) when another number of ranks wrote it."""
    ckpt = read_checkpoint(path, run.args.max_steps)
    if ranks.master:
        check_schedule(run.out_dir, run.args)
    try:
        run.load_state(ckpt)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise errors.Failure(f"train: {path} holds another model or optimizer than these "
                             f"settings build ({type(err).__name__}); resume with the run's own "
                             "--method and prompt options (its config.json), or --overwrite to "
                             "start over") from None
    if not weights_finite(run.params):
        raise errors.Failure(f"train: {path} holds NaN or inf weights; --overwrite to start over")
    rng = ckpt["rng"][ranks.rank] if len(ckpt["rng"]) == ranks.world_size else None
    if rng is None:
        say(f"train: last.pt was written by {len(ckpt['rng'])} ranks, now {ranks.world_size}: "
            "RNG reseeded")
    if ranks.master and (run.out_dir / "log.jsonl").exists():
        read_log(run.out_dir / "log.jsonl")
    run.rng = rng


# the options that shape last.pt's optimizer and lr schedule: --resume must keep them (issue 28)
SCHEDULE_KEYS = ("lr", "weight_decay", "warmup_steps", "max_steps", "batch_size", "max_grad_norm")


def check_schedule(out_dir, args):
    """--resume continues last.pt's AdamW and lr schedule, so the options that shape them must be
    the run's own (its config.json): another --lr or --max-steps would be recorded but not used."""
    path = out_dir / "config.json"
    if not path.exists():  # killed before it was written
        return
    config = files.read_json(path, "run configuration")
    if not isinstance(config, dict):
        raise files.FileFault(f"train: {path} is valid JSON but not a run configuration (a JSON "
                              "object); restore it, or --overwrite to start over")
    changed = [f"--{k.replace('_', '-')} {config[k]} (now {getattr(args, k)})"
               for k in SCHEDULE_KEYS if k in config and config[k] != getattr(args, k)]
    if changed:
        raise errors.Failure(f"train: {out_dir} was trained with {', '.join(changed)}; --resume "
                             "continues its optimizer and lr schedule, so pass the run's own values "
                             "(its config.json), or --overwrite to start over")


def start_log(run, task, ranks, say, **extra):
    """The run's config.json (`extra`: a pack's keys) and its log(event) on log.jsonl, which on
    resume is trimmed to the checkpoint's step (what a killed run logged after it is redone)."""
    args, out_dir, resumed = run.args, run.out_dir, run.resumed
    own = {k: v for k, v in vars(args).items() if M.applies(k, args.method)}  # EPT: no prompt_length
    run.config = {**own, "world_size": ranks.world_size, "device": ranks.device,
                  "n_trainable": M.count_trainable(run.net),
                  "t5_fingerprint": pretrained.t5_fingerprint(run.net.t5),
                  "train_file": str(task.train_file),
                  "train_size": len(task.data[0]), "validation_size": len(task.val[0]),
                  "meta": {k: task.meta.get(k) for k in ("labels", "metrics", "score",
                                                         "max_length", "max_target_length")},
                  "torch": torch.__version__, **extra}
    log = open_log(None, [])
    if ranks.master:
        if resumed and (out_dir / "config.json").exists():
            before = files.read_json(out_dir / "config.json", "run configuration")
            before = before if isinstance(before, dict) else {}
            changed = {k: (before.get(k), v) for k, v in run.config.items()
                       if before.get(k) != v and k != "resume"}
            if changed:
                say(f"train: resuming with changed settings (was, now): {changed}")
        trackers = open_trackers(args, out_dir, run.config)
        # temporary files of a writer killed mid-save (files.write_with); we hold the lock
        for tmp in [t for name in runs.RUN_FILES for t in out_dir.glob(f".{name}.tmp*")]:
            tmp.unlink(missing_ok=True)
        (out_dir / runs.FAILED_NAME).unlink(missing_ok=True)  # its last failure is history
        log_file = out_dir / "log.jsonl"
        if resumed and log_file.exists():  # before config.json changes: a damaged log stops it
            step, events = run.step, read_log(log_file)
            files.write_jsonl(log_file, [e for e in events
                                         if e.get("step", 0) <= step and e.get("event") != "end"])
        elif not resumed:  # a fresh start: the log of a run killed before its first checkpoint
            clear_run_files(out_dir, args.overwrite, say)  # goes only now
        files.write_json(out_dir / "config.json", run.config)
        log = open_log(log_file, trackers)
    log({"event": "resume" if resumed else "setup", "step": run.step, "device": ranks.device,
         "world_size": ranks.world_size, "dtype": args.dtype,
         "n_trainable": run.config["n_trainable"], "train_size": len(task.data[0]),
         "steps_per_epoch": args.steps_per_epoch, "max_steps": args.max_steps,
         "grad_accum_steps": args.grad_accum_steps})
    say(f"train: {args.method} on {args.task}, {run.config['n_trainable']:,} trainable parameters, "
        f"{len(task.data[0])} examples, {args.max_steps} steps, {ranks.world_size} rank(s) on "
        f"{ranks.device}, {args.dtype} -> {out_dir}")
    return log


def clear_run_files(out_dir, overwrite, say):
    """A fresh start, every check passed: --overwrite deletes the old run's files (open_run_folder
    checked train.py wrote them); else only a log, of a run killed before its first checkpoint."""
    existing = [f for f in runs.RUN_FILES if (out_dir / f).exists()]
    if overwrite and (existing or (out_dir / "eval").exists()):
        say(f"train: --overwrite: deleting "
            f"{', '.join(existing + ['eval/'] * (out_dir / 'eval').exists())} in {out_dir}")
        for f in existing:
            (out_dir / f).unlink()
        shutil.rmtree(out_dir / "eval", ignore_errors=True)
    (out_dir / "log.jsonl").unlink(missing_ok=True)


def save_checkpoint(run, ranks, *names):
    """A run's last.pt / best.pt (rank 0 writes every rank's RNG). The caller has checked the
    weights finite (weights_finite): no NaN/inf state is ever saved."""
    rngs = [runtime.rng_state()]
    if ranks.world_size > 1:
        rngs = [None] * ranks.world_size
        dist.all_gather_object(rngs, runtime.rng_state())
    state = run.state(rngs, ranks.world_size)
    if ranks.master:
        for name in names:
            files.save_torch(run.out_dir / name, state)


def close(held):
    """A run folder's lock (runs.Lock) released, or a run that left the loop: its log closed and its
    lock released (once)."""
    if isinstance(held, runs.Lock):
        held.release()
        return
    if held.log:
        held.log.close()
        held.log = None
    if held.lock:
        held.lock.release()
        held.lock = None


@contextlib.contextmanager
def cleanup(out_dirs, held, master):
    """Every lock and run in `held` closed at the end, and (rank 0) the folders this command created
    that are still empty removed: a start that failed (offline, bad input) leaves nothing behind."""
    created = sorted({f for d in out_dirs for f in (Path(d), *Path(d).parents) if not f.exists()},
                     key=lambda f: -len(f.parts))  # deepest first
    try:
        yield
    finally:
        for item in held:
            close(item)
        for folder in created if master else []:
            try:
                folder.rmdir()  # only an empty folder: a run's files, or another process's, keep it
            except OSError:
                pass

