"""train.py's options: its flags and defaults, the runs a command line asks for (a sweep; --runs
FILE is ept/pack.py's read_runs) and each run's folder name (run_name); the drivers plan their runs
by these same rules.
"""
import argparse
import itertools
import math
from pathlib import Path

import model as M
from ept import cli, runtime

# train.py sets its text; no abbreviations: `--max-step 3` or `--eval 5` is an error, never a guess
parser = cli.Parser(prog="train.py", formatter_class=cli.HelpFormatter, allow_abbrev=False)
add = parser.add_argument_group("data").add_argument
add("--task", default="rte", type=cli.name, help="task name (default: rte, the paper's running "
    "example); data/<task>/ is prepared if missing")
add("--data-dir", default="data", help="folder holding <task>/meta.json and the split files")
add("--source", default=None, metavar="DIR", help="a missing data/<task>/ is prepared from this "
    "folder of official files (prepare_data.py --source), not the Hub")
add("--fewshot-k", type=cli.positive_int, help="train on train_k{K}_seed{S}.jsonl (Table 3)")
add("--fewshot-seed", type=cli.nonnegative_int, default=0, help="which few-shot sample (S above)")
add("--max-length", type=cli.positive_int,
    help="max input tokens before the prompt (default: meta.json's)")
add("--max-train-examples", type=cli.positive_int, help="use only the first N training rows")
add("--max-eval-examples", type=cli.positive_int,
    help="score only the first N validation/test rows")
add = parser.add_argument_group("model").add_argument
add("--model", default="t5-base", help="Hub name or local folder of the (frozen) T5")
add("--tokenizer", help="Hub name or folder of the tokenizer (default: --model)")
add("--random-init", action="store_true",
    help="random T5 weights from the config (tests, speed only)")
several = dict(nargs="+", action=cli.Sweep)  # several values: a sweep, trained as a pack
add("--method", default="ept", choices=M.METHODS, **several,
    help="ft = full fine-tuning, else a prompt method (several: a pack; ft never)")
add("--prompt-length", type=cli.positive_int, default=M.DEFAULTS["prompt_length"], **several,
    help="prompt rows n for pt/ptuning/resprompt")
add("--reparam", default="mlp", choices=M.REPARAMS, **several,
    help="ptuning's reparameterization network")
add("--hidden-size", type=cli.positive_int, **several,
    help="EPT h / ResPrompt bottleneck (default: 1 / 400)")
add("--broadcast", type=cli.positive_int, **several,
    help="EPT rows n (default: 1 ept, 10 ept_star)")
add("--layer-norm", action="store_true",
    help="EPT ablation: LayerNorm after the up layer (Figure 9)")
add("--residual", action="store_true", help="EPT ablation: add P1 back (Figure 9)")
add("--activation", default="none", choices=tuple(M.ACTIVATIONS), **several,
    help="EPT ablation: between down and up")
add("--depth", type=cli.positive_int, default=1, **several,
    help="stacked EPT down-up blocks (whole blocks)")
add("--extra-layer", action="store_true", help="EPT: one bias-free h -> h layer between down and "
    "up (Table 4: d -> 1 -> 1 -> d, 2.3K on t5-base)")
add("--init", default="uniform", choices=M.INITS, **several, help="prompt init (Table 6)")
add("--dropout", type=cli.probability,
    help="override T5's dropout rate (default: the config's, 0.1)")
add = parser.add_argument_group("optimisation").add_argument
add("--lr", type=cli.positive_float, **several,
    help="peak learning rate (default: 0.3 prompts, 1e-5 ft)")
add("--weight-decay", type=cli.nonnegative_float, default=0.01,
    help="AdamW weight decay (not on biases/norms)")
add("--warmup-steps", type=cli.nonnegative_int, default=0,
    help="linear lr warm-up steps before the decay to 0")
add("--max-grad-norm", type=cli.nonnegative_float, default=1.0,
    help="gradient-norm clipping (0 = off)")
add("--batch-size", type=cli.positive_int, default=16,
    help="GLOBAL batch (examples per step, all ranks)")
add("--micro-batch-size", type=cli.positive_int, help="examples per forward pass on one rank; "
    "gradient accumulation above it (default: batch/ranks)")
