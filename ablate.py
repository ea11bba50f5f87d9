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
    python ablate.py hidden --nproc 4                 # each run on 4 GPUs through torchrun
    python ablate.py steer                            # the steering benchmark (docs/experiments.md)
    python ablate.py init --model smoke/tiny-t5 --data-dir smoke/data --runs-dir smoke/runs \\
        --results-dir smoke/results --seeds 0 --max-steps 4 --eval-every 2     # CPU smoke run

Flags this script does not know (--max-steps, --eval-every, --random-init, --batch-size, ...) go to
train.py unchanged, after the experiment's own, so they win. They are not part of the run name:
use another --runs-dir when you change them. --subprocess runs each train.py in a fresh process
(frees GPU memory and cached data between runs); --dry-run also appends its plan to
<results-dir>/dry_run.tsv, which run_all.sh sums counting each shared run once. docs/experiments.md
lists every setting and the measured step times the GPU-hour estimate rests on.

On a GPU, prompt runs that share task, model, data and schedule are trained in packs, several runs on one
frozen T5 in one `train.py --runs FILE` call (--pack-size; default: what fits the GPU, 1 on a CPU); the dry
run also lists the packs and the GPU-hours unpacked and packed at fp32 and bf16 (packed: a model).
"""
import argparse
import functools
import math
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import cli
import files
import model as M
import prepare_data as P
import runs

# --- the paper's task groups (prepare_data.py's registry, in the paper's column order) and grids ----------

GLUE, SUPERGLUE, MRQA, OTHERS = (P.GROUPS[g] for g in ("glue", "superglue", "mrqa", "others"))
ALL_TASKS = list(P.TASKS)  # the 21 tasks
SIZES = ["t5-small", "t5-base", "t5-large"]
SEEDS = [0, 1, 2]  # 3 runs per main result (Table 1 caption)
LR_GRID = {"prompt": [0.003, 0.01, 0.03, 0.1, 0.3], "ft": [1e-5, 1e-4, 1e-3]}  # SuperGLUE lr search
FIG8_SIZES = ["t5-base", "t5-large"]  # §5.3: "... on both T5-base and T5-Large"
BATCH_SIZE = 16  # Appendix B.2; Table 4's steps per epoch follow the batch actually passed to train.py
HIDDEN = [1, 5, 10, 50, 100, 500, 1000]  # Figures 5 and 12
STRUCTURES = {"none": {}, "layernorm": {"layer_norm": True}, "residual": {"residual": True},
              "relu": {"activation": "relu"}, "tanh": {"activation": "tanh"}, "gelu": {"activation": "gelu"}}

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
    """train.py's defaults for `method` (the paper's main setting): what a run name leaves out (train.defaults)."""
    import train  # imported late: report-only and dry-run use need no training stack
    return train.defaults(method)


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
    """One results row: the full configuration, the test metrics, parameters and prompt norms."""
    run_dir = Path(run_dir)
    config = files.read_json(run_dir / "config.json", "run configuration")
    config = {**config, **M.prompt_options(config)}  # older runs' option names and missing options
    metrics = files.read_json(run_dir / "metrics.json", "test metrics")
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
            "score": metrics.get("score"), "test": metrics, "val_score": val_score, "best_step": best_step,
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
    return P.PAPER_SPLITS.get(task, (10000, 1000, 1000))


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
    """--pack-size, else: on CUDA the memory rule for this worker's GPU; on a CPU 1 (no packing: a CPU is
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


# --- the driver ----------------------------------------------------------------------------------

def train_one(argv, nproc=1, fresh_process=False):
    """One train.py run: in this process, in a fresh python process, or on `nproc` GPUs through torchrun."""
    script = str(Path(__file__).with_name("train.py"))
    if nproc > 1:
        subprocess.run(["torchrun", "--standalone", f"--nproc_per_node={nproc}", script, *argv], check=True)
    elif fresh_process:
        subprocess.run([sys.executable, script, *argv], check=True)
    else:
        import train  # imported late: --dry-run and report-only use need no training stack
        train.main(argv)


