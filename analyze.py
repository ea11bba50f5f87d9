"""Analyses of trained runs for report.py (JSON): the paper's Figures 2/11, 3, 4, 10, Appendix A.1.

Reads the run folders listed in results/table1.jsonl and results/table2.jsonl (ablate.py; the main
runs at the paper's default lr, seed 0 unless --seed) and writes results/analysis/<name>.json:

    norms       Figures 2, 11  mu_t (Eq. 4) per step, validation score per eval; mean over seeds
    cosine      Figure 3       cosine similarity between the n rows of P' (prompt.pt)
    subset      Figure 4       row P'_i repeated l = 1..10 times, scored on test, no retraining
    transfer    Figure 10      cosine similarity between tasks' EPT* prompts, and task A's prompt
                               scored on task B (zero-shot) as a ratio of B's own score
    neighbours  Appendix A.1   nearest vocabulary tokens (cosine) of every distinct prompt row
    directions  Appendix A.1   P-Tuning's rows in two directions (spherical 2-means): each group's
                               cosine to the label words' embeddings, its test score alone

    python analyze.py all                                  # everything, t5-base runs
    python analyze.py norms --tasks boolq rte              # one analysis
    python analyze.py transfer --max-eval-examples 1000    # cap each zero-shot evaluation
    python analyze.py directions --tasks boolq rte         # A.1: P-Tuning's +/- prompts
    python analyze.py all --model tiny-t5 --results-dir smoke/results --data-dir smoke/data  # SMOKE

Analyses whose runs are missing are skipped with a message; report.py then notes the figure missing.
"""
import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import model as M
from ept import cli, files, outputs, runtime
from ept.tasks import TASKS

FIG2_TASKS = ["boolq", "rte"]
# GLUE 7 + WiC (Appendix C)
FIG11_TASKS = ["cola", "mrpc", "stsb", "mnli", "qnli", "qqp", "sst2", "wic"]
NORM_METHODS = ["pt", "resprompt", "ptuning"]  # Figures 2, 3, 4, 11
NEIGHBOUR_METHODS = ["pt", "resprompt", "ptuning", "ept", "ept_star"]
MAX_POINTS = 600  # mu_t is logged every step (30K): keep this many points per curve

parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
parser.add_argument("analysis", choices=("norms", "cosine", "subset", "transfer", "neighbours",
                                         "directions", "all"))
# data
parser.add_argument("--results-dir", default="results", help="where table1.jsonl / table2.jsonl "
                    "are; output goes to <results-dir>/analysis/")
parser.add_argument("--data-dir", help="data folder for evaluations (default: each run's)")
parser.add_argument("--tasks", nargs="+", type=cli.name,
                    help="tasks (default: the paper's per figure)")
# runs
parser.add_argument("--model", default="t5-base",
                    help="model tag of the runs (folder name for a local model)")
parser.add_argument("--methods", nargs="+", choices=M.METHODS,
                    help="methods (default: the paper's per figure)")
parser.add_argument("--seed", type=cli.nonnegative_int, default=0,
                    help="the run to analyse where one is needed")
# evaluation
parser.add_argument("--row", type=cli.nonnegative_int, default=0,
                    help="subset: which row P'_i to repeat")
parser.add_argument("--lengths", nargs="+", type=cli.positive_int, default=list(range(1, 11)),
                    help="subset: repeat counts l")
parser.add_argument("--max-eval-examples", type=cli.positive_int,
                    help="subset/transfer/directions: score the first N test rows")
parser.add_argument("--eval-batch-size", type=cli.positive_int, default=64,
                    help="examples per decoding batch")
parser.add_argument("--top-k", type=cli.positive_int, default=5,
                    help="neighbours: tokens per prompt row")


# --- run selection --------------------------------------------------------------------------------

ROW_KEYS = ("run", "task", "method", "seed", "model_tag", "lr")  # what a row needs to be analysed


def main_grid(results_dir):
    """Every result row of the main grid (results/table1.jsonl, table2.jsonl), checked."""
    rows = []
    for experiment in ("table1", "table2"):
        path = Path(results_dir) / f"{experiment}.jsonl"
        for number, row in enumerate(files.read_jsonl(path, what="results file", missing_ok=True,
                                                      fix=outputs.RESULTS_FIX), 1):
            missing = [k for k in ROW_KEYS if k not in row]
            if missing or row["method"] not in M.METHODS:
                raise files.FileFault(
                    f"the results file {path} is damaged: row {number} has no "
                    f"{', '.join(missing) or 'known method'}; delete that line and rerun "
                    f"`python ablate.py {experiment}` to write it again")
            rows.append(row)
    return rows


def pick(rows, task, method, seed=None):
    """Rows of (task, method), one seed or all; a run listed twice counts once."""
    return list({r["run"]: r for r in rows if r["task"] == task and r["method"] == method
                 and (seed is None or r["seed"] == seed)}.values())


