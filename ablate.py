"""The paper's experiment grids as thin drivers over train.py: Tables 1, 2, 4, 6 and Figures 5/12, 7, 8, 9.

Each sub-experiment is a list of train.py argument lists. A run whose folder already holds
metrics.json is not trained again (an unfinished folder is resumed with --resume), and one row per
finished run (its configuration, test metrics, trainable parameters, prompt norm) is appended once to
results/<experiment>.jsonl, which report.py turns into the paper's tables and figures. Run folders
are named by configuration alone, runs/<task>_<method>_<model>[_<options>]_s<seed>, so a run two
experiments share (EPT with h = 1 on BoolQ is a Table 1 cell and a Figure 5 point) is trained once.
Table 3 (few-shot) is fewshot.py, which uses the same machinery.

    python ablate.py table1 --dry-run                 # every run, its status, count and GPU-hour estimate
    python ablate.py table1                           # Table 1: 13 tasks x 6 methods x 3 sizes x 3 seeds
    python ablate.py table1 --lr-search               # + the SuperGLUE lr search of Appendix B.2
    python ablate.py table2                           # Table 2: MRQA + Others, t5-base
    python ablate.py table4                           # Table 4: ATTEMPT setting (epochs, PT n=100, EPT + 1x1 layer)
    python ablate.py init | hidden | broadcast | lr | structure     # Table 6, Figures 5/12, 7, 8, 9
    python ablate.py lr --models t5-base              # Figure 8 for one size (default: t5-base and t5-large)
    python ablate.py hidden --nproc 4                 # each unit on 4 GPUs through torchrun
    python ablate.py steer                            # the steering benchmark (docs/experiments.md)
    python ablate.py init --model smoke/tiny-t5 --data-dir smoke/data --runs-dir smoke/runs \\
        --results-dir smoke/results --seeds 0 --max-steps 4 --eval-every 2     # CPU smoke run

Flags this script does not know (--max-steps, --eval-every, --random-init, --batch-size, ...) go to
train.py unchanged, after the experiment's own, so they win, at any --pack-size (a pack's --runs entries
carry them too). Those that name runs (--max-steps, --eval-every, --lr, ...) show in the run name; for the
others (--batch-size, --dropout, ...) use another --runs-dir when you change them. One value each: a sweep
(--hidden-size 1 5) is refused, and so are --task/--method/--seed (--tasks/--methods/--seeds). --subprocess runs each train.py in a fresh process
(frees GPU memory and cached data between runs); --dry-run also appends its plan to
<results-dir>/dry_run.tsv, which run_all.sh sums counting each shared run once. docs/experiments.md
lists every setting and the measured step times the GPU-hour estimate rests on.

On a GPU, prompt runs that share task, model, data and schedule are trained in packs, several runs on one
frozen T5 in one `train.py --runs FILE` call (--pack-size; default: what fits the GPU, 1 on a CPU); the dry
run also lists the packs and the GPU-hours unpacked and packed at fp32 and bf16 (packed: a model).

The plan: each call writes <results-dir>/<experiment>.plan, one unit (a pack or a solo run) a line, each a
complete shell command that any engine may run (idempotent: `train.py ... --resume`), then runs its units:
here one after another, or with --gpus G on G / --nproc pinned child processes (a local pool), and appends
each finished run's row once (the collect step; `--collect` alone does only that). Ctrl-C stops everything
(exit 130); the same command again resumes.

    python ablate.py hidden --gpus 8                  # 8 children, one per GPU, units longest first
    python ablate.py hidden --collect                 # rows of the finished runs, once, and the table
"""
import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import model as M
import prepare_data
from ept import cli, decoding, errors, files, options, registry, runs, signals, tables

# --- the paper's task groups (prepare_data.py's registry, in the paper's column order) and grids ----------

GLUE, SUPERGLUE, MRQA, OTHERS = (registry.GROUPS[g] for g in ("glue", "superglue", "mrqa", "others"))
ALL_TASKS = list(registry.TASKS)  # the 21 tasks
SIZES = ["t5-small", "t5-base", "t5-large"]
SEEDS = [0, 1, 2]  # 3 runs per main result (Table 1 caption)
LR_GRID = {"prompt": [0.003, 0.01, 0.03, 0.1, 0.3], "ft": [1e-5, 1e-4, 1e-3]}  # SuperGLUE lr search
FIG8_SIZES = ["t5-base", "t5-large"]  # §5.3: "... on both T5-base and T5-Large"
BATCH_SIZE = 16  # Appendix B.2; Table 4's steps per epoch follow the batch actually passed to train.py
HIDDEN = [1, 5, 10, 50, 100, 500, 1000]  # Figures 5 and 12
STRUCTURES = {"none": {}, "layernorm": {"layer_norm": True}, "residual": {"residual": True},
              "relu": {"activation": "relu"}, "tanh": {"activation": "tanh"},
              "sigmoid": {"activation": "sigmoid"}}  # Figure 9: ReLU, Tanh, Sigmoid (the public EPT code's three)

# --- the GPU-hour estimate: measured step times ------------------------------------------------------
# Seconds per optimizer step at batch 16, measured by bench.py on one NVIDIA H200 (docs/gpu/run2_*.json:
# random-weight t5-base, bf16 autocast, after an untimed pass over the same shapes). The GPU waits on the
# host at this batch size, so a step costs about the same at any input length (RTE 0.0746 s, SST-2 0.0687 s):
# prompt methods 16 / 214.5 ex/s (RTE, ept); ft 16 / 132.3 ex/s (RTE, ft). t5-small and t5-large were not
# measured: host-bound time follows the number of layers (6, 12, 24 per stack), so they are t5-base's
# scaled by 0.5 and 2. tests/test_experiments.py checks these numbers against the JSON files.
MEASURED_STEP_S = {"prompt": 16 / 214.49, "ft": 16 / 132.27}  # t5-base, H200, docs/gpu/run2_rte_{ept,ft}.json
LAYER_SCALE = {"t5-small": 0.5, "t5-base": 1.0, "t5-large": 2.0, "other": 1.0}
MEASURED_EVAL_S = 1 / 733.1  # greedy decoding, batch 64, t5-base RTE, per example (docs/gpu/run2_rte_ept.json)
QA_DECODE_FACTOR = 5  # MRQA answers are many tokens long, classification targets one or two (assumed)


# --- one run: options -> name -> train.py argv -> result row --------------------------------------

def defaults(method):
    """train.py's defaults for `method` (the paper's main setting): what a run name leaves out (options.defaults)."""
    return options.defaults(method)


NAME_TAGS = runs.NAME_TAGS
model_tag = runs.model_tag


def run_name(spec):
    """<task>_<method>_<model>[_<non-default options>]_s<seed>, e.g. boolq_ept_t5-base_h50_s1 (runs.run_name
    against train.py's defaults)."""
    return runs.run_name(spec, defaults(spec["method"]))


def train_argv(spec, out_dir, data_dir=None, extra=()):
    """train.py's command line for one run: its options as flags (one name per concept), then `extra`."""
    argv = []
    for key, value in spec.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if data_dir:
        argv += ["--data-dir", str(data_dir)]
    return argv + ["--out-dir", str(out_dir), *extra]


def prompt_stats(run_dir):
    """(mean row norm of the saved P' (Eq. 4 on the best checkpoint's prompt), parameters kept for
    inference = distinct rows x d: one row for EPT/EPT*, whose rows are copies)."""
    path = Path(run_dir) / "prompt.pt"
    if not path.exists():
        return None, None
    prompt, _ = M.load_folded_prompt(path)
    return prompt.norm(dim=1).mean().item(), int(prompt.unique(dim=0).numel())


