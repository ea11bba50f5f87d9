"""Every result -> the paper's tables (markdown + CSV) and figures (PNG) in one folder with an index.

Reads results/<experiment>.jsonl (ablate.py, fewshot.py: one row per run), results/analysis/<name>.json
(analyze.py) and the tasks' meta.json (Table 5; the data folder is the one the Table 1/2 runs were trained
on, from their config.json). Writes report/: table1..table6 as .md and .csv (mean ± std over seeds, the Avg
column, trainable parameters per task), fig1..fig12 as .png, the Appendix A.1 neighbours and P-Tuning
directions as .md (+ a figure), and index.md linking (and showing) all of it. A table cell without results
reads "–"; a figure without results is skipped with a note in index.md, never a crash. Runs the drivers'
collect step found failed (results/<experiment>.failed.json) are listed with the reason under "Runs that
failed".

    python report.py                                        # results/ -> report/
    python report.py --results smoke/results --out smoke/report
"""
import argparse
import csv
import io
import json
import math
from pathlib import Path

import model as M
from ept import cli, files, registry

GLUE, SUPERGLUE, MRQA, OTHERS = (registry.GROUPS[g] for g in ("glue", "superglue", "mrqa", "others"))

LABELS = {"ft": "FT", "ptuning": "P-Tuning", "resprompt": "ResPrompt", "pt": "PT", "ept": "EPT", "ept_star": "EPT*"}
METHOD_ORDER = ["ft", "ptuning", "resprompt", "pt", "ept", "ept_star"]  # the paper's row order
TASK_LABELS = {"cola": "CoLA", "mrpc": "MRPC", "rte": "RTE", "stsb": "STS-B", "mnli": "MNLI", "qnli": "QNLI",
               "qqp": "QQP", "sst2": "SST-2", "boolq": "BoolQ", "cb": "CB", "wic": "WiC", "wsc": "WSC",
               "multirc": "MultiRC", "nq": "NQ", "hotpotqa": "HP", "searchqa": "SQA", "newsqa": "News",
               "winogrande": "WG", "yelp": "Yelp", "scitail": "SciTail", "paws": "PAWS"}
METRIC_LABELS = {"cola": "Matt", "stsb": "Pearson", "cb": "F1/Acc", "multirc": "F1a", **{t: "F1" for t in MRQA}}
SIZE_ORDER = ["t5-large", "t5-base", "t5-small"]  # Table 1 lists Large first
MODEL_ORDER = SIZE_ORDER[::-1]  # figures: small to large
DASH = "–"
COLORS = {"ft": "tab:gray", "ptuning": "tab:green", "resprompt": "tab:orange", "pt": "tab:blue", "ept": "tab:red",
          "ept_star": "tab:purple"}
# Table 4 rows the paper quotes from ATTEMPT (Asai et al. 2022) and that are not rerun here:
# (method, params train/inference, MultiRC, BoolQ, WiC, WSC, CB, Avg)
TABLE4_QUOTED = [("Fine-tuning", "220M/-", 73.9, 81.5, 70.8, 62.2, 75.0, 72.7),
                 ("Adapter", "1.9M/-", 75.5, 82.1, 67.0, 61.5, 81.0, 73.4),
                 ("AdapterDrop", "1.1M/-", 75.3, 82.3, 67.7, 62.2, 73.8, 72.3),
                 ("BitFit", "280K/-", 74.7, 79.9, 68.2, 54.5, 72.6, 70.0),
                 ("ATTEMPT", "232K/-", 72.9, 77.0, 66.9, 52.5, 72.6, 68.4),
                 ("SPoT", "77K/-", 73.0, 77.4, 58.4, 61.5, 36.9, 61.4)]
TABLE4_TASKS = ["multirc", "boolq", "wic", "wsc", "cb"]
# The paper's own numbers, printed under each table for comparison: (model, method, Param, scores in
# our column order; "?" where the extracted paper text lost the number).
PAPER_TABLE1 = [
    ("t5-large", "ft", "770M", "61.7 89.4 88.5 91.9 89.7 94.4 91.4 95.9 87.9 85.8 88.6 71.9 85.3 79.9 82.3"),
    ("t5-large", "ptuning", "3.1M", "58.0 88.1 85.4 91.2 88.2 94.1 90.9 95.2 86.4 82.9 87.0 68.8 60.9 79.1 75.7"),
    ("t5-large", "resprompt", "832K", "54.8 88.2 85.9 91.5 66.1 93.8 90.8 95.0 83.2 82.1 51.2 69.2 61.5 78.2 68.4"),
    ("t5-large", "pt", "10K", "0.7 74.9 50.8 91.2 35.7 89.7 88.5 87.4 64.9 62.9 58.6 55.7 60.9 59.8 59.6"),
    ("t5-large", "ept", "3K", "56.8 87.9 85.1 91.1 84.4 93.6 91.0 95.4 85.7 82.2 89.1 67.2 61.5 78.7 75.7"),
    ("t5-large", "ept_star", "3K", "54.3 87.9 85.4 91.2 87.2 93.8 91.0 95.3 85.8 82.4 95.4 69.1 62.2 79.1 77.6"),
    ("t5-base", "ft", "220M", "59.8 87.9 81.8 90.6 85.9 93.1 90.4 94.2 85.5 82.8 87.6 67.9 61.5 74.9 75.0"),
    ("t5-base", "ptuning", "1.7M", "47.2 85.7 76.3 89.7 83.0 92.8 90.3 93.5 82.3 78.8 88.3 67.0 60.3 73.6 73.6"),
    ("t5-base", "resprompt", "624K", "34.1 85.8 65.7 90.3 72.6 92.6 89.4 90.3 77.6 76.0 64.2 65.1 61.5 66.4 66.7"),
    ("t5-base", "pt", "7.6K", "0.0 67.6 56.6 90.2 48.8 69.7 65.9 84.7 60.4 62.1 59.2 53.0 61.5 59.6 59.1"),
    ("t5-base", "ept", "2.3K", "0.0 82.9 68.8 89.7 69.3 92.7 90.2 93.0 73.3 75.5 73.1 65.6 62.2 59.7 67.2"),
    ("t5-base", "ept_star", "2.3K", "41.0 85.0 75.8 89.7 76.1 92.6 90.4 93.8 80.5 77.0 82.7 65.3 58.3 72.4 71.1"),
    ("t5-small", "ft", "60M", "36.3 85.9 67.9 88.8 78.8 90.4 88.1 91.1 78.4 76.5 77.8 66.6 51.3 68.4 68.1"),
    ("t5-small", "ptuning", "793K", "0.0 84.2 65.0 86.6 75.5 89.4 88.3 89.1 72.3 71.1 64.5 65.6 59.6 65.7 65.3"),
    ("t5-small", "resprompt", "416K", "0.0 80.9 61.4 85.9 62.1 88.9 88.2 88.1 69.4 61.9 58.4 50.6 59.0 59.3 57.8"),
    ("t5-small", "pt", "5.1K", "2.8 75.6 52.3 85.6 41.5 87.2 85.8 82.0 64.1 61.8 55.2 48.7 62.2 60.0 57.6"),
    ("t5-small", "ept", "1.5K", "0.8 78.0 57.6 85.6 62.7 87.7 87.8 83.4 68.0 61.9 59.1 51.8 59.6 63.7 59.2"),
    ("t5-small", "ept_star", "1.5K", "0.0 82.8 65.9 86.3 68.7 89.0 88.2 88.8 71.2 68.0 59.2 60.4 60.3 65.5 62.7")]
