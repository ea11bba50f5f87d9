"""The paper, exactly (issue 10): each test pins a number or a sentence of the paper.

    python -m pytest -q tests/test_fidelity.py          # ~1 minute on 2 CPU cores

- MRPC and QQP are scored by accuracy (Table 1's header: "MRPC Acc", "QQP Acc"); F1 is still reported.
- Table 4's EPT/EPT*: "an additional MLP layer" (§5.4) = one 1x1 layer, 2,305 parameters on t5-base ("2.3K/768"),
  validated every epoch as ATTEMPT does.
- Figure 8 on t5-base and t5-large (§5.3), sharing Table 1's lr-search runs.
- "vocab" init (Table 6, Lester et al. 2021): the first 5,000 ordinary SentencePiece ids.
- Figure 1, Table 5 and the second half of Appendix A.1 (P-Tuning's positive / negative prompts).
"""
import json
import math
from pathlib import Path

import pytest
import torch

import ablate
import analyze
import evaluate
import model as M
import prepare_data
import report

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--max-steps", "3", "--eval-every", "2", "--max-eval-examples", "6", "--eval-batch-size", "8",
         "--batch-size", "4"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir):
    """root/data (prepare_data.py on the fixture files), root/runs, root/results: the recipe's layout."""
    root = tmp_path_factory.mktemp("fidelity")
    prepare_data.main(["--source", str(REPO / "tests" / "fixtures" / "raw"), "--tasks", "cb", "mrpc", "qqp", "wsc",
                       "--out", str(root / "data"), "--tokenizer", str(tiny_model_dir)])
    return root


def driver(root):
    return ["--data-dir", str(root / "data"), "--runs-dir", str(root / "runs"), "--results-dir", str(root / "results")]


# --- 1. MRPC and QQP: accuracy is the score and the selection metric -----------------------------------

def test_mrpc_and_qqp_score_is_accuracy_and_f1_is_still_reported(root):
    for task in ("mrpc", "qqp"):
        meta = json.loads((root / "data" / task / "meta.json").read_text())
        assert meta["score"] == ["acc"] and meta["metrics"] == ["acc", "f1"]
        # 3 of 4 right, F1 of the positive class 2/3: the score is the accuracy, not their mean
        metrics = evaluate.compute_metrics(meta, ["1", "0", "0", "0"], [{"target": t} for t in ("1", "1", "0", "0")])
        assert metrics["score"] == pytest.approx(75.0) and metrics["acc"] == pytest.approx(75.0)
        assert metrics["f1"] == pytest.approx(200 / 3)
    assert prepare_data.TASKS["cb"].score == ("acc", "macro_f1")  # only CB is "F1/Acc"
