"""A plan file on SLURM: one job array (one unit, i.e. one line of the plan, per array task) and a
collect job that runs after every task ended (afterany); docs/experiments.md, "SLURM", reads the
scripts line by line.

A plan is a UTF-8 text file, one unit a line, each a complete bash command that can run from any
folder. A unit is idempotent: it exits 0 when its unit is finished (or was finished already),
non-zero when it failed, and on SIGTERM it checkpoints and exits non-zero, so that running it again
resumes it. The collect command (a shell line) appends every finished run's row once and reports.

    python -m ept.slurm results/table1.plan --collect "python ablate.py table1 --collect" \
        --time 12:00:00 --max-parallel 16              # writes results/table1.sbatch, submits it
    slurm.submit("results/table1.plan", collect_cmd, time="12:00:00", max_parallel=16)   # the same
"""
import argparse
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from ept import cli, errors, files

SIGNAL_S = 300  # USR1 this many seconds before the time limit: time to write last.pt and exit


def time_seconds(text):
    """A SLURM time limit ('90', '4:00:00', '1-12', '2-00:30:00', ...) in seconds; None: none."""
    if text.upper() in ("INFINITE", "UNLIMITED", "0"):  # SLURM: a limit of 0 is no limit
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise errors.Failure(f"{text!r} is not a SLURM time limit (minutes, H:MM:SS or D-HH:MM:SS)")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:  # days-hours[:minutes[:seconds]]
        return ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    if c is not None:  # hours:minutes:seconds
        return (a * 60 + b) * 60 + c
    return a * 60 + (b or 0)  # minutes[:seconds]


def _option(value, what):
    """A value for an #SBATCH line: sbatch splits those lines at spaces and reads one line each."""
    text = str(value)
    if not text or re.search(r"\s", text):
        raise errors.Failure(f"the {what} {text!r} cannot go on an #SBATCH line (it is empty or "
                             "has spaces)")
    return text


def _job_id(text):
    if not re.fullmatch(r"\d+(_\d+)?", str(text)):
        raise errors.Failure(f"{text!r} is not a SLURM job id (a number, as sbatch prints it)")
    return str(text)


def _units(n):
    return f"{n} unit{'s' if n != 1 else ''}"


def sbatch_script(plan_path, n_units, *, job_name, log_dir, partition=None, time=None,
                  gpus_per_task=1, max_parallel=None, extra=(), cpus_per_task=None,
                  signal_s=SIGNAL_S, workdir=None, after=(), first=0):
    """The job array's sbatch script: task i runs line first+i+1 of the plan (first: the lines
    earlier arrays run, past MaxArraySize). gpus_per_task=0: no GPU line. after: job ids the
    array waits for (afterany), e.g. an earlier plan's that shares runs."""
    if n_units < 1:
        raise errors.Failure(f"the plan {plan_path} has no units: nothing to submit")
    limit = time_seconds(time) if time else None
    if limit is not None and limit <= signal_s:
        raise errors.Failure(f"the time limit {time} is not longer than the {signal_s} s the unit "
                             f"gets to checkpoint before it (signal_s)")
    plan, logs = Path(plan_path).resolve(), Path(log_dir).resolve()
    workdir = Path(workdir or Path.cwd()).resolve()
    name = _option(job_name, "job name")
    array = f"0-{n_units - 1}" + (f"%{max_parallel}" if max_parallel else "")
    lines = ["#!/bin/bash",
             f"# {name}: the {_units(n_units)} of {plan}, one SLURM array task each (task i runs "
             "line i+1)." if not first else f"# {name}: lines {first + 1}-{first + n_units} of "
             f"{plan}, one SLURM array task each (task i runs line {first}+i+1).",
             "# Written by ept/slurm.py. Submit again with `sbatch <this file>`: a finished unit "
             "exits at once,",
             "# an interrupted one resumes. One unit without SLURM: SLURM_ARRAY_TASK_ID=i bash "
             "<this file>.",
             f"#SBATCH --job-name={name}", f"#SBATCH --array={array}", "#SBATCH --ntasks=1"]
    optional = {"dependency": after and "afterany:" + ":".join(map(_job_id, after)),
                "cpus-per-task": cpus_per_task, "gres": gpus_per_task and f"gpu:{gpus_per_task}",
                "partition": partition and _option(partition, "partition"),
                "time": time and _option(time, "time limit")}
    lines += [f"#SBATCH --{key}={value}" for key, value in optional.items() if value]
    lines += ["#SBATCH --requeue", f"#SBATCH --signal=B:USR1@{signal_s}",
              f"#SBATCH --chdir={_option(workdir, 'working folder')}",
              f"#SBATCH --output={_option(logs, 'log folder')}/{name}-%A_%a.log",
              "#SBATCH --open-mode=append"]  # a requeued task adds to its log, not a new one
    lines += [f"#SBATCH {_option(option, 'sbatch option')}" for option in extra]
    body = _BODY.replace("PLAN", shlex.quote(str(plan)))
    lines.append(body.replace("$((task + 1))", f"$((task + {first + 1}))") if first else body)
    return "\n".join(lines) + "\n"