PAPER_TABLE2 = [("t5-base", "ft", "220M", "75.0 78.7 80.2 66.7 75.1 59.1 97.0 94.9 94.2 86.3"),
                ("t5-base", "ptuning", "1.7M", "66.1 72.9 71.3 61.8 68.0 48.6 95.8 91.3 89.0 81.2"),
                ("t5-base", "resprompt", "624K", "64.9 72.7 67.5 60.3 66.3 48.9 95.1 88.4 74.6 76.7"),
                ("t5-base", "pt", "7.6K", "64.7 71.6 66.7 60.4 65.8 48.5 93.7 68.0 55.7 66.5"),
                ("t5-base", "ept", "2.3K", "64.4 72.3 68.2 60.2 66.3 48.9 93.8 89.0 77.2 77.3"),
                ("t5-base", "ept_star", "2.3K", "? ? ? ? ? ? ? 90.1 84.8 79.6")]
PAPER_TABLE3 = [("SuperGLUE", 4, "53.1 56.3 53.0 53.9 55.8 54.3"), ("SuperGLUE", 16, "56.8 60.2 51.2 54.2 57.9 57.1"),
                ("SuperGLUE", 32, "58.5 59.9 54.0 52.9 58.2 59.3"), ("GLUE", 4, "57.2 63.9 46.8 48.9 60.7 60.8"),
                ("GLUE", 16, "59.0 64.2 49.8 50.6 65.3 65.7"), ("GLUE", 32, "61.8 69.1 56.2 52.9 69.6 69.0")]
PAPER_TABLE4 = [("PT", "77K/-", "56.5 61.9 48.1 62.2 50.0 55.7"), ("EPT", "2.3K/768", "67.9 70.3 55.8 61.5 61.9 63.5"),
                ("EPT*", "2.3K/768", "73.3 76.7 65.2 62.2 67.9 69.1")]
PAPER_TABLE6 = [("uniform", "75.7 72.5 70.5 65.4 71.0"), ("vocab", "75.4 77.6 69.8 63.5 71.6"),
                ("label", "75.1 75.5 67.6 63.5 70.4")]
STRUCTURE_LABELS = {"none": "None", "layernorm": "LayerNorm", "residual": "Residual", "relu": "ReLU",
                    "tanh": "Tanh", "sigmoid": "Sigmoid"}  # Figure 9's order
INIT_LABELS = {"uniform": "Random (U[-0.5, 0.5])", "vocab": "Sample (vocabulary)", "label": "Label (label words)"}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
parser.add_argument("--results", default="results", help="folder of <experiment>.jsonl and analysis/")
parser.add_argument("--out", default="report", help="report folder to write")
parser.add_argument("--smoke", action="store_true", help="mark the report as a SMOKE report (numbers are noise); "
                    "also done when the runs used a random-weight or tiny T5")


# --- reading the results rows ------------------------------------------------------------------------

ROW_KEYS = ("run", "task", "method", "seed", "score", "model_tag")  # every results row (ablate.result_row)
EXPERIMENT_KEYS = {"table1": ("lr",), "fewshot": ("fewshot_k",), "table4": ("n_trainable", "n_inference",
                   "prompt_length", "depth"), "init": ("init",), "hidden": ("variant",), "broadcast": ("variant",),
                   "lr": ("variant",), "structure": ("variant",)}


def read_rows(results, experiment):
    """results/<experiment>.jsonl ([] when absent), each row holding what the tables read: a hand-edited or
    foreign row is one sentence naming its line, never a KeyError in the middle of a table."""
    path = Path(results) / f"{experiment}.jsonl"
    rows = files.read_jsonl(path, what="results file", missing_ok=True, fix=files.RESULTS_FIX)
    for number, row in enumerate(rows, 1):
        missing = [k for k in (*ROW_KEYS, *EXPERIMENT_KEYS.get(experiment, ())) if k not in row]
        score = row.get("score")
        if missing or not (score is None or isinstance(score, (int, float)) and not isinstance(score, bool)):
            raise files.FileFault(f"the results file {path} is damaged: row {number} has "
                                  f"{'no ' + ', '.join(missing) if missing else f'the score {score!r}'}; delete that "
                                  f"line and rerun the experiment's driver (ablate.py / fewshot.py) to write it again")
    return rows


def smoke_reason(results, forced=False):
    """What makes this report's numbers noise ('a random-weight tiny T5', ...), or None for a real report: the
    runs' config.json says random_init, or their T5 folder is far below t5-small (d_model under 256)."""
    seen = set()
    for experiment in EXPERIMENT_KEYS:
        for row in read_rows(results, experiment):
            config_path = Path(row["run"]) / "config.json"
            if row["model_tag"] in seen or not config_path.exists():
                continue
            seen.add(row["model_tag"])
            config = files.read_json(config_path, "run configuration")
            model_config = Path(str(config.get("model"))) / "config.json"
            d_model = files.read_json(model_config, "model configuration").get("d_model", 512) \
                if model_config.is_file() else 512
            if config.get("random_init") or d_model < 256:
                return f"a random-weight {'tiny ' if d_model < 256 else ''}T5 ({row['model_tag']})"
    return "a random-weight tiny T5" if forced else None


# --- numbers -----------------------------------------------------------------------------------------

def mean_std(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None, 0
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std, len(values)


def over_seeds(rows):
    """How a heading names its cells: "mean ± std over seeds" only where there are several seeds to spread."""
    return "mean ± std over seeds" if len({r.get("seed") for r in rows}) > 1 else "1 seed"


def _spread(rows):
    """A figure title's short form of over_seeds: the band is a std only where there are several seeds."""
    return "mean ± std" if over_seeds(rows) != "1 seed" else "1 seed"


def cell(values, std=True):
    mean, sd, n = mean_std(values)
    if mean is None:
        return DASH
    return f"{mean:.1f} ± {sd:.1f}" if std and n > 1 else f"{mean:.1f}"


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
    """Appendix B.2's lr search: per (model, task, method) keep the lr with the best mean validation score."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model_tag"], r["task"], r["method"]), {}).setdefault(r["lr"], []).append(r)
    kept = []
    for by_lr in groups.values():
        best = max(by_lr, key=lambda lr: mean_std([r.get("val_score") for r in by_lr[lr]])[0] or -math.inf)
        kept += by_lr[best]
    return kept


def ordered(values, order):
    return [v for v in order if v in values] + sorted(v for v in values if v not in order)


def params_of(rows, model_tag, method):
    """Trainable parameters per task: the runs' n_trainable, else model.parameter_table for a known size."""
    counts = {r["n_trainable"] for r in rows if r["model_tag"] == model_tag and r["method"] == method
              and r.get("n_trainable")}
    if counts:
        return human(max(counts))
    if model_tag in M.SIZES:
        return human(_param_table()[model_tag].get(method))
    return DASH


_PARAMS = {}


def _param_table():
    if not _PARAMS:
        _PARAMS.update(M.parameter_table())
    return _PARAMS


# --- tables: each returns (markdown, csv rows) ----------------------------------------------------------

def markdown(header, body):
    """A GFM table; a '|' inside a cell is escaped (Table 5's |Train|, a vocabulary piece) so it splits no cell."""
    esc = lambda c: str(c).replace("|", "\\|")
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(esc, row)) + " |" for row in body]) + "\n"


