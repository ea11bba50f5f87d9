"""The tasks and their data: the paper's 21 (templates, Hub ids, official files, labels, metrics, the
paper's split sizes and column order) and the steering benchmark's toy tasks; a prepared task's
meta.json (`load_meta`); and from a split file to padded tensors: train.py's task (`load_task`),
tokenization (cached), the data order, padding.

prepare_data.py turns a task into data/<task>/ with it; train.py, the drivers and report.py read its
names, groups and metrics. Inputs are truncated on the right to max_length and end with `</s>` (the
T5 tokenizer appends it); a batch is padded to its own longest row, never to max_length; label
padding is -100 (no loss).
"""
import contextlib
import csv
import functools
import gzip
import hashlib
import json
import re
import shlex
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ept import cli, files, runtime


def pairs(*cols, label=lambda r: r["label"], idx="idx"):
    """Classification: source = `name: value` joined by spaces, target = str(label id)."""
    cols = [c if isinstance(c, tuple) else (c, c) for c in cols]  # (template name, Hub column)

    def convert(row, i):
        y = label(row)
        return {"source": " ".join(f"{name}: {row[col]}" for name, col in cols), "target": str(y),
                "label": y, "idx": row[idx] if idx else i}  # tasks without an id column: position
    return convert


def stsb(row, i):
    """The target: the score on the 0.1 grid, one decimal, as the public EPT code's
    `round_stsb_target` computes it, `np.round((label * 5) / 5, decimals=1)` (its docstring
    promises T5's 0.2 grid; the paper's STS-B numbers came from this expression: docs/paper.md)."""
    y = round(float(row["label"]), 5)  # the Hub stores float32: 3.8 -> 3.7999999523
    if not 0 <= y <= 5:
        raise ValueError(f"label {y} is outside the STS-B range 0..5")
    return {"source": f"sentence1: {row['sentence1']} sentence2: {row['sentence2']}",
            "target": f"{np.round((y * 5) / 5, decimals=1):.1f}", "label": y, "idx": row["idx"]}


def mark_span(text, span, index, mark):
    """T5's WSC marking: `mark span mark` around the span starting at word `index`."""
    return re.sub(rf"^((?:\S+\s){{{index}}})({re.escape(span)})", rf"\1{mark} \2 {mark}", text)


def wsc(row, i):
    text = mark_span(row["text"], row["span1_text"], row["span1_index"], "*")
    span2 = row["span2_index"] + 2 * (row["span1_index"] < row["span2_index"])  # the two '*' words
    text = mark_span(text, row["span2_text"], span2, "#")
    return {"source": f"text: {text}", "target": str(row["label"]), "label": row["label"],
            "idx": row["idx"]}


def multirc(row, i):
    q, a, p = (re.sub(r"</?b>", "", row[k].replace("<br>", " "))  # T5's MultiRC remove_markup
               for k in ("question", "answer", "paragraph"))
    return {"source": f"question: {q} answer: {a} paragraph: {p}", "target": str(row["label"]),
            "label": row["label"], "idx": row["idx"]["answer"],
            "question_id": row["idx"]["question"]}


@functools.cache
def _punctuation():
    """T5's [^_\\s\\p{N}\\p{L}\\p{M}] spelled out for Python's re (it has no \\p{..} classes)."""
    keep = lambda c: c == "_" or c.isspace() or unicodedata.category(c)[0] in "LNM"
    ranges, start = [], None
    for cp in range(sys.maxunicode + 2):
        pad = cp <= sys.maxunicode and not keep(chr(cp))
        if pad and start is None:
            start = cp
        elif not pad and start is not None:
            ranges.append(f"\\U{start:08x}-\\U{cp - 1:08x}")
            start = None
    return re.compile(f"([{''.join(ranges)}])")


def pad_punctuation(text):
    """T5's MRQA pad_punctuation: spaces around each punctuation character, whitespace collapsed."""
    return re.sub(r"\s+", " ", _punctuation().sub(r" \1 ", text)).strip()


def mrqa(row, i):
    answers = [pad_punctuation(a) for a in row["answers"]]
    return {"source": f"question: {pad_punctuation(row['question'])} "
                      f"context: {pad_punctuation(row['context'])}",
            "target": answers[0], "label": row["answers"][0], "idx": row["qid"], "answers": answers}


def label_of(mapping, value):
    if value not in mapping:
        raise ValueError(f"label {value!r} is not one of {', '.join(map(repr, mapping))}")
    return mapping[value]


ENTAIL = {"entailment": 0, "not_entailment": 1}
MNLI = {"entailment": 0, "neutral": 1, "contradiction": 2}
CB = {"entailment": 0, "contradiction": 1, "neutral": 2}
BOOL = {False: 0, True: 1}
SCITAIL = {"entailment": 0, "neutral": 1}


# --- official files -> Hub rows -------------------------------------------------------------------

