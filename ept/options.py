"""train.py's flags and the rules the drivers plan by: method defaults, run names, batch plan."""
import math
from pathlib import Path

import model as M
from ept import cli, runtime

# train.py sets its text; no abbreviations: `--max-step 3` or `--eval 5` is an error, never a guess
parser = cli.Parser(prog="train.py", formatter_class=cli.HelpFormatter, allow_abbrev=False)
several, pos, nonneg = dict(nargs="+", action=cli.Sweep), cli.positive_int, cli.nonnegative_int
add = parser.add_argument_group("data").add_argument
add("--task", default="rte", type=cli.name, help="task; data/<task>/ is prepared if missing")
add("--data-dir", default="data", help="folder holding <task>/meta.json and the split files")
add("--source", metavar="DIR", help="prepare a missing task from these official files, not the Hub")
add("--fewshot-k", type=pos, help="train on train_k{K}_seed{S}.jsonl (Table 3)")
add("--fewshot-seed", type=nonneg, default=0, help="which few-shot sample (S above)")
add("--max-length", type=pos, help="max input tokens before the prompt (default: meta.json's)")
add("--max-train-examples", type=pos, help="use only the first N training rows")
add("--max-eval-examples", type=pos, help="score only the first N validation/test rows")
add = parser.add_argument_group("model").add_argument
add("--model", default="t5-base", help="Hub name or local folder of the (frozen) T5")
add("--tokenizer", help="Hub name or folder of the tokenizer (default: --model)")
add("--random-init", action="store_true", help="random T5 weights from the config (tests, speed)")
add("--method", default="ept", choices=M.METHODS, **several, help="ft = full fine-tuning")
add("--prompt-length", type=pos, default=M.DEFAULTS["prompt_length"], **several, help="n (not EPT)")
add("--reparam", default="mlp", choices=M.REPARAMS, **several, help="ptuning's network")
add("--hidden-size", type=pos, **several, help="EPT h / ResPrompt bottleneck (default: 1 / 400)")
add("--broadcast", type=pos, **several, help="EPT rows n (default: 1 ept, 10 ept_star)")
add("--layer-norm", action="store_true", help="EPT: LayerNorm after the up layer (Figure 9)")
add("--residual", action="store_true", help="EPT: add P1 back (Figure 9)")
add("--activation", default="none", choices=tuple(M.ACTIVATIONS), **several, help="EPT (Figure 9)")
add("--depth", type=pos, default=1, **several, help="stacked EPT down-up blocks")
add("--extra-layer", action="store_true", help="EPT: an h -> h layer between down and up (Table 4)")
add("--init", default="uniform", choices=M.INITS, **several, help="prompt init (Table 6)")
add("--dropout", type=cli.probability, help="T5's dropout rate (default: the config's, 0.1)")
add = parser.add_argument_group("optimisation").add_argument
add("--lr", type=cli.positive_float, **several, help="peak lr (default: 0.3 prompts, 1e-5 ft)")
add("--weight-decay", type=cli.nonnegative_float, default=0.01, help="AdamW's, not on biases/norms")
add("--warmup-steps", type=nonneg, default=0, help="linear lr warm-up steps before the decay to 0")
add("--max-grad-norm", type=cli.nonnegative_float, default=1.0, help="clipping (0 = off)")
add("--batch-size", type=pos, default=16, help="GLOBAL batch (examples per step, all ranks)")
add("--micro-batch-size", type=pos, help="examples per forward on one rank (default: batch/ranks)")
add("--max-steps", type=pos, default=30000, help="optimizer steps")
add("--epochs", type=cli.positive_float, help="this many epochs instead of --max-steps (Table 4)")
add("--seed", type=nonneg, default=0, **several, help="prompt init, data order, dropout")
add("--dtype", default="fp32", choices=runtime.DTYPES, help="fp32 (the HF Trainer's), tf32, bf16")
add("--compile", action="store_true", help="torch.compile the training forward")
add("--group-by-length", action="store_true", help="batch similar lengths (changes data order)")
add = parser.add_argument_group("evaluation").add_argument
add("--eval-every", type=pos, default=1000, help="validate every N steps (and at the last step)")
add("--eval-batch-size", type=pos, default=64, help="examples per decoding batch")
add("--eval-mode", default="generate", choices=("generate", "rank"), help="or rank the labels")
add("--no-test", action="store_true", help="skip the final test evaluation")
add = parser.add_argument_group("output").add_argument
add("--out-dir", type=cli.folder, help="run folder (default: runs/<name>); a pack's: the parent")
add("--save-every", type=pos, help="also write last.pt every N steps (default: --eval-every)")
add("--resume", action="store_true", help="continue from out-dir/last.pt")
add("--overwrite", action="store_true", help="delete an existing run folder's files first")
add("--tensorboard", nargs="?", const="", metavar="DIR", help="also log to TensorBoard "
    "(default DIR: <out-dir>/tensorboard)")
