"""Turn the 21 tasks of the EPT paper into text-to-text JSONL files with the paper's splits.

Reads the Hugging Face Hub datasets of docs/paper.md ("Tasks"), or, with `--source DIR`, a folder of
the official files (one sub-folder per task, named in docs/data.md). Writes, per task:

    data/<task>/train.jsonl, validation.jsonl, test.jsonl   {"source", "target", "label", "idx"}
    data/<task>/train_k{K}_seed{S}.jsonl                    few-shot sets (Table 3), with --fewshot
    data/<task>/meta.json                                   origin, sizes, labels, metrics, lengths

Splits follow Appendix B.1 from a fixed data seed (separate from the training seed). A task whose
meta.json exists is skipped unless --overwrite; a failed run leaves it untouched.

    python prepare_data.py --tasks rte cb                      # from the Hub
    python prepare_data.py --tasks all --source raw/ --tokenizer t5-base
    python prepare_data.py --tasks superglue glue --fewshot 4 16 32 --fewshot-seeds 0 1 2 3 4 5
    python prepare_data.py --source tests/fixtures/raw --tasks all --out smoke/data   # CPU smoke
"""
import argparse
import csv
import functools
import gzip
import hashlib
import json
import math
import random
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from ept import cli, files, outputs, tasks

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=cli.HelpFormatter)
g = parser.add_argument_group("data")
g.add_argument("--tasks", nargs="+", default=["all"],
               help="task names, group names (glue, superglue, mrqa, others) or 'all'")
g.add_argument("--source", default=None, metavar="DIR", help="folder of official files, one "
               "sub-folder per task (docs/data.md); default: the Hub")
g.add_argument("--data-seed", type=cli.nonnegative_int, default=42,
               help="seed of the validation/test draws (Appendix B.1)")
g.add_argument("--tokenizer", default="t5-base", metavar="NAME_OR_DIR",
               help="T5 tokenizer for token-length statistics and max_target_length")
g = parser.add_argument_group("few-shot (Table 3)")
g.add_argument("--fewshot", nargs="*", type=cli.positive_int, default=[], metavar="K",
               help="examples in all, the classes balanced (Table 3); none by default")
g.add_argument("--fewshot-seeds", nargs="+", type=cli.nonnegative_int, default=[0, 1, 2, 3, 4, 5],
               metavar="S", help="one few-shot set per seed and K")
g = parser.add_argument_group("output")
g.add_argument("--out", default="data", help="output folder; one sub-folder per task")
g.add_argument("--overwrite", action="store_true",
               help="rebuild tasks that already have a meta.json")


# --- the tasks (tasks.TASKS, tasks.STEER_TASKS): what meta.json records of each ------------------

@dataclass
class Task:
    name: str
    hub_config: str | None
    type: str                          # Table 5's "Type" column
    labels: tuple | None = ("0", "1")  # target strings; None for open targets (STS-B, MRQA)
    metrics: tuple = ("acc",)          # every metric evaluate.py reports
    score: tuple = ()                  # the table score: mean of these (Table 1); default: metrics
    folder: str = ""                   # sub-folder of --source; default: the name
    eval_split: str = "validation"     # the labelled Hub split halved or made test (Appendix B.1)
    max_length: int = 256              # input tokens incl. </s>, before the prompt (Appendix B.2)
    subset: str | None = None          # MRQA: the `subset` value to keep

    def __post_init__(self):
        self.score, self.folder = self.score or self.metrics, self.folder or self.name
        self.hub_id = tasks.TASKS.get(self.name, "")
        self.benchmark = next((b for b, names in tasks.GROUPS.items() if self.name in names),
                              "steer")


