"""The task names, a prepared task's meta.json (prepare_data.py writes it) and train.py's data
(`load_task`): inputs cut to max_length, ending in `</s>`; batches padded to their longest row."""
import contextlib
import hashlib
import re
import shlex
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch

from ept import cli, files, runtime

# The paper's 21 tasks by benchmark, in its column order (Tables 1, 2); TASKS: name -> Hub dataset
GROUPS = {"glue": "cola mrpc rte stsb mnli qnli qqp sst2".split(),
          "superglue": "boolq cb wic wsc multirc".split(),
          "mrqa": "nq hotpotqa searchqa newsqa".split(),
          "others": "winogrande yelp scitail paws".split()}
HUB = {"glue": "nyu-mll/glue", "superglue": "aps/super_glue", "mrqa": "mrqa-workshop/mrqa",
       "winogrande": "allenai/winogrande", "yelp": "fancyzhx/yelp_polarity",
       "scitail": "allenai/scitail", "paws": "google-research-datasets/paws"}
TASKS = {name: HUB.get(name, HUB.get(group)) for group, names in GROUPS.items() for name in names}
STEER_TASKS = ["steer_comma"]  # the steering benchmark's (docs/experiments.md): in no group
KNOWN = [*TASKS, *STEER_TASKS]  # what prepare_data.py can prepare


# data/<task>/meta.json: what the later stages read of it; every metric evaluation.METRICS computes
META_KEYS = {"splits": dict, "labels": (list, type(None)), "metrics": list, "score": list,
             "max_length": int, "max_target_length": int}
METRIC_NAMES = "acc f1 macro_f1 mcc pearson spearman f1a em squad_em squad_f1".split()


def load_meta(data_dir, task, strict=True):
    """data/<task>/meta.json, its one reader: strict (checked), or as it is ({}, None: absent)."""
    path = Path(data_dir) / task / "meta.json"
    if strict and not path.exists():
        raise files.FileFault(f"no {path}; run `{prepare_command(data_dir, [task])}` first"
                              if task in KNOWN else f"unknown task {task!r} (no {path}); the "
                              f"tasks: {', '.join(KNOWN)}")
    meta = files.read_json(path, "task description") if path.exists() else None
    meta = meta if isinstance(meta, dict) or meta is None else {}
    if not strict:
        return meta
    bad = [k for k, kind in META_KEYS.items()
           if not isinstance(meta.get(k, ...), kind) or kind is int and meta[k] < 1]
    bad = bad or [k for k, names in (("score", meta["metrics"]), ("metrics", METRIC_NAMES))
                  if not meta[k] or not {*meta[k]} <= {*names}]  # a metric evaluation can't compute
    if bad:  # an edited meta.json fails now, not after a run
        raise files.FileFault(f"the task description {path} has missing or wrong "
                              f"entries ({', '.join(bad)}); rebuild it with "
                              f"`{prepare_command(data_dir, [task], overwrite=True)}`")
    return meta


def prepare_command(data_dir, names, fewshot=(), seeds=(), overwrite=False):
    """The prepare_data.py command, with a task's (else a neighbour's) --tokenizer and --source."""
    steer = all(name in STEER_TASKS for name in names)  # their source is no other task's
    others = sorted(p.parent.name for p in Path(data_dir).glob("*/meta.json"))
    metas = (load_meta(data_dir, name, strict=False) for name in [*names, *others])
    origin = next((m for m in metas if m and (m.get("benchmark") == "steer") == steer), {})
    source = origin.get("source") if isinstance(origin.get("source"), dict) else {}
    words = ["python", "prepare_data.py", "--tasks", *names, "--out", str(data_dir)]
    for flag, value in (("--tokenizer", origin.get("tokenizer")), ("--source", source.get("root"))):
        words += [flag, value] if isinstance(value, str) else []
    if fewshot:
        words += ["--fewshot", *map(str, fewshot), "--fewshot-seeds", *map(str, seeds)]
    return shlex.join(words + ["--overwrite"] * overwrite)


# meta.json's "rule" of each few-shot set; absent: the old k per class. Table 3 (§5.2) is ambiguous
# ("k randomly selected samples, with the number of classes sampled consistently"): k in all is our
# reading, as the public EPT code takes k in total; STS-B follows that code (docs/data.md).
FEWSHOT_RULE = "k in all, classes balanced"
FEWSHOT_RULES = {"stsb": "k in all, at most ceil(k/2) each of score <= 2.5 and > 2.5, first-come"}


