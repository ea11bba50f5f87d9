"""Tests of prepare_data.py: the exact source/target strings of all 21 tasks from the official files
and from Hub rows, splits (Appendix B.1), few-shot sets, determinism, meta.json and bad input.

    python -m pytest -q tests/test_prepare_data.py

Offline: the Hub is replaced by a fake `datasets.load_dataset`. Needs the real T5 tokenizer in
../shared/data/t5 (skips without it); the split-size test also needs ../shared/data/raw.
"""
import csv
import errno
import gzip
import json
import math
import os
import re
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import prepare_data  # noqa: E402
from ept import cli, evaluation, files, outputs, tasks  # noqa: E402
from ept.tasks import GROUPS  # noqa: E402
from prepare_data import main, pad_punctuation, to_records  # noqa: E402

TASKS = {name: prepare_data.TASKS[name] for name in tasks.TASKS}  # the paper's 21

FIXTURES = ROOT / "tests" / "fixtures" / "raw"
SHARED = Path(__file__).resolve().parents[2] / "shared"
T5, RAW = SHARED / "data" / "t5", SHARED / "data" / "raw"
pytestmark = pytest.mark.skipif(not T5.is_dir(), reason="needs the T5 tokenizer in ../shared/data/t5")


def run(*argv, source=FIXTURES):
    args = [str(a) for a in argv] + ["--tokenizer", str(T5)]
    main(args + (["--source", str(source)] if source else []))


def read(out, task, split="train"):
    return [json.loads(line) for line in (out / task / f"{split}.jsonl").read_text().splitlines()]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    """All 21 tasks from the fixture files, as the SMOKE run of run_all.sh prepares them."""
    out = tmp_path_factory.mktemp("fixture_data")
    run("--tasks", "all", "--out", out, "--fewshot", 4, "--fewshot-seeds", 0, 1)
    return out


# ---------------------------------------------------------------------------- templates, both sources
# task -> (idx of a fixture train row, expected source, expected target, the same row in the Hub schema)
MRQA_SOURCE = ('question: Who wrote " Hamlet " ? context: Hamlet ( 1600 ) was written by William Shakespeare — '
               'the " Bard " — in the U . S . A . ? No : in England ; François_Roy disagreed .')
MRQA_ROW = {"context": 'Hamlet (1600) was written by William Shakespeare—the "Bard"—in the U.S.A.? No: in England; '
                       'François_Roy  disagreed.', "qid": "first0001", "question": 'Who wrote "Hamlet"?',
            "answers": ["William Shakespeare", "Shakespeare", 'the "Bard"']}
