"""A run folder (train.py writes it, every later stage reads it): its files and status; its lock
(one writer); claimed and checked before anything in it changes, started (config.json, log.jsonl),
checkpointed, resumed, and removed again when a start failed and left it empty. docs/training.md
lists the files ("The run folder") and the lock's rules ("Run lock").
"""
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
CONFIG_KEYS = ("task", "method", "model", "tokenizer", "random_init", "seed", "data_dir",
               "max_length", "meta")
# train.Run.state's keys, checked on --resume (an older last.pt also has unused "rng", "world_size")
CHECKPOINT_KEYS = ("step", "trainable", "optimizer", "scheduler", "data", "best_score", "best_step")
# the options that shape last.pt's optimizer and lr schedule: --resume must keep them (issue 28)
SCHEDULE_KEYS = ("lr", "weight_decay", "warmup_steps", "max_steps", "batch_size", "max_grad_norm")


# --- what the later stages read ------------------------------------------------------------------


def finished(run_dir):
    """The run ended: metrics.json is written, or (with --no-test) its log's last event is 'end'."""
    run_dir = Path(run_dir)
    if (run_dir / "metrics.json").exists():
        return True
    if not (run_dir / "log.jsonl").exists() or not (run_dir / "config.json").exists():
        return False
    events = files.read_jsonl(run_dir / "log.jsonl", what="run log", torn_tail_ok=True)
    config = files.read_json(run_dir / "config.json", "run configuration")
    no_test = isinstance(config, dict) and config.get("no_test")
    return bool(no_test and events and events[-1].get("event") == "end")


# --- claim and check (nothing written), start, checkpoint, resume, close ------------------------

def open_folder(args, out_dir, held, say, packed=False):
    """Create and lock the run folder (the lock appended to `held`) and check it: the last.pt to
    resume from, None for a fresh start, or "finished" (the lock then released)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise files.FileFault(f"train: cannot create {out_dir}: {files.why(err)}") from None
    held.append(acquire_lock(out_dir, say))
    finish = packed and not args.overwrite and finished(out_dir)
    path = "finished" if finish else check_folder(out_dir, args.resume, args.overwrite, say)
    if path == "finished":
        if args.resume:
            refuse_more_steps(out_dir, args)
        say(f"train: {out_dir} has finished already (see its metrics.json and log.jsonl); "
            + ("skipped" if packed else "nothing to do"))
        close(held.pop())
    return path


def check_folder(out_dir, resume, overwrite, say):
    """open_folder's verdict on the files there; start_log deletes what goes, after every check."""
    existing = [f for f in RUN_FILES if (out_dir / f).exists()]
    if overwrite and existing:
        if not is_run_folder(out_dir):
            raise cli.Failure(f"train: {out_dir} is not a run folder written by train.py; "
                              "--overwrite deletes only run folders: choose another --out-dir")
        return None
    if existing and not resume:
        raise cli.Failure(f"train: {out_dir} already holds {', '.join(existing)}; "
                          "pass --resume to continue it or --overwrite to start over")
    if resume and finished(out_dir):
        return "finished"
    if resume and (out_dir / "last.pt").exists():
        return out_dir / "last.pt"
    if resume and {"best.pt", "prompt.pt", "metrics.json"} & set(existing):
        raise cli.Failure(f"train: {out_dir} has results but no last.pt to resume from; "
                          "pass --overwrite to train it again")
    if resume and existing:  # killed before its first checkpoint: start_log replaces its files
        say(f"train: --resume, but {out_dir} has no last.pt yet: starting from scratch")
    return None


def is_run_folder(run_dir):
    """True for an empty folder or one train.py wrote (config.json): what --overwrite may clear."""
    config = Path(run_dir) / "config.json"
    if not config.exists():
        return not any(p.name not in (*RUN_FILES, "eval")
                       and not p.name.lstrip(".").startswith(LOCK_NAME)
                       for p in Path(run_dir).iterdir())
    try:
        keys = files.read_json(config)
    except cli.Failure:
        return False
    return isinstance(keys, dict) and {"task", "method", "n_trainable"} <= set(keys)


