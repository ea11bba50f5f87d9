"""ept/pack.py: many prompt runs on one frozen T5 give, run by run, what each run gives alone.

    python -m pytest -q tests/test_packing.py          # ~1 minute on 2 CPU cores (torchrun test included)

Covers: left-padded prompts of different lengths == each prompt alone (and the padding rows must be masked:
a negative control), a pack of 4 runs (pt n=10, ept n=1, ptuning, resprompt; different seeds, lrs, batch and micro-batch
sizes, a warm-up, clipping engaged) == each run trained alone by train.train_step (train.py's step) for 5 steps, a non-finite
run leaving the pack while the others go on unchanged, per-run checkpoints (train.py's keys) and resume,
a pack run == the same run trained by train.py's CLI, DDP on 2 processes (gloo) == 1 process, the benchmark.
"""
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bench_pack
import model as M
import train
from ept import runfolder, runtime, tasks
from ept import pack as packing

REPO = Path(__file__).resolve().parents[1]
STEPS = 5
TOL = dict(atol=1e-5, rtol=1e-4)

# different methods, seeds, lrs, prompt lengths (ept n=1, pt n=10), batch sizes, micro-batching, a warm-up,
# and a tiny clipping threshold so that the per-run clip is exercised
SPECS = [dict(method="pt", seed=0, lr=0.3, batch_size=4, prompt_length=10),
         dict(method="ept", seed=1, lr=0.1, batch_size=4, max_grad_norm=0.05),
         dict(method="ptuning", seed=2, lr=0.03, batch_size=3, micro_batch_size=2, prompt_length=4),
         dict(method="resprompt", seed=3, lr=0.3, batch_size=5, prompt_length=5, warmup_steps=2)]


pytestmark = pytest.mark.usefixtures("one_thread")  # bench_pack sets the thread count; restored after


def tiny_t5(dropout=0.0):
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    config = T5Config(vocab_size=64, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=dropout,
                      **bench_pack.TINY)
    return T5ForConditionalGeneration(config).train()  # training mode, as train.py (dropout 0: deterministic)


def synthetic(n=11, vocab=64, seed=1):
    """Token-id examples of varying lengths (inputs 3-20 ids, targets 2-3), each ending in </s> (1)."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist() + [1]
    return [ids(2, 20) for _ in range(n)], [ids(1, 3) for _ in range(n)]


@pytest.fixture(scope="module")
def t5():
    return tiny_t5()


@pytest.fixture(scope="module")
def data():
    src, tgt = synthetic()
    return src, tgt, 0


def solo_run(t5, data, spec, steps=STEPS, poison_at=None, fused=None):
    """The run trained alone by train.py's own step (train.train_step), batches as train.py's loop takes them."""
    run = packing.make_run(t5, max_steps=steps + 1, fused=fused, **spec)
    records = []
    for step in range(1, steps + 1):
        if step == poison_at:
            poison(run)
        batch = train.next_batch(run, len(data[0]))
        record = train.train_step(run.net, run, batch, data, nullcontext(), runtime.ranks())
        run.advance(len(batch), len(data[0]))
        records.append({**record, "epoch": run.epoch})
    return records, run


def checkpoint_states(pack):
    """{run name: that run's last.pt state} for every run of `pack` (train.py's keys)."""
    return {r.name: r.state() for r in pack.runs}


def poison(run):
    with torch.no_grad():
        next(run.module.parameters()).view(-1)[0] = float("nan")


def close(a, b):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), **TOL)


def assert_same_records(got, want, what):
    for step, (g, w) in enumerate(zip(got, want), 1):
        for key in ("loss", "grad_norm", "lr", "prompt_norm", "ept_s"):
            if w.get(key) is None:
                assert g.get(key) is None, (what, key)
                continue
            assert close(g[key], w[key]), f"{what} step {step} {key}: pack {g[key]} solo {w[key]}"
        assert g["epoch"] == w["epoch"]


# --- the packed forward ---------------------------------------------------------------------------

def per_example_nll(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none").view(
        labels.shape).sum(1)


def packed_losses_and_grads(t5, runs, data, per_run=2, unmask_padding=False):
    src, tgt, pad = data
    packed = packing.PackedT5(t5, [r.module for r in runs])
    if unmask_padding:  # the negative control: padding rows attended to
        prompts = packed.prompts
        packed.prompts = lambda: (prompts()[0], torch.ones_like(prompts()[1]))
    idx = list(range(per_run * len(runs)))
    run_ids = torch.tensor([k // per_run for k in idx])
    input_ids, mask, labels = tasks.collate(idx, src, tgt, pad)
    logits = packed(input_ids, mask, run_ids, decoder_input_ids=t5._shift_right(labels), use_cache=False).logits
    nll = per_example_nll(logits, labels)
    nll.sum().backward()
    grads = [[p.grad.clone() for p in r.params] for r in runs]
    for r in runs:
        r.optimizer.zero_grad(set_to_none=True)
    return nll.detach().view(len(runs), per_run), grads


def test_left_padded_prompts_equal_each_prompt_alone(t5, data):
    """Prompts of 1, 10, 3, 5 and 10 rows in one batch: each example's loss and each run's gradient equal the
    run's own PromptedT5; unmasking the padding rows breaks it (so the test can fail)."""
    src, tgt, pad = data
    specs = [dict(method="ept", seed=1), dict(method="pt", seed=0, prompt_length=10),
             dict(method="ptuning", seed=2, prompt_length=3), dict(method="resprompt", seed=3, prompt_length=5),
             dict(method="ept_star", seed=4)]
    runs = [packing.make_run(t5, **s) for s in specs]
    nll, grads = packed_losses_and_grads(t5, runs, data)
    for k, run in enumerate(runs):
        net = M.PromptedT5(t5, run.module)
        idx = [2 * k, 2 * k + 1]
        input_ids, mask, labels = tasks.collate(idx, src, tgt, pad)
        logits = net(input_ids, mask, decoder_input_ids=t5._shift_right(labels), use_cache=False).logits
        solo = per_example_nll(logits, labels)
        solo.sum().backward()
        assert torch.allclose(nll[k], solo.detach(), **TOL), (run.args.method, nll[k], solo)
        for g, p in zip(grads[k], run.params):
            assert torch.allclose(g, p.grad, **TOL), run.args.method
        run.optimizer.zero_grad(set_to_none=True)
    bad, _ = packed_losses_and_grads(t5, runs, data, unmask_padding=True)
    assert not torch.allclose(bad[0], nll[0], atol=1e-3), "padding rows attended to must change the 1-row prompt's loss"
    assert torch.allclose(bad[1], nll[1], **TOL)  # the longest prompt has no padding rows