CASES = {
    "cola": (0, "sentence: The sailors rode the breeze clear of the rocks.", "1",
             {"sentence": "The sailors rode the breeze clear of the rocks.", "label": 1, "idx": 0}),
    "sst2": (0, "sentence: a gripping , funny film . ", "1", {"sentence": "a gripping , funny film . ", "label": 1, "idx": 0}),
    "mrpc": (0, 'sentence1: Amrozi accused his brother, whom he called "the witness", of lying. '
                'sentence2: Referring to him as "the witness", Amrozi accused his brother of lying.', "1",
             {"sentence1": 'Amrozi accused his brother, whom he called "the witness", of lying.',
              "sentence2": 'Referring to him as "the witness", Amrozi accused his brother of lying.', "label": 1, "idx": 0}),
    "qqp": (0, "question1: How do I learn Python fast? question2: What is the fastest way to learn Python?", "1",
            {"question1": "How do I learn Python fast?", "question2": "What is the fastest way to learn Python?",
             "label": 1, "idx": 0}),
    "stsb": (0, "sentence1: A plane is taking off. sentence2: An air plane is taking off.", "3.8",
             {"sentence1": "A plane is taking off.", "sentence2": "An air plane is taking off.",
              "label": 3.799999952316284, "idx": 0}),  # float32, as the Hub stores it
    "mnli": (0, "premise: That's all right. hypothesis: That's fine.", "0",
             {"premise": "That's all right.", "hypothesis": "That's fine.", "label": 0, "idx": 0}),
    "qnli": (0, "question: When did the war end? sentence: The war ended in 1945.", "0",
             {"question": "When did the war end?", "sentence": "The war ended in 1945.", "label": 0, "idx": 0}),
    "rte": (0, "sentence1: No Weapons of Mass Destruction Found in Iraq Yet. "
               "sentence2: Weapons of Mass Destruction Found in Iraq.", "1",
            {"sentence1": "No Weapons of Mass Destruction Found in Iraq Yet.",
             "sentence2": "Weapons of Mass Destruction Found in Iraq.", "label": 1, "idx": 0}),
    "boolq": (0, "question: is france the same timezone as the uk passage: Time in France -- France uses CET.", "0",
              {"question": "is france the same timezone as the uk", "passage": "Time in France -- France uses CET.",
               "idx": 0, "label": 0}),
    "cb": (0, "premise: It was a complex language. Not written down but handed down. "
              "hypothesis: the language was peeled down", "2",
           {"premise": "It was a complex language. Not written down but handed down.",
            "hypothesis": "the language was peeled down", "idx": 0, "label": 2}),
    "wic": (0, "sentence1: Do you want to come over to my place later? "
               "sentence2: A political system with no place for the less prominent groups. word: place", "0",
            {"word": "place", "sentence1": "Do you want to come over to my place later?",
             "sentence2": "A political system with no place for the less prominent groups.",
             "start1": 31, "start2": 27, "end1": 36, "end2": 32, "idx": 0, "label": 0}),
    # span1 "The chair." at the word "the": the wsc.fixed correction gives "the chair"; span2 shifts by 2
    "wsc": (1, "text: Sam pulled up * the chair * to the piano, but # it # was broken, so he had to stand instead.", "1",
            {"text": "Sam pulled up the chair to the piano, but it was broken, so he had to stand instead.",
             "span1_index": 3, "span2_index": 9, "span1_text": "the chair", "span2_text": "it", "idx": 1, "label": 1}),
    "multirc": (0, "question: Who did Ana meet? answer: Bo paragraph: Sent 1: Ana met Bo. Sent 2: They sang. ", "1",
                {"paragraph": "<b>Sent 1: </b>Ana met Bo.<br><b>Sent 2: </b>They sang.<br>",
                 "question": "Who did <b>Ana</b> meet?", "answer": "Bo",
                 "idx": {"paragraph": 0, "question": 0, "answer": 0}, "label": 1}),
    **{t: ("first0001", MRQA_SOURCE, "William Shakespeare", {"subset": TASKS[t].subset, **MRQA_ROW})
       for t in GROUPS["mrqa"]},
    "winogrande": (0, "sentence: He never comes to my home, but I always go to his house because the _ is smaller. "
                      "option0: home option1: house", "1",
                   {"sentence": "He never comes to my home, but I always go to his house because the _ is smaller.",
                    "option1": "home", "option2": "house", "answer": "2"}),
    "yelp": (0, 'sentence: Great tacos, ""really"" good.\\nWill come back!', "1",  # HF keeps "" and literal \n
             {"text": 'Great tacos, ""really"" good.\\nWill come back!', "label": 1}),
    "scitail": (0, "premise: Humans normally have 23 pairs of chromosomes. "
                   "hypothesis: Humans typically have 23 pairs of chromosomes.", "0",
                {"sentence1": "Humans normally have 23 pairs of chromosomes.",
                 "sentence2": "Humans typically have 23 pairs of chromosomes.", "gold_label": "entailment"}),
    "paws": (1, "sentence1: In Paris , in October 1560 , he met the ambassador . "
                "sentence2: In October 1560 , he met the ambassador in Paris .", "1",
             {"id": 1, "sentence1": "In Paris , in October 1560 , he met the ambassador .",
              "sentence2": "In October 1560 , he met the ambassador in Paris .", "label": 1}),
}


def test_registry():
    assert set(TASKS) == set(CASES) and len(TASKS) == 21
    # the paper's column order (Tables 1 and 2): the drivers and the report take it from here
    assert list(TASKS) == ["cola", "mrpc", "rte", "stsb", "mnli", "qnli", "qqp", "sst2", "boolq", "cb", "wic", "wsc",
                           "multirc", "nq", "hotpotqa", "searchqa", "newsqa", "winogrande", "yelp", "scitail", "paws"]
    assert {b: len(names) for b, names in GROUPS.items()} == {"glue": 8, "superglue": 5, "mrqa": 4, "others": 4}
    # one list of tasks: prepare_data.py's tasks and recipes are those of ept/tasks.py, in their order
    assert list(prepare_data.TASKS) == list(prepare_data.RECIPES) == [*tasks.TASKS, *tasks.STEER_TASKS]
    assert tasks.TASKS["cb"] == "aps/super_glue" and prepare_data.TASKS["yelp"].benchmark == "others"
    assert tasks.STEER_TASKS == [f"steer_{r}" for r in prepare_data.STEER_RULES if r != prepare_data.STEER_DEFAULT]


@pytest.mark.parametrize("task", list(CASES))
def test_template_local(fixture_data, task):
    idx, source, target, _ = CASES[task]
    (rec,) = [r for r in read(fixture_data, task) if r["idx"] == idx]
    assert (rec["source"], rec["target"]) == (source, target)


@pytest.mark.parametrize("task", list(CASES))
def test_template_hub_row_gives_the_local_record(fixture_data, task):
    idx, source, target, row = CASES[task]
    (rec,) = json.loads(json.dumps(to_records(TASKS[task], [row], "hub")))  # position 0 = first fixture row
    assert (rec["source"], rec["target"]) == (source, target)
    assert rec == [r for r in read(fixture_data, task) if r["idx"] == idx][0]


