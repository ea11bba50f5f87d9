"""A run folder (train.py writes it, later stages read it): locked, checked before anything in it
changes, started, checkpointed, resumed, closed (docs/training.md: "The run folder", "Run lock")."""
import contextlib
import functools
import importlib
import json
import os
import shutil
from pathlib import Path

import torch

import model as M
from ept import cli, files, runtime

FAILED_NAME, LOCK_NAME = "failed.txt", "run.lock"
RUN_FILES = ("config.json", "log.jsonl", "best.pt", "last.pt", "prompt.pt", "metrics.json",
             FAILED_NAME)
# last.pt's keys (train.Run.state), and the options that shape its optimizer and lr schedule
CHECKPOINT_KEYS = ("step", "trainable", "optimizer", "scheduler", "data", "best_score", "best_step")
SCHEDULE_KEYS = ("lr", "weight_decay", "warmup_steps", "max_steps", "batch_size", "max_grad_norm")
OVERWRITE = "--overwrite to start over"
read_log = functools.partial(files.read_jsonl, what="run log", torn_tail_ok=True,
                             fix="repair or delete that line, then --resume again")


def refuse(what, problem, way=OVERWRITE, fault=cli.Failure):
    """A refusal, one sentence: what is wrong with `what` and the way out (nothing written)."""
    raise fault(f"train: {what} {problem}; {way}") from None


def finished(run_dir):
    """The run ended: metrics.json is written, or (with --no-test) its log's last event is 'end'."""
    done, log, config = (Path(run_dir) / f for f in ("metrics.json", "log.jsonl", "config.json"))
    if done.exists() or not (log.exists() and config.exists()):
        return done.exists()
    events, config = read_log(log), files.read_json(config, "run configuration")
    return bool(isinstance(config, dict) and config.get("no_test") and events
                and events[-1].get("event") == "end")


def open_folder(args, out_dir, held, say, packed=False):
    """Lock (into `held`) and check the run folder: last.pt to resume, None, or "finished"."""
    held.append(Lock(files.make_dir(out_dir, "run folder"), say))
    has = [f for f in RUN_FILES if (out_dir / f).exists()]
    if not args.overwrite and (args.resume or packed) and finished(out_dir):
        config = old_config(out_dir) if args.resume else {}  # more steps: refused, its lr is 0
        key = "max_steps" if args.epochs is None and config.get("epochs") is None else "epochs"
        flag, was, now = "--" + key.replace("_", "-"), config.get(key), getattr(args, key)
        if args.resume and now is not None and (was is None or now > was):
            ran, keep = ((f"with {flag} {was:g}", f"keep {flag} {was:g}") if was is not None else
                         (f"without {flag} (--max-steps {config.get('max_steps')})",
                          f"drop {flag}"))
            refuse(out_dir, f"finished {ran}", f"{flag} {now:g} asks for more, but its lr schedule "
                   f"ended at 0 there: {keep}, or --overwrite to train {flag} {now:g} from scratch "
                   "(or another --out-dir)")
        say(f"train: {out_dir} has finished already (see its metrics.json and log.jsonl); "
            + ("skipped" if packed else "nothing to do"))
        close(held.pop())
        return "finished"
    if args.overwrite and has:  # it clears train.py's folders: config.json (intact), or run files
        names, ours = {p.name for p in out_dir.iterdir()}, False
        with contextlib.suppress(cli.Failure):
            ours = ({"task", "method", "n_trainable"} <= set(old_config(out_dir)) if "config.json"
                    in names else names <= {*RUN_FILES, "eval", LOCK_NAME})
        if not ours:
            refuse(out_dir, "is not a run folder written by train.py",
                   "--overwrite deletes only run folders: choose another --out-dir")
    if has and not (args.resume or args.overwrite):
        refuse(out_dir, f"already holds {', '.join(has)}",
               "pass --resume to continue it or --overwrite to start over")
    if args.overwrite or not args.resume or "last.pt" in has:  # start_log deletes what goes
        return out_dir / "last.pt" if args.resume and not args.overwrite else None
    if {"best.pt", "prompt.pt", "metrics.json"} & set(has):
        refuse(out_dir, "has results but no last.pt to resume from", "pass " + OVERWRITE)
    if has:  # killed before its first checkpoint: start_log replaces its files
        say(f"train: --resume, but {out_dir} has no last.pt yet: starting from scratch")


def old_config(out_dir):
    """The run's config.json, refused unless a JSON object."""
    if isinstance(config := files.read_json(out_dir / "config.json", "run configuration"), dict):
        return config
    refuse(out_dir / "config.json", "is valid JSON but not a run configuration (a JSON object)",
           "restore it, or " + OVERWRITE, files.FileFault)


def resume(run, path, ranks):
    """last.pt read whole into `run`, refused unless it fits; a damaged log.jsonl refused too."""
    ckpt, args = files.load_torch(path, fix="pass " + OVERWRITE), run.args
    if missing := set(CHECKPOINT_KEYS) - set(ckpt if isinstance(ckpt, dict) else ()):
        refuse(path, f"is not a training checkpoint (it lacks {', '.join(sorted(missing))})",
               "pass " + OVERWRITE, files.FileFault)
    if ckpt["step"] > args.max_steps:
        refuse(path, f"is at step {ckpt['step']}, past --max-steps {args.max_steps}",
               "resume with the run's own --max-steps, or " + OVERWRITE)
    was = old_config(run.out_dir) if ranks.master and (run.out_dir / "config.json").exists() else {}
    if changed := [f"--{k.replace('_', '-')} {was[k]} (now {getattr(args, k)})"
                   for k in SCHEDULE_KEYS if k in was and was[k] != getattr(args, k)]:
        refuse(run.out_dir, f"was trained with {', '.join(changed)}", "pass the run's own values "
               "(its config.json) to continue its lr schedule, or " + OVERWRITE)
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