def test_packed_model_rejects_examples_of_inactive_runs(t5, data):
    runs = [packing.make_run(t5, "ept", seed=s) for s in (0, 1)]
    packed = packing.PackedT5(t5, [r.module for r in runs])
    packed.active = [1]
    input_ids, mask, _ = tasks.collate([0], *data)
    with pytest.raises(ValueError, match="not active"):
        packed.embed(input_ids, mask, torch.tensor([0]))


# --- a pack == its runs alone ---------------------------------------------------------------------

@pytest.mark.parametrize("max_rows,fused", [(None, False), (3, False), (None, True)],
                         ids=["micro-batches", "sorted-rows", "fused-adamw"])
def test_pack_equals_each_run_alone(t5, data, max_rows, fused):
    """4 runs for 5 steps (11 examples: every run crosses an epoch boundary) == each run alone."""
    runs = [packing.make_run(t5, max_steps=STEPS + 1, name=f"r{k}", fused=fused, **s)
            for k, s in enumerate(SPECS)]
    pack = packing.Pack(t5, runs, data, max_rows=max_rows)
    steps = [pack.step() for _ in range(STEPS)]
    assert all(len(s) == len(SPECS) for s in steps)
    for k, spec in enumerate(SPECS):
        want, alone = solo_run(t5, data, spec, fused=fused)
        got = [s[f"r{k}"] for s in steps]
        assert_same_records(got, want, spec["method"])
        assert [g["step"] for g in got] == list(range(1, STEPS + 1))
        assert all(not g["nonfinite"] for g in got)
        assert torch.allclose(runs[k].net.prompt(), alone.net.prompt(), **TOL), spec["method"]
        for key, value in alone.module.state_dict().items():  # the reparameterization weights too; atol 1e-4:
            # AdamW divides each element's update by its own gradient scale, so an element of a 400 x 32
            # matrix with a near-zero gradient turns float rounding (1e-7 relative) into a few 1e-5
            assert torch.allclose(runs[k].module.state_dict()[key], value, atol=1e-4, rtol=1e-4), (spec["method"], key)
        assert runs[k].scheduler.get_last_lr() == alone.scheduler.get_last_lr()
        assert (runs[k].epoch, runs[k].index) == (alone.epoch, alone.index)
    # the test means something: the lrs differ per run and move, clipping was engaged for the ept run,
    # and the prompts moved away from their initial values
    ept = [s["r1"] for s in steps]
    assert min(r["grad_norm"] for r in ept) > SPECS[1]["max_grad_norm"]
    assert len({steps[1][f"r{k}"]["lr"] for k in range(4)}) == 4
    fresh = packing.make_run(t5, **SPECS[0])
    assert not torch.allclose(runs[0].net.prompt(), fresh.net.prompt(), atol=1e-3)


