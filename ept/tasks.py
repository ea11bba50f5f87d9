"""The tasks: names, meta.json (its one reader) and train.py's data as token ids (`load_task`)."""
import contextlib
import hashlib
import shlex
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch

from ept import cli, files, runtime

# The paper's 21 tasks by benchmark, in its column order (Tables 1, 2); TASKS: name -> Hub dataset
GROUPS = {group: names.split() for group, names in {
    "glue": "cola mrpc rte stsb mnli qnli qqp sst2", "superglue": "boolq cb wic wsc multirc",
    "mrqa": "nq hotpotqa searchqa newsqa", "others": "winogrande yelp scitail paws"}.items()}
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
_TOKENIZED = {}  # read_split's token ids: cache file -> (source ids, target ids)
# load_task's: data = (train source ids, target ids, pad id); val, test = (examples, source ids)
TaskData = namedtuple("TaskData", "tokenizer meta train_file data val test label_ids")


def load_meta(data_dir, task, strict=True):
    """data/<task>/meta.json, its one reader: strict (checked), or as it is ({}, None: absent)."""
    path = Path(data_dir) / task / "meta.json"
    if strict and not path.exists():
        raise files.FileFault(f"no {path}; run `{prepare_command(data_dir, [task])}` first"
                              if task in KNOWN else f"unknown task {task!r} (no {path}); the "
                              f"tasks: {', '.join(KNOWN)}")
    meta = files.read_json(path, "task description") if path.exists() else None
    meta = meta if isinstance(meta, dict) or meta is None else {}
    bad = strict and ([k for k, kind in META_KEYS.items()
                       if not isinstance(meta.get(k, ...), kind) or kind is int and meta[k] < 1]
                      or [k for k, names in (("score", meta["metrics"]), ("metrics", METRIC_NAMES))
                          if not meta[k] or not {*meta[k]} <= {*names}])  # no metric we compute
    if bad:  # an edited meta.json fails now, not after a run
        raise files.FileFault(f"the task description {path} has missing or wrong entries "
                              f"({', '.join(bad)}); rebuild it with "
                              f"`{prepare_command(data_dir, [task], overwrite=True)}`")
    return meta


def prepare_command(data_dir, names, fewshot=(), seeds=(), overwrite=False):
    """The prepare_data.py command, with a task's (else a like neighbour's) --tokenizer/--source."""
    pool = [*names, *sorted(p.parent.name for p in Path(data_dir).glob("*/meta.json"))]
    origin = next((m for name in pool if (m := load_meta(data_dir, name, strict=False))
                   and (m.get("benchmark") == "steer") == ({*names} <= {*STEER_TASKS})), {})
    source = origin.get("source") if isinstance(origin.get("source"), dict) else {}
    words = ["python", "prepare_data.py", "--tasks", *names, "--out", str(data_dir)]
    for flag, value in (("--tokenizer", origin.get("tokenizer")), ("--source", source.get("root"))):
        words += [flag, value] if isinstance(value, str) else []
    shots = ["--fewshot", *map(str, fewshot), "--fewshot-seeds", *map(str, seeds)] * any(fewshot)
    return shlex.join(words + shots + ["--overwrite"] * overwrite)


def encode(tokenizer, texts, max_length=None):
    """Token ids per text, cut on the right to `max_length`, `</s>` appended by the T5 tokenizer."""
    return tokenizer(list(texts), truncation=bool(max_length), max_length=max_length)["input_ids"]


def pad(seqs, pad_value, length=None):
    """Right-pad id lists to their own longest (or `length`): (ids, mask) LongTensors."""
    lengths = torch.tensor([len(s) for s in seqs])
    mask = torch.arange(max(length or 0, int(lengths.max()))) < lengths[:, None]
    flat = torch.tensor([x for s in seqs for x in s], dtype=torch.long)
    return torch.full(mask.shape, pad_value).masked_scatter_(mask, flat), mask.long()


def collate(idx, source_ids, target_ids, pad_id, pad_to=(None, None)):
    """A training batch (input ids, mask, labels) padded to its own longest row (or to `pad_to`)."""
    input_ids, mask = pad([source_ids[i] for i in idx], pad_id, pad_to[0])
    return input_ids, mask, pad([target_ids[i] for i in idx], -100, pad_to[1])[0]


