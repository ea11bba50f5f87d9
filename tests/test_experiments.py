"""The experiment layer: drivers (ablate.py, fewshot.py), analyses, report and PEFT export, on a tiny T5.

    python -m pytest -q tests/test_experiments.py                 # ~1 minute on 2 CPU cores
    EPT_SMOKE=1 python -m pytest -q tests/test_experiments.py -k smoke   # + the whole SMOKE recipe (minutes)

Real tiny runs (prepare_data.py on the repository's fixture files, a random tiny T5, a few steps)
go through the real CLIs; the numbers are noise, the files and their contracts are what is checked:
run enumeration and names, resume (a second call trains nothing), results rows, the PEFT adapter
files (names, keys, shapes, config fields) and PEFT's own forward/generate logic on them, the
analyses on hand-made and trained runs, and a report that never crashes on missing results.
"""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

import ablate
import analyze
import export
import fewshot
import model as M
import report
import tables
from ept import cli, options, outputs, runtime
from ept import grid as ept_grid
from conftest import save_folded_prompt

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--max-steps", "3", "--eval-every", "2", "--max-eval-examples", "6", "--eval-batch-size", "8",
         "--batch-size", "4"]
# PEFT 0.17 PromptTuningConfig.to_dict() keys (PeftConfigMixin + PeftConfig + PromptLearningConfig +
# PromptTuningConfig); PEFT drops (with a warning) keys it does not know, so an exported config must
# stay within these.
PEFT_PROMPT_TUNING_FIELDS = {"auto_mapping", "base_model_name_or_path", "revision", "peft_type", "task_type",
                             "inference_mode", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
                             "num_attention_heads", "num_layers", "modules_to_save", "prompt_tuning_init",
                             "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs", "peft_version"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_model_dir):
    """prepare_data.py on the fixture files of a few tasks, with k = 4 few-shot samples."""
    import prepare_data
    out = tmp_path_factory.mktemp("data")
    prepare_data.main(["--source", str(REPO / "tests" / "fixtures" / "raw"), "--tasks", "rte", "cb", "stsb",
                       "--out", str(out), "--tokenizer", str(tiny_model_dir), "--fewshot", "4", "--fewshot-seeds", "0"])
    return out


def driver_args(tiny_model_dir, data_dir, root):
    return ["--data-dir", str(data_dir), "--runs-dir", str(root / "runs"), "--results-dir", str(root / "results")]


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_model_dir, data_dir):
    """A small Table 1 grid, trained once: rte and cb x pt, ptuning, ept, ept_star, seed 0."""
    root = tmp_path_factory.mktemp("grid")
    ablate.main(["table1", "--models", str(tiny_model_dir), "--tasks", "rte", "cb", "--methods", "pt", "ptuning",
                 "ept", "ept_star", "--seeds", "0", *driver_args(tiny_model_dir, data_dir, root), *TRAIN])
    return root


def count_training(monkeypatch):
    calls = []
    real = ept_grid.run_in_process
    monkeypatch.setattr(ept_grid, "run_in_process", lambda argv: calls.append(list(argv)) or real(argv))
    return calls


# --- enumeration, names, dry run ---------------------------------------------------------------

def test_run_names_share_defaults_and_argv_is_train_py_s():
    main = options.run_name(ept_grid.spec("boolq", "ept", "t5-base", 0))
    assert main == "boolq_ept_t5-base_s0"
    assert options.run_name(ept_grid.spec("boolq", "ept", "t5-base", 0, hidden_size=1, lr=0.3, init="uniform")) == main
    assert options.run_name(ept_grid.spec("boolq", "ept", "t5-base", 1, hidden_size=50)) == "boolq_ept_t5-base_h50_s1"
    assert options.run_name(ept_grid.spec("cb", "ft", "x/t5-small", 0, lr=1e-3, fewshot_k=16, fewshot_seed=2,
                                       max_steps=10000)) == "cb_ft_t5-small_lr0.001_steps10000_k16_fs2_s0"
    assert options.run_name(ept_grid.spec("cola", "ept_star", "t5-base", 0, broadcast=10)) == "cola_ept_star_t5-base_s0"
    assert [options.run_name(ept_grid.spec("boolq", "ept", "t5-base", 0, **ablate.STRUCTURES[v]))
            for v in ("relu", "tanh", "sigmoid")] == [f"boolq_ept_t5-base_{a}_s0" for a in ("relu", "tanh", "sigmoid")]
    # every experiment's every run is a valid train.py command line (no flag train.py does not know)
    for name, build in ablate.EXPERIMENTS.items():
        args = ablate.parser.parse_args([name, "--lr-search"])
        for spec in build(args) + fewshot.specs(fewshot.parser.parse_args([])):
            settings = {k: v for k, v in spec.items() if k != "_row"}
            parsed, unknown = options.parser.parse_known_args(ept_grid.train_argv(settings, "runs/x", "data"))
            assert not unknown, unknown
            assert parsed.task == spec["task"] and parsed.method == spec["method"] and parsed.seed == spec["seed"]