def run_experiment(experiment, specs, args, extra=()):
    """Train what is missing, append a row per finished run to results/<experiment>.jsonl; (rows, failed).

    `specs`: train.py options per run (task, method, model, seed, ...) and "_row", extra result
    columns that are not train.py options (the swept value). With --gpus G / --workers N this process
    starts the workers (each the same command with --worker I), waits for them, then collects; a worker
    (or a plain single call) works through the plan itself (work())."""
    runs_dir = Path(args.runs_dir)
    plan = {}
    for s in specs:  # the same configuration twice (e.g. a shared default) is one run
        options = {k: v for k, v in s.items() if k != "_row"}
        plan.setdefault(run_name(options), (options, s.get("_row"), runs_dir / run_name(options)))
    if args.dry_run:
        return dry_run(experiment, plan, args, extra)
    devices = worker_devices(args) if args.worker is None else [None]  # a worker is pinned by its launcher
    # the session: failures recorded since its start are not retried by its workers (a later call retries them)
    session = float(os.environ.get("EPT_SESSION_START") or time.time())
    done_before = {name for name, (_, _, run_dir) in plan.items() if runs.status(run_dir) == "done"}
    broken = 0
    if len(devices) > 1:
        broken = launch_workers(experiment, args, devices, session)  # returns when every worker has ended
    rows, failed = work(experiment, plan, args, extra, session, done_before)  # (the launcher: collects)
    if broken:
        print(f"{experiment}: {broken} worker(s) broke (see their output above); this process finished their runs",
              file=sys.stderr)
        failed = [*failed, f"({broken} broken worker(s))"]
    return rows, failed


# --- several workers on one plan ---------------------------------------------------------------------
# A worker is the driver's own command (with --worker I; a single call is one worker): it walks the plan,
# longest run first, skips runs that are finished, failed in this session or held by a live process, and
# claims each other run by taking its folder's lock (runs.acquire_lock: a dead writer's stale lock is taken
# over, race-free), then starts train.py, which adopts the lock, keeps it fresh and resumes a partial run.
# At the end of the plan it waits for the runs others hold until every run is finished or failed. Rows are
# appended under the results file's lock, once per run folder. The unit claimed is one run folder; a pack
# of runs trained by one process would be claimed by taking each of its folders' locks the same way.

def worker_devices(args):
    """One entry per worker: the CUDA_VISIBLE_DEVICES it gets ("0", "2,3" with --nproc 2), or None (not
    pinned: --workers N without --gpus, e.g. CPU workers)."""
    nproc = args.nproc
    if not args.gpus:
        return [None] * (args.workers or 1)
    if args.gpus % nproc:
        raise SystemExit(f"--gpus {args.gpus} is not a multiple of --nproc {nproc} (GPUs per run)")
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    visible = visible or [str(i) for i in range(args.gpus)]
    if len(visible) < args.gpus:
        raise SystemExit(f"--gpus {args.gpus}, but CUDA_VISIBLE_DEVICES lists {len(visible)}: {','.join(visible)}")
    n = args.gpus // nproc
    if args.workers not in (None, n):
        raise SystemExit(f"--workers {args.workers} with --gpus {args.gpus} --nproc {nproc}: that is {n} workers; "
                         "pass one of --workers and --gpus")
    return [",".join(visible[i * nproc:(i + 1) * nproc]) for i in range(n)]


def launch_workers(experiment, args, devices, session):
    """Start one worker process per entry of `devices` (its own process group, pinned to its GPUs, output
    prefixed with its name) and wait for all of them; the number that broke (a non-zero exit: a worker
    whose loop ends exits 0 even when runs failed). Ctrl-C or SIGTERM stops them all."""
    if not getattr(args, "command", None):
        raise SystemExit("launch_workers needs args.command (the driver's command line; main() sets it)")
    env = {**os.environ, "EPT_SESSION_START": repr(session)}
    env.setdefault("TQDM_DISABLE", "1")  # N progress bars on one terminal are noise; log.jsonl has every step
    out_lock = threading.Lock()
    procs, pumps = [], []
    print(f"{experiment}: {len(devices)} workers" + (f" on GPUs {' | '.join(devices)}" if devices[0] else ""),
          flush=True)

    def pump(proc, prefix):
        for line in proc.stdout:
            with out_lock:
                sys.stdout.write(prefix + line)
                sys.stdout.flush()

    old_term = signal.getsignal(signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:  # SIGTERM (scancel, kill): stop the workers too, not only this process
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for i, dev in enumerate(devices):
            cmd = [*args.command, "--worker", str(i)]  # --subprocess or not, as this call was asked
            proc = subprocess.Popen(cmd, env={**env, **({"CUDA_VISIBLE_DEVICES": dev} if dev else {})},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    start_new_session=True)
            procs.append(proc)
            pumps.append(threading.Thread(target=pump, args=(proc, f"[w{i}{' gpu ' + dev if dev else ''}] "),
                                          daemon=True))
            pumps[-1].start()
        running, broken = dict(enumerate(procs)), 0
        while running:  # reaped as soon as they end: a dead worker's pid must not linger (runs._alive)
            for i, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[i]
                    if proc.returncode:
                        broken += 1
                        print(f"{experiment}: worker {i} exited with status {proc.returncode}", flush=True)
            time.sleep(0.2)
        for t in pumps:
            t.join()
        return broken
    except BaseException:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # the worker and the train.py it runs
        for proc in procs:
            proc.wait()
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)


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
    the file's lock, so concurrent workers never double a row (one write per row: never a torn one)."""
    with files.locked(results):
        if any(r.get("run") == row["run"] for r in files.read_jsonl(results, what="results file", missing_ok=True)):
            return False
        files.append_jsonl(results, [row])
        return True