def log_stats(run_dir):
    """Best validation score and its step, and the last logged prompt norm μ_t, from log.jsonl."""
    best, best_step, last_norm = None, None, None
    for event in files.read_jsonl(Path(run_dir) / "log.jsonl", what="run log", torn_tail_ok=True, missing_ok=True):
        if event.get("event") == "eval" and event.get("score") is not None:
            if best is None or event["score"] > best:
                best, best_step = event["score"], event.get("step")
        elif event.get("event") == "train" and event.get("prompt_norm") is not None:
            last_norm = event["prompt_norm"]
    return best, best_step, last_norm


def result_row(experiment, spec, run_dir, extra_fields=None):
    """One results row: the full configuration, the test metrics, parameters and prompt norms. A --no-test run
    is a finished run too: its row has "tested": false and no score (None), never a missing row."""
    run_dir = Path(run_dir)
    config = files.read_json(run_dir / "config.json", "run configuration")
    config = {**config, **M.prompt_options(config)}  # older runs' option names and missing options
    tested = not config.get("no_test")  # a --no-test run finished without a test score: its row says so
    metrics = files.read_json(run_dir / "metrics.json", "test metrics") if tested else {}
    norm, n_inference = prompt_stats(run_dir)
    val_score, best_step, last_norm = log_stats(run_dir)
    options = {**defaults(spec["method"]), **spec}
    for key in options:  # what train.py actually ran with (pass-through flags included) wins over the spec
        if config.get(key) is not None:
            options[key] = config[key]
    if not options["fewshot_k"]:
        options["fewshot_seed"] = None
    return {"experiment": experiment, "run": str(run_dir), **options, "model_tag": model_tag(spec["model"]),
            **(extra_fields or {}),
            "score": metrics.get("score"), "test": metrics if tested else None, "tested": tested, "val_score": val_score, "best_step": best_step,
            "n_trainable": config.get("n_trainable"), "n_inference": n_inference,
            "prompt_norm": norm, "final_prompt_norm": last_norm}


# --- the GPU-hour estimate --------------------------------------------------------------------------

def _size_key(model_name):
    tag = model_tag(model_name)
    return next((s for s in SIZES if s in tag), "other")


def _split_sizes(task, data_dir):
    meta = Path(data_dir or "data") / task / "meta.json"
    if meta.exists():
        splits = files.read_json(meta, "task description").get("splits", {})
        return splits.get("train", 0), splits.get("validation", 0), splits.get("test", 0)
    return registry.PAPER_SPLITS.get(task, (10000, 1000, 1000))


def estimate_hours(spec, data_dir=None, batch_size=16, eval_every=None):
    """GPU-hours of one run from the measured step times above (ideal scaling: the same on 1 or N GPUs).

    Validations: every `eval_every` steps (default: the run's own, e.g. once per epoch in Table 4)."""
    eval_every = eval_every or spec.get("eval_every") or defaults(spec["method"])["eval_every"]
    scale = LAYER_SCALE[_size_key(spec["model"])]
    train, val, test = _split_sizes(spec["task"], data_dir)
    steps = (spec["epochs"] * math.ceil(train / batch_size) if spec.get("epochs")
             else spec.get("max_steps", defaults(spec["method"])["max_steps"]))
    step_s = MEASURED_STEP_S["ft" if spec["method"] == "ft" else "prompt"] * scale * batch_size / 16
    decode = QA_DECODE_FACTOR if spec["task"] in MRQA else 1
    eval_s = (math.ceil(steps / eval_every) * val + test) * MEASURED_EVAL_S * scale * decode
    return (steps * step_s + eval_s) / 3600


# --- packing: several prompt runs in one train.py call (one frozen T5; packing.py, docs/packing.md) ------
# A pack is runs that may share one T5 forward: same task, same T5, same data (the few-shot sample) and the
# same schedule; every other option (method, seed, lr, prompt length, hidden size, ...) is per run. The
# driver's data dir, max length and pass-through train.py flags are the same for every run of one call, so
# they are shared by construction. `ft` trains T5 itself and is never packed.

PACK_KEYS = ("task", "model", "fewshot_k", "fewshot_seed", "epochs", "max_steps", "eval_every", "batch_size")
MAX_PACK = 16  # a pack's step is R x 16 examples: past 16 runs a GPU is compute-bound (see the cost model)
# The --pack-size rule on CUDA: runs that fit in 80 % of the card's memory after T5's weights, at the memory of
# one prompt run of batch 16 (activations for the backward, fp32; docs/speed.md measured ept on t5-base RTE at
# 3.0 GB peak on an H200 with the weights), capped at MAX_PACK. 80 GB: 16 for t5-small/base, 8 for t5-large.
RUN_GB = {"t5-small": 1.5, "t5-base": 3.0, "t5-large": 7.0, "other": 3.0}
WEIGHTS_GB = {"t5-small": 0.25, "t5-base": 0.9, "t5-large": 3.0, "other": 1.0}
ASSUMED_GPU_GB = 141  # the H200 the step times were measured on: what a dry run sizes packs for


def pack_key(options):
    """What runs of one pack must share (None: `ft`, never packed)."""
    if options["method"] == "ft":
        return None
    return tuple((k, options.get(k)) for k in PACK_KEYS)


def memory_pack_size(model, gpu_gb):
    """Runs per pack that fit a GPU of `gpu_gb` GB (the rule above); at least 1."""
    size = _size_key(model)
    return max(1, min(MAX_PACK, int(0.8 * (gpu_gb - WEIGHTS_GB[size]) / RUN_GB[size])))


def pack_size(args, model, device=None):
    """--pack-size, else: on CUDA the memory rule for this machine's GPU 0; on a CPU 1 (no packing: a CPU is
    FLOP-bound, a pack of R costs R solo steps; docs/packing.md). `device` "dry": the assumed H200."""
    if getattr(args, "pack_size", None):
        return args.pack_size
    if device == "dry":
        return memory_pack_size(model, ASSUMED_GPU_GB)
    import torch
    if torch.cuda.is_available():
        return memory_pack_size(model, torch.cuda.get_device_properties(0).total_memory / 1e9)
    return 1


def make_packs(plan, names, size_of):
    """The runs `names` (in that order) grouped into packs: runs of one pack_key, at most size_of(model) per
    pack, each pack in the order of its first run; `ft` and size 1 give packs of one."""
    packs, open_ = [], {}
    for name in names:
        options = plan[name][0]
        key, limit = pack_key(options), size_of(options["model"])
        if key is None or limit <= 1:
            packs.append([name])
            continue
        if key not in open_:
            open_[key] = []
            packs.append(open_[key])
        open_[key].append(name)
        if len(open_[key]) >= limit:
            del open_[key]
    return packs


# The packed GPU-hour model (not measured: no GPU was lent to the work that added it). A GPU step of a pack
# of R runs costs max(host floor, R x compute per run): the floor is the measured solo step (MEASURED_STEP_S:
# bf16, where the H200 waits on the host), compute is the step's FLOPs (bench.train_flops: RTE-like inputs,
# 1.4 TFLOP per t5-base step of 16) over the card's dense peak x an assumed utilisation. Solo runs cost
# max(floor, compute) the same way, which at bf16 is the measured step. Validation is per run, unpacked.
PEAK_TFLOPS = {"bf16": 989.0, "fp32": 67.0}  # H200 dense: bf16 tensor cores; fp32 without TF32 (no tensor cores)
ASSUMED_UTILISATION = 0.4
ASSUMED_TOKENS = (200, 3)  # source tokens computed per example (RTE padded to the batch's longest + prompt), target
T5_SHAPES = {"t5-small": (512, 2048, 8, 6), "t5-base": (768, 3072, 12, 12), "t5-large": (1024, 4096, 16, 24)}


