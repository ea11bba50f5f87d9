"""A run folder (train.py writes it, every later stage reads it): its files, its lock and its status.

    config.json   every setting of the run, resolved          metrics.json  test metrics of best.pt
    log.jsonl     one JSON object per event (train/eval/end)   prompt.pt     the folded P' of best.pt
    best.pt       trainable state at the best validation       last.pt       the latest state (resume)
    run.lock      "<host> <pid> <token>" of the one process writing the folder; its mtime is the heartbeat
    failed.json   a driver's worker could not finish the run (when, where, why): its session does not retry it
"""
import contextlib
import hashlib
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import files
import model as M

# A run folder's name, for a solo run, a pack's runs and the drivers' alike:
# <task>_<method>_<model>[_<options that differ from train.py's defaults and apply to the method>]_s<seed>.
NAME_TAGS = [("prompt_length", "n"), ("reparam", ""), ("hidden_size", "h"), ("broadcast", "b"), ("depth", "d"),
             ("extra_layer", "x1"), ("init", "init-"), ("layer_norm", "ln"), ("residual", "res"), ("activation", ""),
             ("lr", "lr"), ("max_steps", "steps"), ("epochs", "ep"), ("eval_every", "ev"), ("fewshot_k", "k"),
             ("fewshot_seed", "fs")]


def model_tag(model_name):
    return Path(str(model_name).rstrip("/")).name  # "t5-base", "smoke/tiny-t5" -> "tiny-t5"


def run_name(spec, defaults):
    """The folder name of the run `spec` (task, method, model, seed + options); `defaults`: train.py's
    defaults for its method (ablate.defaults), which the name leaves out, e.g. boolq_ept_t5-base_h50_s1."""
    tags = []
    for key, tag in NAME_TAGS:
        value = spec.get(key, defaults[key])
        if value is None or value == defaults[key] or not M.applies(key, spec["method"]):
            continue
        tags.append(tag if value is True else f"{tag}{value:g}" if isinstance(value, float) else f"{tag}{value}")
    return "_".join([spec["task"], spec["method"], model_tag(spec["model"]), *tags, f"s{spec['seed']}"])


RUN_FILES = ("config.json", "log.jsonl", "best.pt", "last.pt", "prompt.pt", "metrics.json")
LOCK_NAME = "run.lock"
FAILED = "failed.json"


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
        return not any(p.name not in (*RUN_FILES, "eval", FAILED) and not p.name.lstrip(".").startswith(LOCK_NAME)
                       for p in Path(run_dir).iterdir())
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


# --- failures: what a driver's workers do not retry ------------------------------------------------

