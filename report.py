"""Every result -> the paper's tables (markdown + CSV) and figures (PNG), one folder, one index.

Reads results/<experiment>.jsonl (ablate.py, fewshot.py: one row per run), results/analysis/*.json
(analyze.py) and the tasks' meta.json (Table 5: from the data folder the Table 1/2 runs used).
Writes report/: table1..table6 as .md and .csv (mean ± std over seeds, the Avg column, trainable
parameters per task), fig1..fig12 as .png, Appendix A.1's neighbours and P-Tuning directions as .md
(+ a figure), and index.md showing all of it. A cell without results reads "–"; a figure without
results is a note in index.md, never a crash. Runs a driver's collect step found failed
(results/<experiment>.failed.json) are listed with the reason under "Runs that failed".

    python report.py                                        # results/ -> report/
    python report.py --results smoke/results --out smoke/report
    python report.py --count                                # the Param column, all sizes
    python report.py --count --configs DIR     # from local t5-small/base/large config folders
"""
import argparse
import csv
import io
import json
import math
import shutil
from pathlib import Path

import tables
from ept import cli, files, outputs
from ept.tasks import GROUPS, TASKS, load_meta
from tables import STEER_SEARCH_SEEDS, STEER_SUCCESS

parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
parser.add_argument("--results", default="results",
                    help="folder of <experiment>.jsonl and analysis/")
parser.add_argument("--out", default="report", help="report folder to write")
parser.add_argument("--smoke", action="store_true", help="mark the report as a SMOKE report "
                    "(numbers are noise); also done when the runs used a random-weight or tiny T5")
parser.add_argument("--count", action="store_true", help="print the trainable-parameter table "
                    "(the paper's Param column, meta-device models, no memory) and exit")
parser.add_argument("--configs", help="with --count: folder with t5-small/, t5-base/, t5-large/ "
                    "config folders (default: the real configs' dimensions)")


def write_table(out, name, title, md, long):
    """out/<name>.md: the table under its title; out/<name>.csv: its long-form rows."""
    files.write_text(Path(out) / f"{name}.md", f"# {title}\n\n{md}")
    buf = io.StringIO()
    if long:
        writer = csv.DictWriter(buf, fieldnames=list(long[0]))
        writer.writeheader()
        writer.writerows(long)
    files.write_text(Path(out) / f"{name}.csv", buf.getvalue())


def task_label(task):
    return tables.TASK_LABELS.get(task, task)


# --- figures: each returns a list of written file names, or raises Missing ------------------------

class Missing(Exception):
    """A figure's results are not there: index.md says so, nothing else happens."""