def old_config(out_dir):  # the run's config.json, refused unless a JSON object
    config = files.read_json(out_dir / "config.json", "run configuration")
    if not isinstance(config, dict):
        raise files.FileFault(f"train: {out_dir / 'config.json'} is valid JSON but not a run "
                              "configuration (a JSON object); restore it, or --overwrite to start "
                              "over")
    return config


def refuse_more_steps(out_dir, args):
    """A finished run asked for more training (--resume with a larger --max-steps or --epochs) is
    refused: its lr decayed linearly to 0 at its last step, and training on would need a schedule
    that is neither the old run's nor a fresh run of the new length (docs/training.md, "Resume")."""
    config = old_config(out_dir)
    for flag, key in (("--epochs", "epochs"), ("--max-steps", "max_steps")):
        was, now = config.get(key), getattr(args, key)
        if key == "max_steps" and (args.epochs is not None or config.get("epochs") is not None):
            continue  # an epoch count decides the steps
        if now is not None and (was is None or now > was):
            ran = (f"with {flag} {was:g}" if was is not None else
                   f"without {flag} (--max-steps {config.get('max_steps')})")
            keep = f"keep {flag} {was:g}" if was is not None else f"drop {flag}"
            raise cli.Failure(f"train: {out_dir} finished {ran}; {flag} {now:g} asks for more, "
                              f"but its lr schedule ended at 0 there: {keep}, or --overwrite to "
                              f"train {flag} {now:g} from scratch (or another --out-dir)")


def read_checkpoint(resume_path, max_steps):
    """A last.pt read whole and checked (its keys, its step) before the run folder changes."""
    ckpt = files.load_torch(resume_path, fix="pass --overwrite to start over")
    missing = set(CHECKPOINT_KEYS) - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise files.FileFault(f"train: {resume_path} is not a training checkpoint (it lacks "
                              f"{', '.join(sorted(missing))}); pass --overwrite to start over")
    if ckpt["step"] > max_steps:
        raise cli.Failure(f"train: {resume_path} is at step {ckpt['step']}, past --max-steps "
                          f"{max_steps}; resume with the run's own --max-steps, or "
                          "--overwrite to start over")
    return ckpt


def resume(run, path, ranks):
    """Load last.pt (`path`) into `run`, refused when it does not fit or is not finite; rank 0 reads
    config.json and log.jsonl now: a damaged one stops a pack before any run's files change."""
    ckpt = read_checkpoint(path, run.args.max_steps)
    if ranks.master:  # start_log compares the config.json read here with the new one
        run.config = check_schedule(run.out_dir, run.args)
    try:
        run.load_state(ckpt)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise cli.Failure(f"train: {path} holds another model or optimizer than these "
                          f"settings build ({type(err).__name__}); resume with the run's own "
                          "--method and prompt options (its config.json), or --overwrite to "
                          "start over") from None
    if not weights_finite(run.params):
        raise cli.Failure(f"train: {path} holds NaN or inf weights; --overwrite to start over")
    if ranks.master and (run.out_dir / "log.jsonl").exists():
        read_log(run.out_dir / "log.jsonl")


def check_schedule(out_dir, args):
    """--resume continues last.pt's AdamW and lr schedule: the options that shape them must be the
    run's own (its config.json), or another --lr would be recorded but not used. Returns it."""
    if not (out_dir / "config.json").exists():  # killed before it was written
        return None
    config = old_config(out_dir)
    changed = [f"--{k.replace('_', '-')} {config[k]} (now {getattr(args, k)})"
               for k in SCHEDULE_KEYS if k in config and config[k] != getattr(args, k)]
    if changed:
        raise cli.Failure(f"train: {out_dir} was trained with {', '.join(changed)}; --resume "
                          "continues its optimizer and lr schedule, so pass the run's own values "
                          "(its config.json), or --overwrite to start over")
    return config


