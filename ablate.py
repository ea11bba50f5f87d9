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
    python ablate.py init --model smoke/tiny-t5 --data-dir smoke/data --runs-dir smoke/runs \\
        --results-dir smoke/results --seeds 0 --max-steps 4 --eval-every 2     # CPU smoke run

Flags this script does not know (--max-steps, --eval-every, --random-init, --batch-size, ...) go to
train.py unchanged, after the experiment's own, so they win. They are not part of the run name:
use another --runs-dir when you change them. --subprocess runs each train.py in a fresh process
(frees GPU memory and cached data between runs); --dry-run also appends its plan to
<results-dir>/dry_run.tsv, which run_all.sh sums counting each shared run once. docs/experiments.md
lists every setting and the measured step times the GPU-hour estimate rests on.
"""
import argparse
import functools
import math
import subprocess
import sys
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
    """train.py's defaults for `method` (the paper's main setting), read from train.py's own parser and
    resolve(): what a run name leaves out. The few-shot sample always shows in a name (no default)."""
    return dict(_defaults(method))


@functools.cache
def _defaults(method):
    import train
    args = train.resolve(train.parser.parse_args(["--method", method]))
    return {**{key: getattr(args, key) for key, _ in NAME_TAGS}, "fewshot_seed": None}


NAME_TAGS = [("prompt_length", "n"), ("reparam", ""), ("hidden_size", "h"), ("broadcast", "b"), ("depth", "d"),
             ("extra_layer", "x1"), ("init", "init-"), ("layer_norm", "ln"), ("residual", "res"), ("activation", ""),
             ("lr", "lr"), ("max_steps", "steps"), ("epochs", "ep"), ("eval_every", "ev"), ("fewshot_k", "k"),
             ("fewshot_seed", "fs")]


def model_tag(model_name):
    return Path(str(model_name).rstrip("/")).name  # "t5-base", "smoke/tiny-t5" -> "tiny-t5"


def run_name(spec):
    """<task>_<method>_<model>[_<non-default options>]_s<seed>, e.g. boolq_ept_t5-base_h50_s1."""
    base = defaults(spec["method"])
    tags = []
    for key, tag in NAME_TAGS:
        value = spec.get(key, base[key])
        if value is None or value == base[key] or (key in ("hidden_size", "broadcast") and
                                                   spec["method"] not in ("ept", "ept_star", "resprompt")):
            continue
        tags.append(tag if value is True else f"{tag}{value:g}" if isinstance(value, float) else f"{tag}{value}")
    return "_".join([spec["task"], spec["method"], model_tag(spec["model"]), *tags, f"s{spec['seed']}"])


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
    columns that are not train.py options (the swept value)."""
    runs_dir, results = Path(args.runs_dir), Path(args.results_dir) / f"{experiment}.jsonl"
    plan = {}
    for s in specs:  # the same configuration twice (e.g. a shared default) is one run
        options = {k: v for k, v in s.items() if k != "_row"}
        plan.setdefault(run_name(options), (options, s.get("_row"), runs_dir / run_name(options)))
    if args.dry_run:
        return dry_run(experiment, plan, args, extra)
    done = {row["run"] for row in files.read_jsonl(results, what="results file", missing_ok=True)}
    trained, failed, rows = 0, [], []
    for i, (name, (options, fields, run_dir)) in enumerate(plan.items(), 1):
        state = runs.status(run_dir)
        if state != "done":
            print(f"[{experiment} {i}/{len(plan)}] train {name}" + (" (resume)" if state == "partial" else ""),
                  flush=True)
            argv = train_argv(options, run_dir, args.data_dir, [*extra, *(["--resume"] if state == "partial" else [])])
            t0 = time.time()
            try:
                train_one(argv, args.nproc, args.subprocess)
            except (Exception, SystemExit):  # one broken run does not stop the grid; reported at the end
                traceback.print_exc()
            trained += runs.status(run_dir) == "done"
            print(f"[{experiment} {i}/{len(plan)}] {name}: {time.time() - t0:.1f}s", flush=True)
        if runs.status(run_dir) != "done":
            failed.append(name)
            continue
        row = result_row(experiment, options, run_dir, fields)
        rows.append(row)
        if str(run_dir) not in done:
            files.append_jsonl(results, [row])
            done.add(str(run_dir))
        if args.prune_ft_checkpoints and options["method"] == "ft":  # full T5 + AdamW state, twice per run
            for name_ in ("best.pt", "last.pt"):
                (run_dir / name_).unlink(missing_ok=True)
    print(f"{experiment}: {len(plan)} runs, {trained} trained now, {len(rows) - trained} already finished, "
          f"{len(failed)} failed -> {results}")
    if failed:
        print(f"{experiment}: FAILED: {' '.join(failed)}", file=sys.stderr)
    return rows, failed


def dry_run(experiment, plan, args, extra):
    """List every run with its status and estimated GPU-hours; one parseable summary line at the end."""
    batch = _extra_value(extra, "--batch-size", 16, int)
    eval_every = _extra_value(extra, "--eval-every", None, int)  # None: each run's own (Table 4: per epoch)
    max_steps = _extra_value(extra, "--max-steps", None, int)
    total = todo = 0.0
    n_todo = 0
    lines = []
    for name, (spec, _, run_dir) in plan.items():
        spec = {**spec, **({"max_steps": max_steps} if max_steps and not spec.get("epochs") else {})}
        hours = estimate_hours(spec, args.data_dir, batch, eval_every)
        state = runs.status(run_dir)
        total += hours
        if state != "done":
            todo += hours
            n_todo += 1
        print(f"  {state:<7} {hours:7.2f} GPU-h  {name}")
        lines.append(f"{experiment}\t{state}\t{hours:.4f}\t{name}\n")
    files.append_lines(Path(args.results_dir) / "dry_run.tsv", lines)  # run_all.sh sums it, each run once
    print(f"DRY-RUN {experiment} runs={len(plan)} to_train={n_todo} gpu_hours={todo:.1f} (all runs: {total:.1f}; "
          f"wall time ~ GPU-hours / {args.nproc} with NPROC={args.nproc}, assuming ideal scaling)")
    return [], []


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


EXPERIMENTS = {"table1": table1, "table2": table2, "table4": table4, "init": init, "hidden": hidden,
               "broadcast": broadcast, "lr": lr, "structure": structure}


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
                       help="list the runs and the GPU-hour estimate (also appended to <results-dir>/dry_run.tsv)")


add_execution_args(parser)


def _one_of(valid):
    def parse(text):
        if text not in valid:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(valid)}")
        return text
    return parse


VALUE_TYPES = {"hidden": cli.positive_int, "broadcast": cli.positive_int, "lr": cli.positive_float,
               "init": _one_of(M.INITS), "structure": _one_of(list(STRUCTURES))}  # what --values sweeps


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
        if task not in P.TASKS and not (Path(args.data_dir) / task / "meta.json").exists():
            parser.error(f"unknown task {task!r} (not one of the paper's and no {Path(args.data_dir) / task}/meta.json); "
                         f"tasks: {', '.join(P.TASKS)}")


def main(argv=None):
    args, extra = parser.parse_known_args(argv)
    args.values = parse_values(args.experiment, args.values)
    check_args(parser, args, extra)
    args.batch_size = _extra_value(extra, "--batch-size", BATCH_SIZE, int)  # Table 4: steps per epoch
    rows, failed = run_experiment(args.experiment, EXPERIMENTS[args.experiment](args), args, extra)
    if rows:
        import report  # the same table report.py writes, printed here
        print(report.experiment_table(args.experiment, rows))
    if failed:
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
