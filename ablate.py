"""The paper's experiment grids over train.py: Tables 1, 2, 4, 6 and Figures 5/12, 7, 8, 9.

Each experiment is a list of runs (train.py options). A run whose folder already holds metrics.json
is not trained again (an unfinished folder is resumed with --resume), and one row per finished run
(its configuration, test metrics, trainable parameters, prompt norm) is appended once to
results/<experiment>.jsonl, which report.py turns into the paper's tables and figures. Run folders
are named by configuration alone, runs/<task>_<method>_<model>[_<options>]_s<seed>, so a run two
experiments share (EPT with h = 1 on BoolQ is a Table 1 cell and a Figure 5 point) is trained once.
Table 3 (few-shot) is fewshot.py. Both share the grid in ept/grid.py: the plan, the units, the pool
and the collect step live there (docs/experiments.md); the dry run's cost model is scripts/costs.py.

    python ablate.py table1 --dry-run       # every run, its status, count and GPU-hour estimate
    python ablate.py table1                 # Table 1: 13 tasks x 6 methods x 3 sizes x 3 seeds
    python ablate.py table1 --lr-search     # + the SuperGLUE lr search of Appendix B.2
    python ablate.py table2                 # Table 2: MRQA + Others, t5-base
    python ablate.py table4                 # Table 4: ATTEMPT setting (epochs, PT n=100, ...)
    python ablate.py init | hidden | broadcast | lr | structure   # Table 6, Figures 5/12, 7, 8, 9
    python ablate.py lr --models t5-base    # Figure 8 for one size (default: t5-base and t5-large)
    python ablate.py hidden --nproc 4       # each unit on 4 GPUs through torchrun
    python ablate.py steer                  # the steering benchmark (docs/experiments.md)
    python ablate.py hidden --gpus 8        # 8 children, one per GPU, units longest first
    python ablate.py hidden --collect       # rows of the finished runs, once, and the table
    python ablate.py init --model smoke/tiny-t5 --data-dir smoke/data --runs-dir smoke/runs \\
        --results-dir smoke/results --seeds 0 --max-steps 4 --eval-every 2     # CPU smoke run

Flags this script does not know (--max-steps, --eval-every, --random-init, --batch-size, ...) go to
train.py unchanged, after the experiment's own, so they win, at any --pack-size (a pack's --runs
entries carry them too). Those that name runs (--max-steps, --eval-every, --lr, ...) show in the
run name; for the others (--batch-size, --dropout, ...) use another --runs-dir when you change
them. One value each: a sweep (--hidden-size 1 5) is refused, and so are --task/--method/--seed
(--tasks/--methods/--seeds).

Each call writes <results-dir>/<experiment>.plan, one unit (a pack of prompt runs on one frozen T5,
or a solo run) a line, each a complete shell command that any engine may run, then runs its units
(here, on a local pool with --gpus, or on SLURM with --slurm) and appends each finished run's row
once. Ctrl-C stops everything (exit 130); the same command again resumes.
"""
import argparse
import math
import subprocess
import sys
from pathlib import Path

import model as M
from ept import cli, files, grid, options, outputs, runtime
from ept.tasks import GROUPS

# --- the paper's task groups (the registry, in the paper's column order) and grids ---------------

GLUE, SUPERGLUE, MRQA, OTHERS = (GROUPS[g]
                                 for g in ("glue", "superglue", "mrqa", "others"))
SIZES = ["t5-small", "t5-base", "t5-large"]
SEEDS = [0, 1, 2]  # 3 runs per main result (Table 1 caption)
LR_GRID = {"prompt": [0.003, 0.01, 0.03, 0.1, 0.3], "ft": [1e-5, 1e-4, 1e-3]}  # SuperGLUE search
FIG8_SIZES = ["t5-base", "t5-large"]  # §5.3: "... on both T5-base and T5-Large"
BATCH_SIZE = 16  # Appendix B.2; Table 4's steps per epoch follow the batch train.py is given
HIDDEN = [1, 5, 10, 50, 100, 500, 1000]  # Figures 5 and 12
STRUCTURES = {"none": {}, "layernorm": {"layer_norm": True}, "residual": {"residual": True},
              "relu": {"activation": "relu"}, "tanh": {"activation": "tanh"},
              "sigmoid": {"activation": "sigmoid"}}  # Figure 9 (the public EPT code's three)


# --- the experiments: each a list of specs (grid.spec; a swept value is the row's "variant") -----

