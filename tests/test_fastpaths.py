"""Issue 6: the fast paths change the speed, never the results. bench.py measures the speed; this file proves
the results equal the plain path's: own-longest padding vs padding to the max length (loss and gradients),
--group-by-length (a reordering only), batched sorted greedy decoding with early stop vs one example at a time
(and vs the reference's unsorted pad-to-max decoding), rank classification vs brute force, bf16 and
torch.compile on CUDA (skipped without it), and bench.py itself end to end on tiny data.

    python -m pytest -q tests/test_fastpaths.py        # offline, CPU, well under a minute on 2 idle cores

Dropout is OFF wherever two paths are compared: its masks are drawn per tensor element, so a batch padded to
the max length draws different masks for the same real tokens than the same batch padded to its own longest.
With dropout off the two paths compute the same function; the tolerance is float rounding (1e-5 relative).
"""
import json
import random
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench
from test_train import token_nll
import model as M
from ept import evaluation, runtime, tasks

WORDS = "good bad fine awful great poor nice sad happy dull the movie plot was not very".split()
MAX_LENGTH = 40


def write_task(root, n=(48, 16, 16), seed=0):
    """A toy binary task in prepare_data.py's format (DESIGN.md), lengths 2..30 words so padding matters."""
    rng = random.Random(seed)
    task = Path(root) / "toy"
    task.mkdir(parents=True, exist_ok=True)
    for split, size in zip(("train", "validation", "test"), n):
        rows = []
        for i in range(size):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 30))]
            y = int("good" in words)
            rows.append({"source": "sentence: " + " ".join(words), "target": str(y), "label": y, "idx": i})
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"task": "toy", "benchmark": "test", "source": {"kind": "local", "files": []},
            "splits": dict(zip(("train", "validation", "test"), n)), "labels": ["0", "1"], "metrics": ["acc"],
            "score": ["acc"], "max_length": MAX_LENGTH, "max_target_length": 3, "data_seed": seed,
            "token_stats": {}, "fewshot": {}}
    (task / "meta.json").write_text(json.dumps(meta))
    return Path(root)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def toy(data_dir, tiny_model_dir):
    """(tokenizer, source ids, target ids, lengths) of the toy training split, via train.py's cached tokenizer."""
    tok = runtime.load_tokenizer(str(tiny_model_dir))
    _, src, tgt = tasks.read_split({}, "train", data_dir / "toy" / "train.jsonl", tok, MAX_LENGTH)
    return tok, src, tgt, [len(s) + len(t) for s, t in zip(src, tgt)]


def prompted(tiny_model_dir, method, seed=0):
    t5 = runtime.load_t5(str(tiny_model_dir), dropout=0.0)  # as train.py --dropout 0
    torch.manual_seed(seed)
    module = M.build_prompt_module(method, t5.config.d_model, generator=torch.Generator().manual_seed(seed))
    return M.PromptedT5(t5, module).train()  # train mode, as train.py: only the dropout rate is 0


# --- training: padding and ordering --------------------------------------------------------------------

@pytest.mark.parametrize("method", ["pt", "ept", "resprompt", "ft"])
def test_pad_to_longest_gives_the_pad_to_max_loss_and_gradients(toy, tiny_model_dir, method):
    tok, src, tgt, _ = toy
    net = prompted(tiny_model_dir, method)
    params = [p for p in net.parameters() if p.requires_grad]
    idx = list(range(8))
    pad_max = (MAX_LENGTH, 6)
    assert max(len(src[i]) for i in idx) < MAX_LENGTH  # the max-padded batch really is longer

    def loss_and_grads(pad_to):
        net.zero_grad(set_to_none=True)
        batch = tasks.collate(idx, src, tgt, tok.pad_token_id, pad_to)
        nll = token_nll(net, net.t5._shift_right, *batch, nullcontext())
        nll.backward()
        return nll.item(), [p.grad.clone() for p in params]

    own, own_grads = loss_and_grads((None, None))
    padded, padded_grads = loss_and_grads(pad_max)
    assert padded == pytest.approx(own, rel=1e-5)
    for g_own, g_pad in zip(own_grads, padded_grads):
        assert torch.allclose(g_own, g_pad, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in own_grads)  # the gradients compared are not all zero


