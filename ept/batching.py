"""From a split file to padded tensors: train.py's task (load_task), tokenization (cached), the
data order, and padding.

Inputs are truncated on the right to max_length and end with `</s>` (the T5 tokenizer appends it);
a batch is padded to its own longest row, never to max_length; label padding is -100 (no loss).
"""
import contextlib
import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ept import errors, files, pretrained, tasks


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
    key = (str(path.resolve()), digest, pretrained.tokenizer_fingerprint(tokenizer), max_length)
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
        except (errors.Failure, KeyError, RuntimeError, AttributeError, TypeError):
            ids = None
        if ids is None:
            print(f"batching: {cache} is damaged; tokenizing {path.name} again")
    if ids is None:
        ids = (encode(tokenizer, [r["source"] for r in rows], max_length),
               tokenizer([r["target"] for r in rows])["input_ids"] if rows else [])
        state = {f"{k}_{what}": torch.tensor([x for s in seqs for x in s] if what == "ids"
                                             else [len(s) for s in seqs], dtype=torch.int32)
                 for k, seqs in zip(("source", "target"), ids) for what in ("ids", "lengths")}
        with contextlib.suppress(OSError, errors.Failure):  # a read-only data folder: no disk cache
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
class Task:
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
    tokenizer = pretrained.load_tokenizer(args.tokenizer, say)
    if ranks.master:
        prepare_if_missing(args.data_dir, args.task, args.tokenizer, say, args.source)
    meta = tasks.load_meta(args.data_dir, args.task)
    if args.eval_mode == "rank" and not meta.get("labels"):
        raise errors.Failure(f"train: --eval-mode rank needs a label set; {args.task} has open "
                             "targets")
    args.max_length = args.max_length or meta["max_length"]
    folder = Path(args.data_dir) / args.task
    split = f"k{args.fewshot_k}_seed{args.fewshot_seed}" if args.fewshot_k else "train"
    train_file = folder / (f"train_{split}.jsonl" if args.fewshot_k else "train.jsonl")
    if not train_file.exists():
        raise errors.Failure(f"train: no {train_file}; prepare it with `" + tasks.prepare_command(
            args.data_dir, [args.task], [args.fewshot_k], [args.fewshot_seed], overwrite=True) + "`")
    limit, eval_limit = args.max_train_examples, args.max_eval_examples
    _, train_src, train_tgt = read_split(meta, split, train_file, tokenizer, args.max_length, limit)
    if args.fewshot_k and ranks.master:
        old = [split] if split in tasks.old_fewshot_sets(meta) else []
        if warning := tasks.old_fewshot_warning(args.data_dir, {args.task: old}):
            say(f"train: {warning}")
    val = read_split(meta, "validation", folder / "validation.jsonl", tokenizer, args.max_length,
                     eval_limit)[:2]
    test = None if args.no_test else read_split(  # checked now, not after training
        meta, "test", folder / "test.jsonl", tokenizer, args.max_length, eval_limit)[:2]
    return Task(tokenizer, meta, train_file, (train_src, train_tgt, tokenizer.pad_token_id), val,
                test)


def prepare_if_missing(data_dir, task, tokenizer, say, source=None):
    """data/<task>/ prepared on first use by the prepare_data.py stage, run as a command (stages
    link by files: train.py does not import prepare_data.py)."""
    folder = Path(data_dir) / task
    if (folder / "meta.json").exists():
        return
    if not tasks.known(task):
        raise errors.Failure(f"train: unknown task {task!r} and no {folder / 'meta.json'}; "
                             f"tasks: {', '.join(tasks.TASKS)}")
    command = ["--tasks", task, "--out", str(data_dir), "--tokenizer", tokenizer,
               *(["--source", source] if source else [])]
    say(f"train: {folder} is not prepared yet; preparing it now (python prepare_data.py "
        f"{' '.join(command)})", flush=True)
    script = Path(__file__).resolve().parents[1] / "prepare_data.py"
    if subprocess.run([sys.executable, str(script), *command]).returncode:
        raise errors.Failure(f"train: {folder} could not be prepared "
                             "(prepare_data.py said why above)")
