"""The drivers' grid (docs/experiments.md): specs -> plan -> units -> here, a pool or SLURM ->
collect. A unit (a pack of prompt runs on one frozen T5, or a solo run) is one plan line."""
import contextlib
import hashlib
import json
import math
import os
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

import model as M
import tables
from ept import cli, files, options, outputs, runfolder, runtime, tasks

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"


# --- a driver's command line ---------------------------------------------------------------------
EXECUTION_FLAGS = [  # how runs are launched and where their files go (docs/experiments.md)
    ("--nproc", dict(type=cli.positive_int, default=1, help="GPUs per run (> 1: torchrun)")),
    ("--subprocess", dict(action="store_true", help="each train.py in a fresh process")),
    ("--runs-dir", dict(type=cli.folder, default="runs", help="where run folders go")),
    ("--results-dir", dict(type=cli.folder, default="results", help="<experiment>.plan, .jsonl")),
    ("--prune-ft-checkpoints", dict(action="store_true", help="delete ft runs' .pt at collect")),
    ("--dry-run", dict(action="store_true", help="runs, GPU-hours, wall time, dry_run.tsv only")),
    ("--gpus", dict(type=cli.positive_int, help="a pool of G / --nproc children, own GPUs each")),
    ("--slots", dict(type=cli.positive_int, metavar="N", help="a local pool of N CPU children")),
    ("--slurm", dict(action="store_true", help="submit the plan as SLURM job arrays + collect")),
    ("--slurm-partition", dict(help="--slurm: the partition (default: the cluster's)")),
    ("--slurm-time", dict(metavar="LIMIT", help="--slurm: each task's time limit (4:00:00, 1-12)")),
    ("--slurm-gpus", dict(type=cli.nonnegative_int, metavar="N", help="GPUs per task (--nproc)")),
    ("--slurm-max-tasks", dict(type=cli.positive_int, metavar="M", help="array tasks at once")),
    ("--slurm-after", dict(action="append", default=[], metavar="JOBID", help="after this job")),
    ("--slurm-option", dict(action="append", default=[], metavar="OPT", help="an #SBATCH option")),
    ("--collect", dict(action="store_true", help="train nothing: rows of finished runs, table")),
    ("--pack-size", dict(type=cli.positive_int, help="prompt runs a pack (CUDA: what fits)"))]


def add_execution_args(parser, prefix="--"):  # python -m ept.grid: the --slurm-* ones
    group = parser.add_argument_group("execution and output")
    for flag, keywords in (f for f in EXECUTION_FLAGS if f[0].startswith(prefix)):
        group.add_argument(flag, **keywords)


def parse(parser, argv, script):  # (the driver's arguments, train.py's); args.command
    args, extra = parser.parse_known_args(argv)
    args.command = [sys.executable, str(Path(script).resolve()),
                    *(sys.argv[1:] if argv is None else argv)]
    return args, extra


NOT_THROUGH = "cannot be passed to train.py through a driver: "
REFUSED = {  # train.py's flags a driver does not pass through: why, what instead
    "--out-dir": NOT_THROUGH + "each run's folder is the grid's: pass --runs-dir",
    "--runs": NOT_THROUGH + "the grid makes its own packs: pass --pack-size",
    **{f"--{own}": f"is the grid's own: pass --{own}s (this script's flag) instead"
       for own in ("task", "method", "seed")},  # else every run would train the same one
    "--overwrite": "would start every run over at each rerun: delete its folder to train it again"}


def check_args(parser, args, extra):  # before any run: tasks exist; train.py's flags, spelt out
    known = options.parser._option_string_actions  # every spelling train.py's parser accepts
    for flag in (a.split("=")[0] for a in extra if a.startswith("--") and a != "--"):
        if flag in REFUSED:
            parser.error(f"{flag} {REFUSED[flag]}")
        if flag not in known:
            full = " or ".join(f for f in known if f.startswith(flag))
            parser.error(f"{flag} is neither this script's flag nor train.py's; abbreviations "
                         f"are refused{f' (spell out {full})' * bool(full)}")
    flags, unknown = options.parser.parse_known_args(list(extra))  # a bad value: train.py's error
    if unknown:
        parser.error(f"unrecognized arguments (not train.py's either): {' '.join(unknown)}")
    pools = [flag for flag in ("--slurm", "--gpus", "--slots") if getattr(args, flag[2:])]
    if len(pools) > 1:
        parser.error(f"{' and '.join(pools)}: pass one (--slurm hands each unit to its own array "
                     "task; --gpus and --slots are pools on this machine, of GPUs or CPU cores)")
    for key in (k for k in options.SWEEP if isinstance(getattr(flags, k), list)):
        flag = "--" + key.replace("_", "-")  # train.py would pack them inside each run's folder
        parser.error(f"{flag} {' '.join(map(str, getattr(flags, key)))}: a driver passes one value "
                     "to every run; the experiment sweeps its own values (--values, --seeds, "
                     f"--methods), or run train.py {flag} with several values yourself")
    for task in args.tasks or []:
        meta = Path(args.data_dir) / task / "meta.json"
        if task not in tasks.KNOWN and not meta.exists():
            parser.error(f"unknown task {task!r} (not one of the paper's and no {meta}); tasks: "
                         f"{', '.join(tasks.TASKS)}")