spec = grid.spec


def table1(args):
    """Table 1: GLUE + SuperGLUE x every method x size; --lr-search adds the SuperGLUE lrs."""
    def lrs(task, method):  # Appendix B.2: the lr is searched for SuperGLUE only
        if args.lr_search and task in SUPERGLUE:
            return [{"lr": value} for value in LR_GRID["ft" if method == "ft" else "prompt"]]
        return [{}]
    return [spec(task, method, model, seed, **lr) for model in args.models or SIZES
            for task in args.tasks or GLUE + SUPERGLUE for method in args.methods or M.METHODS
            for lr in lrs(task, method) for seed in args.seeds or SEEDS]


def table2(args):
    """Table 2: MRQA and Others on t5-base, every method."""
    return [spec(task, method, model, seed) for model in args.models or [args.model]
            for task in args.tasks or MRQA + OTHERS for method in args.methods or M.METHODS
            for seed in args.seeds or SEEDS]


def table4(args):
    """Table 4, ATTEMPT setting: epochs instead of steps, validated every epoch (the best epoch is
    kept, as ATTEMPT does); PT with 100 tokens; EPT/EPT* with one extra 1x1 layer. §5.4: "an
    additional MLP layer is stacked for EPT and EPT*"; Table 4's 2.3K/768 on t5-base is the main
    2,304 + 1: one bias-free 1x1 layer between down and up (d -> 1 -> 1 -> d), --extra-layer."""
    per_method = {"pt": {"prompt_length": 100}, "ept": {"extra_layer": True},
                  "ept_star": {"extra_layer": True}}
    batch = getattr(args, "batch_size", None) or BATCH_SIZE
    tasks = args.tasks or ["multirc", "boolq", "wic", "wsc", "cb"]
    n_train = {task: grid.split_sizes(task, args.data_dir)[0] for task in tasks}  # as train.py
    # ATTEMPT (Asai et al. 2022): 20 epochs for training sets under 10K examples, else 10
    epochs = {task: args.epochs or (20 if n < 10000 else 10) for task, n in n_train.items()}
    return [spec(task, method, args.model, seed, epochs=epochs[task],
                 eval_every=math.ceil(n_train[task] / batch), **per_method.get(method, {}))
            for task in tasks for method in args.methods or ["pt", "ept", "ept_star"]
            for seed in args.seeds or SEEDS]


def init(args):
    """Table 6: EPT's P1 initialised uniform / from random vocabulary rows / from label words."""
    return [spec(task, method, args.model, seed, init=kind, _row={"variant": kind})
            for task in args.tasks or ["boolq", "cb", "rte", "wsc"]
            for method in args.methods or ["ept"]
            for kind in args.values or M.INITS for seed in args.seeds or SEEDS]


def hidden(args):
    """Figures 5 (BoolQ, RTE) and 12 (WSC, CB, WiC): EPT's hidden size h."""
    return [spec(task, method, args.model, seed, hidden_size=h, _row={"variant": h})
            for task in args.tasks or ["boolq", "rte", "wsc", "cb", "wic"]
            for method in args.methods or ["ept"]
            for h in args.values or HIDDEN for seed in args.seeds or SEEDS]


def broadcast(args):
    """Figure 7: EPT* broadcast length 1..10 on MultiRC and CoLA."""
    return [spec(task, "ept_star", args.model, seed, broadcast=n, _row={"variant": n})
            for task in args.tasks or ["multirc", "cola"] for n in args.values or range(1, 11)
            for seed in args.seeds or SEEDS]


def lr(args):
    """Figure 8: learning-rate robustness of PT, ResPrompt, EPT, EPT* on the 5 SuperGLUE tasks, on
    t5-base and t5-large (§5.3): the runs of Table 1's SuperGLUE lr search (same names, once)."""
    given = args.model != parser.get_default("model")
    models = args.models or ([args.model] if given else FIG8_SIZES)
    return [spec(task, method, model, seed, lr=value, _row={"variant": value}) for model in models
            for task in args.tasks or SUPERGLUE
            for method in args.methods or ["pt", "resprompt", "ept", "ept_star"]
            for value in args.values or LR_GRID["prompt"] for seed in args.seeds or SEEDS]


