"""The paper's metrics in [0, 100]; a prompted T5's greedy or rank-classification decoding."""
import bisect
import collections
import inspect
import math
import re
import string

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from ept import runtime, tasks


# --- metrics: f(predictions, targets, ...); an empty input scores 0.0 (never NaN in JSON) ---------
def accuracy(preds, targets):
    return 100.0 * sum(p == t for p, t in zip(preds, targets)) / len(targets) if targets else 0.0


def f1(preds, targets, labels=None, positive=None):
    """F1 of class `positive`, an invalid prediction the opposite of its target (docs/paper.md); or
    the mean over the seen classes, an invalid prediction a false negative of its target only."""
    if positive:
        preds = [p if p in (labels or ("0", "1")) else None if t == positive else positive
                 for p, t in zip(preds, targets)]
    pairs = list(zip(preds, targets))
    counts = [(sum(p == c == t for p, t in pairs), sum((p == c) != (t == c) for p, t in pairs))
              for c in ([positive] if positive else labels or sorted(set(targets)))
              if c in {*targets, *preds}] or [(0, 1)]  # (tp, fp + fn); none seen: 0 (sklearn)
    return (100.0 * 2 * counts[0][0] / (2 * counts[0][0] + counts[0][1]) if positive
            else 100.0 * sum(2 * tp / (2 * tp + wrong) for tp, wrong in counts) / len(counts))


def matthews_corr(preds, targets, labels=None):
    """Matthews correlation (Gorodkin's K-class form); an invalid prediction is always wrong."""
    labels = list(labels) if labels else sorted(set(targets))
    if len(labels) == 2:  # binary: an invalid prediction is the other label
        preds = [p if p in labels else labels[1 - labels.index(t)] if t in labels else p
                 for p, t in zip(preds, targets)]
    s, c = len(targets), sum(p == t for p, t in zip(preds, targets))
    pk, tk = collections.Counter(preds), collections.Counter(targets)
    den = math.sqrt(math.prod(s * s - sum(v * v for v in k.values()) for k in (pk, tk)))
    return 100.0 * (c * s - sum(pk[k] * tk[k] for k in tk)) / den if den else 0.0  # as sklearn


def to_float(text, default=-1.0):
    """STS-B predictions as numbers; a non-numeric one is -1.0, as T5's `string_to_float`."""
    try:
        return float(text) if math.isfinite(float(text)) else default
    except (TypeError, ValueError):
        return default


def _ranks(x):
    """1-based ranks, ties get their average rank (scipy.stats.rankdata 'average')."""
    s = sorted(x)
    return [(bisect.bisect_left(s, v) + bisect.bisect_right(s, v) + 1) / 2 for v in x]


def pearson(preds, targets, rank=list):
    """Pearson's r of the predictions as numbers and the targets; Spearman's with `rank=_ranks`."""
    x, y = rank([to_float(p) for p in preds]), rank([float(t) for t in targets])
    mx, my = sum(x) / max(len(x), 1), sum(y) / max(len(y), 1)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return 100.0 * (sxy / math.sqrt(sxx * syy)) if sxx > 0 and syy > 0 else 0.0  # constant: 0


def multirc_em(preds, targets, question_ids):
    """Exact match per question: all of a question's answers right (MultiRC; invalid = wrong)."""
    wrong = {q for p, t, q in zip(preds, targets, question_ids) if p != t}
    questions = set(question_ids)
    return 100.0 * (len(questions) - len(wrong)) / len(questions) if questions else 0.0


def normalize_answer(text):
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad(preds, answers, token_f1=False):
    """SQuAD v1.1 exact match (or token F1) of each prediction against its best gold answer."""
    def score(pred, gold):
        p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
        common = sum((collections.Counter(p) & collections.Counter(g)).values())
        prec, rec = common / max(len(p), 1), common / max(len(g), 1)  # precision, recall
        return 2 * prec * rec / (prec + rec) if token_f1 and common else float(p == g)
    scores = [max(score(p, a) for a in golds) for p, golds in zip(preds, answers)]
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


_GOLDS = lambda ex: [e.get("answers") or [e["target"]] for e in ex]  # noqa: E731 MRQA: every gold
METRICS = {  # DESIGN.md metric names -> f(predictions, targets, labels, examples)
    "acc": lambda p, t, *_: accuracy(p, t), "mcc": lambda p, t, k, _: matthews_corr(p, t, k),
    "f1": lambda p, t, k, _: f1(p, t, k, positive="1"), "macro_f1": lambda p, t, k, _: f1(p, t, k),
    "f1a": lambda p, t, k, _: f1(p, t, k, positive="1"),  # MultiRC: F1 over all answer options
    "pearson": lambda p, t, *_: pearson(p, t), "spearman": lambda p, t, *_: pearson(p, t, _ranks),
    "em": lambda p, t, k, ex: multirc_em(p, t, [e["question_id"] for e in ex]),
    "squad_em": lambda p, t, k, ex: squad(p, _GOLDS(ex)),
    "squad_f1": lambda p, t, k, ex: squad(p, _GOLDS(ex), token_f1=True),
}