def test_extra_fields(fixture_data):
    mrqa = [r for r in read(fixture_data, "nq") if r["idx"] == "first0001"][0]
    assert mrqa["answers"] == ["William Shakespeare", "Shakespeare", 'the " Bard "'] and mrqa["label"] == "William Shakespeare"
    multirc = read(fixture_data, "multirc")
    assert multirc[0]["question_id"] == 0 and all("<b>" not in r["source"] and "<br>" not in r["source"] for r in multirc)
    rte_dev = [r for s in ("validation", "test") for r in read(fixture_data, "rte", s) if r["idx"] == 0]
    assert rte_dev[0]["source"] == 'sentence1: Dana said "hello" to Ben. sentence2: Dana greeted Ben.'  # QUOTE_NONE


def test_stsb_targets_follow_the_public_code_s_point_one_grid(fixture_data):
    targets = {r["idx"]: (r["label"], r["target"]) for r in read(fixture_data, "stsb")}
    # the public EPT code's np.round((label * 5) / 5, decimals=1): the 0.1 grid (T5's 0.2 grid would
    # give "2.4" and "4.8" for 2.5 and 4.9)
    assert [targets[i] for i in range(4)] == [(3.8, "3.8"), (2.5, "2.5"), (0.636, "0.6"), (4.9, "4.9")]
    row = lambda y: {"label": y, "sentence1": "a", "sentence2": "b", "idx": 0}
    assert [prepare_data.stsb(row(y), 0)["target"] for y in (2.25, 3.14159, 0.04, 5.0)] == ["2.2", "3.1", "0.0", "5.0"]


def test_stsb_fewshot_follows_the_public_code():
    """A score <= 2.5 is class 0, else 1; at most ceil(k/2) of each, first-come, from the training set
    shuffled by the seed: a scarce class gives what it has, and the sample is then smaller than k."""
    train = [{"source": f"s{i}", "target": "x", "label": 2.5 if i < 5 else 4.0, "idx": i} for i in range(100)]
    for seed in range(4):
        shots = prepare_data.fewshot(TASKS["stsb"], train, 16, seed)
        assert sorted(r["label"] for r in shots) == [2.5] * 5 + [4.0] * 8  # 2.5 itself is class 0
        order = list(train)
        random.Random(seed).shuffle(order)
        assert shots == [r for r in order if r["label"] == 2.5 or r in shots]  # first-come, in the shuffle
        assert [r for r in shots if r["label"] == 4.0] == [r for r in order if r["label"] == 4.0][:8]
    balanced = [{"source": f"s{i}", "target": "x", "label": i % 26 / 5, "idx": i} for i in range(100)]
    for k in (4, 5, 16):
        shots = prepare_data.fewshot(TASKS["stsb"], balanced, k, 0)
        low = sum(r["label"] <= 2.5 for r in shots)
        assert len(shots) == k and max(low, k - low) == math.ceil(k / 2)


def test_pad_punctuation_keeps_letters_numbers_marks_underscore():
    assert pad_punctuation("e\u0301t\u00e9_x ½ 3,5€ (ok)") == "e\u0301t\u00e9_x ½ 3 , 5 € ( ok )"
    assert pad_punctuation("  a\t\n-b  ") == "a - b"


def test_meta(fixture_data):
    for name, task in TASKS.items():
        meta = json.loads((fixture_data / name / "meta.json").read_text())
        assert set(meta) == {"task", "benchmark", "task_type", "source", "splits", "labels", "metrics", "score",
                             "max_length", "max_target_length", "data_seed", "token_stats", "fewshot", "tokenizer"}
        assert meta["splits"] == {s: len(read(fixture_data, name, s)) for s in ("train", "validation", "test")}
        assert meta["source"]["kind"] == "local" and len(meta["source"]["sha256"]) == len(meta["source"]["files"])
        assert set(meta["token_stats"]) == {"train", "validation", "test"} and meta["data_seed"] == 42
        for key, entry in meta["fewshot"].items():  # k = 4 in all (§5.2) on every fixture
            shots = read(fixture_data, name, f"train_{key}")
            assert entry["size"] == len(shots) == 4 and entry["rule"] == outputs.FEWSHOT_RULES.get(name, outputs.FEWSHOT_RULE)
            assert entry["classes"] == ({y: sum(r["target"] == y for r in shots) for y in sorted(task.labels)
                                         if any(r["target"] == y for r in shots)} if task.labels else None)
    meta = lambda t: json.loads((fixture_data / t / "meta.json").read_text())
    assert (meta("multirc")["metrics"], meta("multirc")["score"], meta("multirc")["max_length"]) == (["f1a", "em"], ["f1a"], 348)
    assert (meta("nq")["metrics"], meta("nq")["score"], meta("nq")["max_length"], meta("nq")["labels"]) == (
        ["squad_f1", "squad_em"], ["squad_f1"], 512, None)
    assert (meta("stsb")["score"], meta("cb")["score"], meta("cola")["score"]) == (["pearson"], ["acc", "macro_f1"], ["mcc"])
    assert (meta("mrpc")["score"], meta("cb")["labels"], meta("rte")["max_target_length"]) == (["acc"], ["0", "1", "2"], 3)
    assert (meta("qqp")["metrics"], meta("qqp")["score"]) == (["acc", "f1"], ["acc"])  # Table 1: "MRPC Acc", "QQP Acc"