def structure(args):
    """Figure 9: EPT with LayerNorm / residual / a non-linearity added, on the 5 SuperGLUE tasks."""
    return [spec(task, "ept", args.model, seed, **STRUCTURES[name], _row={"variant": name})
            for task in args.tasks or SUPERGLUE for name in args.values or STRUCTURES
            for seed in args.seeds or SEEDS]


# The steering benchmark (docs/experiments.md): every method on a small frozen backbone that knows
# two toy tasks and does one by default (scripts/build_backbone.py); the task asks for the other
# one. Its own short schedule, 10 seeds (success: >= tables.STEER_SUCCESS on test, counted over
# seeds). Prompts at the paper's lr 0.3, ft at 1e-3 (1e-5, the paper's, barely moves a model trained
# from scratch in 100 steps). PT, EPT and EPT* also on the lr grid STEER_LRS (--values: another),
# every seed, so that the plan does not wait on results: report.py chooses each method's lr on the
# mean validation score of the search seeds (tables.STEER_SEARCH_SEEDS, Appendix B.2's protocol)
# and reports the 10 seeds at the chosen lr beside those at 0.3. The prompt runs train in packs of
# STEER_PACK (one frozen T5, one process each) unless --pack-size says otherwise.
STEER_BACKBONE = str(Path(__file__).resolve().parent / "assets" / "steer" / "backbone")
STEER_TASK = "steer_comma"
STEER_SCHEDULE = {"max_steps": 100, "eval_every": 10, "batch_size": 32}
STEER_SEEDS = list(range(10))
STEER_LRS = [0.03, 0.3, 3.0]  # 3 lies outside the paper's grid {0.003 .. 0.3}: EPT's norm explodes
STEER_SWEPT = ["pt", "ept", "ept_star"]
STEER_PACK = 10
PROMPT_LR = 0.3  # train.py's default for prompts: such runs keep their names without an lr


def steer_model(args):
    return args.model if args.model != parser.get_default("model") else STEER_BACKBONE


def steer(args):
    """The steering benchmark: every method x seed at its default lr (ft: 1e-3); PT, EPT and EPT*
    on every lr of the grid (0.3 always among them)."""
    model, seeds, specs = steer_model(args), args.seeds or STEER_SEEDS, []
    for task in args.tasks or [STEER_TASK]:
        for method in args.methods or M.METHODS:
            grid = sorted({PROMPT_LR, *(args.values or STEER_LRS)})
            lrs = grid if method in STEER_SWEPT else [1e-3 if method == "ft" else PROMPT_LR]
            for value in lrs:
                lr = {} if value == PROMPT_LR else {"lr": value}
                specs += [spec(task, method, model, seed, **STEER_SCHEDULE, **lr) for seed in seeds]
    return specs


def steer_prepare(args):
    """The steering task's data, prepared once before any unit runs (train.py would prepare it on
    first use, and several units at once would race), by prepare_data.py with the backbone's."""
    for task in args.tasks or [STEER_TASK]:
        if (Path(args.data_dir) / task / "meta.json").exists():
            continue
        script = Path(__file__).with_name("prepare_data.py")
        command = [sys.executable, str(script), "--tasks", task, "--out", str(args.data_dir),
                   "--tokenizer", steer_model(args)]
        if subprocess.run(command).returncode:
            raise cli.Failure(f"steer: {Path(args.data_dir) / task} could not be prepared "
                                 "(prepare_data.py said why above)")


def steer_floor(args):
    """The no-prompt floor: the frozen backbone on the steering task's validation and test splits,
    one row (method "none") per model and task, appended once to results/steer.jsonl under the
    file's lock (as every row: concurrent collects write it once); the rows."""
    model, results = steer_model(args), Path(args.results_dir) / "steer.jsonl"
    rows = []
    for task in args.tasks or [STEER_TASK]:
        key = f"{model}#no-prompt#{task}"
        row = steer_floor_row(results, key)
        if row is None:
            val, test = (evaluate_frozen(model, task, split, args.data_dir)
                         for split in ("validation", "test"))
            row = {"experiment": "steer", "run": key, "task": task, "method": "none",
                   "seed": None, "model": model, "model_tag": options.model_tag(model),
                   "score": test["score"], "test": test, "val_score": val["score"],
                   "n_trainable": 0, "n_inference": 0}
            if not grid.append_row_once(results, row):  # another collect wrote it meanwhile
                row = steer_floor_row(results, key)
        rows.append(row)
        print(f"steer: no-prompt floor on {task}: validation {row['val_score']:.1f}, "
              f"test {row['score']:.1f}")
    return rows