@pytest.mark.parametrize("max_rows", [None, 3], ids=["micro-batches", "sorted-rows"])
def test_pack_equals_each_run_alone_with_dropout_on(data, max_rows):
    """Dropout 0.1 (T5's default), stateless masks (model.stateless_dropout): a run's masks depend on its own
    seed, step and examples only, so each packed run still equals its train.py run, whatever the pack cuts."""
    t5 = M.stateless_dropout(tiny_t5(dropout=0.1))
    runs = [packing.make_run(t5, max_steps=STEPS + 1, name=f"r{k}", **s) for k, s in enumerate(SPECS)]
    pack = packing.Pack(t5, runs, data, max_rows=max_rows)
    steps = [pack.step() for _ in range(STEPS)]
    for k, spec in enumerate(SPECS):
        want, alone = solo_run(t5, data, spec)
        assert_same_records([s[f"r{k}"] for s in steps], want, spec["method"])
        assert torch.allclose(runs[k].net.prompt(), alone.net.prompt(), **TOL), spec["method"]
    plain = tiny_t5(dropout=0.0)  # the test can fail: dropout changes the losses
    want, _ = solo_run(plain, data, SPECS[0])
    assert not close(want[0]["loss"], steps[0]["r0"]["loss"])


def test_nonfinite_run_leaves_the_pack_and_the_others_go_on(t5, data):
    """A NaN put into run 2's prompt before step 3: that step's loss/grad norm are NaN, the run is not updated
    and leaves the pack; the other three are still equal to their solo runs through step 5."""
    runs = [packing.make_run(t5, max_steps=STEPS + 1, name=f"r{k}", **s) for k, s in enumerate(SPECS)]
    pack = packing.Pack(t5, runs, data)
    steps = []
    for step in range(1, STEPS + 1):
        if step == 3:
            poison(runs[2])
            before = {k: v.clone() for k, v in runs[2].module.state_dict().items()}
        steps.append(pack.step())
    assert runs[2].stopped == "nonfinite" and runs[2].step == 3
    assert set(steps[2]["r2"]["nonfinite"]) >= {"loss", "grad_norm"}
    assert all("r2" not in s for s in steps[3:])
    assert [r.name for r in pack.training] == ["r0", "r1", "r3"]
    for key, value in runs[2].module.state_dict().items():  # not updated at the non-finite step
        assert torch.equal(value.nan_to_num(), before[key].nan_to_num()), key
    assert not any(p.requires_grad for p in runs[2].module.parameters())
    for k in (0, 1, 3):
        want, alone = solo_run(t5, data, SPECS[k])
        assert_same_records([s[f"r{k}"] for s in steps], want, SPECS[k]["method"])
        assert torch.allclose(runs[k].net.prompt(), alone.net.prompt(), **TOL)
    want, _ = solo_run(t5, data, SPECS[2], poison_at=3)  # alone, train_step reports the same non-finite step
    assert not torch.isfinite(torch.tensor(want[2]["loss"])) and not torch.isfinite(torch.tensor(want[2]["grad_norm"]))


def test_runs_finish_at_their_own_max_steps(t5, data):
    runs = [packing.make_run(t5, "ept", seed=0, max_steps=2, name="short"), packing.make_run(t5, "pt", seed=1, max_steps=4, name="long")]
    pack = packing.Pack(t5, runs, data)
    seen = [sorted(pack.step()) for _ in range(5)]
    assert seen == [["long", "short"], ["long", "short"], ["long"], ["long"], []]
    assert runs[0].stopped == "done" and runs[1].stopped == "done"
    assert runs[0].scheduler.get_last_lr() == [0.0]  # linear decay reached 0 at its own max_steps


# --- checkpoints ----------------------------------------------------------------------------------