STEP = "training step t"
MU = "μ_t (mean L2 norm of P' rows, log)"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _integer_ticks(ax):
    """Steps, lengths and counts are whole numbers: no 2.5 on their axis."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


STAMP = {"text": None}  # write_figures sets it: "SMOKE: noise" on a SMOKE report's figures


def _save(fig, out, name, title=None, tight=True):
    """The figure, titled `title` above all its panels, as out/name (PNG, atomically), closed;
    stamped in its lower right corner with STAMP's text when there is one."""
    if title:
        fig.suptitle(title)
    if tight:
        fig.tight_layout()
    if STAMP["text"]:
        fig.text(0.995, 0.005, STAMP["text"], ha="right", va="bottom", fontsize=11,
                 fontweight="bold", color="tab:red", alpha=0.8)
    try:
        files.write_with(Path(out) / name,
                         lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        _plt().close(fig)
    return name


def load_analysis(results, name):
    path = Path(results) / "analysis" / f"{name}.json"
    if not path.exists():
        raise Missing(f"no {path} (run `python analyze.py {name}`)")
    data = files.read_json(path, "analysis result")
    if not isinstance(data, dict) or not isinstance(data.get(name), dict) or not data[name]:
        raise files.FileFault(f"the analysis result {path} holds no {name!r} results; "
                              f"rerun `python analyze.py {name}`")
    return data[name]


def fig_norms(results, out, tasks, name, title):
    """Figures 2 / 11: (a) mu_t over steps, (b) validation score over steps, one line per method."""
    curves = load_analysis(results, "norms")
    tasks = [t for t in tasks if t in curves]
    if not tasks:
        raise Missing("no norm curves for these tasks in analysis/norms.json")
    cols = min(4, len(tasks))  # at most 4 tasks side by side: (a) norms above (b) scores
    groups = math.ceil(len(tasks) / cols)
    fig, axes = _plt().subplots(2 * groups, cols, figsize=(4 * cols, 3.3 * 2 * groups),
                                squeeze=False)
    pairs = list(zip(axes[0::2].flat, axes[1::2].flat))  # (norms, scores) of each place
    for top, bottom in pairs[len(tasks):]:  # the last group's empty places
        top.axis("off")
        bottom.axis("off")
    for (top, bottom), task in zip(pairs, tasks):
        for method in tables.ordered(set(curves[task]), tables.METHOD_ORDER):
            c, style = curves[task][method], _style(method)
            top.plot(c["step"], c["prompt_norm"], **style)
            bottom.plot(c["eval_step"], c["score"], marker="o", ms=3, **style)
        top.set(yscale="log", title=f"{task_label(task)}: (a) prompt norm", xlabel=STEP, ylabel=MU)
        bottom.set(title=f"{task_label(task)}: (b) validation score", xlabel=STEP,
                   ylabel="validation score")
        for ax in (top, bottom):
            _integer_ticks(ax)
            ax.legend(fontsize=8)
    return [_save(fig, out, name, title)]


def _style(method):
    return {"color": tables.COLORS.get(method), "label": tables.LABELS[method]}


def fig3(results, out):
    """Figure 3: cosine similarity between the prompt rows, one heatmap per method."""
    data = load_analysis(results, "cosine")
    task = "boolq" if "boolq" in data else next(iter(data))
    methods = tables.ordered(set(data[task]), tables.METHOD_ORDER)
    fig, axes = _plt().subplots(1, len(methods), figsize=(4.2 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        m = data[task][method]["cosine"]
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
        if len(m) <= 12:
            for i, row in enumerate(m):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=6)
        ax.set(title=f"{tables.LABELS[method]} ({task_label(task)})", xlabel="prompt row j",
               ylabel="prompt row i")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="cosine similarity")
    return [_save(fig, out, "fig3_prompt_cosine.png", tight=False)]


def fig4(results, out):
    """Figure 4: one row P'_i repeated l times (solid) vs the whole prompt (dotted), per method."""
    data = load_analysis(results, "subset")
    tasks = tables.ordered(set(data), ["boolq", "rte"])
    fig, axes = _plt().subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in tables.ordered(set(data[task]), tables.METHOD_ORDER):
            d, color, label = data[task][method], tables.COLORS.get(method), tables.LABELS[method]
            ax.plot(d["lengths"], d["score"], color=color, marker="o", ms=3,
                    label=f"{label}: P'_{d['row']} × l")
            ax.axhline(d["original"], color=color, ls=":", label=f"{label}: full prompt")
        ax.set(title=task_label(task), xlabel="concatenated length l", ylabel="test score")
        _integer_ticks(ax)
        ax.legend(fontsize=7)
    return [_save(fig, out, "fig4_subset_broadcast.png")]


def _sweep_rows(results, experiment):
    rows = tables.dedupe(tables.read_rows(results, experiment))
    if not rows:
        raise Missing(f"no {Path(results) / experiment}.jsonl "
                      f"(run `python ablate.py {experiment}`)")
    return rows


def _scored_rows(results, experiment):
    """A sweep's rows with a test score: --no-test rows (score None) have nothing to plot."""
    rows = [r for r in _sweep_rows(results, experiment) if r["score"] is not None]
    if not rows:
        raise Missing(f"no test score in {Path(results) / experiment}.jsonl (its runs were "
                      "trained with --no-test)")
    return rows


def _present(rows, tasks):
    return [t for t in tasks if any(r["task"] == t for r in rows)]


def _sweep_figure(blocks, tasks, xlabel, logx, wide=4, height=3.6, band=True):
    """A block of panels per (title prefix, rows): one panel per task (+ the average), the mean over
    seeds per swept value (± std band), a line per method; up to `wide` panels a row, else 3."""
    panels = tasks + (["Avg"] if len(tasks) > 1 else [])
    cols = len(panels) if len(panels) <= wide else 3
    per_block = math.ceil(len(panels) / cols)
    fig, axes = _plt().subplots(per_block * len(blocks), cols, squeeze=False,
                                figsize=(3.8 * cols, height * per_block * len(blocks)))
    for k, (prefix, rows) in enumerate(blocks):
        mine = list(axes[k * per_block:(k + 1) * per_block].flat)
        for ax in mine[len(panels):]:
            ax.axis("off")
        methods = tables.ordered({r["method"] for r in rows}, tables.METHOD_ORDER)
        for ax, task in zip(mine, panels):
            for method in methods:
                xs = sorted({r["variant"] for r in rows if r["method"] == method})
                avgs = [tables.task_average(rows, tasks if task == "Avg" else [task],
                                            method=method, variant=x) for x in xs]
                ys = [mean if complete else float("nan") for mean, complete in avgs]
                ax.plot(xs, ys, marker="o", ms=3, **_style(method))
                if band and task != "Avg":
                    sds = [tables.mean_std(tables.scores(rows, method=method, variant=x,
                                                         task=task))[1] or 0.0 for x in xs]
                    lo, hi = [y - s for y, s in zip(ys, sds)], [y + s for y, s in zip(ys, sds)]
                    ax.fill_between(xs, lo, hi, color=tables.COLORS.get(method), alpha=0.2)
            if logx:
                ax.set_xscale("log")
            ax.set(title=prefix + (task_label(task) if task != "Avg" else "Average"),
                   xlabel=xlabel, ylabel="test score")
            ax.legend(fontsize=7)
    return fig


def fig5_12(results, out):
    rows = _scored_rows(results, "hidden")
    names = []
    for number, tasks in ((5, ["boolq", "rte"]), (12, ["wsc", "cb", "wic"])):
        if _present(rows, tasks):
            fig = _sweep_figure([("", rows)], _present(rows, tasks), "hidden size h", logx=True)
            names.append(_save(fig, out, f"fig{number}_hidden_size.png",
                               f"Figure {number}: EPT hidden size h ({tables.spread(rows)})"))
    if not names:
        raise Missing("hidden.jsonl has none of the Figure 5/12 tasks")
    return names


def fig7(results, out):
    rows = _scored_rows(results, "broadcast")
    tasks = _present(rows, ["multirc", "cola"])
    if not tasks:
        raise Missing("no rows for broadcast")
    fig = _sweep_figure([("", rows)], tasks, "broadcast length n", logx=False)
    for ax in fig.axes:
        _integer_ticks(ax)
    return [_save(fig, out, "fig7_broadcast.png",
                  f"Figure 7: EPT* broadcast length ({tables.spread(rows)})")]


def fig8(results, out):
    """Figure 8: a row of panels (SuperGLUE tasks + Avg) per T5 size: §5.3 reads base and large."""
    rows = _scored_rows(results, "lr")
    tags = tables.ordered({r.get("model_tag") for r in rows}, tables.MODEL_ORDER)
    tasks = _present(rows, tables.SUPERGLUE)
    if not tasks:
        raise Missing("lr.jsonl has none of the 5 SuperGLUE tasks")
    # a grid, not six panels in a row: each size takes ceil(panels / 3) rows
    blocks = [(f"{tag}: ", [r for r in rows if r.get("model_tag") == tag]) for tag in tags]
    fig = _sweep_figure(blocks, tasks, "learning rate", logx=True, wide=3, height=3.4, band=False)
    return [_save(fig, out, "fig8_learning_rate.png",
                  "Figure 8: learning rate (" + ", ".join(tags) + ")")]


def fig9(results, out):
    """Figure 9: (left) score per added structure on SuperGLUE; (right) norm vs score on BoolQ."""
    rows = _scored_rows(results, "structure")
    names = tables.ordered({r["variant"] for r in rows}, list(tables.STRUCTURE_LABELS))
    tasks = _present(rows, tables.SUPERGLUE)
    if not tasks:
        raise Missing(f"no SuperGLUE rows in {Path(results) / 'structure.jsonl'}")
    fig, (left, right) = _plt().subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(names)
    panels = tasks + ["Avg"]
    for i, name in enumerate(names):
        ys = [tables.mean_std(tables.scores(rows, variant=name, task=t))[0] for t in tasks]
        ys = [float("nan") if y is None else y for y in ys]
        ys.append(sum(ys) / len(ys) if ys else float("nan"))
        left.bar([p + i * width for p in range(len(panels))], ys, width,
                 label=tables.STRUCTURE_LABELS.get(name, name))
    left.set_xticks([p + width * (len(names) - 1) / 2 for p in range(len(panels))],
                    [task_label(t) for t in panels])
    left.set(ylabel="test score", title="EPT + one structure "
             f"({'mean over seeds' if tables.over_seeds(rows) != '1 seed' else '1 seed'})")
    left.legend(fontsize=7, ncol=len(names), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    task = "boolq" if "boolq" in tasks else tasks[0]
    for i, name in enumerate(names):
        mine = [r for r in rows if r["variant"] == name and r["task"] == task]
        x = tables.mean_std([r["score"] for r in mine])[0]
        y = tables.mean_std([r.get("final_prompt_norm") or r.get("prompt_norm") for r in mine])[0]
        if x is not None and y is not None:
            label = tables.STRUCTURE_LABELS.get(name, name)
            right.scatter([x], [y], s=40, color=f"C{i}", label=label)
            right.annotate(label, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    right.set(yscale="log", xlabel=f"test score ({task_label(task)})",
              ylabel="final prompt norm μ_T (log)", title=f"norm vs score on {task_label(task)}")
    right.legend(fontsize=7)
    return [_save(fig, out, "fig9_structure.png", "Figure 9: EPT structure ablation")]


def fig10(results, out):
    data = load_analysis(results, "transfer")
    labels = [task_label(t) for t in data["tasks"]]
    n = len(labels)
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(10, 0.9 * n + 4), max(4.5, 0.45 * n + 2)))
    ratio = [[float("nan") if v is None else min(max(v, 0.0), 1.0) for v in row]
             for row in data["ratio"]]
    ratio_title = ("zero-shot score ratio (A's prompt on B / B's own), clipped to [0, 1];\n"
                   "gray: undefined (B's own score <= 0)")
    for ax, matrix, title, vmin in ((left, data["cosine"], "cosine similarity of EPT* prompts", -1),
                                    (right, ratio, ratio_title, 0)):
        cmap = plt.get_cmap("viridis").with_extremes(bad="lightgray")
        im = ax.imshow(matrix, vmin=vmin, vmax=1, cmap=cmap)
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        if n <= 21:
            for i, row in enumerate(matrix):
                for j, v in enumerate(row):
                    if v == v:  # not NaN
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                                color="w" if v < 0.5 else "k")
        fig.colorbar(im, ax=ax, shrink=0.8)
    left.set(xlabel="task", ylabel="task")
    right.set(xlabel="evaluated task B", ylabel="prompt's task A")
    return [_save(fig, out, "fig10_transfer.png",
                  "Figure 10: cross-task prompt similarity and zero-shot transfer")]


