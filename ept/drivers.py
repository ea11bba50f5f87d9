"""The skeleton every experiment driver shares (ablate.py's grids, fewshot.py's Table 3): its
command line becomes a grid (a list of specs, plans.spec) that run_driver plans, runs, collects and
reports (--dry-run: estimates instead).

    args, extra = drivers.parse(parser, argv, __file__)    # its own flags; the rest: train.py's
    drivers.check_args(parser, args, extra)                # before any run: one argparse error
    return drivers.run_driver("fewshot", specs(args), args, extra)
    ...
    if __name__ == "__main__":
        drivers.run_cli(main, "fewshot")
"""
import argparse
import signal
import sys
from pathlib import Path

import tables  # eval's move: ept/tables.py -> tables.py
from ept import cli, costs, files, launch, options, plans, runs, tasks as registry


def make_parser(doc):
    """A driver's parser: `doc` as --help, and no abbreviations (--lr, train.py's, passed through,
    must not be read as --lr-search, nor --seed as --seeds)."""
    return argparse.ArgumentParser(description=doc, formatter_class=cli.HelpFormatter,
                                   allow_abbrev=False)


def add_execution_args(parser):
    """The flags every driver shares: how runs are launched and where their files go."""
    group = parser.add_argument_group("execution and output")
    group.add_argument("--nproc", type=cli.positive_int, default=1,
                       help="GPUs per run; > 1 launches train.py with torchrun")
    group.add_argument("--subprocess", action="store_true", help="run each train.py in a fresh "
                       "process (default: train.py in this process)")
    group.add_argument("--runs-dir", type=cli.folder, default="runs", help="where run folders go")
    group.add_argument("--results-dir", type=cli.folder, default="results",
                       help="where <experiment>.jsonl goes")
    group.add_argument("--prune-ft-checkpoints", action="store_true",
                       help="delete best.pt/last.pt of finished ft runs once their row is written "
                            "(weights + AdamW state: ~2.7 GB each for t5-base, ~9 GB for t5-large)")
    group.add_argument("--dry-run", action="store_true", help="list the runs, the GPU-hour "
                       "estimate and the wall time on the GPUs given (also appended to "
                       "<results-dir>/dry_run.tsv)")
    group.add_argument("--gpus", type=cli.positive_int,
                       help="a local pool: G / --nproc child processes, each pinned to its own "
                            "GPUs (the first G of CUDA_VISIBLE_DEVICES), take the plan's units "
                            "longest first; then this process collects")
    group.add_argument("--slurm", action="store_true",
                       help="write the plan and submit it to SLURM: one job array (task i runs "
                            "line i, one unit each, requeued on preemption) and the collect step "
                            "as a job after it; prints the job ids and how to follow them")
    group.add_argument("--slurm-partition", help="--slurm: the partition (default: the cluster's)")
    group.add_argument("--slurm-time", metavar="LIMIT", help="--slurm: each task's time limit "
                       "(4:00:00, 1-12, ...); a unit checkpoints before it")
    group.add_argument("--slurm-gpus", type=cli.nonnegative_int, metavar="N", help="--slurm: GPUs "
                       "per task (default: --nproc; 0: no GPU request, a CPU cluster)")
    group.add_argument("--slurm-max-tasks", type=cli.positive_int, metavar="M", help="--slurm: "
                       "array tasks at once (--array=0-(N-1)%%M); --dry-run: the wall time for M")
    group.add_argument("--slurm-after", action="append", default=[], metavar="JOBID",
                       help="--slurm: start the array once this job ended (afterany), e.g. an "
                            "earlier section's array that trains runs this grid shares "
                            "(repeatable)")
    group.add_argument("--slurm-option", action="append", default=[], metavar="OPT",
                       help="--slurm: an extra #SBATCH option, e.g. --slurm-option=--account=nlp "
                            "(repeatable)")
    group.add_argument("--collect", action="store_true", help="train nothing: append every "
                       "finished run's row once to <results-dir>/<experiment>.jsonl and print the "
                       "table (an engine's last job); exit 1 while runs are not finished")
    group.add_argument("--pack-size", type=cli.positive_int, help="prompt runs trained together "
                       "on one frozen T5 (one train.py --runs call; same task, model, data, "
                       "schedule; never ft); default: on CUDA as many as fit the GPU's memory (16 "
                       "for t5-small/base, 8 for t5-large at 80 GB), on a CPU 1 (no packing)")


def parse(parser, argv, script):
    """(the driver's arguments, the flags passed through to train.py); args.command is the driver's
    own command line (the collect step reruns it with --collect)."""
    args, extra = parser.parse_known_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    args.command = [sys.executable, str(Path(script).resolve()), *given]
    return args, extra