def read_log(path):
    """A run's log.jsonl to resume: its events (a half-written last line dropped)."""
    return files.read_jsonl(path, what="run log", torn_tail_ok=True,
                            fix="repair or delete that line, then --resume again")


def start_log(run, task, ranks, say, **extra):
    """Every check passed: the run's config.json (`extra`: a pack's keys) and its log(event) on
    log.jsonl, which on resume is cut back to the checkpoint's step (what came after is redone)."""
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
    log = Log(None, [])
    if ranks.master:
        if resumed and before is not None:  # resume read it
            changed = {k: (before.get(k), v) for k, v in run.config.items()
                       if before.get(k) != v and k != "resume"}
            if changed:
                say(f"train: resuming with changed settings (was, now): {changed}")
        trackers = open_trackers(args, out_dir, run.config)
        # temporary files of a writer killed mid-save (files.write_with); we hold the lock
        for tmp in [t for name in RUN_FILES for t in out_dir.glob(f".{name}.tmp*")]:
            tmp.unlink(missing_ok=True)
        (out_dir / FAILED_NAME).unlink(missing_ok=True)  # its last failure is history
        log_file = out_dir / "log.jsonl"
        if resumed and log_file.exists():  # before config.json changes: a damaged log stops it
            files.write_jsonl(log_file, [e for e in read_log(log_file) if e.get("step", 0)
                                         <= run.step and e.get("event") != "end"])
        elif not resumed:
            clear_run_files(out_dir, args.overwrite, say)
        files.write_json(out_dir / "config.json", run.config)
        log = Log(log_file, trackers)
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
    """A fresh start: --overwrite deletes the old run's files (check_folder checked train.py wrote
    them); else only the log of a run killed before its first checkpoint goes."""
    existing = [f for f in RUN_FILES if (out_dir / f).exists()]
    if overwrite and (gone := existing + ["eval/"] * (out_dir / "eval").exists()):
        say(f"train: --overwrite: deleting {', '.join(gone)} in {out_dir}")
        for f in existing:
            (out_dir / f).unlink()
        shutil.rmtree(out_dir / "eval", ignore_errors=True)
    (out_dir / "log.jsonl").unlink(missing_ok=True)


class Log:
    """log(event): one JSON line per event on `path`, flushed, and the event to each tracker. No
    path (ranks other than 0): events go nowhere. A full disk is one sentence."""

    def __init__(self, path, trackers):
        self.path, self.trackers = path, trackers
        try:
            self.file = open(path, "a", buffering=1) if path else None
        except OSError as err:
            raise files.FileFault(f"train: cannot write {path}: {files.why(err)}") from None

    def __call__(self, event):
        try:
            if self.file:
                self.file.write(json.dumps(event) + "\n")
        except OSError as err:  # a torn last line goes on --resume
            raise files.FileFault(f"train: cannot write {self.path}: {files.why(err)}; free "
                                  "space, then --resume") from None
        for track in self.trackers:
            track(event)

    def close(self):
        try:
            if self.file:
                self.file.close()
        except OSError as err:  # the last buffered line could not be written
            raise files.FileFault(f"train: cannot write {self.path}: {files.why(err)}") from None


