"""Speed benchmark: our fast paths against the reference stack's behaviour, side by side in one run.

Reads data/<task>/ (prepare_data.py) and a T5; prints two tables and the speedup ratios, and writes
nothing but the optional --json file. Training: train.py's step for a lone run (a pack.Pack of
one) on the same batches of train.py's epoch-0 order, same seeds, the configs' timed steps
interleaved (a, b, c, a, ...) so that other work slows them alike; then each one's peak memory
alone:
  (a) ours: every batch padded to its own longest row
  (b) ours + --group-by-length: the SAME examples regrouped by train.py's epoch_order
  (c) reference stack: every input padded to --max-length (256), every label to the longest target
Evaluation, the same held-out examples (validation, then test rows), --eval-repeats rounds:
  (1) evaluation.predict: batched greedy decoding sorted by length, max_new_tokens = longest label
  (2) evaluation.predict(labels=...): every label scored after one encoder pass per example
  (3) reference: data order, inputs padded to --max-length, HF generate(max_length=20)
  (3b) (3) with max_new_tokens as in (1): the honest figure for trained models, which stop early
docs/speed.md ("What bench.py measures") says what each figure means (tokens, peak memory, the FLOP
formula, --warm-shapes) and has the commands behind its figures, e.g. on a CPU:

    python scripts/bench.py --method ept --model ../shared/data/t5/t5-small --random-init \\
        --tokenizer ../shared/data/t5 --task rte --data-dir /tmp/benchdata --steps 20 --threads 1
"""
import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import sys
import threading
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages and ept/
import model as M  # noqa: E402
import costs  # noqa: E402  (scripts/costs.py)
from ept import cli, evaluation, pack, runtime, tasks  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
group = parser.add_argument_group("data")
group.add_argument("--task", required=True,
                   help="task name: data/<task>/ written by prepare_data.py")
group.add_argument("--data-dir", default="data",
                   help="folder holding <task>/meta.json and the split files")
group.add_argument("--max-length", type=int, help="max input tokens (default: meta.json's, 256)")
group.add_argument("--eval-examples", type=int, default=256,
                   help="held-out examples to decode (validation, then test)")
group = parser.add_argument_group("model")
group.add_argument("--model", default="t5-base", help="Hub name or local folder of the T5")
group.add_argument("--tokenizer", help="Hub name or folder of the tokenizer (default: --model)")
group.add_argument("--random-init", action="store_true",
                   help="random T5 weights from the config (speed only)")
group.add_argument("--method", default="ept", choices=M.METHODS,
                   help="ft = full fine-tuning, else a prompt method")
group.add_argument("--prompt-length", type=int, default=10,
                   help="prompt rows n for pt/ptuning/resprompt")
group.add_argument("--reparam", default="mlp", choices=M.REPARAMS,
                   help="ptuning's reparameterization network")
group = parser.add_argument_group("optimisation")
group.add_argument("--batch-size", type=int, default=16,
                   help="examples per optimizer step (the paper's 16)")
group.add_argument("--steps", type=int, default=20,
                   help="timed optimizer steps per training config")
group.add_argument("--untimed-steps", type=int, default=2,
                   help="untimed steps per training config first (allocator, compile)")
group.add_argument("--warm-shapes", action=argparse.BooleanOptionalAction, help="run the timed "
                   "batches once untimed first (default: on CUDA only; docs/speed.md)")
group.add_argument("--lr", type=float, help="peak learning rate (default: 0.3 prompts, 1e-5 ft)")
group.add_argument("--seed", type=int, default=0,
                   help="seeds the T5 weights, the prompt, the data order and dropout")
group.add_argument("--dtype", default="fp32", choices=runtime.DTYPES,
                   help="as train.py --dtype: fp32 (our reading; the paper names none), tf32, bf16")
group.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward, as train.py --compile")
group.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's, one per "
                   "core); 1 on cores shared with other jobs, where threads waiting for each other "
                   "at every op swamp small batches (docs/speed.md)")
group.add_argument("--dropout", type=float, help="override T5's dropout (default: the config's "
                   "0.1); with 0, (a) and (c) must give the same losses")