def read_split(meta, name, path, tokenizer, max_length, limit=None):
    """A split's first `limit` (examples, source ids, target ids), checked against meta.json."""
    rows, labels = files.read_jsonl(path := Path(path), what="split file"), meta.get("labels")
    expected = ((meta.get("splits") or {}).get(name) if name in ("train", "validation", "test")
                else (meta.get("fewshot") or {}).get(name, {}).get("size"))
    lacking = [r for r in rows if {type(r.get("source")), type(r.get("target"))} != {str}]
    bad = [r.get("target") for r in rows if labels and r.get("target") not in labels]
    if why := ("holds no rows" + "; the best checkpoint would be a guess" * (name == "validation")
               if not rows else f"row {rows.index(lacking[0]) + 1} lacks a 'source' or 'target' "
               "string" if lacking else f"has {len(rows)} rows but meta.json says {expected}; the "
               "data was edited or half-copied" if expected not in (None, len(rows)) else
               f"has the target {bad[0]!r}, outside the task's labels {labels}" if bad else None):
        raise files.FileFault(f"{path} {why}: rebuild the task with prepare_data.py --overwrite")
    blob = f"{tokenizer.backend_tokenizer.to_str()} {max_length} ".encode() + path.read_bytes()
    cache = path.parent / "cache" / f"{path.stem}.{hashlib.sha1(blob).hexdigest()[:16]}.pt"
    if (key := cache.resolve()) not in _TOKENIZED and cache.exists():  # MultiRC: 30 s, or 1 s
        try:  # per side (source, target): the flat int32 ids and the row lengths
            state = files.load_torch(cache, "tokenization cache")
            ids = tuple([t.tolist() for t in flat.split(n.tolist())] for flat, n in state)
            if any(len(side) != len(rows) for side in ids):  # a row per row, or it is not ours
                raise ValueError(cache)
            _TOKENIZED[key] = ids
        except (cli.Failure, KeyError, RuntimeError, AttributeError, TypeError, ValueError):
            print(f"batching: {cache} is damaged; tokenizing {path.name} again")
    if key not in _TOKENIZED:
        _TOKENIZED[key] = ids = tuple(encode(tokenizer, [r[k] for r in rows], n)
                                      for k, n in (("source", max_length), ("target", None)))
        with contextlib.suppress(OSError, cli.Failure):  # a read-only data folder: no disk cache
            cache.parent.mkdir(exist_ok=True)
            files.save_torch(cache, [(torch.tensor([x for s in seqs for x in s], dtype=torch.int32),
                                      torch.tensor([*map(len, seqs)])) for seqs in ids])
    return rows[:limit], *(ids[:limit] for ids in _TOKENIZED[key])


def epoch_order(n, seed, epoch, batch_size, lengths=None):
    """Pure in (seed, epoch), so a resume sees the same data; `lengths`: HF group_by_length."""
    order, mega = np.random.default_rng([seed, epoch]).permutation(n), 50 * batch_size
    return order if lengths is None else np.concatenate(
        [sorted(order[i:i + mega], key=lambda j: -lengths[j]) for i in range(0, n, mega)])


def load_task(args, ranks, say):
    """train.py's task, checked; rank 0 first (ranks.first) prepares it by prepare_data.py."""
    tokenizer = runtime.load_tokenizer(args.tokenizer, say)
    folder, k = Path(args.data_dir) / args.task, args.fewshot_k
    if ranks.master and args.task in KNOWN and not (folder / "meta.json").exists():
        words = [sys.executable, str(Path(__file__).parents[1] / "prepare_data.py"), "--tasks",
                 args.task, "--out", str(args.data_dir), "--tokenizer", args.tokenizer,
                 *(["--source", args.source] * bool(args.source))]
        say(f"train: {folder} is not prepared yet; preparing it: {shlex.join(words)}", flush=True)
        if subprocess.run(words).returncode:
            raise cli.Failure(f"train: {folder} could not be prepared (prepare_data.py said why)")
    meta = load_meta(args.data_dir, args.task)
    if not (labels := meta["labels"]) and args.eval_mode == "rank":
        raise cli.Failure(f"train: --eval-mode rank needs a label set; {args.task} has none")
    args.max_length = args.max_length or meta["max_length"]
    split = f"k{k}_seed{args.fewshot_seed}" if k else "train"
    if not (train_file := folder / ("train_" * bool(k) + f"{split}.jsonl")).exists():
        command = prepare_command(args.data_dir, [args.task], [k], [args.fewshot_seed], True)
        raise cli.Failure(f"train: no {train_file}; prepare it with `{command}`")
    read = lambda name, path, limit: read_split(meta, name, path, tokenizer, args.max_length, limit)
    data = (*read(split, train_file, args.max_train_examples)[1:], tokenizer.pad_token_id)
    val, test = (s and read(s, folder / f"{s}.jsonl", args.max_eval_examples)[:2]  # test: read now,
                 for s in ("validation", None if args.no_test else "test"))  # not after training
    pieces = labels and [w[:-1] for w in encode(tokenizer, labels)]  # --init label, '▁' dropped
    ids = pieces and [*dict.fromkeys(i for w in pieces for i in w if tokenizer.decode([i]).strip())]
    return TaskData(tokenizer, meta, train_file, data, val, test, ids)