def collect(experiment, plan, name, args, results, rows):
    """A finished run's row: appended once to the results file, kept in `rows`; ft checkpoints pruned."""
    options, fields, run_dir = plan[name]
    row = result_row(experiment, options, run_dir, fields)
    append_row_once(results, row)
    rows[name] = row
    runs.clear_failed(run_dir)
    if args.prune_ft_checkpoints and options["method"] == "ft":  # full T5 + AdamW state, twice per run
        for name_ in ("best.pt", "last.pt"):
            (run_dir / name_).unlink(missing_ok=True)


def work(experiment, plan, args, extra, session, done_before=()):
    """One worker's loop over the plan (see above); (rows in plan order, failed run names)."""
    results = Path(args.results_dir) / f"{experiment}.jsonl"
    who = experiment if args.worker is None else f"{experiment} w{args.worker}"
    hours = plan_hours(plan, args, extra)
    order = sorted(plan, key=lambda name: -hours[name])  # longest first: the last runs to end are short ones
    if args.worker:  # worker I starts at the I-th run: workers started together do not all race for one run
        shift = args.worker % len(order) if order else 0
        order = order[shift:] + order[:shift]
    pending = dict.fromkeys(order)
    rows, failed, waited_for, trained_here = {}, [], None, 0
    sizes = {}  # model -> runs per pack on this worker's device
    while pending:
        busy = []
        for name in list(pending):
            if name not in pending or name in busy:
                continue  # trained in an earlier pack of this pass / found held in this pass
            options, fields, run_dir = plan[name]
            if runs.status(run_dir) != "done":
                limit = sizes.setdefault(options["model"], pack_size(args, options["model"]))
                mates = []
                if limit > 1 and pack_key(options) is not None:  # the next runs of its kind, still to do
                    mates = [m for m in pending if m != name and m not in busy
                             and pack_key(plan[m][0]) == pack_key(options) and runs.status(plan[m][2]) != "done"]
                if mates:
                    outcomes = claim_and_train_pack(who, [name, *mates], limit, plan, args, extra, session,
                                                    len(plan) - len(pending) + 1, len(plan))
                else:
                    outcomes = {name: claim_and_train(who, name, options, run_dir, args, extra, session,
                                                      len(plan) - len(pending) + 1, len(plan))}
                for n, outcome in outcomes.items():
                    if outcome == "busy":
                        busy.append(n)
                    elif outcome == "failed":
                        failed.append(n)
                        del pending[n]
                    else:
                        trained_here += outcome == "trained"
                        collect(experiment, plan, n, args, results, rows)
                        del pending[n]
                continue
            collect(experiment, plan, name, args, results, rows)
            del pending[name]
        if pending:  # only runs other live processes hold are left: wait for them (the report needs them all)
            if busy != waited_for:
                print(f"[{who}] waiting for {len(busy)} run(s) held by other workers: {' '.join(busy[:5])}"
                      + (" ..." if len(busy) > 5 else ""), flush=True)
                waited_for = busy
            time.sleep(args.poll)
    ordered = [rows[name] for name in plan if name in rows]
    trained = len(set(rows) - set(done_before))  # by this process, its workers, or other nodes' workers
    print(f"{who}: {len(plan)} runs, {trained} trained now" + (f" ({trained_here} by this worker)" if args.worker is not None else "")
          + f", {len(rows) - trained} already finished, {len(failed)} failed -> {results}", flush=True)
    if failed:
        print(f"{who}: FAILED: {' '.join(failed)}", file=sys.stderr)
    return ordered, failed