@pytest.mark.parametrize("method,tol", [("pt", 1e-4), ("ept_star", 1e-3)])
def test_bench_step_follows_the_same_trajectory_padded_or_not(toy, tiny_model_dir, method, tol):
    """bench.py's training step (train.py's arithmetic: a pack.Pack of one run) for 4 steps at lr 0.3:
    own-longest and pad-to-max give the same losses and reach the same prompt. The prompt tolerance
    is relative to its scale: Adam divides by sqrt(v), so rounding-level gradient differences grow
    with each step, more through EPT's product P1 W_down W_up."""
    tok, src, tgt, _ = toy
    t5 = runtime.load_t5(str(tiny_model_dir), dropout=0.0).train()  # as train.py --dropout 0
    ctx = SimpleNamespace(method=method, seed=0, lr=0.3, batch_size=8, module_options={},
                          data=(src, tgt, tok.pad_token_id), amp=nullcontext(), compile=False)
    prompts, losses, padded = [], [], []
    for pad_to in ((None, None), (MAX_LENGTH, 6)):
        pack = bench.lone_pack(t5, ctx, pad_to)
        initial = pack.runs[0].net.prompt().detach().clone()
        steps = [bench.feed_step(pack, list(range(8 * k, 8 * k + 8))) for k in range(4)]
        losses.append([loss for loss, _ in steps])
        padded.append(sum(n for _, n in steps))
        prompts.append(pack.runs[0].net.prompt())
    assert padded[1] == 4 * 8 * (MAX_LENGTH + 6) > padded[0]  # (c) really ran padded batches
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert (prompts[0] - prompts[1]).abs().max() <= tol * prompts[0].abs().max()
    assert (prompts[0] - initial).abs().max() > 100 * tol * prompts[0].abs().max()  # it did train


def test_group_by_length_only_reorders(toy, tiny_model_dir):
    """Each epoch: the same examples as the plain order, mega-batch by mega-batch, sorted longest first
    inside it; and with fixed weights the epoch's summed loss is the same."""
    tok, src, tgt, lengths = toy
    n, bs = len(src), 4  # mega-batch = 50 * 4 = 200 > 48 rows: one mega-batch, and with bs 1: 50-row ones
    for epoch in range(3):
        plain = tasks.epoch_order(n, 7, epoch, bs)
        grouped = tasks.epoch_order(n, 7, epoch, bs, lengths)
        assert sorted(grouped.tolist()) == list(range(n))
        assert [lengths[i] for i in grouped] == sorted((lengths[i] for i in plain), reverse=True)
    small = tasks.epoch_order(n, 7, 0, 1, lengths)  # mega-batches of 50 rows: the last one is partial
    assert sorted(small.tolist()) == list(range(n))
    net = prompted(tiny_model_dir, "pt").eval()
    plain, grouped = tasks.epoch_order(n, 7, 0, bs), tasks.epoch_order(n, 7, 0, bs, lengths)
    with torch.no_grad():
        total = [sum(token_nll(net, net.t5._shift_right, *tasks.collate(order[k:k + bs].tolist(), src, tgt,
                                                                              tok.pad_token_id), nullcontext()).item()
                     for k in range(0, n, bs)) for order in (plain, grouped)]
    assert total[1] == pytest.approx(total[0], rel=1e-5)
    # bench.py's (b) regroups the timed examples the same way: the same multiset as (a) and (c)
    timed = plain[:32]
    regrouped = timed[tasks.epoch_order(len(timed), 0, 0, bs, [lengths[i] for i in timed])]
    assert sorted(regrouped.tolist()) == sorted(timed.tolist())


# --- evaluation: decoding and rank classification --------------------------------------------------------