group = parser.add_argument_group("evaluation")
group.add_argument("--eval-batch-size", type=int, default=64,
                   help="examples per decoding batch, every eval config")
group.add_argument("--reference-max-length", type=int, default=20,
                   help="HF generate's max_length in (3) (HF default 20)")
group.add_argument("--eval-repeats", type=int, default=3,
                   help="rounds over the evaluation configs; the median is kept")
group.add_argument("--skip-train", action="store_true", help="only the evaluation configs")
group.add_argument("--skip-eval", action="store_true", help="only the training configs")
group = parser.add_argument_group("output")
group.add_argument("--peak-tflops", type=float,
                   help="the device's peak TFLOP/s for the fraction (default: table)")
group.add_argument("--json", help="also write every figure to this JSON file")

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets; the first match of the
# device name wins.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0))
forward_flops, train_flops = costs.forward_flops, costs.train_flops  # one home: the cost model's


def peak_tflops(device, dtype, override=None):
    """(peak TFLOP/s, where it came from) or (None, why not)."""
    if override:
        return override, "--peak-tflops"
    if not device.startswith("cuda") or dtype != "bf16":
        return None, "no peak known for this device/dtype (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"{name}: dense bf16 peak ({key})"
    return None, f"{name}: not in PEAK_BF16_TFLOPS (pass --peak-tflops)"


def machine(device):
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else None
    return {"device": device, "gpu": gpu, "cpu": cpu, "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


# --- timing and memory ---------------------------------------------------------------------------

def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(device, fn, *args):
    """(seconds, fn(*args)), the device synchronized before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args)
    sync(device)
    return time.perf_counter() - t0, out


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def peak_memory(device):
    """The block's peak memory, `mem.mib` after it (`mem.kind` says which): CUDA
    max_memory_allocated over the block; CPU the peak RSS over the block (sampled every 5 ms) minus
    the RSS at its start."""
    cuda = device.startswith("cuda")
    mem = SimpleNamespace(kind="cuda_max_memory_allocated" if cuda else "cpu_peak_rss_delta")
    gc.collect()
    if cuda:
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        yield mem
        sync(device)
        mem.mib = torch.cuda.max_memory_allocated(device) / 2**20
        return
    try:  # hand freed heap back to the OS so the baseline is what is really live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    base = peak = _rss()
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.wait(0.005):
            peak = max(peak, _rss())
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield mem
    finally:
        stop.set()
        thread.join()
    mem.mib = (max(peak, _rss()) - base) / 2**20


# --- training: train.py's step -------------------------------------------------------------------

def lone_pack(t5, ctx, pad_to):
    """train.py's step for one run: a fresh run (pack.make_run: the prompt module, or T5 itself
    for ft, and its AdamW + schedule) in a pack.Pack of one, every batch padded to `pad_to`
    ((None, None): to its own longest row), compiled as train.py --compile compiles it. Its
    batches are the ones the benchmark hands it (feed_step), not its own epoch order."""
    run = pack.make_run(t5, ctx.method, seed=ctx.seed, lr=ctx.lr, batch_size=ctx.batch_size,
                        max_steps=30000, **ctx.module_options)
    return pack.Pack(t5, [run], ctx.data, amp=ctx.amp, pad_to=pad_to,
                     wrap=torch.compile if ctx.compile else None)


def feed_step(lone, idx):
    """One step of the pack's lone run on the examples `idx`: (loss, padded tokens)."""
    run = lone.runs[0]
    record = lone.step([idx])[run.name]
    if record["nonfinite"]:
        raise cli.Failure(f"bench: non-finite {' and '.join(record['nonfinite'])} at step "
                             f"{record['step']}; try a smaller --lr")
    return record["loss"], lone.timings["padded_tokens"]


