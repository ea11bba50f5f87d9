"""The paper's 21 tasks and the steering benchmark's toy tasks (how prepare_data.py reads and
templates each: its RECIPES); a prepared task's meta.json; the few-shot rule; and train.py's data
path (`load_task`): inputs truncated on the right to max_length, ending with `</s>`; a batch padded
to its own longest row, labels with -100 (no loss); tokenization cached on disk.
"""
import contextlib
import hashlib
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ept import cli, files, runtime


@dataclass
class Task:
    name: str
    benchmark: str                     # glue | superglue | mrqa | others | steer
    hub_id: str
    hub_config: str | None
    type: str                          # Table 5's "Type" column
    paper_splits: tuple | None         # Appendix B.1's (train, validation, test) sizes
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
ACC_F1 = dict(metrics=("acc", "f1"), score=("acc",))
# In the paper's column order (Tables 1, 2), types in Table 5's words (coref. coreference, common.
# commonsense, WSD word sense disambiguation), split sizes Appendix B.1's (docs/paper.md).
# MRPC, QQP: Table 1's header reads "Acc" (the score); F1 is still reported.
_TASKS = [
    Task("cola", "glue", GLUE, "cola", "acceptability", (8551, 521, 522), metrics=("mcc",)),
    Task("mrpc", "glue", GLUE, "mrpc", "paraphrase", (3668, 204, 204), **ACC_F1),
    Task("rte", "glue", GLUE, "rte", "NLI", (2490, 138, 139)),
    Task("stsb", "glue", GLUE, "stsb", "sentence similarity", (5749, 750, 750), labels=None,
         metrics=("pearson", "spearman"), score=("pearson",)),
    Task("mnli", "glue", GLUE, "mnli", "NLI", (382702, 10000, 9815), labels=("0", "1", "2"),
         eval_split="validation_matched"),
    Task("qnli", "glue", GLUE, "qnli", "NLI", (94743, 10000, 5463)),
    Task("qqp", "glue", GLUE, "qqp", "paraphrase", (353846, 10000, 40430), **ACC_F1),
    Task("sst2", "glue", GLUE, "sst2", "sentiment", (66349, 1000, 872)),
    Task("boolq", "superglue", SUPERGLUE, "boolq", "QA", (9427, 1635, 1635)),
    Task("cb", "superglue", SUPERGLUE, "cb", "NLI", (250, 28, 28), labels=("0", "1", "2"),
         metrics=("acc", "macro_f1")),
    Task("wic", "superglue", SUPERGLUE, "wic", "WSD", (5428, 319, 319)),
    Task("wsc", "superglue", SUPERGLUE, "wsc.fixed", "coref./common.", (554, 52, 52)),
    Task("multirc", "superglue", SUPERGLUE, "multirc", "QA", (26243, 1000, 4848),
         metrics=("f1a", "em"), score=("f1a",), max_length=348),
    *(Task(name, "mrqa", "mrqa-workshop/mrqa", "plain_text", "QA", sizes, labels=None,
           metrics=("squad_f1", "squad_em"), score=("squad_f1",), folder=f"mrqa/{name}",
           max_length=512, subset=subset)
      for name, subset, sizes in (("nq", "NaturalQuestionsShort", (94071, 10000, 12836)),
                                  ("hotpotqa", "HotpotQA", (71928, 1000, 5901)),
                                  ("searchqa", "SearchQA", (107384, 10000, 16980)),
                                  ("newsqa", "NewsQA", (73160, 1000, 4212)))),
    Task("winogrande", "others", "allenai/winogrande", "winogrande_xl", "common.",
         (39398, 1000, 1267)),
    Task("yelp", "others", "fancyzhx/yelp_polarity", "plain_text", "sentiment",
         (550000, 10000, 38000), folder="yelp_polarity", eval_split="test"),
    Task("scitail", "others", "allenai/scitail", "snli_format", "NLI", (22596, 1000, 1304)),
    Task("paws", "others", "google-research-datasets/paws", "labeled_final", "paraphrase",
         (48401, 1000, 8000)),
]
TASKS = {t.name: t for t in _TASKS}
PAPER_SPLITS = {t.name: t.paper_splits for t in _TASKS}  # the cost estimate reads them unprepared
GROUPS = {b: [t.name for t in _TASKS if t.benchmark == b]
          for b in ("glue", "superglue", "mrqa", "others")}

