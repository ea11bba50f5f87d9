"""The stages' command lines: value types, --help with defaults, two-line usage errors, Failure."""
import argparse
import contextlib
import functools
import os
import re
import sys
from pathlib import Path


def _type(ok, why, cast=str):
    """An argparse type: cast(text) where ok(value), else one error, `why` with the text for {}."""
    def parse(text):
        with contextlib.suppress(ValueError):
            if ok(value := cast(text)):
                return value
        raise argparse.ArgumentTypeError(why.replace("{}", repr(text)))
    return parse


positive_int = _type(lambda v: v >= 1, "{} is not a positive integer", int)
nonnegative_int = _type(lambda v: v >= 0, "{} is not a non-negative integer", int)
positive_float = _type(lambda v: 0 < v < float("inf"), "{} is not a positive number", float)
nonnegative_float = _type(lambda v: 0 <= v < float("inf"), "{} is not a non-negative number", float)
probability = _type(lambda v: 0 <= v <= 1, "{} is not a probability in [0, 1]", float)
name = _type(lambda t: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", t) and ".." not in t,
             "{} is not a task name (a name like rte, not a path)")
folder = _type(str.strip, "an empty path would mean the current folder; name a folder")


def run_folder_problem(value):
    """Why `value` cannot be a run folder (not a string; '', '.', '/', 'x/..'), or None."""
    if not isinstance(value, str):
        return f"must be a folder path (a string), not {value!r}"
    if not value.strip() or Path(value).name in ("", ".", ".."):
        return f"{value!r} is empty or names no folder of its own; name the run's own folder"


class Sweep(argparse.Action):
    """nargs="+": one value stored as itself (a solo run), several as a list (one run each)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0] if len(values) == 1 else list(values))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and names every default (None's and flags' in words)."""

    def _get_help_string(self, action):
        text, value = action.help or "", action.default
        shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        hidden = "default" in text or action.nargs == 0 or value in (None, argparse.SUPPRESS)
        return text if hidden else f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # two lines: the short usage and the error
        self.exit(2, f"usage: {self.prog} [flags]  (--help lists them)\n"
                     f"{self.prog}: error: {message}\n")


class Failure(Exception):
    """A problem the user can fix: one sentence (none: another rank said why), exit `status`."""
    status = 1


def script(main):
    """`main(argv=None)` whose Failure is its sentence on stderr and its exit status."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Failure as err:
            if str(err) and os.environ.get("TORCHELASTIC_ERROR_FILE"):  # as torchrun's @record
                from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
                ErrorHandler().record_exception(err)
            if str(err) and err.status != 1:
                print(err, file=sys.stderr, flush=True)
            raise SystemExit(str(err) if str(err) and err.status == 1 else err.status) from None
    return run