ACC_F1 = dict(metrics=("acc", "f1"), score=("acc",))
# In tasks.TASKS's order, types in Table 5's words (coref. coreference, common. commonsense, WSD
# word sense disambiguation). MRPC, QQP: Table 1's header reads "Acc" (the score); F1 is reported.
TASKS = {t.name: t for t in [
    Task("cola", "cola", "acceptability", metrics=("mcc",)),
    Task("mrpc", "mrpc", "paraphrase", **ACC_F1),
    Task("rte", "rte", "NLI"),
    Task("stsb", "stsb", "sentence similarity", labels=None, metrics=("pearson", "spearman"),
         score=("pearson",)),
    Task("mnli", "mnli", "NLI", labels=("0", "1", "2"), eval_split="validation_matched"),
    Task("qnli", "qnli", "NLI"),
    Task("qqp", "qqp", "paraphrase", **ACC_F1),
    Task("sst2", "sst2", "sentiment"),
    Task("boolq", "boolq", "QA"),
    Task("cb", "cb", "NLI", labels=("0", "1", "2"), metrics=("acc", "macro_f1")),
    Task("wic", "wic", "WSD"),
    Task("wsc", "wsc.fixed", "coref./common."),
    Task("multirc", "multirc", "QA", metrics=("f1a", "em"), score=("f1a",), max_length=348),
    *(Task(name, "plain_text", "QA", labels=None, metrics=("squad_f1", "squad_em"),
           score=("squad_f1",), folder=f"mrqa/{name}", max_length=512, subset=subset)
      for name, subset in (("nq", "NaturalQuestionsShort"), ("hotpotqa", "HotpotQA"),
                           ("searchqa", "SearchQA"), ("newsqa", "NewsQA"))),
    Task("winogrande", "winogrande_xl", "common."),
    Task("yelp", "plain_text", "sentiment", folder="yelp_polarity", eval_split="test"),
    Task("scitail", "snli_format", "NLI"),
    Task("paws", "labeled_final", "paraphrase"),
    *(Task(name, None, "steering (toy)", folder="sentences") for name in tasks.STEER_TASKS)]}

# The steering benchmark (docs/experiments.md): a small backbone trained on the shipped sentences
# does each rule after its prefix ("comma: <sentence>") and STEER_DEFAULT on a bare sentence: a
# prompt must select another (tasks.STEER_TASKS, a test holds them equal). long: 8 words or more
# (a word: letters or digits between spaces); comma: has a comma
STEER_RULES = {"long": lambda s: int(sum(any(c.isalnum() for c in w) for w in s.split()) >= 8),
               "comma": lambda s: int("," in s)}
STEER_DEFAULT = "long"  # what the backbone does without a prefix
STEER_SOURCE = Path(__file__).resolve().parent / "assets" / "steer"


# --- templates: a Hub row -> a record {source, target, label, idx} -------------------------------

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


def hub_row(*cols, label=None, col="label", number=False):
    """A record -> a Hub row: columns (Hub name, or (Hub name, file name)) copied, the label mapped
    by `label` from column `col`, and with `number` idx = the record's position (HF's GLUE)."""
    cols = [c if isinstance(c, tuple) else (c, c) for c in cols]
    return lambda r, n: [{**{hub: r[raw] for hub, raw in cols},
                          **({"label": label(r[col])} if label else {}),
                          **({"idx": n} if number else {})}]


def glue(*cols, label=int, col="label", names=None):
    """Reader of a GLUE task's train and dev tsv files."""
    return per_split(hub_row(*cols, label=label, col=col, number=True), "tsv", names)


# --- the registry's recipes: how each task's data is read and turned into records -----------------

class Recipe(NamedTuple):
    convert: Callable  # (Hub row, position in its split) -> record
    read: Callable     # found files -> (train, held-out) rows in the Hub schema
    files: dict        # role -> accepted file names, in the task's folder of --source


GLUE_FILES = {"train": ("train.tsv",), "eval": ("dev.tsv",)}
SUPERGLUE_FILES = {"train": ("train.jsonl",), "eval": ("val.jsonl",)}
entail, boolean = functools.partial(label_of, ENTAIL), functools.partial(label_of, BOOL)


def steer_row(rule):
    return lambda r, n: [{"sentence": r["sentence"].strip(),
                          "label": STEER_RULES[rule](r["sentence"]), "idx": n}]


def steer_record(row, i):
    return {"source": row["sentence"], "target": str(row["label"]), "label": row["label"],
            "idx": row["idx"]}


