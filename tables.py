"""The paper's tables from the results rows (one row per run, ept/grid.py), as markdown and
long-form rows: a library beside report.py, not a stage. report.py writes them to report/ (with
the figures); a driver prints its experiment's table when its runs are collected
(`tables.experiment_table`). Also the Param column, from the configs (`report.py --count`)."""
import functools
import json
import math
from pathlib import Path

import model as M
from ept import files, outputs
from ept.tasks import GROUPS, TASKS

GLUE, SUPERGLUE, MRQA, OTHERS = (GROUPS[g]
                                 for g in ("glue", "superglue", "mrqa", "others"))

LABELS = {"ft": "FT", "ptuning": "P-Tuning", "resprompt": "ResPrompt", "pt": "PT", "ept": "EPT",
          "ept_star": "EPT*"}
METHOD_ORDER = ["ft", "ptuning", "resprompt", "pt", "ept", "ept_star"]  # the paper's row order
TASK_LABELS = {"cola": "CoLA", "mrpc": "MRPC", "rte": "RTE", "stsb": "STS-B", "mnli": "MNLI",
               "qnli": "QNLI", "qqp": "QQP", "sst2": "SST-2", "boolq": "BoolQ", "cb": "CB",
               "wic": "WiC", "wsc": "WSC", "multirc": "MultiRC", "nq": "NQ", "hotpotqa": "HP",
               "searchqa": "SQA", "newsqa": "News", "winogrande": "WG", "yelp": "Yelp",
               "scitail": "SciTail", "paws": "PAWS"}
METRIC_LABELS = {"cola": "Matt", "stsb": "Pearson", "cb": "F1/Acc", "multirc": "F1a",
                 **{t: "F1" for t in MRQA}}
SIZE_ORDER = ["t5-large", "t5-base", "t5-small"]  # Table 1 lists Large first
MODEL_ORDER = SIZE_ORDER[::-1]  # figures: small to large
DASH = "–"
COLORS = {"ft": "tab:gray", "ptuning": "tab:green", "resprompt": "tab:orange", "pt": "tab:blue",
          "ept": "tab:red", "ept_star": "tab:purple"}
# Table 4 rows the paper quotes from ATTEMPT (Asai et al. 2022) and that are not rerun here:
# (method, params train/inference, MultiRC, BoolQ, WiC, WSC, CB, Avg)
TABLE4_QUOTED = [("Fine-tuning", "220M/-", 73.9, 81.5, 70.8, 62.2, 75.0, 72.7),
                 ("Adapter", "1.9M/-", 75.5, 82.1, 67.0, 61.5, 81.0, 73.4),
                 ("AdapterDrop", "1.1M/-", 75.3, 82.3, 67.7, 62.2, 73.8, 72.3),
                 ("BitFit", "280K/-", 74.7, 79.9, 68.2, 54.5, 72.6, 70.0),
                 ("ATTEMPT", "232K/-", 72.9, 77.0, 66.9, 52.5, 72.6, 68.4),
                 ("SPoT", "77K/-", 73.0, 77.4, 58.4, 61.5, 36.9, 61.4)]