@pytest.fixture(scope="module")
def decoder_net(tiny_model_dir):
    """A prompted tiny T5 whose </s> output row copies (x1.01) the row of the token it most often starts
    with: those rows stop after one step, the others run to max_new_tokens. A random T5 alone never stops."""
    t5 = runtime.load_t5(str(tiny_model_dir))
    t5.lm_head.weight = torch.nn.Parameter(t5.lm_head.weight.detach().clone())  # untie: inputs stay the same
    prompt = torch.randn(3, t5.config.d_model, generator=torch.Generator().manual_seed(0)) * 5
    net = M.PromptedT5(t5, M.FoldedPrompt(prompt)).eval()
    tok = runtime.load_tokenizer(str(tiny_model_dir))
    rng = random.Random(1)
    sources = ["sentence: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(20)]
    ids = tasks.encode(tok, sources, MAX_LENGTH)
    with torch.no_grad():
        first = [net.generate(*tasks.pad([i], tok.pad_token_id), max_new_tokens=1, do_sample=False)[0, 1].item() for i in ids]
        common = max(set(first), key=first.count)
        t5.lm_head.weight[tok.eos_token_id] = 1.01 * t5.lm_head.weight[common]
    return net, tok, ids


def test_batched_sorted_greedy_equals_one_at_a_time(decoder_net):
    net, tok, ids = decoder_net
    single = [evaluation.predict(net, tok, [i], max_new_tokens=5, batch_size=1)[0] for i in ids]
    assert "" in single and any(len(tok(p, add_special_tokens=False)["input_ids"]) >= 4 for p in single), \
        "the fixture should give rows that stop at once and rows that run to max_new_tokens"
    steps = bench.count_decode_steps(net)
    batched = evaluation.predict(net, tok, ids, max_new_tokens=5, batch_size=6)  # sorted, budgeted, mixed stops
    assert batched == single
    assert max(steps) == 5 and all(s <= 5 for s in steps)
    # the reference's decoding (data order, padded to the max length) gives the same strings too
    assert bench.reference_predict(net, tok, ids, batch_size=6, pad_length=MAX_LENGTH, device="cpu", dtype="fp32",
                                   max_new_tokens=5) == single
    net.generate = type(net).generate.__get__(net)  # undo the counter


def test_eval_batches_sorted_within_a_token_budget():
    """Sorted: longest first in full batches. With the token budget (CPU): every index once, longest first,
    at most batch_size rows, rows x longest row within batch_size x the median length unless the batch is at
    its floor of batch_size // 4 rows. Unsorted: plain data order."""
    rng = random.Random(0)
    ids = [[5] * rng.choice([3, 8, 20, 200]) for _ in range(101)]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # sorted() is stable: ties keep data order
    for bs in (1, 4, 16, 64):
        assert evaluation.batches_by_length(ids, bs, True) == [order[i:i + bs] for i in range(0, len(ids), bs)]
        batches = evaluation.batches_by_length(ids, bs, True, token_budget=True)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(ids)))
        assert [len(ids[i]) for i in flat] == sorted(map(len, ids), reverse=True)
        budget = bs * sorted(map(len, ids))[len(ids) // 2]
        for b in batches:
            assert len(b) <= bs
            assert len(b) <= max(bs // 4, 1) or len(b) * len(ids[b[0]]) <= budget
        long = [b for b in batches if len(ids[b[0]]) == 200]
        if bs >= 16:  # the long tail in smaller batches than the short rows: the point of the budget
            assert max(map(len, long)) < max(map(len, batches))
    assert evaluation.batches_by_length(ids, 16, False) == [list(range(i, min(i + 16, 101))) for i in range(0, 101, 16)]
    assert evaluation.batches_by_length([], 16, True) == evaluation.batches_by_length([], 16, True, True) == []


def test_early_stop_when_every_row_is_done(decoder_net):
    """A batch whose rows all emit </s> first stops after one step, whatever max_new_tokens allows."""
    net, tok, ids = decoder_net
    done = [i for i in ids if evaluation.predict(net, tok, [i], max_new_tokens=5, batch_size=1)[0] == ""]
    steps = bench.count_decode_steps(net)
    assert evaluation.predict(net, tok, done, max_new_tokens=5, batch_size=64) == [""] * len(done)
    assert steps == [1]
    net.generate = type(net).generate.__get__(net)


@pytest.mark.parametrize("labels", [["0", "1"], ["0", "1", "2"], ["entailment", "not entailment", "1"]])
def test_rank_classification_picks_the_lowest_loss_label(decoder_net, labels):
    """Labels of different token lengths (padded with -100 in the batched pass), several batches."""
    net, tok, ids = decoder_net
    got = evaluation.predict(net, tok, ids, labels=labels, batch_size=5)
    assert set(got) <= set(labels)  # never invalid
    for source, pred in zip(ids, got):  # brute force: one unpadded forward per (example, label)
        x, mask = tasks.pad([source], tok.pad_token_id)
        losses = []
        for label in labels:
            y = torch.tensor([tok(label)["input_ids"]])
            with torch.no_grad():
                logits = net(x, mask, decoder_input_ids=net.t5._shift_right(y)).logits
            losses.append(F.cross_entropy(logits[0], y[0], reduction="sum").item())
        assert pred == labels[int(np.argmin(losses))]


# --- bench.py itself ---------------------------------------------------------------------------------------

def test_label_nll_equals_one_forward_per_label(decoder_net):
    """label_nll (shared first decoder step, cached cross-attention repeated per label) gives each label's
    summed NLL as a plain teacher-forced forward does, for labels of different token lengths."""
    net, tok, ids = decoder_net
    labels = ["0", "1", "not entailment", "2.4"]
    label_ids, _ = tasks.pad(tasks.encode(tok, labels, MAX_LENGTH), -100)
    assert len(set((label_ids != -100).sum(1).tolist())) > 1  # different lengths: padding inside the label batch
    batch = ids[:5]
    input_ids, mask = tasks.pad(batch, tok.pad_token_id)
    got = evaluation.label_nll(net, input_ids, mask, label_ids)
    for b, source in enumerate(batch):
        for k, label in enumerate(tasks.encode(tok, labels, MAX_LENGTH)):
            with torch.no_grad():
                out = net(torch.tensor([source]), torch.ones(1, len(source), dtype=torch.long), labels=torch.tensor([label]))
            assert got[b, k].item() == pytest.approx(out.loss.item() * len(label), rel=1e-4, abs=1e-4)


def test_flop_formula_counts_every_linear_weight_once(tiny_model_dir):
    """One encoder and one decoder token: the linear FLOPs are 2 x every nn.Linear weight of T5 (lm_head too)."""
    t5 = runtime.load_t5(str(tiny_model_dir))
    weights = sum(m.weight.numel() for m in t5.modules() if isinstance(m, torch.nn.Linear))
    linear, _ = bench.forward_flops(t5.config, 1, 1)
    assert linear == 2 * weights
    assert bench.train_flops(t5.config, 10, 3, full=True) > bench.train_flops(t5.config, 10, 3, full=False)


def test_bench_end_to_end(data_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = bench.main(["--method", "ept", "--model", str(tiny_model_dir), "--task", "toy", "--data-dir", str(data_dir),
                         "--steps", "3", "--untimed-steps", "1", "--batch-size", "8", "--eval-examples", "24",
                         "--eval-batch-size", "8", "--eval-repeats", "1", "--dropout", "0", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [r["config"] for r in saved["train"]] == ["own_longest", "group_by_length", "pad_to_max_length"]
    a, b, c = saved["train"]
    assert a["examples"] == b["examples"] == c["examples"] == 24
    assert c["padding_fraction"] > a["padding_fraction"] >= b["padding_fraction"]
    assert saved["train_flop_ceiling"] > 1
    assert saved["loss_max_rel_diff_a_vs_c"] < 1e-5  # dropout off: the same losses, padded or not
    assert all(r["peak_memory_kind"] == "cpu_peak_rss_delta" and r["peak_memory_mib"] >= 0 for r in saved["train"])
    ev = {r["config"]: r for r in saved["eval"]}
    assert set(ev) == {"generate_sorted", "rank", "reference", "reference_short"}
    assert ev["generate_sorted"]["decode_steps_per_batch"] <= 3 < ev["reference"]["decode_steps_per_batch"] <= 19
    assert ev["reference_short"]["agreement_with_1"] == 1.0  # same decoding length: the same predictions
    assert set(result["speedups"]) >= {"train own_longest", "train group_by_length", "eval generate_sorted", "eval rank"}


# --- CUDA only -----------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_bf16_autocast_loss_close_to_fp32(toy, tiny_model_dir):
    tok, src, tgt, _ = toy
    net = prompted(tiny_model_dir, "ept").cuda()
    batch = [t.cuda() for t in tasks.collate(list(range(8)), src, tgt, tok.pad_token_id)]
    with torch.no_grad():
        fp32 = token_nll(net, net.t5._shift_right, *batch, nullcontext()).item()
        bf16 = token_nll(net, net.t5._shift_right, *batch, runtime.autocast("cuda", "bf16")).item()
    assert bf16 == pytest.approx(fp32, rel=2e-2)


@pytest.mark.gpu
def test_compile_gives_the_eager_loss_and_gradients(toy, tiny_model_dir):
    tok, src, tgt, _ = toy
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # train.main may have switched it on in this process
    try:
        net = prompted(tiny_model_dir, "pt").cuda()
        compiled = torch.compile(net)
        out = []
        for model in (net, compiled, compiled):  # compiled twice: two shapes, the dynamic-shape recompile too
            for idx in (list(range(8)), list(range(8, 16))):
                net.zero_grad(set_to_none=True)
                batch = [t.cuda() for t in tasks.collate(idx, src, tgt, tok.pad_token_id)]
                nll = token_nll(model, net.t5._shift_right, *batch, nullcontext())
                nll.backward()
                out.append((nll.item(), net.prompt_module.prompt.grad.clone()))
        for k in range(2, len(out)):
            ref_loss, ref_grad = out[k % 2]
            assert out[k][0] == pytest.approx(ref_loss, rel=1e-4)
            assert torch.allclose(out[k][1], ref_grad, rtol=1e-3, atol=1e-5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
