"""Files: a reader fails in one sentence naming the file and the fault; a writer is atomic."""
import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path

import torch

from ept import cli


class FileFault(cli.Failure):
    """A file that is missing, damaged or cannot be written: one sentence, exit status 1."""


WHY = {FileNotFoundError: "it does not exist", IsADirectoryError: "it is a folder",
       NotADirectoryError: "a part of the path is a file", PermissionError: "permission denied",
       FileExistsError: "a file of that name is in the way", errno.ENOSPC: "the disk is full",
       errno.EROFS: "the disk is read-only", UnicodeDecodeError: "byte {0.start} is not UTF-8"}


def why(err):
    """What went wrong, in a few words, for a one-sentence message."""
    found = [WHY[k].format(e) for e in (err, err.__context__)  # an OSError that torch wrapped
             for k in (*type(e).__mro__, getattr(e, "errno", 0)) if k in WHY]
    return [*found, getattr(err, "strerror", None) or str(err) or type(err).__name__][0]


@contextlib.contextmanager
def fault(doing, *kinds, fix=""):
    """An OSError (or one of `kinds`) in the block as one sentence: "<doing>: <why><fix>"."""
    try:
        yield
    except (OSError, *kinds) as err:
        raise FileFault(f"{doing}: {why(err)}{fix}") from None


def read_text(path, what="file", missing_ok=False):
    with fault(f"cannot read the {what} {path}", UnicodeDecodeError):
        return "" if missing_ok and not Path(path).exists() else Path(path).read_text("utf-8")


def read_json(path, what="JSON file"):
    with fault(f"the {what} {path} is not valid JSON", ValueError, fix="; restore or rebuild it"):
        return json.loads(read_text(path, what))


def read_jsonl(path, what="JSONL file", torn_tail_ok=False, missing_ok=False, fix=None):
    """The rows; `torn_tail_ok`: a last line cut short (a killed writer's) is dropped."""
    rows, lines = [], read_text(path, what, missing_ok).split("\n")
    for number, line in enumerate(lines, 1):
        try:
            rows += [json.loads(line)] if line.strip() else []
            bad = rows and not isinstance(rows[-1], dict) and f"line {number} is not a JSON object"
        except json.JSONDecodeError as err:
            cut = " (the last line, without its newline: cut short)" * (number == len(lines))
            bad = not (cut and torn_tail_ok) and f"line {number}{cut} is not valid JSON ({err.msg})"
        if bad:
            raise FileFault(f"the {what} {path} is damaged: {bad}" + (f"; {fix}" if fix else ""))
    return rows


def load_torch(path, what="checkpoint", fix=None):
    """torch.load(weights_only=True) on the CPU; a truncated or foreign file is one sentence."""
    with fault(f"cannot read the {what} {path}"):
        open(path, "rb").close()  # missing, a folder, no permission
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, or not tensors and plain values: not ours
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
        with contextlib.suppress(BlockingIOError):  # flock returns None
            return fd, not fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return fd, False


def write_with(path, save):
    """`save(f)` fills a temporary file, renamed onto `path`: never a half-written file."""
    tmp = (path := Path(path)).with_name(f".{path.name}.tmp{os.getpid()}")
    if not path.parent.exists():
        raise FileFault(f"cannot write {path}: the folder {path.parent} does not exist")
    try:
        with fault(f"cannot write {path}", RuntimeError):
            with open(tmp, "wb") as f:
                save(f)
            os.replace(tmp, path)
    finally:  # after any failure, Ctrl-C included, no temporary file is left
        with contextlib.suppress(OSError):  # a read-only folder: none was made
            tmp.unlink(missing_ok=True)


def write_text(path, text):
    write_with(path, lambda f: f.write(text.encode()))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def save_torch(path, obj):  # a full disk: an OSError, in the RuntimeError of torch's zip writer
    write_with(path, lambda f: torch.save(obj, f))