TABLE4_TASKS = ["multirc", "boolq", "wic", "wsc", "cb"]
# The paper's own numbers, printed under each table for comparison, in our column order ("?" where
# the extracted paper text lost the number). Tables 1 and 2: model, method, Param, the scores.
PAPER_TABLE1 = """
t5-large ft        770M 61.7 89.4 88.5 91.9 89.7 94.4 91.4 95.9 87.9 85.8 88.6 71.9 85.3 79.9 82.3
t5-large ptuning   3.1M 58.0 88.1 85.4 91.2 88.2 94.1 90.9 95.2 86.4 82.9 87.0 68.8 60.9 79.1 75.7
t5-large resprompt 832K 54.8 88.2 85.9 91.5 66.1 93.8 90.8 95.0 83.2 82.1 51.2 69.2 61.5 78.2 68.4
t5-large pt        10K   0.7 74.9 50.8 91.2 35.7 89.7 88.5 87.4 64.9 62.9 58.6 55.7 60.9 59.8 59.6
t5-large ept       3K   56.8 87.9 85.1 91.1 84.4 93.6 91.0 95.4 85.7 82.2 89.1 67.2 61.5 78.7 75.7
t5-large ept_star  3K   54.3 87.9 85.4 91.2 87.2 93.8 91.0 95.3 85.8 82.4 95.4 69.1 62.2 79.1 77.6
t5-base  ft        220M 59.8 87.9 81.8 90.6 85.9 93.1 90.4 94.2 85.5 82.8 87.6 67.9 61.5 74.9 75.0
t5-base  ptuning   1.7M 47.2 85.7 76.3 89.7 83.0 92.8 90.3 93.5 82.3 78.8 88.3 67.0 60.3 73.6 73.6
t5-base  resprompt 624K 34.1 85.8 65.7 90.3 72.6 92.6 89.4 90.3 77.6 76.0 64.2 65.1 61.5 66.4 66.7
t5-base  pt        7.6K  0.0 67.6 56.6 90.2 48.8 69.7 65.9 84.7 60.4 62.1 59.2 53.0 61.5 59.6 59.1
t5-base  ept       2.3K  0.0 82.9 68.8 89.7 69.3 92.7 90.2 93.0 73.3 75.5 73.1 65.6 62.2 59.7 67.2
t5-base  ept_star  2.3K 41.0 85.0 75.8 89.7 76.1 92.6 90.4 93.8 80.5 77.0 82.7 65.3 58.3 72.4 71.1
t5-small ft        60M  36.3 85.9 67.9 88.8 78.8 90.4 88.1 91.1 78.4 76.5 77.8 66.6 51.3 68.4 68.1
t5-small ptuning   793K  0.0 84.2 65.0 86.6 75.5 89.4 88.3 89.1 72.3 71.1 64.5 65.6 59.6 65.7 65.3
t5-small resprompt 416K  0.0 80.9 61.4 85.9 62.1 88.9 88.2 88.1 69.4 61.9 58.4 50.6 59.0 59.3 57.8
t5-small pt        5.1K  2.8 75.6 52.3 85.6 41.5 87.2 85.8 82.0 64.1 61.8 55.2 48.7 62.2 60.0 57.6
t5-small ept       1.5K  0.8 78.0 57.6 85.6 62.7 87.7 87.8 83.4 68.0 61.9 59.1 51.8 59.6 63.7 59.2
t5-small ept_star  1.5K  0.0 82.8 65.9 86.3 68.7 89.0 88.2 88.8 71.2 68.0 59.2 60.4 60.3 65.5 62.7
"""
PAPER_TABLE2 = """
t5-base ft        220M 75.0 78.7 80.2 66.7 75.1 59.1 97.0 94.9 94.2 86.3
t5-base ptuning   1.7M 66.1 72.9 71.3 61.8 68.0 48.6 95.8 91.3 89.0 81.2
t5-base resprompt 624K 64.9 72.7 67.5 60.3 66.3 48.9 95.1 88.4 74.6 76.7
t5-base pt        7.6K 64.7 71.6 66.7 60.4 65.8 48.5 93.7 68.0 55.7 66.5
t5-base ept       2.3K 64.4 72.3 68.2 60.2 66.3 48.9 93.8 89.0 77.2 77.3
t5-base ept_star  2.3K    ?    ?    ?    ?    ?    ?    ? 90.1 84.8 79.6
"""
PAPER_TABLE3 = [("SuperGLUE", 4, "53.1 56.3 53.0 53.9 55.8 54.3"),
                ("SuperGLUE", 16, "56.8 60.2 51.2 54.2 57.9 57.1"),
                ("SuperGLUE", 32, "58.5 59.9 54.0 52.9 58.2 59.3"),
                ("GLUE", 4, "57.2 63.9 46.8 48.9 60.7 60.8"),
                ("GLUE", 16, "59.0 64.2 49.8 50.6 65.3 65.7"),
                ("GLUE", 32, "61.8 69.1 56.2 52.9 69.6 69.0")]
PAPER_TABLE4 = [("PT", "77K/-", "56.5 61.9 48.1 62.2 50.0 55.7"),
                ("EPT", "2.3K/768", "67.9 70.3 55.8 61.5 61.9 63.5"),
                ("EPT*", "2.3K/768", "73.3 76.7 65.2 62.2 67.9 69.1")]