def each_run(rows, tasks, methods, seed):
    """(task, method, row) of each run of `seed` to analyse, task by task."""
    for task in tasks:
        for method in methods:
            for row in pick(rows, task, method, seed):
                yield task, method, row


def load_prompt(row):
    return outputs.load_folded_prompt(Path(row["run"]) / "prompt.pt")[0]  # P' (n, d)


def scorer(data_dir=None, max_examples=None, batch_size=64):
    """score(run, ...): a run's test score with its own prompt or `prompt=`, on its task or `task=`,
    nothing written; the analyses that evaluate take one."""
    return lambda run, **kw: outputs.evaluate_run(
        run, split="test", data_dir=data_dir, max_examples=max_examples, batch_size=batch_size,
        write=False, quiet=True, **kw)["score"]


# --- Figures 2, 11: mu_t and validation score over steps ------------------------------------------

def _mean_by_step(series):
    """Mean over runs at each step that every run logged (a resumed run logs each step once)."""
    maps = [dict(zip(s, v)) for s, v in series if s]
    if not maps:
        return [], []
    common = sorted(set.intersection(*(set(m) for m in maps)))
    return common, [sum(m[s] for m in maps) / len(maps) for s in common]


def downsample(steps, values, max_points=MAX_POINTS):
    if len(steps) <= max_points:
        return steps, values
    stride = math.ceil(len(steps) / max_points)
    keep = sorted(set(range(0, len(steps), stride)) | {len(steps) - 1})  # always keep the last step
    return [steps[i] for i in keep], [values[i] for i in keep]


def norm_curves(rows, tasks, methods):
    out = {}
    for task in tasks:
        for method in methods:
            picked = pick(rows, task, method)
            if not picked:
                continue
            curves = [outputs.curves(r["run"]) for r in picked]
            steps, norms = downsample(*_mean_by_step([(c[0], c[1]) for c in curves]))
            eval_steps, scores = _mean_by_step([(c[2], c[3]) for c in curves])
            out.setdefault(task, {})[method] = {"step": steps, "prompt_norm": norms,
                                                "eval_step": eval_steps, "score": scores,
                                                "seeds": sorted(r["seed"] for r in picked)}
    return out


# --- Figures 3, 4, 10: the rows of P', one row broadcast, prompts across tasks --------------------

def cosine_matrix(prompt):
    """(n, n) cosine similarities between the rows of P' (n, d)."""
    unit = F.normalize(prompt.float(), dim=1)
    return unit @ unit.T


def prompt_cosines(rows, tasks, methods, seed):
    out = {}
    for task, method, row in each_run(rows, tasks, methods, seed):
        prompt = load_prompt(row)
        out.setdefault(task, {})[method] = {"cosine": cosine_matrix(prompt).tolist(),
                                            "norms": prompt.norm(dim=1).tolist(), "run": row["run"]}
    return out


def subset_broadcast(rows, tasks, methods, seed, row_index, lengths, score):
    out = {}
    for task, method, row in each_run(rows, tasks, methods, seed):
        prompt = load_prompt(row)
        single = prompt[row_index % prompt.size(0)]  # (d,)
        scores = [score(row["run"], prompt=single.expand(n, -1).clone()) for n in lengths]
        original = score(row["run"])  # whole P'
        out.setdefault(task, {})[method] = {"lengths": list(lengths), "score": scores,
                                            "original": original, "row": row_index,
                                            "row_norm": single.norm().item(), "run": row["run"]}
        print(f"analyze: subset {task} {method}: " + " ".join(f"{s:.1f}" for s in scores)
              + f" (full prompt {original:.1f})")
    return out


def task_transfer(rows, tasks, seed, score, method="ept_star"):
    """Cosine between tasks' EPT* rows (one each); score(A's prompt on B) / score(B's own)."""
    runs = {t: pick(rows, t, method, seed) for t in tasks}
    tasks = [t for t in tasks if runs[t]]
    if not tasks:
        return {}
    vectors = torch.stack([load_prompt(runs[t][0])[0] for t in tasks])
    # B's own score, on the same examples as the transfers to B
    own = {b: score(runs[b][0]["run"]) for b in tasks}
    scores, ratio = [], []
    for a in tasks:
        scores.append([own[b] if a == b else score(runs[a][0]["run"], task=b) for b in tasks])
        # undefined when B scores <= 0
        ratio.append([s / own[b] if own[b] and own[b] > 0 else None
                      for b, s in zip(tasks, scores[-1])])
        print(f"analyze: transfer from {a}: "
              + " ".join(f"{b}={s:.1f}" for b, s in zip(tasks, scores[-1])))
    return {"tasks": tasks, "method": method, "cosine": cosine_matrix(vectors).tolist(),
            "score": scores, "ratio": ratio, "own": [own[t] for t in tasks],
            "note": "row = prompt's task A, column = evaluated task B"}