class TrainConfig:
    """One training config: its own run (fresh prompt module, or a copy of T5 for ft), optimizer
    and schedule, all from the same start, stepped as train.py steps a lone run. Dropout masks are
    each example's own (model.stateless_dropout), the same in every config."""

    def __init__(self, name, label, batches, pad_to, t5, ctx):
        self.name, self.label, self.batches, self.pad_to = name, label, batches, pad_to
        self.pack = lone_pack(copy.deepcopy(t5) if ctx.full else t5, ctx, pad_to)
        self.seconds, self.losses, self.padded, self.cold_seconds = [], [], 0, []

    def step(self, idx, device, timed_step, cold=False):
        seconds, (loss, padded) = timed(device, feed_step, self.pack, idx)
        if cold:
            self.cold_seconds.append(seconds)
        if timed_step:
            self.seconds.append(seconds)
            self.losses.append(loss)
            self.padded += padded


def padded_lengths(b, src, tgt, pad_to):
    """(input, label) lengths of batch `b` padded to `pad_to` (None: to its own longest row)."""
    return (max(pad_to[0] or 0, *(len(src[i]) for i in b)),
            max(pad_to[1] or 0, *(len(tgt[i]) for i in b)))


def measure_train_memory(batches, pad_to, t5, ctx):
    """Peak memory of one config alone: a fresh run and optimizer, two steps on its largest padded
    batch (the optimizer state appears at the first step, the steady peak at the second), on the
    shared T5 itself (ft trains it, so its weights are put back afterwards)."""
    big = max(batches, key=lambda b: len(b) * sum(padded_lengths(b, *ctx.data[:2], pad_to)))
    start = ctx.full and {k: v.detach().to("cpu", copy=True) for k, v in t5.state_dict().items()}
    with peak_memory(ctx.device) as mem:
        pack = lone_pack(t5, ctx, pad_to)
        for _ in range(2):
            feed_step(pack, big)
        del pack
    if start:
        t5.load_state_dict(start)
    return mem.mib, mem.kind


def padding_fraction(batches, src, tgt, pad_to):
    """Share of the input + label tensor elements that are padding, over `batches`."""
    real = sum(len(src[i]) + len(tgt[i]) for b in batches for i in b)
    return 1 - real / sum(len(b) * sum(padded_lengths(b, src, tgt, pad_to)) for b in batches)


def flop_ceiling(t5_config, source_ids, target_ids, n_prompt, full, pad_to):
    """FLOPs per example padded to `pad_to` over FLOPs per example at the real lengths, whole split:
    the most that removing padding can speed training up by (no padding left, equal FLOP/s)."""
    real = sum(train_flops(t5_config, len(s) + n_prompt, len(t), full)
               for s, t in zip(source_ids, target_ids))
    return len(source_ids) * train_flops(t5_config, pad_to[0] + n_prompt, pad_to[1], full) / real


def train_row(cfg, ctx, t5_config):
    """Figures of one timed config: examples, real and padded tokens, useful and hardware FLOP/s."""
    (src, tgt, _), n_prompt, full = ctx.data, ctx.n_prompt, ctx.full
    seconds, examples = sum(cfg.seconds), sum(len(b) for b in cfg.batches)
    real = sum(len(src[i]) + len(tgt[i]) for b in cfg.batches for i in b)
    useful = hardware = 0
    for b in cfg.batches:  # FLOPs: real lengths per example, and the padded shapes computed
        S_pad, T_pad = padded_lengths(b, src, tgt, cfg.pad_to)
        useful += sum(train_flops(t5_config, len(src[i]) + n_prompt, len(tgt[i]), full) for i in b)
        hardware += len(b) * train_flops(t5_config, S_pad + n_prompt, T_pad, full)
    return {"config": cfg.name, "label": cfg.label, "steps": len(cfg.batches), "examples": examples,
            "seconds": seconds, "examples_per_s": examples / seconds,
            "real_tokens_per_s": real / seconds, "padded_tokens_per_s": cfg.padded / seconds,
            "padding_fraction": 1 - real / cfg.padded,
            "useful_tflops": useful / seconds / 1e12, "hardware_tflops": hardware / seconds / 1e12,
            "mean_loss": float(np.mean(cfg.losses)), "losses": cfg.losses,
            "step_seconds": cfg.seconds, "cold_step_seconds": cfg.cold_seconds,
            "cold_examples_per_s": examples / sum(cfg.cold_seconds) if cfg.cold_seconds else None}