_BODY = r"""
plan=PLAN
task=${SLURM_ARRAY_TASK_ID:?"run under sbatch, or set SLURM_ARRAY_TASK_ID=i for line i+1"}
unit=$(sed -n "$((task + 1))p" "$plan")
[ -n "$unit" ] || { echo "no line $((task + 1)) in $plan" >&2; exit 2; }
echo "== $(date -Is) task $task of ${SLURM_ARRAY_JOB_ID:-(no job)}," \
     "start $((${SLURM_RESTART_COUNT:-0} + 1)), on $(hostname): $unit"

# USR1: the time limit is near (--signal); TERM: scancel, preemption or scontrol requeue; INT:
# Ctrl-C when run by hand. Each sends SIGTERM to every process of the unit: train.py writes its
# checkpoint and exits, and this shell waits for it (the unit runs in the background: bash runs a
# trap only between commands). setsid gives the unit its own process group, so the signal reaches
# train.py behind a `cd ... &&`; the unit's bash outlives SIGTERM (trap :) until train.py exits.
got= n=0
stop() { got=$1 n=$((n + 1)); kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null; }
trap 'stop USR1' USR1
trap 'stop TERM' TERM
trap 'stop INT' INT
setsid bash -c "trap : TERM; $unit" &
pid=$!
while :; do
  seen=$n; wait "$pid"; rc=$?
  if [ "$rc" -le 128 ] || [ "$n" = "$seen" ]; then break; fi  # the unit's status, not a trap's
done

if [ "$rc" -eq 0 ]; then
  echo "== $(date -Is) unit finished"
elif [ "$got" = USR1 ] && [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
  echo "== $(date -Is) time limit near: unit stopped (exit $rc); requeueing this task to resume it"
  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${task}"
elif [ -n "$got" ]; then
  echo "== $(date -Is) unit stopped by SIG$got (exit $rc); it resumes when run again"
else
  echo "== $(date -Is) unit failed (exit $rc): $unit"
fi
exit "$rc"
"""