# one per task of TASKS, in its order (a test holds them equal)
RECIPES = {
    "cola": Recipe(pairs("sentence"),  # train/dev have no header
                   glue("sentence", names=("code", "label", "mark", "sentence")), GLUE_FILES),
    "mrpc": Recipe(pairs("sentence1", "sentence2"), read_mrpc,
                   {"train": ("msr_paraphrase_train.txt",), "dev_ids": ("dev_ids.tsv",)}),
    "rte": Recipe(pairs("sentence1", "sentence2"),  # GLUE tsv or SuperGLUE jsonl
                  by_suffix(tsv=(hub_row("sentence1", "sentence2", label=entail, number=True),
                                 "tsv"),
                            jsonl=(hub_row(("sentence1", "premise"), ("sentence2", "hypothesis"),
                                           "idx", label=entail), "json")),
                  {"train": ("train.tsv", "train.jsonl"), "eval": ("dev.tsv", "val.jsonl")}),
    "stsb": Recipe(stsb, glue("sentence1", "sentence2", label=float, col="score"), GLUE_FILES),
    "mnli": Recipe(pairs("premise", "hypothesis"),
                   glue(("premise", "sentence1"), ("hypothesis", "sentence2"),
                        label=functools.partial(label_of, MNLI), col="gold_label"),
                   {"train": ("train.tsv",), "eval": ("dev_matched.tsv",)}),
    "qnli": Recipe(pairs("question", "sentence"), glue("question", "sentence", label=entail),
                   GLUE_FILES),
    "qqp": Recipe(pairs("question1", "question2"),
                  glue("question1", "question2", col="is_duplicate"), GLUE_FILES),
    "sst2": Recipe(pairs("sentence"), glue("sentence"), GLUE_FILES),
    "boolq": Recipe(pairs("question", "passage"),
                    per_split(hub_row("question", "passage", "idx", label=boolean)),
                    SUPERGLUE_FILES),
    "cb": Recipe(pairs("premise", "hypothesis"),
                 per_split(hub_row("premise", "hypothesis", "idx",
                                   label=functools.partial(label_of, CB))), SUPERGLUE_FILES),
    "wic": Recipe(pairs("sentence1", "sentence2", "word"),
                  per_split(hub_row("word", "sentence1", "sentence2", "start1", "start2", "end1",
                                    "end2", "idx", label=boolean)), SUPERGLUE_FILES),
    "wsc": Recipe(wsc, per_split(read_wsc), SUPERGLUE_FILES),
    "multirc": Recipe(multirc, per_split(read_multirc), SUPERGLUE_FILES),
    **{name: Recipe(mrqa, per_split(read_mrqa),
                    {"train": (f"train/{sub}.jsonl.gz", f"train/{sub}.jsonl"),
                     "eval": (f"dev/{sub}.jsonl.gz", f"dev/{sub}.jsonl")})
       for name, sub in ((t.name, t.subset) for t in TASKS.values() if t.subset)},
    "winogrande": Recipe(pairs("sentence", ("option0", "option1"), ("option1", "option2"),
                               label=lambda r: label_of({"1": 0, "2": 1}, r["answer"]),  # - 1
                               idx=None),  # both options shown
                         per_split(hub_row("sentence", "option1", "option2", "answer")),
                         {"train": ("train_xl.jsonl",), "eval": ("dev.jsonl",)}),
    "yelp": Recipe(pairs(("sentence", "text"), idx=None),
                   per_split(lambda r, n: [{"text": r["text"].replace('"', '""').strip(),  # as HF
                                            "label": label_of({"1": 0, "2": 1}, r["label"])}],
                             "csv", ("label", "text")),
                   {"train": ("train.csv",), "eval": ("test.csv",)}),
    "scitail": Recipe(
        pairs(("premise", "sentence1"), ("hypothesis", "sentence2"),
              label=lambda r: label_of(SCITAIL, r["gold_label"]), idx=None),
        by_suffix(txt=(hub_row("sentence1", "sentence2", "gold_label"), "json"),
                  tsv=(lambda r, n: [{"sentence1": r["premise"], "sentence2": r["hypothesis"],
                                      "gold_label": label_of({"entails": "entailment",
                                                              "neutral": "neutral"}, r["label"])}],
                       "tsv", ("premise", "hypothesis", "label"))),
        {"train": ("snli_format/scitail_1.0_train.txt", "tsv_format/scitail_1.0_train.tsv"),
         "eval": ("snli_format/scitail_1.0_dev.txt", "tsv_format/scitail_1.0_dev.tsv")}),
    "paws": Recipe(pairs("sentence1", "sentence2", idx="id"),
                   per_split(lambda r, n: [{"id": int(r["id"]), "sentence1": r["sentence1"],
                                            "sentence2": r["sentence2"], "label": int(r["label"])}],
                             "tsv"),
                   {"train": ("final/train.tsv",), "eval": ("final/dev.tsv",)}),
    **{name: Recipe(steer_record, per_split(steer_row(name.removeprefix("steer_")), "tsv"),
                    GLUE_FILES) for name in tasks.STEER_TASKS},
}