def as_batches(order, bs):
    return [order[i:i + bs].tolist() for i in range(0, len(order), bs)]


def train_batches(args, ctx):
    """(warm-up, timed, timed regrouped by length) batches, from train.py's epoch-0 order."""
    bs, n_timed = args.batch_size, args.steps * args.batch_size
    order = tasks.epoch_order(len(ctx.data[0]), args.seed, 0, bs)
    order = np.resize(order, n_timed + args.untimed_steps * bs)  # a tiny train file wraps around
    timed_order = order[:n_timed]
    lengths = [ctx.lengths[i] for i in timed_order]  # (b): (a)'s and (c)'s examples, regrouped
    grouped = timed_order[tasks.epoch_order(n_timed, args.seed, 0, bs, lengths)]
    return [as_batches(o, bs) for o in (order[n_timed:], timed_order, grouped)]


def time_configs(configs, warm, args, device, warm_shapes):
    """Warm-up steps, the --warm-shapes pass, then the timed steps, interleaved config by config."""
    for idx in warm:  # warm-up: allocator, compile, lazy init
        for cfg in configs:
            cfg.step(idx, device, False)
    if warm_shapes:  # each timed batch's shapes once, untimed: first-use costs a long run amortizes
        print("bench: --warm-shapes: one untimed pass over the timed batches first", flush=True)
        for j in range(args.steps):
            for cfg in configs:
                cfg.step(cfg.batches[j], device, False, cold=True)
    for j in range(args.steps):  # interleaved: a load spike hits every config alike
        for cfg in configs:
            cfg.step(cfg.batches[j], device, True)


def bench_train(args, ctx, t5, result):
    """The training configs (a), (b), (c) timed interleaved, then each one's peak memory alone;
    the padding of the whole epoch 0 as train.py orders it (is the timed sample representative?),
    the FLOP ceiling, the training speedups and the dropout-0 loss check."""
    (warm, timed_batches, grouped), free = train_batches(args, ctx), (None, None)
    (src, tgt, _), bs = ctx.data, args.batch_size
    plain = tasks.epoch_order(len(src), args.seed, 0, bs)  # the whole epoch 0, as train.py's
    specs = (("own_longest", "(a) pad to batch's longest", timed_batches, free, plain),
             ("group_by_length", "(b) (a) + --group-by-length", grouped, free,
              tasks.epoch_order(len(src), args.seed, 0, bs, ctx.lengths)),
             ("pad_to_max_length", f"(c) reference: pad to {ctx.max_length}", timed_batches,
              ctx.pad_max, plain))
    configs = [TrainConfig(*spec[:4], t5, ctx) for spec in specs]
    print(f"bench: training, {args.untimed_steps} warm-up + {args.steps} timed steps per config, "
          "interleaved step by step", flush=True)
    time_configs(configs, warm, args, ctx.device, ctx.warm_shapes)
    rows = result["train"] = [train_row(cfg, ctx, t5.config) for cfg in configs]
    del configs  # free the copies (and optimizer state) before measuring memory config by config
    for row, (_, _, batches, pad_to, epoch) in zip(rows, specs):
        print(f"bench: peak memory of {row['label']} ...", flush=True)
        row["peak_memory_mib"], row["peak_memory_kind"] = measure_train_memory(batches, pad_to, t5,
                                                                               ctx)
        row["epoch_padding_fraction"] = padding_fraction(as_batches(epoch, bs), src, tgt, pad_to)
    result["train_flop_ceiling"] = flop_ceiling(t5.config, src, tgt, ctx.n_prompt, ctx.full,
                                                ctx.pad_max)
    ref = rows[-1]
    for row in rows[:-1]:
        result["speedups"][f"train {row['config']}"] = row["examples_per_s"] / ref["examples_per_s"]
    per_step = [c / a for a, c in zip(rows[0]["step_seconds"], ref["step_seconds"])]  # same batches
    result["speedups"]["train own_longest, median per step"] = float(np.median(per_step))
    if args.dropout == 0:  # same batches, same start, no dropout: (a) and (c) follow one trajectory
        result["loss_max_rel_diff_a_vs_c"] = max(abs(a - c) / max(abs(c), 1e-12)
                                                 for a, c in zip(rows[0]["losses"], ref["losses"]))