def collect_script(collect_cmd, array_id, *, job_name, log_dir, partition=None, extra=(),
                   workdir=None):
    """The collect job's sbatch script: after every task of the array ended (afterany), the task
    states SLURM still holds, then the collect command."""
    logs = Path(log_dir).resolve()
    workdir = Path(workdir or Path.cwd()).resolve()
    name = _option(job_name, "job name")
    lines = ["#!/bin/bash",
             f"# {name}: collect and report once every task of array {array_id} ended (afterany:",
             "# finished, failed or cancelled). Written by ept/slurm.py.",
             f"#SBATCH --job-name={name}-collect", f"#SBATCH --dependency=afterany:{array_id}",
             "#SBATCH --ntasks=1"]
    if partition:
        lines.append(f"#SBATCH --partition={_option(partition, 'partition')}")
    lines += [f"#SBATCH --chdir={_option(workdir, 'working folder')}",
              f"#SBATCH --output={_option(logs, 'log folder')}/{name}-collect-%j.log"]
    lines += [f"#SBATCH {_option(option, 'sbatch option')}" for option in extra
              if not option.startswith(("--gres", "--gpus", "--array", "--signal"))]
    lines += ["", f"echo \"== array {array_id}: task states (as long as SLURM keeps them, "
              "MinJobAge)\"",
              f"squeue --noheader --states=all --jobs={array_id.replace(':', ',')} "
              "--format='task %K: %T' | sort -V",
              "echo \"== $(date -Is) collect\"", collect_cmd]
    return "\n".join(lines) + "\n"


DEFAULT_MAX_ARRAY = 1001  # SLURM's MaxArraySize when the cluster does not set it


def check():
    """Before anything is written: sbatch is here; the cluster's MaxArraySize (array indices go
    up to it, exclusive: a larger plan is submitted as several arrays, one after another)."""
    if shutil.which("sbatch") is None:
        raise errors.Failure("sbatch is not on PATH: --slurm needs a SLURM cluster's commands "
                             "here (a test cluster on this machine, as root: "
                             "bash scripts/slurm_cluster.sh start)")
    try:
        shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                               timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        shown = ""
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", shown, re.MULTILINE)
    return int(found.group(1)) if found else DEFAULT_MAX_ARRAY