def test_checkpoints_have_train_py_keys_and_resume_exactly(t5, data, tmp_path):
    """4 steps straight == 2 steps, every run to its own last.pt (weights_only), a fresh pack from them, 2 more."""
    def fresh():
        return [packing.make_run(t5, max_steps=STEPS + 1, name=f"r{k}", **s) for k, s in enumerate(SPECS)]
    straight = fresh()
    pack = packing.Pack(t5, straight, data)
    want = [pack.step() for _ in range(4)]

    first = fresh()
    pack = packing.Pack(t5, first, data)
    got = [pack.step() for _ in range(2)]
    for name, state in checkpoint_states(pack).items():
        assert tuple(state) == runfolder.CHECKPOINT_KEYS
        (tmp_path / name).mkdir()
        torch.save(state, tmp_path / name / "last.pt")
    resumed = fresh()
    for run in resumed:
        run.load_state(torch.load(tmp_path / run.name / "last.pt", weights_only=True))
    assert [r.step for r in resumed] == [2] * 4
    pack = packing.Pack(t5, resumed, data)
    got += [pack.step() for _ in range(2)]
    for k in range(4):
        assert_same_records([s[f"r{k}"] for s in got], [s[f"r{k}"] for s in want], f"r{k}")
        assert torch.allclose(resumed[k].net.prompt(), straight[k].net.prompt(), **TOL)


def write_task(root, n=(12, 6, 6)):
    words = "good bad fine awful great poor nice sad happy dull".split()
    g = torch.Generator().manual_seed(0)
    task = Path(root) / "toy"
    task.mkdir(parents=True)
    for split, size in zip(("train", "validation", "test"), n):
        rows = []
        for i in range(size):
            k = int(torch.randint(2, 10, (1,), generator=g))
            text = " ".join(words[int(j)] for j in torch.randint(0, len(words), (k,), generator=g))
            rows.append({"source": f"sentence: {text}", "target": str(i % 2), "label": i % 2, "idx": i})
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"task": "toy", "benchmark": "test", "source": {"kind": "local", "files": []},
            "splits": dict(zip(("train", "validation", "test"), n)), "labels": ["0", "1"], "metrics": ["acc"],
            "score": ["acc"], "max_length": 32, "max_target_length": 3, "data_seed": 0, "token_stats": {}, "fewshot": {}}
    (task / "meta.json").write_text(json.dumps(meta))
    return task