@functools.cache
def step_flops(size, full, batch_size=16):
    """FLOPs of one training step of `batch_size` examples (bench.py's formula; `full`: ft's weight gradients)."""
    import types

    import bench
    d, ff, heads, layers = T5_SHAPES.get(size, T5_SHAPES["t5-base"])
    cfg = types.SimpleNamespace(d_model=d, d_ff=ff, num_heads=heads, d_kv=64, vocab_size=32128, is_gated_act=False,
                                num_layers=layers, num_decoder_layers=layers)
    return bench.train_flops(cfg, *ASSUMED_TOKENS, full) * batch_size


def floor_seconds(spec, batch_size=16):
    """The measured (host-bound, bf16) seconds of one solo step: estimate_hours' step time."""
    return MEASURED_STEP_S["ft" if spec["method"] == "ft" else "prompt"] * LAYER_SCALE[_size_key(spec["model"])] \
        * batch_size / 16


def step_seconds(spec, precision, runs=1, batch_size=16):
    """Modelled seconds of one optimizer step of `runs` packed runs like `spec` (1: a solo run)."""
    size = _size_key(spec["model"])
    ft = spec["method"] == "ft"
    floor = floor_seconds(spec, batch_size)
    compute = step_flops(size, ft, batch_size) / (PEAK_TFLOPS[precision] * 1e12 * ASSUMED_UTILISATION)
    return max(floor, runs * compute)


def pack_hours(plan, pack, hours, args, extra, precision):
    """{run: (unpacked GPU-hours, its share of the pack's GPU-hours = the pack's / R)} at `precision`;
    `hours`: plan_hours (the measured estimate, whose validation part is kept as it is, per run)."""
    batch = _extra_value(extra, "--batch-size", 16, int)
    unpacked, eval_h, steps = {}, {}, {}
    for name in pack:
        spec = plan[name][0]
        steps[name] = run_steps(spec, args, extra)
        eval_h[name] = hours[name] - steps[name] * floor_seconds(spec, batch) / 3600
        unpacked[name] = steps[name] * step_seconds(spec, precision, 1, batch) / 3600 + eval_h[name]
    train_h = max(steps.values()) * step_seconds(plan[pack[0]][0], precision, len(pack), batch) / 3600
    share = (train_h + sum(eval_h.values())) / len(pack)
    return {name: (unpacked[name], share) for name in pack}


def run_steps(spec, args, extra):
    """Optimizer steps of one run as estimate_hours counts them (with the pass-through --max-steps)."""
    batch = _extra_value(extra, "--batch-size", 16, int)
    max_steps = _extra_value(extra, "--max-steps", None, int)
    if spec.get("epochs"):
        return spec["epochs"] * math.ceil(_split_sizes(spec["task"], args.data_dir)[0] / batch)
    return max_steps or spec.get("max_steps", defaults(spec["method"])["max_steps"])


# --- the driver: a plan of units, run in this process, by a local pool (--gpus), or by any engine ---------
# A unit is a pack of prompt runs or a solo run, and one complete shell line of the plan file
# <results-dir>/<experiment>.plan (docs/experiments.md, "The plan"): `cd <cwd> && python train.py ... --resume`,
# which is idempotent (a finished run exits at once, a half-done one resumes from last.pt, a fresh one starts;
# a pack's --runs file is named by its content). Units train; they write no result rows: the collect step
# (run_experiment after the units, or `--collect` alone, e.g. as an engine's last job) appends every finished
# run's row once, under the results file's lock.

PACK_SHARED = ("task", "model", "fewshot_k", "fewshot_seed")  # on the command line; the rest per run


def pack_argv(specs, run_dirs, data_dir, extra, runs_file):
    """train.py's command line for a pack, and the --runs FILE content: the shared options as flags, per run
    its other options (train.py's option names) and out_dir."""
    shared = {k: specs[0][k] for k in PACK_SHARED if specs[0].get(k) is not None}
    entries = [{**{k: v for k, v in spec.items() if k not in shared and v is not None and v is not False},
                "out_dir": str(run_dir)} for spec, run_dir in zip(specs, run_dirs)]
    argv = train_argv(shared, "-", data_dir, [*extra, "--runs", str(runs_file)])
    i = argv.index("--out-dir")
    return argv[:i] + argv[i + 2:], entries


class Unit:
    """One line of the plan: its runs (names), train.py's argv, how long it takes, and its shell line."""

    def __init__(self, names, argv, hours, nproc, runs_file=None, runs_text=None):
        self.names, self.argv, self.hours = names, argv, hours
        self.runs_file, self.runs_text = runs_file, runs_text  # a pack's --runs file, written with the plan
        script = str(Path(__file__).with_name("train.py"))
        launcher = [sys.executable] if nproc == 1 else ["torchrun", "--standalone", f"--nproc_per_node={nproc}"]
        self.command = [*launcher, script, *argv]
        self.line = f"cd {shlex.quote(os.getcwd())} && {shlex.join(self.command)}"

    def finished(self, plan):
        return all(runs.finished(plan[name][2]) for name in self.names)


def make_units(plan, args, extra):
    """The plan's units, longest first (a pack lasts as long as its longest run): packs of the runs of one
    pack_key (pack_size on this machine), made over every run, finished or not, so that the same grid always
    gives the same units; each pack's --runs file named by its content (write_plan writes it)."""
    hours = plan_hours(plan, args, extra)
    order = sorted(plan, key=lambda name: -hours[name])
    units = []
    for names in make_packs(plan, order, lambda model: pack_size(args, model)):
        specs, dirs = [plan[n][0] for n in names], [plan[n][2] for n in names]
        if len(names) == 1:
            argv = train_argv(specs[0], dirs[0], args.data_dir, [*extra, "--resume"])
        else:
            argv, entries = pack_argv(specs, dirs, args.data_dir, [*extra, "--resume"], Path("-"))
            text = json.dumps(entries, indent=1) + "\n"
            runs_file = Path(args.results_dir) / "packs" / f"{hashlib.sha1(text.encode()).hexdigest()[:16]}.json"
            argv[argv.index("--runs") + 1] = str(runs_file)
        units.append(Unit(names, argv, max(hours[n] for n in names), args.nproc,
                          *((runs_file, text) if len(names) > 1 else ())))
        units[-1].index = len(units) - 1  # its line in the plan file (0-based: an array task's index)
    return units


def plan_path(args, experiment):
    return Path(args.results_dir) / f"{experiment}.plan"


def write_plan(path, units):
    """The plan file, written once: a rerun of the same grid finds the same lines; another grid in the same
    results folder is refused (line i of a plan must keep its meaning for an engine's index)."""
    text = "".join(unit.line + "\n" for unit in units)
    if path.exists():
        old = path.read_text(encoding="utf-8")
        if old != text:
            lines = old.splitlines()
            pairs = enumerate(zip(lines, text.splitlines()))
            i = next((i for i, (a, b) in pairs if a != b), min(len(lines), len(units)))
            raise errors.Failure(f"{path} holds another plan (line {i + 1} differs: another grid, flags, pack size or "
                             f"folder); delete it to plan again, or pass another --results-dir")
    for unit in units:  # the packs' runs files first: a plan line never names a missing file
        if unit.runs_file is not None and not unit.runs_file.exists():
            unit.runs_file.parent.mkdir(parents=True, exist_ok=True)
            files.write_text(unit.runs_file, unit.runs_text)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_text(path, text)


