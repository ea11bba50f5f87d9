"""Stopping a run cleanly: SIGTERM, SIGUSR1 (preemption, scancel, SLURM's warning) and Ctrl-C ask
the training loop to write last.pt at its next step boundary and stop; a second Ctrl-C stops at once
(every file is written atomically, so the last checkpoint stays whole).
"""
import contextlib
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from ept import errors


class Stopped(errors.Failure):
    """A stop signal arrived: last.pt was written at a step boundary; exit 128 + the signal."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_stop_signal = []  # the signal received, set by the handler, read at each step boundary
_stopping = []  # set once the run stops (Stopped, a second Ctrl-C): later signals wait for cleanup


def _on_signal(sig, _):
    if _stopping:  # the locks are being released and the files closed: let that finish
        return
    if sig == signal.SIGINT and signal.SIGINT in _stop_signal:  # twice: stop now (files stay whole)
        _stopping.append(sig)
        raise KeyboardInterrupt
    if sig == signal.SIGINT and int(os.environ.get("RANK", 0)) == 0:
        print("train: Ctrl-C: stopping at the next step boundary, after writing last.pt (Ctrl-C "
              "again to stop at once)", file=sys.stderr, flush=True)
    _stop_signal.append(sig)


@contextlib.contextmanager
def stop_on_signals():
    """The handlers installed while the loop runs (above; a second Ctrl-C is a KeyboardInterrupt).
    Main thread only: a thread cannot install handlers, and then the caller's handlers stay."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _stop_signal.clear()
    _stopping.clear()
    before = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def received():
    """The stop signal of the last run, or None: a driver stops before its next run even so."""
    return _stop_signal[0] if _stop_signal else None


def stop_requested(ranks):
    """The signal to stop on (or None), agreed by every rank: one may receive it a step later."""
    sig = _stop_signal[0] if _stop_signal else 0
    if ranks.world_size > 1:
        box = torch.tensor([int(sig)], device=ranks.device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        sig = int(box.item())
    return sig or None


def stopped(sig, runs):
    """The Stopped to raise once the runs (train.Run) wrote last.pt: rank 0 says why and how to
    resume; each rank exits 128 + the signal."""
    _stopping.append(sig)
    name, step = signal.Signals(sig).name, min(run.step for run in runs)
    folders = " ".join(str(run.out_dir) for run in runs)
    said = int(os.environ.get("RANK", 0)) == 0  # once under torchrun
    return Stopped(f"train: {name} received: stopped at step {step}, last.pt written in "
                   f"{folders}; run the same command with --resume to continue (exit status "
                   f"{128 + sig})" if said else "", status=128 + sig)


def run(main):
    """train.py's main(): a Ctrl-C after a stop or failure is ignored; a second one, or one outside
    the loop, exits 130 (files whole). Every rank ends the process group (runtime.master_first)."""
    try:
        main()
    except SystemExit:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if int(os.environ.get("RANK", 0)) == 0:
            print("train: interrupted (Ctrl-C); last.pt, if any, is the last checkpoint, whole: "
                  "run the same command with --resume to continue", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