def extra_value(extra, flag, default, cast):  # the last `--flag VALUE` passed through
    values = [extra[i + 1] for i, a in enumerate(extra[:-1]) if a == flag]
    return cast(values[-1]) if values else default


# --- specs, run names and train.py's command lines -----------------------------------------------
def spec(task, method, model, seed, _row=None, **settings):  # _row: extra result columns
    return {"task": task, "method": method, "model": model, "seed": seed, **settings,
            **({"_row": _row} if _row else {})}


def train_argv(settings, out_dir, data_dir=None, extra=()):  # out_dir None: a pack's
    argv = []
    for key, value in ((k, v) for k, v in settings.items() if v is not None and v is not False):
        argv += ["--" + key.replace("_", "-")] + ([] if value is True else [
            f"{value:g}" if isinstance(value, float) else str(value)])
    argv += ["--data-dir", str(data_dir)] if data_dir else []
    return argv + (["--out-dir", str(out_dir)] if out_dir is not None else []) + [*extra]


def pack_argv(specs, run_dirs, data_dir, extra, runs_file):  # (argv, its --runs entries)
    shared = {k: specs[0][k] for k in PACK_SHARED if specs[0].get(k) is not None}
    entries = [{**{k: v for k, v in s.items()
                   if k not in shared and v is not None and v is not False},
                "out_dir": str(run_dir)} for s, run_dir in zip(specs, run_dirs)]
    return train_argv(shared, None, data_dir, [*extra, "--runs", str(runs_file)]), entries


def passed_through(extra):  # per-run pass-through options, typed: they win, the run's name says so
    flags = {a.split("=")[0] for a in extra if a.startswith("--")}
    values = vars(options.parser.parse_known_args(list(extra))[0])
    keys = [key for key, _ in options.NAME_TAGS] + [k for k in options.PER_RUN if k != "resume"]
    return {k: values[k] for k in keys if k in values and "--" + k.replace("_", "-") in flags}


# --- a run's GPU-hours from measured step times: the plan runs its units longest first -----------
# Seconds per step at batch 16, measured by bench.py on one H200 (docs/gpu/run2_*.json: t5-base,
# random weights, bf16, host-bound; test_experiments.py checks them); t5-small/large: by layers.
MEASURED_STEP_S = {"prompt": 16 / 214.49, "ft": 16 / 132.27}  # t5-base, H200: run2_rte_{ept,ft}
LAYER_SCALE = {"t5-small": 0.5, "t5-base": 1.0, "t5-large": 2.0, "other": 1.0}
MEASURED_EVAL_S = 1 / 733.1  # greedy decoding, batch 64, t5-base RTE, per example (run2_rte_ept)
QA_DECODE_FACTOR = 5  # assumed: MRQA answers are many tokens long, classification targets 1 or 2
PAPER_SPLITS = {  # Appendix B.1's (train, validation, test) sizes, for a task not prepared yet
    "cola": (8551, 521, 522), "mrpc": (3668, 204, 204), "rte": (2490, 138, 139),
    "stsb": (5749, 750, 750), "mnli": (382702, 10000, 9815), "qnli": (94743, 10000, 5463),
    "qqp": (353846, 10000, 40430), "sst2": (66349, 1000, 872), "boolq": (9427, 1635, 1635),
    "wic": (5428, 319, 319), "wsc": (554, 52, 52), "multirc": (26243, 1000, 4848),
    "nq": (94071, 10000, 12836), "hotpotqa": (71928, 1000, 5901), "paws": (48401, 1000, 8000),
    "searchqa": (107384, 10000, 16980), "newsqa": (73160, 1000, 4212),
    "winogrande": (39398, 1000, 1267), "yelp": (550000, 10000, 38000),
    "scitail": (22596, 1000, 1304), "cb": (250, 28, 28)}


def size_key(model_name):  # t5-small / t5-base / t5-large when the name says so, else "other"
    return next((size for size in tables.SIZES if size in options.model_tag(model_name)), "other")


def split_sizes(task, data_dir):  # (train, validation, test): meta.json, else the paper's
    if (Path(data_dir or "data") / task / "meta.json").exists():
        splits = tasks.load_meta(data_dir or "data", task)["splits"]
        return tuple(splits.get(split, 0) for split in ("train", "validation", "test"))
    return PAPER_SPLITS.get(task, (10000, 1000, 1000))  # neither prepared nor the paper's: a guess


def run_steps(spec, data_dir, batch_size=16):  # its epochs over the train split, or max_steps
    if spec.get("epochs"):
        return spec["epochs"] * math.ceil(split_sizes(spec["task"], data_dir)[0] / batch_size)
    return spec.get("max_steps") or options.defaults(spec["method"])["max_steps"]


