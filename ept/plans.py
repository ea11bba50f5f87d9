"""A grid as a plan of units, and its result rows (docs/experiments.md, "The plan").

A grid is a list of specs (train.py options per run, plus "_row": extra result columns such as the
swept value); the plan maps each run's name to (options, extra columns, run folder), the same
configuration twice (a shared default) being one run. A unit, a pack of prompt runs or a solo run,
is one line of <results-dir>/<experiment>.plan: `cd <cwd> && python train.py ... --resume`, which
is idempotent (a finished run exits at once, a half-done one resumes from last.pt, a fresh one
starts). Units write no result rows: the collect step appends every finished run's row once.
"""
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

import model as M
from ept import costs, errors, files, options, runs

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"
PACK_SHARED = ("task", "model", "fewshot_k", "fewshot_seed", "batch_size")  # flags; others per run


def spec(task, method, model, seed, _row=None, **settings):
    """One run of a grid: train.py options, and `_row`, extra result columns (not options)."""
    return {"task": task, "method": method, "model": model, "seed": seed, **settings,
            **({"_row": _row} if _row else {})}


def run_name(settings):
    """<task>_<method>_<model>[_<non-default options>]_s<seed>, e.g. boolq_ept_t5-base_h50_s1
    (runs.run_name against train.py's defaults for the method)."""
    return runs.run_name(settings, options.defaults(settings["method"]))


# --- train.py's command lines --------------------------------------------------------------------

def train_argv(settings, out_dir, data_dir=None, extra=()):
    """train.py's command line for one run: its options as flags (one name per concept), extra."""
    argv = []
    for key, value in settings.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        text = f"{value:g}" if isinstance(value, float) else str(value)
        argv += [flag] if value is True else [flag, text]
    if data_dir:
        argv += ["--data-dir", str(data_dir)]
    return argv + ["--out-dir", str(out_dir), *extra]


def pack_argv(specs, run_dirs, data_dir, extra, runs_file):
    """train.py's command line for a pack, and the --runs FILE content: the shared options as
    flags, per run its other options (train.py's option names) and out_dir."""
    shared = {k: specs[0][k] for k in PACK_SHARED if specs[0].get(k) is not None}
    entries = [{**{k: v for k, v in s.items()
                   if k not in shared and v is not None and v is not False},
                "out_dir": str(run_dir)} for s, run_dir in zip(specs, run_dirs)]
    argv = train_argv(shared, "-", data_dir, [*extra, "--runs", str(runs_file)])
    i = argv.index("--out-dir")
    return argv[:i] + argv[i + 2:], entries


def passed_through(extra):
    """The per-run options among the pass-through flags (--max-steps 6, ...: run-name options and
    what a --runs entry may set), typed: they win over the experiment's values, so a run's name and
    --runs entry say what it trains (a SMOKE few-shot run of 6 steps: ..._steps6_...)."""
    flags = {a.split("=")[0] for a in extra if a.startswith("--")}
    values = vars(options.parser.parse_known_args(list(extra))[0])
    keys = dict.fromkeys([key for key, _ in runs.NAME_TAGS]
                         + [k for k in options.PER_RUN if k != "resume"])
    return {key: values[key] for key in keys
            if key in values and "--" + key.replace("_", "-") in flags}


# --- the plan ------------------------------------------------------------------------------------

def plan_runs(specs, args, extra=()):
    """{run name: (train.py options, extra result columns, run folder)}: the pass-through flags
    that name runs win over the experiment's values; the same configuration twice is one run."""
    plan, through = {}, passed_through(extra)
    for s in specs:
        settings = {k: v for k, v in s.items() if k != "_row"}
        settings.update({k: v for k, v in through.items()
                         if not (k == "max_steps" and settings.get("epochs"))})
        name = run_name(settings)
        plan.setdefault(name, (settings, s.get("_row"), Path(args.runs_dir) / name))
    return plan