def avg_cell(rows, tasks, **where):
    """Mean over tasks of the per-task mean over seeds; '†' when some task has no result."""
    means = [mean_std(scores(rows, task=t, **where))[0] for t in tasks]
    present = [m for m in means if m is not None]
    if not present:
        return DASH
    return f"{sum(present) / len(present):.1f}" + ("" if len(present) == len(tasks) else "†")


def grid_table(rows, groups, title_cols=("Model", "Method", "Param")):
    """Tables 1 and 2: one row per (model, method), per-task mean ± std, an Avg per task group."""
    rows = dedupe(rows)
    header = list(title_cols)
    for name, tasks in groups:
        header += [f"{TASK_LABELS[t]} ({METRIC_LABELS.get(t, 'Acc')})" for t in tasks] + [f"{name} Avg"]
    body, long = [], []
    for tag in ordered({r["model_tag"] for r in rows}, SIZE_ORDER):
        for method in ordered({r["method"] for r in rows if r["model_tag"] == tag}, METHOD_ORDER):
            line = [tag, LABELS.get(method, method), params_of(rows, tag, method)]
            for _, tasks in groups:
                for t in tasks:
                    values = scores(rows, model_tag=tag, method=method, task=t)
                    line.append(cell(values))
                    mean, sd, n = mean_std(values)
                    long.append({"model": tag, "method": method, "task": t, "mean": mean, "std": sd, "seeds": n})
                line.append(avg_cell(rows, tasks, model_tag=tag, method=method))
            body.append(line)
    return markdown(header, body), long


def paper_block(header, body):
    return "\nThe paper's numbers, for comparison:\n\n" + markdown(header, body)


def table1(rows):
    rows = select_best_lr(dedupe(rows))
    md, long = grid_table(rows, [("GLUE", GLUE), ("SuperGLUE", SUPERGLUE)])
    header = md.splitlines()[0].strip("| ").split(" | ")
    return md + paper_block(header, [[m, LABELS[k], p, *v.split()] for m, k, p, v in PAPER_TABLE1]), long


def table2(rows):
    md, long = grid_table(rows, [("MRQA", MRQA), ("Others", OTHERS)])
    header = md.splitlines()[0].strip("| ").split(" | ")
    return md + paper_block(header, [[m, LABELS[k], p, *v.split()] for m, k, p, v in PAPER_TABLE2]), long


def table3(rows):
    """Few-shot: rows (benchmark, k), a column per method; cell = mean over the benchmark's tasks of the
    per-task mean over seeds (the paper's layout), then a per-task detail table."""
    rows = dedupe(rows)
    methods = ordered({r["method"] for r in rows}, METHOD_ORDER)
    header = ["Benchmark", "k-shot", *[LABELS[m] for m in methods]]
    body, long = [], []
    for name, tasks in (("SuperGLUE", SUPERGLUE), ("GLUE", GLUE)):
        for k in sorted({r["fewshot_k"] for r in rows}):
            body.append([name, k, *[avg_cell(rows, tasks, method=m, fewshot_k=k) for m in methods]])
    detail_header = ["k", "Task", *[LABELS[m] for m in methods]]
    detail = []
    for k in sorted({r["fewshot_k"] for r in rows}):
        for t in SUPERGLUE + GLUE:
            if any(r["task"] == t and r["fewshot_k"] == k for r in rows):
                detail.append([k, TASK_LABELS[t], *[cell(scores(rows, method=m, task=t, fewshot_k=k)) for m in methods]])
                for m in methods:
                    mean, sd, n = mean_std(scores(rows, method=m, task=t, fewshot_k=k))
                    long.append({"k": k, "task": t, "method": m, "mean": mean, "std": sd, "seeds": n})
    paper = paper_block(["Benchmark", "k-shot", *[LABELS[m] for m in METHOD_ORDER]],
                        [[b, k, *v.split()] for b, k, v in PAPER_TABLE3])
    return (markdown(header, body) + paper + f"\nPer task ({over_seeds(rows)}):\n\n"
            + markdown(detail_header, detail)), long


def table4(rows):
    rows = dedupe(rows)
    header = ["Method", "Params (train/inference)", *[TASK_LABELS[t] for t in TABLE4_TASKS], "Avg"]
    body, long = [], []
    for method in ordered({r["method"] for r in rows}, ["pt", "ept", "ept_star"]):
        mine = [r for r in rows if r["method"] == method]
        n_train = max((r["n_trainable"] or 0) for r in mine) or None
        n_inf = max((r["n_inference"] or 0) for r in mine) or None
        label = LABELS[method] + (f" (n={mine[0]['prompt_length']})" if method == "pt" else
                                  f" ({_ept_structure(mine[0])})" if method in ("ept", "ept_star") else "")
        line = [label, f"{human(n_train)}/{human(n_inf)}"]
        for t in TABLE4_TASKS:
            line.append(cell(scores(mine, task=t)))
            mean, sd, n = mean_std(scores(mine, task=t))
            long.append({"method": method, "task": t, "mean": mean, "std": sd, "seeds": n})
        body.append(line + [avg_cell(mine, TABLE4_TASKS)])
    quoted = markdown(header, [[m, p, *[f"{v:.1f}" for v in vals]] for m, p, *vals in TABLE4_QUOTED])
    return (markdown(header, body) + paper_block(header, [[m, p, *v.split()] for m, p, v in PAPER_TABLE4])
            + "\nRows the paper quotes from ATTEMPT (Asai et al. 2022), not rerun here:\n\n" + quoted), long


def _ept_structure(row):
    """Table 4's EPT/EPT* structure as run: the extra 1x1 layer (§5.4) and/or whole stacked blocks."""
    parts = (["+1x1 layer"] if row.get("extra_layer") else []) + ([f"depth {row['depth']}"] if row.get("depth", 1) != 1 else [])
    return ", ".join(parts) or "main structure"


def table6(rows):
    rows = dedupe(rows)
    tasks = ["boolq", "cb", "rte", "wsc"]
    header = ["Init. / Task", *[TASK_LABELS[t] for t in tasks], "Avg"]
    body, long = [], []
    for kind in ordered({r["init"] for r in rows}, list(INIT_LABELS)):
        body.append([INIT_LABELS.get(kind, kind), *[cell(scores(rows, init=kind, task=t)) for t in tasks],
                     avg_cell(rows, tasks, init=kind)])
        long += [{"init": kind, "task": t, **dict(zip(("mean", "std", "seeds"), mean_std(scores(rows, init=kind, task=t))))}
                 for t in tasks]
    return markdown(header, body) + paper_block(header, [[INIT_LABELS[k], *v.split()] for k, v in PAPER_TABLE6]), long


def sweep_table(rows):
    """Ablation sweeps (Figures 5, 7, 8, 9): rows (method, swept value), a column per task."""
    rows = dedupe(rows)
    tasks = ordered({r["task"] for r in rows}, list(registry.TASKS))
    tags = ordered({r.get("model_tag") for r in rows}, MODEL_ORDER)
    several = len(tags) > 1  # Figure 8: t5-base and t5-large, never averaged together
    header = ["Model"] * several + ["Method", "Value", *[TASK_LABELS.get(t, t) for t in tasks], "Avg"]
    body, long = [], []
    for tag in tags:
        mine = [r for r in rows if r.get("model_tag") == tag]
        for method in ordered({r["method"] for r in mine}, METHOD_ORDER):
            values = {r["variant"] for r in mine if r["method"] == method}
            for v in sorted(values, key=lambda x: (isinstance(x, str), x)):
                body.append([tag] * several + [LABELS[method], v,
                                               *[cell(scores(mine, method=method, variant=v, task=t)) for t in tasks],
                                               avg_cell(mine, tasks, method=method, variant=v)])
                long += [{**({"model": tag} if several else {}), "method": method, "value": v, "task": t,
                          **dict(zip(("mean", "std", "seeds"), mean_std(scores(mine, method=method, variant=v, task=t))))}
                         for t in tasks]
    return markdown(header, body), long


