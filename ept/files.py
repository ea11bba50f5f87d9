"""The project's files: each reader fails in one sentence naming the file and the fault; each
writer is atomic (a temporary file, then os.replace), even under SIGKILL or on a full disk."""
import contextlib
import errno
import fcntl
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch

from ept import cli


class FileFault(cli.Failure):
    """A file that is missing, damaged or cannot be written: one sentence, exit status 1."""


WHY = {FileNotFoundError: "it does not exist", IsADirectoryError: "it is a folder, not a file",
       NotADirectoryError: "a part of the path is a file, not a folder",
       FileExistsError: "a file of that name is in the way", PermissionError: "permission denied",
       errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only"}


def why(err):
    """What went wrong, in a few words, for a one-sentence message."""
    if isinstance(err, UnicodeDecodeError):
        return f"byte {err.start} is not UTF-8"
    return next((WHY[k] for k in (*type(err).__mro__, err.errno) if k in WHY),
                err.strerror or type(err).__name__) if isinstance(err, OSError) else str(err)


@contextlib.contextmanager
def fault(doing, *kinds, fix=""):
    """An OSError (or one of `kinds`) in the block as one sentence: "<doing>: <why><fix>"."""
    try:
        yield
    except (OSError, *kinds) as err:
        raise FileFault(f"{doing}: {why(err)}{fix}") from None


def read_text(path, what="file"):
    with fault(f"cannot read the {what} {path}", UnicodeDecodeError):
        return Path(path).read_text(encoding="utf-8")


def read_json(path, what="JSON file"):
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as err:
        raise FileFault(f"the {what} {path} is not valid JSON (line {err.lineno}: {err.msg}); "
                        "restore or regenerate it") from None


def read_jsonl(path, limit=None, what="JSONL file", torn_tail_ok=False, missing_ok=False, fix=None):
    """The rows (the first `limit`). `torn_tail_ok`: a last line without its newline that is not
    JSON, a killed writer's, is dropped (log.jsonl). `missing_ok`: no file, no rows."""
    if missing_ok and not Path(path).exists():
        return []
    rows, lines, end = [], read_text(path, what).split("\n"), f"; {fix}" if fix else ""
    for number, line in enumerate(lines, 1):
        if not line.strip() or limit is not None and len(rows) >= limit:
            continue
        try:
            rows.append(json.loads(line))
            bad = not isinstance(rows[-1], dict) and f"line {number} is not a JSON object"
        except json.JSONDecodeError as err:
            if (last := number == len(lines)) and torn_tail_ok:  # the writer died mid-line
                break
            cut = " (the last line, without its newline: cut short)" * last
            bad = f"line {number}{cut} is not valid JSON ({err.msg})"
        if bad:
            raise FileFault(f"the {what} {path} is damaged: {bad}{end}")
    return rows


def load_torch(path, what="checkpoint", fix=None):
    """torch.load(weights_only=True) on the CPU; a truncated or foreign file is one sentence."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            KeyError) as err:
        if isinstance(err, OSError) and err.errno not in (None, errno.EINVAL):  # EINVAL: truncated
            raise FileFault(f"cannot read the {what} {path}: {why(err)}") from None
        raise FileFault(f"the {what} {path} is damaged (truncated or not a checkpoint of this "
                        f"project: {type(err).__name__}){f'; {fix}' if fix else ''}") from None


def make_dir(path, what="folder"):
    """mkdir -p, or one sentence when it cannot be made (read-only disk, a file in the way)."""
    with fault(f"cannot create the {what} {path}"):
        Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def flock(path, wait=True):
    """(fd, taken): `path` opened and flock'ed (the kernel frees it however its process dies)."""
    with fault(f"cannot lock {path}"):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        with contextlib.suppress(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            return fd, True
        return fd, False


@contextlib.contextmanager
def locked(path):
    """`path`.lock held while several processes read, check and append to `path`."""
    with open(flock(make_dir(Path(path).parent) / f"{Path(path).name}.lock")[0]):  # close: unlock
        yield


def write_with(path, save):
    """Atomic write through `save(tmp_path)`; a failure: the old file as it was, one sentence."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save(tmp)
        os.replace(tmp, path)
        return path
    except OSError as err:
        gone = isinstance(err, FileNotFoundError) and not path.parent.is_dir()
        reason = f"the folder {path.parent} does not exist" if gone else why(err)
        raise FileFault(f"cannot write {path}: {reason}") from None
    finally:  # after any failure, Ctrl-C included, no temporary file is left
        with contextlib.suppress(OSError):  # a read-only folder: none was made
            tmp.unlink(missing_ok=True)


def write_text(path, text):
    def save(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return write_with(path, save)


def write_json(path, obj):
    return write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_jsonl(path, rows):
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def save_torch(path, obj):
    def save(tmp):
        try:
            return torch.save(obj, tmp)
        except RuntimeError as err:  # torch's zip writer reports a full disk as a RuntimeError
            failure = (str(err).splitlines() or [""])[0]
        space = os.statvfs(tmp.parent)  # raised outside the except: its traceback keeps tmp open
        full = space.f_bavail * space.f_frsize < 2**20
        raise OSError(errno.ENOSPC if full else errno.EIO, f"torch.save failed: {failure}")
    return write_with(path, save)