def old_fewshot_sets(meta):
    """meta.json's few-shot sets of an older rule (k per class; STS-B: k from the whole split)."""
    meta = meta if isinstance(meta, dict) else {}
    sets, rule = meta.get("fewshot"), FEWSHOT_RULES.get(meta.get("task"), FEWSHOT_RULE)
    return sorted(key for key, entry in (sets if isinstance(sets, dict) else {}).items()
                  if not isinstance(entry, dict) or entry.get("rule") != rule)


def old_fewshot_warning(data_dir, old):
    """One line for the sets `old` = {task: [keys]} drawn k per class, or None: none."""
    old = {task: keys for task, keys in old.items() if keys}
    named = [re.fullmatch(r"k(\d+)_seed(\d+)", key) for keys in old.values() for key in keys]
    ks, seeds = (sorted({int(m[i]) for m in named if m}) for i in (1, 2))
    return (f"warning: the few-shot files of {', '.join(old)} in {data_dir} were drawn with an "
            "older rule, k examples per class (docs/data.md); prepared files are rebuilt only with "
            f"--overwrite: {prepare_command(data_dir, [*old], ks, seeds, True)}") if old else None


def encode(tokenizer, texts, max_length):
    """Token ids per text, truncated on the right, `</s>` appended by the T5 tokenizer."""
    return (tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
            if texts else [])


def pad(seqs, pad_value, length=None):
    """Right-pad id lists to their own longest (or `length`): (ids, mask) LongTensors."""
    length = max(length or 0, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), length), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return ids, (torch.arange(length) < torch.tensor([[len(s)] for s in seqs])).long()


def collate(idx, source_ids, target_ids, pad_id, pad_to=(None, None)):
    """A training batch (input ids, mask, labels) padded to its own longest row (or to `pad_to`)."""
    input_ids, mask = pad([source_ids[i] for i in idx], pad_id, pad_to[0])
    return input_ids, mask, pad([target_ids[i] for i in idx], -100, pad_to[1])[0]


_TOKENIZED = {}  # (file, content, tokenizer, max_length) -> (source ids, target ids)


def tokenize_file(path, tokenizer, max_length):
    """A split's (source ids, target ids), cached in memory and in <task>/cache/ by content,
    tokenizer and max_length (MultiRC's train split: 30 s to tokenize on 2 cores, 1 s to load)."""
    path, text = Path(path), files.read_text(path, "split file")
    key = (str(path.resolve()), hashlib.sha1(text.encode()).hexdigest()[:12],
           hashlib.sha1(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:12], max_length)
    cache = path.parent / "cache" / f"{path.stem}.{key[1]}.{key[2]}.L{max_length}.pt"
    n, ids = sum(bool(line.strip()) for line in text.split("\n")), _TOKENIZED.get(key)  # n: rows
    if ids is None and cache.exists():
        with contextlib.suppress(cli.Failure, KeyError, RuntimeError, AttributeError, TypeError):
            state = files.load_torch(cache, "tokenization cache")  # flat int32 ids + row lengths
            ids = tuple([t.tolist() for t in state[f"{k}_ids"].split(
                state[f"{k}_lengths"].tolist())] for k in ("source", "target"))
            ids = ids if all(len(seqs) == n for seqs in ids) else None
        if ids is None:
            print(f"batching: {cache} is damaged; tokenizing {path.name} again")
    if ids is None:
        rows = files.read_jsonl(path, what="split file")
        ids = (encode(tokenizer, [r["source"] for r in rows], max_length),
               tokenizer([r["target"] for r in rows])["input_ids"] if rows else [])
        with contextlib.suppress(OSError, cli.Failure):  # a read-only data folder: no disk cache
            cache.parent.mkdir(exist_ok=True)
            files.save_torch(cache, {f"{k}_{what}": torch.tensor(
                [x for s in seqs for x in s] if what == "ids" else [*map(len, seqs)],
                dtype=torch.int32) for k, seqs in zip(("source", "target"), ids)
                for what in ("ids", "lengths")})
    _TOKENIZED[key] = ids
    return ids