# titles: {seeds} becomes "mean ± std over seeds" or "1 seed" (over_seeds), {fewshot_seeds} "of the mean over seeds"
TABLES = {"table1": ("Table 1: GLUE and SuperGLUE ({seeds})", "table1", table1),
          "table2": ("Table 2: MRQA and Others ({seeds})", "table2", table2),
          "table3": ("Table 3: few-shot (mean over tasks{fewshot_seeds})", "fewshot", table3),
          "table4": ("Table 4: 5 SuperGLUE tasks in the ATTEMPT setting", "table4", table4),
          "table6": ("Table 6: EPT prompt initialisation ({seeds})", "init", table6)}


def title_for(title, rows):
    several = over_seeds(rows) != "1 seed"
    return title.format(seeds=over_seeds(rows), fewshot_seeds=" of the mean over seeds" if several else "; 1 seed")
EXPERIMENT_TABLE = {"table1": table1, "table2": table2, "fewshot": table3, "table4": table4, "init": table6}


def experiment_table(experiment, rows):
    """The table a driver prints after its runs: the paper's layout, or a sweep pivot."""
    return EXPERIMENT_TABLE.get(experiment, sweep_table)(rows)[0]


def write_csv(path, long):
    buf = io.StringIO()
    if long:
        writer = csv.DictWriter(buf, fieldnames=list(long[0]))
        writer.writeheader()
        writer.writerows(long)
    write_text(path, buf.getvalue())


def write_text(path, text):
    files.write_text(path, text)


# --- figures: each returns a list of written file names, or raises Missing ----------------------------

class Missing(Exception):
    """A figure's results are not there: index.md says so, nothing else happens."""


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _integer_ticks(ax):
    """Steps, lengths and counts are whole numbers: no 2.5 on their axis."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, out, name):
    try:
        files.write_with(Path(out) / name, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        _plt().close(fig)
    return name


def load_analysis(results, name):
    path = Path(results) / "analysis" / f"{name}.json"
    if not path.exists():
        raise Missing(f"no {path} (run `python analyze.py {name}`)")
    data = files.read_json(path, "analysis result")
    if not isinstance(data, dict) or not isinstance(data.get(name), dict) or not data[name]:
        raise files.FileFault(f"the analysis result {path} holds no {name!r} results; rerun `python analyze.py {name}`")
    return data[name]


def fig_norms(results, out, tasks, name, title):
    """Figures 2 / 11: (a) mu_t over steps, (b) validation score over steps, one line per method."""
    curves = load_analysis(results, "norms")
    tasks = [t for t in tasks if t in curves]
    if not tasks:
        raise Missing("no norm curves for these tasks in analysis/norms.json")
    plt = _plt()
    cols = min(4, len(tasks))  # at most 4 tasks side by side: (a) norms above (b) scores
    groups = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(2 * groups, cols, figsize=(4 * cols, 3.3 * 2 * groups), squeeze=False)
    for k in range(len(tasks), groups * cols):  # the last group's empty places
        axes[2 * (k // cols), k % cols].axis("off")
        axes[2 * (k // cols) + 1, k % cols].axis("off")
    for k, task in enumerate(tasks):
        top, bottom = axes[2 * (k // cols), k % cols], axes[2 * (k // cols) + 1, k % cols]
        for method in ordered(set(curves[task]), METHOD_ORDER):
            c = curves[task][method]
            top.plot(c["step"], c["prompt_norm"], color=COLORS.get(method), label=LABELS[method])
            bottom.plot(c["eval_step"], c["score"], color=COLORS.get(method), marker="o", ms=3, label=LABELS[method])
        top.set_yscale("log")
        _integer_ticks(top)
        _integer_ticks(bottom)
        top.set_title(f"{TASK_LABELS.get(task, task)}: (a) prompt norm")
        top.set_xlabel("training step t")
        top.set_ylabel("μ_t (mean L2 norm of P' rows, log)")
        bottom.set_title(f"{TASK_LABELS.get(task, task)}: (b) validation score")
        bottom.set_xlabel("training step t")
        bottom.set_ylabel("validation score")
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return [_save(fig, out, name)]


def fig3(results, out):
    """Figure 3: cosine similarity between the prompt rows, one heatmap per method."""
    data = load_analysis(results, "cosine")
    task = "boolq" if "boolq" in data else next(iter(data))
    methods = ordered(set(data[task]), METHOD_ORDER)
    plt = _plt()
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        m = data[task][method]["cosine"]
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
        if len(m) <= 12:
            for i, row in enumerate(m):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=6)
        ax.set_title(f"{LABELS[method]} ({TASK_LABELS.get(task, task)})")
        ax.set_xlabel("prompt row j")
        ax.set_ylabel("prompt row i")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="cosine similarity")
    return [_save(fig, out, "fig3_prompt_cosine.png")]


def fig4(results, out):
    """Figure 4: one row P'_i repeated l times (solid) vs the whole prompt (dotted), per method."""
    data = load_analysis(results, "subset")
    tasks = ordered(set(data), ["boolq", "rte"])
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in ordered(set(data[task]), METHOD_ORDER):
            d = data[task][method]
            ax.plot(d["lengths"], d["score"], color=COLORS.get(method), marker="o", ms=3,
                    label=f"{LABELS[method]}: P'_{d['row']} × l")
            ax.axhline(d["original"], color=COLORS.get(method), ls=":", label=f"{LABELS[method]}: full prompt")
        ax.set_title(TASK_LABELS.get(task, task))
        _integer_ticks(ax)
        ax.set_xlabel("concatenated length l")
        ax.set_ylabel("test score")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return [_save(fig, out, "fig4_subset_broadcast.png")]


def _sweep_rows(results, experiment):
    rows = dedupe(read_rows(results, experiment))
    if not rows:
        raise Missing(f"no {Path(results) / experiment}.jsonl (run `python ablate.py {experiment}`)")
    return rows