def test_dry_run_counts_the_paper_grids(tmp_path, capsys):
    expected = {"table1": 702, "table2": 144, "table4": 45, "init": 36, "hidden": 105, "broadcast": 60, "lr": 600,
                "structure": 90}
    for name, n in expected.items():
        ablate.main([name, "--dry-run", "--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
        assert f"DRY-RUN {name} runs={n} to_train={n} " in capsys.readouterr().out
    fewshot.main(["--dry-run", "--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    assert "DRY-RUN fewshot runs=1404 to_train=1404 " in capsys.readouterr().out  # 13 tasks x 3 k x 6 methods x 6 seeds
    plan = (tmp_path / "dry_run.tsv").read_text().splitlines()
    assert len(plan) == sum(expected.values()) + 1404
    assert all(float(line.split("\t")[2]) > 0 for line in plan)  # a GPU-hour estimate per run
    assert not (tmp_path / "runs").exists()  # a dry run trains nothing


# --- drivers: train, collect, resume -------------------------------------------------------------

def test_driver_trains_once_then_resumes_nothing(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    calls = count_training(monkeypatch)
    argv = ["init", "--model", str(tiny_model_dir), "--tasks", "rte", "--seeds", "0",
            *driver_args(tiny_model_dir, data_dir, tmp_path), *TRAIN]
    rows = ablate.main(argv)
    assert len(calls) == 3 and len(rows) == 3  # uniform, vocab, label
    results = tmp_path / "results" / "init.jsonl"
    lines = results.read_text().splitlines()
    assert len(lines) == 3
    row = json.loads(lines[0])
    assert row["experiment"] == "init" and row["task"] == "rte" and row["method"] == "ept"
    assert row["variant"] == "uniform" and row["max_steps"] == 3  # what train.py ran with, pass-through included
    assert row["n_trainable"] == 2 * 32 + 32 and row["n_inference"] == 32  # EPT, d = 32, h = 1: one row kept
    assert row["prompt_norm"] > 0 and row["final_prompt_norm"] > 0 and "score" in row["test"]
    # the pass-through --max-steps 3 --eval-every 2 are in the name: it says what trained
    assert row["run"].endswith(f"rte_ept_{Path(tiny_model_dir).name}_steps3_ev2_s0")

    calls.clear()
    ablate.main(argv)  # all finished: nothing trains, no row is appended twice
    assert calls == []
    assert results.read_text().splitlines() == lines

    (Path(row["run"]) / "metrics.json").unlink()  # an unfinished run is resumed from its last.pt
    ablate.main(argv)
    assert len(calls) == 1 and "--resume" in calls[0]
    assert (Path(row["run"]) / "metrics.json").exists()
    assert len(results.read_text().splitlines()) == 3


def test_fewshot_driver_warns_about_samples_of_the_old_rule(tmp_path, capsys):
    """Samples drawn k per class (meta.json without the rule) are used as they are, with one warning."""
    for task, rule in (("rte", None), ("cb", "k in all, classes balanced")):
        (tmp_path / task).mkdir()
        (tmp_path / task / "train_k4_seed0.jsonl").write_text("")
        entry = {"file": "train_k4_seed0.jsonl", "size": 8, **({"rule": rule} if rule else {})}
        (tmp_path / task / "meta.json").write_text(json.dumps({"fewshot": {"k4_seed0": entry}}))
    args = fewshot.parser.parse_args(["--data-dir", str(tmp_path), "--tasks", "rte", "cb", "--shots", "4",
                                      "--seeds", "0"])
    fewshot.check_samples(args)
    err = capsys.readouterr().err
    assert "files of rte in" in err and "k examples per class" in err and "--tasks rte --out" in err
    args.tasks = ["cb"]
    fewshot.check_samples(args)
    assert capsys.readouterr().err == ""


def test_fewshot_driver_uses_the_k_shot_sample(tiny_model_dir, data_dir, tmp_path):
    rows = fewshot.main(["--model", str(tiny_model_dir), "--tasks", "rte", "--shots", "4", "--seeds", "0",
                         "--methods", "ept", "ft", "--prune-ft-checkpoints",
                         *driver_args(tiny_model_dir, data_dir, tmp_path), *TRAIN])
    assert {r["method"] for r in rows} == {"ept", "ft"}
    for r in rows:
        assert (Path(r["run"]) / "best.pt").exists() == (r["method"] != "ft")  # ft checkpoints pruned
        assert (Path(r["run"]) / "metrics.json").exists()
        config = json.loads((Path(r["run"]) / "config.json").read_text())
        assert config["train_file"].endswith("train_k4_seed0.jsonl") and config["train_size"] == 4  # k in all
        assert r["fewshot_k"] == 4 and r["fewshot_seed"] == 0
        assert config["lr"] == (1e-3 if r["method"] == "ft" else 0.3)  # Appendix B.2, few-shot
    assert "k-shot" in tables.experiment_table("fewshot", rows)


# --- PEFT export ---------------------------------------------------------------------------------

def peft_forward(t5, peft_config, prompt_embeddings, input_ids, attention_mask, labels):
    """PeftModelForSeq2SeqLM.forward for PROMPT_TUNING (PEFT 0.17), transcribed: what PEFT does with the files."""
    n = peft_config["num_virtual_tokens"]
    embedding = torch.nn.Embedding(n * peft_config["num_transformer_submodules"], peft_config["token_dim"])
    embedding.load_state_dict({"weight": prompt_embeddings}, strict=True)  # set_peft_model_state_dict
    prompts = embedding.weight.unsqueeze(0).repeat(input_ids.size(0), 1, 1)  # get_prompt, inference_mode
    inputs_embeds = torch.cat((prompts[:, :n], t5.get_input_embeddings()(input_ids)), dim=1)
    mask = torch.cat((torch.ones(input_ids.size(0), n, dtype=attention_mask.dtype), attention_mask), dim=1)
    assert peft_config["num_transformer_submodules"] == 1  # else PEFT prepends prompts[:, n:] to the decoder
    return t5(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels)


def load_adapter(out_dir):
    """(adapter_config dict, prompt_embeddings tensor): what PEFT's loader reads from the folder."""
    from safetensors.torch import load_file
    return (json.loads((out_dir / export.ADAPTER_CONFIG).read_text()),
            load_file(str(out_dir / export.ADAPTER_WEIGHTS))[export.PROMPT_KEY])


def test_export_writes_what_peft_loads(grid, tiny_model_dir, tmp_path):
    run = grid / "runs" / f"rte_ept_star_{Path(tiny_model_dir).name}_steps3_ev2_s0"
    out = tmp_path / "adapter"
    export.main([str(run), str(out)])
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    config, weights = load_adapter(out)
    assert set(config) <= PEFT_PROMPT_TUNING_FIELDS
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "SEQ_2_SEQ_LM"
    assert config["num_virtual_tokens"] == 10 and config["token_dim"] == 32 and config["inference_mode"] is True
    assert config["num_transformer_submodules"] == 1 and config["prompt_tuning_init"] == "RANDOM"
    assert config["num_layers"] == 2 and config["num_attention_heads"] == 4  # from the tiny T5's config
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    from safetensors import safe_open
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert list(f.keys()) == ["prompt_embeddings"] and f.metadata() == {"format": "pt"}
    prompt, _ = outputs.load_folded_prompt(run / "prompt.pt")
    assert weights.dtype == torch.float32 and weights.shape == (10, 32)
    assert torch.equal(weights, prompt)  # bitwise the folded P'
    assert torch.equal(weights, weights[:1].expand(10, -1))  # EPT*: one row broadcast

    # PEFT's forward on the exported files == our PromptedT5 with the folded prompt
    t5 = runtime.load_t5(str(tiny_model_dir)).eval()
    ids = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([[10, 1], [11, 1]])
    ours = M.PromptedT5(t5, M.FoldedPrompt(prompt)).eval()
    torch.testing.assert_close(peft_forward(t5, config, weights, ids, mask, labels).loss,
                               ours(ids, mask, labels=labels).loss, rtol=0, atol=0)

    last = tmp_path / "adapter_last"
    export.main([str(run), str(last), "--checkpoint", "last"])  # folds last.pt's prompt module once
    assert load_adapter(last)[1].shape == (10, 32)


def test_export_refuses_full_fine_tuning(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"method": "ft", "model": "t5-base", "task": "rte"}))
    with pytest.raises(cli.Failure, match="no prompt"):
        export.export(tmp_path, tmp_path / "out")


# --- analyses ------------------------------------------------------------------------------------

def test_cosine_of_identical_rows_is_one_and_norm_curves_read_the_log(tmp_path):
    row = torch.randn(1, 16)
    torch.testing.assert_close(analyze.cosine_matrix(row.expand(10, -1)), torch.ones(10, 10))
    eye = analyze.cosine_matrix(torch.eye(4) * 3)
    torch.testing.assert_close(eye, torch.eye(4))
    handmade = tmp_path / "boolq_ept_star_s0"  # a run folder holding only prompt.pt: 10 copies of one row
    handmade.mkdir()
    save_folded_prompt(handmade / "prompt.pt", row.expand(10, -1), {"task": "boolq"})
    heat = analyze.prompt_cosines([{"run": str(handmade), "task": "boolq", "method": "ept_star", "seed": 0}],
                                  ["boolq"], ["ept_star"], seed=0)["boolq"]["ept_star"]
    torch.testing.assert_close(torch.tensor(heat["cosine"]), torch.ones(10, 10))
    assert heat["norms"] == pytest.approx([row.norm().item()] * 10)
    runs = []
    for seed, scale in ((0, 1.0), (1, 3.0)):  # two seeds: the curves are their mean
        run = tmp_path / f"rte_pt_s{seed}"
        run.mkdir()
        events = [{"event": "setup", "step": 0}]
        for step in range(1, 5):
            events.append({"event": "train", "step": step, "loss": 1.0, "prompt_norm": scale * step})
            if step % 2 == 0:
                events.append({"event": "eval", "step": step, "split": "validation", "score": scale * 10 * step})
        events.append({"event": "end", "step": 4})
        (run / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        runs.append({"run": str(run), "task": "rte", "method": "pt", "seed": seed})
    steps, norms, eval_steps, scores = outputs.curves(runs[0]["run"])
    assert steps == [1, 2, 3, 4] and norms == [1.0, 2.0, 3.0, 4.0] and eval_steps == [2, 4] and scores == [20, 40]
    curves = analyze.norm_curves(runs, ["rte"], ["pt"])["rte"]["pt"]
    assert curves["prompt_norm"] == [2.0, 4.0, 6.0, 8.0] and curves["score"] == [40.0, 80.0]
    assert curves["seeds"] == [0, 1]
    s, v = analyze.downsample(list(range(1000)), list(range(1000)), max_points=100)
    assert len(s) <= 101 and s[-1] == 999 and s[0] == 0


def test_analyses_of_trained_runs(grid, tiny_model_dir, data_dir):
    tag = Path(tiny_model_dir).name
    written = analyze.main(["all", "--model", tag, "--results-dir", str(grid / "results"),
                            "--tasks", "rte", "cb", "--methods", "pt", "ptuning", "ept_star", "--lengths", "1", "2",
                            "--max-eval-examples", "4", "--top-k", "3"])
    assert set(written) == {"norms", "cosine", "subset", "transfer", "neighbours", "directions"}
    analysis = grid / "results" / "analysis"
    norms = json.loads((analysis / "norms.json").read_text())["norms"]
    assert len(norms["rte"]["pt"]["step"]) == 3 and len(norms["rte"]["pt"]["eval_step"]) == 2  # steps 1..3; eval 2, 3
    cosine = json.loads((analysis / "cosine.json").read_text())["cosine"]
    assert torch.allclose(torch.tensor(cosine["rte"]["ept_star"]["cosine"]), torch.ones(10, 10), atol=1e-5)
    assert len(cosine["rte"]["pt"]["cosine"]) == 10
    subset = json.loads((analysis / "subset.json").read_text())["subset"]
    assert subset["rte"]["ptuning"]["lengths"] == [1, 2] and len(subset["rte"]["ptuning"]["score"]) == 2
    transfer = json.loads((analysis / "transfer.json").read_text())["transfer"]
    assert transfer["tasks"] == ["rte", "cb"] and len(transfer["score"]) == 2 and len(transfer["cosine"][0]) == 2
    assert transfer["cosine"][0][0] == pytest.approx(1.0, abs=1e-5)
    neighbours = json.loads((analysis / "neighbours.json").read_text())["neighbours"]
    assert len(neighbours["rte"]["pt"]["rows"]) == 10 and len(neighbours["rte"]["ept_star"]["rows"]) == 1
    assert len(neighbours["rte"]["pt"]["rows"][0]["neighbours"]) == 3
    directions = json.loads((analysis / "directions.json").read_text())["directions"]
    assert sorted(r for g in directions["rte"]["ptuning"]["groups"] for r in g["rows"]) == list(range(10))


def test_subset_broadcast_of_identical_rows_reproduces_the_whole_prompt(grid, tiny_model_dir):
    """EPT*'s P' is one row x 10: repeating row 0 ten times is the same prompt, hence the same predictions."""
    run = grid / "runs" / f"rte_ept_star_{Path(tiny_model_dir).name}_steps3_ev2_s0"
    prompt, _ = outputs.load_folded_prompt(run / "prompt.pt")
    whole = outputs.evaluate_run(run, split="test", write=False, quiet=True, max_examples=6)
    again = outputs.evaluate_run(run, split="test", prompt=prompt[0].expand(10, -1).clone(), write=False,
                                  quiet=True, max_examples=6)
    assert whole["score"] == again["score"]


# --- report --------------------------------------------------------------------------------------

def gfm_table_problems(text):
    """Where `text` (markdown) holds a table line ('|' first) that markdown-it-py's GFM tables do not read as a
    table row, or a row whose cells (unescaped '|') differ in number from its table's header: [] when none."""
    from markdown_it import MarkdownIt
    lines, problems = text.splitlines(), []
    cells = lambda line: len(re.split(r"(?<!\\)\|", line.strip()[1:-1]))
    tables = [t.map for t in MarkdownIt("commonmark").enable("table").parse(text) if t.type == "table_open"]
    covered = {n for start, end in tables for n in range(start, end)}
    problems += [f"line {n + 1} is no table row: {line[:60]}" for n, line in enumerate(lines)
                 if line.startswith("|") and n not in covered]
    for start, end in tables:
        problems += [f"line {n + 1} has {cells(lines[n])} cells, its header {cells(lines[start])}"
                     for n in range(start, end) if cells(lines[n]) != cells(lines[start])]
    return problems


def test_the_table_checker_finds_a_split_header():
    good = "| a | \\|Train\\| |\n|---|---|\n| 1 | 2 |\n"
    assert gfm_table_problems(good) == []
    assert gfm_table_problems(good.replace("\\|", "|"))  # |Train| unescaped: 4 header cells, 2 columns
    assert gfm_table_problems(good + "| 1 | 2 | 3 |\n")


def test_report_refuses_a_results_folder_that_does_not_exist(tmp_path):
    with pytest.raises(SystemExit) as exc:
        report.main(["--results", str(tmp_path / "none"), "--out", str(tmp_path / "report")])
    assert str(exc.value.code).startswith("report: there is no results folder") and "\n" not in str(exc.value.code)
    assert not (tmp_path / "report").exists()  # nothing written


def test_report_on_nothing_notes_every_missing_item(tmp_path):
    (tmp_path / "none").mkdir()
    missing = report.main(["--results", str(tmp_path / "none"), "--out", str(tmp_path / "report")])
    index = (tmp_path / "report" / "index.md").read_text()
    assert len(missing) == len(tables.TABLES) + len(report.FIGURES)
    assert index.count("*Missing") == len(tables.TABLES) and index.count("*Skipped") == len(report.FIGURES)
    assert not list((tmp_path / "report").glob("*.png"))
    assert "Runs that failed" not in index


def test_report_lists_the_runs_the_collect_step_found_failed(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "lr.failed.json").write_text(json.dumps({"runs/rte_ept_t5-base_lr1e+30_s0": "train: "
                                                                     "non-finite prompt_norm at step 1 ..."}))
    report.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "report")])
    index = (tmp_path / "report" / "index.md").read_text()
    assert "## Runs that failed" in index
    assert "- lr: `runs/rte_ept_t5-base_lr1e+30_s0`: train: non-finite prompt_norm at step 1 ..." in index
    assert "report: failed lr runs/rte_ept_t5-base_lr1e+30_s0: train: non-finite" in capsys.readouterr().out


def fake_row(experiment, task, method, seed, score, **kw):
    row = {"experiment": experiment, "run": f"runs/{task}_{method}_{seed}_{kw}", "task": task, "method": method,
           "seed": seed, "score": score, "model_tag": "t5-base", "lr": options.defaults(method)["lr"],
           "n_trainable": 2304 if method.startswith("ept") else 7680, "n_inference": 768, "val_score": score,
           "prompt_norm": 10.0, "final_prompt_norm": 12.0, "prompt_length": 10, "depth": 1, "init": "uniform",
           "fewshot_k": None}
    return {**row, **kw}


def test_report_tables_and_figures_from_rows(tmp_path):
    results = tmp_path / "results"
    rows = [fake_row("table1", "rte", "ept", s, 70.0 + 2 * s) for s in range(3)]
    rows += [fake_row("table1", "rte", "pt", 0, 50.0), fake_row("table1", "cb", "pt", 0, 40.0, lr=0.01, val_score=1.0),
             fake_row("table1", "cb", "pt", 0, 45.0, lr=0.1, val_score=9.0, run="runs/cb_pt_lr0.1")]
    rows += [fake_row("hidden", t, "ept", s, 60.0 + h / 100 + s, variant=h, hidden_size=h, run=f"r/{t}{h}{s}")
             for t in ("boolq", "rte", "wsc") for h in (1, 10, 100) for s in (0, 1)]
    rows += [fake_row("structure", "boolq", "ept", 0, 60.0 + i, variant=v, run=f"r/s{v}")
             for i, v in enumerate(ablate.STRUCTURES)]
    rows += [fake_row("lr", t, m, 0, 50.0 + i, variant=lr, lr=lr, run=f"r/lr{t}{m}{lr}")
             for t in ("boolq", "cb", "wic", "wsc", "multirc") for m in ("pt", "ept")
             for i, lr in enumerate((0.01, 0.3))]
    for experiment in ("table1", "hidden", "structure", "lr"):
        outputs.append_jsonl(results / f"{experiment}.jsonl", [r for r in rows if r["experiment"] == experiment])
    for task, sizes in (("rte", (2490, 138, 139)), ("cb", (250, 28, 28))):  # Table 5 reads <results>/../data
        meta = {"splits": dict(zip(("train", "validation", "test"), sizes)), "score": ["acc"], "metrics": ["acc"],
                "task_type": "NLI"}
        (tmp_path / "data" / task).mkdir(parents=True)
        (tmp_path / "data" / task / "meta.json").write_text(json.dumps(meta))
    missing = report.main(["--results", str(results), "--out", str(tmp_path / "report")])
    for md in (tmp_path / "report").glob("*.md"):  # every table parses as a GFM table (markdown-it-py)
        assert gfm_table_problems(md.read_text()) == [], md.name
    assert "| \\|Train\\| | \\|Valid\\| | \\|Test\\| |" in (tmp_path / "report" / "table5.md").read_text()
    index = (tmp_path / "report" / "index.md").read_text()
    assert "## Table 1: GLUE and SuperGLUE (mean ± std over seeds)" in index and "SMOKE" not in index
    assert "# structure sweep (1 seed)" in (tmp_path / "report" / "sweep_structure.md").read_text()
    from PIL import Image
    width, height = Image.open(tmp_path / "report" / "fig8_learning_rate.png").size
    assert width < 2.5 * height  # 5 tasks + the average in a 3-wide grid, not six panels in a row
    table1 = (tmp_path / "report" / "table1.md").read_text().split("The paper's numbers")[0]  # ours, not the paper's
    assert "| t5-base | EPT | 2.3K | – | – | 72.0 ± 2.0 |" in table1  # CoLA, MRPC missing; RTE mean ± std
    assert "| t5-base | PT | 7.6K |" in table1 and "45.0" in table1 and "40.0" not in table1  # best-by-validation lr
    for png in ("fig5_hidden_size.png", "fig12_hidden_size.png", "fig9_structure.png"):
        assert (tmp_path / "report" / png).stat().st_size > 10_000
    assert "fig12_hidden_size.png" in (tmp_path / "report" / "index.md").read_text()
    assert any("Table 2" in m for m in missing) and not any("Figures 5 and 12" in m for m in missing)
    assert tables.human(2304) == "2.3K" and tables.human(1779456) == "1.7M" and tables.human(624784) == "624K"


def test_a_failed_report_leaves_no_folder(tmp_path):
    results = tmp_path / "results"
    outputs.append_jsonl(results / "table1.jsonl", [fake_row("table1", "rte", "ept", 0, 70.0)])
    with (results / "hidden.jsonl").open("w") as f:  # a damaged row: report.py fails in one sentence
        f.write(json.dumps({"task": "rte"}) + "\n")
    with pytest.raises(SystemExit, match="is damaged"):
        report.main(["--results", str(results), "--out", str(tmp_path / "report")])
    assert not (tmp_path / "report").exists()
    (tmp_path / "old").mkdir()  # a folder that was there stays
    with pytest.raises(SystemExit):
        report.main(["--results", str(results), "--out", str(tmp_path / "old")])
    assert (tmp_path / "old").is_dir()


def test_report_skips_figures_of_untested_rows_with_a_note(tmp_path):
    """--no-test rows (score None) in every sweep: each figure without a score is skipped with a note
    (the hidden-size sweep's log axis crashed the report: "Data cannot be log-scaled")."""
    results = tmp_path / "results"
    untested = dict(tested=False, test=None)
    rows = {"hidden": [fake_row("hidden", t, "ept", 0, None, variant=h, hidden_size=h, run=f"r/{t}{h}", **untested)
                       for t in ("rte", "wsc") for h in (1, 5)],
            "broadcast": [fake_row("broadcast", "cola", "ept_star", 0, None, variant=n, run=f"r/b{n}", **untested)
                          for n in (1, 2)],
            "lr": [fake_row("lr", "cb", "ept", 0, None, variant=lr, lr=lr, run=f"r/lr{lr}", **untested)
                   for lr in (0.01, 0.3)],
            "structure": [fake_row("structure", "boolq", "ept", 0, None, variant=v, run=f"r/s{v}", **untested)
                          for v in ablate.STRUCTURES]}
    for experiment, mine in rows.items():
        outputs.append_jsonl(results / f"{experiment}.jsonl", mine)
    missing = report.main(["--results", str(results), "--out", str(tmp_path / "report")])
    index = (tmp_path / "report" / "index.md").read_text()
    for figure in ("Figures 5 and 12", "Figure 7", "Figure 8", "Figure 9"):
        assert any(figure in m and "no test score" in m for m in missing), figure
    assert "no test score" in index and not list((tmp_path / "report").glob("fig*.png"))


def red_corner(png):
    """Reddish pixels in the lower right corner of a PNG (where a SMOKE stamp goes)."""
    from PIL import Image
    image = Image.open(png).convert("RGB")
    w, h = image.size
    r, g, b = torch.tensor(list(image.crop((int(w * 0.75), int(h * 0.93), w, h)).tobytes())).view(-1, 3).T
    return int(((r > 150) & (g < 120) & (b < 120)).sum())


def test_smoke_report_stamps_its_figures_and_says_what_is_not_noise(tmp_path):
    results = tmp_path / "results"
    rows = [fake_row("table1", t, m, 0, 0.0, run=f"r/{t}{m}") for t in tables.SUPERGLUE for m in ("ept", "ept_star")]
    outputs.append_jsonl(results / "table1.jsonl", rows)
    outputs.append_jsonl(results / "table2.jsonl", [fake_row("table2", "nq", "ept_star", 0, 0.0)])
    outputs.append_jsonl(results / "hidden.jsonl", [fake_row("hidden", "rte", "ept", 0, 1.0 + h, variant=h, run=f"r/{h}")
                                                  for h in (1, 5)])
    report.main(["--results", str(results), "--out", str(tmp_path / "smoke"), "--smoke"])
    report.main(["--results", str(results), "--out", str(tmp_path / "real")])
    index = (tmp_path / "smoke" / "index.md").read_text()
    assert "the numbers are noise** (the steering benchmark's section aside)" in index
    assert "These runs used a random-weight tiny T5, trained" in index
    assert "steering benchmark's section is not noise" in index and "noise" not in (tmp_path / "real" / "index.md").read_text()
    for png in ("fig1_superglue.png", "fig5_hidden_size.png"):
        assert red_corner(tmp_path / "smoke" / png) > 50 and red_corner(tmp_path / "real" / png) == 0, png
    assert report.STAMP["text"] is None  # nothing left for the next report in this process
    assert "the paper's text lost these cells of its EPT* row" in (tmp_path / "real" / "table2.md").read_text()


def test_figure1_points_in_a_fixed_order_and_figure9_without_superglue_is_skipped(tmp_path):
    tags, methods = ["t5-large", "t5-small", "t5-base"], ["ept", "ft", "pt", "ept_star"]
    rows = [fake_row("table1", "cb", m, 0, 50.0, model_tag=t, run=f"r/{t}{m}") for t in tags for m in methods]
    keys = list(report.superglue_averages(rows))  # Figure 1 draws its points in this order
    assert keys == [(t, m) for t in tables.MODEL_ORDER if t in tags for m in tables.METHOD_ORDER if m in methods]
    results = tmp_path / "results"  # structure rows on a GLUE task only: a note in index.md, no crash
    outputs.append_jsonl(results / "structure.jsonl",
                       [fake_row("structure", "rte", "ept", 0, 60.0, variant=v, run=f"r/{v}") for v in ablate.STRUCTURES])
    missing = report.main(["--results", str(results), "--out", str(tmp_path / "report")])
    assert any("no SuperGLUE rows" in m for m in missing)
    assert not (tmp_path / "report" / "fig9_structure.png").exists()


def test_report_draws_analysis_figures(grid, tmp_path, tiny_model_dir):
    tag = Path(tiny_model_dir).name
    analyze.main(["norms", "--model", tag, "--results-dir", str(grid / "results"), "--tasks", "rte", "cb"])
    analyze.main(["cosine", "--model", tag, "--results-dir", str(grid / "results"), "--tasks", "rte"])
    report.main(["--results", str(grid / "results"), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "fig2_norms.png").exists() and (tmp_path / "report" / "fig3_prompt_cosine.png").exists()
    assert "| tiny" in (tmp_path / "report" / "table1.md").read_text() or tag in (tmp_path / "report" / "table1.md").read_text()


# --- the whole recipe ----------------------------------------------------------------------------

REPORT_FILES = ["index.md", "table1.md", "table1.csv", "table2.md", "table3.md", "table4.md", "table6.md",
                "fig2_norms.png", "fig3_prompt_cosine.png", "fig4_subset_broadcast.png", "fig5_hidden_size.png",
                "fig7_broadcast.png", "fig8_learning_rate.png", "fig9_structure.png", "fig10_transfer.png",
                "fig11_norms.png", "fig12_hidden_size.png", "neighbours.md",
                "fig1_superglue.png", "table5.md", "table5.csv", "figA1_directions.png", "directions.md",
                "steer.md", "steer.csv", "steer_fig2.png"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("EPT_SMOKE") != "1", reason="the whole SMOKE recipe takes minutes: EPT_SMOKE=1")
def test_smoke_recipe_produces_every_table_and_figure():
    subprocess.run(["bash", "run_all.sh"], cwd=REPO, env={**os.environ, "SMOKE": "1"}, check=True)
    out = REPO / "smoke" / "report"
    for name in REPORT_FILES:
        assert (out / name).exists(), name
    index = (out / "index.md").read_text()
    assert "Skipped" not in index and "Missing" not in index
    assert "SMOKE report: the numbers are noise" in index and "## Table 1: GLUE and SuperGLUE (1 seed)" in index
    for md in out.glob("*.md"):  # every table renders: markdown-it-py's GFM tables read each one
        assert gfm_table_problems(md.read_text()) == [], md.name
    assert (REPO / "smoke" / "exports").is_dir()


def test_gpu_hour_estimate_rests_on_the_measured_step_times():
    """ept_grid.MEASURED_STEP_S / MEASURED_EVAL_S are the figures bench.py measured on the H200 (docs/gpu)."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "gpu"
    ept, ft = (json.loads((docs / f"run2_rte_{m}.json").read_text()) for m in ("ept", "ft"))
    assert "H200" in json.dumps(ept["machine"]) and ept["args"]["batch_size"] == 16
    assert ept_grid.MEASURED_STEP_S["prompt"] == pytest.approx(16 / ept["train"][0]["examples_per_s"], rel=1e-3)
    assert ept_grid.MEASURED_STEP_S["ft"] == pytest.approx(16 / ft["train"][0]["examples_per_s"], rel=1e-3)
    assert ept_grid.MEASURED_EVAL_S == pytest.approx(1 / ept["eval"][0]["examples_per_s"], rel=1e-3)
