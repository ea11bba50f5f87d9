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


# --- 2. Table 4's extra layer: d -> 1 -> 1 -> d, 2,305 parameters on t5-base --------------------------

def test_table4_extra_layer_counts_the_papers_2_3k():
    table = M.parameter_table(None, M.TABLE4_VARIANTS)
    assert {size: table[size]["ept+layer"] for size in table} == {"t5-small": 1537, "t5-base": 2305, "t5-large": 3073}
    for method in ("ept", "ept_star"):
        enc = M.build_prompt_encoder(method, 768, extra_layer=True)
        assert M.count_trainable(enc) == 2305 and report.human(2305) == "2.3K"
        assert M.count_trainable(M.build_prompt_encoder(method, 768, depth=2)) == 3840  # --depth: whole blocks
    assert report.human(3840) == "3.8K"


def test_extra_layer_sits_between_down_and_up_and_trains():
    enc = M.build_prompt_encoder("ept_star", 16, extra_layer=True, generator=torch.Generator().manual_seed(0))
    blk = enc.blocks[0]
    assert blk.extra.weight.shape == (1, 1)
    p = enc()
    assert p.shape == (10, 16)
    torch.testing.assert_close(p[0], blk.up(blk.extra(blk.down(enc.prompt)))[0])
    p.pow(2).sum().backward()
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in enc.parameters())
    # the default EPT has no extra tensor: checkpoints written before the option load unchanged
    assert set(M.build_prompt_encoder("ept", 16).state_dict()) == {"prompt", "blocks.0.down.weight", "blocks.0.up.weight"}


# --- 6. "vocab" init: the 5,000 most frequent pieces ---------------------------------------------------

def test_vocab_init_samples_the_first_5000_ordinary_pieces():
    embedding = torch.arange(32128, dtype=torch.float32).unsqueeze(1).repeat(1, 4)  # row i holds i
    table = M.init_prompt(20000, 4, "vocab", embedding, generator=torch.Generator().manual_seed(0))
    ids = table[:, 0].long()
    assert ids.min() >= 3 and ids.max() <= 5002  # no pad/eos/unk, no sentinel, none of the 28 unused rows
    assert ids.min() < 10 and ids.max() > 4990  # and the whole range is drawn
    small = M.init_prompt(500, 4, "vocab", embedding[:50], generator=torch.Generator().manual_seed(0))[:, 0]
    assert small.min() >= 3 and small.max() <= 49  # a vocabulary under 5,000: all its ordinary pieces


def test_vocab_range_is_t5s_ordinary_pieces(tokenizer_dir):
    if tokenizer_dir is None:
        pytest.skip("needs ../shared/data/t5")
    tok = M.load_tokenizer(tokenizer_dir)
    first, last = M.VOCAB_FIRST_PIECE, M.VOCAB_FIRST_PIECE + M.VOCAB_SAMPLE_SIZE - 1
    assert tok.convert_ids_to_tokens(list(range(first))) == ["<pad>", "</s>", "<unk>"]
    assert not any(t.startswith("<extra_id") for t in tok.convert_ids_to_tokens(list(range(first, last + 1))))