def read_split(meta, name, path, tokenizer, max_length, limit=None):
    """(examples, source ids, target ids) of a split's first `limit` rows, checked against meta."""
    examples, labels = files.read_jsonl(path, limit, what="split file"), meta.get("labels")
    expected = ((meta.get("splits") or {}).get(name) if name in ("train", "validation", "test")
                else (meta.get("fewshot") or {}).get(name, {}).get("size"))
    lacking = [n for n, e in enumerate(examples, 1)
               if not (isinstance(e.get("source"), str) and isinstance(e.get("target"), str))]
    bad = [e.get("target") for e in examples if labels and e.get("target") not in labels]
    why = (f"row {lacking[0]} lacks a 'source' or 'target' string" if lacking else
           "holds no rows" + ("; the best checkpoint would be chosen by chance"
                              if name == "validation" else "") if not examples else
           f"has {len(examples)} rows but meta.json says {expected}; the data was edited or "
           "half-copied" if limit is None and expected not in (None, len(examples)) else
           f"has the target {bad[0]!r}, outside the task's labels {labels}" if bad else None)
    if why:
        raise files.FileFault(f"{path} {why}: rebuild the task with prepare_data.py --overwrite")
    return examples, *(ids[:len(examples)] for ids in tokenize_file(path, tokenizer, max_length))


def epoch_order(n, seed, epoch, batch_size, lengths=None):
    """A pure function of (seed, epoch), so a resumed run sees the same data; with `lengths`, each
    mega-batch of 50 batches longest first (HF group_by_length)."""
    order, mega = np.random.default_rng([seed, epoch]).permutation(n), 50 * batch_size
    return order if lengths is None else np.concatenate(
        [sorted(order[i:i + mega], key=lambda j: -lengths[j]) for i in range(0, n, mega)])


def label_ids(tokenizer, labels):
    """The label words' distinct token ids, `--init label`'s start (the bare '▁' piece dropped)."""
    if not labels:
        return None
    ids = tokenizer(list(labels), add_special_tokens=False)["input_ids"]
    return list(dict.fromkeys(i for seq in ids for i in seq if tokenizer.decode([i]).strip()))


# data = (train source ids, target ids, pad id); val, test = (examples, source ids)
TaskData = namedtuple("TaskData", "tokenizer meta train_file data val test")


def load_task(args, ranks, say):
    """train.py's task, checked; rank 0 first (ranks.first) prepares it by prepare_data.py."""
    tokenizer = runtime.load_tokenizer(args.tokenizer, say)
    folder, k = Path(args.data_dir) / args.task, args.fewshot_k
    if ranks.master and args.task in KNOWN and not (folder / "meta.json").exists():
        words = ["--tasks", args.task, "--out", str(args.data_dir), "--tokenizer", args.tokenizer,
                 *(["--source", args.source] if args.source else [])]
        say(f"train: {folder} is not prepared yet; preparing it now (python prepare_data.py "
            f"{' '.join(words)})", flush=True)
        script = Path(__file__).resolve().parents[1] / "prepare_data.py"
        if subprocess.run([sys.executable, str(script), *words]).returncode:
            raise cli.Failure(f"train: {folder} could not be prepared (prepare_data.py said why)")
    meta = load_meta(args.data_dir, args.task)
    if args.eval_mode == "rank" and not meta.get("labels"):
        raise cli.Failure(f"train: --eval-mode rank needs a label set; {args.task} has none")
    args.max_length = args.max_length or meta["max_length"]
    split = f"k{k}_seed{args.fewshot_seed}" if k else "train"
    train_file = folder / (f"train_{split}.jsonl" if k else "train.jsonl")
    if not train_file.exists():
        command = prepare_command(args.data_dir, [args.task], [k], [args.fewshot_seed], True)
        raise cli.Failure(f"train: no {train_file}; prepare it with `{command}`")
    read = lambda name, path, limit: read_split(meta, name, path, tokenizer, args.max_length, limit)
    _, train_src, train_tgt = read(split, train_file, args.max_train_examples)
    if k and ranks.master and split in old_fewshot_sets(meta):
        say(f"train: {old_fewshot_warning(args.data_dir, {args.task: [split]})}")
    val, test = (s and read(s, folder / f"{s}.jsonl", args.max_eval_examples)[:2]  # test: read now,
                 for s in ("validation", None if args.no_test else "test"))  # not after training
    return TaskData(tokenizer, meta, train_file, (train_src, train_tgt, tokenizer.pad_token_id),
                    val, test)
