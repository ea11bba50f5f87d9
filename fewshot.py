"""Table 3: few-shot adaptation on the 13 GLUE + SuperGLUE tasks, k in {4, 16, 32} examples in all.

A thin driver over train.py (the machinery is ept/grid.py's, as for ablate.py): every method on
t5-base, six seeds (the k-shot sample `train_k{K}_seed{S}.jsonl` of prepare_data.py, classes
balanced, and the training seed are both S), 10,000 steps, lr 0.3 for prompts and 1e-3 for
fine-tuning (Appendix B.2); validation and test as in the full-data setting. Finished runs are
skipped; one row per run goes to results/fewshot.jsonl.

    python prepare_data.py --tasks all --out data --fewshot 4 16 32 --fewshot-seeds 0 1 2 3 4 5
    python fewshot.py --dry-run                     # 1,404 runs and the GPU-hour estimate
    python fewshot.py                               # Table 3
    python fewshot.py --shots 16 --tasks rte cb --nproc 2   # a slice, 2 GPUs per run (torchrun)
    python fewshot.py --model smoke/tiny-t5 --data-dir smoke/data --runs-dir smoke/runs \\
        --results-dir smoke/results --shots 4 --seeds 0 1 --max-steps 4 --eval-every 2  # CPU

Unknown flags go to train.py unchanged (after this script's, so they win).
"""
import sys
from pathlib import Path

import model as M
from ept import cli, grid, outputs, tasks

TASKS = tasks.GROUPS["glue"] + tasks.GROUPS["superglue"]  # the 13 of Table 1
SHOTS = [4, 16, 32]
SEEDS = [0, 1, 2, 3, 4, 5]  # "averaged over 6 runs" (Table 3)
STEPS = 10000
LR = {"ft": 1e-3, "prompt": 0.3}

parser = cli.Parser(description=__doc__, formatter_class=cli.HelpFormatter, allow_abbrev=False)
parser.add_argument("--tasks", nargs="+", type=cli.name,
                    help="subset of the 13 tasks (default: all)")
parser.add_argument("--shots", nargs="+", type=cli.positive_int, default=SHOTS,
                    help="k examples in all, the classes balanced (prepare_data.py)")
parser.add_argument("--data-dir", default="data",
                    help="prepare_data.py output (with --fewshot files)")
parser.add_argument("--model", default="t5-base", help="T5 name or folder")
parser.add_argument("--methods", nargs="+", choices=M.METHODS, help="subset of the methods")
parser.add_argument("--seeds", nargs="+", type=cli.nonnegative_int, default=SEEDS,
                    help="few-shot sample and training seeds")
parser.add_argument("--steps", type=cli.positive_int, default=STEPS,
                    help="training steps (paper: 10,000)")
grid.add_execution_args(parser)  # --nproc, --gpus, --collect, --runs-dir, --dry-run, ...


def specs(args):
    return [grid.spec(task, method, args.model, seed, fewshot_k=k, fewshot_seed=seed,
                       max_steps=args.steps, lr=LR["ft" if method == "ft" else "prompt"],
                       _row={"variant": k})
            for k in args.shots for task in args.tasks or TASKS
            for method in args.methods or M.METHODS for seed in args.seeds]


def check_samples(args):
    """Every k-shot sample this grid trains on is prepared (else each of its runs would fail
    alike); samples of the old rule (k per class) are used, with a warning naming the rebuild."""
    names = args.tasks or TASKS
    samples = [Path(args.data_dir) / t / f"train_k{k}_seed{s}.jsonl"
               for t in names for k in args.shots for s in args.seeds]
    missing = [path for path in samples if not path.exists()]
    if missing:
        parser.error(f"no {missing[0]} ({len(missing)} samples missing); prepare them first: "
                     + tasks.prepare_command(args.data_dir, names, args.shots, args.seeds,
                                             overwrite=True))
    wanted = {f"k{k}_seed{s}" for k in args.shots for s in args.seeds}
    old = {t: sorted(set(outputs.old_fewshot_sets(tasks.load_meta(args.data_dir, t, strict=False)))
                     & wanted) for t in names}
    if warning := outputs.old_fewshot_warning(args.data_dir, old):
        print(f"fewshot: {warning}", file=sys.stderr)


@cli.script
def main(argv=None):
    args, extra = grid.parse(parser, argv, __file__)
    grid.check_args(parser, args, extra)
    if not args.dry_run and not args.collect:
        check_samples(args)
    return grid.run_driver("fewshot", specs(args), args, extra)


if __name__ == "__main__":
    grid.run_cli(main, "fewshot")
