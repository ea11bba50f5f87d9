"""A run folder (train.py writes it, later stages read it): locked, checked before anything in it
changes, started, checkpointed, resumed, closed (docs/training.md: "The run folder", "Run lock")."""
import collections
import contextlib
import importlib
import json
import os
import shutil
import socket
from pathlib import Path

import torch

import model as M
from ept import cli, files, runtime

FAILED_NAME, LOCK_NAME = "failed.txt", "run.lock"
RUN_FILES = ("config.json", "log.jsonl", "best.pt", "last.pt", "prompt.pt", "metrics.json",
             FAILED_NAME)
# train.Run.state's keys, checked on --resume (an older last.pt also has unused "rng", "world_size")
CHECKPOINT_KEYS = ("step", "trainable", "optimizer", "scheduler", "data", "best_score", "best_step")
# the options that shape last.pt's optimizer and lr schedule: --resume must keep them
SCHEDULE_KEYS = ("lr", "weight_decay", "warmup_steps", "max_steps", "batch_size", "max_grad_norm")
OVERWRITE = "--overwrite to start over"


def refuse(what, problem, way=OVERWRITE, fault=cli.Failure):
    """A refusal, one sentence: what is wrong with `what` and the way out (nothing written)."""
    raise fault(f"train: {what} {problem}; {way}") from None


def finished(run_dir):
    """The run ended: metrics.json is written, or (with --no-test) its log's last event is 'end'."""
    done, log, config = (Path(run_dir) / f for f in ("metrics.json", "log.jsonl", "config.json"))
    if done.exists() or not (log.exists() and config.exists()):
        return done.exists()
    events = files.read_jsonl(log, what="run log", torn_tail_ok=True)
    config = files.read_json(config, "run configuration")
    return bool(isinstance(config, dict) and config.get("no_test") and events
                and events[-1].get("event") == "end")


def open_folder(args, out_dir, held, say, packed=False):
    """Lock (into `held`) and check the run folder: last.pt to resume, None, or "finished"."""
    held.append(acquire_lock(files.make_dir(out_dir, "run folder"), say))
    existing = [f for f in RUN_FILES if (out_dir / f).exists()]
    if not args.overwrite and (args.resume or packed) and finished(out_dir):
        config = old_config(out_dir) if args.resume else {}  # more steps: refused, its lr is 0
        key = "max_steps" if args.epochs is None and config.get("epochs") is None else "epochs"
        flag, was, now = "--" + key.replace("_", "-"), config.get(key), getattr(args, key)
        if args.resume and now is not None and (was is None or now > was):
            ran, keep = ((f"with {flag} {was:g}", f"keep {flag} {was:g}") if was is not None else
                         (f"without {flag} (--max-steps {config.get('max_steps')})",
                          f"drop {flag}"))
            refuse(out_dir, f"finished {ran}", f"{flag} {now:g} asks for more, but its lr "
                   f"schedule ended at 0 there: {keep}, or --overwrite to train {flag} {now:g} "
                   "from scratch (or another --out-dir)")
        say(f"train: {out_dir} has finished already (see its metrics.json and log.jsonl); "
            + ("skipped" if packed else "nothing to do"))
        close(held.pop())
        return "finished"
    if args.overwrite and existing and not is_run_folder(out_dir):
        refuse(out_dir, "is not a run folder written by train.py",
               "--overwrite deletes only run folders: choose another --out-dir")
    if existing and not (args.resume or args.overwrite):
        refuse(out_dir, f"already holds {', '.join(existing)}",
               "pass --resume to continue it or --overwrite to start over")
    if args.overwrite or not args.resume:  # start_log deletes what goes, after every check
        return None
    if (out_dir / "last.pt").exists():
        return out_dir / "last.pt"
    if {"best.pt", "prompt.pt", "metrics.json"} & set(existing):
        refuse(out_dir, "has results but no last.pt to resume from",
               "pass --overwrite to train it again")
    if existing:  # killed before its first checkpoint: start_log replaces its files
        say(f"train: --resume, but {out_dir} has no last.pt yet: starting from scratch")
    return None


def is_run_folder(run_dir):
    """True for an empty folder or one train.py wrote (config.json): what --overwrite may clear."""
    if "config.json" not in (names := {p.name for p in Path(run_dir).iterdir()}):
        return names <= {*RUN_FILES, "eval", LOCK_NAME}
    with contextlib.suppress(cli.Failure):
        return {"task", "method", "n_trainable"} <= set(old_config(Path(run_dir)))
    return False


def old_config(out_dir):  # the run's config.json, refused unless a JSON object
    if isinstance(config := files.read_json(out_dir / "config.json", "run configuration"), dict):
        return config
    refuse(out_dir / "config.json", "is valid JSON but not a run configuration (a JSON object)",
           "restore it, or " + OVERWRITE, files.FileFault)


