"""The paper, exactly: each test pins a number or a sentence of the paper.

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
import model as M
import prepare_data
import report
import tables
from ept import evaluation, files, grid, options, outputs, runtime
from conftest import save_folded_prompt

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--max-steps", "3", "--eval-every", "2", "--max-eval-examples", "6", "--eval-batch-size", "8",
         "--batch-size", "4"]


pytestmark = pytest.mark.usefixtures("one_thread")


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
        scores = evaluation.compute_metrics(meta, ["1", "0", "0", "0"], [{"target": t} for t in ("1", "1", "0", "0")])
        assert scores["score"] == pytest.approx(75.0) and scores["acc"] == pytest.approx(75.0)
        assert scores["f1"] == pytest.approx(200 / 3)
    assert prepare_data.TASKS["cb"].score == ("acc", "macro_f1")  # only CB is "F1/Acc"


# --- 2. Table 4's extra layer: d -> 1 -> 1 -> d, 2,305 parameters on t5-base --------------------------

def test_table4_extra_layer_counts_the_papers_2_3k():
    table = tables.parameter_table(None, tables.TABLE4_VARIANTS)
    assert {size: table[size]["ept+layer"] for size in table} == {"t5-small": 1537, "t5-base": 2305, "t5-large": 3073}
    for method in ("ept", "ept_star"):
        enc = M.build_prompt_module(method, 768, extra_layer=True)
        assert M.count_trainable(enc) == 2305 and tables.human(2305) == "2.3K"
        assert M.count_trainable(M.build_prompt_module(method, 768, depth=2)) == 3840  # --depth: whole blocks
    assert tables.human(3840) == "3.8K"


def test_extra_layer_sits_between_down_and_up_and_trains():
    enc = M.build_prompt_module("ept_star", 16, extra_layer=True, generator=torch.Generator().manual_seed(0))
    blk = enc.blocks[0]
    assert blk.extra.weight.shape == (1, 1)
    p = enc()
    assert p.shape == (10, 16)
    torch.testing.assert_close(p[0], blk.up(blk.extra(blk.down(enc.prompt)))[0])
    p.pow(2).sum().backward()
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in enc.parameters())
    # the default EPT has no extra tensor: checkpoints written before the option load unchanged
    assert set(M.build_prompt_module("ept", 16).state_dict()) == {"prompt", "blocks.0.down.weight", "blocks.0.up.weight"}


def test_table4_report_params_cell_reads_2_3k(tmp_path):
    rows = [{"experiment": "table4", "run": f"r/{t}{m}", "task": t, "method": m, "seed": 0, "score": 60.0,
             "model_tag": "t5-base", "n_trainable": 2305 if m != "pt" else 76800, "n_inference": 768 if m != "pt" else 76800,
             "prompt_length": 100 if m == "pt" else 10, "depth": 1, "extra_layer": m != "pt"}
            for t in tables.TABLE4_TASKS for m in ("pt", "ept", "ept_star")]
    md = tables.table4(rows)[0].split("The paper's numbers")[0]
    assert "| EPT (+1x1 layer) | 2.3K/768 |" in md and "| EPT* (+1x1 layer) | 2.3K/768 |" in md
    assert "| PT (n=100) | 76.8K/76.8K |" in md


def test_table4_specs_use_the_extra_layer():
    args = ablate.parser.parse_args(["table4"])
    specs = ablate.table4(args)
    ept = [s for s in specs if s["method"] in ("ept", "ept_star")]
    assert len(specs) == 45 and ept and all(s.get("extra_layer") is True and "depth" not in s for s in ept)
    assert options.run_name(ept[0]) == "multirc_ept_t5-base_x1_ep10_ev1641_s0"
    argv = grid.train_argv({k: v for k, v in ept[0].items()}, "runs/x")
    assert "--extra-layer" in argv and options.parser.parse_args(argv).extra_layer  # a flag train.py knows


def test_result_rows_of_old_runs_default_the_new_options(tmp_path):
    run = tmp_path / "cb_ept_t5-base_s0"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"task": "cb", "method": "ept", "depth": 1, "n_trainable": 2304}))
    (run / "metrics.json").write_text(json.dumps({"score": 50.0}))
    row = grid.result_row("table1", grid.spec("cb", "ept", "t5-base", 0), run)
    assert row["extra_layer"] is False and row["eval_every"] == 1000


# --- 3. Table 4: validated every epoch, the best epoch kept -------------------------------------------

def test_table4_validates_every_epoch_from_meta_sizes(root):
    args = ablate.parser.parse_args(["table4", "--data-dir", str(root / "data"), "--methods", "pt"])
    cb = [s for s in ablate.table4(args) if s["task"] == "cb"]
    n_train = json.loads((root / "data" / "cb" / "meta.json").read_text())["splits"]["train"]
    assert {s["eval_every"] for s in cb} == {math.ceil(n_train / 16)} and {s["epochs"] for s in cb} == {20}
    multirc = [s for s in ablate.table4(args) if s["task"] == "multirc"]  # no meta.json there: the paper's sizes (grid.PAPER_SPLITS)
    assert {(s["eval_every"], s["epochs"]) for s in multirc} == {(math.ceil(26243 / 16), 10)}
    # the GPU-hour estimate counts the 20 validations (was: one, at the last step)
    spec = grid.spec("wsc", "pt", "t5-base", 0, epochs=20, eval_every=35)
    extra = (20 - 1) * 52 * grid.MEASURED_EVAL_S * grid.LAYER_SCALE["t5-base"] / 3600
    assert grid.estimate_hours(spec) - grid.estimate_hours({**spec, "eval_every": 1000}) == pytest.approx(extra)


def test_table4_run_validates_at_each_epoch_end_and_keeps_the_best(root, tiny_model_dir):
    rows = ablate.main(["table4", "--model", str(tiny_model_dir), "--tasks", "cb", "--methods", "pt", "--seeds", "0",
                        "--epochs", "2", *driver(root), "--batch-size", "4", "--max-eval-examples", "6",
                        "--eval-batch-size", "8"])
    (row,) = rows
    per_epoch = math.ceil(json.loads((root / "data" / "cb" / "meta.json").read_text())["splits"]["train"] / 4)
    evals = [e for e in files.read_jsonl(Path(row["run"]) / "log.jsonl") if e.get("event") == "eval"]
    assert [e["step"] for e in evals] == [per_epoch, 2 * per_epoch] and row["eval_every"] == per_epoch
    best = max(evals, key=lambda e: e["score"])  # first of equal scores: train.py keeps a strict improvement
    assert row["best_step"] == best["step"] and f"_ev{per_epoch}_" in row["run"]


# --- 4. Figure 8 on t5-base and t5-large, from Table 1's lr-search runs --------------------------------

def test_figure8_grid_has_both_sizes_and_shares_table1_runs(tmp_path, capsys):
    lr_specs = ablate.lr(ablate.parser.parse_args(["lr"]))
    names = {options.run_name({k: v for k, v in s.items() if k != "_row"}) for s in lr_specs}
    assert len(names) == 600 and {s["model"] for s in lr_specs} == {"t5-base", "t5-large"}
    table1 = {options.run_name(s) for s in ablate.table1(ablate.parser.parse_args(["table1", "--lr-search"]))}
    assert names <= table1  # every Figure 8 run is a Table 1 lr-search run: nothing new to train
    assert {s["model"] for s in ablate.lr(ablate.parser.parse_args(["lr", "--model", "x/t5-small"]))} == {"x/t5-small"}
    ablate.main(["lr", "--dry-run", "--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    assert "DRY-RUN lr runs=600 to_train=600 " in capsys.readouterr().out


def test_figure8_draws_one_row_per_size_and_never_mixes_them(tmp_path):
    rows = [{"experiment": "lr", "run": f"r/{tag}{t}{m}{v}", "task": t, "method": m, "seed": 0, "variant": v,
             "score": (80.0 if tag == "t5-large" else 60.0) + v, "model_tag": tag, "lr": v}
            for tag in ("t5-base", "t5-large") for t in ablate.SUPERGLUE for m in ("pt", "ept") for v in (0.01, 0.3)]
    outputs.append_jsonl(tmp_path / "results" / "lr.jsonl", rows)
    report.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "fig8_learning_rate.png").stat().st_size > 10_000
    sweep = (tmp_path / "report" / "sweep_lr.md").read_text()
    assert "| t5-base | EPT | 0.3 | 60.3 |" in sweep and "| t5-large | EPT | 0.3 | 80.3 |" in sweep


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
    tok = runtime.load_tokenizer(tokenizer_dir)
    first, last = M.VOCAB_FIRST_PIECE, M.VOCAB_FIRST_PIECE + M.VOCAB_SAMPLE_SIZE - 1
    assert tok.convert_ids_to_tokens(list(range(first))) == ["<pad>", "</s>", "<unk>"]
    assert not any(t.startswith("<extra_id") for t in tok.convert_ids_to_tokens(list(range(first, last + 1))))


# --- 7. Figure 1 and 8. Table 5 ---------------------------------------------------------------------

def test_figure1_superglue_averages_per_size_and_parameters(tmp_path):
    rows = [{"experiment": "table1", "run": f"r/{tag}{t}{m}", "task": t, "method": m, "seed": 0, "lr": 0.3,
             "score": base + i, "val_score": 1.0, "model_tag": tag, "n_trainable": n}
            for tag, base in (("t5-small", 50.0), ("t5-base", 60.0), ("t5-large", 70.0))
            for m, n in (("pt", 7680), ("ept", 2304)) for i, t in enumerate(ablate.SUPERGLUE)]
    rows.append({**rows[0], "run": "r/cola", "task": "cola", "score": 0.0})  # GLUE: not in the SuperGLUE average
    avgs = report.superglue_averages(rows)
    assert avgs[("t5-base", "ept")] == (62.0, True, 2304) and avgs[("t5-large", "pt")] == (72.0, True, 7680)
    outputs.append_jsonl(tmp_path / "results" / "table1.jsonl", rows)
    report.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "fig1_superglue.png").stat().st_size > 10_000
    assert "fig1_superglue.png" in (tmp_path / "report" / "index.md").read_text()


def test_table5_reads_meta_json_in_the_papers_layout(root, tmp_path):
    (root / "results").mkdir(exist_ok=True)  # report finds <results>/../data
    names = report.table5_md(root / "results", tmp_path)
    md = (tmp_path / "table5.md").read_text()
    assert names == ["table5.md"]
    assert "| Benchmark | Dataset | Type | \\|Train\\| | \\|Valid\\| | \\|Test\\| | Metric |" in md  # GFM-escaped |Train|
    for task in ("cb", "mrpc", "qqp", "wsc"):
        meta = json.loads((root / "data" / task / "meta.json").read_text())
        sizes = " | ".join(f"{meta['splits'][s]:,}" for s in ("train", "validation", "test"))
        assert f"| {tables.TASK_LABELS[task]} | {meta['task_type']} | {sizes} |" in md
    assert "| MRPC | paraphrase |" in md and md.count("| Acc; also F1 |") == 2  # MRPC, QQP
    assert "| CB | NLI |" in md and "Acc / F1 (macro) (mean)" in md and "| WSC | coref./common. |" in md
    assert md.index("| SuperGLUE | CB") < md.index("| GLUE | MRPC")


# --- 9. Appendix A.1: P-Tuning's positive and negative prompts -----------------------------------------

def test_two_directions_splits_opposite_rows_and_keeps_one_direction_whole():
    g = torch.Generator().manual_seed(0)
    v, w = torch.randn(32, generator=g), torch.randn(32, generator=g)
    rows = torch.stack([v + 0.1 * torch.randn(32, generator=g) for _ in range(6)]
                       + [-v + w + 0.1 * torch.randn(32, generator=g) for _ in range(4)])
    perm = torch.randperm(10, generator=g)
    assign = analyze.two_directions(rows[perm])
    truth = (perm >= 6).long().tolist()
    assert assign == truth or assign == [1 - a for a in truth]
    assert analyze.two_directions(v.expand(10, -1)) == [0] * 10  # EPT*'s copies: one direction
    assert analyze.two_directions(v[None]) == [0]


def test_directions_analysis_names_the_label_aligned_group_and_scores_each_alone(root, tiny_model_dir, tmp_path):
    ablate.main(["table1", "--models", str(tiny_model_dir), "--tasks", "cb", "--methods", "ptuning", "--seeds", "0",
                 *driver(root), *TRAIN])
    (row,) = [r for r in files.read_jsonl(root / "results" / "table1.jsonl") if r["method"] == "ptuning"]
    config, embedding, tokenizer = analyze.frozen_embedding(row["run"], {})
    labels = analyze.label_vectors(config["meta"]["labels"], embedding, tokenizer)
    g = torch.Generator().manual_seed(1)
    other = torch.randn(embedding.size(1), generator=g)
    # hand-made P': rows 1, 4, 7 along label "1"'s embedding, the rest along an unrelated direction
    prompt = torch.stack([labels["1"] * 3 if i in (1, 4, 7) else other + 0.05 * torch.randn_like(other)
                          for i in range(10)])
    save_folded_prompt(Path(row["run"]) / "prompt.pt", prompt)
    out = analyze.main(["directions", "--model", Path(tiny_model_dir).name, "--results-dir", str(root / "results"),
                        "--tasks", "cb", "--max-eval-examples", "6", "--eval-batch-size", "8"])["directions"]["cb"]["ptuning"]
    positive, negative = out["groups"]
    assert (positive["name"], positive["rows"]) == ("positive", [1, 4, 7])
    assert negative["name"] == "negative" and negative["rows"] == [0, 2, 3, 5, 6, 8, 9]
    assert positive["label_cosine"]["1"] == pytest.approx(1.0, abs=1e-5)
    assert positive["label_cosine_max"] > negative["label_cosine_max"]
    alone = outputs.evaluate_run(row["run"], split="test", prompt=prompt[[1, 4, 7]], max_examples=6, batch_size=8,
                                  write=False, quiet=True)["score"]
    full = outputs.evaluate_run(row["run"], split="test", max_examples=6, batch_size=8, write=False, quiet=True)
    assert positive["score"] == alone and out["full_score"] == full["score"]
    report.main(["--results", str(root / "results"), "--out", str(tmp_path / "report")])
    index = (tmp_path / "report" / "index.md").read_text()
    assert (tmp_path / "report" / "figA1_directions.png").stat().st_size > 10_000
    assert "| CB | P-Tuning | positive | 1 4 7 |" in index and "| CB | P-Tuning | full prompt |" in index
    assert "## Table 5: task details" in index and "| GLUE | MRPC | paraphrase |" in index
    assert "fig1_superglue.png" in index