# --- evaluation ----------------------------------------------------------------------------------

@torch.no_grad()
def reference_predict(model, tokenizer, ids, *, batch_size, pad_length, device, dtype,
                      max_length=20, max_new_tokens=None):
    """The reference stack's decoding: batches in data order, every input padded to `pad_length`, HF
    generate with max_length (HF default 20), which stops early only when every row of the batch has
    emitted </s>."""
    limit = {"max_new_tokens": max_new_tokens} if max_new_tokens else {"max_length": max_length}
    out, was_training = [], model.training
    model.eval()
    for start in range(0, len(ids), batch_size):
        input_ids, mask = tasks.pad(ids[start:start + batch_size], tokenizer.pad_token_id,
                                       pad_length)
        with runtime.autocast(device, dtype):
            gen = model.generate(input_ids.to(device), mask.to(device), do_sample=False,
                                 num_beams=1, **limit)
        out += [text.strip() for text in tokenizer.batch_decode(gen, skip_special_tokens=True)]
    model.train(was_training)
    return out


def count_decode_steps(net):
    """Wrap net.generate to record each batch's new tokens (its output starts with the start
    token)."""
    steps, generate = [], net.generate

    def counted(*args, **kwargs):
        gen = generate(*args, **kwargs)
        steps.append(gen.size(1) - 1)
        return gen
    net.generate = counted
    return steps


def eval_configs(args, ctx, net):
    """(name, label, predict(ids)) of the configs (1), (2) if the task has labels, (3), (3b)."""
    tokenizer, meta, max_length = ctx.tokenizer, ctx.meta, ctx.max_length
    new_tokens, ref = meta["max_target_length"], args.reference_max_length
    kw = dict(batch_size=args.eval_batch_size, device=ctx.device, dtype=args.dtype)
    ours, theirs = dict(kw, max_length=max_length), dict(kw, pad_length=max_length)
    configs = [("generate_sorted", f"(1) batched greedy, sorted, max_new_tokens={new_tokens}",
                partial(evaluation.predict, net, tokenizer, max_new_tokens=new_tokens, **ours))]
    if meta.get("labels"):
        configs.append(("rank", "(2) rank classification",
                        partial(evaluation.predict, net, tokenizer, labels=meta["labels"],
                                **ours)))
    return configs + [
        ("reference", f"(3) reference: data order, pad {max_length}, max_length {ref}",
         partial(reference_predict, net, tokenizer, max_length=ref, **theirs)),
        ("reference_short", f"(3b) reference padding+order, max_new_tokens={new_tokens}",
         partial(reference_predict, net, tokenizer, max_new_tokens=new_tokens, **theirs))]


def held_out_ids(args, ctx):
    """The first --eval-examples source ids of the validation rows, then the test rows."""
    ids = []
    for split in ("validation", "test"):
        path = ctx.folder / f"{split}.jsonl"
        if len(ids) < args.eval_examples and path.exists():
            ids += tasks.read_split({}, split, path, ctx.tokenizer, ctx.max_length)[1]
    return ids[:args.eval_examples]