def claim_and_train(who, name, options, run_dir, args, extra, session, i, n):
    """Claim one unfinished run by taking its folder's lock, and train it: 'done', 'busy' (another live process
    holds it), 'failed' or 'trained'. train.py (in this process, a fresh one, or torchrun's rank 0) adopts the lock."""
    if runs.failed_since(run_dir, session) or runs.holder(run_dir):
        return "failed" if runs.failed_since(run_dir, session) else "busy"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = runs.acquire_lock(run_dir, say=lambda message: print(f"[{who}] {message}", flush=True),
                                 heartbeat=False)  # train.py adopts it within seconds and keeps it fresh
    except runs.Busy:
        return "busy"
    t0, error = time.time(), None
    try:
        state = runs.status(run_dir)  # looked at again now that nobody else can change it
        record = runs.failed_since(run_dir, session)
        if state == "done" or record:
            return "done" if state == "done" else "failed"
        print(f"[{who} {i}/{n}] train {name}" + (" (resume)" if state == "partial" else ""), flush=True)
        argv = train_argv(options, run_dir, args.data_dir, [*extra, *(["--resume"] if state == "partial" else [])])
        with runs.handed_to_child(lock):
            train_one(argv, args.nproc, args.subprocess)
    except (Exception, SystemExit) as err:  # one broken run does not stop the grid; reported at the end
        error = err
        if not isinstance(err, subprocess.CalledProcessError):  # a subprocess printed its own error
            traceback.print_exc()
    finally:
        lock.release()  # a no-op once train.py has adopted (and released) it
    if runs.status(run_dir) == "done":
        print(f"[{who} {i}/{n}] {name}: {time.time() - t0:.1f}s", flush=True)
        return "trained"
    if runs.holder(run_dir):  # this process was judged dead and the run taken over (a heartbeat missed)
        return "busy"
    runs.mark_failed(run_dir, repr(error))
    return "failed"


# A pack is claimed as a run is: each of its runs by its folder's lock, in the walk's order, up to the pack
# size; a run another process holds (or that failed in this session, or finished meanwhile) is left out of
# it. One claimed run goes the solo path above; several go to one train.py --runs FILE call, which adopts
# their locks: EPT_RUN_LOCK then holds the texts of all of them, one per line (each lock text is one line),
# and train.py adopts a folder's lock whose text is one of those lines.

PACK_SHARED = ("task", "model", "fewshot_k", "fewshot_seed")  # on the command line; the rest per run


def pack_argv(specs, run_dirs, resume, data_dir, extra, runs_file):
    """train.py's command line for a pack, and the --runs FILE content: the shared options as flags, per run
    its other options (train.py's option names), out_dir and resume."""
    shared = {k: specs[0][k] for k in PACK_SHARED if specs[0].get(k) is not None}
    entries = []
    for spec, run_dir, again in zip(specs, run_dirs, resume):
        entry = {k: v for k, v in spec.items() if k not in shared and v is not None and v is not False}
        entries.append({**entry, "out_dir": str(run_dir), **({"resume": True} if again else {})})
    argv = train_argv(shared, "-", data_dir, [*extra, "--runs", str(runs_file)])
    i = argv.index("--out-dir")
    return argv[:i] + argv[i + 2:], entries