def compute_metrics(meta, predictions, examples):
    """{metric: value} of meta['metrics'], 'score' (their mean over meta['score']), n, invalid."""
    assert len(predictions) == len(examples), (len(predictions), len(examples))
    labels, targets = meta.get("labels"), [e["target"] for e in examples]
    out = {k: METRICS[k](predictions, targets, labels, examples) for k in meta["metrics"]}
    out.update(score=sum(out[k] for k in meta["score"]) / len(meta["score"]), n=len(examples))
    return {**out, **({"invalid": sum(p not in labels for p in predictions)} if labels else {})}


def batches_by_length(ids, batch_size, sort, token_budget=False):
    """Index batches of at most `batch_size` rows, `sort`: longest first; `token_budget` (a CPU:
    time follows tokens): at most batch_size x median length tokens, yet batch_size // 4 rows."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i])) if sort else list(range(len(ids)))
    if not (sort and token_budget and ids):
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    budget, batches = batch_size * sorted(map(len, ids))[len(ids) // 2], [[]]
    for i in order:
        b = batches[-1]  # closes before rows x its longest row would pass the budget
        if len(b) == batch_size or (len(b) >= max(1, batch_size // 4)
                                    and (len(b) + 1) * len(ids[b[0]]) > budget):
            batches.append([])
        batches[-1].append(i)
    return batches


@torch.no_grad()
def predict(model, tokenizer, sources, *, max_new_tokens=None, labels=None, batch_size=64,
            max_length=256, device="cpu", dtype="fp32", sort_by_length=True, progress=iter):
    """Greedy decoding of `sources` (strings or id lists) to stripped text, or with `labels` rank
    classification: the label of least summed NLL (never invalid); `progress` wraps the batches."""
    ids = (tasks.encode(tokenizer, sources, max_length)
           if sources and isinstance(sources[0], str) else sources)
    if labels:  # an input's L labels are scored in one batch: L decoder rows per input
        label_ids = tasks.pad(tasks.encode(tokenizer, labels, max_length), -100)[0].to(device)
        batch_size = max(1, batch_size // len(labels))
    out, was_training = {}, model.training
    model.eval()
    for batch in progress(batches_by_length(ids, batch_size, sort_by_length,
                                            token_budget=not str(device).startswith("cuda"))):
        x, mask = (t.to(device) for t in tasks.pad([ids[i] for i in batch], tokenizer.pad_token_id))
        with runtime.autocast(device, dtype):
            preds = ([labels[k] for k in label_nll(model, x, mask, label_ids).argmin(1).tolist()]
                     if labels else [p.strip() for p in tokenizer.batch_decode(model.generate(
                         x, mask, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1),
                         skip_special_tokens=True)])
        out.update(zip(batch, preds))
    model.train(was_training)
    return [out[i] for i in range(len(ids))]


@torch.no_grad()
def label_nll(model, input_ids, mask, label_ids):
    """(B, L) summed NLL (incl. `</s>`) of the L labels `label_ids` (L, T; -100 pads) per input: the
    encoder and first decoder step run once per input, their cache repeated for the L labels."""
    t5, n_inputs, n_labels = model.t5, len(input_ids), label_ids.size(0)
    embeds, mask = model.embed(input_ids, mask)  # (B, n+S, d), prompt included
    hidden = t5.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    start = torch.full((n_inputs, 1), t5.config.decoder_start_token_id, device=input_ids.device)
    kv = EncoderDecoderCache(DynamicCache(), DynamicCache())  # T5 fills it; `cache=` from 5.2x
    arg = "cache" if "cache" in inspect.signature(t5.forward).parameters else "past_key_values"
    logits = t5(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=start,
                use_cache=True, **{arg: kv}).logits.repeat_interleave(n_labels, 0)  # (B*L, 1, V)
    target = label_ids.repeat(n_inputs, 1)  # (B*L, T), example-major
    if target.size(1) > 1:
        kv.batch_repeat_interleave(n_labels)  # in place: once per label
        rest = t5(encoder_outputs=(hidden.repeat_interleave(n_labels, 0),), use_cache=True,
                  attention_mask=mask.repeat_interleave(n_labels, 0), **{arg: kv},
                  decoder_input_ids=target[:, :-1].clamp(min=0))  # -100: feeds only ignored steps
        logits = torch.cat([logits, rest.logits], 1)  # (B*L, T, V)
    return F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=-100,
                           reduction="none").sum(1).view(n_inputs, n_labels)


def score_split(net, tokenizer, meta, examples, source_ids, ranks, args):
    """Metrics of `net` on a split decoded as `args` say, each rank decoding a strided shard."""
    preds = predict(net, tokenizer, source_ids[ranks.rank::ranks.world_size],
                    max_new_tokens=meta["max_target_length"], batch_size=args.eval_batch_size,
                    labels=meta["labels"] if args.eval_mode == "rank" else None,
                    max_length=args.max_length, dtype=args.dtype, device=ranks.device)
    if ranks.world_size > 1:
        shards = [None] * ranks.world_size
        dist.all_gather_object(shards, preds)
        preds = [shards[i % ranks.world_size][i // ranks.world_size] for i in range(len(examples))]
    return compute_metrics(meta, preds, examples)