def _sweep_axes(rows, tasks, name, xlabel, logx, title, methods=None, band=True):
    """One subplot per task (+ the average): mean over seeds per swept value, ± std band, a line per method."""
    tasks = [t for t in tasks if any(r["task"] == t for r in rows)]
    if not tasks:
        raise Missing(f"no rows for {name}")
    panels = tasks + (["Avg"] if len(tasks) > 1 else [])
    plt = _plt()
    cols = len(panels) if len(panels) <= 4 else 3
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.8 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    _sweep_panels(list(axes.flat), rows, tasks, panels, xlabel, logx, methods, band)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _sweep_panels(axes, rows, tasks, panels, xlabel, logx, methods=None, band=True, prefix=""):
    """Draw one panel per task (or "Avg") into `axes`."""
    methods = methods or ordered({r["method"] for r in rows}, METHOD_ORDER)
    for ax, task in zip(axes, panels):
        for method in methods:
            xs = sorted({r["variant"] for r in rows if r["method"] == method})
            ys, sds = [], []
            for x in xs:
                if task == "Avg":  # mean over tasks of the per-task mean
                    means = [mean_std(scores(rows, method=method, variant=x, task=t))[0] for t in tasks]
                    ys.append(sum(means) / len(means) if None not in means else float("nan"))
                    sds.append(0.0)
                else:
                    m, sd, _ = mean_std(scores(rows, method=method, variant=x, task=task))
                    ys.append(float("nan") if m is None else m)
                    sds.append(sd or 0.0)
            ax.plot(xs, ys, marker="o", ms=3, color=COLORS.get(method), label=LABELS[method])
            if band and task != "Avg":
                ax.fill_between(xs, [y - s for y, s in zip(ys, sds)], [y + s for y, s in zip(ys, sds)],
                                color=COLORS.get(method), alpha=0.2)
        if logx:
            ax.set_xscale("log")
        ax.set_title(prefix + (TASK_LABELS.get(task, task) if task != "Avg" else "Average"))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test score")
        ax.legend(fontsize=7)


def fig5_12(results, out):
    rows = _sweep_rows(results, "hidden")
    names = []
    spread = _spread(rows)
    for tasks, name, title in ((["boolq", "rte"], "fig5_hidden_size.png", f"Figure 5: EPT hidden size h ({spread})"),
                               (["wsc", "cb", "wic"], "fig12_hidden_size.png",
                                f"Figure 12: EPT hidden size h ({spread})")):
        try:
            names.append(_save(_sweep_axes(rows, tasks, name, "hidden size h", True, title), out, name))
        except Missing:
            pass
    if not names:
        raise Missing("hidden.jsonl has none of the Figure 5/12 tasks")
    return names


def fig7(results, out):
    rows = _sweep_rows(results, "broadcast")
    fig = _sweep_axes(rows, ["multirc", "cola"], "broadcast", "broadcast length n", False,
                      f"Figure 7: EPT* broadcast length ({_spread(rows)})")
    for ax in fig.axes:
        _integer_ticks(ax)
    return [_save(fig, out, "fig7_broadcast.png")]


def fig8(results, out):
    """Figure 8: one row of panels (5 SuperGLUE tasks + average) per T5 size; §5.3 reads both t5-base and t5-large."""
    rows = _sweep_rows(results, "lr")
    tags = ordered({r.get("model_tag") for r in rows}, MODEL_ORDER)
    tasks = [t for t in SUPERGLUE if any(r["task"] == t for r in rows)]
    if not tasks:
        raise Missing("lr.jsonl has none of the 5 SuperGLUE tasks")
    panels = tasks + (["Avg"] if len(tasks) > 1 else [])
    plt = _plt()
    cols = min(3, len(panels))  # a grid, not six panels in a row: each size takes ceil(panels / 3) rows
    per_tag = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(per_tag * len(tags), cols, figsize=(3.8 * cols, 3.4 * per_tag * len(tags)),
                             squeeze=False)
    for k, tag in enumerate(tags):
        mine = list(axes[k * per_tag:(k + 1) * per_tag].flat)
        for ax in mine[len(panels):]:
            ax.axis("off")
        _sweep_panels(mine, [r for r in rows if r.get("model_tag") == tag], tasks, panels, "learning rate",
                      True, band=False, prefix=f"{tag}: ")
    fig.suptitle("Figure 8: learning rate (" + ", ".join(tags) + ")")
    fig.tight_layout()
    return [_save(fig, out, "fig8_learning_rate.png")]


def fig9(results, out):
    """Figure 9: (left) score per added structure on the SuperGLUE tasks; (right) norm vs score on BoolQ."""
    rows = _sweep_rows(results, "structure")
    names = ordered({r["variant"] for r in rows}, list(STRUCTURE_LABELS))
    tasks = [t for t in SUPERGLUE if any(r["task"] == t for r in rows)]
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(names)
    panels = tasks + ["Avg"]
    for i, name in enumerate(names):
        ys = [mean_std(scores(rows, variant=name, task=t))[0] for t in tasks]
        ys = [float("nan") if y is None else y for y in ys]
        ys.append(sum(ys) / len(ys) if ys else float("nan"))
        left.bar([p + i * width for p in range(len(panels))], ys, width, label=STRUCTURE_LABELS.get(name, name))
    left.set_xticks([p + width * (len(names) - 1) / 2 for p in range(len(panels))],
                    [TASK_LABELS.get(t, t) for t in panels])
    left.set_ylabel("test score")
    left.set_title(f"EPT + one structure ({'mean over seeds' if over_seeds(rows) != '1 seed' else '1 seed'})")
    left.legend(fontsize=7, ncol=len(names), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    task = "boolq" if "boolq" in tasks else tasks[0]
    for i, name in enumerate(names):
        mine = [r for r in rows if r["variant"] == name and r["task"] == task]
        x = mean_std([r["score"] for r in mine])[0]
        y = mean_std([r.get("final_prompt_norm") or r.get("prompt_norm") for r in mine])[0]
        if x is not None and y is not None:
            label = STRUCTURE_LABELS.get(name, name)
            right.scatter([x], [y], s=40, color=f"C{i}", label=label)
            right.annotate(label, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    right.set_yscale("log")
    right.set_xlabel(f"test score ({TASK_LABELS.get(task, task)})")
    right.set_ylabel("final prompt norm μ_T (log)")
    right.set_title(f"norm vs score on {TASK_LABELS.get(task, task)}")
    right.legend(fontsize=7)
    fig.suptitle("Figure 9: EPT structure ablation")
    fig.tight_layout()
    return [_save(fig, out, "fig9_structure.png")]


def fig10(results, out):
    data = load_analysis(results, "transfer")
    labels = [TASK_LABELS.get(t, t) for t in data["tasks"]]
    plt = _plt()
    n = len(labels)
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(10, 0.9 * n + 4), max(4.5, 0.45 * n + 2)))
    ratio = [[float("nan") if v is None else min(max(v, 0.0), 1.0) for v in row] for row in data["ratio"]]
    for ax, matrix, title, vmin in ((left, data["cosine"], "cosine similarity of EPT* prompts", -1),
                                    (right, ratio, "zero-shot score ratio (A's prompt on B / B's own), clipped to [0, 1];\n"
                                     "gray: undefined (B's own score <= 0)", 0)):
        cmap = _plt().get_cmap("viridis").with_extremes(bad="lightgray")  # ratio undefined: B's own score <= 0
        im = ax.imshow(matrix, vmin=vmin, vmax=1, cmap=cmap)
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        if n <= 21:
            for i, row in enumerate(matrix):
                for j, v in enumerate(row):
                    if v == v:  # not NaN
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5, color="w" if v < 0.5 else "k")
        fig.colorbar(im, ax=ax, shrink=0.8)
    left.set_xlabel("task")
    left.set_ylabel("task")
    right.set_xlabel("evaluated task B")
    right.set_ylabel("prompt's task A")
    fig.suptitle("Figure 10: cross-task prompt similarity and zero-shot transfer")
    fig.tight_layout()
    return [_save(fig, out, "fig10_transfer.png")]


def _token(tok):
    """A vocabulary piece as markdown-safe code: escapes (tabs, newlines) visible, no table-breaking pipes."""
    return "`" + json.dumps(tok, ensure_ascii=False)[1:-1].replace("`", "'") + "`"  # markdown() escapes '|'