def _token(tok):
    """A vocabulary piece as markdown code, escapes (tab, newline) shown; markdown() escapes '|'."""
    return "`" + json.dumps(tok, ensure_ascii=False)[1:-1].replace("`", "'") + "`"


def neighbours_md(results, out):
    data = load_analysis(results, "neighbours")
    lines = ["# Appendix A.1: nearest vocabulary neighbours (cosine) of each prompt row\n"]
    for task, methods in data.items():
        for method in tables.ordered(set(methods), tables.METHOD_ORDER):
            d = methods[method]
            labels = set(d.get("labels") or [])
            note = " (random-weight T5: neighbours are meaningless)" if d.get("random_init") else ""
            lines.append(f"\n## {task_label(task)}, {tables.LABELS[method]}{note}\n")
            body = [[r["row"], f"{r['norm']:.3g}",
                     ", ".join(f"**{_token(tok)}**" if tok.replace("▁", "") in labels
                               else _token(tok) for tok, _ in r["neighbours"]),
                     ", ".join(f"{c:.2f}" for _, c in r["neighbours"])] for r in d["rows"]]
            header = ["row", "norm", "nearest tokens (label words in bold)", "cosine"]
            lines.append(tables.markdown(header, body))
    files.write_text(Path(out) / "neighbours.md", "\n".join(lines))
    return ["neighbours.md"]