def test_multirc_splits_whole_questions(fixture_data):
    val, test = ({r["question_id"] for r in read(fixture_data, "multirc", s)} for s in ("validation", "test"))
    assert val and test and not val & test  # the held-out file is halved by whole questions


# ---------------------------------------------------------------------------- local formats

def test_other_official_formats_give_the_same_records(fixture_data, tmp_path):
    """SciTail tsv_format and GLUE-format RTE train.tsv give what snli_format and SuperGLUE jsonl give."""
    src = tmp_path / "src"
    for split, name in (("train", "train"), ("dev", "dev")):
        rows = [json.loads(l) for l in (FIXTURES / f"scitail/SciTailV1.1/snli_format/scitail_1.0_{name}.txt").open()]
        path = src / f"scitail/tsv_format/scitail_1.0_{split}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{r['sentence1']}\t{r['sentence2']}\t{'entails' if r['gold_label'] == 'entailment' else 'neutral'}\n"
                                for r in rows))
    (src / "rte").mkdir()
    shutil.copy(FIXTURES / "rte/dev.tsv", src / "rte/dev.tsv")
    rows = [json.loads(l) for l in (FIXTURES / "rte/train.jsonl").open()]
    (src / "rte/train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "".join(
        f"{r['idx']}\t{r['premise']}\t{r['hypothesis']}\t{r['label']}\n" for r in rows))
    run("--tasks", "scitail", "rte", "--out", tmp_path / "out", "--fewshot", 4, "--fewshot-seeds", 0, 1, source=src)
    for task in ("scitail", "rte"):
        for split in ("train", "validation", "test", "train_k4_seed1"):
            assert read(tmp_path / "out", task, split) == read(fixture_data, task, split)


# ---------------------------------------------------------------------------- the Hub path (faked)

def jsonl_rows(path):
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def hub_data():
    """The rte, multirc and nq fixtures in the Hub schema, converted here independently of prepare_data."""
    ent = ["entailment", "not_entailment"]
    with open(FIXTURES / "rte/dev.tsv", encoding="utf-8") as f:
        rte_dev = [{"sentence1": r["sentence1"], "sentence2": r["sentence2"], "label": ent.index(r["label"]), "idx": n}
                   for n, r in enumerate(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))]
    rte_train = [{"sentence1": r["premise"], "sentence2": r["hypothesis"], "label": ent.index(r["label"]), "idx": r["idx"]}
                 for r in jsonl_rows(FIXTURES / "rte/train.jsonl")]
    multirc = {split: [{"paragraph": p["passage"]["text"], "question": q["question"], "answer": a["text"],
                        "idx": {"paragraph": p["idx"], "question": q["idx"], "answer": a["idx"]}, "label": a["label"]}
                       for p in jsonl_rows(FIXTURES / f"multirc/{name}.jsonl")
                       for q in p["passage"]["questions"] for a in q["answers"]]
               for split, name in (("train", "train"), ("validation", "val"))}
    mrqa = {}
    for split, path in (("train", "train/NaturalQuestionsShort.jsonl.gz"), ("validation", "dev/NaturalQuestionsShort.jsonl")):
        header, *contexts = jsonl_rows(FIXTURES / "mrqa/nq" / path)
        mrqa[split] = [{"subset": header["header"]["dataset"], "context": c["context"].strip(), "qid": qa["qid"],
                        "question": qa["question"].strip(), "answers": qa["answers"]} for c in contexts for qa in c["qas"]]
        mrqa[split].append({"subset": "NewsQA", "context": "x", "qid": "other", "question": "y", "answers": ["z"]})
    return {("nyu-mll/glue", "rte"): {"train": rte_train, "validation": rte_dev},
            ("aps/super_glue", "multirc"): multirc, ("mrqa-workshop/mrqa", "plain_text"): mrqa}


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets
    calls, data = [], hub_data()

    def load_dataset(path, name=None, revision="main", data_dir=None):
        calls.append((path, name, revision, data_dir))
        return datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s, rows in data[path, name].items()})
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(prepare_data, "hub_commit", lambda hub_id, revision: "c0ffee")
    return calls, data


