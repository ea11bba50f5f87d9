"""A run folder (train.py writes it, every later stage reads it): its files, its lock and its status.

    config.json   every setting of the run, resolved          metrics.json  test metrics of best.pt
    log.jsonl     one JSON object per event (train/eval/end)   prompt.pt     the folded P' of best.pt
    best.pt       trainable state at the best validation       last.pt       the latest state (resume)
    run.lock      "<host> <pid>" of the one process writing the folder
"""
import os
import socket
from pathlib import Path

import files

RUN_FILES = ("config.json", "log.jsonl", "best.pt", "last.pt", "prompt.pt", "metrics.json")


CONFIG_KEYS = ("task", "method", "model", "tokenizer", "random_init", "seed", "data_dir", "max_length", "meta")


def read_config(run_dir, keys=CONFIG_KEYS):
    """A run's config.json holding `keys` (what the later stages rebuild the run from); one sentence if not."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise files.FileFault(f"no run folder {run_dir} ({'a file' if run_dir.exists() else 'it does not exist'}); "
                              "pass a folder train.py wrote")
    if not (run_dir / "config.json").exists():
        raise files.FileFault(f"{run_dir} is not a run folder (no config.json); pass a folder train.py wrote")
    config = files.read_json(run_dir / "config.json", "run configuration")
    missing = [k for k in keys if not isinstance(config, dict) or k not in config]
    if {"task", "method"} <= set(missing):
        raise files.FileFault(f"{run_dir} is not a run folder (its config.json is not train.py's, a model's "
                              "perhaps); pass a folder train.py wrote")
    if missing:
        raise files.FileFault(f"{run_dir / 'config.json'} is not a train.py run configuration (no "
                              f"{', '.join(missing)}); pass a folder train.py wrote")
    return config


def status(run_dir):
    """'done' (metrics.json written), 'partial' (started: config.json) or 'todo'."""
    run_dir = Path(run_dir)
    if (run_dir / "metrics.json").exists():
        return "done"
    return "partial" if (run_dir / "config.json").exists() else "todo"


def is_run_folder(run_dir):
    """True for an empty folder or one whose config.json train.py wrote (what --overwrite may clear)."""
    config = Path(run_dir) / "config.json"
    if not config.exists():
        return not any(p.name not in (*RUN_FILES, "run.lock", "eval") for p in Path(run_dir).iterdir())
    try:
        keys = files.read_json(config)
    except SystemExit:
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


# --- the lock: one writer per folder ---------------------------------------------------------------

def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Busy(SystemExit):
    """Another live process holds the run folder."""


def acquire_lock(run_dir, say=print):
    """run.lock created with O_EXCL: one writer per run folder. A lock whose process is gone on this host
    is stale and removed; a lock from another host must be removed by hand (docs/training.md)."""
    path = Path(run_dir) / "run.lock"
    host = socket.gethostname()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner_host, owner_pid = (files.read_text(path, "lock").split() + ["?", "?"])[:2]
            if owner_host == host and owner_pid.isdigit() and not _alive(int(owner_pid)):
                say(f"train: removing stale lock {path} (pid {owner_pid} is gone)")
                path.unlink(missing_ok=True)
                continue
            raise Busy(f"{run_dir} is being written by {owner_host} pid {owner_pid} ({path}); "
                       f"if that run is dead, delete {path}")
        except OSError as err:
            raise files.FileFault(f"cannot write in {run_dir}: {files.why(err)}") from None
        os.write(fd, f"{host} {os.getpid()}\n".encode())
        os.close(fd)
        return path
    raise Busy(f"could not take {path}")