def claim_and_train_pack(who, candidates, limit, plan, args, extra, session, i, n):
    """Claim up to `limit` of `candidates` (unfinished runs of one pack_key, walk order) by their locks and
    train them as one pack: {run: 'done' | 'busy' | 'failed' | 'trained'}; runs not looked at are absent."""
    outcomes, claimed = {}, {}
    say = lambda message: print(f"[{who}] {message}", flush=True)  # noqa: E731
    for name in candidates:
        if len(claimed) >= limit:
            break
        run_dir = plan[name][2]
        if runs.failed_since(run_dir, session):
            outcomes[name] = "failed"
            continue
        if runs.holder(run_dir):
            outcomes[name] = "busy"
            continue
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = runs.acquire_lock(run_dir, say=say, heartbeat=False)
        except runs.Busy:
            outcomes[name] = "busy"
            continue
        state = runs.status(run_dir)  # looked at again now that nobody else can change it
        if state == "done" or runs.failed_since(run_dir, session):
            lock.release()
            outcomes[name] = "done" if state == "done" else "failed"
            continue
        claimed[name] = (lock, state)
    if len(claimed) == 1:  # a pack of one: today's solo path
        (name, (lock, _)), = claimed.items()
        lock.release()
        outcomes[name] = claim_and_train(who, name, plan[name][0], plan[name][2], args, extra, session, i, n)
        return outcomes
    if not claimed:
        return outcomes
    names = list(claimed)
    t0, error = time.time(), None
    try:
        print(f"[{who} {i}/{n}] train a pack of {len(names)}: {' '.join(names)}", flush=True)
        runs_file = Path(args.results_dir) / "packs" / f"{names[0]}.{os.getpid()}.json"
        argv, entries = pack_argv([plan[x][0] for x in names], [plan[x][2] for x in names],
                                  [claimed[x][1] == "partial" for x in names], args.data_dir, extra, runs_file)
        runs_file.parent.mkdir(parents=True, exist_ok=True)
        files.write_json(runs_file, entries)
        with runs.handed_to_child(*[claimed[x][0] for x in names]):
            train_one(argv, args.nproc, args.subprocess)
    except (Exception, SystemExit) as err:  # one broken pack does not stop the grid; reported at the end
        error = err
        if not isinstance(err, subprocess.CalledProcessError):
            traceback.print_exc()
    finally:
        for lock, _ in claimed.values():
            lock.release()  # a no-op once train.py has adopted (and released) it
    for name in names:
        run_dir = plan[name][2]
        if runs.status(run_dir) == "done":
            outcomes[name] = "trained"
        elif runs.holder(run_dir):
            outcomes[name] = "busy"
        else:
            runs.mark_failed(run_dir, repr(error or "the pack ended without this run's metrics"))
            outcomes[name] = "failed"
    print(f"[{who} {i}/{n}] pack of {len(names)}: {time.time() - t0:.1f}s", flush=True)
    return outcomes