def open_trackers(args, out_dir, config):
    """Live curves in TensorBoard and/or W&B when asked (log.jsonl stays the record). Both packages
    are checked and W&B started before TensorBoard writes its file: a failed start leaves none."""
    trackers, package = [], {}
    numbers = lambda e: {f"{e['event']}/{k}": v for k, v in e.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    for flag, module in (("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")):
        try:
            if getattr(args, flag) is not None:
                package[flag] = importlib.import_module(module)
        except ImportError:
            raise cli.Failure(f"train: --{flag} needs the {flag} package: "
                              f"pip install {flag}") from None
    if args.wandb is not None:
        try:
            wandb_run = package["wandb"].init(project=args.wandb, name=out_dir.name, config=config,
                                              dir=str(out_dir))
        except Exception as err:  # wandb's many error types (no login, no network)
            raise cli.Failure(f"train: --wandb could not start a Weights & Biases run "
                              f"({type(err).__name__}: {runtime._first_line(err)}); run "
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


def save_checkpoint(run, ranks, *names):
    """A run's last.pt / best.pt, written by rank 0 (the caller checked weights_finite)."""
    if ranks.master:
        state = run.state()
        for name in names:
            files.save_torch(run.out_dir / name, state)


def close(held):
    """A Lock released, or a run that left the loop: its log closed and lock released (once)."""
    if isinstance(held, Lock):
        return held.release()
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
            with contextlib.suppress(OSError):
                folder.rmdir()  # only an empty folder: a run's files, or another process's, keep it


# --- the lock: one writer per run folder, on one host (docs/training.md, "Run lock") -------------
# run.lock holds "<host> <pid> <job>", job being engine_job() ("-" outside SLURM). Units are handed
# out by one launcher or an engine, so the lock only guards against starting a run twice by hand. It
# is free when absent; on this host, when its pid is gone (or a newer process reuses the pid: it
# started after the lock was written), whatever the SLURM job, since two processes of one job can
# share a host; on another host, when it names this process's own SLURM job (a requeued task whose
# first run died with its node: SLURM runs a task once at a time).

def _alive(pid, since=None):
    """The process exists, is not a zombie and, with `since` (a time.time()), had started by then
    (a later start is another process on the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if fields[0] in (b"Z", b"X"):
            return False
        if since is None:
            return True
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK") <= since + 1.0
    except (OSError, IndexError, ValueError, StopIteration):
        return True  # no /proc (not Linux): existing is alive


def engine_job():
    """This process's unit id under SLURM (stable across a requeue), or "-"."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or "-"


class Busy(cli.Failure):
    """Another live process holds the run folder."""


class Owner:
    """What run.lock says (host, pid, job) and when it was written (its mtime)."""

    def __init__(self, text, written=None):
        self.text, self.written = text, written
        self.host, self.pid, self.job = (text.split() + ["?", "?", "-"])[:3]

    def __str__(self):
        job = f" (SLURM job {self.job})" if self.job != "-" else ""
        return f"pid {self.pid} on {self.host}{job}"

    def stale(self):
        if self.host == socket.gethostname() and self.pid.isdigit():
            return not _alive(int(self.pid), self.written)
        return self.job != "-" and self.job == engine_job()


def read_owner(path):
    try:
        path = Path(path)
        return Owner(path.read_text(encoding="utf-8", errors="replace"), path.stat().st_mtime)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise files.FileFault(f"cannot read the lock {path}: {files.why(err)}") from None


class Lock:
    """A held run.lock; release() deletes it if it is still this process's."""

    def __init__(self, path, text):
        self.path, self.text = Path(path), text

    def release(self):
        with contextlib.suppress(OSError, files.FileFault):
            owner = read_owner(self.path)
            if owner is not None and owner.text == self.text:
                self.path.unlink(missing_ok=True)


def acquire_lock(run_dir, say=print):
    """Take run_dir/run.lock (O_EXCL); a stale one is replaced with a line saying so. Raises Busy
    (one sentence naming the folder and the holder) when a live process holds it."""
    path = Path(run_dir) / LOCK_NAME
    text = f"{socket.gethostname()} {os.getpid()} {engine_job()}\n"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = read_owner(path)
            if owner is None:
                continue  # released just now
            if not owner.stale():
                raise Busy(f"train: {run_dir} is being written by {owner}; wait for it, or, if "
                           f"that process is gone (another host's lock cannot be checked from "
                           f"here), delete {path}")
            say(f"train: {run_dir}: took over the stale lock of {owner}")
            path.unlink(missing_ok=True)
            continue
        except OSError as err:
            raise files.FileFault(f"cannot write in {run_dir}: {files.why(err)}") from None
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return Lock(path, text)
    raise Busy(f"train: {run_dir}: another process took {path} meanwhile; try again")