def collect_command(args):
    """The shell line that appends every finished run's row once (and prints the experiment's table)."""
    return f"cd {shlex.quote(os.getcwd())} && {shlex.join([*args.command, '--collect'])}"


def plan_runs(specs, args, extra=()):
    """{run name: (train.py options, extra result columns, run folder)}: the pass-through flags that name runs
    win over the experiment's values, and the same configuration twice (a shared default) is one run."""
    plan, through = {}, passed_through(extra)
    for s in specs:
        options = {k: v for k, v in s.items() if k != "_row"}
        options.update({k: v for k, v in through.items() if not (k == "max_steps" and options.get("epochs"))})
        plan.setdefault(run_name(options), (options, s.get("_row"), Path(args.runs_dir) / run_name(options)))
    return plan


def run_experiment(experiment, specs, args, extra=()):
    """Train what is missing (units in this process, or by a pool of --gpus), then collect: (rows, problems).

    `specs`: train.py options per run (task, method, model, seed, ...) and "_row", extra result columns that
    are not train.py options (the swept value). --collect only collects; --dry-run only estimates."""
    plan = plan_runs(specs, args, extra)
    if args.dry_run:
        return dry_run(experiment, plan, args, extra)
    failed = []
    if not getattr(args, "collect", False):
        units = make_units(plan, args, extra)
        path = plan_path(args, experiment)
        write_plan(path, units)
        if args.slurm:
            submit_slurm(experiment, path, args)
            return [], []
        todo = [unit for unit in units if not unit.finished(plan)]
        print(f"{experiment}: plan {path}: {len(units)} unit(s), {len(todo)} to run", flush=True)
        if args.gpus:
            failed = run_pool(experiment, todo, args, pool_devices(args))
        else:
            failed = [n for i, unit in enumerate(todo) for n in run_unit(experiment, unit, args, i + 1, len(todo))]
    rows, missing = collect(experiment, plan, args)
    return rows, sorted(set(failed) | set(missing))


def submit_slurm(experiment, path, args):
    """--slurm: the plan as one SLURM job array (task i runs line i) and the collect command as a job after it
    (slurm.py writes the sbatch scripts beside the plan and prints the job ids and how to follow them)."""
    try:
        from ept import slurm
    except ImportError:
        raise errors.Failure("--slurm needs slurm.py beside this script, which this checkout lacks") from None
    if not args.pack_size and pack_size(args, None) == 1:  # a login node without a GPU sized the packs
        print(f"{experiment}: note: this machine has no GPU, so each unit is one run; pass --pack-size N "
              "(PACK_SIZE=N in run_all.sh) to pack N prompt runs a unit on the cluster's GPUs", flush=True)
    slurm.submit(path, collect_command(args), job_name=f"ept-{experiment}", partition=args.slurm_partition,
                 time=args.slurm_time, gpus_per_task=args.nproc if args.slurm_gpus is None else args.slurm_gpus,
                 max_parallel=args.slurm_max_tasks, extra=args.slurm_option, after=args.slurm_after)


STOP_STATUSES = (128 + signal.SIGTERM, 128 + signal.SIGUSR1)  # train.py stopped by a signal, last.pt written


def run_unit(experiment, unit, args, i, n):
    """One unit in this process (train.main), or as its command (--subprocess, torchrun); its failed runs.
    A signal that stops train.py (SIGTERM, SIGUSR1) stops the driver with train.py's status."""
    import train  # imported late: --dry-run and report-only use need no training stack
    t0 = time.time()
    what = f"a pack of {len(unit.names)}: {' '.join(unit.names)}" if len(unit.names) > 1 else unit.names[0]
    print(f"[{experiment} {i}/{n}] unit {unit.index}: train {what}", flush=True)
    if args.nproc > 1 or args.subprocess:
        status, interrupted = run_command(unit.command)
        if interrupted:  # Ctrl-C: the child was asked to checkpoint (SIGTERM) and has stopped
            print(f"{experiment}: interrupted (Ctrl-C): unit {unit.index} stopped at a step boundary, last.pt "
                  "written; run the same command again to resume", file=sys.stderr, flush=True)
            raise SystemExit(130)
        if status in STOP_STATUSES or -status in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            raise SystemExit(status if status > 0 else 128 - status)  # train.py said why and how to resume
        if status:  # the child printed its error
            print(f"[{experiment} {i}/{n}] unit {unit.index} failed (exit status {status})", file=sys.stderr)
    else:
        try:
            train.main(unit.argv)
            if signals._stop_signal:  # it came during the unit's last steps, which finished: stop before the next
                raise SystemExit(128 + signals._stop_signal[0])
        except SystemExit as err:  # train.py printed its sentence; a signal stops the driver, a fault this unit
            if err.code in (*STOP_STATUSES, 128 + signal.SIGINT):
                name = signal.Signals(err.code - 128).name
                print(f"{experiment}: {name} received: unit {unit.index} stopped at a step boundary, last.pt "
                      "written; run the same command again to resume", file=sys.stderr, flush=True)
                raise SystemExit(err.code) from None
            if isinstance(err.code, str):
                print(err, file=sys.stderr, flush=True)
        except Exception:  # one broken unit does not stop the grid; reported at the end
            traceback.print_exc()
    print(f"[{experiment} {i}/{n}] {time.time() - t0:.1f}s", flush=True)
    return [name for name in unit.names if not runs.finished(unit_dir(unit, name))]


def unit_dir(unit, name):
    return Path(unit.argv[unit.argv.index("--out-dir") + 1]) if "--out-dir" in unit.argv else \
        Path(next(e["out_dir"] for e in files.read_json(Path(unit.argv[unit.argv.index("--runs") + 1]))
                  if Path(e["out_dir"]).name == name))


