"""Running a plan's units: one after another here, or on a local pool of child processes (--gpus).

A unit (plans.Unit: `python train.py ...`) runs as a child (--subprocess, --nproc > 1 through
torchrun, every pool child), which frees GPU memory and cached data between runs, or by default in
this process with runpy (train.py as `__main__`, its status read from SystemExit), which pays the
imports (seconds on a small CPU) once per grid: a CPU grid of many short runs (SMOKE) stays fast.
Either way the driver imports no stage: train.py is a file it runs, as any engine would.
"""
import contextlib
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import traceback

from ept import errors, plans, signals

STOP_STATUSES = (128 + signal.SIGTERM, 128 + signal.SIGUSR1)  # train.py stopped, last.pt written
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def run_in_process(argv):
    """`python train.py ARGV` run in this process: its exit status (0, or its SystemExit's code; a
    sentence is printed on stderr as Python would, and is status 1)."""
    saved_argv, saved_sigint = sys.argv, signal.getsignal(signal.SIGINT)
    sys.argv = [str(plans.TRAIN_SCRIPT), *argv]
    try:
        runpy.run_path(str(plans.TRAIN_SCRIPT), run_name="__main__")
        return 0
    except SystemExit as err:
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr, flush=True)
            return 1
        return err.code or 0
    finally:  # train.py's __main__ ignores Ctrl-C while it exits: the driver's handler comes back
        sys.argv = saved_argv
        signal.signal(signal.SIGINT, saved_sigint)


def run_unit(experiment, unit, args, i, n):
    """One unit, in this process or as a child (--subprocess, torchrun); its runs not finished. A
    signal that stops train.py (SIGTERM, SIGUSR1, Ctrl-C) stops the driver with its status."""
    t0 = time.time()
    names = " ".join(unit.names)
    what = f"a pack of {len(unit.names)}: {names}" if len(unit.names) > 1 else names
    print(f"[{experiment} {i}/{n}] unit {unit.index}: train {what}", flush=True)
    if args.nproc > 1 or args.subprocess:
        status, interrupted = run_command(unit.command)
        if interrupted:  # Ctrl-C: the child was asked to checkpoint (SIGTERM) and has stopped
            stop(experiment, unit, signal.SIGINT)
        if status in STOP_STATUSES or -status in FORWARDED:  # train.py said why and how to resume
            raise SystemExit(status if status > 0 else 128 - status)
    else:
        try:
            status = run_in_process(unit.argv)
        except Exception:  # one broken unit does not stop the grid; reported at the end
            traceback.print_exc()
            status = 1
        if status == 0 and signals.received():  # it came in the unit's last steps, which finished
            status = 128 + signals.received()
        if status in (*STOP_STATUSES, 128 + signal.SIGINT):
            stop(experiment, unit, status - 128)
    if status:  # train.py printed its error
        print(f"[{experiment} {i}/{n}] unit {unit.index} failed (exit status {status})",
              file=sys.stderr)
    print(f"[{experiment} {i}/{n}] {time.time() - t0:.1f}s", flush=True)
    return unit.unfinished_runs()


def stop(experiment, unit, sig):
    """The driver stops as train.py did: 128 + the signal, once the unit wrote last.pt."""
    name = signal.Signals(sig).name
    print(f"{experiment}: {name} received: unit {unit.index} stopped at a step boundary, last.pt "
          "written; run the same command again to resume", file=sys.stderr, flush=True)
    raise SystemExit(128 + sig)


def run_command(command):
    """A unit's command as a child process; SIGTERM/SIGUSR1/SIGINT to this driver are passed on to
    it (it checkpoints and stops); (its exit status, whether Ctrl-C stopped it)."""
    proc = subprocess.Popen(command, start_new_session=True)
    got = []

    def forward_signal(sig, _):
        got.append(sig)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM if sig == signal.SIGINT else sig)
    forward = {}
    if threading.current_thread() is threading.main_thread():
        forward = {sig: signal.signal(sig, forward_signal) for sig in FORWARDED}
    try:
        return proc.wait(), signal.SIGINT in got
    finally:
        for sig, handler in forward.items():
            signal.signal(sig, handler)