def _sbatch(text, path, what):
    """Submit a script (on stdin), then write it to `path`; its job id, or one sentence, nothing
    written."""
    done = subprocess.run(["sbatch", "--parsable"], input=text, capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise errors.Failure(f"sbatch refused {what} ({path.name}): {reason}")
    files.write_text(path, text)
    return done.stdout.strip().split(";")[0]  # --parsable: "<id>" or "<id>;<cluster>"


def submit(plan_path, collect_cmd, *, job_name=None, log_dir=None, max_array=None, **opts):
    """Submit the plan as a job array (past the cluster's MaxArraySize, `max_array`: several, each
    after the one before), then the collect job after them (afterany); write the scripts beside
    the plan (<plan>.sbatch or <plan>.<k>.sbatch, <plan>.collect.sbatch); print and return the
    job ids (the last array's: it ends last)."""
    plan = Path(plan_path).resolve()
    units = files.read_text(plan, "plan").splitlines()
    if any(not line.strip() for line in units):
        raise errors.Failure(f"the plan {plan} has an empty line: every line must be a unit")
    max_array = max_array or check()
    job_name = job_name or plan.stem
    logs = Path(log_dir or plan.parent / "slurm-logs").resolve()
    starts = range(0, max(len(units), 1), max_array)
    texts = [sbatch_script(plan, min(max_array, len(units) - first), job_name=job_name,
                           log_dir=logs, first=first, **opts) for first in starts]
    fresh = not logs.exists()
    files.make_dir(logs, "log folder")  # SLURM does not create the folder of --output
    arrays = []
    for k, text in enumerate(texts):
        if arrays:  # the next array starts once the one before ended
            text = _after(text, arrays[-1], opts.get("after"))
        name = plan.stem + (f".{k}" if len(texts) > 1 else "") + ".sbatch"
        try:
            arrays.append(_sbatch(text, plan.with_name(name), "the job array"))
        except errors.Failure as err:
            if fresh and not arrays:
                logs.rmdir()
            if not arrays:
                raise
            raise errors.Failure(f"{err} (arrays {' '.join(arrays)} were submitted: scancel "
                                 f"them, then submit again)") from None
    array_id = arrays[-1]
    shared = {k: opts[k] for k in ("partition", "extra", "workdir") if k in opts}
    collect_text = collect_script(collect_cmd, ":".join(arrays), job_name=job_name, log_dir=logs,
                                  **shared)
    try:
        collect_id = _sbatch(collect_text, plan.with_name(plan.stem + ".collect.sbatch"),
                             "the collect job")
    except errors.Failure as err:
        raise errors.Failure(f"{err} (the array {' '.join(arrays)} was submitted and runs without "
                             f"it: scancel {' '.join(arrays)}, or collect by hand later: "
                             f"{collect_cmd})") from None
    print_submitted(job_name, arrays, collect_id, len(units), logs, opts)
    return array_id, collect_id


def _after(text, array_id, after):
    """An array script made to wait for the array before it (and not for `after` any more)."""
    line = next((ln for ln in text.splitlines() if ln.startswith("#SBATCH --dependency=")), None)
    wait = f"#SBATCH --dependency=afterany:{array_id}"
    if line:
        return text.replace(line + "\n", wait + "\n", 1)
    return text.replace("#SBATCH --ntasks=1\n", f"#SBATCH --ntasks=1\n{wait}\n", 1)


def print_submitted(job_name, arrays, collect_id, n_units, logs, opts):
    array = arrays[0] if len(arrays) == 1 else "<array>"
    at_once = f", {opts['max_parallel']} at once" if opts.get("max_parallel") else ""
    after = f", after job {' '.join(opts['after'])}" if opts.get("after") else ""
    several = (f" in {len(arrays)} arrays, each after the one before (MaxArraySize): "
               f"{' '.join(arrays)}" if len(arrays) > 1 else "")
    ids = ",".join([*arrays, collect_id])
    print(f"submitted {job_name}: array job {arrays[-1]} ({_units(n_units)}{several}{at_once}"
          f"{after}), collect job {collect_id} after it\n"
          f"  follow:  squeue -j {ids}\n"
          f"  logs:    {logs}/{job_name}-{array}_<task>.log, "
          f"{logs}/{job_name}-collect-{collect_id}.log\n"
          f"  stop:    scancel {ids.replace(',', ' ')}   (running units checkpoint; "
          f"submitting the same plan again finishes what is left)", flush=True)


parser = argparse.ArgumentParser(prog="python -m ept.slurm", description="Submit a plan file to "
                                 "SLURM: one job array, then the collect job after it.")
parser.add_argument("plan", help="the plan file: one unit (a bash command) a line")
parser.add_argument("--collect", required=True, metavar="CMD",
                    help="the shell line that collects and reports after every task ended")
parser.add_argument("--job-name", help="default: the plan's name without .plan")
parser.add_argument("--log-dir", help="the tasks' logs (default: slurm-logs/ beside the plan)")
parser.add_argument("--partition", help="default: the cluster's default partition")
parser.add_argument("--time", help="each task's time limit (SLURM's format: 4:00:00, 1-12, ...)")
parser.add_argument("--gpus-per-task", type=cli.nonnegative_int, default=1,
                    help="GPUs per unit (--gres=gpu:N; 0: no GPU line)")
parser.add_argument("--cpus-per-task", type=cli.positive_int)
parser.add_argument("--max-parallel", type=cli.positive_int, help="tasks at once (--array=...%%M)")
parser.add_argument("--signal-s", type=cli.positive_int, default=SIGNAL_S, help="USR1 this many "
                    "seconds before the time limit: the unit checkpoints, the task requeues")
parser.add_argument("--after", action="append", default=[], metavar="JOBID",
                    help="start the array once this job ended (afterany), e.g. an earlier plan's "
                         "array that shares runs with this one (repeatable)")
parser.add_argument("--sbatch-option", action="append", default=[], metavar="OPT", dest="extra",
                    help="an #SBATCH line of both jobs, e.g. --sbatch-option=--account=nlp "
                         "(repeatable)")


@errors.script
def main(argv=None):
    args = vars(parser.parse_args(argv))  # the other options are submit's keywords, by name
    submit(args.pop("plan"), args.pop("collect"), **args)


if __name__ == "__main__":
    main()