def read_checkpoint(resume_path, max_steps):
    """A last.pt read whole and checked (its keys, its step) before the run folder changes."""
    ckpt = files.load_torch(resume_path, fix="pass " + OVERWRITE)
    if missing := set(CHECKPOINT_KEYS) - set(ckpt if isinstance(ckpt, dict) else ()):
        refuse(resume_path, f"is not a training checkpoint (it lacks {', '.join(sorted(missing))})",
               "pass " + OVERWRITE, files.FileFault)
    if ckpt["step"] > max_steps:
        refuse(resume_path, f"is at step {ckpt['step']}, past --max-steps {max_steps}",
               "resume with the run's own --max-steps, or " + OVERWRITE)
    return ckpt


def resume(run, path, ranks):
    """last.pt into `run`, refused unless it fits; a damaged log stops a pack before any write."""
    ckpt = read_checkpoint(path, run.args.max_steps)
    if ranks.master and (run.out_dir / "config.json").exists():  # start_log compares it
        run.config = config = old_config(run.out_dir)  # its schedule continues: the same options
        if changed := [f"--{k.replace('_', '-')} {config[k]} (now {getattr(run.args, k)})"
                       for k in SCHEDULE_KEYS if k in config and config[k] != getattr(run.args, k)]:
            refuse(run.out_dir, f"was trained with {', '.join(changed)}", "--resume continues its "
                   "optimizer and lr schedule, so pass the run's own values (its config.json), or "
                   + OVERWRITE)
    try:
        run.load_state(ckpt)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        refuse(path, f"holds another model or optimizer than these settings build "
               f"({type(err).__name__})", "resume with the run's own --method and prompt options "
               "(its config.json), or " + OVERWRITE)
    if not weights_finite(run.params):
        refuse(path, "holds NaN or inf weights")
    if ranks.master and (run.out_dir / "log.jsonl").exists():
        read_log(run.out_dir / "log.jsonl")


def read_log(path):  # a run's log.jsonl: its events (a half-written last line dropped)
    return files.read_jsonl(path, what="run log", torn_tail_ok=True,
                            fix="repair or delete that line, then --resume again")


def start_log(run, task, ranks, say, **extra):
    """config.json (`extra`: a pack's keys) and log(event); a resumed log cut back to its step."""
    args, out_dir, resumed, before = run.args, run.out_dir, run.resumed, run.config
    own = {k: v for k, v in vars(args).items() if M.applies(k, args.method)}  # its own only
    run.config = {**own, "world_size": ranks.world_size, "device": ranks.device,
                  "n_trainable": M.count_trainable(run.net),
                  "t5_fingerprint": runtime.t5_fingerprint(run.net.t5),
                  "train_file": str(task.train_file),
                  "train_size": len(task.data[0]), "validation_size": len(task.val[0]),
                  "meta": {k: task.meta.get(k) for k in ("labels", "metrics", "score",
                                                         "max_length", "max_target_length")},
                  "torch": torch.__version__, **extra}
    log = open_log(ranks.master and out_dir / "log.jsonl", args, run.config)
    if ranks.master:
        if before and (changed := {k: (before.get(k), v) for k, v in run.config.items()
                                   if before.get(k) != v and k != "resume"}):
            say(f"train: resuming with changed settings (was, now): {changed}")
        # its last failure is history; temporary files: a writer killed mid-save (write_with)
        for t in [FAILED_NAME, *(t.name for n in RUN_FILES for t in out_dir.glob(f".{n}.tmp*"))]:
            (out_dir / t).unlink(missing_ok=True)
        log_file = out_dir / "log.jsonl"
        if resumed and log_file.exists():  # before config.json changes: a damaged log stops it
            files.write_jsonl(log_file, [e for e in read_log(log_file) if e.get("step", 0)
                                         <= run.step and e.get("event") != "end"])
        elif not resumed:  # --overwrite deletes the old run's files (open_folder checked them)
            gone = [f for f in (*RUN_FILES, "eval/") if (out_dir / f).exists()]
            if args.overwrite and gone:
                say(f"train: --overwrite: deleting {', '.join(gone)} in {out_dir}")
                shutil.rmtree(out_dir / "eval", ignore_errors=True)
            for f in RUN_FILES if args.overwrite else ["log.jsonl"]:  # or killed before last.pt
                (out_dir / f).unlink(missing_ok=True)
        files.write_json(out_dir / "config.json", run.config)
    log({"event": "resume" if resumed else "setup", "step": run.step, **{k: run.config[k] for k in (
        "device", "world_size", "dtype", "n_trainable", "train_size", "steps_per_epoch",
        "max_steps", "grad_accum_steps")}})
    say(f"train: {args.method} on {args.task}, {run.config['n_trainable']:,} trainable parameters, "
        f"{len(task.data[0])} examples, {args.max_steps} steps, {ranks.world_size} rank(s) on "
        f"{ranks.device}, {args.dtype} -> {out_dir}")
    return log