add("--max-steps", type=cli.positive_int, default=30000, help="optimizer steps")
add("--epochs", type=cli.positive_float,
    help="train this many epochs instead of --max-steps (Table 4)")
add("--seed", type=cli.nonnegative_int, default=0, **several,
    help="seeds prompt init, data order, dropout (and random T5 weights)")
add("--dtype", default="fp32", choices=runtime.DTYPES, help="fp32 (our reading: the paper names "
    "none; the HF Trainer's), tf32 or bf16 autocast (speed)")
add("--compile", action="store_true", help="torch.compile the training forward")
add("--group-by-length", action="store_true", help="batch similar lengths together within "
    "shuffled mega-batches of 50 batches (changes data order)")
add = parser.add_argument_group("evaluation").add_argument
add("--eval-every", type=cli.positive_int, default=1000,
    help="validate every N steps (and at the last step)")
add("--eval-batch-size", type=cli.positive_int, default=64, help="examples per decoding batch")
add("--eval-mode", default="generate", choices=("generate", "rank"),
    help="greedy generation, or rank classification over the label set")
add("--no-test", action="store_true", help="skip the final test evaluation")
add = parser.add_argument_group("output").add_argument
add("--out-dir", type=cli.folder, help="run folder (default: runs/<run name>, e.g. "
    "runs/rte_ept_t5-base_s0: the options that differ from the defaults are in the name, "
    "docs/training.md); of a pack: the parent folder (default: runs) of one folder per run, named "
    "by the same rule")
add("--save-every", type=cli.positive_int,
    help="also write last.pt every N steps (default: --eval-every)")
add("--resume", action="store_true", help="continue from out-dir/last.pt")
add("--overwrite", action="store_true", help="delete an existing run folder's files first")
add("--tensorboard", nargs="?", const="", metavar="DIR", help="also log curves to TensorBoard "
    "(default DIR: <out-dir>/tensorboard); needs tensorboard")
add("--wandb", metavar="PROJECT", help="also log curves to Weights & Biases; needs wandb")
add = parser.add_argument_group("packs: several prompt runs on one T5 (docs/training.md, "
                                "\"Packs\")").add_argument
add("--runs", metavar="FILE", help="a JSON list of per-run option dicts ({\"method\": \"ept\", "
    "\"seed\": 1, \"lr\": 0.1}, optionally \"out_dir\"); the flags give the options the runs share")
add("--pack-max-rows", type=cli.positive_int, metavar="K", help="a pack's examples per forward "
    "pass, sorted by length (default: every run's micro-batches)")
PACK_OPTIONS = ("runs", "pack_max_rows")  # not options of a run: never in its config.json
SWEEP = ("method", "seed", "lr", "prompt_length", "hidden_size", "broadcast", "init", "reparam",
         "activation", "depth")
# what --runs may set per run
PER_RUN = SWEEP + ("layer_norm", "residual", "extra_layer", "weight_decay", "warmup_steps",
                   "max_grad_norm", "max_steps", "epochs", "eval_every", "save_every", "resume")


def resolve(args):
    """Fill the defaults that depend on the method (their one home; run names leave them out)."""
    if args.lr is None:
        args.lr = M.DEFAULTS["lr"][args.method]
    for key in ("hidden_size", "broadcast"):
        if getattr(args, key) is None:
            setattr(args, key, M.DEFAULTS[key].get(args.method))
    args.tokenizer = args.tokenizer or args.model
    return args


# run_name's tags: the options that differ from train.py's defaults and apply to the method
NAME_TAGS = [("prompt_length", "n"), ("reparam", ""), ("hidden_size", "h"), ("broadcast", "b"),
             ("depth", "d"), ("extra_layer", "x1"), ("init", "init-"), ("layer_norm", "ln"),
             ("residual", "res"), ("activation", ""), ("lr", "lr"), ("max_steps", "steps"),
             ("epochs", "ep"), ("eval_every", "ev"), ("fewshot_k", "k"), ("fewshot_seed", "fs")]