def test_hub_and_local_give_identical_files(fixture_data, fake_hub, tmp_path):
    run("--tasks", "rte", "multirc", "nq", "--out", tmp_path, "--fewshot", 4, "--fewshot-seeds", 0, 1, source=None)
    for task in ("rte", "multirc", "nq"):
        hub, local = snapshot(tmp_path / task), snapshot(fixture_data / task)
        assert hub.pop("meta.json") and local.pop("meta.json") and hub == local
        meta = json.loads((tmp_path / task / "meta.json").read_text())
        assert meta["source"] == {"kind": "hub", "hub_id": TASKS[task].hub_id, "config": TASKS[task].hub_config,
                                  "revision": "main", "commit": "c0ffee", "files": [], "sha256": {}}
    assert [c[2] for c in fake_hub[0]] == ["main"] * 3


def test_hub_falls_back_to_the_parquet_branch(fake_hub, monkeypatch, tmp_path):
    import datasets
    calls, data = fake_hub

    def load_dataset(path, name=None, revision="main", data_dir=None):
        calls.append(revision)
        if revision == "main":
            raise RuntimeError("Dataset scripts are no longer supported, but found super_glue.py")
        return datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s, rows in data[path, data_dir].items()})
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    run("--tasks", "multirc", "--out", tmp_path, source=None)
    assert calls == ["main", "refs/convert/parquet"]
    assert json.loads((tmp_path / "multirc/meta.json").read_text())["source"]["revision"] == "refs/convert/parquet"


def test_unreachable_hub_says_pass_source(monkeypatch, tmp_path):
    import datasets
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append(kwargs)
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(SystemExit, match=r"^could not load the dataset 'nyu-mll/glue \(rte\)'.*pass "
                                         r"--source DIR") as e:
        run("--tasks", "rte", "--out", tmp_path, source=None)
    assert "\n" not in str(e.value) and len(calls) == 1 and not (tmp_path / "rte").exists()


def test_hub_label_outside_the_label_set():
    with pytest.raises(cli.Failure, match=r"cb: hub row 1: .*label 3 is outside the label set 0, 1, 2"):
        to_records(TASKS["cb"], [CASES["cb"][3], {**CASES["cb"][3], "label": 3}], "hub")


# ---------------------------------------------------------------------------- determinism and few-shot

def test_same_seed_same_bytes_other_seed_other_split(tmp_path):
    tasks = ["rte", "multirc", "stsb", "nq", "cb"]
    for name, seed in (("a", 42), ("b", 42), ("c", 7)):
        run("--tasks", *tasks, "--out", tmp_path / name, "--data-seed", seed, "--fewshot", 4, "--fewshot-seeds", 0, 1)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    assert read(tmp_path / "a", "rte", "validation") != read(tmp_path / "c", "rte", "validation")


def test_fewshot_sets_are_balanced_and_differ_by_seed(fixture_data):
    for task in ("cola", "cb", "multirc", "stsb", "nq"):
        train = {json.dumps(r) for r in read(fixture_data, task)}
        a, b = (read(fixture_data, task, f"train_k4_seed{s}") for s in (0, 1))
        assert {json.dumps(r) for r in a} <= train and {r["idx"] for r in a} != {r["idx"] for r in b}
        assert len(a) == len(b) == 4  # k in all (§5.2), not k per class
        if TASKS[task].labels:
            counts = [sum(r["target"] == y for r in a) for y in TASKS[task].labels]
            assert max(counts) - min(counts) <= 1


def synthetic_train(labels, per_class):
    return [{"source": f"s{y}_{i}", "target": y, "label": y, "idx": f"{y}_{i}"}
            for y, n in zip(labels, per_class) for i in range(n)]