def test_pack_run_equals_train_py_run_and_its_checkpoint(tiny_model_dir, tmp_path):
    """train.py's CLI (dropout 0, 3 steps) vs the same run in a pack with another: same losses, same
    trainable state; the pack's checkpoint has the structure of train.py's last.pt, which loads into a Run."""
    task = write_task(tmp_path / "data")
    out = tmp_path / "solo"
    args = ["--task", "toy", "--data-dir", str(tmp_path / "data"), "--model", str(tiny_model_dir), "--method", "ept",
            "--seed", "3", "--lr", "0.1", "--batch-size", "5", "--max-steps", "3", "--eval-every", "3",
            "--dropout", "0", "--no-test", "--out-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True, env=env,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    solo_log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    solo_log = [e for e in solo_log if e["event"] == "train"]
    solo_ckpt = torch.load(out / "last.pt", weights_only=True)

    t5 = runtime.load_t5(str(tiny_model_dir))
    t5.config.dropout_rate = 0.0  # --dropout 0: the nn.Dropout modules and the attention's float rate
    for module in t5.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0
    t5.train()
    tokenizer = runtime.load_tokenizer(str(tiny_model_dir))
    rows = [json.loads(line) for line in (task / "train.jsonl").read_text().splitlines()]
    src = tokenizer([r["source"] for r in rows], truncation=True, max_length=32)["input_ids"]
    tgt = tokenizer([r["target"] for r in rows])["input_ids"]
    runs = [packing.make_run(t5, "ept", seed=3, lr=0.1, batch_size=5, max_steps=3, name="ept"),
            packing.make_run(t5, "pt", seed=0, lr=0.3, batch_size=4, max_steps=3, name="pt")]
    pack = packing.Pack(t5, runs, (src, tgt, tokenizer.pad_token_id))
    got = [pack.step()["ept"] for _ in range(3)]
    assert_same_records(got, solo_log, "ept vs train.py")
    state = runs[0].state()
    assert set(state) == set(solo_ckpt)
    for key, value in solo_ckpt["trainable"].items():
        assert torch.allclose(state["trainable"][key], value, **TOL), key
    assert state["data"] == solo_ckpt["data"] and state["step"] == solo_ckpt["step"]
    assert state["scheduler"] == solo_ckpt["scheduler"]
    assert state["optimizer"]["param_groups"] == solo_ckpt["optimizer"]["param_groups"]
    for k, s in solo_ckpt["optimizer"]["state"].items():
        assert set(state["optimizer"]["state"][k]) == set(s)
        for key in s:
            assert torch.allclose(state["optimizer"]["state"][k][key], s[key], **TOL), key
    other = packing.make_run(t5, "ept", seed=9, lr=0.1, batch_size=5, max_steps=3)
    other.load_state(solo_ckpt)  # a solo checkpoint continues in a pack
    assert torch.allclose(other.net.prompt(), runs[0].net.prompt(), **TOL) and other.step == 3


# --- DDP, the benchmark, small things -------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dropout", ["0", "0.1"])
def test_ddp_two_processes_equal_one(tmp_path, dropout):
    """torchrun with 2 gloo ranks (run a's batch of 5 splits unevenly; run c in micro-batches of 1) == one
    process; run b turns NaN at step 3 and leaves the pack on both ranks (DDP rebuilt without it). With
    dropout 0.1 too: the stateless masks do not depend on which rank holds an example."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EPT_TEST_DROPOUT": dropout}
    worker = str(REPO / "tests" / "packing_ddp_worker.py")
    one = subprocess.run([sys.executable, worker, str(tmp_path / "one.pt")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker,
                          str(tmp_path / "two.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a["stopped"] == b["stopped"] == {"a": None, "b": "nonfinite", "c": None}
    assert [sorted(r) for r in a["records"]] == [sorted(r) for r in b["records"]]
    for ra, rb in zip(a["records"], b["records"]):
        for name in ra:
            if ra[name]["nonfinite"]:
                assert ra[name]["nonfinite"] == rb[name]["nonfinite"]
                continue
            for key in ("loss", "grad_norm", "lr", "prompt_norm"):
                assert close(ra[name][key], rb[name][key]), (name, key)
    for name in ("a", "c"):
        assert torch.allclose(a["prompts"][name], b["prompts"][name], **TOL)


def test_bench_runs(tiny_model_dir):
    rows = bench_pack.bench(str(tiny_model_dir), runs=(1, 2), batch_size=2, length=8, target_length=2, methods=("ept", "pt"),
                   max_rows=3)
    assert [r["runs"] for r in rows] == [1, 2] and rows[0]["solo_step_s"] > 0
    assert [r["forward_passes"] for r in rows] == [1, 2]  # 2 and 4 examples, at most 3 per forward pass
    assert all(r["examples_per_s"] > 0 and r["step_s"] > 0 for r in rows)
    update = bench_pack.bench_update(runtime.load_t5(str(tiny_model_dir)), r=3, repeats=2)
    assert update > 0


@pytest.mark.parametrize("method,hidden", [("ept", 1), ("ept_star", 1), ("ept", 3), ("pt", None)])
def test_ept_s_is_the_first_hidden_activation(t5, data, method, hidden):
    """Issue 27 section 3: each step logs s_t = P1 . W_down (h = 1: the scalar, may be negative), the norm of
    W_down P1 (h > 1), nothing for other methods; the pack reports the same number as train.py's step."""
    options = {} if hidden is None else {"hidden_size": hidden}
    run = packing.make_run(t5, method, seed=3, lr=0.3, batch_size=4, max_steps=5, **options)
    batch = train.next_batch(run, len(data[0]))
    record = train.train_step(run.net, run, batch, data, nullcontext(), runtime.ranks())
    if hidden is None:
        assert record["ept_s"] is None and run.net.prompt() is not None
        return
    module = run.module
    down = module.blocks[0].down.weight.detach()  # (h, d), after the step
    p1 = module.prompt.detach()  # (1, d)
    want = (p1 @ down.T).flatten()
    want = want[0].item() if hidden == 1 else want.norm().item()
    assert record["ept_s"] == pytest.approx(want, rel=1e-5)
    assert record["ept_s"] != pytest.approx(record["prompt_norm"])  # not mu_t under another name
    twin = packing.make_run(t5, method, seed=3, lr=0.3, batch_size=4, max_steps=5, name="twin", **options)
    packed = packing.Pack(t5, [twin], data).step()["twin"]
    assert packed["ept_s"] == pytest.approx(record["ept_s"], rel=1e-4)


def test_ft_cannot_be_packed():
    """ft is a Run whose module is T5 itself: alone it is a pack of one, beside another run refused."""
    t5 = tiny_t5()
    ft = packing.make_run(t5, "ft", name="ft")
    assert ft.net.prompt_module is None and ft.net.prompt() is None and ft.module is t5
    with pytest.raises(ValueError, match="ft"):
        packing.Pack(t5, [ft, packing.make_run(t5, "ept", name="ept")], ([[3, 1]], [[1]], 0))