def run_command(command):
    """A unit's command as a child process; SIGTERM/SIGUSR1/SIGINT to this driver are passed on to it (it
    checkpoints and stops); (its exit status, whether Ctrl-C stopped it)."""
    proc = subprocess.Popen(command, start_new_session=True)
    got = []

    def forward_signal(sig, _):
        got.append(sig)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM if sig == signal.SIGINT else sig)
    forward = {sig: signal.signal(sig, forward_signal) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        return proc.wait(), signal.SIGINT in got
    finally:
        for sig, handler in forward.items():
            signal.signal(sig, handler)


# --- the local pool: --gpus G ------------------------------------------------------------------------
# One launcher (this process) hands the units, longest first, to G / --nproc child processes, each pinned to its
# own GPUs with CUDA_VISIBLE_DEVICES. Only the launcher hands out work, so the children need no locks. A child
# that dies has its unit started once more (it resumes from last.pt); Ctrl-C (or SIGTERM) stops every child,
# which checkpoints; a rerun of the same command resumes whatever was left, whoever stopped.

def pool_devices(args):
    """One entry per child: the CUDA_VISIBLE_DEVICES it gets ("0", or "2,3" with --nproc 2)."""
    nproc = args.nproc
    if args.gpus % nproc:
        raise errors.Failure(f"--gpus {args.gpus} is not a multiple of --nproc {nproc} (GPUs per run)")
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    visible = visible or [str(i) for i in range(args.gpus)]
    if len(visible) < args.gpus:
        raise errors.Failure(f"--gpus {args.gpus}, but CUDA_VISIBLE_DEVICES lists {len(visible)}: {','.join(visible)}")
    return [",".join(visible[i * nproc:(i + 1) * nproc]) for i in range(args.gpus // nproc)]


def _group_gone(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def run_pool(experiment, units, args, devices):
    """Run `units` (longest first) on len(devices) children; the runs of units that failed twice."""
    queue, running, retried, failed = list(units), {}, set(), []
    env = {**os.environ}
    env.setdefault("TQDM_DISABLE", "1")  # G progress bars on one terminal are noise; log.jsonl has every step
    out_lock = threading.Lock()
    print(f"{experiment}: {len(units)} unit(s) on {len(devices)} child process(es), GPUs {' | '.join(devices)}",
          flush=True)

    def pump(proc, prefix):
        for line in proc.stdout:
            with out_lock:
                sys.stdout.write(prefix + line)
                sys.stdout.flush()

    def start(slot, unit):
        i = unit.index
        proc = subprocess.Popen(unit.command, env={**env, "CUDA_VISIBLE_DEVICES": devices[slot]},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)  # its own group: Ctrl-C reaches it through us only
        thread = threading.Thread(target=pump, args=(proc, f"[u{i} gpu {devices[slot]}] "), daemon=True)
        thread.start()
        running[slot] = (proc, unit, thread)
        print(f"{experiment}: unit {i} ({' '.join(unit.names)}) -> GPU {devices[slot]}", flush=True)

    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, signal.default_int_handler) if in_main else None
    try:
        while queue or running:
            for slot in range(len(devices)):
                if slot not in running and queue:
                    start(slot, queue.pop(0))
            for slot, (proc, unit, thread) in list(running.items()):
                if proc.poll() is None:
                    continue
                thread.join()
                del running[slot]
                i = unit.index
                if proc.returncode == 0 and unit.finished(plan_of_unit(unit)):
                    print(f"{experiment}: unit {i} done", flush=True)
                elif i not in retried:
                    retried.add(i)
                    print(f"{experiment}: unit {i} ended with status {proc.returncode}; resuming it once", flush=True)
                    queue.insert(0, unit)
                else:
                    print(f"{experiment}: unit {i} failed again (status {proc.returncode}): {' '.join(unit.names)}",
                          file=sys.stderr, flush=True)
                    failed += unit.names
            time.sleep(0.2)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: every child checkpoints and stops
        for proc, _, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _, thread in running.values():
            proc.wait()
            thread.join()
            while not _group_gone(proc.pid):  # torchrun's ranks, if any, finish their checkpoint too
                time.sleep(0.1)
        print(f"{experiment}: stopped; every child wrote last.pt. Run the same command again to resume.",
              file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)
    return failed


def plan_of_unit(unit):
    """{name: (None, None, run folder)}: what Unit.finished needs, from the unit's own argv."""
    return {name: (None, None, unit_dir(unit, name)) for name in unit.names}


def plan_hours(plan, args, extra):
    """Estimated GPU-hours of each run of the plan (with the pass-through --max-steps, --batch-size, ...)."""
    batch = _extra_value(extra, "--batch-size", 16, int)
    eval_every = _extra_value(extra, "--eval-every", None, int)  # None: each run's own (Table 4: per epoch)
    max_steps = _extra_value(extra, "--max-steps", None, int)
    hours = {}
    for name, (spec, _, _) in plan.items():
        spec = {**spec, **({"max_steps": max_steps} if max_steps and not spec.get("epochs") else {})}
        hours[name] = estimate_hours(spec, args.data_dir, batch, eval_every)
    return hours


def append_row_once(results, row):
    """Append `row` to the results file unless a row of its run folder is there: checked and written under
    the file's lock, so two collect steps at once never double a row (one write per row: never a torn one)."""
    with files.locked(results):
        if any(r.get("run") == row["run"] for r in files.read_jsonl(results, what="results file", missing_ok=True,
                                                                     fix=files.RESULTS_FIX)):
            return False
        files.append_jsonl(results, [row])
        return True


def collect(experiment, plan, args):
    """Every finished run's row appended once to results/<experiment>.jsonl (ft checkpoints pruned with
    --prune-ft-checkpoints); (rows in plan order, runs not finished)."""
    results = Path(args.results_dir) / f"{experiment}.jsonl"
    rows, missing, added = [], [], 0
    for name, (options, fields, run_dir) in plan.items():
        if runs.status(run_dir) != "done":
            missing.append(name)
            continue
        row = result_row(experiment, options, run_dir, fields)
        added += append_row_once(results, row)
        rows.append(row)
        if args.prune_ft_checkpoints and options["method"] == "ft":  # full T5 + AdamW state, twice per run
            for file in ("best.pt", "last.pt"):
                try:
                    (run_dir / file).unlink(missing_ok=True)
                except OSError as err:  # a read-only runs folder: the row is written, the checkpoint stays
                    raise files.FileFault(f"--prune-ft-checkpoints: cannot delete {run_dir / file}: "
                                          f"{files.why(err)}; its row is written, rerun without the flag") from None
    failed = {name: runs.failure(plan[name][2]) for name in missing if runs.status(plan[name][2]) == "failed"}
    print(f"{experiment}: {len(plan)} runs, {len(rows)} finished ({added} rows added now), {len(missing)} not "
          f"finished{f' ({len(failed)} failed)' if failed else ''} -> {results}", flush=True)
    for name, why in failed.items():  # stopped for good: running the unit again fails the same way
        print(f"{experiment}: FAILED {name}: {why}", file=sys.stderr)
    failed_file = Path(args.results_dir) / f"{experiment}.failed.json"  # report.py lists them in index.md
    if failed:
        files.write_json(failed_file, {str(plan[name][2]): why for name, why in failed.items()})
    else:
        failed_file.unlink(missing_ok=True)
    if len(missing) > len(failed):
        print(f"{experiment}: NOT FINISHED (see each folder's log.jsonl): "
              f"{' '.join(n for n in missing if n not in failed)}", file=sys.stderr)
    return rows, missing


def dry_run(experiment, plan, args, extra):
    """List every run with its status and estimated GPU-hours, the packs the runs still to do would be trained
    in, then parseable summary lines: the wall time on the GPUs given (--gpus), and
    the GPU-hours unpacked and packed at fp32 and bf16 (packed: a model, see PEAK_TFLOPS)."""
    hours = plan_hours(plan, args, extra)
    total = todo = longest = 0.0
    n_todo = 0
    states = {name: runs.status(run_dir) for name, (_, _, run_dir) in plan.items()}
    todo_names = sorted((n for n in plan if states[n] != "done"), key=lambda n: -hours[n])  # as work() walks it
    packs = make_packs(plan, todo_names, lambda model: pack_size(args, model, "dry"))
    figures = {name: {p: (hours[name], hours[name]) for p in PEAK_TFLOPS} for name in plan}  # done: no packing
    pack_of = {}
    for i, pack in enumerate(packs):
        for precision in PEAK_TFLOPS:
            for name, pair in pack_hours(plan, pack, hours, args, extra, precision).items():
                figures[name][precision] = pair
        for name in pack:
            pack_of[name] = i
    lines = []
    for name, (spec, _, run_dir) in plan.items():
        state = states[name]
        total += hours[name]
        if state != "done":
            todo += hours[name]
            n_todo += 1
            longest = max(longest, hours[name])
        where = f"  pack {pack_of[name]} ({len(packs[pack_of[name]])} runs)" if name in pack_of else ""
        print(f"  {state:<7} {hours[name]:7.2f} GPU-h  {name}{where}")
        f32, b16 = figures[name]["fp32"], figures[name]["bf16"]
        lines.append(f"{experiment}\t{state}\t{hours[name]:.4f}\t{name}\t{f32[0]:.4f}\t{f32[1]:.4f}\t{b16[0]:.4f}"
                     f"\t{b16[1]:.4f}\t{pack_of.get(name, '')}\n")
    files.append_lines(Path(args.results_dir) / "dry_run.tsv", lines)  # run_all.sh sums it, each run once
    sums = {p: [sum(figures[n][p][k] for n in todo_names) for k in (0, 1)] for p in PEAK_TFLOPS}
    # the headline: the precision this call trains at (train.py's default fp32 unless --dtype bf16), packed as
    # this call packs (GPU-hours of a unit: its runs' shares; a pack of one is a solo run)
    precision = "bf16" if _extra_value(extra, "--dtype", "fp32", str) == "bf16" else "fp32"
    packed = any(len(p) > 1 for p in packs)
    units = [sum(figures[n][precision][1] for n in pack) for pack in packs]
    todo_h = sum(units)
    slots = args.slurm_max_tasks or (args.gpus or args.nproc) // args.nproc
    longest_unit = max(units, default=0.0)
    low, high = wall_hours(todo_h, longest_unit, slots * args.nproc, args.nproc)
    print(f"DRY-RUN {experiment} runs={len(plan)} to_train={n_todo} gpu_hours={todo_h:.1f} at {precision} "
          f"({'packed' if packed else 'unpacked'}; measured bf16 unpacked: {todo:.1f}, all runs: {total:.1f}); "
          f"wall ~{low:.1f}-{high:.1f} h with {slots} unit(s) at once x {args.nproc} GPU(s) (--gpus "
          f"{slots * args.nproc}, or {slots} SLURM array tasks at once; longest unit {longest_unit / args.nproc:.1f} h; "
          f"ideal scaling within a run assumed)")
    sizes = sorted({len(p) for p in packs}, reverse=True)
    print(f"DRY-RUN-PACKS {experiment} to_train={n_todo} packs={len(packs)} (sizes {'/'.join(map(str, sizes)) or '-'}; "
          f"--pack-size {args.pack_size or 'for a ' + str(ASSUMED_GPU_GB) + ' GB GPU'}) GPU-hours to go: "
          f"fp32 {sums['fp32'][0]:.1f} unpacked, {sums['fp32'][1]:.1f} packed; "
          f"bf16 {sums['bf16'][0]:.1f} unpacked, {sums['bf16'][1]:.1f} packed "
          f"(packed and fp32 figures: a FLOP model at {ASSUMED_UTILISATION:.0%} of the H200's peak, not measured)")
    return [], []


def wall_hours(gpu_hours, longest, gpus, nproc):
    """Wall time of units totalling `gpu_hours` on `gpus` GPUs, `nproc` per unit: at least max(gpu_hours /
    gpus, the longest unit), and, each free slot taking the next unit, at most gpu_hours / gpus + the longest."""
    return max(gpu_hours / gpus, longest / nproc), gpu_hours / gpus + longest / nproc


def passed_through(extra):
    """The per-run options among the pass-through flags (--max-steps 6, --eval-every 3, --warmup-steps 0, ...:
    the run-name options and whatever a --runs entry may set), typed as train.py takes them: they win over the
    experiment's own values, so a run's name and its --runs entry say what it trains, at any pack size (a
    SMOKE few-shot run of 6 steps is ..._steps6_..., not the driver's 10,000)."""
    flags = {a.split("=")[0] for a in extra if a.startswith("--")}
    values = vars(options.parser.parse_known_args(list(extra))[0])
    keys = dict.fromkeys([key for key, _ in NAME_TAGS] + [k for k in options.PER_RUN if k != "resume"])
    return {key: values[key] for key in keys if key in values and "--" + key.replace("_", "-") in flags}


def _extra_value(extra, flag, default, cast):
    extra = list(extra)
    values = [extra[i + 1] for i, a in enumerate(extra[:-1]) if a == flag]
    return cast(values[-1]) if values else default


# --- the experiments ----------------------------------------------------------------------------
# Each returns a list of specs: train.py options, plus "_row" (extra result columns, e.g. the swept
# value under the name "variant") that is not a train.py option.

def spec(task, method, model, seed, _row=None, **options):
    return {"task": task, "method": method, "model": model, "seed": seed, **options, **({"_row": _row} if _row else {})}


def table1(args):
    """Table 1: GLUE + SuperGLUE x every method x every size; --lr-search adds the SuperGLUE lr grid."""
    specs = []
    for model in args.models or SIZES:
        for task in args.tasks or GLUE + SUPERGLUE:
            for method in args.methods or M.METHODS:
                lrs = [None]
                if args.lr_search and task in SUPERGLUE:  # Appendix B.2: searched for the SuperGLUE results
                    lrs = LR_GRID["ft" if method == "ft" else "prompt"]
                for value in lrs:
                    for seed in args.seeds or SEEDS:
                        specs.append(spec(task, method, model, seed, **({"lr": value} if value else {})))
    return specs


def table2(args):
    """Table 2: MRQA and Others on t5-base, every method."""
    return [spec(task, method, model, seed) for model in args.models or [args.model]
            for task in args.tasks or MRQA + OTHERS for method in args.methods or M.METHODS
            for seed in args.seeds or SEEDS]


def attempt_epochs(task, data_dir):
    """ATTEMPT (Asai et al. 2022): 20 epochs for training sets under 10K examples, else 10."""
    return 20 if _split_sizes(task, data_dir)[0] < 10000 else 10


def steps_per_epoch(task, data_dir, batch_size=BATCH_SIZE):
    """Optimizer steps in one pass over the training split (meta.json; train.py counts the same way)."""
    return math.ceil(_split_sizes(task, data_dir)[0] / batch_size)


def table4(args):
    """Table 4, ATTEMPT setting: epochs instead of steps, validated every epoch (the best epoch is kept, as
    ATTEMPT does); PT with 100 tokens; EPT/EPT* with one extra 1x1 layer. §5.4: "an additional MLP layer is
    stacked for EPT and EPT*"; Table 4's 2.3K/768 on t5-base is the main 2,304 + 1: one bias-free 1x1 layer
    between down and up (d -> 1 -> 1 -> d), train.py's --extra-layer."""
    options = {"pt": {"prompt_length": 100}, "ept": {"extra_layer": True}, "ept_star": {"extra_layer": True}}
    batch = getattr(args, "batch_size", None) or BATCH_SIZE
    return [spec(task, method, args.model, seed, epochs=args.epochs or attempt_epochs(task, args.data_dir),
                 eval_every=steps_per_epoch(task, args.data_dir, batch), **options.get(method, {}))
            for task in args.tasks or ["multirc", "boolq", "wic", "wsc", "cb"]
            for method in args.methods or ["pt", "ept", "ept_star"] for seed in args.seeds or SEEDS]


def init(args):
    """Table 6: EPT's P1 initialised uniform / from random vocabulary rows / from the label words."""
    return [spec(task, method, args.model, seed, init=kind, _row={"variant": kind})
            for task in args.tasks or ["boolq", "cb", "rte", "wsc"] for method in args.methods or ["ept"]
            for kind in args.values or M.INITS for seed in args.seeds or SEEDS]


def hidden(args):
    """Figures 5 (BoolQ, RTE) and 12 (WSC, CB, WiC): EPT's hidden size h."""
    return [spec(task, method, args.model, seed, hidden_size=h, _row={"variant": h})
            for task in args.tasks or ["boolq", "rte", "wsc", "cb", "wic"] for method in args.methods or ["ept"]
            for h in args.values or HIDDEN for seed in args.seeds or SEEDS]


def broadcast(args):
    """Figure 7: EPT* broadcast length 1..10 on MultiRC and CoLA."""
    return [spec(task, "ept_star", args.model, seed, broadcast=n, _row={"variant": n})
            for task in args.tasks or ["multirc", "cola"] for n in args.values or range(1, 11)
            for seed in args.seeds or SEEDS]


def lr(args):
    """Figure 8: learning-rate robustness of PT, ResPrompt, EPT, EPT* on the 5 SuperGLUE tasks, on t5-base and
    t5-large (§5.3). These are the runs of Table 1's SuperGLUE lr search (same names): trained once."""
    models = args.models or ([args.model] if args.model != parser.get_default("model") else FIG8_SIZES)
    return [spec(task, method, model, seed, lr=value, _row={"variant": value}) for model in models
            for task in args.tasks or SUPERGLUE for method in args.methods or ["pt", "resprompt", "ept", "ept_star"]
            for value in args.values or LR_GRID["prompt"] for seed in args.seeds or SEEDS]


def structure(args):
    """Figure 9: EPT with LayerNorm / residual / a non-linearity added, on the 5 SuperGLUE tasks."""
    return [spec(task, "ept", args.model, seed, **STRUCTURES[name], _row={"variant": name})
            for task in args.tasks or SUPERGLUE for name in args.values or STRUCTURES
            for seed in args.seeds or SEEDS]


# The steering benchmark (docs/experiments.md): every method on a small frozen backbone that knows two toy tasks
# and does one by default (scripts/build_backbone.py); the task asks for the other one. Its own short schedule:
# prompts at the paper's lr 0.3, ft at 1e-3 (1e-5, the paper's, barely moves a model trained from scratch in
# 100 steps); --values sweeps the lr of PT, EPT and EPT* (STEER_LRS by default) beside the main grid, with
# the first seed only (a sweep shows where a method learns; the main grid's 3 seeds its spread).
STEER_BACKBONE = str(Path(__file__).resolve().parent / "tests" / "fixtures" / "steer" / "backbone")
STEER_TASK = "steer_comma"
STEER_SCHEDULE = {"max_steps": 100, "eval_every": 10, "batch_size": 32}
STEER_LRS = [0.03, 3.0]  # beside the default 0.3: EPT's explosive norm may want another lr at this scale
STEER_SWEPT = ["pt", "ept", "ept_star"]


def steer_model(args):
    return args.model if args.model != parser.get_default("model") else STEER_BACKBONE


def steer(args):
    """The steering benchmark: every method x seed at its default lr (ft: 1e-3), plus the lr sweep."""
    model, seeds, specs = steer_model(args), args.seeds or SEEDS, []
    for task in args.tasks or [STEER_TASK]:
        for method in args.methods or M.METHODS:
            for seed in seeds:
                ft_lr = {"lr": 1e-3} if method == "ft" else {}
                specs.append(spec(task, method, model, seed, **STEER_SCHEDULE, **ft_lr))
            for value in (args.values or STEER_LRS) if method in STEER_SWEPT else []:
                specs.append(spec(task, method, model, seeds[0], lr=value, **STEER_SCHEDULE))
    return specs


def steer_prepare(args):
    """The steering task's data, prepared once before any worker starts (train.py would prepare it on first
    use, but several workers at once would race), with the backbone's tokenizer."""
    for task in args.tasks or [STEER_TASK]:
        if not (Path(args.data_dir) / task / "meta.json").exists():
            prepare_data.main(["--tasks", task, "--out", str(args.data_dir), "--tokenizer", steer_model(args)])


def steer_floor(args):
    """The no-prompt floor: the frozen backbone on the steering task's validation and test splits, one row
    (method "none") per model and task in results/steer.jsonl, written once; returns those rows."""
    model, results = steer_model(args), Path(args.results_dir) / "steer.jsonl"
    done = {r.get("run"): r for r in files.read_jsonl(results, what="results file", missing_ok=True)}
    rows = []
    for task in args.tasks or [STEER_TASK]:
        key = f"{model}#no-prompt#{task}"
        if key not in done:
            val, test = (decoding.evaluate_frozen(model, task, split, args.data_dir)
                         for split in ("validation", "test"))
            done[key] = {"experiment": "steer", "run": key, "task": task, "method": "none", "seed": None,
                         "model": model, "model_tag": model_tag(model), "score": test["score"], "test": test,
                         "val_score": val["score"], "n_trainable": 0, "n_inference": 0}
            files.append_jsonl(results, [done[key]])
        rows.append(done[key])
        print(f"steer: no-prompt floor on {task}: validation {done[key]['val_score']:.1f}, "
              f"test {done[key]['score']:.1f}")
    return rows


EXPERIMENTS = {"table1": table1, "table2": table2, "table4": table4, "init": init, "hidden": hidden,
               "broadcast": broadcast, "lr": lr, "structure": structure, "steer": steer}


# --- command line ---------------------------------------------------------------------------------

# no abbreviations: --lr (train.py's, passed through) must not be read as --lr-search, nor --seed as --seeds
parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter, allow_abbrev=False)
parser.add_argument("experiment", choices=list(EXPERIMENTS), help="which table or figure's grid")
# data
parser.add_argument("--tasks", nargs="+", type=cli.name, default=None,
                    help="subset of the experiment's tasks (default: the paper's)")
parser.add_argument("--data-dir", default="data", help="prepare_data.py output folder")
# model
parser.add_argument("--model", default="t5-base", help="T5 for the single-size experiments (name or folder)")
parser.add_argument("--models", nargs="+", default=None,
                    help="table1/table2/lr: T5 sizes (default: t5-small t5-base t5-large / t5-base / "
                         "t5-base t5-large, or --model when given)")
parser.add_argument("--methods", nargs="+", default=None, choices=M.METHODS, help="subset of the methods")
# sweep
parser.add_argument("--seeds", nargs="+", type=cli.nonnegative_int, default=None, help="training seeds (default: 0 1 2)")
parser.add_argument("--values", nargs="+", default=None,
                    help="subset of the swept values (hidden sizes, broadcast lengths, lrs, structure names)")
parser.add_argument("--lr-search", action="store_true",
                    help="table1: every lr of the Appendix B.2 grid on SuperGLUE (report keeps the best by validation)")
parser.add_argument("--epochs", type=cli.positive_int, default=None,
                    help="table4: epochs for every task (default: ATTEMPT's 20/10); the other experiments pass it "
                         "to train.py as every run's --epochs")


def add_execution_args(parser):
    """The flags every driver shares: how runs are launched and where their files go."""
    group = parser.add_argument_group("execution and output")
    group.add_argument("--nproc", type=cli.positive_int, default=1, help="GPUs per run; > 1 launches train.py with torchrun")
    group.add_argument("--subprocess", action="store_true",
                       help="run each train.py in a fresh process (default: train.main in this process)")
    group.add_argument("--runs-dir", type=cli.folder, default="runs", help="where run folders go")
    group.add_argument("--results-dir", type=cli.folder, default="results", help="where <experiment>.jsonl goes")
    group.add_argument("--prune-ft-checkpoints", action="store_true",
                       help="delete best.pt/last.pt of finished ft runs once their row is written "
                            "(weights + AdamW state: ~2.7 GB each for t5-base, ~9 GB for t5-large)")
    group.add_argument("--dry-run", action="store_true",
                       help="list the runs, the GPU-hour estimate and the wall time on the GPUs given "
                            "(also appended to <results-dir>/dry_run.tsv)")
    group.add_argument("--gpus", type=cli.positive_int, default=None,
                       help="a local pool: G / --nproc child processes, each pinned to its own GPUs (the first G of "
                            "CUDA_VISIBLE_DEVICES), take the plan's units longest first; then this process collects")
    group.add_argument("--slurm", action="store_true",
                       help="write the plan and submit it to SLURM: one job array (task i runs line i, one unit "
                            "each, requeued on preemption) and the collect step as a job after it; prints the job "
                            "ids and how to follow them")
    group.add_argument("--slurm-partition", default=None, help="--slurm: the partition (default: the cluster's)")
    group.add_argument("--slurm-time", default=None, metavar="LIMIT",
                       help="--slurm: each task's time limit (4:00:00, 1-12, ...); a unit checkpoints before it")
    group.add_argument("--slurm-gpus", type=cli.nonnegative_int, default=None, metavar="N",
                       help="--slurm: GPUs per task (default: --nproc; 0: no GPU request, a CPU cluster)")
    group.add_argument("--slurm-max-tasks", type=cli.positive_int, default=None, metavar="M",
                       help="--slurm: array tasks at once (--array=0-(N-1)%%M); --dry-run: the wall time for M")
    group.add_argument("--slurm-after", action="append", default=[], metavar="JOBID",
                       help="--slurm: start the array once this job ended (afterany), e.g. an earlier section's "
                            "array that trains runs this grid shares (repeatable)")
    group.add_argument("--slurm-option", action="append", default=[], metavar="OPT",
                       help="--slurm: an extra #SBATCH option, e.g. --slurm-option=--account=nlp (repeatable)")
    group.add_argument("--collect", action="store_true",
                       help="train nothing: append every finished run's row once to <results-dir>/<experiment>.jsonl "
                            "and print the table (an engine's last job); exit 1 while runs are not finished")
    group.add_argument("--pack-size", type=cli.positive_int, default=None,
                       help="prompt runs trained together on one frozen T5 (one train.py --runs call; same task, "
                            "model, data, schedule; never ft); default: on CUDA as many as fit the GPU's memory "
                            "(16 for t5-small/base, 8 for t5-large at 80 GB), on a CPU 1 (no packing)")


add_execution_args(parser)


def _one_of(valid):
    def parse(text):
        if text not in valid:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(valid)}")
        return text
    return parse


VALUE_TYPES = {"hidden": cli.positive_int, "broadcast": cli.positive_int, "lr": cli.positive_float,
               "steer": cli.positive_float, "init": _one_of(M.INITS), "structure": _one_of(list(STRUCTURES))}  # what --values sweeps


def parse_values(experiment, values, parser=parser):
    """--values as the experiment's swept type, each checked: a wrong one is one argparse error."""
    if values is None:
        return None
    if experiment not in VALUE_TYPES:
        parser.error(f"--values sweeps {', '.join(VALUE_TYPES)} only; {experiment} has no swept value")
    try:
        return [VALUE_TYPES[experiment](v) for v in values]
    except argparse.ArgumentTypeError as err:
        parser.error(f"argument --values: {err}")


def check_args(parser, args, extra):
    """Before any run: the tasks exist and the flags passed through to train.py are train.py's, with valid
    values (else every run of the grid would fail the same way, one after another)."""
    flags, unknown = options.parser.parse_known_args(list(extra))  # a wrong value: train.py's argparse error, now
    if unknown:
        parser.error(f"unrecognized arguments (neither this script's nor train.py's): {' '.join(unknown)}")
    if args.slurm and args.gpus:
        parser.error("--slurm hands each unit to its own array task; --gpus is for one node without SLURM: pass one")
    own = {"--task": "--tasks", "--method": "--methods", "--seed": "--seeds"}
    given = [a.split("=")[0] for a in extra if a.split("=")[0] in own]
    if given:  # train.py would train every run of the grid with it, under the grid's names
        parser.error(f"{given[0]} is the grid's own: pass {own[given[0]]} (this script's flag) instead")
    swept = [k for k in options.SWEEP if isinstance(getattr(flags, k), list)]
    if swept:  # train.py would train a pack of them inside each run's folder
        flag = "--" + swept[0].replace("_", "-")
        parser.error(f"{flag} {' '.join(map(str, getattr(flags, swept[0])))}: a driver passes one value to every run; "
                     f"the experiment sweeps its own values (--values, --seeds, --methods), or run train.py {flag} "
                     "with several values yourself")
    if "--overwrite" in extra:
        parser.error("--overwrite would start every run of the plan over at each rerun; delete the run folders "
                     "to train them again")
    for task in args.tasks or []:
        known = registry.known(task)
        if not known and not (Path(args.data_dir) / task / "meta.json").exists():
            parser.error(f"unknown task {task!r} (not one of the paper's and no {Path(args.data_dir) / task}/meta.json); "
                         f"tasks: {', '.join(registry.TASKS)}")


@errors.script
def main(argv=None):
    args, extra = parser.parse_known_args(argv)
    args.command = [sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)]
    args.values = parse_values(args.experiment, args.values)
    if args.epochs is not None and args.experiment != "table4":  # train.py's own --epochs, for the other grids
        extra = [*extra, "--epochs", str(args.epochs)]
    check_args(parser, args, extra)
    args.batch_size = _extra_value(extra, "--batch-size", BATCH_SIZE, int)  # Table 4: steps per epoch
    steering = args.experiment == "steer" and not args.dry_run
    if steering:
        steer_prepare(args)  # once, before any unit: several at once would race to prepare it
    submit_only = args.slurm and not args.collect  # --slurm submits; its collect job adds the floor
    floor = steer_floor if steering and not submit_only else None
    return run_driver(args.experiment, EXPERIMENTS[args.experiment](args), args, extra, floor)


def run_driver(experiment, specs, args, extra, floor=None):
    """run_experiment, then the experiment's table (after the rows of `floor(args)`, a baseline that is not
    a run); exit 1 when runs are not finished, 130 on Ctrl-C."""
    try:
        rows, failed = run_experiment(experiment, specs, args, extra)
    except KeyboardInterrupt:
        print(f"{experiment}: interrupted; run the same command again to resume", file=sys.stderr)
        raise SystemExit(130) from None
    if floor:
        rows = floor(args) + rows
    if rows and not args.dry_run:
        print(tables.experiment_table(experiment, rows))  # the table report.py writes
    if failed:
        sys.exit(1)
    return rows


def run_cli(main, name):
    """A driver's entry point: Ctrl-C outside a unit (planning, collecting) leaves nothing half-written, so it
    is one line and exit 130."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"{name}: interrupted (Ctrl-C); run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    finally:  # a further Ctrl-C while exiting: no traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    run_cli(main, "ablate")
