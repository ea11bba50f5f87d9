"""evaluate.py: every metric against hand-computed values (invalid predictions, empty inputs), and evaluation.

    python -m pytest -q tests/test_evaluate.py
"""
import math
from functools import partial

import pytest
import torch

import model as M
from ept import evaluation, runtime

# --- metrics ---------------------------------------------------------------------------------------

def test_accuracy_counts_invalid_as_wrong():
    assert evaluation.accuracy(["1", "0", "maybe"], ["1", "1", "0"]) == pytest.approx(100 / 3)


def test_f1_binary_invalid_is_the_opposite_of_its_target():
    # p/t: 1/1 TP; x/1 -> 0: FN; 0/0 TN; x/0 -> 1: FP; 1/0 FP  => tp 1, fp 2, fn 1: F1 = 2/5
    assert evaluation.f1(["1", "x", "0", "x", "1"], ["1", "1", "0", "0", "0"], positive="1") == pytest.approx(40.0)
    assert evaluation.f1(["0", "0"], ["0", "0"], positive="1") == 0.0  # no positive anywhere: 0 (sklearn's convention)


def test_f1_macro_over_the_label_set():
    preds, targets = ["0", "1", "2", "x", "0"], ["0", "1", "1", "2", "2"]
    # class 0: tp1 fp1 fn0 -> 2/3; class 1: tp1 fp0 fn1 -> 2/3; class 2: tp0 fp1 fn2 -> 0
    assert evaluation.f1(preds, targets, ["0", "1", "2"]) == pytest.approx(100 * (4 / 3) / 3)
    # a label never seen in targets or valid predictions is not averaged in
    assert evaluation.f1(["0", "1"], ["0", "1"], ["0", "1", "2"]) == pytest.approx(100.0)


def test_matthews_corr_binary_and_degenerate():
    # x with target 1 becomes 0: TP 2, FP 1, TN 2, FN 1 -> (4 - 1) / sqrt(3^4) = 1/3
    preds, targets = ["1", "1", "0", "0", "1", "x"], ["1", "0", "0", "0", "1", "1"]
    assert evaluation.matthews_corr(preds, targets, ["0", "1"]) == pytest.approx(100 / 3)
    assert evaluation.matthews_corr(["1", "1", "1"], ["0", "1", "0"], ["0", "1"]) == 0.0  # constant prediction
    assert evaluation.matthews_corr(["1", "0"], ["1", "0"], ["0", "1"]) == pytest.approx(100.0)
    assert evaluation.matthews_corr(["0", "1"], ["1", "0"], ["0", "1"]) == pytest.approx(-100.0)


def test_matthews_corr_multiclass_matches_binary_formula_shape():
    # 3 classes all right -> 1; an invalid prediction is its own (wrong) class
    assert evaluation.matthews_corr(["0", "1", "2"], ["0", "1", "2"], ["0", "1", "2"]) == pytest.approx(100.0)
    assert evaluation.matthews_corr(["0", "1", "x"], ["0", "1", "2"], ["0", "1", "2"]) < 100.0


def test_pearson_spearman_non_numeric_is_minus_one():
    preds, targets = ["1.0", "2.0", "3.0", "n/a"], ["1.0", "2.0", "3.0", "4.0"]
    # x = [1, 2, 3, -1]: sxy = -2.5, sxx = 8.75, syy = 5
    assert evaluation.pearson(preds, targets) == pytest.approx(100 * -2.5 / math.sqrt(8.75 * 5))
    # ranks x = [2, 3, 4, 1], y = [1, 2, 3, 4]: r = -1/5
    assert evaluation.pearson(preds, targets, rank=evaluation._ranks) == pytest.approx(-20.0)
    assert evaluation.pearson(["2.0", "2.0", "2.0"], ["1.0", "2.0", "3.0"]) == 0.0  # constant: 0, not NaN
    assert evaluation.to_float("nan") == -1.0 and evaluation.to_float("3.8") == 3.8


def test_ranks_average_ties():
    assert evaluation._ranks([1.0, 1.0, 2.0, 0.5]) == [2.5, 2.5, 4.0, 1.0]


def test_multirc_em_per_question_and_f1a():
    preds, targets, qids = ["1", "0", "1", "x", "0"], ["1", "0", "1", "1", "1"], ["a", "a", "b", "b", "c"]
    assert evaluation.multirc_em(preds, targets, qids) == pytest.approx(100 / 3)  # only question a is all right
    assert evaluation.f1(preds, targets, positive="1") == pytest.approx(100 * 4 / 6)  # tp 2, fp 0, fn 2