# --- the local pool: --gpus G --------------------------------------------------------------------
# One launcher (this process) hands the units, longest first, to G / --nproc child processes, each
# pinned to its own GPUs with CUDA_VISIBLE_DEVICES. Only the launcher hands out work, so the
# children need no locks. A child that dies has its unit started once more (it resumes from
# last.pt); Ctrl-C (or SIGTERM) stops every child, which checkpoints; a rerun of the same command
# resumes whatever was left.

def pool_devices(args):
    """One entry per child: the CUDA_VISIBLE_DEVICES it gets ("0", or "2,3" with --nproc 2)."""
    gpus, nproc = args.gpus, args.nproc
    if gpus % nproc:
        raise errors.Failure(f"--gpus {gpus} is not a multiple of --nproc {nproc} (GPUs per run)")
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    visible = [d for d in listed if d] or [str(i) for i in range(gpus)]
    if len(visible) < gpus:
        raise errors.Failure(f"--gpus {gpus}, but CUDA_VISIBLE_DEVICES lists {len(visible)}: "
                             f"{','.join(visible)}")
    return [",".join(visible[i * nproc:(i + 1) * nproc]) for i in range(gpus // nproc)]


class Pool:
    """Child processes, one per device slot, each running one unit; their output, line by line, on
    this process's stdout with the unit and GPU as prefix."""

    def __init__(self, experiment, devices):
        self.experiment, self.devices = experiment, devices
        self.running = {}  # slot -> (process, unit, the thread that copies its output)
        self.env = {"TQDM_DISABLE": "1", **os.environ}  # G progress bars on one terminal: noise
        self.out_lock = threading.Lock()

    def free_slots(self):
        return [slot for slot in range(len(self.devices)) if slot not in self.running]

    def start(self, slot, unit):
        gpus = self.devices[slot]
        # its own session: Ctrl-C reaches it through this process only
        proc = subprocess.Popen(unit.command, env={**self.env, "CUDA_VISIBLE_DEVICES": gpus},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True)
        prefix = f"[u{unit.index} gpu {gpus}] "
        thread = threading.Thread(target=self._pump, args=(proc, prefix), daemon=True)
        thread.start()
        self.running[slot] = (proc, unit, thread)
        print(f"{self.experiment}: unit {unit.index} ({' '.join(unit.names)}) -> GPU {gpus}",
              flush=True)

    def _pump(self, proc, prefix):
        for line in proc.stdout:
            with self.out_lock:
                sys.stdout.write(prefix + line)
                sys.stdout.flush()

    def ended(self):
        """[(unit, exit status)] of the children that ended since the last call."""
        done = []
        for slot, (proc, unit, thread) in list(self.running.items()):
            if proc.poll() is not None:
                thread.join()
                del self.running[slot]
                done.append((unit, proc.returncode))
        return done

    def stop_all(self):
        """SIGTERM to every child's group; back once each (torchrun's ranks too) wrote last.pt."""
        for proc, _, _ in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _, thread in self.running.values():
            proc.wait()
            thread.join()
            while True:  # until its whole group (torchrun's ranks too) is gone
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)


def run_pool(experiment, units, devices):
    """Run `units` (longest first) on len(devices) children; the runs of units that failed twice."""
    print(f"{experiment}: {len(units)} unit(s) on {len(devices)} child process(es), GPUs "
          f"{' | '.join(devices)}", flush=True)
    pool, queue, retried, failed = Pool(experiment, devices), list(units), set(), []
    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, signal.default_int_handler) if in_main else None
    try:
        while queue or pool.running:
            for slot in pool.free_slots()[:len(queue)]:
                pool.start(slot, queue.pop(0))
            for unit, status in pool.ended():
                if status == 0 and unit.finished():
                    print(f"{experiment}: unit {unit.index} done", flush=True)
                elif unit.index not in retried:
                    retried.add(unit.index)
                    print(f"{experiment}: unit {unit.index} ended with status {status}; "
                          "resuming it once", flush=True)
                    queue.insert(0, unit)
                else:
                    print(f"{experiment}: unit {unit.index} failed again (status {status}): "
                          f"{' '.join(unit.names)}", file=sys.stderr, flush=True)
                    failed += unit.names
            time.sleep(0.2)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: every child checkpoints and stops
        pool.stop_all()
        print(f"{experiment}: stopped; every child wrote last.pt. Run the same command again to "
              "resume.", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)
    return failed