def floor_seconds(spec, batch_size=16):  # the measured (host-bound, bf16) solo step
    return (MEASURED_STEP_S["ft" if spec["method"] == "ft" else "prompt"]
            * LAYER_SCALE[size_key(spec["model"])] * batch_size / 16)


def estimate_hours(spec, data_dir=None, batch_size=16):  # one run's, on 1 or N GPUs
    eval_every = spec.get("eval_every") or options.defaults(spec["method"])["eval_every"]
    _, val, test = split_sizes(spec["task"], data_dir)
    steps = run_steps(spec, data_dir, batch_size)
    decode = QA_DECODE_FACTOR if spec["task"] in tasks.GROUPS["mrqa"] else 1
    eval_s = ((math.ceil(steps / eval_every) * val + test) * MEASURED_EVAL_S
              * LAYER_SCALE[size_key(spec["model"])] * decode)
    return (steps * floor_seconds(spec, batch_size) + eval_s) / 3600


# --- packs: prompt runs of one task, T5, data and schedule in one train.py call; ft: never -------
# On CUDA: the runs that fit in 80 % of the card after T5's weights (a prompt run at batch 16:
# docs/speed.md), at most 16 (past 16 a GPU is compute-bound).
PACK_SHARED = ("task", "model", "fewshot_k", "fewshot_seed", "batch_size")  # a pack's flags
PACK_KEYS = (*PACK_SHARED, "epochs", "max_steps", "eval_every")
RUN_GB = {"t5-small": 1.5, "t5-base": 3.0, "t5-large": 7.0, "other": 3.0}
WEIGHTS_GB = {"t5-small": 0.25, "t5-base": 0.9, "t5-large": 3.0, "other": 1.0}
ASSUMED_GPU_GB = 141  # the H200 the step times were measured on: what a dry run sizes packs for


def memory_pack_size(model, gpu_gb):  # the rule above; at least 1
    size = size_key(model)
    return max(1, min(16, int(0.8 * (gpu_gb - WEIGHTS_GB[size]) / RUN_GB[size])))


def pack_size(args, model):  # on a CPU 1: FLOP-bound, a pack of R costs R steps (docs/packing.md)
    if (size := getattr(args, "pack_size", None)) or not torch.cuda.is_available():
        return size or 1
    return memory_pack_size(model, torch.cuda.get_device_properties(0).total_memory / 1e9)


def make_packs(plan, names, size_of):  # packs of equal PACK_KEYS, <= size_of(model); ft alone
    packs, open_packs = [], {}
    for name in names:
        settings = plan[name][0]
        key, limit = tuple(settings.get(k) for k in PACK_KEYS), size_of(settings["model"])
        key = (name,) if settings["method"] == "ft" or limit <= 1 else key  # alone
        if key not in open_packs:
            packs.append(open_packs.setdefault(key, []))
        open_packs[key].append(name)
        if len(open_packs[key]) >= limit:
            del open_packs[key]
    return packs


# --- the plan: {run name: (options, extra result columns, run folder)} and its units -------------
def plan_runs(specs, args, extra=()):  # the same configuration twice is one run
    plan, through = {}, passed_through(extra)
    for s in specs:
        settings = {k: v for k, v in s.items() if k != "_row"}
        settings.update({k: v for k, v in through.items()
                         if not (k == "max_steps" and settings.get("epochs"))})
        name = options.run_name(settings)
        plan.setdefault(name, (settings, s.get("_row"), Path(args.runs_dir) / name))
    return plan


class Unit:  # one plan line (index: an array task's); a pack's --runs file and its text
    def __init__(self, index, names, dirs, argv, nproc, runs_file=None, runs_text=None):
        self.index, self.names, self.dirs, self.argv = index, names, dirs, argv
        self.runs_file, self.runs_text = runs_file, runs_text
        torchrun = ["torchrun", "--standalone", f"--nproc_per_node={nproc}"]
        self.command = [*([sys.executable] if nproc == 1 else torchrun), str(TRAIN_SCRIPT), *argv]
        self.line = f"cd {shlex.quote(os.getcwd())} && {shlex.join(self.command)}"

    def left(self):  # its runs' folders not finished
        return [run_dir for run_dir in self.dirs if not runfolder.finished(run_dir)]


def make_units(plan, args, extra):  # longest first, packed over every run, finished or not
    batch = extra_value(extra, "--batch-size", 16, int)  # GPU-hours at the pass-through batch
    hours = {name: estimate_hours(spec, args.data_dir, batch) for name, (spec, *_) in plan.items()}
    units, extra = [], [*extra, "--resume"]
    for names in make_packs(plan, sorted(plan, key=lambda n: -hours[n]),
                            lambda model: pack_size(args, model)):
        specs, dirs = [plan[n][0] for n in names], [plan[n][2] for n in names]
        argv, runs_file, text = train_argv(specs[0], dirs[0], args.data_dir, extra), None, None
        if len(names) > 1:  # a pack: its runs file is named by its text
            text = json.dumps(pack_argv(specs, dirs, args.data_dir, extra, "-")[1], indent=1) + "\n"
            name = hashlib.sha1(text.encode()).hexdigest()[:16]
            runs_file = Path(args.results_dir) / "packs" / f"{name}.json"
            argv = pack_argv(specs, dirs, args.data_dir, extra, runs_file)[0]
        units.append(Unit(len(units), names, dirs, argv, args.nproc, runs_file, text))
    return units