def test_squad_normalisation_and_max_over_golds():
    assert evaluation.normalize_answer("The  Cat!") == "cat"
    assert evaluation.squad(["the cat"], [["A cat", "dog"]]) == 100.0
    # vs "cat": P 1/3 R 1 -> 0.5; vs "a black dog": P 1/3 R 1/2 -> 0.4; max 0.5
    assert evaluation.squad(["black cat sat"], [["cat", "a black dog"]], token_f1=True) == pytest.approx(50.0)
    assert evaluation.squad([""], [["cat"]], token_f1=True) == 0.0


def test_empty_inputs_score_zero():
    spearman = partial(evaluation.pearson, rank=evaluation._ranks)
    for fn in (evaluation.accuracy, evaluation.f1, partial(evaluation.f1, positive="1"), evaluation.matthews_corr, evaluation.pearson, spearman):
        assert fn([], []) == 0.0
    assert evaluation.multirc_em([], [], []) == 0.0 and evaluation.squad([], []) == 0.0 and evaluation.squad([], [], token_f1=True) == 0.0
    meta = {"labels": ["0", "1"], "metrics": ["acc", "f1", "mcc"], "score": ["acc"]}
    assert evaluation.compute_metrics(meta, [], [])["score"] == 0.0


def test_compute_metrics_score_is_the_mean_of_the_score_metrics():
    meta = {"labels": ["0", "1", "2"], "metrics": ["acc", "macro_f1"], "score": ["acc", "macro_f1"]}  # CB
    examples = [{"target": t} for t in ["0", "1", "1", "2", "2"]]
    out = evaluation.compute_metrics(meta, ["0", "1", "2", "x", "0"], examples)
    assert out["acc"] == pytest.approx(40.0)
    assert out["score"] == pytest.approx((40.0 + 100 * (4 / 3) / 3) / 2)
    assert out["invalid"] == 1 and out["n"] == 5
    mrqa = {"labels": None, "metrics": ["squad_f1", "squad_em"], "score": ["squad_f1"]}
    out = evaluation.compute_metrics(mrqa, ["a cat"], [{"target": "dog", "answers": ["dog", "the cat"]}])
    assert out["squad_em"] == 100.0 and "invalid" not in out


# --- decoding ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    t5 = runtime.load_t5(str(tiny_model_dir))
    tok = runtime.load_tokenizer(str(tiny_model_dir))
    prompt = torch.randn(3, t5.config.d_model, generator=torch.Generator().manual_seed(0)) * 5
    return M.PromptedT5(t5, M.FoldedPrompt(prompt)).eval(), tok


SOURCES = ["sentence: a", "sentence: a much longer input with many more words in it than the others",
           "sentence: medium sized input here", "premise: x hypothesis: y", "one"]


def test_predict_batched_sorted_equals_one_by_one(tiny):
    net, tok = tiny
    batched = evaluation.predict(net, tok, SOURCES, max_new_tokens=4, batch_size=3)
    single = [evaluation.predict(net, tok, [s], max_new_tokens=4, batch_size=1)[0] for s in SOURCES]
    assert batched == single
    assert evaluation.predict(net, tok, SOURCES, max_new_tokens=4, batch_size=2, sort_by_length=False) == batched


def test_predict_stops_at_max_new_tokens(tiny):
    net, tok = tiny
    for text in evaluation.predict(net, tok, SOURCES, max_new_tokens=1):
        assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 2  # one piece (+ a leading '▁')
    assert all(isinstance(p, str) and p == p.strip() for p in evaluation.predict(net, tok, SOURCES, max_new_tokens=5))


def test_rank_classification_picks_the_lowest_loss_label(tiny):
    net, tok = tiny
    labels = ["0", "1", "2.4"]
    got = evaluation.predict(net, tok, SOURCES, labels=labels, batch_size=4)
    for source, pred in zip(SOURCES, got):  # brute force: one full forward per (example, label)
        enc = tok([source], return_tensors="pt")
        losses = []
        for label in labels:
            target = tok([label], return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = net(enc["input_ids"], enc["attention_mask"], labels=target)
            losses.append(out.loss.item() * target.numel())  # summed NLL
        assert pred == labels[min(range(len(labels)), key=losses.__getitem__)]