def read(path, parse, fmt="json", names=None):
    """Parse `path` line by line (every official format here keeps one record per line) into Hub
    rows: parse(record, n) returns a list of rows, n = the record's position. fmt: json | tsv (read
    as HF does: tab, csv.QUOTE_NONE) | csv; names: columns of a header-less file."""
    rows, n = [], 0
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            if fmt == "json":
                rec = json.loads(line)
            else:
                tsv = fmt == "tsv"
                fields = next(csv.reader([line], delimiter="\t" if tsv else ",",
                                         quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL))
                if names is None:
                    names = fields  # header line
                    continue
                if len(fields) < len(names):
                    raise ValueError(f"{len(fields)} columns, expected {len(names)}")
                rec = dict(zip(names, fields))
            new = parse(rec, n)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, csv.Error) as e:
            raise cli.Failure(f"prepare_data: {path}:{lineno}: bad row "
                                 f"({type(e).__name__}: {e})") from None
        for row in new:
            row["_at"] = f"{path}:{lineno}"  # for error messages further down
        rows += new
        n += 1
    return rows


def _opener(path):
    return gzip.open if path.name.endswith(".gz") else open


def _lines(path):
    """(line number, text) of an official file, gzip or not. Bytes that are not UTF-8, a truncated
    .gz or an unreadable file are one sentence naming the file (and the line and byte)."""
    lineno = 0
    try:
        with _opener(path)(path, "rt", encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                yield lineno, line
    except UnicodeDecodeError:
        raise cli.Failure(f"prepare_data: {path}: {_first_bad_byte(path)} is not UTF-8; the "
                             "file is damaged or in another encoding: convert it to UTF-8 or fetch "
                             "it again") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; EOFError: a truncated .gz
        reason = "it is truncated" if isinstance(e, EOFError) else files.why(e)
        raise cli.Failure(f"prepare_data: cannot read {path} (after line {lineno}): {reason}; "
                             "fetch it again") from None


def _first_bad_byte(path):
    """'line L, byte B (0xXX)' of the first non-UTF-8 byte in `path` (B from the file's start)."""
    offset = 0
    with _opener(path)(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {lineno}, byte {offset + e.start} (0x{raw[e.start]:02x})"
            offset += len(raw)
    return "a byte"


def per_split(parse, fmt="json", names=None):
    """Reader for tasks with one train file and one labelled held-out file."""
    return lambda found: (read(found["train"], parse, fmt, names),
                          read(found["eval"], parse, fmt, names))


def by_suffix(**parsers):
    """Reader for files in two formats, told apart by suffix: {suffix: (parse, fmt, names)}."""
    one = lambda p: read(p, *parsers[p.suffix.lstrip(".")])
    return lambda found: (one(found["train"]), one(found["eval"]))


def read_mrpc(found):
    """As HF: train and validation from msr_paraphrase_train.txt; validation: dev_ids.tsv's."""
    dev = {(r["id1"], r["id2"])
           for r in read(found["dev_ids"], lambda r, n: [dict(r)], "tsv", ("id1", "id2"))}
    rows = read(found["train"], lambda r, n: [{
        "sentence1": r["#1 String"], "sentence2": r["#2 String"], "label": int(r["Quality"]),
        "idx": n, "dev": (r["#1 ID"], r["#2 ID"]) in dev}], "tsv")
    return [r for r in rows if not r["dev"]], [r for r in rows if r["dev"]]


def read_wsc(r, n):
    ex = {"text": r["text"],
          **{k: r["target"][k] for k in ("span1_index", "span2_index", "span1_text", "span2_text")}}
    return [{**fix_wst(ex), "idx": r["idx"], "label": label_of(BOOL, r["label"])}]


def fix_wst(ex):
    """HF super_glue `_fix_wst` (the wsc.fixed config): make span texts substrings of the text."""
    for k in ("span1", "span2"):
        text, index = ex[k + "_text"], ex[k + "_index"]
        if text in ex["text"] or text in ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin"):
            continue  # fine already, or not fixable (intervening words)
        if "theyscold" in text:
            ex["span2_index"] = 10  # as HF (its text.replace there is a no-op)
        first_word = ex["text"].split()[index]
        text = (text[0].lower() if first_word[0].islower() else text[0].upper()) + text[1:]
        ex[k + "_text"] = text.rstrip(".").replace("\n", " ")
    return ex


def read_multirc(r, n):
    """One row per answer option, flattened passage -> question -> answer in file order (as HF)."""
    return [{"paragraph": r["passage"]["text"], "question": q["question"], "answer": a["text"],
             "label": label_of(BOOL, bool(a["label"])),
             "idx": {"paragraph": r["idx"], "question": q["idx"], "answer": a["idx"]}}
            for q in r["passage"]["questions"] for a in q["answers"]]


def read_mrqa(r, n):
    if "header" in r:
        return []  # MRQA files open with {"header": {"dataset", "split"}}
    return [{"context": r["context"].strip(), "qid": qa["qid"], "question": qa["question"].strip(),
             "answers": qa["answers"]} for qa in r["qas"]]


def glue_row(*cols, label, col="label"):
    """GLUE tsv record -> Hub row: columns (Hub name, or (Hub name, tsv name)), label mapped, idx =
    row number (HF)."""
    cols = [c if isinstance(c, tuple) else (c, c) for c in cols]
    return lambda r, n: [{**{hub: r[raw] for hub, raw in cols}, "label": label(r[col]), "idx": n}]


def jsonl_row(*keys, label=None):
    """jsonl record -> Hub row: keys copied, the label mapped by `label` (when given)."""
    return lambda r, n: [{**{k: r[k] for k in keys},
                          **({"label": label(r["label"])} if label else {})}]


def superglue_rte(r, n):
    return [{"sentence1": r["premise"], "sentence2": r["hypothesis"],
             "label": label_of(ENTAIL, r["label"]), "idx": r["idx"]}]


# --- the registry ---------------------------------------------------------------------------------

@dataclass
class Task:
    name: str
    benchmark: str                     # glue | superglue | mrqa | others
    hub_id: str
    hub_config: str | None
    convert: Callable                  # (Hub row, position in its split) -> record
    read_local: Callable               # found files -> (train, held-out) rows in the Hub schema
    files: dict                        # role -> accepted file names, in one folder of --source
    labels: tuple | None = ("0", "1")  # target strings; None for open targets (STS-B, MRQA)
    metrics: tuple = ("acc",)          # every metric evaluate.py reports
    score: tuple = ()                  # the table score: mean of these (Table 1); default: metrics
    folder: str = ""                   # sub-folder of --source; default: the name
    eval_split: str = "validation"     # the labelled Hub split halved or made test (Appendix B.1)
    max_length: int = 256              # input tokens incl. </s>, before the prompt (Appendix B.2)
    subset: str | None = None          # MRQA: the `subset` value to keep

    def __post_init__(self):
        self.score, self.folder = self.score or self.metrics, self.folder or self.name


GLUE, SUPERGLUE = "nyu-mll/glue", "aps/super_glue"
# Table 5's "Type" column, in its caption's words: NLI natural language inference, coref.
# coreference resolution, common. commonsense, QA question answering, WSD word sense disambiguation.
TASK_TYPES = {"cola": "acceptability", "sst2": "sentiment", "mrpc": "paraphrase",
              "qqp": "paraphrase", "stsb": "sentence similarity", "mnli": "NLI", "qnli": "NLI",
              "rte": "NLI", "boolq": "QA", "cb": "NLI", "wic": "WSD", "wsc": "coref./common.",
              "multirc": "QA", "nq": "QA", "newsqa": "QA", "searchqa": "QA", "hotpotqa": "QA",
              "winogrande": "common.", "yelp": "sentiment", "scitail": "NLI", "paws": "paraphrase"}
GLUE_FILES = {"train": ("train.tsv",), "eval": ("dev.tsv",)}
SUPERGLUE_FILES = {"train": ("train.jsonl",), "eval": ("val.jsonl",)}
entail, boolean = functools.partial(label_of, ENTAIL), functools.partial(label_of, BOOL)
MRQA_SUBSETS = {"nq": "NaturalQuestionsShort", "hotpotqa": "HotpotQA", "searchqa": "SearchQA",
                "newsqa": "NewsQA"}

# MRPC, QQP: Table 1's header reads "Acc" (the score); F1 is still reported
_TASKS = [
    Task("cola", "glue", GLUE, "cola", pairs("sentence"),  # train/dev have no header
         per_split(glue_row("sentence", label=int), "tsv", ("code", "label", "mark", "sentence")),
         GLUE_FILES, metrics=("mcc",)),
    Task("mrpc", "glue", GLUE, "mrpc", pairs("sentence1", "sentence2"), read_mrpc,
         {"train": ("msr_paraphrase_train.txt",), "dev_ids": ("dev_ids.tsv",)},
         metrics=("acc", "f1"), score=("acc",)),
    Task("rte", "glue", GLUE, "rte", pairs("sentence1", "sentence2"),  # GLUE tsv or SuperGLUE jsonl
         by_suffix(tsv=(glue_row("sentence1", "sentence2", label=entail), "tsv"),
                   jsonl=(superglue_rte, "json")),
         {"train": ("train.tsv", "train.jsonl"), "eval": ("dev.tsv", "val.jsonl")}),
    Task("stsb", "glue", GLUE, "stsb", stsb,
         per_split(glue_row("sentence1", "sentence2", label=float, col="score"), "tsv"), GLUE_FILES,
         labels=None, metrics=("pearson", "spearman"), score=("pearson",)),
    Task("mnli", "glue", GLUE, "mnli", pairs("premise", "hypothesis"),
         per_split(glue_row(("premise", "sentence1"), ("hypothesis", "sentence2"),
                            label=functools.partial(label_of, MNLI), col="gold_label"), "tsv"),
         {"train": ("train.tsv",), "eval": ("dev_matched.tsv",)}, labels=("0", "1", "2"),
         eval_split="validation_matched"),
    Task("qnli", "glue", GLUE, "qnli", pairs("question", "sentence"),
         per_split(glue_row("question", "sentence", label=entail), "tsv"), GLUE_FILES),
    Task("qqp", "glue", GLUE, "qqp", pairs("question1", "question2"),
         per_split(glue_row("question1", "question2", label=int, col="is_duplicate"), "tsv"),
         GLUE_FILES, metrics=("acc", "f1"), score=("acc",)),
    Task("sst2", "glue", GLUE, "sst2", pairs("sentence"),
         per_split(glue_row("sentence", label=int), "tsv"), GLUE_FILES),
    Task("boolq", "superglue", SUPERGLUE, "boolq", pairs("question", "passage"),
         per_split(jsonl_row("question", "passage", "idx", label=boolean)), SUPERGLUE_FILES),
    Task("cb", "superglue", SUPERGLUE, "cb", pairs("premise", "hypothesis"),
         per_split(jsonl_row("premise", "hypothesis", "idx",
                             label=functools.partial(label_of, CB))),
         SUPERGLUE_FILES, labels=("0", "1", "2"), metrics=("acc", "macro_f1")),
    Task("wic", "superglue", SUPERGLUE, "wic", pairs("sentence1", "sentence2", "word"),
         per_split(jsonl_row("word", "sentence1", "sentence2", "start1", "start2", "end1", "end2",
                             "idx", label=boolean)), SUPERGLUE_FILES),
    Task("wsc", "superglue", SUPERGLUE, "wsc.fixed", wsc, per_split(read_wsc), SUPERGLUE_FILES),
    Task("multirc", "superglue", SUPERGLUE, "multirc", multirc, per_split(read_multirc),
         SUPERGLUE_FILES, metrics=("f1a", "em"), score=("f1a",), max_length=348),
    *(Task(name, "mrqa", "mrqa-workshop/mrqa", "plain_text", mrqa, per_split(read_mrqa),
           {"train": (f"train/{sub}.jsonl.gz", f"train/{sub}.jsonl"),
            "eval": (f"dev/{sub}.jsonl.gz", f"dev/{sub}.jsonl")},
           labels=None, metrics=("squad_f1", "squad_em"), score=("squad_f1",),
           folder=f"mrqa/{name}", max_length=512, subset=sub)
      for name, sub in MRQA_SUBSETS.items()),
    Task("winogrande", "others", "allenai/winogrande", "winogrande_xl",  # both options shown
         pairs("sentence", ("option0", "option1"), ("option1", "option2"),
               label=lambda r: label_of({"1": 0, "2": 1}, r["answer"]), idx=None),  # answer - 1
         per_split(jsonl_row("sentence", "option1", "option2", "answer")),
         {"train": ("train_xl.jsonl",), "eval": ("dev.jsonl",)}),
    Task("yelp", "others", "fancyzhx/yelp_polarity", "plain_text",
         pairs(("sentence", "text"), idx=None),
         per_split(lambda r, n: [{"text": r["text"].replace('"', '""').strip(),  # as HF: "" kept
                                  "label": label_of({"1": 0, "2": 1}, r["label"])}],
                   "csv", ("label", "text")),
         {"train": ("train.csv",), "eval": ("test.csv",)}, folder="yelp_polarity",
         eval_split="test"),
    Task("scitail", "others", "allenai/scitail", "snli_format",
         pairs(("premise", "sentence1"), ("hypothesis", "sentence2"),
               label=lambda r: label_of(SCITAIL, r["gold_label"]), idx=None),
         by_suffix(txt=(jsonl_row("sentence1", "sentence2", "gold_label"), "json"),
                   tsv=(lambda r, n: [{
                            "sentence1": r["premise"], "sentence2": r["hypothesis"],
                            "gold_label": label_of({"entails": "entailment", "neutral": "neutral"},
                                                   r["label"])}],
                        "tsv", ("premise", "hypothesis", "label"))),
         {"train": ("snli_format/scitail_1.0_train.txt", "tsv_format/scitail_1.0_train.tsv"),
          "eval": ("snli_format/scitail_1.0_dev.txt", "tsv_format/scitail_1.0_dev.tsv")}),
    Task("paws", "others", "google-research-datasets/paws", "labeled_final",
         pairs("sentence1", "sentence2", idx="id"),
         per_split(lambda r, n: [{"id": int(r["id"]), "sentence1": r["sentence1"],
                                  "sentence2": r["sentence2"], "label": int(r["label"])}], "tsv"),
         {"train": ("final/train.tsv",), "eval": ("final/dev.tsv",)}),
]
TASKS = {t.name: t for t in _TASKS}
# The split sizes (train, validation, test) Appendix B.1 gives (docs/paper.md), in the paper's
# column order (Tables 1 and 2: drivers and report follow it). The GPU-hour estimate uses them
# before a task is prepared; tests/test_prepare_data.py checks prepared files against its own copy.
PAPER_SPLITS = {"cola": (8551, 521, 522), "sst2": (66349, 1000, 872), "mrpc": (3668, 204, 204),
                "qqp": (353846, 10000, 40430), "stsb": (5749, 750, 750),
                "mnli": (382702, 10000, 9815), "qnli": (94743, 10000, 5463),
                "rte": (2490, 138, 139), "boolq": (9427, 1635, 1635), "cb": (250, 28, 28),
                "wic": (5428, 319, 319), "wsc": (554, 52, 52), "multirc": (26243, 1000, 4848),
                "nq": (94071, 10000, 12836), "newsqa": (73160, 1000, 4212),
                "searchqa": (107384, 10000, 16980), "hotpotqa": (71928, 1000, 5901),
                "winogrande": (39398, 1000, 1267), "yelp": (550000, 10000, 38000),
                "scitail": (22596, 1000, 1304), "paws": (48401, 1000, 8000)}
GROUPS = {b: [t.name for t in TASKS.values() if t.benchmark == b]
          for b in ("glue", "superglue", "mrqa", "others")}


# --- a prepared task: data/<task>/meta.json (prepare_data.py writes it) --------------------------
# what the later stages read from meta.json
META_KEYS = {"splits": dict, "labels": (list, type(None)), "metrics": list, "score": list,
             "max_length": int, "max_target_length": int}


# every metric evaluation.METRICS computes (a test holds the two equal)
METRIC_NAMES = ("acc", "f1", "macro_f1", "mcc", "pearson", "spearman", "f1a", "em", "squad_em",
                "squad_f1")


def load_meta(data_dir, task, strict=True):
    """data/<task>/meta.json, the one reader of it: strict, with the keys the later stages read
    (absent or wrong: one sentence naming the prepare_data command); else as it is ({} when not
    an object; None when absent: the report and the cost estimate read what is there)."""
    path = Path(data_dir) / task / "meta.json"
    if not path.exists() and not strict:
        return None
    if not path.exists() and not known(task):
        raise files.FileFault(f"unknown task {task!r} (no {path}); the tasks: {', '.join(TASKS)}; "
                              f"the steering benchmark's: {', '.join(STEER_TASKS)}")
    if not path.exists():
        raise files.FileFault(f"no {path}; run `{prepare_command(data_dir, [task])}` first")
    meta = files.read_json(path, "task description")
    meta = meta if isinstance(meta, dict) else {}
    if not strict:
        return meta
    bad = [k for k, kind in META_KEYS.items() if k not in meta or not isinstance(meta[k], kind)]
    bad += [k for k in ("max_length", "max_target_length") if k not in bad and meta[k] < 1]
    if not bad and not (meta["score"] and set(meta["score"]) <= set(meta["metrics"])):
        bad = ["score"]
    if bad:
        raise files.FileFault(f"the task description {path} has a missing or wrong "
                              f"{', '.join(bad)}; rebuild it with "
                              f"`{prepare_command(data_dir, [task], overwrite=True)}`")
    if unknown := [m for m in meta["metrics"] if m not in METRIC_NAMES]:  # an edited meta.json
        raise files.FileFault(f"{path} names unknown metrics {unknown}; known: "  # fails now, not
                              f"{', '.join(METRIC_NAMES)}. Rebuild the task with "  # after a run
                              f"`{prepare_command(data_dir, [task], overwrite=True)}`")
    return meta


def prepare_command(data_dir, names, fewshot=(), seeds=(), overwrite=False):
    """The prepare_data.py command, as one shell line, that prepares `names` into `data_dir` the
    way they were prepared: with the --tokenizer and --source folder their meta.json records (a
    task not prepared yet: those of one prepared beside it), so it runs as printed offline too;
    few-shot sets: each k of `fewshot` with each seed of `seeds`."""
    metas = [load_meta(data_dir, name, strict=False) for name in names]
    metas += [load_meta(data_dir, p.parent.name, strict=False)
              for p in sorted(Path(data_dir).glob("*/meta.json")) if p.parent.name not in names]
    steer = all(name in STEER_TASKS for name in names)  # their source is no other task's
    origin = next((m for m in metas if m and (m.get("benchmark") == "steer") == steer), {})
    words = ["python", "prepare_data.py", "--tasks", *names, "--out", str(data_dir)]
    if isinstance(origin.get("tokenizer"), str):
        words += ["--tokenizer", origin["tokenizer"]]
    if root := _source_root(origin):
        words += ["--source", root]
    if fewshot:
        words += ["--fewshot", *map(str, fewshot), "--fewshot-seeds", *map(str, seeds)]
    return shlex.join(words + ["--overwrite"] * overwrite)


def _source_root(meta):
    """The --source folder a task was prepared from: meta.json's source root, or (recorded before
    the root was) the folder above the task's sub-folder in its first file's path; None: the Hub."""
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    if source.get("kind") != "local" or source.get("root"):
        return source.get("root")
    task = TASKS.get(meta.get("task")) or STEER_TASKS.get(meta.get("task"))
    if not task or not source.get("files"):
        return None
    first = Path(str(source["files"][0]))
    return next((str(p) for p in first.parents if first.is_relative_to(p / task.folder)), None)

# --- the steering benchmark -----------------------------------------------------------------------
# Toy tasks over shipped sentences (assets/steer/sentences, written by
# scripts/build_backbone.py): a small backbone is trained on all of them, each selected by a prefix
# ("comma: <sentence>"), and does STEER_DEFAULT on a bare sentence. A steering task gives the bare
# sentence and asks for another task: a prompt has to learn to select it (docs/experiments.md, "The
# steering benchmark"). Not one of the paper's 21 tasks: not in TASKS.

# long: 8 words or more (a word: letters or digits between spaces); comma: contains a comma
STEER_RULES = {"long": lambda s: int(sum(any(c.isalnum() for c in w) for w in s.split()) >= 8),
               "comma": lambda s: int("," in s)}
STEER_DEFAULT = "long"  # what the backbone does without a prefix
STEER_SUCCESS = 90.0  # test accuracy (%) from which a run counts as steered (issue 27)
STEER_SEARCH_SEEDS = (0, 1, 2)  # their mean validation score chooses a method's lr
STEER_SOURCE = Path(__file__).resolve().parents[1] / "assets" / "steer"


def steer_row(rule):
    return lambda r, n: [{"sentence": r["sentence"].strip(),
                          "label": STEER_RULES[rule](r["sentence"]), "idx": n}]


def steer_record(row, i):
    return {"source": row["sentence"], "target": str(row["label"]), "label": row["label"],
            "idx": row["idx"]}


STEER_TASKS = {f"steer_{rule}": Task(f"steer_{rule}", "steer", "", None, steer_record,
                                     per_split(steer_row(rule), "tsv"), GLUE_FILES,
                                     folder="sentences")
               for rule in STEER_RULES if rule != STEER_DEFAULT}
TASK_TYPES.update({name: "steering (toy)" for name in STEER_TASKS})


def known(task):
    """One of the paper's 21 tasks or a steering task: prepare_data.py can prepare it."""
    return task in TASKS or task in STEER_TASKS


# --- the few-shot rule ----------------------------------------------------------------------------
# meta.json's "rule" of each few-shot set; absent: the old k per class. Table 3 (§5.2) is ambiguous
# ("k randomly selected samples, with the number of classes sampled consistently"): k in all is our
# reading, because the public EPT code takes k in total. STS-B follows the public code's GLUE class:
# a score <= 2.5 is class "0", else "1"; at most ceil(k/2) of each, first-come, from the training
# set shuffled by the seed (k in all).
FEWSHOT_RULE = "k in all, classes balanced"
STSB_FEWSHOT_RULE = "k in all, at most ceil(k/2) each of score <= 2.5 and > 2.5, first-come"


def fewshot_rule(task):
    return STSB_FEWSHOT_RULE if task == "stsb" else FEWSHOT_RULE


def old_fewshot_sets(meta):
    """The few-shot sets of a meta.json drawn with an older rule (k per class; STS-B: k from the
    whole split), not Table 3's."""
    sets = meta.get("fewshot") if isinstance(meta, dict) else None
    rule = fewshot_rule(meta.get("task") if isinstance(meta, dict) else None)
    return sorted(key for key, entry in (sets if isinstance(sets, dict) else {}).items()
                  if not isinstance(entry, dict) or entry.get("rule") != rule)


def old_fewshot_warning(data_dir, old):
    """One line for the few-shot sets drawn k per class, `old` = {task: [set keys]} under `data_dir`
    (None when there are none): what they are and the command that redraws them."""
    old = {task: keys for task, keys in old.items() if keys}
    if not old:
        return None
    named = [re.fullmatch(r"k(\d+)_seed(\d+)", key) for keys in old.values() for key in keys]
    ks, seeds = (sorted({int(m[i]) for m in named if m}) for i in (1, 2))
    command = prepare_command(data_dir, list(old), ks, seeds, overwrite=True)
    return (f"warning: the few-shot files of {', '.join(old)} in {data_dir} were drawn with an "
            "older rule, k examples per class (STS-B: k from the whole split), where we read "
            "Table 3 as k in all (the public EPT code takes k in total), classes balanced; "
            f"prepared files are rebuilt only with --overwrite: {command}")


# --- from a split file to padded tensors ----------------------------------------------------------

def encode(tokenizer, texts, max_length):
    """Token ids per text, truncated on the right, `</s>` appended by the T5 tokenizer."""
    if not texts:
        return []
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def pad(seqs, pad_value, length=None):
    """Right-pad id lists to their own longest (or `length`): (ids, mask) LongTensors."""
    length = max(length or 0, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), length), pad_value, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def collate(idx, source_ids, target_ids, pad_id, pad_to=(None, None)):
    """A training batch (input ids, mask, labels) padded to its own longest row (or to `pad_to`)."""
    input_ids, mask = pad([source_ids[i] for i in idx], pad_id, pad_to[0])
    labels, _ = pad([target_ids[i] for i in idx], -100, pad_to[1])
    return input_ids, mask, labels


# --- a split file, tokenized once -----------------------------------------------------------------

_TOKENIZED = {}  # (file, content, tokenizer, max_length) -> (source ids, target ids)


def _cache_rows(state, key):
    return [t.tolist() for t in torch.split(state[f"{key}_ids"], state[f"{key}_lengths"].tolist())]


def tokenize_file(path, tokenizer, max_length):
    """Token ids of a split's sources and targets, cached in memory and in <data>/<task>/cache/,
    keyed by content, tokenizer and max_length; a damaged cache file is rebuilt, never trusted."""
    path = Path(path)
    try:
        digest = hashlib.sha1(path.read_bytes()).hexdigest()[:12]
    except OSError:
        files.read_text(path, "split file")  # the one-sentence error
        raise
    key = (str(path.resolve()), digest, runtime.tokenizer_fingerprint(tokenizer), max_length)
    if key in _TOKENIZED:
        return _TOKENIZED[key]
    rows = files.read_jsonl(path, what="split file")
    cache = path.parent / "cache" / f"{path.stem}.{digest}.{key[2]}.L{max_length}.pt"
    ids = None
    if cache.exists():
        try:
            state = files.load_torch(cache, "tokenization cache")
            ids = (_cache_rows(state, "source"), _cache_rows(state, "target"))
            if any(len(seqs) != len(rows) for seqs in ids):
                ids = None
        except (cli.Failure, KeyError, RuntimeError, AttributeError, TypeError):
            ids = None
        if ids is None:
            print(f"batching: {cache} is damaged; tokenizing {path.name} again")
    if ids is None:
        ids = (encode(tokenizer, [r["source"] for r in rows], max_length),
               tokenizer([r["target"] for r in rows])["input_ids"] if rows else [])
        state = {f"{k}_{what}": torch.tensor([x for s in seqs for x in s] if what == "ids"
                                             else [len(s) for s in seqs], dtype=torch.int32)
                 for k, seqs in zip(("source", "target"), ids) for what in ("ids", "lengths")}
        with contextlib.suppress(OSError, cli.Failure):  # a read-only data folder: no disk cache
            cache.parent.mkdir(exist_ok=True)
            files.save_torch(cache, state)
    _TOKENIZED[key] = ids
    return ids


def load_split(path, tokenizer, max_length, limit=None):
    """(examples, source ids, target ids) of one split file, the first `limit` rows."""
    examples = files.read_jsonl(path, limit, what="split file")
    for number, row in enumerate(examples, 1):
        if not isinstance(row.get("source"), str) or not isinstance(row.get("target"), str):
            raise files.FileFault(f"{path}: row {number} lacks a 'source' or 'target' string; "
                                  "rebuild the task with prepare_data.py")
    source_ids, target_ids = tokenize_file(path, tokenizer, max_length)
    return examples, source_ids[:len(examples)], target_ids[:len(examples)]


def read_split(meta, name, path, tokenizer, max_length, limit=None):
    """load_split, then check_split: (examples, source ids, target ids) of a split that matches
    its meta.json."""
    examples, source_ids, target_ids = load_split(path, tokenizer, max_length, limit)
    check_split(meta, name, examples, path, limit is not None)
    return examples, source_ids, target_ids


def check_split(meta, name, examples, path, limited):
    """A split file must still match its meta.json (rows present, the row count unless `limited`,
    targets in the label set): an edited or half-copied split is one sentence, not a silent edit."""
    fix = "rebuild the task with prepare_data.py --overwrite"
    if not examples:
        why = "; the best checkpoint would be chosen by chance" if name == "validation" else ""
        raise files.FileFault(f"{path} holds no rows{why}: {fix}")
    sizes = meta.get("splits") if name in ("train", "validation", "test") else \
        {name: (meta.get("fewshot") or {}).get(name, {}).get("size")}
    expected = (sizes or {}).get(name)
    if not limited and expected is not None and expected != len(examples):
        raise files.FileFault(f"{path} has {len(examples)} rows but meta.json says {expected}; "
                              f"the data was edited or half-copied: {fix}")
    labels = meta.get("labels")
    bad = [e.get("target") for e in examples if labels and e.get("target") not in labels]
    if bad:
        raise files.FileFault(f"{path} has the target {bad[0]!r}, outside the task's labels "
                              f"{labels}: {fix}")


# --- orders ---------------------------------------------------------------------------------------

def epoch_order(n, seed, epoch, batch_size, lengths=None):
    """The example order of one epoch, a pure function of (seed, epoch): a resumed run sees the same
    data. With `lengths`, each shuffled mega-batch of 50 batches is sorted longest first (HF
    group_by_length)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    if lengths is None:
        return order
    mega = 50 * batch_size
    return np.concatenate([sorted(order[i:i + mega], key=lambda j: -lengths[j])
                           for i in range(0, n, mega)])


def batches_by_length(ids, batch_size, sort, token_budget=False):
    """Index batches of at most `batch_size` rows for decoding; `sort`: longest first, so each batch
    pads little. With `token_budget` a batch also closes before its rows x its longest row would
    pass batch_size x the median length, so the few long inputs come in smaller batches (never under
    a quarter of batch_size rows): that helps where time follows the tokens computed (a CPU), not
    the number of batches (a GPU), so callers use it off CUDA only (docs/speed.md measures it)."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i])) if sort else list(range(len(ids)))
    if not (sort and token_budget):
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    budget = batch_size * (sorted(map(len, ids))[len(ids) // 2] if ids else 0)
    min_rows = max(1, batch_size // 4)
    batches, batch = [], []
    for i in order:
        if len(batch) == batch_size or (len(batch) >= min_rows
                                        and (len(batch) + 1) * len(ids[batch[0]]) > budget):
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + [batch] if batch else batches


def label_ids(tokenizer, labels):
    """The distinct token ids of the label words, which `--init label` starts from (the bare '▁'
    piece of '▁', '0' dropped); None without a label set."""
    if not labels:
        return None
    ids = [i for seq in tokenizer(list(labels), add_special_tokens=False)["input_ids"] for i in seq
           if tokenizer.decode([i]).strip()]
    return list(dict.fromkeys(ids))


# --- train.py's task -----------------------------------------------------------------------------

@dataclass
class TaskData:
    """A task's data as train.py uses it: `data` = (train source ids, target ids, pad id); `val`,
    `test` = (examples, source ids) (test None with --no-test)."""
    tokenizer: object
    meta: dict
    train_file: Path
    data: tuple
    val: tuple
    test: tuple | None


def load_task(args, ranks, say):
    """The task's meta.json, tokenizer, training split (token ids) and validation split, checked.
    Rank 0 runs it first (ranks.first): the data is prepared before the other ranks read it."""
    tokenizer = runtime.load_tokenizer(args.tokenizer, say)
    if ranks.master:
        prepare_if_missing(args.data_dir, args.task, args.tokenizer, say, args.source)
    meta = load_meta(args.data_dir, args.task)
    if args.eval_mode == "rank" and not meta.get("labels"):
        raise cli.Failure(f"train: --eval-mode rank needs a label set; {args.task} has open "
                             "targets")
    args.max_length = args.max_length or meta["max_length"]
    folder = Path(args.data_dir) / args.task
    split = f"k{args.fewshot_k}_seed{args.fewshot_seed}" if args.fewshot_k else "train"
    train_file = folder / (f"train_{split}.jsonl" if args.fewshot_k else "train.jsonl")
    if not train_file.exists():
        raise cli.Failure(f"train: no {train_file}; prepare it with `" + prepare_command(
            args.data_dir, [args.task], [args.fewshot_k], [args.fewshot_seed], overwrite=True) + "`")
    limit, eval_limit = args.max_train_examples, args.max_eval_examples
    _, train_src, train_tgt = read_split(meta, split, train_file, tokenizer, args.max_length, limit)
    if args.fewshot_k and ranks.master:
        old = [split] if split in old_fewshot_sets(meta) else []
        if warning := old_fewshot_warning(args.data_dir, {args.task: old}):
            say(f"train: {warning}")
    val = read_split(meta, "validation", folder / "validation.jsonl", tokenizer, args.max_length,
                     eval_limit)[:2]
    test = None if args.no_test else read_split(  # checked now, not after training
        meta, "test", folder / "test.jsonl", tokenizer, args.max_length, eval_limit)[:2]
    return TaskData(tokenizer, meta, train_file, (train_src, train_tgt, tokenizer.pad_token_id), val,
                test)


def prepare_if_missing(data_dir, task, tokenizer, say, source=None):
    """data/<task>/ prepared on first use by the prepare_data.py stage, run as a command (stages
    link by files: train.py does not import prepare_data.py)."""
    folder = Path(data_dir) / task
    if (folder / "meta.json").exists():
        return
    if not known(task):
        raise cli.Failure(f"train: unknown task {task!r} and no {folder / 'meta.json'}; "
                             f"tasks: {', '.join(TASKS)}")
    command = ["--tasks", task, "--out", str(data_dir), "--tokenizer", tokenizer,
               *(["--source", source] if source else [])]
    say(f"train: {folder} is not prepared yet; preparing it now (python prepare_data.py "
        f"{' '.join(command)})", flush=True)
    script = Path(__file__).resolve().parents[1] / "prepare_data.py"
    if subprocess.run([sys.executable, str(script), *command]).returncode:
        raise cli.Failure(f"train: {folder} could not be prepared "
                             "(prepare_data.py said why above)")