def start_log(run, task, ranks, say, **extra):
    """config.json (`extra`: a pack's keys) and log(event); a resumed log cut back to its step."""
    args, out_dir, path = run.args, run.out_dir, run.out_dir / "log.jsonl"
    run.config = dict({k: v for k, v in vars(args).items() if M.applies(k, args.method)},
                      world_size=ranks.world_size, device=ranks.device,
                      n_trainable=M.count_trainable(run.net),
                      t5_fingerprint=runtime.t5_fingerprint(run.net.t5),
                      train_file=str(task.train_file), train_size=len(task.data[0]),
                      validation_size=len(task.val[0]), meta={k: task.meta.get(k) for k in (
                          "labels", "metrics", "score", "max_length", "max_target_length")},
                      torch=torch.__version__, **extra)
    log = open_log(ranks.master and path, args, run.config)
    if ranks.master:
        if run.resumed and path.exists():  # before any file changes: a damaged log stops it
            files.write_jsonl(path, [e for e in read_log(path)
                                     if e.get("step", 0) <= run.step and e.get("event") != "end"])
        gone = [f for f in (*RUN_FILES, "eval/") if (out_dir / f).exists()]
        if args.overwrite and gone:
            say(f"train: --overwrite: deleting {', '.join(gone)} in {out_dir}")
            shutil.rmtree(out_dir / "eval", ignore_errors=True)
        # a fresh start: the old run's files go (open_folder checked them); a resumed one: its last
        # failure; either: the temporary files of a writer killed mid-save (files.write_with)
        for f in [*([FAILED_NAME] if run.resumed else RUN_FILES),
                  *(t.name for n in RUN_FILES for t in out_dir.glob(f".{n}.tmp*"))]:
            (out_dir / f).unlink(missing_ok=True)
        files.write_json(out_dir / "config.json", run.config)
    log({"event": "resume" if run.resumed else "setup", "step": run.step, **{k: run.config[k] for k
         in ("device", "world_size", "dtype", "n_trainable", "train_size", "steps_per_epoch",
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
    try:
        wandb = use["wandb"] and use["wandb"].init(project=args.wandb, name=path.parent.name,
                                                   config=config, dir=str(path.parent))
    except Exception as err:  # wandb's many error types (no login, no network)
        refuse("--wandb", f"could not start a Weights & Biases run ({err!r:.200})",
               "run `wandb login`, or WANDB_MODE=offline")
    tb = use["tensorboard"] and use["tensorboard"].SummaryWriter(
        args.tensorboard or str(path.parent / "tensorboard"))

    def log(event):
        if path:  # a torn last line goes on --resume
            with (files.fault(f"train: cannot write {path}", fix="; free space, then --resume"),
                  open(path, "a", encoding="utf-8") as f):
                f.write(json.dumps(event) + "\n")
        numbers = {f"{event['event']}/{k}": v for k, v in event.items() if k != "step"
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if wandb:
            wandb.log(numbers, step=event.get("step", 0))
        for k, v in numbers.items() if tb else ():
            tb.add_scalar(k, v, event.get("step", 0))
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
    """A Lock, or the lock of a run that left the loop (a Run's `lock`), released once."""
    if lock := getattr(held, "lock", held):
        lock.release()


@contextlib.contextmanager
def cleanup(out_dirs, held, master):
    """`held` closed at the end; (rank 0) the folders made and still empty removed: no trace."""
    made = sorted({f for d in out_dirs for f in (Path(d), *Path(d).parents) if not f.exists()},
                  key=lambda f: -len(f.parts))  # deepest first
    try:
        yield
    finally:
        for item in held:
            close(item)
        for folder in made if master else []:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only an empty folder: a run's files, or another process's, keep it


class Busy(cli.Failure):
    """Another live process holds the run folder."""


class Lock:
    """run_dir/run.lock, flock'ed, saying "<host> <pid> <SLURM unit or ->" (docs/training.md)."""

    def __init__(self, run_dir, say=print):
        self.path, host = Path(run_dir) / LOCK_NAME, os.uname().nodename
        job, task = (os.environ.get(f"SLURM_ARRAY_{k}_ID") for k in ("JOB", "TASK"))
        unit = f"{job}_{task}" if job and task else os.environ.get("SLURM_JOB_ID") or "-"  # stable
        for _ in range(3):
            self.fd, taken = files.flock(self.path, wait=False)
            said = os.pread(self.fd, 4096, 0).decode(errors="replace").split()
            at, pid, its = (said + ["?", "?", "-"])[:3]
            owner = said and f"pid {pid} on {at}" + f" (SLURM job {its})" * (its != "-")
            here = not said or at == host  # same host: the flock decides; another's: a requeue's
            if not (taken and here or not here and its == unit != "-"):
                os.close(self.fd)
                refuse(run_dir, f"is being written by {owner or 'another process'}", "wait for it,"
                       " or, if that process is gone (another host's lock cannot be checked from "
                       f"here), delete {self.path}", Busy)
            if said and self.current():
                say(f"train: {run_dir}: took over the stale lock of {owner}")
            if taken and self.current():  # else a requeue's (a new file), or released meanwhile
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, f"{host} {os.getpid()} {unit}\n".encode(), 0)
                return
            self.release()
        refuse(f"{run_dir}:", f"another process took {self.path} meanwhile", "try again", Busy)

    def current(self):  # the path still names this file (not removed and made again meanwhile)
        with contextlib.suppress(OSError):
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino

    def release(self):  # once; the file removed unless a new taker's by now
        if self.fd is not None:
            with contextlib.suppress(OSError):
                if self.current():
                    self.path.unlink()
            os.close(self.fd)
            self.fd = None
