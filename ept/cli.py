"""The stages' command lines: value types (a wrong value is one argparse error, before any work),
--help with every default, two-line usage errors; `Failure`, what the user can fix (bad input, a
bad file, a stopped run), which `script` makes one sentence on stderr and a non-zero exit."""
import argparse
import functools
import math
import os
import re
import sys
from pathlib import Path


def _number(cast, low, high=None, low_open=False, name="value"):
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {name}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value <= low if low_open else value < low:
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if low_open else '>='} {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be <= {high}")
        return value
    parse.__name__ = name  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, name="positive integer")
nonnegative_int = _number(int, 0, name="non-negative integer")
positive_float = _number(float, 0.0, low_open=True, name="positive number")
nonnegative_float = _number(float, 0.0, name="non-negative number")
probability = _number(float, 0.0, 1.0, name="probability in [0, 1]")


def name(text):
    """A task or run name: letters, digits, '_', '-', '.'; never a path (it goes into paths)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", text) or ".." in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a task name (a name like rte or boolq, "
                                         "not a path)")
    return text


def folder(text):
    """A folder path, never empty ('' would silently mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path would mean the current folder; "
                                         "name a folder")
    return text


def run_folder_problem(value):
    """Why `value` cannot be a run folder (not a string, empty, or no name of its own: '.', '/',
    'x/..'), or None: a run's files would otherwise land in the current folder or a parent."""
    if not isinstance(value, str):
        return f"must be a folder path (a string), not {value!r}"
    if not value.strip():
        return "is empty: it would mean the current folder; name the run's own folder"
    if Path(value).name in ("", ".", ".."):
        return (f"{value!r} names no folder of its own (the current folder or a parent); "
                "name the run's own folder")
    return None


class Sweep(argparse.Action):
    """nargs="+", one value stored as itself (a solo run), several as a list (train.py: one run
    per value, the runs their product)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0] if len(values) == 1 else list(values))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows every option's default, unless its help
    names it already or there is none to show (a flag, or None: the help says what is used)."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if ("default" in text or default is None or default is False or default is argparse.SUPPRESS
                or action.nargs == 0):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """A usage error is two lines, the short usage and the error; --help lists every flag."""

    def error(self, message):
        self.exit(2, f"usage: {self.prog} [flags]  (--help lists them)\n"
                     f"{self.prog}: error: {message}\n")


class Failure(Exception):
    """A problem the user can fix: one sentence; `status`: the exit status the script ends with."""

    def __init__(self, message="", status=1):
        super().__init__(message)
        self.status = status


def script(main):
    """A script's `main(argv=None)`: a Failure becomes its sentence on stderr and a non-zero exit. A
    Failure without a message (a rank whose rank 0 already said why) exits without a word."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Failure as err:
            if str(err) and os.environ.get("TORCHELASTIC_ERROR_FILE"):  # under torchrun, as
                from torch.distributed.elastic.multiprocessing.errors import ErrorHandler  # @record
                ErrorHandler().record_exception(err)  # does: its summary names this root cause
            if str(err) and err.status == 1:
                raise SystemExit(str(err)) from None  # Python prints it: the sentence and status 1
            if str(err):
                print(err, file=sys.stderr, flush=True)
            raise SystemExit(err.status) from None
    return run