def write_plan(path, units):  # written once; another grid's is refused (line i keeps its meaning)
    text = "".join(unit.line + "\n" for unit in units)
    if path.exists() and (old := path.read_text(encoding="utf-8")) != text:
        i = len(os.path.commonprefix([old.splitlines(), text.splitlines()]))  # lines the same
        raise cli.Failure(f"{path} holds another plan (line {i + 1} differs: another grid, "
                          f"flags, pack size or folder); delete it to plan again, or pass "
                          f"another --results-dir")
    for unit in units:  # the packs' runs files first: a plan line never names a missing file
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if not unit.runs_file or unit.runs_file.read_text(encoding="utf-8") == unit.runs_text:
                continue
        files.make_dir(unit.runs_file.parent, "packs folder")  # absent, or cut by a crash
        files.write_text(unit.runs_file, unit.runs_text)
    if not path.exists():
        files.write_text(files.make_dir(path.parent, "results folder") / path.name, text)


# --- running units: here (in this process by runpy) or as children (the pool) --------------------
# In this process (the default) the imports are paid once per grid; as a child (--subprocess,
# --nproc > 1: a pool of one; --gpus, --slots) GPU memory and cached data are freed between units.
STOPS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # train.py checkpoints, exits 128 + sig
OUTPUT_LOCK = threading.Lock()  # the pool's children's lines, whole


def run_in_process(argv):  # `python train.py ARGV` as __main__ here: its exit status
    saved_argv, saved_sigint = sys.argv, signal.getsignal(signal.SIGINT)
    sys.argv = [str(TRAIN_SCRIPT), *argv]
    try:
        runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")
        return 0
    except SystemExit as err:
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr, flush=True)
        return 1 if isinstance(err.code, str) else err.code or 0
    except Exception:  # one broken unit does not stop the grid; reported at the end
        traceback.print_exc()
        return 1
    finally:  # train.py's __main__ ignores Ctrl-C while it exits: the driver's handler comes back
        sys.argv = saved_argv
        signal.signal(signal.SIGINT, saved_sigint)


def run_unit(experiment, unit, args, i, n):  # here; a signal that stops train.py stops us too
    what = f"a pack of {len(unit.names)}: " * (len(unit.names) > 1) + " ".join(unit.names)
    print(f"[{experiment} {i}/{n}] unit {unit.index}: train {what}", flush=True)
    status = run_in_process(unit.argv)
    if status == 0 and runtime.stop_requested():  # it came in the unit's last steps, which finished
        status = 128 + runtime.stop_requested()
    if status - 128 in STOPS:  # the driver stops as train.py did, once it wrote last.pt
        print(f"{experiment}: {signal.Signals(status - 128).name} received: unit {unit.index} "
              "stopped at a step boundary, last.pt written; run the same command again to resume",
              file=sys.stderr, flush=True)
        raise SystemExit(status)
    if status:  # train.py printed its error
        print(f"[{experiment} {i}/{n}] unit {unit.index} failed (exit status {status})",
              file=sys.stderr)


# --- the local pool (--gpus G, --slots N): only this process hands out units (longest first) ----
# A child that dies has its unit started once more (it resumes from last.pt); Ctrl-C, SIGTERM or
# SIGUSR1 stops every child, which checkpoints; the same command again resumes what was left.

