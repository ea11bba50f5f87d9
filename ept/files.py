"""The project's files (JSON, JSONL, torch checkpoints). Every reader fails with one sentence naming
the file and what is wrong; every writer is atomic (a temporary file beside the target, then
os.replace): a file is its old self or wholly new, even under SIGKILL or a full disk."""
import contextlib
import errno
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
    return next((WHY[k] for k in (*type(err).__mro__, err.errno) if k in WHY),
                err.strerror or type(err).__name__) if isinstance(err, OSError) else str(err)


def read_text(path, what="file"):
    try:
        return Path(path).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as err:
        bad = isinstance(err, UnicodeDecodeError) and f"byte {err.start} is not UTF-8"
        raise FileFault(f"cannot read the {what} {path}: {bad or why(err)}") from None


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
    rows, lines = [], read_text(path, what).split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            bad = not isinstance(row, dict) and f"line {number} is not a JSON object"
        except json.JSONDecodeError as err:
            if torn_tail_ok and number == len(lines):  # no newline: the writer died mid-line
                break
            cut = " (the last line, without its newline: cut short)" if number == len(lines) else ""
            bad = f"line {number}{cut} is not valid JSON ({err.msg})"
        if bad:
            raise FileFault(f"the {what} {path} is damaged: {bad}{f'; {fix}' if fix else ''}")
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
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
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        return Path(path)
    except OSError as err:
        raise FileFault(f"cannot create the {what} {path}: {why(err)}") from None


def write_with(path, save):
    """Atomic write through `save(tmp_path)` (torch.save, savefig, ...); a failure leaves the old
    file as it was, removes the temporary one, and is one sentence."""
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
        # raised outside the except: its traceback would keep the writer's file open
        space = os.statvfs(tmp.parent)
        full = space.f_bavail * space.f_frsize < 2**20
        raise OSError(errno.ENOSPC if full else errno.EIO,
                      "No space left on device" if full else f"torch.save failed: {failure}")
    return write_with(path, save)