def superglue_averages(rows):
    """{(model tag, method): (SuperGLUE Avg as in Table 1, complete?, trainable parameters)}."""
    out = {}
    for tag in tables.ordered({r["model_tag"] for r in rows}, tables.MODEL_ORDER):  # fixed order:
        methods = {r["method"] for r in rows if r["model_tag"] == tag}  # the same PNG every time
        for method in tables.ordered(methods, tables.METHOD_ORDER):
            avg, full = tables.task_average(rows, tables.SUPERGLUE, model_tag=tag, method=method)
            if avg is not None:
                out[(tag, method)] = (avg, full, tables.n_trainable(rows, tag, method))
    return out


def fig1(results, out):
    """Figure 1 from Table 1's runs (best lr by validation, as Table 1): (top) SuperGLUE average per
    method across T5 sizes; (bottom) the same scores against trainable parameters, log scale."""
    rows = tables.select_best_lr(tables.dedupe(tables.read_rows(results, "table1")))
    avgs = superglue_averages(rows)
    if not avgs:
        raise Missing(f"no SuperGLUE rows in {Path(results) / 'table1.jsonl'} "
                      "(run `python ablate.py table1`)")
    tags = tables.ordered({t for t, _ in avgs}, tables.MODEL_ORDER)
    methods = tables.ordered({m for _, m in avgs}, tables.METHOD_ORDER)
    fig, (top, bottom) = _plt().subplots(
        2, 1, figsize=(max(6.5, 1.6 * len(tags) * len(methods) / 3), 8))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [k + i * width for k, tag in enumerate(tags) if (tag, method) in avgs]
        ys = [avgs[(tag, method)][0] for tag in tags if (tag, method) in avgs]
        partial = [not avgs[(tag, method)][1] for tag in tags if (tag, method) in avgs]
        top.bar(xs, ys, width, color=tables.COLORS.get(method), label=tables.LABELS[method],
                edgecolor=["k" if p else tables.COLORS.get(method) for p in partial])
    top.set_xticks([k + width * (len(methods) - 1) / 2 for k in range(len(tags))], tags)
    top.set_ylabel("SuperGLUE average (test)")
    top.set_title("SuperGLUE average per method and T5 size (black edge: some tasks missing)",
                  fontsize=9)
    top.legend(fontsize=7, ncol=min(6, len(methods)))
    markers = dict(zip(tags, "os^Dv<>"))
    for (tag, method), (avg, _, params) in avgs.items():
        if params:  # EPT* as a ring: EPT has its parameter count, and would hide under it
            color = tables.COLORS.get(method)
            style = ({"facecolors": "none", "edgecolors": color, "s": 110}
                     if method == "ept_star" else {"color": color, "s": 45})
            bottom.scatter([params], [avg], marker=markers[tag],
                           label=f"{tables.LABELS[method]} ({tag})", **style)
    bottom.set(xscale="log", xlabel="trainable parameters (log)",
               ylabel="SuperGLUE average (test)")
    bottom.set_title("score vs trainable parameters (EPT* a ring: EPT has the same count)",
                     fontsize=9)
    bottom.legend(fontsize=6, ncol=3)
    return [_save(fig, out, "fig1_superglue.png",
                  "Figure 1: EPT / EPT* against PT, ResPrompt, P-Tuning and FT on SuperGLUE")]