def mark_failed(run_dir, reason):
    """Record that a worker could not finish this run (failed.json: when, where, why)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    files.write_json(Path(run_dir) / FAILED, {"time": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
                                              "reason": str(reason)[-2000:]})


def failed_since(run_dir, since):
    """The failure record of a run that failed at or after time `since` (a driver's session start), else None."""
    path = Path(run_dir) / FAILED
    if not path.exists():
        return None
    try:
        record = files.read_json(path, "failure record")
    except SystemExit:
        return None
    return record if isinstance(record, dict) and record.get("time", 0) >= since else None


def clear_failed(run_dir):
    (Path(run_dir) / FAILED).unlink(missing_ok=True)


# --- the lock: one writer per folder, a heartbeat, race-free takeover of a dead writer's lock ---------
# run.lock holds "<host> <pid> <token>". The holder refreshes its mtime every EPT_LOCK_HEARTBEAT seconds
# (default 60) from a daemon thread. A lock is stale when its writer is dead: on this host, when its pid is
# gone; from another host (workers on several nodes sharing a file system), when its mtime is older than
# EPT_LOCK_TIMEOUT seconds (default 600). A stale lock is taken over, never deleted: the claimant first
# creates, with O_EXCL, a marker named after that exact lock (run.lock.takeover-<hash of its text>-<n>),
# so of two claimants of one stale lock exactly one proceeds; it checks the lock is still that stale one
# and replaces it with its own (os.replace). docs/experiments.md ("Several workers") has the reasoning.


def lock_timeout():
    """Seconds without a heartbeat after which another host's lock is stale (EPT_LOCK_TIMEOUT, default 600)."""
    return float(os.environ.get("EPT_LOCK_TIMEOUT", 600))


def heartbeat_interval():
    """Seconds between the holder's refreshes of run.lock's mtime (EPT_LOCK_HEARTBEAT, default 60)."""
    return float(os.environ.get("EPT_LOCK_HEARTBEAT", min(60.0, lock_timeout() / 4)))


def takeover_timeout():
    """A takeover marker older than this belongs to a claimant that died in the middle of a takeover (a few
    file operations): the next claimant uses the next marker number."""
    return min(60.0, lock_timeout())


def _alive(pid):
    """The process exists and is not a zombie (a dead child its parent has not reaped yet, or an orphan under
    a PID 1 that never reaps, as in some containers: its pid exists, but it writes nothing any more)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True  # no /proc (not Linux): existing is alive


class Busy(SystemExit):
    """Another live process holds the run folder."""


class LockLost(SystemExit):
    """Another process took this run's lock over (this one was judged dead): stop writing into the folder."""


class Owner:
    """What run.lock says: host, pid, token, its full text, and its age (seconds since its mtime)."""

    def __init__(self, text, mtime):
        self.text = text
        fields = text.split()
        self.host, self.pid, self.token = (fields + ["?", "?", ""])[:3]
        self.age = time.time() - mtime

    def __str__(self):
        return f"{self.host} pid {self.pid}"

    def stale(self):
        """Why this lock's writer is dead, or None while it may be alive."""
        if self.host == socket.gethostname() and self.pid.isdigit():
            return None if _alive(int(self.pid)) else f"pid {self.pid} is gone"
        if self.age > lock_timeout():  # another host (or a lock cut short): the heartbeat decides
            return f"no heartbeat for {self.age:.0f} s (EPT_LOCK_TIMEOUT={lock_timeout():g})"
        return None


def read_owner(path):
    """The Owner of the lock file `path`, or None when there is none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
            mtime = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None
    except OSError as err:
        raise files.FileFault(f"cannot read the lock {path}: {files.why(err)}") from None
    return Owner(text, mtime)


def holder(run_dir):
    """The live Owner of run_dir's lock, or None when the folder is free (no lock, or a stale one)."""
    owner = read_owner(Path(run_dir) / LOCK_NAME)
    return owner if owner is not None and not owner.stale() else None


class Lock:
    """A held run.lock: a daemon thread refreshes its mtime and notices when it was taken over (`lost`)."""

    def __init__(self, path, text, say=print, heartbeat=True):
        self.path, self.text, self.say = Path(path), text, say
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread = None
        if heartbeat:
            self._thread = threading.Thread(target=self._beat, name=f"heartbeat {path}", daemon=True)
            self._thread.start()

    @property
    def lost(self):
        return self._lost.is_set()

    def _beat(self):
        while not self._stop.wait(heartbeat_interval()):
            owner = None
            try:
                owner = read_owner(self.path)
                if owner is not None and owner.text == self.text:
                    os.utime(self.path)
                    continue
            except (OSError, files.FileFault):
                continue  # a transient error on a shared file system: try again at the next beat
            self._lost.set()
            self.say(f"train: lost the lock {self.path}: " + (f"taken over by {owner}" if owner else "it was deleted")
                     + "; this process stops writing into the folder")
            return

    def check(self):
        """Raise LockLost when another process has taken this folder over."""
        if self.lost:
            raise LockLost(f"train: {self.path.parent} was taken over by another worker (this process was judged "
                           f"dead: no heartbeat for EPT_LOCK_TIMEOUT={lock_timeout():g} s); stopped without writing")

    def release(self):
        """Stop the heartbeat; delete run.lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            owner = read_owner(self.path)
            if owner is not None and owner.text == self.text:
                self.path.unlink(missing_ok=True)
        except (OSError, files.FileFault):
            pass


def _my_text():
    return f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex}\n"


def _create(path, text):
    """O_EXCL: True when this call created the lock, False when one exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _take_over(path, owner, text, say, adopt=False):
    """Replace the stale lock `owner` by `text`, race-free among claimants: True when this process now holds it.
    False: another claimant is taking it over, or the lock changed since it was read (the caller looks again).
    `adopt`: `owner` is the live lock a driver's worker took for this process: replaced the same way."""
    ident = hashlib.sha1(owner.text.encode()).hexdigest()[:12]
    marker, number = None, 0
    while marker is None:
        candidate = path.with_name(f"{path.name}.takeover-{ident}-{number}")
        if _create(candidate, text):
            marker = candidate
            break
        try:
            age = time.time() - candidate.stat().st_mtime
        except FileNotFoundError:
            return False  # its claimant finished the takeover: look again
        if age <= takeover_timeout():
            return False  # another claimant is taking this lock over right now
        number += 1  # that claimant died half-way: the next marker
    try:
        current = read_owner(path)
        if current is None or current.text != owner.text or not (adopt or current.stale()):
            return False  # released, taken over, or alive again since it was read
        files.write_text(path, text)  # temporary file + os.replace: the lock is never absent
        if not adopt:
            say(f"train: took over the stale lock {path} of {owner} ({current.stale()})")
        return True
    finally:
        for n in range(number + 1):  # this marker and the dead claimants' below it
            path.with_name(f"{path.name}.takeover-{ident}-{n}").unlink(missing_ok=True)


INHERIT_ENV = "EPT_RUN_LOCK"  # the text of the lock a driver's worker took for the train.py it starts


def acquire_lock(run_dir, say=print, heartbeat=True, inherit=None):
    """Take run_dir/run.lock (one writer per run folder) and start its heartbeat; a stale lock is taken
    over. Raises Busy when a live process (or a claimant taking a stale lock over) holds it. `inherit`: the
    texts of the locks taken for this process by its parent, one a line (a driver's worker claims a run, or
    a pack's runs, before it starts train.py, so no other worker starts them meanwhile); such a lock is
    adopted: rewritten as this process's."""
    path = Path(run_dir) / LOCK_NAME
    text = _my_text()
    for _ in range(5):
        try:
            if _create(path, text):
                return Lock(path, text, say, heartbeat)
            owner = read_owner(path)
            if owner is None:
                continue  # released just now
            adopt = bool(inherit) and owner.text.strip() in {line.strip() for line in inherit.splitlines()}
            if not adopt and not owner.stale():
                raise Busy(f"{run_dir} is being written by {owner} ({path}); if that run is dead, delete {path} "
                           f"(a lock from another host is taken over after {lock_timeout():g} s without a heartbeat)")
            if _take_over(path, owner, text, say, adopt=adopt):
                return Lock(path, text, say, heartbeat)
        except OSError as err:
            raise files.FileFault(f"cannot write in {run_dir}: {files.why(err)}") from None
    raise Busy(f"{run_dir} is being taken over by another worker ({path})")


@contextlib.contextmanager
def handed_to_child(*locks):
    """EPT_RUN_LOCK set to the locks' texts (one a line) while the block runs: the train.py started in it (a
    subprocess, torchrun's rank 0, or train.main in this process) adopts them instead of meeting them as Busy."""
    before = os.environ.get(INHERIT_ENV)
    os.environ[INHERIT_ENV] = "".join(lock.text if lock.text.endswith("\n") else lock.text + "\n" for lock in locks)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(INHERIT_ENV, None)
        else:
            os.environ[INHERIT_ENV] = before