# --- the steering benchmark (docs/experiments.md): not the paper's, not in TASKS -----------------
# A small backbone trained on the shipped sentences (assets/steer/sentences) does each rule after
# its prefix ("comma: <sentence>") and STEER_DEFAULT on a bare sentence: a prompt must select
# another. long: 8 words or more (a word: letters or digits between spaces); comma: has a comma
STEER_RULES = {"long": lambda s: int(sum(any(c.isalnum() for c in w) for w in s.split()) >= 8),
               "comma": lambda s: int("," in s)}
STEER_DEFAULT = "long"  # what the backbone does without a prefix
STEER_SUCCESS = 90.0  # test accuracy (%) from which a run counts as steered (issue 27)
STEER_SEARCH_SEEDS = (0, 1, 2)  # their mean validation score chooses a method's lr
STEER_SOURCE = Path(__file__).resolve().parents[1] / "assets" / "steer"
STEER_TASKS = {f"steer_{rule}": Task(f"steer_{rule}", "steer", "", None, "steering (toy)", None,
                                     folder="sentences")
               for rule in STEER_RULES if rule != STEER_DEFAULT}


def known(task):  # prepare_data.py can prepare it
    return task in TASKS or task in STEER_TASKS


# --- a prepared task: data/<task>/meta.json (prepare_data.py writes it) --------------------------
# what the later stages read from meta.json; every metric evaluation.METRICS computes (tested)
META_KEYS = {"splits": dict, "labels": (list, type(None)), "metrics": list, "score": list,
             "max_length": int, "max_target_length": int}
METRIC_NAMES = ("acc", "f1", "macro_f1", "mcc", "pearson", "spearman", "f1a", "em", "squad_em",
                "squad_f1")


def load_meta(data_dir, task, strict=True):
    """data/<task>/meta.json, its one reader: strict, with the keys the later stages read (else
    one sentence naming the prepare_data command); or as it is ({}: not an object, None: absent)."""
    path = Path(data_dir) / task / "meta.json"
    if not path.exists():
        if not strict:
            return None
        if not known(task):
            raise files.FileFault(f"unknown task {task!r} (no {path}); the tasks: "
                                  f"{', '.join(TASKS)}; the steering benchmark's: "
                                  f"{', '.join(STEER_TASKS)}")
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
    if unknown := [m for m in meta["metrics"] if m not in METRIC_NAMES]:  # edited: fails now, not
        raise files.FileFault(f"{path} names unknown metrics {unknown}; known: "  # after a run
                              f"{', '.join(METRIC_NAMES)}. Rebuild the task with "
                              f"`{prepare_command(data_dir, [task], overwrite=True)}`")
    return meta


def prepare_command(data_dir, names, fewshot=(), seeds=(), overwrite=False):
    """The prepare_data.py command for `names` (and the `fewshot` k x `seeds` sets) into `data_dir`,
    with the --tokenizer and --source meta.json records (else a neighbour's): it runs offline."""
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


# --- the few-shot rule ----------------------------------------------------------------------------
# meta.json's "rule" of each few-shot set; absent: the old k per class. Table 3 (§5.2) is ambiguous
# ("k randomly selected samples, with the number of classes sampled consistently"): k in all is our
# reading, as the public EPT code takes k in total; STS-B follows that code (docs/data.md).
FEWSHOT_RULE = "k in all, classes balanced"
STSB_FEWSHOT_RULE = "k in all, at most ceil(k/2) each of score <= 2.5 and > 2.5, first-come"