def one_of(valid):
    """An argparse type: one of `valid`."""
    def parse_one(text):
        if text not in valid:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(valid)}")
        return text
    return parse_one


def parse_values(parser, types, experiment, values):
    """--values as the experiment's swept type (`types`: {experiment: argparse type}), each
    checked: a wrong one is one argparse error."""
    if values is None:
        return None
    if experiment not in types:
        parser.error(f"--values sweeps {', '.join(types)} only; {experiment} has no swept value")
    try:
        return [types[experiment](v) for v in values]
    except argparse.ArgumentTypeError as err:
        parser.error(f"argument --values: {err}")


def check_args(parser, args, extra):
    """Before any run: the tasks exist and the flags passed through to train.py are train.py's,
    with valid values (else every run of the grid would fail the same way, one after another)."""
    flags, unknown = options.parser.parse_known_args(list(extra))  # a bad value: train.py's error
    if unknown:
        parser.error(f"unrecognized arguments (neither this script's nor train.py's): "
                     f"{' '.join(unknown)}")
    if args.slurm and args.gpus:
        parser.error("--slurm hands each unit to its own array task; --gpus is for one node "
                     "without SLURM: pass one")
    own = {"--task": "--tasks", "--method": "--methods", "--seed": "--seeds"}
    given = next((a.split("=")[0] for a in extra if a.split("=")[0] in own), None)
    if given:  # train.py would train every run of the grid with it, under the grid's names
        parser.error(f"{given} is the grid's own: pass {own[given]} (this script's flag) instead")
    swept = [k for k in options.SWEEP if isinstance(getattr(flags, k), list)]
    if swept:  # train.py would train a pack of them inside each run's folder
        flag = "--" + swept[0].replace("_", "-")
        values = " ".join(map(str, getattr(flags, swept[0])))
        parser.error(f"{flag} {values}: a driver passes one value to every run; the experiment "
                     f"sweeps its own values (--values, --seeds, --methods), or run train.py "
                     f"{flag} with several values yourself")
    if "--overwrite" in extra:
        parser.error("--overwrite would start every run of the plan over at each rerun; delete "
                     "the run folders to train them again")
    for task in args.tasks or []:
        if not registry.known(task) and not (Path(args.data_dir) / task / "meta.json").exists():
            parser.error(f"unknown task {task!r} (not one of the paper's and no "
                         f"{Path(args.data_dir) / task}/meta.json); tasks: "
                         f"{', '.join(registry.TASKS)}")


# --- the run -------------------------------------------------------------------------------------