class Unit:
    """One line of the plan: its index (its line in the plan file, 0-based: an array task's index),
    its runs (names and folders), train.py's argv and the shell line."""

    def __init__(self, index, names, dirs, argv, nproc, runs_file=None, runs_text=None):
        self.index, self.names, self.dirs, self.argv = index, names, dirs, argv
        self.runs_file, self.runs_text = runs_file, runs_text  # a pack's --runs file (write_plan)
        torchrun = ["torchrun", "--standalone", f"--nproc_per_node={nproc}"]
        self.command = [*([sys.executable] if nproc == 1 else torchrun), str(TRAIN_SCRIPT), *argv]
        self.line = f"cd {shlex.quote(os.getcwd())} && {shlex.join(self.command)}"

    def finished(self):
        return all(runs.finished(run_dir) for run_dir in self.dirs)

    def unfinished_runs(self):
        return [name for name, run_dir in zip(self.names, self.dirs) if not runs.finished(run_dir)]


def make_units(plan, args, extra):
    """The plan's units, longest first: packs (costs.make_packs, pack_size on this machine) made
    over every run, finished or not, so the same grid always gives the same units and runs files."""
    hours = costs.plan_hours(plan, args.data_dir, extra)
    order = sorted(plan, key=lambda name: -hours[name])
    units, extra = [], [*extra, "--resume"]
    for names in costs.make_packs(plan, order, lambda model: costs.pack_size(args, model)):
        specs, dirs = [plan[n][0] for n in names], [plan[n][2] for n in names]
        if len(names) == 1:
            argv = train_argv(specs[0], dirs[0], args.data_dir, extra)
            units.append(Unit(len(units), names, dirs, argv, args.nproc))
            continue
        argv, entries = pack_argv(specs, dirs, args.data_dir, extra, Path("-"))
        text = json.dumps(entries, indent=1) + "\n"
        digest = hashlib.sha1(text.encode()).hexdigest()[:16]
        runs_file = Path(args.results_dir) / "packs" / f"{digest}.json"
        argv[argv.index("--runs") + 1] = str(runs_file)
        units.append(Unit(len(units), names, dirs, argv, args.nproc, runs_file, text))
    return units


def plan_path(args, experiment):
    return Path(args.results_dir) / f"{experiment}.plan"


def write_plan(path, units):
    """The plan file, written once: a rerun of the same grid finds the same lines; another grid in
    the same results folder is refused (line i must keep its meaning for an engine's index)."""
    text = "".join(unit.line + "\n" for unit in units)
    if path.exists() and (old := path.read_text(encoding="utf-8")) != text:
        lines = old.splitlines()
        pairs = enumerate(zip(lines, text.splitlines()))
        i = next((i for i, (a, b) in pairs if a != b), min(len(lines), len(units)))
        raise errors.Failure(f"{path} holds another plan (line {i + 1} differs: another grid, "
                             f"flags, pack size or folder); delete it to plan again, or pass "
                             f"another --results-dir")
    for unit in units:  # the packs' runs files first: a plan line never names a missing file
        if unit.runs_file is not None and not unit.runs_file.exists():
            files.make_dir(unit.runs_file.parent, "packs folder")
            files.write_text(unit.runs_file, unit.runs_text)
    if not path.exists():
        files.make_dir(path.parent, "results folder")
        files.write_text(path, text)


def collect_command(args):
    """The shell line that appends every finished run's row once (and prints the table)."""
    return f"cd {shlex.quote(os.getcwd())} && {shlex.join([*args.command, '--collect'])}"


# --- result rows ---------------------------------------------------------------------------------

def prompt_stats(run_dir):
    """(mean row norm of the saved P' (Eq. 4 on the best checkpoint's prompt), parameters kept for
    inference = distinct rows x d: one row for EPT/EPT*, whose rows are copies)."""
    path = Path(run_dir) / "prompt.pt"
    if not path.exists():
        return None, None
    prompt, _ = M.load_folded_prompt(path)
    return prompt.norm(dim=1).mean().item(), int(prompt.unique(dim=0).numel())


def log_stats(run_dir):
    """Best validation score and its step (the first of equal ones), and the last logged prompt
    norm μ_t, from log.jsonl (runs.curves)."""
    _, norms, steps, scores = runs.curves(run_dir, missing_ok=True)
    best = max(zip(scores, steps), key=lambda pair: pair[0], default=(None, None))
    return (*best, norms[-1] if norms else None)