# --- Appendix A.1: nearest vocabulary neighbours, P-Tuning's two directions -----------------------

def nearest_tokens(prompt, embedding, tokenizer, k=5):
    """Per row of P': the k tokens whose embeddings are nearest (cosine): [(token, cosine), ...]."""
    sims = F.normalize(prompt.float(), dim=1) @ F.normalize(embedding.float(), dim=1).T  # (n, V)
    sims = sims[:, :len(tokenizer)]  # T5 pads its embedding matrix beyond the vocabulary
    values, ids = sims.topk(min(k, sims.size(1)), dim=1)
    return [[(tokenizer.convert_ids_to_tokens(int(i)), round(float(v), 4)) for v, i in zip(vs, is_)]
            for vs, is_ in zip(values, ids)]


def frozen_embedding(run_dir, cache):
    """(run config, the frozen embedding matrix P' was trained against, its tokenizer), cached."""
    config = outputs.read_config(run_dir)
    key = (config["model"], config["random_init"],
           config["seed"] if config["random_init"] else None)
    if key not in cache:
        t5 = runtime.load_t5(config["model"], random_init=config["random_init"],
                                seed=config["seed"], fix=outputs.RUN_FIX)
        tokenizer = runtime.load_tokenizer(config["tokenizer"], fix=outputs.RUN_FIX)
        cache[key] = (t5.get_input_embeddings().weight.detach(), tokenizer)
    return (config, *cache[key])


def neighbours(rows, tasks, methods, seed, k=5):
    out, cache = {}, {}
    for task, method, row in each_run(rows, tasks, methods, seed):
        config, embedding, tokenizer = frozen_embedding(row["run"], cache)
        prompt = load_prompt(row)
        distinct = (prompt.unique(dim=0)
                    if prompt.size(0) > 1 and method in ("ept", "ept_star") else prompt)
        nearest = nearest_tokens(distinct, embedding, tokenizer, k)
        out.setdefault(task, {})[method] = {
            "rows": [{"row": i, "norm": p.norm().item(), "neighbours": nb}
                     for i, (p, nb) in enumerate(zip(distinct, nearest))],
            "labels": (config.get("meta") or {}).get("labels"), "run": row["run"],
            "random_init": config["random_init"]}
    return out


# "In P-Tuning ... two distinct directions of prompt vectors were identified: one closely aligned
# with output labels (positive prompts contribute significantly to performance) and the other not
# closely aligned with output labels (negative prompts do not contribute to performance)."
def two_directions(prompt, iterations=100):
    """Group the rows of P' (n, d) by direction: spherical 2-means (k-means on unit vectors,
    cosine), started from the two least similar rows. -> [0 or 1 per row]; all 0 when every row
    points the same way.

    Two clusters rather than the sign of each row's cosine to the mean row: with two groups of equal
    size and opposite directions the mean row is ~0 and its sign arbitrary; the clusters do not
    depend on it."""
    unit = F.normalize(prompt.float(), dim=1)
    n = unit.size(0)
    sim = unit @ unit.T
    i, j = divmod(int(sim.argmin()), n)
    if n < 2 or sim[i, j] > 1 - 1e-6:  # one row, or all rows parallel: a single direction
        return [0] * n
    centres, assign = unit[[i, j]], None
    for _ in range(iterations):
        new = (unit @ centres.T).argmax(dim=1)  # (n,) nearest centre by cosine
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        centres = torch.stack([F.normalize(unit[assign == k].sum(0), dim=0)
                               if (assign == k).any() else centres[k] for k in range(2)])
    return assign.tolist()


def label_vectors(labels, embedding, tokenizer):
    """A vector per label word: its pieces' mean embedding, bare '▁' dropped (as --init label)."""
    pieces = {label: [i for i in tokenizer(label, add_special_tokens=False)["input_ids"]
                      if tokenizer.decode([i]).strip()] for label in labels}
    return {label: embedding[torch.tensor(ids)].float().mean(0)  # (d,)
            for label, ids in pieces.items() if ids}