def neighbours_md(results, out):
    data = load_analysis(results, "neighbours")
    lines = ["# Appendix A.1: nearest vocabulary neighbours (cosine) of each prompt row\n"]
    for task, methods in data.items():
        for method in ordered(set(methods), METHOD_ORDER):
            d = methods[method]
            labels = set(d.get("labels") or [])
            note = " (random-weight T5: neighbours are meaningless)" if d.get("random_init") else ""
            lines.append(f"\n## {TASK_LABELS.get(task, task)}, {LABELS[method]}{note}\n")
            body = [[r["row"], f"{r['norm']:.3g}",
                     ", ".join(f"**{_token(tok)}**" if tok.replace("▁", "") in labels else _token(tok)
                               for tok, _ in r["neighbours"]),
                     ", ".join(f"{c:.2f}" for _, c in r["neighbours"])] for r in d["rows"]]
            lines.append(markdown(["row", "norm", "nearest tokens (label words in bold)", "cosine"], body))
    write_text(Path(out) / "neighbours.md", "\n".join(lines))
    return ["neighbours.md"]


# --- Figure 1: SuperGLUE average across sizes and against trainable parameters -------------------------

def superglue_averages(rows):
    """{(model tag, method): (SuperGLUE Avg as Table 1 computes it, complete?, trainable parameters)}."""
    out = {}
    for tag in {r["model_tag"] for r in rows}:
        for method in {r["method"] for r in rows if r["model_tag"] == tag}:
            means = [mean_std(scores(rows, model_tag=tag, method=method, task=t))[0] for t in SUPERGLUE]
            present = [m for m in means if m is not None]
            if present:
                counts = [r["n_trainable"] for r in rows if r["model_tag"] == tag and r["method"] == method
                          and r.get("n_trainable")]
                params = max(counts) if counts else (_param_table()[tag].get(method) if tag in M.SIZES else None)
                out[(tag, method)] = (sum(present) / len(present), len(present) == len(means), params)
    return out


def fig1(results, out):
    """Figure 1 from Table 1's runs (best lr by validation, as Table 1): (top) SuperGLUE average per method
    across T5 sizes; (bottom) the same scores against trainable parameters, log scale."""
    rows = select_best_lr(dedupe(files.read_jsonl(Path(results) / "table1.jsonl", what="results file", missing_ok=True)))
    avgs = superglue_averages(rows)
    if not avgs:
        raise Missing(f"no SuperGLUE rows in {Path(results) / 'table1.jsonl'} (run `python ablate.py table1`)")
    tags = ordered({t for t, _ in avgs}, MODEL_ORDER)
    methods = ordered({m for _, m in avgs}, METHOD_ORDER)
    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.5, 1.6 * len(tags) * len(methods) / 3), 8))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [k + i * width for k, tag in enumerate(tags) if (tag, method) in avgs]
        ys = [avgs[(tag, method)][0] for tag in tags if (tag, method) in avgs]
        partial = [not avgs[(tag, method)][1] for tag in tags if (tag, method) in avgs]
        top.bar(xs, ys, width, color=COLORS.get(method), label=LABELS[method],
                edgecolor=["k" if p else COLORS.get(method) for p in partial])
    top.set_xticks([k + width * (len(methods) - 1) / 2 for k in range(len(tags))], tags)
    top.set_ylabel("SuperGLUE average (test)")
    top.set_title("SuperGLUE average per method and T5 size (black edge: some tasks missing)", fontsize=9)
    top.legend(fontsize=7, ncol=min(6, len(methods)))
    markers = dict(zip(tags, "os^Dv<>"))
    for (tag, method), (avg, _, params) in avgs.items():
        if params:
            bottom.scatter([params], [avg], color=COLORS.get(method), marker=markers[tag], s=45,
                           label=f"{LABELS[method]} ({tag})")
    bottom.set_xscale("log")
    bottom.set_xlabel("trainable parameters (log)")
    bottom.set_ylabel("SuperGLUE average (test)")
    bottom.set_title("score vs trainable parameters", fontsize=9)
    bottom.legend(fontsize=6, ncol=3)
    fig.suptitle("Figure 1: EPT / EPT* against PT, ResPrompt, P-Tuning and FT on SuperGLUE")
    fig.tight_layout()
    return [_save(fig, out, "fig1_superglue.png")]


# --- Table 5: task details from each task's meta.json -------------------------------------------------

METRIC_NAMES = {"acc": "Acc", "f1": "F1", "mcc": "Matthews corr.", "pearson": "Pearson", "spearman": "Spearman",
                "macro_f1": "F1 (macro)", "f1a": "F1a", "em": "EM", "squad_f1": "F1", "squad_em": "EM"}
BENCHMARK_LABELS = {"superglue": "SuperGLUE", "glue": "GLUE", "mrqa": "MRQA", "others": "Others"}


def data_dirs(results):
    """The data folders the Table 1/2 runs were trained on (their config.json), then <results>/../data."""
    found = []
    for experiment in ("table1", "table2"):
        for row in files.read_jsonl(Path(results) / f"{experiment}.jsonl", what="results file", missing_ok=True):
            config = Path(row["run"]) / "config.json"
            if config.exists():
                found.append(files.read_json(config, "run configuration").get("data_dir"))
    return list(dict.fromkeys([d for d in found if d] + [str(Path(results).parent / "data")]))


def table5_md(results, out):
    """Table 5 in the paper's layout: per benchmark, each task's type, split sizes and metric (selection metric
    first; the others are reported too), read from data/<task>/meta.json."""
    metas = {}
    for task in list(registry.TASKS):
        for folder in data_dirs(results):
            path = Path(folder) / task / "meta.json"
            if path.exists():
                metas[task] = files.read_json(path, "task description")
                break
    if not metas:
        raise Missing("no data/<task>/meta.json next to the results or in the runs' data folders "
                      "(run `python prepare_data.py`)")
    header = ["Benchmark", "Dataset", "Type", "|Train|", "|Valid|", "|Test|", "Metric"]
    body, long = [], []
    for bench, tasks in (("superglue", SUPERGLUE), ("glue", GLUE), ("mrqa", MRQA),
                         ("others", OTHERS)):
        for t in (t for t in tasks if t in metas):
            m = metas[t]
            score = [METRIC_NAMES.get(x, x) for x in m["score"]]
            other = [METRIC_NAMES.get(x, x) for x in m["metrics"] if x not in m["score"]]
            metric = (" / ".join(score) + (" (mean)" if len(score) > 1 else "")
                      + (f"; also {', '.join(other)}" if other else ""))
            sizes = [m["splits"].get(s) for s in ("train", "validation", "test")]
            body.append([BENCHMARK_LABELS[bench], TASK_LABELS[t], m.get("task_type", DASH),
                         *[f"{n:,}" for n in sizes], metric])
            long.append({"benchmark": bench, "task": t, "type": m.get("task_type"), "train": sizes[0],
                         "validation": sizes[1], "test": sizes[2], "score": "+".join(m["score"]),
                         "metrics": "+".join(m["metrics"])})
    md = markdown(header, body) + ("\nNLI: natural language inference; coref.: coreference resolution; common.: "
                                   "commonsense; QA: question answering; WSD: word sense disambiguation. Sizes are "
                                   "this preparation's (Appendix B.1 split rule).\n")
    write_text(Path(out) / "table5.md", "# Table 5: task details\n\n" + md)
    write_csv(Path(out) / "table5.csv", long)
    return ["table5.md"]