def result_row(experiment, settings, run_dir, extra_fields=None):
    """One results row: the full configuration, the test metrics, parameters and prompt norms. A
    --no-test run is a finished run too: its row has "tested": false and no score (None)."""
    run_dir = Path(run_dir)
    config = files.read_json(run_dir / "config.json", "run configuration")
    config = {**config, **M.prompt_options(config)}  # older runs' option names and missing options
    tested = not config.get("no_test")
    metrics = files.read_json(run_dir / "metrics.json", "test metrics") if tested else {}
    norm, n_inference = prompt_stats(run_dir)
    val_score, best_step, last_norm = log_stats(run_dir)
    ran = {**options.defaults(settings["method"]), **settings}
    for key in ran:  # what train.py ran with (pass-through flags included) wins over the spec
        if config.get(key) is not None:
            ran[key] = config[key]
    if not ran["fewshot_k"]:
        ran["fewshot_seed"] = None
    return {"experiment": experiment, "run": str(run_dir), **ran,
            "model_tag": runs.model_tag(settings["model"]), **(extra_fields or {}),
            "score": metrics.get("score"), "test": metrics if tested else None, "tested": tested,
            "val_score": val_score, "best_step": best_step,
            "n_trainable": config.get("n_trainable"), "n_inference": n_inference,
            "prompt_norm": norm, "final_prompt_norm": last_norm}


def append_row_once(results, row):
    """Append `row` to the results file unless a row of its run folder is there: checked and
    written (one write) under the file's lock, so two collect steps at once never double a row."""
    with files.locked(results):
        rows = files.read_jsonl(results, what="results file", missing_ok=True,
                                fix=files.RESULTS_FIX)
        if any(r.get("run") == row["run"] for r in rows):
            return False
        files.append_jsonl(results, [row])
        return True


def collect(experiment, plan, args):
    """Every finished run's row appended once to results/<experiment>.jsonl (ft checkpoints pruned
    with --prune-ft-checkpoints); (rows in plan order, runs not finished)."""
    results = Path(args.results_dir) / f"{experiment}.jsonl"
    rows, missing, added = [], [], 0
    for name, (settings, fields, run_dir) in plan.items():
        if runs.status(run_dir) != "done":
            missing.append(name)
            continue
        row = result_row(experiment, settings, run_dir, fields)
        added += append_row_once(results, row)
        rows.append(row)
        if args.prune_ft_checkpoints and settings["method"] == "ft":  # T5 + AdamW state, twice
            prune_checkpoints(run_dir)
    failed = {name: runs.failure(plan[name][2]) for name in missing
              if runs.status(plan[name][2]) == "failed"}
    failures = f" ({len(failed)} failed)" if failed else ""
    print(f"{experiment}: {len(plan)} runs, {len(rows)} finished ({added} rows added now), "
          f"{len(missing)} not finished{failures} -> {results}", flush=True)
    for name, why in failed.items():  # stopped for good: running the unit again fails the same way
        print(f"{experiment}: FAILED {name}: {why}", file=sys.stderr)
    failed_file = Path(args.results_dir) / f"{experiment}.failed.json"  # report.py lists them
    if failed:
        files.write_json(failed_file, {str(plan[name][2]): why for name, why in failed.items()})
    else:
        failed_file.unlink(missing_ok=True)
    if len(missing) > len(failed):
        print(f"{experiment}: NOT FINISHED (see each folder's log.jsonl): "
              f"{' '.join(n for n in missing if n not in failed)}", file=sys.stderr)
    return rows, missing


def prune_checkpoints(run_dir):
    for file in ("best.pt", "last.pt"):
        try:
            (run_dir / file).unlink(missing_ok=True)
        except OSError as err:  # a read-only runs folder: the row is written, the checkpoint stays
            raise files.FileFault(f"--prune-ft-checkpoints: cannot delete {run_dir / file}: "
                                  f"{files.why(err)}; its row is written, rerun without the "
                                  "flag") from None