def bench_eval(args, ctx, net, result):
    """The evaluation configs on the same held-out examples: one untimed warm-up each, then
    --eval-repeats rounds over the configs, the median time kept."""
    ids, configs = held_out_ids(args, ctx), eval_configs(args, ctx, net)
    steps = count_decode_steps(net)
    print(f"bench: evaluation, {len(ids)} examples, {args.eval_repeats} rounds over the configs",
          flush=True)
    for _, _, fn in configs:
        fn(ids[:min(8, len(ids))])  # untimed warm-up: allocation, lazy init
    runs, preds = {name: [] for name, _, _ in configs}, {}
    for _ in range(args.eval_repeats):  # rounds: a load spike hits every config alike
        for name, _, fn in configs:
            steps.clear()
            with peak_memory(ctx.device) as mem:
                seconds, preds[name] = timed(ctx.device, fn, ids)
            runs[name].append((seconds, mem.mib, float(np.mean(steps)) if steps else None))
    for name, label, _ in configs:
        seconds, mib, decode_steps = zip(*runs[name])
        same = None
        if name == "reference_short":  # the same decoding length as (1): the same predictions?
            same = float(np.mean([p == q for p, q in zip(preds[name], preds["generate_sorted"])]))
        median = float(np.median(seconds))
        result["eval"].append({
            "config": name, "label": label, "examples": len(ids), "seconds": median,
            "examples_per_s": len(ids) / median, "round_seconds": list(seconds),
            "decode_steps_per_batch": decode_steps[0], "peak_memory_mib": max(mib),
            "peak_memory_kind": mem.kind, "agreement_with_1": same})
    ref = next(r for r in result["eval"] if r["config"] == "reference")["examples_per_s"]
    for row in result["eval"]:
        if row["config"] != "reference":
            result["speedups"][f"eval {row['config']}"] = row["examples_per_s"] / ref


# --- output --------------------------------------------------------------------------------------

def print_tables(result):
    a, m = result["args"], result["machine"]
    print(f"\nbench: {a['method']} on {a['task']}, {Path(a['model']).name}"
          f"{' (random init)' if a['random_init'] else ''}, {result['dtype']}, "
          f"{m['gpu'] or m['cpu']} ({m['torch_threads']} threads), torch {m['torch']}")
    if result["train"]:
        print_train_table(result)
    if result["eval"]:
        print_eval_table(result)
    print("\nspeedups: " + ", ".join(f"{k} {v:.2f}x" for k, v in result["speedups"].items()))
    print("load average (1 min) at start / after training / end: "
          + " / ".join(f"{v[0]:.1f}" for v in result["load_average"].values()))


def print_train_table(result):
    a, rows, peak = result["args"], result["train"], result["peak_tflops"]
    print(f"\ntraining: batch {a['batch_size']}, {a['steps']} timed steps per config after "
          f"{a['untimed_steps']} warm-up, interleaved; {result['n_trainable']:,} trainable "
          f"parameters; memory = {rows[0]['peak_memory_kind']}")
    print(f"{'config':<30}{'ex/s':>8}{'real tok/s':>11}{'pad tok/s':>10}{'pad %':>6}{'peak MiB':>9}"
          f"{'TFLOP/s':>9}" + (f"{'MFU %':>7}{'HFU %':>7}" if peak else "") + f"{'x (c)':>7}")
    ref = rows[-1]["examples_per_s"]
    for r in rows:
        line = (f"{r['label']:<30}{r['examples_per_s']:>8.2f}{r['real_tokens_per_s']:>11.0f}"
                f"{r['padded_tokens_per_s']:>10.0f}{100 * r['padding_fraction']:>6.1f}"
                f"{r['peak_memory_mib']:>9.0f}{r['useful_tflops']:>9.4f}")
        if peak:
            line += (f"{100 * r['useful_tflops'] / peak:>7.2f}"
                     f"{100 * r['hardware_tflops'] / peak:>7.2f}")
        print(line + f"{r['examples_per_s'] / ref:>7.2f}")
    print("TFLOP/s: useful (real tokens; hardware, padded: "
          + ", ".join(f"{r['hardware_tflops']:.4f}" for r in rows)
          + f"); peak: {result['peak_source']}")
    if rows[0]["cold_examples_per_s"]:
        print("cold (first pass over the same batches, --warm-shapes) ex/s: "
              + ", ".join(f"{r['label'][:3]} {r['cold_examples_per_s']:.2f}" for r in rows))
    print("padding over the whole epoch 0 as train.py orders it: "
          + ", ".join(f"{r['label'][:3]} {100 * r['epoch_padding_fraction']:.1f}%" for r in rows))
    print(f"FLOP ceiling: (c)'s FLOPs per example / the real ones, whole training split = "
          f"{result['train_flop_ceiling']:.2f}x (the most padding removal can give at equal "
          "FLOP/s)")
    if "loss_max_rel_diff_a_vs_c" in result:
        print(f"dropout 0: (a) vs (c) losses, max relative difference "
              f"{result['loss_max_rel_diff_a_vs_c']:.2e}")