def directions(results, out):
    """directions.md and a figure: per run, P-Tuning's rows in two direction groups, each group's
    cosine to the label words, and each group's test score alone against the whole prompt's."""
    data = load_analysis(results, "directions")
    entries = [(task, method, d) for task, methods in data.items() for method, d in methods.items()]
    if not entries:
        raise Missing("analysis/directions.json holds no run")
    header = ["Task", "Method", "Prompt", "Rows", "Mean cosine (within group; full: between "
              "groups)", "Cosine to label words (per label)", "Max label cosine", "Test score"]
    body = []
    colors = {"positive": "tab:red", "negative": "tab:blue"}
    fig, axes = _plt().subplots(len(entries), 2, figsize=(10, 3.3 * len(entries)), squeeze=False)
    for (task, method, d), (left, right) in zip(entries, axes):
        who = [task_label(task), tables.LABELS.get(method, method)]
        name = ", ".join(who)
        body.append([*who, "full prompt", len(d["assign"]),
                     tables.DASH if d["between_cosine"] is None else f"{d['between_cosine']:.2f}",
                     tables.DASH, tables.DASH, f"{d['full_score']:.1f}"])
        body += [[*who, g["name"], " ".join(map(str, g["rows"])), f"{g['within_cosine']:.2f}",
                  ", ".join(f"{_token(lab)} {c:.2f}" for lab, c in g["label_cosine"].items()),
                  f"{g['label_cosine_max']:.2f}", f"{g['score']:.1f}"] for g in d["groups"]]
        group_of = {r: g["name"] for g in d["groups"] for r in g["rows"]}
        left.bar(range(len(d["assign"])), d["row_label_cosine"],
                 color=[colors.get(group_of[r], "tab:gray") for r in range(len(d["assign"]))])
        left.axhline(0, color="k", lw=0.5)
        left.set(xlabel="prompt row i (red: positive group, blue: negative)",
                 ylabel="max cosine to a label word")
        left.set_title(f"{name}: rows by direction", fontsize=9)
        bars = ["full"] + [g["name"] for g in d["groups"]]
        right.bar(bars, [d["full_score"]] + [g["score"] for g in d["groups"]],
                  color=[colors.get(b, "tab:gray") for b in bars])
        right.set_ylabel("test score")
        right.set_title(f"{name}: each group alone (no retraining)", fontsize=9)
    note = ("Groups: spherical 2-means on the rows of P' (cosine), started from the two least "
            "similar rows; the group with the higher mean of its rows' best label-word cosine is "
            "*positive*. Each group is scored alone (its rows, in order, as the whole prompt), "
            "without retraining." + (" Random-weight T5: the numbers are noise."
                                     if any(d.get("random_init") for _, _, d in entries) else ""))
    files.write_text(Path(out) / "directions.md", "# Appendix A.1: P-Tuning's positive and "
                     f"negative prompts\n\n{note}\n\n" + tables.markdown(header, body))
    title = "Appendix A.1: P-Tuning's two prompt directions (spherical 2-means)"
    return [_save(fig, out, "figA1_directions.png", title), "directions.md"]


# --- Table 5: task details from each task's meta.json ---------------------------------------------

METRIC_NAMES = {"acc": "Acc", "f1": "F1", "mcc": "Matthews corr.", "pearson": "Pearson",
                "spearman": "Spearman", "macro_f1": "F1 (macro)", "f1a": "F1a", "em": "EM",
                "squad_f1": "F1", "squad_em": "EM"}
BENCHMARK_LABELS = {"superglue": "SuperGLUE", "glue": "GLUE", "mrqa": "MRQA", "others": "Others"}


def data_dirs(results):
    """The data folders the Table 1/2 runs used (their config.json), then <results>/../data."""
    found = []
    for experiment in ("table1", "table2"):
        for row in files.read_jsonl(Path(results) / f"{experiment}.jsonl", what="results file",
                                    missing_ok=True):
            config = Path(row["run"]) / "config.json"
            if config.exists():
                found.append(files.read_json(config, "run configuration").get("data_dir"))
    return list(dict.fromkeys([d for d in found if d] + [str(Path(results).parent / "data")]))


def table5_md(results, out):
    """Table 5 in the paper's layout: per benchmark, each task's type, split sizes and metric
    (selection metric first; the others are reported too), read from data/<task>/meta.json."""
    folders, metas = data_dirs(results), {}
    for task in TASKS:
        if found := [m for f in folders if (m := load_meta(f, task, strict=False)) is not None]:
            metas[task] = found[0]
    if not metas:
        raise Missing("no data/<task>/meta.json next to the results or in the runs' data folders "
                      "(run `python prepare_data.py`)")
    header = ["Benchmark", "Dataset", "Type", "|Train|", "|Valid|", "|Test|", "Metric"]
    body, long = [], []
    for bench, label in BENCHMARK_LABELS.items():
        for t in (t for t in GROUPS[bench] if t in metas):
            m = metas[t]
            score = [METRIC_NAMES.get(x, x) for x in m["score"]]
            other = [METRIC_NAMES.get(x, x) for x in m["metrics"] if x not in m["score"]]
            metric = (" / ".join(score) + (" (mean)" if len(score) > 1 else "")
                      + (f"; also {', '.join(other)}" if other else ""))
            sizes = [m["splits"].get(s) for s in ("train", "validation", "test")]
            body.append([label, tables.TASK_LABELS[t],
                         m.get("task_type", tables.DASH), *[f"{n:,}" for n in sizes], metric])
            long.append({"benchmark": bench, "task": t, "type": m.get("task_type"),
                         "train": sizes[0], "validation": sizes[1], "test": sizes[2],
                         "score": "+".join(m["score"]), "metrics": "+".join(m["metrics"])})
    md = tables.markdown(header, body) + ("\nNLI: natural language inference; coref.: coreference "
          "resolution; common.: commonsense; QA: question answering; WSD: word sense "
          "disambiguation. Sizes are this preparation's (Appendix B.1 split rule).\n")
    write_table(out, "table5", "Table 5: task details", md, long)
    return ["table5.md"]