def open_log(path, args, config):
    """log(event): a line on `path` (None: ranks > 0); numbers to W&B (started first), TB."""
    use = {}
    for flag, module in (("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")):
        try:
            use[flag] = path and getattr(args, flag) is not None and importlib.import_module(module)
        except ImportError:
            refuse(f"--{flag}", f"needs the {flag} package", f"pip install {flag}")
    if use["wandb"]:
        try:
            use["wandb"] = use["wandb"].init(project=args.wandb, name=path.parent.name,
                                             config=config, dir=str(path.parent))
        except Exception as err:  # wandb's many error types (no login, no network)
            refuse("--wandb", f"could not start a Weights & Biases run ({type(err).__name__}: "
                   f"{runtime._first_line(err)})", "run `wandb login`, or WANDB_MODE=offline")
    if use["tensorboard"]:
        use["tensorboard"] = use["tensorboard"].SummaryWriter(
            args.tensorboard or str(path.parent / "tensorboard"))

    def log(event):
        if path:  # a torn last line goes on --resume
            with files.fault(f"train: cannot write {path}", fix="; free space, then --resume"):
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(event) + "\n")
        numbers = {f"{event['event']}/{k}": v for k, v in event.items() if k != "step"
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if use["wandb"]:
            use["wandb"].log(numbers, step=event.get("step", 0))
        for k, v in numbers.items() if use["tensorboard"] else ():
            use["tensorboard"].add_scalar(k, v, event.get("step", 0))
    return log


def weights_finite(params):
    """All trainable weights finite (ft can blow up with a finite loss): one reduction."""
    return not params or bool(torch.stack([n.float() for n in torch._foreach_norm(params)])
                              .isfinite().all())


def save_checkpoint(run, ranks, *names):
    """A run's last.pt / best.pt, written by rank 0 (the caller checked weights_finite)."""
    state = ranks.master and run.state()
    for name in names if ranks.master else ():
        files.save_torch(run.out_dir / name, state)


def close(held):
    """A Lock, or the lock of a run that left the loop, released (once)."""
    if lock := held if isinstance(held, Lock) else held.lock:
        lock.release()


@contextlib.contextmanager
def cleanup(out_dirs, held, master):
    """`held` closed at the end; (rank 0) the folders made and still empty removed: no trace."""
    created = sorted({f for d in out_dirs for f in (Path(d), *Path(d).parents) if not f.exists()},
                     key=lambda f: -len(f.parts))  # deepest first
    try:
        yield
    finally:
        for item in held:
            close(item)
        for folder in created if master else []:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only an empty folder: a run's files, or another process's, keep it


# --- the run lock: run.lock, flock'ed while its writer lives, says "<host> <pid> <SLURM unit or ->"
# (docs/training.md, "Run lock": another host's, and a SLURM requeue's)

class Busy(cli.Failure):
    """Another live process holds the run folder."""


class Owner(collections.namedtuple("Owner", "host pid job")):
    def __str__(self):
        return f"pid {self.pid} on {self.host}" + f" (SLURM job {self.job})" * (self.job != "-")


def read_owner(path):
    """What run.lock says (an Owner), or None: no lock, or an empty one."""
    with contextlib.suppress(FileNotFoundError):
        said = Path(path).read_text(encoding="utf-8", errors="replace").split()
        return Owner(*(said + ["?", "?", "-"])[:3]) if said else None


class Lock:
    """run.lock opened (`fd`), flock'ed if free (`taken`); release() removes it, lets go (once)."""

    def __init__(self, path):
        self.path, (self.fd, self.taken) = path, files.flock(path, wait=False)

    def current(self):  # the path still names this file (not removed and made again meanwhile)
        with contextlib.suppress(OSError):
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        return False

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                if self.current():
                    self.path.unlink()
            os.close(self.fd)
            self.fd = None


def acquire_lock(run_dir, say=print):
    """run_dir/run.lock taken (a stale one said); Busy if a live process or another host has it."""
    path = Path(run_dir) / LOCK_NAME
    job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    unit = f"{job}_{task}" if job and task else os.environ.get("SLURM_JOB_ID") or "-"  # stable
    me = Owner(socket.gethostname(), str(os.getpid()), unit)
    for _ in range(3):
        lock, owner = Lock(path), read_owner(path)
        here = owner is None or owner.host == me.host  # another host's lock: not ours to judge
        if not (lock.taken and here or not here and owner.job == me.job != "-"):  # a requeue's
            os.close(lock.fd)
            refuse(run_dir, f"is being written by {owner or 'another process'}", "wait for it, or, "
                   "if that process is gone (another host's lock cannot be checked from here), "
                   f"delete {path}", Busy)
        if owner is not None and lock.current():
            say(f"train: {run_dir}: took over the stale lock of {owner}")
        if not lock.taken or not lock.current():  # a requeue: a new file; or released meanwhile
            lock.release()
            continue
        os.ftruncate(lock.fd, 0)
        os.pwrite(lock.fd, f"{' '.join(me)}\n".encode(), 0)
        return lock
    refuse(f"{run_dir}:", f"another process took {path} meanwhile", "try again", Busy)