def evaluate_frozen(model, task, split, data_dir):
    """The frozen T5 `model` alone, greedy, fp32: the no-prompt floor's scores."""
    device = runtime.ranks().device
    net = M.PromptedT5(runtime.load_t5(model), None).to(device).eval()
    _, _, scores, _ = outputs.score(net, runtime.load_tokenizer(model), data_dir, task, split, None,
                                    mode="generate", device=device, batch_size=64, dtype="fp32")
    return {"task": task, "split": split, "model": str(model), **scores}


def steer_floor_row(results, key):
    written = files.read_jsonl(results, what="results file", missing_ok=True)
    return next((r for r in written if r.get("run") == key), None)


EXPERIMENTS = {"table1": table1, "table2": table2, "table4": table4, "init": init, "hidden": hidden,
               "broadcast": broadcast, "lr": lr, "structure": structure, "steer": steer}


# --- command line -----------------------------------------------------------------------------

parser = cli.Parser(description=__doc__, formatter_class=cli.HelpFormatter, allow_abbrev=False)
parser.add_argument("experiment", choices=list(EXPERIMENTS), help="which table or figure's grid")
parser.add_argument("--tasks", nargs="+", type=cli.name,
                    help="subset of the experiment's tasks (default: the paper's)")
parser.add_argument("--data-dir", default="data", help="prepare_data.py output folder")
parser.add_argument("--model", default="t5-base",
                    help="T5 for the single-size experiments (name or folder)")
parser.add_argument("--models", nargs="+", help="table1/table2/lr: T5 sizes (default: t5-small "
                    "t5-base t5-large / t5-base / t5-base t5-large, or --model when given)")
parser.add_argument("--methods", nargs="+", choices=M.METHODS, help="subset of the methods")
parser.add_argument("--seeds", nargs="+", type=cli.nonnegative_int,
                    help="training seeds (default: 0 1 2)")
parser.add_argument("--values", nargs="+", help="subset of the swept values (hidden sizes, "
                    "broadcast lengths, lrs, structure names)")
parser.add_argument("--lr-search", action="store_true", help="table1: every lr of the Appendix "
                    "B.2 grid on SuperGLUE (report keeps the best by validation)")
parser.add_argument("--epochs", type=cli.positive_int,
                    help="table4: epochs for every task (default: ATTEMPT's 20/10); the other "
                         "experiments pass it to train.py as every run's --epochs")
grid.add_execution_args(parser)



def one_of(valid):
    def parse_one(text):
        if text not in valid:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(valid)}")
        return text
    return parse_one


VALUE_TYPES = {"hidden": cli.positive_int, "broadcast": cli.positive_int, "lr": cli.positive_float,
               "steer": cli.positive_float, "init": one_of(M.INITS),
               "structure": one_of(list(STRUCTURES))}  # what --values sweeps


def parse_values(args):
    """--values as the experiment's swept type, each checked: a wrong one is one argparse error."""
    if args.values is None:
        return None
    if args.experiment not in VALUE_TYPES:
        parser.error(f"--values sweeps {', '.join(VALUE_TYPES)} only; {args.experiment} has no "
                     "swept value")
    try:
        return [VALUE_TYPES[args.experiment](v) for v in args.values]
    except argparse.ArgumentTypeError as err:
        parser.error(f"argument --values: {err}")


@cli.script
def main(argv=None):
    args, extra = grid.parse(parser, argv, __file__)
    args.values = parse_values(args)
    if args.epochs is not None and args.experiment != "table4":  # train.py's --epochs for the rest
        extra = [*extra, "--epochs", str(args.epochs)]
    grid.check_args(parser, args, extra)
    args.batch_size = grid.extra_value(extra, "--batch-size", BATCH_SIZE, int)  # Table 4's epochs
    steering = args.experiment == "steer" and not args.dry_run
    if args.experiment == "steer":  # packs on a CPU too: a tiny model's step is mostly overhead
        args.pack_size = args.pack_size or STEER_PACK
    if steering:
        steer_prepare(args)
    submit_only = args.slurm and not args.collect  # --slurm submits; its collect job adds it
    floor = steer_floor if steering and not submit_only else None
    specs = EXPERIMENTS[args.experiment](args)
    return grid.run_driver(args.experiment, specs, args, extra, floor)


if __name__ == "__main__":
    grid.run_cli(main, "ablate")