# --- the steering benchmark (ablate.py steer; docs/experiments.md): Table 1 and Figure 2 in small

def steer_section(results, out):
    """steer.md (+ csv): the table, each method's chosen lr and EPT's s_t zero crossings;
    steer_fig2.png: μ_t and validation score over steps, seed 0 of each method and lr (default
    lr solid, lower dashed, higher dotted), the no-prompt floor in black; steer_failure.png: EPT's
    failure mode (steer_failure)."""
    rows = _sweep_rows(results, "steer")
    md, long = tables.steer_table(rows)
    tags = sorted({r.get("model_tag", "?") for r in rows})
    chosen = tables.steer_chosen(tables.dedupe(rows))
    picks = "; ".join(f"{tables.LABELS[m]} {lr:g}" for m, lr in sorted(chosen.items()))
    md = (f"*Backbone: {', '.join(tags)}; task: {', '.join(sorted({r['task'] for r in rows}))}; "
          f"{len(rows)} rows. Accuracy in %. A toy check that each method learns to steer a frozen "
          f"model; it does not reproduce the paper's numbers (docs/experiments.md).*\n\n{md}\n"
          f"Steered: the seeds whose test accuracy reached {STEER_SUCCESS:g} %. The lr "
          "(Appendix B.2's protocol): the best mean validation score over seeds "
          f"{', '.join(map(str, STEER_SEARCH_SEEDS))}, chosen: {picks or tables.DASH}. "
          "† lies outside the paper's grid {0.003 .. 0.3}; 0.3 is the paper's default."
          f"{steer_seeds_note(rows)}\n"
          + "".join(f"\n{line}" for line in steer_crossings(rows)))
    write_table(out, "steer", tables.STEER_TITLE, md, long)
    fig, (top, bottom) = _plt().subplots(1, 2, figsize=(11, 4))
    rank = {m: i for i, m in enumerate(tables.METHOD_ORDER)}  # the floor first, then by lr
    for r in sorted(rows, key=lambda r: (rank.get(r["method"], -1), r.get("lr") or 0)):
        if r["method"] == "none":
            bottom.axhline(r["val_score"], color="black", ls="--", lw=1, label="no prompt")
            continue
        if r.get("seed") != 0:
            continue
        usual, lr = {"ft": 1e-3}.get(r["method"], 0.3), r.get("lr") or 0.0  # the benchmark's lr
        steps, norm, eval_steps, score = outputs.curves(r["run"], missing_ok=True)
        style = dict(color=tables.COLORS.get(r["method"]),
                     ls="-" if lr == usual else "--" if lr < usual else ":",
                     lw=1.5 if lr == usual else 1, label=f"{tables.LABELS[r['method']]} lr {lr:g}")
        if norm:
            top.plot(steps, norm, **style)
        bottom.plot(eval_steps, score, marker="o", ms=3, **style)
    top.set(yscale="log", title="(a) prompt norm μ_t (seed 0)", xlabel=STEP, ylabel=MU)
    bottom.set(title="(b) validation accuracy (seed 0)", xlabel=STEP, ylabel="accuracy (%)")
    bottom.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    names = ["steer.md", _save(fig, out, "steer_fig2.png",
                               "Steering benchmark: prompts on a frozen toy backbone")]
    return names + [name for name in [steer_failure(rows, out)] if name]


def steer_seeds_note(rows):
    """A sentence when the rows hold fewer seeds than the benchmark's 10 (ablate.STEER_SEEDS)."""
    seeds = {r.get("seed") for r in rows if r["method"] != "none"}
    return (f" Only {len(seeds)} seed(s) here, not the benchmark's 10 (SMOKE runs seeds 0-2): "
            "the counts are over those." if len(seeds) < 10 else "")


def ept_s(run_dir):
    """(steps, s_t) of one run's log.jsonl: EPT's s_t = P1 . W_down ("ept_s"; h > 1: a norm)."""
    log = files.read_jsonl(Path(run_dir) / "log.jsonl", what="run log", torn_tail_ok=True,
                           missing_ok=True)
    train = [e for e in log if e.get("event") == "train" and e.get("ept_s") is not None]
    return [e["step"] for e in train], [e["ept_s"] for e in train]


def steer_fate(row):
    """(steered: the tested best checkpoint >= STEER_SUCCESS, lost: the last validation score
    below it, crossed: s_t changed sign between two steps, (steps, s_t), (steps, μ_t))."""
    steps, norm, _, scores = outputs.curves(row["run"], missing_ok=True)
    s = ept_s(row["run"])
    return (row["score"] >= STEER_SUCCESS, bool(scores) and scores[-1] < STEER_SUCCESS,
            any(a * b < 0 for a, b in zip(s[1], s[1][1:])), s, (steps, norm))


