"""Every metric of the paper (docs/DESIGN.md lists the names), in [0, 100] as the paper prints them.

Every metric takes (predictions, examples, labels); an empty input scores 0.0 (never NaN in JSON).
"""
import bisect
import collections
import math
import re
import string

from ept import files


def _binary(pred, target, labels, positive="1"):
    """(predicted positive, truly positive); a prediction outside the label set is the opposite of
    its target (docs/paper.md, "Training"), so it is always wrong."""
    truth = target == positive
    return ((pred == positive) if pred in labels else not truth), truth


def accuracy(preds, targets):
    return 100.0 * sum(p == t for p, t in zip(preds, targets)) / len(targets) if targets else 0.0


def binary_f1(preds, targets, labels=("0", "1"), positive="1"):
    tp = fp = fn = 0
    for p, t in zip(preds, targets):
        pp, tt = _binary(p, t, labels or ("0", "1"), positive)
        tp, fp, fn = tp + (pp and tt), fp + (pp and not tt), fn + (tt and not pp)
    return 100.0 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0  # no positives: 0 (sklearn)


def macro_f1(preds, targets, labels=None):
    """Mean per-class F1 over the label-set classes that occur in targets or valid predictions; an
    invalid prediction is a false negative of its target class and a false positive of none."""
    labels = list(labels) if labels else sorted(set(targets))
    classes = [c for c in labels if c in set(targets) or c in set(preds)]
    f1s = []
    for c in classes:
        tp = sum(p == c and t == c for p, t in zip(preds, targets))
        fp = sum(p == c and t != c for p, t in zip(preds, targets))
        fn = sum(p != c and t == c for p, t in zip(preds, targets))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return 100.0 * sum(f1s) / len(f1s) if f1s else 0.0


def matthews_corr(preds, targets, labels=None):
    """Matthews correlation (Gorodkin's K-class form; the usual MCC for two classes). With two
    labels an invalid prediction becomes the other label; with more it is a class of its own (always
    wrong)."""
    labels = list(labels) if labels else sorted(set(targets))
    if len(labels) == 2:
        preds = [p if p in labels else labels[1 - labels.index(t)] if t in labels else p
                 for p, t in zip(preds, targets)]
    s, c = len(targets), sum(p == t for p, t in zip(preds, targets))
    pk, tk = collections.Counter(preds), collections.Counter(targets)
    cov_pt = c * s - sum(pk[k] * tk[k] for k in tk)
    den = math.sqrt((s * s - sum(v * v for v in pk.values()))
                    * (s * s - sum(v * v for v in tk.values())))
    return 100.0 * cov_pt / den if den else 0.0  # a constant prediction or target: 0, as sklearn


def to_float(text, default=-1.0):
    """STS-B predictions as numbers; a non-numeric one becomes -1.0, outside the 0..5 range of the
    gold scores, as the T5 code base's `string_to_float` postprocessor does (Raffel et al. 2020)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return default
    return value if math.isfinite(value) else default


def _pearson(x, y):
    n = len(x)
    if n < 2:
        return 0.0
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0  # constant input: 0, not NaN


def _ranks(x):
    """1-based ranks, ties get their average rank (scipy.stats.rankdata 'average'): a value's ties
    sit at sorted positions first..last, so its rank is (first + last) / 2 + 1."""
    s = sorted(x)
    return [(bisect.bisect_left(s, v) + bisect.bisect_right(s, v) + 1) / 2 for v in x]


def pearson(preds, targets):
    return 100.0 * _pearson([to_float(p) for p in preds], [float(t) for t in targets])


def spearman(preds, targets):
    return 100.0 * _pearson(_ranks([to_float(p) for p in preds]),
                            _ranks([float(t) for t in targets]))


def multirc_em(preds, targets, question_ids):
    """Exact match per question: all of a question's answers right (MultiRC; invalid = wrong)."""
    right = collections.defaultdict(lambda: True)
    for p, t, q in zip(preds, targets, question_ids):
        right[q] = right[q] and p == t
    return 100.0 * sum(right.values()) / len(right) if right else 0.0


def normalize_answer(text):
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _squad_f1(pred, gold):
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_em(preds, answers):
    scores = [max(float(normalize_answer(p) == normalize_answer(a)) for a in golds)
              for p, golds in zip(preds, answers)]
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


def squad_f1(preds, answers):
    scores = [max(_squad_f1(p, a) for a in golds) for p, golds in zip(preds, answers)]
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


METRICS = {  # DESIGN.md metric names -> f(predictions, examples, labels)
    "acc": lambda p, ex, lab: accuracy(p, [e["target"] for e in ex]),
    "f1": lambda p, ex, lab: binary_f1(p, [e["target"] for e in ex], lab),
    "macro_f1": lambda p, ex, lab: macro_f1(p, [e["target"] for e in ex], lab),
    "mcc": lambda p, ex, lab: matthews_corr(p, [e["target"] for e in ex], lab),
    "pearson": lambda p, ex, lab: pearson(p, [e["target"] for e in ex]),
    "spearman": lambda p, ex, lab: spearman(p, [e["target"] for e in ex]),
    "f1a": lambda p, ex, lab: binary_f1(p, [e["target"] for e in ex], lab),
    "em": lambda p, ex, lab: multirc_em(p, [e["target"] for e in ex],
                                        [e["question_id"] for e in ex]),
    # MRQA rows carry every gold answer
    "squad_em": lambda p, ex, lab: squad_em(p, [e.get("answers") or [e["target"]] for e in ex]),
    "squad_f1": lambda p, ex, lab: squad_f1(p, [e.get("answers") or [e["target"]] for e in ex]),
}


def check_metrics(meta, path):
    """meta.json names only metrics this file computes (an edited one would fail after the run)."""
    unknown = [m for m in meta["metrics"] if m not in METRICS]
    if unknown:
        raise files.FileFault(f"{path} names unknown metrics {unknown}; known: {', '.join(METRICS)}"
                              ". Rebuild the task with prepare_data.py --overwrite")


def compute_metrics(meta, predictions, examples):
    """{metric: value for meta['metrics']} + 'score' (mean of meta['score']) + counts."""
    assert len(predictions) == len(examples), (len(predictions), len(examples))
    labels = meta.get("labels")
    out = {name: METRICS[name](predictions, examples, labels) for name in meta["metrics"]}
    out["score"] = sum(out[name] for name in meta["score"]) / len(meta["score"])
    out["n"] = len(examples)
    if labels:
        out["invalid"] = sum(p not in labels for p in predictions)  # outside the label set
    return out