def pool_devices(args):  # each child's CUDA_VISIBLE_DEVICES: "0", "2,3" (--nproc 2); --slots ""
    if getattr(args, "slots", None):
        return [""] * args.slots
    if (gpus := args.gpus) % (nproc := args.nproc):
        raise cli.Failure(f"--gpus {gpus} is not a multiple of --nproc {nproc} (GPUs per run)")
    listed = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    visible = [d.strip() for d in listed if d.strip()] or [str(i) for i in range(gpus)]
    if len(visible) < gpus:
        raise cli.Failure(f"--gpus {gpus}, but CUDA_VISIBLE_DEVICES lists {len(visible)}: "
                          f"{','.join(visible)}")
    return [",".join(visible[i * nproc:(i + 1) * nproc]) for i in range(gpus // nproc)]


def run_pool(experiment, units, devices):  # len(devices) children, their output copied here
    labels = [f"GPU {gpus}" if gpus and torch.cuda.is_available() else f"slot {slot}"
              for slot, gpus in enumerate(devices)]
    running, queue, retried, got = {}, list(units), set(), []  # slot -> (process, unit, thread)
    print(f"{experiment}: {len(units)} unit(s) on {len(devices)} child process(es): "
          f"{' | '.join(labels)}", flush=True)
    main = threading.current_thread() is threading.main_thread()  # signals: the main thread's
    old = {sig: signal.signal(sig, lambda sig, _: got.append(sig)) for sig in STOPS} if main else {}
    try:
        while (queue or running) and not got:
            for slot in [s for s in range(len(devices)) if s not in running][:len(queue)]:
                unit = queue.pop(0)
                running[slot] = start_child(unit, devices[slot], labels[slot].lower())
                print(f"{experiment}: unit {unit.index} ({' '.join(unit.names)}) -> "
                      f"{labels[slot]}", flush=True)
            for slot in [s for s, (proc, _, _) in running.items() if proc.poll() is not None]:
                proc, unit, thread = running.pop(slot)
                thread.join()
                left, status, again = unit.left(), proc.returncode, unit.index in retried
                if not left:
                    print(f"{experiment}: unit {unit.index} done", flush=True)
                elif not again and any(outputs.failure(d) is None for d in left):  # once; not
                    retried.add(unit.index)  # failed.txt: a non-finite loss fails the same again
                    queue.insert(0, unit)
                    print(f"{experiment}: unit {unit.index} ended with status {status}; "
                          "resuming it once", flush=True)
                else:
                    print(f"{experiment}: unit {unit.index} failed "
                          f"{'again' if again else 'for good'} (status {status}): "
                          f"{' '.join(unit.names)}", file=sys.stderr, flush=True)
            time.sleep(0.2)
        if got:  # every child checkpoints and stops; back once each, its whole group too, is gone
            for proc, _, _ in running.values():  # to its group, torchrun's ranks too (Ctrl-C: TERM)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM if got[0] == signal.SIGINT else got[0])
            for proc, _, thread in running.values():
                proc.wait()
                thread.join()
                with contextlib.suppress(ProcessLookupError):  # until the whole group is gone
                    while not os.killpg(proc.pid, 0):
                        time.sleep(0.1)
            print(f"{experiment}: {signal.Signals(got[0]).name} received: every child wrote "
                  "last.pt and stopped. Run the same command again to resume.", file=sys.stderr,
                  flush=True)
            raise SystemExit(128 + got[0])
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def start_child(unit, gpus, label):  # on `gpus` (None: ours), in its own session
    env = {"TQDM_DISABLE": "1", **os.environ,  # G progress bars: noise
           **({} if gpus is None else {"CUDA_VISIBLE_DEVICES": gpus})}
    proc = subprocess.Popen(unit.command, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)

    def copy():
        for line in proc.stdout:
            with OUTPUT_LOCK:
                print(f"[u{unit.index} {label}] {line}", end="", flush=True)
    (thread := threading.Thread(target=copy, daemon=True)).start()
    return proc, unit, thread


# --- a driver's run: plan, train what is missing, collect -----------------------------------------
def run_cli(main, name):  # Ctrl-C leaves nothing half-written: one line, exit 130
    try:
        main()
    except KeyboardInterrupt:
        print(f"{name}: interrupted (Ctrl-C); run the same command again to resume",
              file=sys.stderr)
        sys.exit(130)
    finally:  # a further Ctrl-C while exiting: no traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_driver(experiment, specs, args, extra, floor=None):
    """Train what is missing (here, a pool, SLURM), collect, print the table (`floor(args)`: a
    baseline's rows first); exit 1 while runs are unfinished."""
    plan = plan_runs(specs, args, extra)
    if args.dry_run:
        sys.path.insert(0, str(TRAIN_SCRIPT.with_name("scripts")))
        import costs  # the dry run's FLOP model and wall time, off every other path
        return costs.dry_run(experiment, plan, args, extra)[0]
    if not args.collect:
        units = make_units(plan, args, extra)
        path = Path(args.results_dir) / f"{experiment}.plan"
        devices = (pool_devices(args) if args.gpus or args.slots  # checked before the plan
                   else [None] if args.subprocess or args.nproc > 1 else None)  # one child
        if args.slurm:  # sbatch here, MaxArraySize, the #SBATCH lines: checked before the plan
            max_array, opts = check(), dict(slurm_options(args), job_name=f"ept-{experiment}")
            sbatch_script(path, len(units), log_dir=path.parent, **opts)
        write_plan(path, units)
        if args.slurm:
            if not args.pack_size and pack_size(args, None) == 1:  # a login node without a GPU
                print(f"{experiment}: no GPU here, so one run a unit: pass --pack-size N to pack N")
            collect_cmd = f"cd {shlex.quote(os.getcwd())} && {shlex.join(args.command)} --collect"
            submit(path, collect_cmd, max_array=max_array, **opts)
            return []
        todo = [unit for unit in units if unit.left()]
        print(f"{experiment}: plan {path}: {len(units)} unit(s), {len(todo)} to run", flush=True)
        if devices:
            run_pool(experiment, todo, devices)
        for i, unit in enumerate([] if devices else todo):
            run_unit(experiment, unit, args, i + 1, len(todo))
    # what is not finished now (a unit that failed here may have been finished by another driver)
    rows, missing = collect(experiment, plan, args)
    rows = (floor(args) if floor else []) + rows
    if rows:
        print(tables.experiment_table(experiment, rows))  # the table report.py writes
    if missing:
        sys.exit(1)
    return rows


def slurm_options(args):  # submit's keywords from the --slurm-* flags
    return dict(partition=args.slurm_partition, time=args.slurm_time,
                max_parallel=args.slurm_max_tasks, extra=args.slurm_option,
                gpus_per_task=getattr(args, "nproc", 1) if args.slurm_gpus is None
                else args.slurm_gpus, after=args.slurm_after)


# --- result rows ---------------------------------------------------------------------------------
def result_row(experiment, settings, run_dir, extra_fields=None):  # --no-test: score None
    raw_config = files.read_json((run_dir := Path(run_dir)) / "config.json", "run configuration")
    config = {**raw_config, **M.prompt_options(raw_config)}  # older runs' option names, defaults
    tested = not config.get("no_test")
    metrics = files.read_json(run_dir / "metrics.json", "test metrics") if tested else {}
    norm = n_inference = None
    if (run_dir / "prompt.pt").exists():  # Eq. 4 on the best checkpoint's P'; inference keeps its
        prompt, _ = outputs.load_folded_prompt(run_dir / "prompt.pt")  # distinct rows (EPT: one)
        norm, n_inference = prompt.norm(dim=1).mean().item(), int(prompt.unique(dim=0).numel())
    _, norms, steps, scores = outputs.curves(run_dir, missing_ok=True)  # from log.jsonl
    val_score, best_step = max(zip(scores, steps), key=lambda pair: pair[0], default=(None, None))
    ran = {key: value if config.get(key) is None else config[key]  # what train.py ran with wins
           for key, value in {**options.defaults(settings["method"]), **settings}.items()}
    ran["fewshot_seed"] = ran["fewshot_seed"] if ran["fewshot_k"] else None
    digest, scores = hashlib.sha1(), run_dir / "metrics.json"  # which training: trained again,
    for file in (run_dir / "config.json", scores if scores.exists() else run_dir / "log.jsonl"):
        digest.update((file.name + files.read_text(file, "run file")).encode())  # another id
    return {"experiment": experiment, "run": str(run_dir), **ran,
            "model_tag": options.model_tag(settings["model"]), **(extra_fields or {}),
            "score": metrics.get("score"), "test": metrics if tested else None, "tested": tested,
            "val_score": val_score, "best_step": best_step,
            "n_trainable": config.get("n_trainable"), "n_inference": n_inference,
            "prompt_norm": norm, "final_prompt_norm": norms[-1] if norms else None,
            "training": digest.hexdigest()[:16], "config": raw_config}


def locked(path):  # `path`.lock, flock'ed until the file returned is closed: one writer at once
    return open(files.flock(files.make_dir(Path(path).parent) / f"{Path(path).name}.lock")[0])


def append_row_once(results, row):  # "added", "replaced" (trained again) or None, under a lock
    with locked(results):
        rows = files.read_jsonl(results, "results file", missing_ok=True, fix=outputs.RESULTS_FIX)
        same = [r for r in rows if r.get("run") == row["run"]]
        if not same:
            outputs.append_jsonl(results, [row])
            return "added"
        if all(r.get("training") == row.get("training") for r in same):
            return None
        files.write_jsonl(results, [row if r is same[0] else r for r in rows if
                                    r.get("run") != row["run"] or r is same[0]])
        return "replaced"


def collect(experiment, plan, args):  # each finished run's row once in the results: (rows, todo)
    results = Path(args.results_dir) / f"{experiment}.jsonl"
    rows, missing, done = [], [], []
    for name, (settings, fields, run_dir) in plan.items():
        if outputs.status(run_dir) != "done":
            missing.append(name)
            continue
        rows.append(result_row(experiment, settings, run_dir, fields))
        done.append(append_row_once(results, rows[-1]))
        prune = args.prune_ft_checkpoints and settings["method"] == "ft"  # T5 + AdamW state, twice
        for file in ("best.pt", "last.pt") if prune else ():
            with files.fault(f"--prune-ft-checkpoints: cannot delete {run_dir / file}",
                             fix="; its row is written, rerun without the flag"):  # read-only
                (run_dir / file).unlink(missing_ok=True)
    failed = {n: outputs.failure(d) for n in missing if outputs.status(d := plan[n][2]) == "failed"}
    again = f", {done.count('replaced')} replaced: their run was trained again" * (
        "replaced" in done)
    print(f"{experiment}: {len(plan)} runs, {len(rows)} finished ({done.count('added')} rows "
          f"added now{again}), {len(missing)} not finished"
          f"{f' ({len(failed)} failed)' * bool(failed)} -> {results}", flush=True)
    for name, why in failed.items():  # stopped for good: running the unit again fails the same way
        print(f"{experiment}: FAILED {name}: {why}", file=sys.stderr)
    path = Path(args.results_dir) / f"{experiment}.failed.json"  # {run folder: why}, report.py's
    with locked(path) if path.exists() or failed else contextlib.nullcontext():
        old = {}  # absent or unreadable: rewritten from what this plan knows
        with contextlib.suppress(OSError, ValueError):
            old = json.loads(path.read_text(encoding="utf-8"))
        ours = {str(run_dir) for _, _, run_dir in plan.values()}  # other grids' entries are kept
        now = {k: v for k, v in (old if isinstance(old, dict) else {}).items() if k not in ours}
        now.update({str(plan[name][2]): why for name, why in failed.items()})
        files.write_json(path, now) if now else path.unlink(missing_ok=True)
    if len(missing) > len(failed):
        print(f"{experiment}: NOT FINISHED (see each folder's log.jsonl): "
              f"{' '.join(n for n in missing if n not in failed)}", file=sys.stderr)
    return rows, missing


# --- the plan on SLURM: sbatch scripts, submission -----------------------------------------------
def time_seconds(text):  # a SLURM time limit ('90', '4:00:00', '1-12', ...) in s; None: none
    if text.upper() in ("INFINITE", "UNLIMITED", "0"):  # SLURM: a limit of 0 is no limit
        return None
    if not (m := re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)):
        raise cli.Failure(f"{text!r} is not a SLURM time limit (minutes, H:MM:SS or D-HH:MM:SS)")
    days, parts = m[1], [int(p) for p in m.groups()[1:] if p]  # d-h[:m[:s]]; m[:s]; h:m:s
    units = (3600, 60, 1) if days else [(60,), (60, 1), (3600, 60, 1)][len(parts) - 1]
    return int(days or 0) * 86400 + sum(p * u for p, u in zip(parts, units))


def _option(value, what):  # sbatch splits an #SBATCH line at spaces and reads one line each
    text = str(value)
    if what == "job id" and not re.fullmatch(r"\d+(_\d+)?", text):
        raise cli.Failure(f"{text!r} is not a SLURM job id (a number, as sbatch prints it)")
    if not text or re.search(r"\s", text):
        raise cli.Failure(f"the {what} {text!r} cannot go on an #SBATCH line (empty, or spaces)")
    return text


def _script(comments, options, log_dir, log_name, extra, body, skip=()):  # an sbatch script
    return "\n".join([
        "#!/bin/bash", *comments, *[f"#SBATCH --{key}" + ("" if value is True else f"={value}")
                                    for key, value in options.items() if value],
        f"#SBATCH --chdir={_option(Path.cwd().resolve(), 'working folder')}",
        f"#SBATCH --output={_option(Path(log_dir).resolve(), 'log folder')}/{log_name}",
        *[f"#SBATCH {_option(opt, 'sbatch option')}" for opt in extra if not opt.startswith(skip)],
        "", *body]) + "\n"


def sbatch_script(plan_path, n_units, *, job_name, log_dir, partition=None, time=None,
                  gpus_per_task=1, max_parallel=None, extra=(), after=(), first=0,
                  signal_s=300):  # task i runs plan line first+i+1; USR1 signal_s before the limit
    if n_units < 1:
        raise cli.Failure(f"the plan {plan_path} has no units: nothing to submit")
    if time and (time_seconds(time) or math.inf) <= signal_s:  # None: no limit
        raise cli.Failure(f"the time limit {time} is not longer than the {signal_s} s the unit "
                          f"gets to checkpoint before it (signal_s)")
    plan, name = Path(plan_path).resolve(), _option(job_name, "job name")
    head = (f"the {n_units} unit{'s' * (n_units != 1)} of {plan}, one SLURM array task each "
            "(task i runs line i+1)." if not first else f"lines {first + 1}-{first + n_units} of "
            f"{plan}, one SLURM array task each (task i runs line {first}+i+1).")
    after = ":".join(_option(job, "job id") for job in after)
    options = {"job-name": name, "array": f"0-{n_units - 1}"
               + (f"%{max_parallel}" if max_parallel else ""),
               "ntasks": 1, "dependency": after and f"afterany:{after}",
               "gres": gpus_per_task and f"gpu:{gpus_per_task}",
               "partition": partition and _option(partition, "partition"),
               "time": time and _option(time, "time limit"), "requeue": True,
               "signal": f"B:USR1@{signal_s}"}
    comments = [f"# {name}: {head}", "# Written by ept/grid.py. Submit again with `sbatch <this "
                "file>`: a finished unit exits at once,", "# an interrupted one resumes. One unit "
                "without SLURM: SLURM_ARRAY_TASK_ID=i bash <this file>."]
    task = Path(__file__).with_name("slurm_task.sh").read_text()  # after the #SBATCH lines
    return _script(comments, options, log_dir, f"{name}-%A_%a.log", ["--open-mode=append", *extra],
                   [f"plan={shlex.quote(str(plan))}",
                    task.replace("$((task + 1))", f"$((task + {first + 1}))")])


def check():  # before anything is written: sbatch is here; the cluster's MaxArraySize
    if shutil.which("sbatch") is None:
        raise cli.Failure("sbatch is not on PATH: --slurm needs a SLURM cluster's commands here "
                          "(a test cluster here, as root: bash scripts/slurm_cluster.sh start)")
    with contextlib.suppress(OSError, subprocess.TimeoutExpired, AttributeError):  # none found
        shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                               timeout=60).stdout
        return int(re.search(r"^MaxArraySize\s*=\s*(\d+)", shown, re.MULTILINE).group(1))
    return 1001  # SLURM's default