def steer_crossings(rows):
    """One line per EPT/EPT* lr: the seeds whose s_t crossed zero, how many of them and of the
    others ended below STEER_SUCCESS at the last validation (after steering, or never steered)."""
    lines, bar = [], f"{STEER_SUCCESS:g}"
    for method in ("ept", "ept_star"):
        for lr in sorted({r.get("lr") for r in rows if r["method"] == method and r.get("lr")}):
            fates = [steer_fate(r) for r in rows if r["method"] == method and r.get("lr") == lr]
            crossed = [(ok, lost) for ok, lost, c, _, _ in fates if c]
            others = [(ok, lost) for ok, lost, c, _, _ in fates if not c]
            lines.append(
                f"- {tables.LABELS[method]} lr {lr:g}: s_t crossed zero on {len(crossed)} of "
                f"{len(fates)} seeds; {sum(lost for _, lost in crossed)} of them ended below {bar} "
                f"at the last validation ({sum(ok and lost for ok, lost in crossed)} after "
                f"steering: the tested checkpoint is the best), as did "
                f"{sum(lost for _, lost in others)} of the {len(others)} others.")
    return lines


def steer_failure(rows, out):
    """steer_failure.png, "EPT's failure mode": s_t of every EPT seed over the steps at lr 0.3
    and 3 (symmetric log scale), beside μ_t: green, steered and still steering at the last
    validation; orange, steered, then lost it; red, never steered. None when no s_t was logged."""
    lrs = [lr for lr in (0.3, 3.0)
           if any(r["method"] == "ept" and r.get("lr") == lr for r in rows)]
    fates = {lr: [steer_fate(r) for r in rows if r["method"] == "ept" and r.get("lr") == lr]
             for lr in lrs}
    if not any(s for found in fates.values() for _, _, _, (_, s), _ in found):
        return None
    fig, axes = _plt().subplots(1, len(lrs) + 1, figsize=(5 * (len(lrs) + 1), 3.8))
    for k, lr in enumerate(lrs):
        for ok, lost, _, (steps, s), (norm_steps, norm) in fates[lr]:
            color = "tab:red" if not ok else "tab:orange" if lost else "tab:green"
            axes[k].plot(steps, s, color=color, lw=1, alpha=0.8)
            axes[-1].plot(norm_steps, norm, color=color, lw=1, alpha=0.8,
                          ls="-" if lr == 0.3 else ":")
        axes[k].axhline(0, color="black", lw=0.8)
        counts = [sum(ok and not lost for ok, lost, *_ in fates[lr]),
                  sum(ok and lost for ok, lost, *_ in fates[lr]),
                  sum(not ok for ok, *_ in fates[lr])]
        axes[k].set(yscale="symlog", xlabel=STEP, ylabel="s_t = P1 · W_down (symlog)",
                    title=f"({'ab'[k]}) EPT lr {lr:g}: {counts[0]} kept / {counts[1]} lost / "
                          f"{counts[2]} never")
    axes[-1].set(yscale="log", xlabel=STEP, ylabel=MU,
                 title=f"({'abc'[len(lrs)]}) μ_t (lr 0.3 solid, 3 dotted)")
    return _save(fig, out, "steer_failure.png",
                 "EPT's failure mode: s_t (green: steered, kept; orange: steered, then lost; "
                 "red: never)")


INLINE = {"table5.md", "directions.md", "steer.md"}  # shown in index.md, not only linked

FIGURES = [("Figure 1: SuperGLUE average across T5 sizes and against trainable parameters", fig1),
           ("Figure 2: prompt norm μ_t and validation score over steps (BoolQ, RTE)",
            lambda r, o: fig_norms(r, o, ["boolq", "rte"], "fig2_norms.png",
                                   "Figure 2: PT vs reparameterized prompts")),
           ("Figure 3: cosine similarity between prompt rows (BoolQ)", fig3),
           ("Figure 4: one prompt row broadcast l times, no retraining", fig4),
           ("Figures 5 and 12: EPT hidden size", fig5_12),
           ("Figure 7: EPT* broadcast length", fig7),
           ("Figure 8: learning-rate robustness", fig8),
           ("Figure 9: structure ablation and norm vs score", fig9),
           ("Figure 10: cross-task similarity and zero-shot transfer", fig10),
           ("Figure 11: prompt norm and score on GLUE + WiC",
            lambda r, o: fig_norms(r, o, ["cola", "mrpc", "stsb", "mnli", "qnli", "qqp", "sst2",
                                          "wic"], "fig11_norms.png",
                                   "Figure 11: prompt norm and score")),
           ("Appendix A.1: nearest vocabulary neighbours", neighbours_md),
           ("Appendix A.1: P-Tuning's positive and negative prompts", directions),
           ("Table 5: task details", table5_md),
           (tables.STEER_TITLE, steer_section)]


# --- the report -----------------------------------------------------------------------------------

SWEEPS = ("hidden", "broadcast", "lr", "structure")  # the numbers behind Figures 5/12, 7, 8, 9