# --- Appendix A.1, second half: P-Tuning's positive and negative prompts -----------------------------

def directions(results, out):
    """A table (directions.md) and a figure: per run, the two direction groups of P-Tuning's rows, each group's
    cosine to the label words, and the test score of each group alone against the whole prompt."""
    data = load_analysis(results, "directions")
    runs = [(task, method, d) for task, methods in data.items() for method, d in methods.items()]
    if not runs:
        raise Missing("analysis/directions.json holds no run")
    header = ["Task", "Method", "Prompt", "Rows", "Mean cosine (within group; full: between groups)",
              "Cosine to label words (per label)", "Max label cosine", "Test score"]
    body = []
    plt = _plt()
    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 3.3 * len(runs)), squeeze=False)
    for (task, method, d), (left, right) in zip(runs, axes):
        name = f"{TASK_LABELS.get(task, task)}, {LABELS.get(method, method)}"
        body.append([TASK_LABELS.get(task, task), LABELS.get(method, method), "full prompt",
                     len(d["assign"]), DASH if d["between_cosine"] is None else f"{d['between_cosine']:.2f}",
                     DASH, DASH, f"{d['full_score']:.1f}"])
        for g in d["groups"]:
            body.append([TASK_LABELS.get(task, task), LABELS.get(method, method), g["name"],
                         " ".join(map(str, g["rows"])), f"{g['within_cosine']:.2f}",
                         ", ".join(f"{_token(lab)} {c:.2f}" for lab, c in g["label_cosine"].items()),
                         f"{g['label_cosine_max']:.2f}", f"{g['score']:.1f}"])
        group_of = {r: g["name"] for g in d["groups"] for r in g["rows"]}
        colors = {"positive": "tab:red", "negative": "tab:blue"}
        left.bar(range(len(d["assign"])), d["row_label_cosine"],
                 color=[colors.get(group_of[r], "tab:gray") for r in range(len(d["assign"]))])
        left.axhline(0, color="k", lw=0.5)
        left.set_xlabel("prompt row i (red: positive group, blue: negative)")
        left.set_ylabel("max cosine to a label word")
        left.set_title(f"{name}: rows by direction", fontsize=9)
        bars = [("full", d["full_score"], "tab:gray")] + [(g["name"], g["score"], colors.get(g["name"], "tab:gray"))
                                                           for g in d["groups"]]
        right.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
        right.set_ylabel("test score")
        right.set_title(f"{name}: each group alone (no retraining)", fontsize=9)
    fig.suptitle("Appendix A.1: P-Tuning's two prompt directions (spherical 2-means)")
    fig.tight_layout()
    note = ("Groups: spherical 2-means on the rows of P' (cosine), started from the two least similar rows; the "
            "group with the higher mean of its rows' best label-word cosine is *positive*. Each group is scored "
            "alone (its rows, in order, as the whole prompt), without retraining."
            + (" Random-weight T5: the numbers are noise." if any(d.get("random_init") for _, _, d in runs) else ""))
    write_text(Path(out) / "directions.md", "# Appendix A.1: P-Tuning's positive and negative prompts\n\n"
               + note + "\n\n" + markdown(header, body))
    return [_save(fig, out, "figA1_directions.png"), "directions.md"]


INLINE = {"table5.md", "directions.md"}  # short tables shown in index.md, not only linked

FIGURES = [("Figure 1: SuperGLUE average across T5 sizes and against trainable parameters", fig1),
           ("Figure 2: prompt norm μ_t and validation score over steps (BoolQ, RTE)",
            lambda r, o: fig_norms(r, o, ["boolq", "rte"], "fig2_norms.png", "Figure 2: PT vs reparameterized prompts")),
           ("Figure 3: cosine similarity between prompt rows (BoolQ)", fig3),
           ("Figure 4: one prompt row broadcast l times, no retraining", fig4),
           ("Figures 5 and 12: EPT hidden size", fig5_12),
           ("Figure 7: EPT* broadcast length", fig7),
           ("Figure 8: learning-rate robustness", fig8),
           ("Figure 9: structure ablation and norm vs score", fig9),
           ("Figure 10: cross-task similarity and zero-shot transfer", fig10),
           ("Figure 11: prompt norm and score on GLUE + WiC",
            lambda r, o: fig_norms(r, o, ["cola", "mrpc", "stsb", "mnli", "qnli", "qqp", "sst2", "wic"],
                                   "fig11_norms.png", "Figure 11: prompt norm and score")),
           ("Appendix A.1: nearest vocabulary neighbours", neighbours_md),
           ("Appendix A.1: P-Tuning's positive and negative prompts", directions),
           ("Table 5: task details", table5_md)]


# --- the steering benchmark (ablate.py steer; docs/experiments.md): a small Table 1 and Figure 2 on a toy backbone

STEER_TITLE = "Steering benchmark (toy backbone, not the paper's numbers): Table 1 and Figure 2 in small"


def steer_table(rows):
    """Per (method, lr): parameters, validation and test accuracy (mean ± std over seeds), final μ_t; the
    no-prompt floor first. Validation is the best checkpoint's, test is scored at that checkpoint."""
    rows = dedupe(rows)
    header = ["Method", "lr", "Steps", "Params", "Valid acc", "Test acc", "final μ_t", "Seeds"]
    body, long = [], []
    for r in (r for r in rows if r["method"] == "none"):
        body.append(["no prompt (frozen backbone's default)", DASH, 0, 0, f"{r['val_score']:.1f}", f"{r['score']:.1f}",
                     DASH, DASH])
        long.append({"method": "none", "lr": None, "n_trainable": 0, "val_mean": r["val_score"], "val_std": None,
                     "test_mean": r["score"], "test_std": None, "final_prompt_norm": None, "seeds": None})
    trained = [r for r in rows if r["method"] != "none"]
    for method in ordered({r["method"] for r in trained}, METHOD_ORDER):
        for lr in sorted({r.get("lr") for r in trained if r["method"] == method}, key=lambda v: (v is None, v or 0)):
            mine = [r for r in trained if r["method"] == method and r.get("lr") == lr]
            val, test = mean_std([r.get("val_score") for r in mine]), mean_std([r["score"] for r in mine])
            norm = mean_std([r.get("final_prompt_norm") for r in mine])[0]
            steps = sorted({r.get("max_steps") for r in mine} - {None})
            body.append([LABELS[method], f"{lr:g}" if lr else DASH, "/".join(map(str, steps)) or DASH,
                         human(max((r.get("n_trainable") or 0) for r in mine)),
                         cell([r.get("val_score") for r in mine]), cell([r["score"] for r in mine]),
                         f"{norm:.3g}" if norm is not None else DASH, len(mine)])
            long.append({"method": method, "lr": lr, "n_trainable": max((r.get("n_trainable") or 0) for r in mine),
                         "val_mean": val[0], "val_std": val[1], "test_mean": test[0], "test_std": test[1],
                         "final_prompt_norm": norm, "seeds": len(mine)})
    return markdown(header, body), long


def _steer_curves(run):
    """(steps, μ_t) and (eval steps, validation scores) of one run folder's log.jsonl."""
    norm, score = ([], []), ([], [])
    for e in files.read_jsonl(Path(run) / "log.jsonl", what="run log", torn_tail_ok=True, missing_ok=True):
        if e.get("event") == "train" and e.get("prompt_norm") is not None:
            norm[0].append(e["step"])
            norm[1].append(e["prompt_norm"])
        elif e.get("event") == "eval" and e.get("score") is not None:
            score[0].append(e["step"])
            score[1].append(e["score"])
    return norm, score


