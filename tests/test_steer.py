"""The steering benchmark's checks (docs/experiments.md, "The steering benchmark"): on the shipped
frozen backbone (assets/steer/backbone, built by scripts/build_backbone.py) a prompt must learn to
select the task the backbone does not do by default. A prompt whose gradient, optimizer group or
schedule is broken stays at the no-prompt floor here, and a training loop that touches the frozen
weights shows. An init bug need not show in the scores: the correlated init of issue 27 (W_down a
multiple of P1) steered as often (EPT at lr 0.3: 10 of 10 seeds in the benchmark's pack, before
the fix; 9 of 10 after). What it did show is the sign of EPT's s_t = P1 . W_down, which that init
made positive on every seed: test_ept_steers_at_its_chosen_lr checks that it takes both signs
(tests/test_model.py checks the init's independence itself).

Thresholds come from measured numbers with a margin (docs/experiments.md lists them)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ablate  # noqa: E402
import prepare_data  # noqa: E402
import train  # noqa: E402
from ept import runtime# noqa: E402
import tables  # noqa: E402

BACKBONE = Path(__file__).resolve().parents[1] / "assets" / "steer" / "backbone"
TASK = "steer_comma"
STEPS = 30
# Measured (2-core VM, 30 steps, batch 32, lr 0.3, seed 0, solo): floor 45.5, PT 100.0 (test
# accuracy, %; docs/experiments.md). The margins leave room for another CPU's rounding. One EPT seed
# is a lottery (its failure mode: 6 of seeds 0-9 reach 90 after 30 steps, seed 0 not, measured with
# the per-run dropout), so EPT is held to a count over 10 seeds below.
PT_MIN, FLOOR_MAX = 85.0, 60.0
# The lrs the benchmark chose (report.py, steer.md: the best mean validation score over seeds 0-2)
# and the seeds EPT's 10-seed unit must steer (test >= 90): measured 8 of 10 with the per-run
# (stateless) dropout, 9 of 10 before it; the margin one seed.
PT_LR, EPT_LR, EPT_STEERED = 0.3, 0.3, 7


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("steer") / "data"
    prepare_data.main(["--tasks", TASK, "--tokenizer", str(BACKBONE), "--out", str(out)])
    return out


def weights(t5):
    return {k: v.detach().clone() for k, v in t5.state_dict().items()}


@pytest.fixture
def captured(monkeypatch):
    """Every T5 that runtime.load_t5 builds during the test (the frozen backbone train.py
    trains on)."""
    built, load = [], runtime.load_t5

    def spy(*args, **kwargs):
        built.append(load(*args, **kwargs))
        return built[-1]
    monkeypatch.setattr(runtime, "load_t5", spy)
    return built


def run(data, out, *methods, seeds=("0",)):
    train.main(["--task", TASK, "--model", str(BACKBONE), "--data-dir", str(data),
                "--method", *methods, "--seed", *seeds, "--max-steps", str(STEPS),
                "--eval-every", str(STEPS), "--batch-size", "32",
                "--out-dir", str(out)])


def score(run_dir):
    return train.files.read_json(Path(run_dir) / "metrics.json", "test metrics")["score"]


def assert_frozen(captured):
    fresh = weights(runtime.load_t5(str(BACKBONE)))
    assert captured, "train.py built no T5"
    for t5 in captured:
        now = weights(t5)
        assert now.keys() == fresh.keys()
        changed = [k for k in fresh if not torch.equal(now[k], fresh[k])]
        assert not changed, f"frozen backbone weights changed: {changed[:3]}"


def test_shipped_backbone_states_its_accuracy():
    """The shipped backbone does its default task without a prefix and the steering target only
    with one."""
    meta = train.files.read_json(BACKBONE / "backbone.json", "backbone description")
    acc = meta["dev_accuracy"]
    assert meta["default_task"] == prepare_data.STEER_DEFAULT
    assert acc["comma"]["with_prefix"] >= 95 and acc["comma"]["without_prefix"] <= 60
    assert acc["long"]["with_prefix"] >= 85 and acc["long"]["without_prefix"] >= 85


def test_prompts_steer_the_frozen_backbone(data, tmp_path, captured):
    floor = ablate.evaluate_frozen(str(BACKBONE), TASK, "test", data)["score"]
    assert floor <= FLOOR_MAX, \
        f"the backbone already does the steering task without a prompt ({floor:.1f})"
    run(data, tmp_path / "pt", "pt")
    pt = score(tmp_path / "pt")
    print(f"steer: floor {floor:.1f}, pt {pt:.1f} after {STEPS} steps")
    assert pt >= PT_MIN and pt >= floor + 25, f"PT did not steer: {pt:.1f} (floor {floor:.1f})"
    assert_frozen(captured)


def pack(data, out, method, seeds, lr):
    """One pack as the benchmark trains it (ablate.py steer: one method and lr, its seeds; each
    run equals its solo run, dropout included), on the benchmark's schedule; {seed: (test score,
    s_t per step)}."""
    train.main(["--task", TASK, "--model", str(BACKBONE), "--data-dir", str(data),
                "--method", method, "--seed", *map(str, seeds), "--lr", str(lr),
                "--max-steps", "100", "--eval-every", "10", "--batch-size", "32",
                "--out-dir", str(out)])
    found = {}
    for run_dir in sorted(Path(out).iterdir()):
        config = train.files.read_json(run_dir / "config.json", "run configuration")
        log = train.files.read_jsonl(run_dir / "log.jsonl", what="run log")
        s = [e.get("ept_s") for e in log if e["event"] == "train"]
        found[config["seed"]] = (score(run_dir), s)
    assert sorted(found) == list(seeds)
    return found


def test_ept_steers_at_its_chosen_lr(data, tmp_path, captured):
    """EPT at the lr the benchmark chose for it (0.3: seeds 0-2 reach 100 on validation at 0.03, 0.3
    and 3 alike; a tie goes to the paper's default), its 10-seed unit: measured 8 of 10 steered
    (seeds 0 and 4 at 45.5; a seed's result no longer depends on its pack mates). Its s_t is
    logged at every step and takes both signs over the seeds (at step 1, measured before the
    per-run dropout: 3 of 10 negative; on the correlated init all 10 were positive, 0.8 to 14.3)."""
    found = pack(data, tmp_path / "ept", "ept", range(10), EPT_LR)
    steered = [seed for seed, (test, _) in found.items() if test >= tables.STEER_SUCCESS]
    print(f"steer: EPT lr {EPT_LR}: {len(steered)}/10 steered: {found}")
    assert len(steered) >= EPT_STEERED, f"EPT steered on {len(steered)} of 10 seeds: {steered}"
    s = [found[seed][1] for seed in found]
    assert all(len(steps) == 100 and all(isinstance(v, float) for v in steps) for steps in s)
    first = [steps[0] for steps in s]
    assert min(first) < 0 < max(first), f"EPT's s_1 has one sign on every seed: {first}"
    assert_frozen(captured)


def test_pt_steers_on_every_seed(data, tmp_path):
    """PT at its chosen lr (0.3; 100 on validation at every lr of the grid), 5 seeds as one pack:
    measured 100.0 on each (and 10 of 10 in the benchmark's unit)."""
    found = pack(data, tmp_path / "pt", "pt", range(5), PT_LR)
    assert all(test >= tables.STEER_SUCCESS for test, _ in found.values()), found


def test_ablate_steer_writes_the_floor_and_the_report(data, tmp_path):
    """The driver's path end to end, tiny: PT and EPT at lr 0.3 and 3 (2 steps, one pack), the
    no-prompt floor row, report.py's table (steered counts, the chosen lr, s_t's zero crossings)
    and figures (s_t from log.jsonl); a second call trains nothing and writes no second floor
    row."""
    import report
    argv = ["steer", "--methods", "pt", "ept", "--seeds", "0", "--values", "3",
            "--data-dir", str(data),
            "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"),
            "--max-steps", "2", "--eval-every", "2"]
    rows = ablate.main(argv)
    assert [(r["method"], r.get("lr")) for r in rows] == [("none", None), ("pt", 0.3), ("pt", 3.0),
                                                          ("ept", 0.3), ("ept", 3.0)]
    floor = rows[0]
    frozen = ablate.evaluate_frozen(str(BACKBONE), TASK, "test", data)["score"]
    assert floor["n_trainable"] == 0 and floor["score"] == frozen
    log = train.files.read_jsonl(Path(rows[3]["run"]) / "log.jsonl", what="log")
    assert [type(e.get("ept_s")) for e in log if e["event"] == "train"] == [float, float]
    ablate.main(argv)
    lines = (tmp_path / "results" / "steer.jsonl").read_text().splitlines()
    assert len(lines) == 5
    (tmp_path / "report").mkdir()
    names = report.steer_section(tmp_path / "results", tmp_path / "report")
    assert names == ["steer.md", "steer_fig2.png", "steer_failure.png"]
    assert all((tmp_path / "report" / name).stat().st_size > 0 for name in names[1:])
    md = (tmp_path / "report" / "steer.md").read_text()
    assert "no prompt" in md and "| PT | 0.3" in md and "| PT | 3 †" in md
    assert "Steered (≥ 90)" in md
    assert "EPT lr 3: s_t crossed zero on" in md and "chosen: EPT " in md


def test_the_floor_row_is_written_once_when_collects_race(data, tmp_path, monkeypatch):
    """Three collects at once wrote the floor row three times (issue 28): it is checked and appended
    under the results file's lock, as every row. Here another collect writes it while this one is
    evaluating the backbone; the file still holds it once."""
    args = ablate.parser.parse_args(["steer", "--data-dir", str(data),
                                     "--results-dir", str(tmp_path)])
    results, evaluate, raced = tmp_path / "steer.jsonl", ablate.evaluate_frozen, []

    def racing(model, task, split, data_dir):
        if not raced:  # the other collect starts now and finishes first
            raced.append(split)
            ablate.steer_floor(args)
        return evaluate(model, task, split, data_dir)
    monkeypatch.setattr(ablate, "evaluate_frozen", racing)
    rows = ablate.steer_floor(args)
    lines = results.read_text().splitlines()
    assert len(lines) == 1 and [r["method"] for r in rows] == ["none"]
    assert rows[0]["run"] == train.files.read_jsonl(results, what="results")[0]["run"]


def test_the_lr_is_chosen_on_the_search_seeds_validation():
    """Appendix B.2's protocol: the best mean validation score over tables.STEER_SEARCH_SEEDS
    (a later seed does not count), a tie to the paper's 0.3; a method with one lr has no choice."""
    import tables

    def row(method, lr, seed, val):
        return {"run": f"{method}{lr}{seed}", "method": method, "lr": lr, "seed": seed,
                "val_score": val, "score": val}
    rows = ([row("ept", 0.3, s, v) for s, v in enumerate([100, 50, 100, 100])]
            + [row("ept", 3.0, s, v) for s, v in enumerate([100, 100, 100, 0])]
            + [row("pt", lr, s, 100) for lr in (0.03, 0.3, 3.0) for s in range(3)]
            + [row("ft", 1e-3, 0, 100)])
    assert tables.STEER_SEARCH_SEEDS == (0, 1, 2)
    assert tables.steer_chosen(rows) == {"ept": 3.0, "pt": 0.3}
    md, long = tables.steer_table(rows)
    assert "| EPT | 3 † (chosen) |" in md and "| 3/4 |" in md and "| PT | 0.3 (chosen) |" in md