def fewshot_rule(task):
    return STSB_FEWSHOT_RULE if task == "stsb" else FEWSHOT_RULE


def old_fewshot_sets(meta):
    """meta.json's few-shot sets of an older rule (k per class; STS-B: k from the whole split)."""
    meta = meta if isinstance(meta, dict) else {}
    sets, rule = meta.get("fewshot"), fewshot_rule(meta.get("task"))
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
    return (tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
            if texts else [])


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


def tokenize_file(path, tokenizer, max_length):
    """Token ids of a split's sources and targets, cached in memory and in <data>/<task>/cache/,
    keyed by content, tokenizer and max_length; a damaged cache file is rebuilt, never trusted. It
    pays: MultiRC's train split takes ~30 s to tokenize on 2 cores, ~1 s to load (docs/data.md)."""
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
        with contextlib.suppress(cli.Failure, KeyError, RuntimeError, AttributeError, TypeError):
            state = files.load_torch(cache, "tokenization cache")
            ids = tuple([t.tolist() for t in torch.split(state[f"{k}_ids"],
                                                         state[f"{k}_lengths"].tolist())]
                        for k in ("source", "target"))
        if ids is None or any(len(seqs) != len(rows) for seqs in ids):
            print(f"batching: {cache} is damaged; tokenizing {path.name} again")
            ids = None
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
    """load_split of a split that must still match its meta.json (rows present, the row count
    unless `limit`, targets in the label set): an edited or half-copied split is one sentence."""
    examples, source_ids, target_ids = load_split(path, tokenizer, max_length, limit)
    fix = "rebuild the task with prepare_data.py --overwrite"
    if not examples:
        why = "; the best checkpoint would be chosen by chance" if name == "validation" else ""
        raise files.FileFault(f"{path} holds no rows{why}: {fix}")
    expected = ((meta.get("splits") or {}).get(name) if name in ("train", "validation", "test")
                else (meta.get("fewshot") or {}).get(name, {}).get("size"))
    if limit is None and expected is not None and expected != len(examples):
        raise files.FileFault(f"{path} has {len(examples)} rows but meta.json says {expected}; "
                              f"the data was edited or half-copied: {fix}")
    labels = meta.get("labels")
    if bad := [e.get("target") for e in examples if labels and e.get("target") not in labels]:
        raise files.FileFault(f"{path} has the target {bad[0]!r}, outside the task's labels "
                              f"{labels}: {fix}")
    return examples, source_ids, target_ids


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
    """`data` = (train source ids, target ids, pad id); `val`, `test` = (examples, source ids)."""
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
        command = prepare_command(args.data_dir, [args.task], [args.fewshot_k],
                                  [args.fewshot_seed], overwrite=True)
        raise cli.Failure(f"train: no {train_file}; prepare it with `{command}`")
    read = lambda name, path, limit: read_split(meta, name, path, tokenizer, args.max_length, limit)
    _, train_src, train_tgt = read(split, train_file, args.max_train_examples)
    if args.fewshot_k and ranks.master:
        old = [split] if split in old_fewshot_sets(meta) else []
        if warning := old_fewshot_warning(args.data_dir, {args.task: old}):
            say(f"train: {warning}")
    val = read("validation", folder / "validation.jsonl", args.max_eval_examples)[:2]
    test = None if args.no_test else read(  # checked now, not after training
        "test", folder / "test.jsonl", args.max_eval_examples)[:2]
    return TaskData(tokenizer, meta, train_file, (train_src, train_tgt, tokenizer.pad_token_id),
                    val, test)


def prepare_if_missing(data_dir, task, tokenizer, say, source=None):
    """data/<task>/ prepared on first use by prepare_data.py as a command (stages link by files)."""
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
        raise cli.Failure(f"train: {folder} could not be prepared (prepare_data.py said why above)")