def defaults(method):
    """train.py's defaults for `method`, read from its own parser and resolve(): what a run name
    leaves out. The few-shot sample always shows in a name (no default)."""
    args = resolve(parser.parse_args(["--method", method]))
    return {**{key: getattr(args, key) for key, _ in NAME_TAGS}, "fewshot_seed": None}


def model_tag(model_name):
    return Path(str(model_name).rstrip("/")).name  # "t5-base", "smoke/tiny-t5" -> "tiny-t5"


def run_name(spec):
    """The folder name of the run `spec` (a dict or Namespace of train.py's options), for a solo
    run, a pack's and the drivers' alike: <task>_<method>_<model>[_<tags>]_s<seed>, e.g.
    boolq_ept_t5-base_h50_s1 (the few-shot sample only with --fewshot-k)."""
    spec = spec if isinstance(spec, dict) else vars(spec)
    default, tags = defaults(spec["method"]), []
    for key, tag in NAME_TAGS:
        value = spec.get(key, default[key])
        if (value is None or value == default[key] or not M.applies(key, spec["method"])
                or key == "fewshot_seed" and not spec.get("fewshot_k")):
            continue
        tags.append(tag if value is True else f"{tag}{value:g}" if isinstance(value, float)
                    else f"{tag}{value}")
    return "_".join([spec["task"], spec["method"], model_tag(spec["model"]), *tags,
                     f"s{spec['seed']}"])


def method_defaults(spec):
    """`spec` (a dict) with the options that do not apply to its method at their defaults, as on
    the command line: a run's config.json is the same in a pack or alone."""
    return {**spec, **{k: parser.get_default(k) for k in M.METHOD_OPTIONS
                       if not M.applies(k, spec["method"])}}


def sweep(args):
    """The runs asked for, unresolved: the product of the sweep options' values (the last varies
    fastest; EPT x 2 prompt lengths is one run); --runs FILE's list is ept/pack.py's read_runs."""
    lists = [v if isinstance(v := getattr(args, k), list) else [v] for k in SWEEP]
    specs = {}
    for combo in itertools.product(*lists):  # --out-dir: the parent
        spec = method_defaults({**vars(args), **dict(zip(SWEEP, combo)), "out_dir": None})
        specs.setdefault(tuple(map(repr, spec.values())), argparse.Namespace(**spec))
    return list(specs.values())


def resolve_runs(args, specs, packed):
    """The runs of a command line, resolved, each with its folder (one naming rule): a lone run's
    is --out-dir or runs/<name>; a pack's each entry's "out_dir", or <--out-dir or runs>/<name>."""
    for spec in specs:
        if packed and spec.method == "ft":
            raise cli.Failure("train: ft trains T5 itself and cannot share it with other runs in "
                              "a pack; train it alone (one --method ft run)")
        resolve(spec)
        spec.out_dir = ((spec.out_dir if packed else args.out_dir)
                        or str(Path(packed and args.out_dir or "runs") / run_name(spec)))
    if not packed and (problem := cli.run_folder_problem(specs[0].out_dir)):
        raise cli.Failure(f"train: --out-dir {problem}")
    folders = [str(Path(s.out_dir).resolve()) for s in specs]
    if shared := sorted({f for f in folders if folders.count(f) > 1}):
        raise cli.Failure(f"train: two runs of the pack share a folder ({', '.join(shared)}); "
                          "give them different options or out_dir")
    if args.random_init and len({s.seed for s in specs}) > 1:
        raise cli.Failure("train: --random-init builds T5's weights from the seed, and a pack "
                          "shares one T5: one seed per pack, or real weights")
    return specs


def batch_plan(args, n_train, world_size):
    """Fill args.steps_per_epoch, .micro_batch_size (examples per forward pass on one rank) and
    .grad_accum_steps; --epochs becomes args.max_steps."""
    args.steps_per_epoch = math.ceil(n_train / args.batch_size)  # the last batch may be partial
    if args.epochs is not None:
        args.max_steps = math.ceil(args.epochs * args.steps_per_epoch)
    per_rank = math.ceil(args.batch_size / world_size)
    args.micro_batch_size = min(args.micro_batch_size or per_rank, per_rank)
    args.grad_accum_steps = math.ceil(per_rank / args.micro_batch_size)