def prompt_directions(rows, tasks, methods, seed, score):
    """Per run: the two direction groups of P', each group's cosine to the label words, the test
    score of the whole prompt and of each group alone (its rows in order, no retraining). The group
    closer to the label words (mean over its rows of the best label cosine) is "positive"."""
    out, cache = {}, {}
    for task, method, row in each_run(rows, tasks, methods, seed):
        config, embedding, tokenizer = frozen_embedding(row["run"], cache)
        labels = (config.get("meta") or {}).get("labels")
        if not labels:
            print(f"analyze: directions {task}: no label words (open targets); skipped")
            continue
        prompt = load_prompt(row)
        vectors = label_vectors(labels, embedding, tokenizer)
        unit = F.normalize(prompt.float(), dim=1)
        label_cos = {lab: (unit @ F.normalize(v, dim=0)).tolist() for lab, v in vectors.items()}
        best_cos = [max(label_cos[lab][r] for lab in label_cos) for r in range(prompt.size(0))]
        assign = two_directions(prompt)
        groups = []
        for k in sorted(set(assign)):
            idx = [r for r, a in enumerate(assign) if a == k]
            groups.append({"rows": idx, "label_cosine": {lab: sum(c[r] for r in idx) / len(idx)
                                                         for lab, c in label_cos.items()},
                           "label_cosine_max": sum(best_cos[r] for r in idx) / len(idx),
                           "within_cosine": (unit[idx] @ unit[idx].T).mean().item(),
                           "norm": prompt[idx].norm(dim=1).mean().item(),
                           "score": score(row["run"], prompt=prompt[idx].clone())})
        groups.sort(key=lambda g: -g["label_cosine_max"])
        for g, name in zip(groups, ("positive", "negative")):
            g["name"] = name if len(groups) == 2 else "all rows (one direction)"
        between = ((unit[groups[0]["rows"]] @ unit[groups[1]["rows"]].T).mean().item()
                   if len(groups) == 2 else None)
        full = score(row["run"], prompt=prompt.clone())
        out.setdefault(task, {})[method] = {
            "groups": groups, "full_score": full, "between_cosine": between,
            "row_label_cosine": best_cos, "row_norm": prompt.norm(dim=1).tolist(),
            "assign": assign, "labels": list(vectors),
            "method": "spherical 2-means (cosine), started from the least similar rows",
            "run": row["run"], "random_init": config["random_init"]}
        print(f"analyze: directions {task} {method}: full {full:.1f}; "
              + "; ".join(f"{g['name']} rows {g['rows']} label cos {g['label_cosine_max']:.2f} "
                          f"score {g['score']:.1f}" for g in groups))
    return out


# --- command line ---------------------------------------------------------------------------------

@cli.script
def main(argv=None):
    args = parser.parse_args(argv)
    if not Path(args.results_dir).is_dir():
        raise cli.Failure(f"analyze: no results folder {args.results_dir}; "
                             "run ablate.py first or pass --results-dir")
    grid = main_grid(args.results_dir)
    # the main runs: the paper's default lr, one model tag
    rows = [r for r in grid if r["model_tag"] == args.model
            and r["lr"] == M.DEFAULTS["lr"][r["method"]]]
    if not rows:
        tags = sorted({r["model_tag"] for r in grid})
        raise cli.Failure(f"analyze: no main-grid rows for model {args.model!r} in "
                             f"{args.results_dir}/table1.jsonl, table2.jsonl; "
                             + (f"the rows there are for {', '.join(tags)}: pass --model" if tags
                                else "run `python ablate.py table1` (or table2) first"))
    tasks, methods, seed = args.tasks, args.methods, args.seed
    score = scorer(args.data_dir, args.max_eval_examples, args.eval_batch_size)
    analyses = {  # each with the paper's tasks and methods unless --tasks / --methods
        "norms": lambda: norm_curves(rows, tasks or FIG2_TASKS + FIG11_TASKS,
                                     methods or NORM_METHODS),
        "cosine": lambda: prompt_cosines(rows, tasks or ["boolq"],
                                         methods or NORM_METHODS + ["ept_star"], seed),
        "subset": lambda: subset_broadcast(rows, tasks or FIG2_TASKS, methods or NORM_METHODS,
                                           seed, args.row, args.lengths, score),
        "transfer": lambda: task_transfer(rows, tasks or list(TASKS), seed, score),
        "neighbours": lambda: neighbours(rows, tasks or ["boolq"], methods or NEIGHBOUR_METHODS,
                                         seed, args.top_k),
        "directions": lambda: prompt_directions(rows, tasks or ["boolq"], methods or ["ptuning"],
                                                seed, score)}
    todo = list(analyses) if args.analysis == "all" else [args.analysis]
    written = {}
    # every analysis computed first, then all written: a failure leaves the old files as they were
    for name in todo:
        result = analyses[name]()
        if not result:
            print(f"analyze: {name}: no finished runs for it among {args.model!r} rows; skipped")
            continue
        written[name] = result
    for name, result in written.items():
        path = Path(args.results_dir) / "analysis" / f"{name}.json"
        files.make_dir(path.parent, "analysis folder")
        files.write_json(path, {"model": args.model, "seed": args.seed, name: result})
        print(f"analyze: wrote {path}")
    return written


if __name__ == "__main__":
    main()
