"""What goes wrong in a way the user can fix (`Failure`: bad input, a missing, damaged, busy or
unwritable file, a run that stopped; its message is one sentence), and `script`, the one place a
stage's `main` turns it into that sentence on stderr and a non-zero exit (SystemExit to a caller).
"""
import functools
import os
import sys


class Failure(Exception):
    """A problem the user can fix: one sentence; `status`: the exit status the script ends with."""

    status = 1

    def __init__(self, message="", status=None):
        super().__init__(message)
        if status is not None:
            self.status = status


def script(main):
    """A script's `main(argv=None)`: a Failure becomes its sentence on stderr and a non-zero exit. A
    Failure without a message (a rank whose rank 0 already said why) exits without a word."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Failure as err:
            if str(err) and os.environ.get("TORCHELASTIC_ERROR_FILE"):  # under torchrun, as its
                from torch.distributed.elastic.multiprocessing.errors import ErrorHandler  # @record
                ErrorHandler().record_exception(err)  # does: its summary names this root cause
            if str(err) and err.status == 1:
                raise SystemExit(str(err)) from None  # Python prints it: the sentence and status 1
            if str(err):
                print(err, file=sys.stderr, flush=True)
            raise SystemExit(err.status) from None
    return run