# --- loading --------------------------------------------------------------------------------------

# LM-BFF's k-shot/<TASK>/16-42/, ...
SAMPLE_FOLDER = re.compile(r"(?i)(k-?shot|few-?shot|\d+-shot|^\d+-\d+$)")


def find_files(task, root):
    """The first folder (shallowest first) under root/<task folder> with one accepted file per role.
    Few-shot sample folders (k-shot-16-42/, 16-42/) and several candidates at one depth are refused:
    they are subsets, not the official distribution (a train split of a few dozen rows)."""
    folder, accepted = root / task.folder, RECIPES[task.name].files
    need = " + ".join(" or ".join(names) for names in accepted.values())
    if not folder.is_dir():
        raise cli.Failure(f"prepare_data: {task.name}: missing folder {folder} "
                          f"(expected {need} in it; see docs/data.md)")
    candidates = []
    for d in sorted([folder, *(p for p in folder.rglob("*") if p.is_dir())],
                    key=lambda p: (len(p.parts), str(p))):
        found = {role: next((d / f for f in names if (d / f).is_file()), None)
                 for role, names in accepted.items()}
        if all(found.values()) and (not candidates or len(d.parts) == len(candidates[0][0].parts)):
            candidates.append((d, found))
    if candidates:
        samples = [c for c, _ in candidates
                   if any(SAMPLE_FOLDER.search(part) for part in c.relative_to(root).parts)]
        if len(candidates) > 1 or samples:
            names = (", ".join(str(c.relative_to(folder)) for c, _ in candidates[:4])
                     + (", ..." if len(candidates) > 4 else ""))
            raise cli.Failure(f"prepare_data: {task.name}: found {need} in "
                              f"{'few-shot sample' if samples else 'several'} folders under "
                              f"{folder} ({names}), expected the official full distribution in "
                              "one folder; pass --source DIR with the official files "
                              "(docs/data.md)")
        return candidates[0][1]
    absent = [names for names in accepted.values()
              if not any(any(folder.rglob(Path(f).name)) for f in names)]
    what = f"missing {' or '.join(absent[0])}" if absent else "no one folder holds all of the files"
    raise cli.Failure(f"prepare_data: {task.name}: {what} under {folder} "
                      f"(expected {need}; see docs/data.md)")


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_local(task, root):
    found = find_files(task, root)
    print(f"{task.name}: local files {', '.join(map(str, found.values()))}")
    train, held = RECIPES[task.name].read(found)
    source = {"kind": "local", "hub_id": task.hub_id, "config": task.hub_config, "revision": None,
              "commit": None, "root": str(Path(root).resolve()),  # --source, for prepare_command
              "files": [str(p) for p in found.values()],
              "sha256": {str(p): sha256(p) for p in found.values()}}
    return train, held, source


def hub_commit(hub_id, revision):
    """The commit the revision resolves to, for meta.json (None when it cannot be asked)."""
    try:
        import huggingface_hub
        return huggingface_hub.HfApi().dataset_info(hub_id, revision=revision).sha
    except Exception:
        return None


def load_hub(task):
    from ept import runtime
    import datasets
    print(f"{task.name}: loading {task.hub_id} ({task.hub_config}) from the Hugging Face Hub")

    def load():  # datasets >= 4 refuses a repo with a loading script: then its parquet conversion
        for revision, kwargs in (("main", {"name": task.hub_config}),
                                 ("refs/convert/parquet", {"data_dir": task.hub_config})):
            try:
                return datasets.load_dataset(task.hub_id, revision=revision, **kwargs), revision
            except Exception as e:  # no network (ConnectionError): the fallback would fail alike
                if isinstance(e, ConnectionError) or revision != "main":
                    raise
    # a failure: runtime's sentence, why and --source DIR (the official files, docs/data.md)
    ds, revision = runtime.load("dataset", f"{task.hub_id} ({task.hub_config})", load)
    splits = [ds["train"], ds[task.eval_split]]
    if task.subset:  # MRQA: one dataset holds all subsets
        splits = [s.filter(lambda v: v == task.subset, input_columns="subset") for s in splits]
    source = {"kind": "hub", "hub_id": task.hub_id, "config": task.hub_config, "revision": revision,
              "commit": hub_commit(task.hub_id, revision), "files": [], "sha256": {}}
    return splits[0].to_list(), splits[1].to_list(), source


