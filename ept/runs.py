"""A run folder (train.py writes it, every later stage reads it): its name, files, status and lock.

docs/training.md lists the files ("The run folder") and the lock's rules ("Run lock").
"""
import os
import socket
from pathlib import Path

import model as M
from ept import errors, files

# A run folder's name, for a solo run, a pack's runs and the drivers' alike: <task>_<method>_<model>
# [_<options that differ from train.py's defaults and apply to the method>]_s<seed>.
NAME_TAGS = [("prompt_length", "n"), ("reparam", ""), ("hidden_size", "h"), ("broadcast", "b"),
             ("depth", "d"), ("extra_layer", "x1"), ("init", "init-"), ("layer_norm", "ln"),
             ("residual", "res"), ("activation", ""), ("lr", "lr"), ("max_steps", "steps"),
             ("epochs", "ep"), ("eval_every", "ev"), ("fewshot_k", "k"), ("fewshot_seed", "fs")]


def model_tag(model_name):
    return Path(str(model_name).rstrip("/")).name  # "t5-base", "smoke/tiny-t5" -> "tiny-t5"


def run_name(spec, defaults):
    """The folder name of the run `spec` (task, method, model, seed + options); `defaults`:
    train.py's defaults for its method (options.defaults), which the name leaves out, e.g.
    boolq_ept_t5-base_h50_s1."""
    tags = []
    for key, tag in NAME_TAGS:
        value = spec.get(key, defaults[key])
        if value is None or value == defaults[key] or not M.applies(key, spec["method"]):
            continue
        tags.append(tag if value is True else f"{tag}{value:g}" if isinstance(value, float)
                    else f"{tag}{value}")
    return "_".join([spec["task"], spec["method"], model_tag(spec["model"]), *tags,
                     f"s{spec['seed']}"])


FAILED_NAME, LOCK_NAME = "failed.txt", "run.lock"
RUN_FILES = ("config.json", "log.jsonl", "best.pt", "last.pt", "prompt.pt", "metrics.json",
             FAILED_NAME)
CONFIG_KEYS = ("task", "method", "model", "tokenizer", "random_init", "seed", "data_dir",
               "max_length", "meta")


def read_config(run_dir, keys=CONFIG_KEYS):
    """A run's config.json; one sentence if it lacks `keys` (what later stages rebuild it from)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "a file" if run_dir.exists() else "it does not exist"
        raise files.FileFault(f"no run folder {run_dir} ({what}); pass a folder train.py wrote")
    if not (run_dir / "config.json").exists():
        raise files.FileFault(f"{run_dir} is not a run folder (no config.json); pass a folder "
                              "train.py wrote")
    config = files.read_json(run_dir / "config.json", "run configuration")
    missing = [k for k in keys if not isinstance(config, dict) or k not in config]
    if {"task", "method"} <= set(missing):
        raise files.FileFault(f"{run_dir} is not a run folder (its config.json is not train.py's, "
                              "a model's perhaps); pass a folder train.py wrote")
    if missing:
        raise files.FileFault(f"{run_dir / 'config.json'} is not a train.py run configuration (no "
                              f"{', '.join(missing)}); pass a folder train.py wrote")
    return config


def status(run_dir):
    """'done' (finished: metrics.json written, or its --no-test log ended), 'failed' (failed.txt:
    stopped for good), 'partial' (started: config.json) or 'todo'."""
    run_dir = Path(run_dir)
    if finished(run_dir):
        return "done"
    if (run_dir / FAILED_NAME).exists():
        return "failed"
    return "partial" if (run_dir / "config.json").exists() else "todo"


def failure(run_dir):
    """Why the run failed (failed.txt's sentence), or None: it did not, or was restarted since."""
    try:
        return ((Path(run_dir) / FAILED_NAME).read_text(encoding="utf-8", errors="replace").strip()
                or "failed")
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"failed ({FAILED_NAME} unreadable: {files.why(err)})"


def is_run_folder(run_dir):
    """True for an empty folder or one train.py wrote (config.json): what --overwrite may clear."""
    config = Path(run_dir) / "config.json"
    if not config.exists():
        return not any(p.name not in (*RUN_FILES, "eval")
                       and not p.name.lstrip(".").startswith(LOCK_NAME)
                       for p in Path(run_dir).iterdir())
    try:
        keys = files.read_json(config)
    except errors.Failure:
        return False
    return isinstance(keys, dict) and {"task", "method", "n_trainable"} <= set(keys)


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


# --- the lock: one writer per run folder, on one host (docs/training.md, "Run lock") -------------
# run.lock holds "<host> <pid> <job>", job being engine_job() ("-" outside SLURM). Units are handed
# out by one launcher or an engine, so the lock only guards against starting a run twice by hand. It
# is free when absent; on this host, when its pid is gone (or a newer process reuses the pid: it
# started after the lock was written), whatever the SLURM job, since two processes of one job can
# share a host; on another host, when it names this process's own SLURM job (a requeued task whose
# first run died with its node: SLURM runs a task once at a time).


def _alive(pid, since=None):
    """The process exists, is not a zombie (a dead child its parent has not reaped yet) and, with
    `since` (a time.time()), had started by then: a later start is another process on the pid."""
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


class Busy(errors.Failure):
    """Another live process holds the run folder."""


class Owner:
    """What run.lock says: host, pid and engine job of its writer."""

    def __init__(self, text, written=None):
        self.text, self.written = text, written  # written: the lock file's mtime
        self.host, self.pid, self.job = (text.split() + ["?", "?", "-"])[:3]

    def __str__(self):
        job = f" (SLURM job {self.job})" if self.job != "-" else ""
        return f"pid {self.pid} on {self.host}{job}"

    def stale(self):
        """True when the writer is gone (see above): on this host the pid decides."""
        if self.host == socket.gethostname() and self.pid.isdigit():
            return not _alive(int(self.pid), self.written)
        return self.job != "-" and self.job == engine_job()


def read_owner(path):
    """The Owner of the lock file `path`, or None when there is none."""
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
        try:
            owner = read_owner(self.path)
            if owner is not None and owner.text == self.text:
                self.path.unlink(missing_ok=True)
        except (OSError, files.FileFault):
            pass


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


def curves(run_dir, missing_ok=False):
    """(steps, μ_t per step, eval steps, validation scores) from one run's log.jsonl."""
    log = files.read_jsonl(Path(run_dir) / "log.jsonl", what="run log", torn_tail_ok=True,
                           missing_ok=missing_ok)
    train = [e for e in log if e.get("event") == "train" and e.get("prompt_norm") is not None]
    evals = [e for e in log if e.get("event") == "eval" and e.get("score") is not None
             and e.get("split", "validation") == "validation"]
    return ([e["step"] for e in train], [e["prompt_norm"] for e in train],
            [e["step"] for e in evals], [e["score"] for e in evals])