@cli.script
def main(argv=None):
    args = parser.parse_args(argv)
    if args.configs and not (args.count and Path(args.configs).is_dir()):
        raise cli.Failure(f"report: --configs {args.configs} " + (
            "is not a folder; pass the folder holding t5-small/, t5-base/, t5-large/"
            if args.count else "goes with --count"))
    if args.count:
        print("\n".join(tables.count_lines(args.configs)))
        return []
    results, out = Path(args.results), Path(args.out)
    if results.exists() and not results.is_dir():
        raise cli.Failure(f"report: --results {results} is a file; "
                             "pass the folder of <experiment>.jsonl files")
    if not results.exists():
        raise files.FileFault(f"report: there is no results folder {results}; run the "
                              "experiments first (run_all.sh, ablate.py, fewshot.py) or pass "
                              "--results DIR with their results")
    made = not out.exists()
    files.make_dir(out, "report folder")
    try:
        return write_report(results, out, args.smoke)
    except BaseException:
        STAMP["text"] = None
        if made:  # a failed report leaves no folder it made (a half-written one included)
            shutil.rmtree(out, ignore_errors=True)
        raise


def smoke_reason(results, forced=False):
    """What makes this report's numbers noise ('a random-weight tiny T5', ...), or None: the runs'
    config.json says random_init, or their T5 is far below t5-small (d_model under 256)."""
    seen = set()
    for experiment in tables.EXPERIMENT_KEYS:
        for row in tables.read_rows(results, experiment):
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


def write_report(results, out, smoke):
    """The tables, the figures and index.md into `out` -> the missing items."""
    index = ["# EPT reproduction: report\n"]
    noise = smoke_reason(results, smoke)
    if noise:
        index.append(f"> **SMOKE report: the numbers are noise** (the steering benchmark's "
                     f"section aside). These runs used {noise}, trained for a few steps on the "
                     "test fixtures: the report shows that every table and figure of the recipe "
                     "is drawn, not what EPT scores; their figures are stamped \"SMOKE: noise\". "
                     "Scores of 0.0 (and CoLA's -100, a constant prediction) are expected. The "
                     "steering benchmark's section is not noise: it trains prompts on its own "
                     "small backbone, built to be steered, and its numbers mean what they say.\n")
    index.append(f"Generated by `python report.py --results {results} --out {out}` "
                 "from the results rows of ablate.py / fewshot.py and the analyses of analyze.py. "
                 "Scores in [0, 100]; '–' = no result; '†' = average over the tasks present "
                 "only.\n")
    missing = write_tables(results, out, index)
    missing += write_figures(results, out, index, "SMOKE: noise" if noise else None)
    sweeps = [f"[sweep_{e}.md](sweep_{e}.md)" for e in SWEEPS if (out / f"sweep_{e}.md").exists()]
    if sweeps:
        index.append("\n## Numbers behind the sweep figures\n\n" + " · ".join(sweeps) + "\n")
    failed = failed_runs(results)
    if failed:
        index.append("\n## Runs that failed\n\nNot in any table: each stopped for good "
                     "(its folder's failed.txt says why; train it again, e.g. with other "
                     "settings, and rerun the experiment's driver).\n")
        index += [f"- {experiment}: `{run}`: {why}" for experiment, run, why in failed]
    files.write_text(out / "index.md", "\n".join(index))
    print(f"report: wrote {out}/index.md" + (f"; missing: {len(missing)}" if missing else "")
          + (f"; failed runs: {len(failed)}" if failed else ""))
    for m in missing:
        print(f"report: missing {m}")
    for experiment, run, why in failed:
        print(f"report: failed {experiment} {run}: {why}")
    return missing


def write_tables(results, out, index):
    """The paper's tables (markdown + CSV) and the numbers behind the sweep figures; each table's
    section appended to `index`. Returns what is missing."""
    missing = []
    for key, (title, experiment, build) in tables.TABLES.items():
        rows = tables.read_rows(results, experiment)
        title = tables.title_for(title, rows or [{"seed": 0}, {"seed": 1}])  # no rows: generic
        index.append(f"\n## {title}\n")
        if not rows:
            missing.append(f"{title}: no {results / experiment}.jsonl")
            index.append(f"*Missing: no `{results / experiment}.jsonl` yet.*\n")
            continue
        md, long = build(rows)
        tags = sorted({r.get("model_tag", "?") for r in rows})
        md = f"*Model: {', '.join(tags)}; {len(tables.dedupe(rows))} runs.*\n\n{md}"
        write_table(out, key, title, md, long)
        index.append(f"[{key}.md]({key}.md) · [{key}.csv]({key}.csv)\n\n{md}")
    for experiment in SWEEPS:
        rows = tables.read_rows(results, experiment)
        if rows:
            md, long = tables.sweep_table(rows)
            write_table(out, f"sweep_{experiment}",
                        f"{experiment} sweep ({tables.over_seeds(rows)})", md, long)
    return missing


def write_figures(results, out, index, stamp=None):
    """Every figure, its section appended to `index` (missing: a note, never a crash) -> missing.
    `stamp`: text for a corner of each figure but the steering benchmark's (SMOKE: noise)."""
    missing = []
    for title, build in FIGURES:
        index.append(f"\n## {title}\n")
        STAMP["text"] = stamp if build is not steer_section else None
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
    STAMP["text"] = None
    return missing


def failed_runs(results):
    """(experiment, run folder, why) of every run in <experiment>.failed.json (each collect's)."""
    return [(path.name[:-len(".failed.json")], run, why)
            for path in sorted(Path(results).glob("*.failed.json"))
            for run, why in files.read_json(path, "failed-runs list").items()]


if __name__ == "__main__":
    main()