def steer_section(results, out):
    """steer.md (+ csv) and steer_fig2.png: μ_t and the validation score over steps, seed 0 of each method
    at each lr (the default lr solid, a lower one dashed, a higher one dotted), the no-prompt floor in black."""
    rows = read_rows(results, "steer")
    if not rows:
        raise Missing(f"no {Path(results) / 'steer'}.jsonl (run `python ablate.py steer`)")
    md, long = steer_table(rows)
    tags = sorted({r.get("model_tag", "?") for r in rows})
    md = (f"*Backbone: {', '.join(tags)}; task: {', '.join(sorted({r['task'] for r in rows}))}; "
          f"{len(dedupe(rows))} rows. Accuracy in %. A toy check that each method learns to steer a frozen model; "
          "it does not reproduce the paper's numbers (docs/experiments.md).*\n\n" + md)
    write_text(Path(out) / "steer.md", f"# {STEER_TITLE}\n\n{md}")
    write_csv(Path(out) / "steer.csv", long)
    plt = _plt()
    fig, (top, bottom) = plt.subplots(1, 2, figsize=(11, 4))
    defaults = {m: lr for m, lr in (("ft", 1e-3),)}
    for r in sorted(dedupe(rows), key=lambda r: (METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER
                                                 else -1, r.get("lr") or 0)):
        if r["method"] == "none":
            bottom.axhline(r["val_score"], color="black", ls="--", lw=1, label="no prompt")
            continue
        if r.get("seed") != 0:
            continue
        main, lr = defaults.get(r["method"], 0.3), r.get("lr") or 0.0
        (steps, norm), (eval_steps, score) = _steer_curves(r["run"])
        style = dict(color=COLORS.get(r["method"]), ls="-" if lr == main else "--" if lr < main else ":",
                     lw=1.5 if lr == main else 1, label=f"{LABELS[r['method']]} lr {lr:g}")
        if norm:
            top.plot(steps, norm, **style)
        bottom.plot(eval_steps, score, marker="o", ms=3, **style)
    top.set_yscale("log")
    top.set_title("(a) prompt norm μ_t (seed 0)")
    top.set_xlabel("training step t")
    top.set_ylabel("μ_t (mean L2 norm of P' rows, log)")
    bottom.set_title("(b) validation accuracy (seed 0)")
    bottom.set_xlabel("training step t")
    bottom.set_ylabel("accuracy (%)")
    bottom.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("Steering benchmark: prompts on a frozen toy backbone")
    fig.tight_layout()
    return ["steer.md", _save(fig, out, "steer_fig2.png")]


FIGURES.append((STEER_TITLE, steer_section))
INLINE.add("steer.md")
EXPERIMENT_TABLE["steer"] = steer_table


# --- the report ------------------------------------------------------------------------------------

def main(argv=None):
    args = parser.parse_args(argv)
    results, out = Path(args.results), Path(args.out)
    if results.exists() and not results.is_dir():
        raise SystemExit(f"report: --results {results} is a file; pass the folder of <experiment>.jsonl files")
    if not results.exists():
        raise files.FileFault(f"report: there is no results folder {results}; run the experiments first "
                              "(run_all.sh, ablate.py, fewshot.py) or pass --results DIR with their results")
    files.make_dir(out, "report folder")
    index = ["# EPT reproduction: report\n"]
    noise = smoke_reason(results, args.smoke)
    if noise:
        index.append(f"> **SMOKE report: the numbers are noise.** These runs used {noise}, trained for a few steps on "
                     "the test fixtures: the report shows that every table and figure of the recipe is drawn, not "
                     "what EPT scores. Scores of 0.0 (and CoLA's -100, a constant prediction) are expected.\n")
    index.append(f"Generated by `python report.py --results {results} --out {out}` "
                 "from the results rows of ablate.py / fewshot.py and the analyses of analyze.py. "
                 "Scores in [0, 100]; '–' = no result; '†' = average over the tasks present only.\n")
    missing = []
    for key, (title, experiment, build) in TABLES.items():
        rows = read_rows(results, experiment)
        title = title_for(title, rows or [{"seed": 0}, {"seed": 1}])  # no rows: the general wording
        index.append(f"\n## {title}\n")
        if not rows:
            missing.append(f"{title}: no {results / experiment}.jsonl")
            index.append(f"*Missing: no `{results / experiment}.jsonl` yet.*\n")
            continue
        md, long = build(rows)
        tags = sorted({r.get("model_tag", "?") for r in rows})
        md = f"*Model: {', '.join(tags)}; {len(dedupe(rows))} runs.*\n\n{md}"
        write_text(out / f"{key}.md", f"# {title}\n\n{md}")
        write_csv(out / f"{key}.csv", long)
        index.append(f"[{key}.md]({key}.md) · [{key}.csv]({key}.csv)\n\n{md}")
    for experiment in ("hidden", "broadcast", "lr", "structure"):  # the numbers behind Figures 5/12, 7, 8, 9
        rows = read_rows(results, experiment)
        if rows:
            md, long = sweep_table(rows)
            write_text(out / f"sweep_{experiment}.md", f"# {experiment} sweep ({over_seeds(rows)})\n\n{md}")
            write_csv(out / f"sweep_{experiment}.csv", long)
    for title, build in FIGURES:
        index.append(f"\n## {title}\n")
        try:
            names = build(results, out)
        except Missing as why:
            missing.append(f"{title}: {why}")
            index.append(f"*Skipped: {why}.*\n")
            continue
        for name in names:
            index.append(f"[{name}]({name})\n" if name.endswith(".md") else f"![{name}]({name})\n")
            if name in INLINE:  # drop the file's own "# title" line: the section has it
                index.append((out / name).read_text().split("\n", 2)[2] + "\n")
    sweeps = [f"[sweep_{e}.md](sweep_{e}.md)" for e in ("hidden", "broadcast", "lr", "structure")
              if (out / f"sweep_{e}.md").exists()]
    if sweeps:
        index.append("\n## Numbers behind the sweep figures\n\n" + " · ".join(sweeps) + "\n")
    failed = failed_runs(results)
    if failed:
        index.append("\n## Runs that failed\n\nNot in any table: each stopped for good (its folder's failed.txt "
                     "says why; train it again, e.g. with other settings, and rerun the experiment's driver).\n")
        index += [f"- {experiment}: `{run}`: {why}" for experiment, run, why in failed]
    write_text(out / "index.md", "\n".join(index))
    print(f"report: wrote {out}/index.md" + (f"; missing: {len(missing)}" if missing else "")
          + (f"; failed runs: {len(failed)}" if failed else ""))
    for m in missing:
        print(f"report: missing {m}")
    for experiment, run, why in failed:
        print(f"report: failed {experiment} {run}: {why}")
    return missing


def failed_runs(results):
    """(experiment, run folder, why) of every run a driver's collect step found failed
    (<experiment>.failed.json, rewritten by each collect)."""
    return [(path.name[:-len(".failed.json")], run, why)
            for path in sorted(Path(results).glob("*.failed.json"))
            for run, why in files.read_json(path, "failed-runs list").items()]


if __name__ == "__main__":
    main()
