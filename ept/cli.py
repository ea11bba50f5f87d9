"""The stages' command lines: value types (a wrong value is one argparse error, before any work),
--help with every default, two-line usage errors, and `Failure`: one sentence, a non-zero exit."""
import argparse
import functools
import math
import os
import re
import sys
from pathlib import Path


def _number(cast, name, low, high=math.inf, low_open=False):
    def parse(text):
        try:
            value = cast(text)
            if math.isfinite(value) and low <= value <= high and not (low_open and value == low):
                return value
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"{text!r} is not a {name}")
    parse.__name__ = name  # argparse names the type in its messages
    return parse


positive_int = _number(int, "positive integer", 1)
nonnegative_int = _number(int, "non-negative integer", 0)
positive_float = _number(float, "positive number", 0.0, low_open=True)
nonnegative_float = _number(float, "non-negative number", 0.0)
probability = _number(float, "probability in [0, 1]", 0.0, 1.0)


def name(text):
    """A task or run name: letters, digits, '_', '-', '.'; never a path (it goes into paths)."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", text) and ".." not in text:
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a task name (a name like rte, not a path)")


def folder(text):
    """A folder path, never empty ('' would silently mean the current folder)."""
    if text.strip():
        return text
    raise argparse.ArgumentTypeError("an empty path would mean the current folder; name a folder")


def run_folder_problem(value):
    """Why `value` cannot be a run folder ('', '.', '/', 'x/..': the current folder or a parent)."""
    if not isinstance(value, str):
        return f"must be a folder path (a string), not {value!r}"
    if not value.strip() or Path(value).name in ("", ".", ".."):
        return f"{value!r} is empty or names no folder of its own; name the run's own folder"
    return None


class Sweep(argparse.Action):
    """nargs="+": one value stored as itself (a solo run), several as a list (one run each)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0] if len(values) == 1 else list(values))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and names every default (None's and flags' in words)."""

    def _get_help_string(self, action):
        text, value = action.help or "", action.default
        if "default" in text or action.nargs == 0 or value in (None, argparse.SUPPRESS):
            return text
        shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # two lines: the short usage and the error
        self.exit(2, f"usage: {self.prog} [flags]  (--help lists them)\n"
                     f"{self.prog}: error: {message}\n")


class Failure(Exception):
    """A problem the user can fix: one sentence; `status`: the exit status the script ends with."""

    def __init__(self, message="", status=1):
        super().__init__(message)
        self.status = status


def script(main):
    """`main(argv=None)` whose Failure is its sentence on stderr (none: another rank said why) and
    its status; under torchrun recorded as @record does, so the summary names it."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Failure as err:
            if str(err) and os.environ.get("TORCHELASTIC_ERROR_FILE"):
                from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
                ErrorHandler().record_exception(err)
            if str(err) and err.status != 1:
                print(err, file=sys.stderr, flush=True)
            raise SystemExit(str(err) if str(err) and err.status == 1 else err.status) from None
    return run