add("--wandb", metavar="PROJECT", help="also log to Weights & Biases")
add = parser.add_argument_group("packs: several prompt runs on one T5").add_argument
add("--runs", metavar="FILE", help="a JSON list of per-run option dicts; the flags: all runs'")
add("--pack-max-rows", type=pos, metavar="K", help="examples per forward (default: all the runs')")
# SWEEP: the options that take several values (a sweep: a pack); PER_RUN: what --runs FILE may set
SWEEP = ("method", "seed", "lr", "prompt_length", "hidden_size", "broadcast", "init", "reparam",
         "activation", "depth")
PER_RUN = SWEEP + ("layer_norm", "residual", "extra_layer", "weight_decay", "warmup_steps",
                   "max_grad_norm", "max_steps", "epochs", "eval_every", "save_every", "resume")
# run_name's tags: the options that differ from train.py's defaults and apply to the method
NAME_TAGS = [("prompt_length", "n"), ("reparam", ""), ("hidden_size", "h"), ("broadcast", "b"),
             ("depth", "d"), ("extra_layer", "x1"), ("init", "init-"), ("layer_norm", "ln"),
             ("residual", "res"), ("activation", ""), ("lr", "lr"), ("max_steps", "steps"),
             ("epochs", "ep"), ("eval_every", "ev"), ("fewshot_k", "k"), ("fewshot_seed", "fs")]


def resolve(args):
    """The method's defaults (their one home), the options it ignores at theirs (sweep once)."""
    method, tokenizer = args.method, args.tokenizer or args.model
    vars(args).update({k: parser.get_default(k) for k in M.OPTIONS if not M.applies(k, method)})
    vars(args).update({k: M.DEFAULTS[k].get(method) for k in ("lr", "hidden_size", "broadcast")
                       if getattr(args, k) is None}, tokenizer=tokenizer)
    return args


def defaults(method):
    """What a run name leaves out: train.py's defaults for `method` (the few-shot sample: none)."""
    args = resolve(parser.parse_args(["--method", method]))
    return {**{key: getattr(args, key) for key, _ in NAME_TAGS}, "fewshot_seed": None}


model_tag = lambda model: Path(str(model).rstrip("/")).name  # noqa: E731 "smoke/tiny-t5": tiny-t5


def run_name(spec):
    """A run's name, <task>_<method>_<model>[_<tags>]_s<seed> (boolq_ept_t5-base_h50_s1)."""
    base, method = defaults(spec["method"]), spec["method"]
    tags = [tag if v is True else f"{tag}{v:g}" if isinstance(v, float) else f"{tag}{v}"
            for key, tag in NAME_TAGS if (v := spec.get(key, base[key])) not in (None, base[key])
            and M.applies(key, method) and (key != "fewshot_seed" or spec.get("fewshot_k"))]
    return "_".join([spec["task"], method, model_tag(spec["model"]), *tags, f"s{spec['seed']}"])


def batch_plan(args, n_train, world_size):
    """Fill args.steps_per_epoch, .micro_batch_size (one rank's forward), .grad_accum_steps."""
    per_epoch = args.steps_per_epoch = math.ceil(n_train / args.batch_size)  # the last: partial
    args.max_steps = math.ceil(args.epochs * per_epoch) if args.epochs else args.max_steps
    per_rank = math.ceil(args.batch_size / world_size)
    args.micro_batch_size = min(args.micro_batch_size or per_rank, per_rank)
    args.grad_accum_steps = math.ceil(per_rank / args.micro_batch_size)