PAPER_TABLE6 = [("uniform", "75.7 72.5 70.5 65.4 71.0"), ("vocab", "75.4 77.6 69.8 63.5 71.6"),
                ("label", "75.1 75.5 67.6 63.5 70.4")]
STRUCTURE_LABELS = {"none": "None", "layernorm": "LayerNorm", "residual": "Residual",
                    "relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid"}  # Figure 9's order
INIT_LABELS = {"uniform": "Random (U[-0.5, 0.5])", "vocab": "Sample (vocabulary)",
               "label": "Label (label words)"}

# --- reading the results rows ---------------------------------------------------------------------

ROW_KEYS = ("run", "task", "method", "seed", "score", "model_tag")  # every row (grid.result_row)
EXPERIMENT_KEYS = {"table1": ("lr",), "fewshot": ("fewshot_k",),
                   "table4": ("n_trainable", "n_inference", "prompt_length", "depth"),
                   "init": ("init",), "hidden": ("variant",), "broadcast": ("variant",),
                   "lr": ("variant",), "structure": ("variant",)}


def read_rows(results, experiment):
    """results/<experiment>.jsonl ([] when absent), each row holding what the tables read: a
    hand-edited or foreign row is one sentence naming its line, never a KeyError mid-table."""
    path = Path(results) / f"{experiment}.jsonl"
    rows = files.read_jsonl(path, what="results file", missing_ok=True, fix=outputs.RESULTS_FIX)
    for number, row in enumerate(rows, 1):
        missing = [k for k in (*ROW_KEYS, *EXPERIMENT_KEYS.get(experiment, ())) if k not in row]
        score = row.get("score")
        if missing or not (score is None
                           or isinstance(score, (int, float)) and not isinstance(score, bool)):
            raise files.FileFault(
                f"the results file {path} is damaged: row {number} has "
                f"{'no ' + ', '.join(missing) if missing else f'the score {score!r}'}; delete that "
                "line and rerun the experiment's driver (ablate.py / fewshot.py) to write it again")
    return rows


# --- numbers --------------------------------------------------------------------------------------

def mean_std(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None, 0
    mean = sum(values) / len(values)
    std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
           if len(values) > 1 else 0.0)
    return mean, std, len(values)


def over_seeds(rows):
    """How a heading names its cells: "mean ± std over seeds" only with several seeds to spread."""
    return "mean ± std over seeds" if len({r.get("seed") for r in rows}) > 1 else "1 seed"


def spread(rows):
    """over_seeds for a figure title: the band is a std only where there are several seeds."""
    return "mean ± std" if over_seeds(rows) != "1 seed" else "1 seed"


def cell(values):
    mean, sd, n = mean_std(values)
    if mean is None:
        return DASH
    return f"{mean:.1f} ± {sd:.1f}" if n > 1 else f"{mean:.1f}"


def human(n):
    """Parameter counts as the paper prints them (truncated): 2304 -> 2.3K, 1779456 -> 1.7M."""
    if n is None:
        return DASH
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            v = n / div
            return (f"{math.floor(v * 10) / 10:g}" if v < 100 else f"{int(v)}") + unit
    return str(n)


def dedupe(rows):
    """One row per run folder (the last one written wins)."""
    return list({r["run"]: r for r in rows}.values())


def scores(rows, **where):
    return [r["score"] for r in rows if all(r.get(k) == v for k, v in where.items())]