def dry_run(experiment, plan, args, extra):
    """List every run with its status and estimated GPU-hours, the packs the runs still to do would be trained
    in, then parseable summary lines: the wall time on the GPUs given (--gpus, or --workers x --nproc), and
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
    gpus, workers = len(worker_devices(args)) * args.nproc, len(worker_devices(args))
    low, high = wall_hours(todo, longest, gpus, args.nproc)
    print(f"DRY-RUN {experiment} runs={len(plan)} to_train={n_todo} gpu_hours={todo:.1f} (all runs: {total:.1f}); "
          f"wall ~{low:.1f}-{high:.1f} h on {gpus} GPU(s) = {workers} worker(s) x {args.nproc} "
          f"(longest run {longest / args.nproc:.1f} h; ideal scaling within a run assumed)")
    sums = {p: [sum(figures[n][p][k] for n in todo_names) for k in (0, 1)] for p in PEAK_TFLOPS}
    sizes = sorted({len(p) for p in packs}, reverse=True)
    print(f"DRY-RUN-PACKS {experiment} to_train={n_todo} packs={len(packs)} (sizes {'/'.join(map(str, sizes)) or '-'}; "
          f"--pack-size {args.pack_size or 'for a ' + str(ASSUMED_GPU_GB) + ' GB GPU'}) GPU-hours to go: "
          f"fp32 {sums['fp32'][0]:.1f} unpacked, {sums['fp32'][1]:.1f} packed; "
          f"bf16 {sums['bf16'][0]:.1f} unpacked, {sums['bf16'][1]:.1f} packed "
          f"(packed and fp32 figures: a FLOP model at {ASSUMED_UTILISATION:.0%} of the H200's peak, not measured)")
    return [], []


def wall_hours(gpu_hours, longest, gpus, nproc):
    """Wall time of runs totalling `gpu_hours` on `gpus` GPUs, `nproc` per run: at least max(gpu_hours /
    gpus, the longest run), and, workers taking the next free run, at most gpu_hours / gpus + the longest."""
    return max(gpu_hours / gpus, longest / nproc), gpu_hours / gpus + longest / nproc


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
            P.main(["--tasks", task, "--out", str(args.data_dir), "--tokenizer", steer_model(args)])


def steer_floor(args):
    """The no-prompt floor: the frozen backbone on the steering task's validation and test splits, one row
    (method "none") per model and task in results/steer.jsonl, written once; returns those rows."""
    import evaluate
    model, results = steer_model(args), Path(args.results_dir) / "steer.jsonl"
    done = {r.get("run"): r for r in files.read_jsonl(results, what="results file", missing_ok=True)}
    rows = []
    for task in args.tasks or [STEER_TASK]:
        key = f"{model}#no-prompt#{task}"
        if key not in done:
            val, test = (evaluate.evaluate_frozen(model, task, split, args.data_dir)
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

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
                    help="table4: epochs for every task (default: ATTEMPT's 20/10)")


def add_execution_args(parser):
    """The flags every driver shares: how runs are launched and where their files go."""
    group = parser.add_argument_group("execution and output")
    group.add_argument("--nproc", type=cli.positive_int, default=1, help="GPUs per run; > 1 launches train.py with torchrun")
    group.add_argument("--subprocess", action="store_true",
                       help="run each train.py in a fresh process (default: train.main in this process)")
    group.add_argument("--runs-dir", default="runs", help="where run folders go")
    group.add_argument("--results-dir", default="results", help="where <experiment>.jsonl goes")
    group.add_argument("--prune-ft-checkpoints", action="store_true",
                       help="delete best.pt/last.pt of finished ft runs once their row is written "
                            "(weights + AdamW state: ~2.7 GB each for t5-base, ~9 GB for t5-large)")
    group.add_argument("--dry-run", action="store_true",
                       help="list the runs, the GPU-hour estimate and the wall time on the GPUs given "
                            "(also appended to <results-dir>/dry_run.tsv)")
    group.add_argument("--gpus", type=cli.positive_int, default=None,
                       help="one worker per --nproc GPUs, each pinned to its own (the first G of CUDA_VISIBLE_DEVICES), "
                            "sharing the plan; this process waits for them all")
    group.add_argument("--workers", type=cli.positive_int, default=None,
                       help="N worker processes sharing the plan, not pinned (CPU; default 1: this process)")
    group.add_argument("--poll", type=cli.positive_float, default=5.0,
                       help="seconds between looks at runs other workers hold, at the end of the plan")
    group.add_argument("--pack-size", type=cli.positive_int, default=None,
                       help="prompt runs trained together on one frozen T5 (one train.py --runs call; same task, "
                            "model, data, schedule; never ft); default: on CUDA as many as fit the GPU's memory "
                            "(16 for t5-small/base, 8 for t5-large at 80 GB), on a CPU 1 (no packing)")
    group.add_argument("--worker", type=cli.nonnegative_int, default=None, help=argparse.SUPPRESS)  # set by the launcher


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
    import train
    _, unknown = train.parser.parse_known_args(list(extra))  # a wrong value: train.py's argparse error, now
    if unknown:
        parser.error(f"unrecognized arguments (neither this script's nor train.py's): {' '.join(unknown)}")
    for task in args.tasks or []:
        known = task in P.TASKS or task in P.STEER_TASKS
        if not known and not (Path(args.data_dir) / task / "meta.json").exists():
            parser.error(f"unknown task {task!r} (not one of the paper's and no {Path(args.data_dir) / task}/meta.json); "
                         f"tasks: {', '.join(P.TASKS)}")


def main(argv=None):
    args, extra = parser.parse_known_args(argv)
    args.command = [sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)]
    args.values = parse_values(args.experiment, args.values)
    check_args(parser, args, extra)
    args.batch_size = _extra_value(extra, "--batch-size", BATCH_SIZE, int)  # Table 4: steps per epoch
    steering = args.experiment == "steer" and not args.dry_run and args.worker is None
    if steering:
        steer_prepare(args)
    rows, failed = run_experiment(args.experiment, EXPERIMENTS[args.experiment](args), args, extra)
    if steering:
        rows = steer_floor(args) + rows
    if rows and args.worker is None:
        import report  # the same table report.py writes, printed here
        print(report.experiment_table(args.experiment, rows))
    if failed and args.worker is None:  # a worker's failed runs are its launcher's to report
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