def run_driver(experiment, specs, args, extra, floor=None):
    """run_experiment, then the experiment's table (after the rows of `floor(args)`, a baseline
    that is not a run); exit 1 when runs are not finished, 130 on Ctrl-C."""
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
    """A driver's entry point: Ctrl-C outside a unit (planning, collecting) leaves nothing
    half-written, so it is one line and exit 130."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"{name}: interrupted (Ctrl-C); run the same command again to resume",
              file=sys.stderr)
        sys.exit(130)
    finally:  # a further Ctrl-C while exiting: no traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_experiment(experiment, specs, args, extra=()):
    """Train what is missing (units here, by a pool of --gpus, or submitted to SLURM), then
    collect: (rows, runs not finished). --collect only collects; --dry-run only estimates."""
    plan = plans.plan_runs(specs, args, extra)
    if args.dry_run:
        return dry_run(experiment, plan, args, extra)
    failed = []
    if not args.collect:
        units = plans.make_units(plan, args, extra)
        path = plans.plan_path(args, experiment)
        plans.write_plan(path, units)
        if args.slurm:
            submit_slurm(experiment, path, args)
            return [], []
        todo = [unit for unit in units if not unit.finished()]
        print(f"{experiment}: plan {path}: {len(units)} unit(s), {len(todo)} to run", flush=True)
        if args.gpus:
            failed = launch.run_pool(experiment, todo, launch.pool_devices(args))
        else:
            failed = [name for i, unit in enumerate(todo)
                      for name in launch.run_unit(experiment, unit, args, i + 1, len(todo))]
    rows, missing = plans.collect(experiment, plan, args)
    return rows, sorted(set(failed) | set(missing))


def submit_slurm(experiment, path, args):
    """--slurm: the plan as one SLURM job array (task i runs line i) and the collect command as a
    job after it (slurm.py writes the sbatch scripts beside the plan and prints the job ids)."""
    from ept import slurm
    if not args.pack_size and costs.pack_size(args, None) == 1:  # a login node without a GPU
        print(f"{experiment}: note: this machine has no GPU, so each unit is one run; pass "
              "--pack-size N (PACK_SIZE=N in run_all.sh) to pack N prompt runs a unit on the "
              "cluster's GPUs", flush=True)
    gpus = args.nproc if args.slurm_gpus is None else args.slurm_gpus
    slurm.submit(path, plans.collect_command(args), job_name=f"ept-{experiment}",
                 partition=args.slurm_partition, time=args.slurm_time, gpus_per_task=gpus,
                 max_parallel=args.slurm_max_tasks, extra=args.slurm_option, after=args.slurm_after)


# --- the dry run ---------------------------------------------------------------------------------

def dry_run(experiment, plan, args, extra):
    """Every run with its status, estimated GPU-hours and the pack it would train in (a row each in
    dry_run.tsv), then the summary lines (wall time; GPU-hours unpacked, packed; fp32, bf16)."""
    hours = costs.plan_hours(plan, args.data_dir, extra)
    states = {name: runs.status(run_dir) for name, (_, _, run_dir) in plan.items()}
    todo = sorted((n for n in plan if states[n] != "done"), key=lambda n: -hours[n])  # as units go
    packs = costs.make_packs(plan, todo, lambda model: costs.pack_size(args, model, "dry"))
    # {run: {precision: (unpacked GPU-hours, its share of its pack's)}}; a finished run: hours twice
    figures = {name: {p: (hours[name], hours[name]) for p in costs.PEAK_TFLOPS} for name in plan}
    for pack in packs:
        for p in costs.PEAK_TFLOPS:
            for name, pair in costs.pack_hours(plan, pack, hours, args.data_dir, extra, p).items():
                figures[name][p] = pair
    pack_of = {name: i for i, pack in enumerate(packs) for name in pack}
    lines = []
    for name in plan:
        pack = pack_of.get(name)
        where = f"  pack {pack} ({len(packs[pack])} runs)" if pack is not None else ""
        print(f"  {states[name]:<7} {hours[name]:7.2f} GPU-h  {name}{where}")
        f32, b16 = figures[name]["fp32"], figures[name]["bf16"]
        lines.append(f"{experiment}\t{states[name]}\t{hours[name]:.4f}\t{name}\t{f32[0]:.4f}\t"
                     f"{f32[1]:.4f}\t{b16[0]:.4f}\t{b16[1]:.4f}\t{pack_of.get(name, '')}\n")
    files.append_lines(Path(args.results_dir) / "dry_run.tsv", lines)  # run_all.sh sums it
    print_dry_summary(experiment, args, extra, hours, todo, packs, figures)
    return [], []


def print_dry_summary(experiment, args, extra, hours, todo, packs, figures):
    """The DRY-RUN and DRY-RUN-PACKS lines run_all.sh parses."""
    sums = {p: [sum(figures[n][p][k] for n in todo) for k in (0, 1)] for p in costs.PEAK_TFLOPS}
    # the headline: the precision this call trains at (train.py's default fp32 unless --dtype bf16),
    # packed as this call packs (GPU-hours of a unit: its runs' shares; a pack of one: a solo run)
    precision = "bf16" if costs.extra_value(extra, "--dtype", "fp32", str) == "bf16" else "fp32"
    packing = "packed" if any(len(p) > 1 for p in packs) else "unpacked"
    units = [sum(figures[n][precision][1] for n in pack) for pack in packs]
    todo_h, longest = sum(units), max(units, default=0.0)
    slots = args.slurm_max_tasks or (args.gpus or args.nproc) // args.nproc
    low, high = costs.wall_hours(todo_h, longest, slots * args.nproc, args.nproc)
    measured = sum(hours[n] for n in todo)
    print(f"DRY-RUN {experiment} runs={len(hours)} to_train={len(todo)} gpu_hours={todo_h:.1f} "
          f"at {precision} ({packing}; measured bf16 unpacked: {measured:.1f}, all runs: "
          f"{sum(hours.values()):.1f}); wall ~{low:.1f}-{high:.1f} h with {slots} unit(s) at once "
          f"x {args.nproc} GPU(s) (--gpus {slots * args.nproc}, or {slots} SLURM array tasks at "
          f"once; longest unit {longest / args.nproc:.1f} h; ideal scaling within a run assumed)")
    sizes = sorted({len(p) for p in packs}, reverse=True)
    size = args.pack_size or f"for a {costs.ASSUMED_GPU_GB} GB GPU"
    print(f"DRY-RUN-PACKS {experiment} to_train={len(todo)} packs={len(packs)} (sizes "
          f"{'/'.join(map(str, sizes)) or '-'}; --pack-size {size}) GPU-hours to go: "
          f"fp32 {sums['fp32'][0]:.1f} unpacked, {sums['fp32'][1]:.1f} packed; "
          f"bf16 {sums['bf16'][0]:.1f} unpacked, {sums['bf16'][1]:.1f} packed "
          f"(packed and fp32 figures: a FLOP model at {costs.ASSUMED_UTILISATION:.0%} of the "
          "H200's peak, not measured)")