def print_eval_table(result):
    a, rows = result["args"], result["eval"]
    print(f"\nevaluation: {rows[0]['examples']} held-out examples, batch {a['eval_batch_size']}, "
          f"median of {a['eval_repeats']} interleaved rounds; memory = "
          f"{rows[0]['peak_memory_kind']}")
    print(f"{'config':<50}{'ex/s':>8}{'seconds':>9}{'steps/batch':>12}{'peak MiB':>9}{'x (3)':>7}"
          f"{'same as (1)':>12}")
    ref = next(r for r in rows if r["config"] == "reference")["examples_per_s"]
    for r in rows:
        same = "" if r.get("agreement_with_1") is None else f"{100 * r['agreement_with_1']:.0f}%"
        steps = "" if r["decode_steps_per_batch"] is None else f"{r['decode_steps_per_batch']:.1f}"
        print(f"{r['label']:<50}{r['examples_per_s']:>8.1f}{r['seconds']:>9.2f}{steps:>12}"
              f"{r['peak_memory_mib']:>9.0f}{r['examples_per_s'] / ref:>7.2f}{same:>12}")


# --- the benchmark -------------------------------------------------------------------------------

def setup(args):
    """What both benchmarks share (ctx): device, precision, the training split tokenized as train.py
    does, the run's options, and the T5 as train.py builds it (training mode, dropout on)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = tasks.load_meta(args.data_dir, args.task)
    max_length = args.max_length or meta["max_length"]
    tokenizer = runtime.load_tokenizer(args.tokenizer or args.model)
    folder = Path(args.data_dir) / args.task
    _, src, tgt = tasks.read_split({}, "train", folder / "train.jsonl", tokenizer, max_length)
    ctx = SimpleNamespace(
        device=device, amp=runtime.set_precision(args.dtype, device), meta=meta,
        tokenizer=tokenizer, max_length=max_length, folder=folder,
        data=(src, tgt, tokenizer.pad_token_id),
        lengths=[len(s) + len(t) for s, t in zip(src, tgt)],
        pad_max=(max_length, max(meta["max_target_length"], max(map(len, tgt)))),  # the reference's
        method=args.method, seed=args.seed, lr=args.lr, batch_size=args.batch_size,
        module_options={"prompt_length": args.prompt_length, "reparam": args.reparam},
        compile=args.compile, full=args.method == "ft",
        warm_shapes=device == "cuda" if args.warm_shapes is None else args.warm_shapes)
    t5 = runtime.load_t5(args.model, random_init=args.random_init, seed=args.seed,
                         dropout=args.dropout).to(device)  # as train.py --dropout
    return ctx, M.stateless_dropout(t5).train()  # T5's dropout active, as in train.py


@cli.script
def main(argv=None):
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx, t5 = setup(args)
    start = pack.make_run(t5, args.method, seed=args.seed, lr=args.lr, **ctx.module_options)
    ctx.n_prompt = 0 if ctx.full else start.net.prompt().size(0)
    peak, peak_source = peak_tflops(ctx.device, args.dtype, args.peak_tflops)
    result = {"args": vars(args), "machine": machine(ctx.device), "dtype": args.dtype,
              "n_trainable": M.count_trainable(start.module), "n_prompt": ctx.n_prompt,
              "peak_tflops": peak, "peak_source": peak_source, "train": [], "eval": [],
              "speedups": {}, "load_average": {"start": os.getloadavg()}}  # how busy the cores were
    print(f"bench: {args.method} on {args.task}: {len(ctx.data[0])} training rows, "
          f"{result['n_trainable']:,} trainable parameters, {ctx.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    if not args.skip_train:
        bench_train(args, ctx, t5, result)
    result["load_average"]["after_train"] = os.getloadavg()
    if not args.skip_eval:  # the initial prompt, folded: inference needs only P'
        net = start.net if ctx.full else M.PromptedT5(t5, M.FoldedPrompt(start.net.prompt()))
        bench_eval(args, ctx, net, result)
    result["load_average"]["end"] = os.getloadavg()
    print_tables(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"bench: wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