def select_best_lr(rows):
    """Appendix B.2's lr search: per (model, task, method), the lr of best mean validation score."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model_tag"], r["task"], r["method"]), {}).setdefault(
            r["lr"], []).append(r)
    kept = []
    for by_lr in groups.values():
        best = max(by_lr, key=lambda lr: (mean_std([r.get("val_score") for r in by_lr[lr]])[0]
                                          or -math.inf))
        kept += by_lr[best]
    return kept


def ordered(values, order):
    return [v for v in order if v in values] + sorted(v for v in values if v not in order)


def n_trainable(rows, model_tag, method):
    """Trainable parameters per task: the runs' n_trainable, else parameter_table()'s, or None."""
    counts = [r["n_trainable"] for r in rows
              if r["model_tag"] == model_tag and r["method"] == method and r.get("n_trainable")]
    if counts:
        return max(counts)
    return param_table()[model_tag].get(method) if model_tag in SIZES else None


@functools.cache
def param_table():
    return parameter_table()


# --- the paper's Param column (report.py --count) ----------------------------------------------
# The real configs' dimensions, for when neither a config folder nor the Hub is at hand.
SIZES = {"t5-small": dict(d_model=512, d_ff=2048, num_layers=6, num_heads=8),
         "t5-base": dict(d_model=768, d_ff=3072, num_layers=12, num_heads=12),
         "t5-large": dict(d_model=1024, d_ff=4096, num_layers=24, num_heads=16)}
VARIANTS = [("ft", {}), ("ptuning", {}), ("ptuning", {"reparam": "lstm"}), ("resprompt", {}),
            ("pt", {}), ("ept", {}), ("ept_star", {})]
TABLE4_VARIANTS = [("ept", {"extra_layer": True})]  # Table 4's one extra 1x1 layer (§5.4), 2.3K


def variant_label(method, options):
    return (method + ("-lstm" if options.get("reparam") == "lstm" else "")
            + ("+layer" if options.get("extra_layer") else ""))


def size_config(size, configs_dir=None):
    """The config of t5-small/base/large: a local folder, else T5Config with the same dimensions."""
    from transformers import T5Config
    folder = Path(configs_dir or "") / size
    if configs_dir and (folder / "config.json").exists():
        files.read_json(folder / "config.json", "model configuration")  # damaged JSON: one sentence
        return T5Config.from_pretrained(folder)
    return T5Config(vocab_size=32128, d_kv=64, **SIZES[size])


def parameter_table(configs_dir=None, variants=VARIANTS):
    """{size: {method label: trainable parameters}}; models built on the meta device (no memory)."""
    import torch
    from transformers import T5ForConditionalGeneration
    table = {}
    for size in SIZES:
        config = size_config(size, configs_dir)
        with torch.device("meta"):
            table[size] = {variant_label(m, o): M.count_trainable(M.PromptedT5(
                T5ForConditionalGeneration(config), M.build_prompt_module(m, config.d_model, **o)))
                for m, o in variants}
    return table


def count_lines(configs_dir=None):
    """`report.py --count`: the Param column of every method (Table 4's extra layer too) per T5
    size, as a table, then as JSON."""
    variants = VARIANTS + TABLE4_VARIANTS
    table = parameter_table(configs_dir, variants)
    return ([f"{'method':<14}" + "".join(f"{s:>14}" for s in table)]
            + [f"{label:<14}" + "".join(f"{table[s][label]:>14,}" for s in table)
               for label in [variant_label(m, o) for m, o in variants]]
            + [json.dumps(table)])


# --- tables: each returns (markdown, csv rows) ----------------------------------------------------

def markdown(header, body):
    """A GFM table; a '|' in a cell (Table 5's |Train|, a vocabulary piece) is escaped."""
    lines = ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
             for row in [header, *body]]
    lines.insert(1, "|" + "|".join("---" for _ in header) + "|")  # under the header
    return "\n".join(lines) + "\n"


def task_average(rows, tasks, **where):
    """The Avg column: (the mean over tasks of the per-task mean over seeds or None, complete?)."""
    means = [mean_std(scores(rows, task=t, **where))[0] for t in tasks]
    present = [m for m in means if m is not None]
    return (sum(present) / len(present) if present else None), len(present) == len(tasks)


def avg_cell(rows, tasks, **where):
    """task_average as a cell: '†' when some task has no result."""
    mean, complete = task_average(rows, tasks, **where)
    return DASH if mean is None else f"{mean:.1f}" + ("" if complete else "†")


def stats(values):
    """A long-form row's numbers: mean, std and count over seeds."""
    return dict(zip(("mean", "std", "seeds"), mean_std(values)))


def paper_block(header, body, note=""):
    return "\nThe paper's numbers, for comparison:\n\n" + markdown(header, body) + note


def grid_table(rows, groups, paper, note=""):
    """Tables 1 and 2: one row per (model, method), per-task mean ± std, an Avg per task group,
    then the paper's numbers (`paper`: PAPER_TABLE1's text layout) and `note` under them."""
    rows = dedupe(rows)
    header = ["Model", "Method", "Param"]
    for name, tasks in groups:
        header += [f"{TASK_LABELS[t]} ({METRIC_LABELS.get(t, 'Acc')})" for t in tasks]
        header.append(f"{name} Avg")
    body, long = [], []
    for tag in ordered({r["model_tag"] for r in rows}, SIZE_ORDER):
        for method in ordered({r["method"] for r in rows if r["model_tag"] == tag}, METHOD_ORDER):
            line = [tag, LABELS.get(method, method), human(n_trainable(rows, tag, method))]
            for _, tasks in groups:
                for t in tasks:
                    values = scores(rows, model_tag=tag, method=method, task=t)
                    line.append(cell(values))
                    long.append({"model": tag, "method": method, "task": t, **stats(values)})
                line.append(avg_cell(rows, tasks, model_tag=tag, method=method))
            body.append(line)
    quoted = [[m, LABELS[k], *rest] for m, k, *rest in map(str.split, paper.strip().splitlines())]
    return markdown(header, body) + paper_block(header, quoted, note), long


def table1(rows):
    return grid_table(select_best_lr(dedupe(rows)), [("GLUE", GLUE), ("SuperGLUE", SUPERGLUE)],
                      PAPER_TABLE1)


def table2(rows):
    return grid_table(rows, [("MRQA", MRQA), ("Others", OTHERS)], PAPER_TABLE2,
                      "\n`?`: the paper's text lost these cells of its EPT* row (only the row's "
                      "last three numbers survive in it): not a zero, and not a number of ours.\n")


def table3(rows):
    """Few-shot: rows (benchmark, k), a column per method; cell = mean over the benchmark's tasks of
    the per-task mean over seeds (the paper's layout), then a per-task detail table."""
    rows = dedupe(rows)
    methods = ordered({r["method"] for r in rows}, METHOD_ORDER)
    shots = sorted({r["fewshot_k"] for r in rows})
    body = [[name, k, *[avg_cell(rows, tasks, method=m, fewshot_k=k) for m in methods]]
            for name, tasks in (("SuperGLUE", SUPERGLUE), ("GLUE", GLUE)) for k in shots]
    detail, long = [], []
    for k in shots:
        for t in SUPERGLUE + GLUE:
            if any(r["task"] == t and r["fewshot_k"] == k for r in rows):
                values = {m: scores(rows, method=m, task=t, fewshot_k=k) for m in methods}
                detail.append([k, TASK_LABELS[t], *[cell(values[m]) for m in methods]])
                long += [{"k": k, "task": t, "method": m, **stats(values[m])} for m in methods]
    paper = paper_block(["Benchmark", "k-shot", *[LABELS[m] for m in METHOD_ORDER]],
                        [[b, k, *v.split()] for b, k, v in PAPER_TABLE3])
    labels = [LABELS[m] for m in methods]
    return (markdown(["Benchmark", "k-shot", *labels], body) + paper + f"\nPer task "
            f"({over_seeds(rows)}):\n\n" + markdown(["k", "Task", *labels], detail)), long


def table4(rows):
    rows = dedupe(rows)
    header = ["Method", "Params (train/inference)", *[TASK_LABELS[t] for t in TABLE4_TASKS], "Avg"]
    body, long = [], []
    for method in ordered({r["method"] for r in rows}, ["pt", "ept", "ept_star"]):
        mine = [r for r in rows if r["method"] == method]
        n_train = max((r["n_trainable"] or 0) for r in mine) or None
        n_inf = max((r["n_inference"] or 0) for r in mine) or None
        label = LABELS[method] + (f" (n={mine[0]['prompt_length']})" if method == "pt" else
                                  f" ({_ept_structure(mine[0])})" if method in ("ept", "ept_star")
                                  else "")
        per_task = {t: scores(mine, task=t) for t in TABLE4_TASKS}
        body.append([label, f"{human(n_train)}/{human(n_inf)}", *map(cell, per_task.values()),
                     avg_cell(mine, TABLE4_TASKS)])
        long += [{"method": method, "task": t, **stats(v)} for t, v in per_task.items()]
    quoted = markdown(header, [[m, p, *[f"{v:.1f}" for v in vals]]
                               for m, p, *vals in TABLE4_QUOTED])
    return (markdown(header, body)
            + paper_block(header, [[m, p, *v.split()] for m, p, v in PAPER_TABLE4])
            + "\nRows the paper quotes from ATTEMPT (Asai et al. 2022), not rerun here:\n\n"
            + quoted), long


def _ept_structure(row):
    """Table 4's EPT/EPT* structure as run: the extra 1x1 layer (§5.4), whole stacked blocks."""
    parts = ((["+1x1 layer"] if row.get("extra_layer") else [])
             + ([f"depth {row['depth']}"] if row.get("depth", 1) != 1 else []))
    return ", ".join(parts) or "main structure"


def table6(rows):
    rows = dedupe(rows)
    tasks = ["boolq", "cb", "rte", "wsc"]
    header = ["Init. / Task", *[TASK_LABELS[t] for t in tasks], "Avg"]
    body, long = [], []
    for kind in ordered({r["init"] for r in rows}, list(INIT_LABELS)):
        per_task = {t: scores(rows, init=kind, task=t) for t in tasks}
        body.append([INIT_LABELS.get(kind, kind), *map(cell, per_task.values()),
                     avg_cell(rows, tasks, init=kind)])
        long += [{"init": kind, "task": t, **stats(v)} for t, v in per_task.items()]
    return markdown(header, body) + paper_block(header, [[INIT_LABELS[k], *v.split()]
                                                         for k, v in PAPER_TABLE6]), long


def sweep_table(rows):
    """Ablation sweeps (Figures 5, 7, 8, 9): rows (method, swept value), a column per task."""
    rows = dedupe(rows)
    tasks = ordered({r["task"] for r in rows}, list(TASKS))
    tags = ordered({r.get("model_tag") for r in rows}, MODEL_ORDER)
    several = len(tags) > 1  # Figure 8: t5-base and t5-large, never averaged together
    header = ["Model"] * several + ["Method", "Value", *[TASK_LABELS.get(t, t) for t in tasks],
                                    "Avg"]
    body, long = [], []
    for tag in tags:
        mine = [r for r in rows if r.get("model_tag") == tag]
        for method in ordered({r["method"] for r in mine}, METHOD_ORDER):
            values = {r["variant"] for r in mine if r["method"] == method}
            for v in sorted(values, key=lambda x: (isinstance(x, str), x)):
                per_task = {t: scores(mine, method=method, variant=v, task=t) for t in tasks}
                body.append([tag] * several + [LABELS[method], v, *map(cell, per_task.values()),
                                               avg_cell(mine, tasks, method=method, variant=v)])
                long += [{**({"model": tag} if several else {}), "method": method, "value": v,
                          "task": t, **stats(per_task[t])} for t in tasks]
    return markdown(header, body), long


# titles: {seeds} becomes "mean ± std over seeds" or "1 seed" (over_seeds), {fewshot_seeds} "of the
# mean over seeds"
TABLES = {"table1": ("Table 1: GLUE and SuperGLUE ({seeds})", "table1", table1),
          "table2": ("Table 2: MRQA and Others ({seeds})", "table2", table2),
          "table3": ("Table 3: few-shot (mean over tasks{fewshot_seeds})", "fewshot", table3),
          "table4": ("Table 4: 5 SuperGLUE tasks in the ATTEMPT setting", "table4", table4),
          "table6": ("Table 6: EPT prompt initialisation ({seeds})", "init", table6)}


def title_for(title, rows):
    several = over_seeds(rows) != "1 seed"
    return title.format(seeds=over_seeds(rows),
                        fewshot_seeds=" of the mean over seeds" if several else "; 1 seed")


def experiment_table(experiment, rows):
    """The table a driver prints after its runs: the paper's layout, or a sweep pivot."""
    return EXPERIMENT_TABLE.get(experiment, sweep_table)(rows)[0]


STEER_SUCCESS = 90.0  # test accuracy (%) from which a steering run counts as steered
STEER_SEARCH_SEEDS = (0, 1, 2)  # their mean validation score chooses a method's lr
STEER_TITLE = ("Steering benchmark (toy backbone, not the paper's numbers): "
               "Table 1 and Figure 2 in small")


def steer_chosen(rows):
    """{method: lr} for each method run at several lrs: the highest mean validation score over the
    search seeds (STEER_SEARCH_SEEDS; all seeds if none of them ran), Appendix B.2's
    protocol; a tie goes to the paper's default 0.3, then to the lower lr."""
    chosen = {}
    for method in {r["method"] for r in rows if r["method"] != "none"}:
        mine = [r for r in rows if r["method"] == method and r.get("lr")]
        search = [r for r in mine if r.get("seed") in STEER_SEARCH_SEEDS] or mine
        means = {lr: mean_std([r.get("val_score") for r in search if r["lr"] == lr])[0]
                 for lr in {r["lr"] for r in search}}
        means = {lr: m for lr, m in means.items() if m is not None}
        if len({r["lr"] for r in mine}) > 1 and means:
            chosen[method] = max(means, key=lambda lr: (round(means[lr], 6), lr == 0.3, -lr))
    return chosen


def steered(rows):
    """The count "k/n": the rows whose test score reached STEER_SUCCESS, of n."""
    return f"{sum(r['score'] >= STEER_SUCCESS for r in rows)}/{len(rows)}"


def steer_table(rows):
    """Per (method, lr): parameters, validation and test accuracy (mean ± std over seeds; both at
    the best checkpoint), the seeds that steered (test >= STEER_SUCCESS), final μ_t; the
    no-prompt floor first. lr: "chosen" marks steer_chosen's, † one outside the paper's grid."""
    rows, chosen = dedupe(rows), steer_chosen(dedupe(rows))
    header = ["Method", "lr", "Steps", "Params", "Valid acc", "Test acc",
              f"Steered (≥ {STEER_SUCCESS:g})", "final μ_t", "Seeds"]
    body, long = [], []
    for r in (r for r in rows if r["method"] == "none"):
        body.append(["no prompt (frozen backbone's default)", DASH, 0, 0, f"{r['val_score']:.1f}",
                     f"{r['score']:.1f}", DASH, DASH, DASH])
        long.append({"method": "none", "lr": None, "n_trainable": 0, "val_mean": r["val_score"],
                     "val_std": None, "test_mean": r["score"], "test_std": None, "steered": None,
                     "chosen": None, "final_prompt_norm": None, "seeds": None})
    trained = [r for r in rows if r["method"] != "none"]
    for method in ordered({r["method"] for r in trained}, METHOD_ORDER):
        for lr in sorted({r.get("lr") for r in trained if r["method"] == method},
                         key=lambda v: (v is None, v or 0)):
            mine = [r for r in trained if r["method"] == method and r.get("lr") == lr]
            val, test = [r.get("val_score") for r in mine], [r["score"] for r in mine]
            (val_mean, val_std, _), (test_mean, test_std, _) = mean_std(val), mean_std(test)
            norm = mean_std([r.get("final_prompt_norm") for r in mine])[0]
            steps = sorted({r.get("max_steps") for r in mine} - {None})
            params = max((r.get("n_trainable") or 0) for r in mine)
            mark = (" †" if lr and lr > 0.3 and method != "ft" else "") + (
                " (chosen)" if chosen.get(method) == lr else "")
            body.append([LABELS[method], f"{lr:g}{mark}" if lr else DASH,
                         "/".join(map(str, steps)) or DASH, human(params), cell(val),
                         cell(test), steered(mine), f"{norm:.3g}" if norm is not None else DASH,
                         len(mine)])
            long.append({"method": method, "lr": lr, "n_trainable": params,
                         "val_mean": val_mean, "val_std": val_std, "test_mean": test_mean,
                         "test_std": test_std, "steered": steered(mine),
                         "chosen": chosen.get(method) == lr, "final_prompt_norm": norm,
                         "seeds": len(mine)})
    return markdown(header, body), long


EXPERIMENT_TABLE = {exp: build for _, exp, build in TABLES.values()} | {"steer": steer_table}