# --- records, splits, few-shot --------------------------------------------------------------------

BAR_ROWS = 20000  # fewer rows take well under a few seconds: no progress bar


def progress(items, desc, unit="rows", rows=None):
    """`items` with a progress bar on stderr when they are many rows (TQDM_DISABLE=1: none)."""
    from tqdm import tqdm
    many = (len(items) if rows is None else rows) >= BAR_ROWS
    return tqdm(items, desc=desc, unit=unit, dynamic_ncols=True, leave=False) if many else items


def to_records(task, rows, where):
    """The one path from Hub-schema rows (either source) to records; a bad row names its origin."""
    records = []
    for i, row in enumerate(progress(rows, f"{task.name}: {where}")):
        try:
            rec = RECIPES[task.name].convert(row, i)
            if task.labels and rec["target"] not in task.labels:
                raise ValueError(f"label {rec['label']!r} is outside the label set "
                                 f"{', '.join(task.labels)}")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            at = row.get("_at", f"{where} row {i}")  # file:line for local rows
            raise cli.Failure(f"prepare_data: {task.name}: {at}: bad row "
                              f"({type(e).__name__}: {e})") from None
        records.append(rec)
    return records


def draw(records, n, rng):
    """Shuffle and cut: (about n records, the rest). MultiRC draws whole questions (all answers)."""
    groups = {}
    for i, r in enumerate(records):
        groups.setdefault(r.get("question_id", i), []).append(r)
    keys = list(groups)
    rng.shuffle(keys)
    drawn, rest = [], []
    for k in keys:
        (drawn if len(drawn) < n else rest).extend(groups[k])
    return drawn, rest