def _sbatch(text, path, what):  # submit, then write it to `path`: its job id
    done = subprocess.run(["sbatch", "--parsable"], input=text, capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise cli.Failure(f"sbatch refused {what} ({path.name}): {reason}")
    files.write_text(path, text)
    return done.stdout.strip().split(";")[0]  # --parsable: "<id>" or "<id>;<cluster>"


def submit(plan_path, collect_cmd, *, job_name=None, max_array=None, **opts):
    """The plan as job arrays (one after another past MaxArraySize), then the collect job."""
    plan = Path(plan_path).resolve()
    units = files.read_text(plan, "plan").splitlines()
    if any(not line.strip() for line in units):
        raise cli.Failure(f"the plan {plan} has an empty line: every line must be a unit")
    max_array, job_name = max_array or check(), job_name or plan.stem
    logs, arrays, starts = plan.parent / "slurm-logs", [], range(0, max(len(units), 1), max_array)

    def script(first, **wait):
        return sbatch_script(plan, min(max_array, len(units) - first), job_name=job_name,
                             log_dir=logs, first=first, **{**opts, **wait})
    texts = [script(first) for first in starts]  # every check before anything is submitted
    fresh = not logs.exists()
    files.make_dir(logs, "log folder")  # SLURM does not create the folder of --output
    for k, first in enumerate(starts):
        text = script(first, after=arrays[-1:]) if arrays else texts[0]  # after the one before
        name = plan.stem + (f".{k}" if len(texts) > 1 else "") + ".sbatch"
        try:
            arrays.append(_sbatch(text, plan.with_name(name), "the job array"))
        except cli.Failure as err:
            if fresh and not arrays:
                logs.rmdir()
            if not arrays:
                raise
            raise cli.Failure(f"{err} (arrays {' '.join(arrays)} were submitted: scancel "
                              f"them, then submit again)") from None
    ids, name = ":".join(arrays), _option(job_name, "job name")  # the collect job: after them all
    text = _script([f"# {name}: collect and report once every task of array {ids} ended (afterany:",
                    "# finished, failed or cancelled). Written by ept/grid.py."],
                   {"job-name": f"{name}-collect", "dependency": f"afterany:{ids}", "ntasks": 1,
                    "partition": opts.get("partition") and _option(opts["partition"], "partition")},
                   logs, f"{name}-collect-%j.log", opts.get("extra", ()), [
        f"echo \"== array {ids}: task states (as long as SLURM keeps them, MinJobAge)\"",
        f"squeue --noheader --states=all --jobs={ids.replace(':', ',')} "
        "--format='task %K: %T' | sort -V", "echo \"== $(date -Is) collect\"", collect_cmd],
        skip=("--gres", "--gpus", "--array", "--signal"))
    try:
        collect_id = _sbatch(text, plan.with_name(plan.stem + ".collect.sbatch"),
                             "the collect job")
    except cli.Failure as err:
        raise cli.Failure(f"{err} (the array {' '.join(arrays)} was submitted and runs without "
                          f"it: scancel {' '.join(arrays)}, or collect by hand later: "
                          f"{collect_cmd})") from None
    at_once = f", {opts['max_parallel']} at once" if opts.get("max_parallel") else ""
    after = f", after job {' '.join(opts['after'])}" if opts.get("after") else ""
    several = (f" in {len(arrays)} arrays, each after the one before (MaxArraySize): "
               f"{' '.join(arrays)}" if len(arrays) > 1 else "")
    ids, array = ",".join([*arrays, collect_id]), arrays[0] if len(arrays) == 1 else "<array>"
    units = f"{len(units)} unit{'s' * (len(units) != 1)}"
    print(f"submitted {job_name}: array job {arrays[-1]} ({units}{several}{at_once}"
          f"{after}), collect job {collect_id} after it\n  follow:  squeue -j {ids}\n"
          f"  logs:    {logs}/{job_name}-{array}_<task>.log, "
          f"{logs}/{job_name}-collect-{collect_id}.log\n"
          f"  stop:    scancel {ids.replace(',', ' ')}   (running units checkpoint; "
          f"submitting the same plan again finishes what is left)", flush=True)
    return arrays[-1], collect_id


@cli.script
def main(argv=None):  # python -m ept.grid PLAN --collect CMD [the drivers' --slurm-* flags]
    parser = cli.Parser(prog="python -m ept.grid", description="Submit a plan file to SLURM: job "
                        "arrays, then the collect job after them.")
    parser.add_argument("plan", help="the plan file: one unit (a bash command) a line")
    parser.add_argument("--collect", required=True, metavar="CMD", help="the collect job's line")
    add_execution_args(parser, "--slurm-")
    args = parser.parse_args(argv)
    submit(args.plan, args.collect, **slurm_options(args))


if __name__ == "__main__":
    main()