# the sample size per task kind and k: binary (RTE), CB and MNLI (3 classes), STS-B (open targets)
@pytest.mark.parametrize("task", ["rte", "cb", "mnli", "stsb"])
@pytest.mark.parametrize("k", [4, 16, 32])
def test_fewshot_draws_k_in_all_with_the_classes_balanced(task, k):
    labels = TASKS[task].labels
    train = (synthetic_train(labels, [50] * len(labels)) if labels else
             [{"source": f"s{i}", "target": f"{i % 26 / 5:.1f}", "label": i % 26 / 5, "idx": i} for i in range(100)])
    extra = set()
    for seed in range(8):
        shots = prepare_data.fewshot(TASKS[task], train, k, seed)
        assert len(shots) == k and len({r["idx"] for r in shots}) == k
        assert shots == prepare_data.fewshot(TASKS[task], train, k, seed)  # fixed per seed
        assert shots != prepare_data.fewshot(TASKS[task], train, k, seed + 100)
        if labels:
            counts = {y: sum(r["target"] == y for r in shots) for y in labels}
            assert max(counts.values()) - min(counts.values()) <= (0 if k % len(labels) == 0 else 1)
            assert min(counts.values()) == k // len(labels)
            extra |= {y for y, c in counts.items() if c > k // len(labels)}
    if labels and k % len(labels):  # the remainder goes to classes in an order the seed shuffles
        assert len(extra) > 1


def test_fewshot_class_too_small_passes_its_share_on():
    train = synthetic_train(("0", "1", "2"), [1, 40, 40])
    shots = prepare_data.fewshot(TASKS["cb"], train, 16, 0)
    counts = sorted(sum(r["target"] == y for r in shots) for y in ("0", "1", "2"))
    assert counts == [1, 7, 8] and len(shots) == 16
    assert len(prepare_data.fewshot(TASKS["cb"], train[:5], 16, 0)) == 5  # fewer rows than k: all of them


def test_fewshot_files_of_the_old_rule_are_kept_with_a_warning(tmp_path, capsys):
    run("--tasks", "cb", "--out", tmp_path, "--fewshot", 4, "--fewshot-seeds", 0)
    meta = json.loads((tmp_path / "cb/meta.json").read_text())
    assert meta["fewshot"]["k4_seed0"]["rule"] == outputs.FEWSHOT_RULE
    assert sum(meta["fewshot"]["k4_seed0"]["classes"].values()) == 4
    del meta["fewshot"]["k4_seed0"]["rule"]  # as prepare_data.py wrote it before the rule was recorded
    (tmp_path / "cb/meta.json").write_text(json.dumps(meta))
    before = snapshot(tmp_path)
    capsys.readouterr()
    run("--tasks", "cb", "--out", tmp_path, "--fewshot", 4, "--fewshot-seeds", 0)
    err = capsys.readouterr().err
    assert "k examples per class" in err and "only with --overwrite" in err and err.count("warning") == 1
    assert f"--tasks cb --out {tmp_path} --tokenizer {T5.resolve()} --source {FIXTURES} --fewshot 4 --fewshot-seeds 0 --overwrite" in err
    assert snapshot(tmp_path) == before  # kept as they are
    assert outputs.old_fewshot_sets(meta) == ["k4_seed0"]
    assert outputs.old_fewshot_warning(tmp_path, {"cb": [], "rte": []}) is None
    run("--tasks", "cb", "--out", tmp_path, "--fewshot", 4, "--fewshot-seeds", 0, "--overwrite")
    assert "per class" not in capsys.readouterr().err
    run("--tasks", "cb", "--out", tmp_path, "--fewshot", 4, "--fewshot-seeds", 0)
    assert "per class" not in capsys.readouterr().err


# ---------------------------------------------------------------------------- skipping and bad input

def test_prepared_tasks_are_skipped_unless_overwrite(tmp_path, capsys):
    run("--tasks", "cb", "--out", tmp_path)
    before = (tmp_path / "cb/meta.json").stat().st_mtime_ns
    run("--tasks", "cb", "--out", tmp_path)
    assert "cb: already prepared" in capsys.readouterr().out
    assert (tmp_path / "cb/meta.json").stat().st_mtime_ns == before
    with pytest.raises(SystemExit, match="pass --overwrite"):  # other settings than the prepared ones
        run("--tasks", "cb", "--out", tmp_path, "--data-seed", 1)
    run("--tasks", "cb", "--out", tmp_path, "--data-seed", 1, "--overwrite")
    assert json.loads((tmp_path / "cb/meta.json").read_text())["data_seed"] == 1


def test_prepared_task_without_a_data_seed_is_refused_in_one_sentence(tmp_path):
    run("--tasks", "cb", "--out", tmp_path)
    meta = json.loads((tmp_path / "cb/meta.json").read_text())
    del meta["data_seed"]
    (tmp_path / "cb/meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="prepared with data seed None"):
        run("--tasks", "cb", "--out", tmp_path)


def test_steering_task_from_a_source_folder(tmp_path):
    steer = Path(prepare_data.STEER_SOURCE)
    run("--tasks", "steer_comma", "--out", tmp_path / "out", source=steer)
    assert read(tmp_path / "out", "steer_comma")
    with pytest.raises(SystemExit, match="steer_comma: missing folder"):  # one sentence, no KeyError
        run("--tasks", "steer_comma", "--out", tmp_path / "out2", source=tmp_path)


def test_unknown_task_lists_valid_names(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run("--tasks", "rte", "copa", "--out", tmp_path)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown task 'copa'" in err and "rte" in err and "paws" in err


@pytest.fixture
def broken(tmp_path):
    """A copy of the cb and cola fixtures to break."""
    src = tmp_path / "src"
    for task in ("cb", "cola"):
        shutil.copytree(FIXTURES / task, src / task)
    return src


def test_missing_file_names_the_file(broken, tmp_path):
    (broken / "cb/val.jsonl").unlink()
    with pytest.raises(SystemExit, match=r"^prepare_data: cb: missing val\.jsonl under .*cb"):
        run("--tasks", "cb", "--out", tmp_path / "out", source=broken)
    with pytest.raises(SystemExit, match=r"prepare_data: rte: missing folder .*rte \(expected train\.tsv or train\.jsonl"):
        run("--tasks", "rte", "--out", tmp_path / "out", source=broken)


@pytest.mark.parametrize("task,line,bad,message", [
    ("cb", 3, "{not json", r"bad row \(JSONDecodeError"),
    ("cb", 2, '{"premise": "p", "hypothesis": "h", "label": "maybe", "idx": 1}', r"label 'maybe' is not one of"),
    ("cb", 4, '{"premise": "p", "label": "neutral", "idx": 3}', r"KeyError: 'hypothesis'"),
    ("cola", 5, "gj04\t1\tonly three columns", r"3 columns, expected 4"),
    ("cola", 6, "gj04\t2\t\tA sentence.", r"label 2 is outside the label set 0, 1"),
])
def test_bad_rows_name_file_and_line(broken, tmp_path, task, line, bad, message):
    path = broken / task / ("train.jsonl" if task == "cb" else "train.tsv")
    lines = path.read_text().splitlines()
    lines[line - 1] = bad
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match=rf"^prepare_data: .*{path}:{line}: .*{message}"):
        run("--tasks", task, "--out", tmp_path / "out", source=broken)
    assert not (tmp_path / "out").exists()  # a failed prepare leaves no empty --out folder


def test_failed_run_leaves_prepared_data_intact(broken, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run("--tasks", "cb", "--out", out, source=broken)
    before = snapshot(out)
    with (broken / "cb/val.jsonl").open("a") as f:
        f.write('{"premise": "p", "hypothesis": "h", "label": "maybe", "idx": 99}\n')
    with pytest.raises(SystemExit, match="maybe"):
        run("--tasks", "cb", "--out", out, "--overwrite", source=broken)
    assert snapshot(out) == before
    (broken / "cb/val.jsonl").write_text((FIXTURES / "cb/val.jsonl").read_text())

    def replace(src, dst):  # the swap itself fails: one sentence, not a traceback
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(SystemExit, match=r"cannot write .*cb: the disk is full"):
        run("--tasks", "cb", "--out", out, "--overwrite", "--data-seed", 3, source=broken)
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["cb"]


def suggested(text):
    """The prepare_data command a message suggests (in backticks, or ending the message)."""
    found = re.search(r"`?(python prepare_data\.py [^`\n]*)", text)
    assert found, text
    return found[1]


def run_offline(command):
    """A suggested command, run as printed in a shell at the repository root, the Hub unreachable."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"


def test_suggested_prepare_commands_run_offline_as_printed(tmp_path, tiny_model_dir):
    """Each message that suggests a prepare_data command carries the tokenizer and the --source folder
    meta.json recorded, and the command works as printed offline; --overwrite --fewshot keeps the task's
    other few-shot sets (it redraws them)."""
    data = tmp_path / "data"
    run("--tasks", "rte", "--out", data, "--fewshot", 4, "--fewshot-seeds", 0)
    before = snapshot(data / "rte")
    meta = json.loads((data / "rte" / "meta.json").read_text())
    assert meta["tokenizer"] == str(T5.resolve()) and meta["source"]["root"] == str(FIXTURES)
    train = subprocess.run([sys.executable, "train.py", "--task", "rte", "--data-dir", str(data), "--method", "pt",
                            "--model", str(tiny_model_dir), "--out-dir", str(tmp_path / "run"), "--fewshot-k", "16",
                            "--fewshot-seed", "0", "--max-steps", "1"],
                           cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert train.returncode != 0 and "train_k16_seed0.jsonl" in train.stderr + train.stdout
    run_offline(suggested(train.stderr + train.stdout))
    after = snapshot(data / "rte")
    assert "train_k16_seed0.jsonl" in after and after["train_k4_seed0.jsonl"] == before["train_k4_seed0.jsonl"]
    assert after["train.jsonl"] == before["train.jsonl"] and after["test.jsonl"] == before["test.jsonl"]
    with pytest.raises(cli.Failure) as unprepared:  # evaluate.py --task cb, train.py, ...
        tasks.load_meta(data, "cb")
    run_offline(suggested(str(unprepared.value)))
    assert (data / "cb" / "meta.json").exists()
    meta = json.loads((data / "cb" / "meta.json").read_text())
    meta["fewshot"] = {"k4_seed1": {"file": "x"}}  # a set of the old rule
    warning = outputs.old_fewshot_warning(data, {"cb": outputs.old_fewshot_sets(meta)})
    run_offline(suggested(warning))
    assert (data / "cb" / "train_k4_seed1.jsonl").exists()
    meta = json.loads((data / "cb" / "meta.json").read_text())
    (data / "cb" / "meta.json").write_text(json.dumps({**meta, "metrics": ["acc", "bleu"]}))
    with pytest.raises(cli.Failure) as edited:  # a meta.json naming a metric no code computes
        tasks.load_meta(data, "cb")
    run_offline(suggested(str(edited.value)))
    assert tasks.load_meta(data, "cb")["metrics"] == meta["metrics"]  # the rebuild restored it
    assert set(tasks.METRIC_NAMES) == set(evaluation.METRICS)


def test_the_bar_of_a_local_source_names_the_file(tmp_path, monkeypatch):
    labels = []
    monkeypatch.setattr(prepare_data, "progress", lambda items, desc, *a, **k: labels.append(desc) or items)
    run("--tasks", "rte", "mrpc", "--out", tmp_path / "out")
    rte, mrpc = ([label for label in labels if label.startswith(f"{t}: ")] for t in ("rte", "mrpc"))
    assert rte[0] == f"rte: {FIXTURES / 'rte' / 'train.jsonl'}" and rte[1] == f"rte: {FIXTURES / 'rte' / 'dev.tsv'}"
    assert all(label.endswith("msr_paraphrase_train.txt") for label in mrpc)  # MRPC: both splits from train
    assert not any("nyu-mll/glue" in label for label in labels)


def test_an_unknown_task_lists_the_known_ones_and_suggests_no_prepare(tmp_path):
    with pytest.raises(cli.Failure, match=r"unknown task 'nosuch'.*rte, boolq|unknown task 'nosuch'.*cola") as e:
        tasks.load_meta(tmp_path, "nosuch")  # evaluate.py --task nosuch
    assert "prepare_data" not in str(e.value)


def test_missing_tokenizer_is_one_clear_message(tmp_path):
    with pytest.raises(SystemExit, match=r"^prepare_data: .*tokenizer.*pass --tokenizer DIR") as e:
        main(["--tasks", "cb", "--out", str(tmp_path / "out"), "--source", str(FIXTURES), "--tokenizer", str(tmp_path)])
    assert str(e.value).count("tokenizer DIR") == 1 and str(e.value).count(":") <= 2  # one sentence, not two nested
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", [("k-shot-16-42",), ("16-42", "16-13"), ("full", "full-copy")])
def test_fewshot_sample_folders_are_refused(tmp_path, layout):
    """--source over MNLI/k-shot-16-42/ (or LM-BFF's 16-42/, 16-13/, or two candidate folders): one sentence
    naming what was found and what was expected, and nothing written; the official layout still works."""
    for sub in layout:
        shutil.copytree(FIXTURES / "mnli", tmp_path / "src" / "mnli" / sub)
    with pytest.raises(SystemExit, match=r"^prepare_data: mnli: found train.tsv \+ dev_matched.tsv in .*folders under "
                                         r".*expected the official full distribution in one folder") as e:
        run("--tasks", "mnli", "--out", tmp_path / "out", source=tmp_path / "src")
    assert all(sub in str(e.value) for sub in layout) and not (tmp_path / "out").exists()
    shutil.copytree(FIXTURES / "mnli", tmp_path / "official" / "mnli" / "glue" / "MNLI")  # one nested folder: fine
    run("--tasks", "mnli", "--out", tmp_path / "out", source=tmp_path / "official")
    assert read(tmp_path / "out", "mnli")


# ---------------------------------------------------------------------------- the real files (docs/paper.md, "Tasks")

@pytest.mark.skipif(not RAW.is_dir(), reason="needs ../shared/data/raw")
def test_split_sizes_on_the_official_files(tmp_path):
    tasks = ["cola", "sst2", "mrpc", "stsb", "rte", "cb", "wic", "wsc", "multirc"]
    run("--tasks", *tasks, "--out", tmp_path, source=RAW)
    sizes = {t: json.loads((tmp_path / t / "meta.json").read_text())["splits"] for t in tasks}
    expected = {"cola": (8551, 521, 522), "sst2": (66349, 1000, 872), "mrpc": (3668, 204, 204),
                "stsb": (5749, 750, 750), "rte": (2490, 138, 139), "cb": (250, 28, 28), "wic": (5428, 319, 319),
                "wsc": (554, 52, 52)}
    for task, (train, validation, test) in expected.items():
        assert sizes[task] == {"train": train, "validation": validation, "test": test}, task
    multirc = sizes["multirc"]  # whole questions: about 1,000 validation rows
    assert multirc["test"] == 4848 and multirc["train"] + multirc["validation"] == 27243
    assert 1000 <= multirc["validation"] < 1030