def split(train, held, seed):
    """Appendix B.1: (train, validation, test) from the original train and labelled held-out split.
    Small tasks: the original validation, shuffled and halved, gives validation and test; larger
    ones: validation is drawn from train and test = the original validation."""
    rng = random.Random(seed)
    if len(train) < 10_000:
        return (train, *draw(held, len(held) // 2, rng))
    validation, train = draw(train, 1_000 if len(train) < 100_000 else 10_000, rng)
    return train, validation, held


def fewshot(task, train, k, seed):
    """Table 3 (§5.2): k examples in all from the train split, classes balanced, fixed per seed.
    Each class gets k // C rows; the k % C left over go one each to the first classes of an order
    the seed shuffles (so over the seeds no class is favoured). A class with too few rows gives all
    it has and its share passes on round-robin to the others. STS-B: the public EPT code's rule
    (`stsb_fewshot`). MRQA (open targets): k drawn from the whole split."""
    rng = random.Random(seed)
    if task.name == "stsb":
        return stsb_fewshot(train, k, rng)
    if task.labels is None:
        return rng.sample(train, min(k, len(train)))
    pools = {label: [r for r in train if r["target"] == label] for label in task.labels}
    order = list(task.labels)
    rng.shuffle(order)
    quota, left = dict.fromkeys(order, 0), min(k, sum(map(len, pools.values())))
    while left:  # one row per class per round, in the seed's order, while the class has rows
        for label in order:
            if left and quota[label] < len(pools[label]):
                quota[label] += 1
                left -= 1
    picked = [r for label in task.labels for r in rng.sample(pools[label], quota[label])]
    rng.shuffle(picked)
    return picked


def stsb_fewshot(train, k, rng):
    """The public EPT code's STS-B sample: a score <= 2.5 is class 0, else 1; from the training
    set shuffled by the seed, first-come, at most ceil(k/2) of each class, k in all."""
    order, taken, picked = list(train), [0, 0], []
    rng.shuffle(order)
    for r in order:
        c = int(r["label"] > 2.5)
        if taken[c] < math.ceil(k / 2) and len(picked) < k:
            taken[c] += 1
            picked.append(r)
    return picked


def fewshot_sets(args, folder):
    """{key: (k, seed)}: the requested sets, and those a task prepared before in `folder` holds
    (meta.json): --overwrite --fewshot K redraws them too, so it drops no set."""
    sets = {f"k{k}_seed{s}": (k, s) for k in args.fewshot for s in args.fewshot_seeds}
    meta = tasks.load_meta(folder.parent, folder.name, strict=False) or {}
    kept = [m for key in (meta.get("fewshot") if isinstance(meta.get("fewshot"), dict) else {})
            if (m := re.fullmatch(r"k(\d+)_seed(\d+)", key)) and key not in sets]
    if kept:
        print(f"{folder.name}: redrawing the few-shot sets it held too: "
              f"{', '.join(m[0] for m in kept)}")
    return sets | {m[0]: (int(m[1]), int(m[2])) for m in kept}


# --- tokens and files -----------------------------------------------------------------------------

def tokenizer_name(name):
    """The --tokenizer for meta.json: a local folder as an absolute path, else the Hub name."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


@functools.cache
def load_tokenizer(name):
    from ept import runtime
    try:
        return runtime.load_tokenizer(name)
    except cli.Failure as e:  # runtime's sentence names the flag (--tokenizer DIR)
        raise cli.Failure(f"prepare_data: {e}") from None


def source_lengths(tokenizer, texts):
    """{text: tokens, </s> included}. T5's tokenizer splits at whitespace before SentencePiece, so a
    text's length is the sum over its words: tokenizing each distinct word once is ~6x faster on
    MultiRC-sized data. A sample is checked against whole-text tokenization, which replaces the sum
    for tokenizers where they differ."""
    texts = sorted(texts)
    whole = lambda chunk: zip(chunk, map(len, tokenizer(chunk)["input_ids"]))
    words = sorted({w for t in texts for w in t.split()})
    size = dict(zip(words, map(len, tokenizer(words, add_special_tokens=False)["input_ids"])))
    special = len(tokenizer("")["input_ids"])
    lengths = {t: special + sum(size[w] for w in t.split()) for t in texts}
    if any(lengths[t] != n for t, n in whole(texts[::max(1, len(texts) // 200)])):
        chunks = progress(range(0, len(texts), 4096), "token lengths", "chunks", len(texts))
        lengths = {t: n for i in chunks for t, n in whole(texts[i:i + 4096])}
    return lengths


def token_stats(lengths, max_length):
    """p50/p95/max of the source length in tokens (before the prompt); how many pass max_length."""
    lengths = sorted(lengths)
    rank = lambda q: lengths[max(0, -(-len(lengths) * q // 100) - 1)]  # nearest-rank percentile
    return {"p50": rank(50), "p95": rank(95), "max": lengths[-1],
            "truncated": sum(n > max_length for n in lengths)}


def jsonl(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def prepare(task, args, out):
    if args.source or task.benchmark == "steer":  # the steering sentences ship with the repository
        train_rows, held_rows, source = load_local(task, Path(args.source or STEER_SOURCE))
    else:
        train_rows, held_rows, source = load_hub(task)
    if source["kind"] == "local":  # the bar and the messages name the file read
        found = dict(zip(RECIPES[task.name].files, source["files"]))
        where = (found["train"], found.get("eval", found["train"]))  # MRPC: both from train
    else:
        where = (f"{task.hub_id} {task.hub_config} {s}" for s in ("train", task.eval_split))
    train, held = (to_records(task, rows, w) for rows, w in zip((train_rows, held_rows), where))
    splits = dict(zip(("train", "validation", "test"), split(train, held, args.data_seed)))
    for name, records in splits.items():
        if not records:
            raise cli.Failure(f"prepare_data: {task.name}: the {name} split is empty; "
                              "the source has too few rows")
    shots = {key: fewshot(task, splits["train"], k, s)
             for key, (k, s) in fewshot_sets(args, out / task.name).items()}

    tokenizer = load_tokenizer(args.tokenizer)
    rows = [r for records in splits.values() for r in records]
    length = source_lengths(tokenizer, {r["source"] for r in rows})
    stats = {name: token_stats([length[r["source"]] for r in records], task.max_length)
             for name, records in splits.items()}
    targets = sorted({r["target"] for r in rows})
    max_target_length = max(len(ids) for ids in tokenizer(targets)["input_ids"])

    texts = {f"{name}.jsonl": jsonl(records) for name, records in splits.items()}
    texts.update({f"train_{key}.jsonl": jsonl(records) for key, records in shots.items()})
    meta = {"task": task.name, "benchmark": task.benchmark, "task_type": task.type,
            "source": source, "splits": {name: len(records) for name, records in splits.items()},
            "labels": list(task.labels) if task.labels else None, "metrics": list(task.metrics),
            "score": list(task.score), "max_length": task.max_length,
            "max_target_length": max_target_length, "data_seed": args.data_seed,
            "tokenizer": tokenizer_name(args.tokenizer), "token_stats": stats,
            "fewshot": {key: {"file": f"train_{key}.jsonl", "size": len(records),
                              "rule": outputs.FEWSHOT_RULES.get(task.name, outputs.FEWSHOT_RULE),
                              "classes": dict(sorted(Counter(r["target"] for r in records).items()))
                              if task.labels else None} for key, records in shots.items()}}
    texts["meta.json"] = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"

    def fill(tmp):  # outputs.write_folder: a failure leaves out/<task> as it was
        for fname, text in texts.items():  # meta.json last: its presence marks a finished task
            (tmp / fname).write_text(text, encoding="utf-8")
    outputs.write_folder(out / task.name, fill)

    for name, records in splits.items():
        s, counts = stats[name], Counter(r["target"] for r in records)
        labels = (" ".join(f"{y}:{c}" for y, c in sorted(counts.items())) if task.labels
                  else f"{len(counts)} distinct targets")
        print(f"  {name:<10} {len(records):>7}  {labels}  tokens p50/p95/max "
              f"{s['p50']}/{s['p95']}/{s['max']}, {s['truncated']} over {task.max_length}")
    if shots:
        print(f"  few-shot   {', '.join(f'{key} ({len(r)})' for key, r in shots.items())}")
    print(f"  -> {out / task.name}  (max_target_length {max_target_length})")


@cli.script
def main(argv=None):
    args = parser.parse_args(argv)
    names = list(dict.fromkeys(t for name in args.tasks for t in (
        list(tasks.TASKS) if name == "all" else tasks.GROUPS.get(name, [name]))))
    if unknown := [t for t in names if t not in TASKS]:
        parser.error(f"unknown task {unknown[0]!r}; valid: {', '.join(tasks.TASKS)} (or all, "
                     f"{', '.join(tasks.GROUPS)}; the steering benchmark: "
                     f"{', '.join(tasks.STEER_TASKS)})")
    out = Path(args.out)  # created once the tokenizer has loaded: a failed start leaves nothing
    keys = {f"k{k}_seed{s}" for k in args.fewshot for s in args.fewshot_seeds}
    todo, old = [], {}
    # decide every skip before any work, so a clash stops the run before it writes
    for name in names:
        meta_path = out / name / "meta.json"
        if args.overwrite or not meta_path.exists():
            todo.append(name)
            continue
        meta = tasks.load_meta(out, name, strict=False)
        if not isinstance(meta.get("fewshot"), dict):
            raise cli.Failure(f"prepare_data: {meta_path} is not a task description of this "
                              "project; pass --overwrite to rebuild it")
        if meta.get("data_seed") != args.data_seed or not keys <= set(meta["fewshot"]):
            raise cli.Failure(f"prepare_data: {out / name} was prepared with data seed "
                              f"{meta.get('data_seed')} and few-shot sets "
                              f"{sorted(meta['fewshot']) or 'none'}; pass --overwrite to "
                              "rebuild it")
        print(f"{name}: already prepared in {out / name}, skipped (--overwrite to rebuild)")
        old[name] = outputs.old_fewshot_sets(meta)
    if warning := outputs.old_fewshot_warning(out, old):  # one line for all of them
        print(f"prepare_data: {warning}", file=sys.stderr)
    # a missing file or a few-shot folder: refused before any work
    chosen = [TASKS[name] for name in todo]
    for task in chosen if args.source else []:
        find_files(task, Path(args.source))
    if not todo:
        return
    load_tokenizer(args.tokenizer)  # fail before any download
    made = not out.exists()
    out = files.make_dir(out, "output folder")
    try:
        for task in chosen:
            prepare(task, args, out)
    except BaseException:
        if made and not any(out.iterdir()):  # a failed first task leaves no empty --out behind
            out.rmdir()
        raise


if __name__ == "__main__":
    main()
