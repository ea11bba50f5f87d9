"""Speed benchmark: our fast paths against the reference stack's behaviour, side by side in one run.

Reads data/<task>/{train,validation,test}.jsonl + meta.json (prepare_data.py) and a T5. Writes nothing but
the optional --json file; prints two tables and the speedup ratios.

Training (the real step: train.train_step, as train.py's loop runs it), on the
same `--steps` batches of `--batch-size` examples drawn from train.py's epoch-0 order, same seeds, each config
with its own copy of the initial prompt (all of T5 for ft), its own optimizer and dropout RNG; `--untimed-steps`
untimed steps first, then the timed steps INTERLEAVED (a, b, c, a, b, c, ...) so that other work on a shared
machine slows the three alike. On CUDA (--warm-shapes, default there) every config first runs its timed
batches once untimed: the first step at a new input length costs more on a GPU (kernels loaded and chosen on
first use), a one-off per shape that a run of thousands of steps amortizes but that would dominate 50 steps of
varying lengths; that first pass is kept as "cold" figures. The peak memory of each
config is measured afterwards, alone (a fresh optimizer, two steps on its largest padded batch):
  (a) ours: every batch padded to its own longest row
  (b) ours + --group-by-length: the SAME examples regrouped by train.py's epoch_order (sorted longest first
      within a mega-batch), so batches hold similar lengths
  (c) reference stack: every input padded to --max-length (256) and every label to the longest target
Evaluation (the same held-out examples: validation rows, then test rows, first --eval-examples; one untimed
warm-up on 8 examples per config, then --eval-repeats rounds over the configs, the median time kept):
  (1) decoding.predict: batched greedy decoding sorted by length, max_new_tokens = meta max_target_length,
      each row stops at </s>
  (2) decoding.rank_classify: one encoder pass per example, every label scored in one decoder pass (after a
      first step shared by the labels, decoding.label_nll)
  (3) reference: batches in data order, inputs padded to --max-length, HF generate(max_length=20), which stops
      only when every row of a batch has emitted </s> (HF's own early stop, nothing else)
  (3b) (3) with max_new_tokens as in (1): how much of (1)'s gain is padding and order alone. A random-weight
      T5 almost never emits </s>, so (3) runs all 19 decoder steps; a TRAINED model writes "0</s>" and HF
      stops after 3, like (3b). (3b) is the honest figure for trained models.

Examples/s counts examples; real tokens = source + target ids of each example (</s> included, prompt rows
excluded); padded tokens = the input and label tensors' sizes (prompt rows excluded, the same n everywhere).
Peak memory: CUDA torch.cuda.max_memory_allocated over the config (model, optimizer state and activations
included); CPU the peak resident set size over the config minus the RSS before it (sampled every 5 ms after
gc + malloc_trim), i.e. what the config adds on top of the loaded model. The 1-minute load average is
recorded at the start, after training and at the end: on a shared machine it says how busy the cores were.

FLOPs (training, per example; S = encoder tokens incl. the prompt, T = decoder tokens, 2 FLOPs per MAC):
  linear    = 2 * [S * L_enc * (4 d i + F) + T * L_dec * (4 d i + 2 d i + F) + S * L_dec * 2 d i + T * d V]
              (i = heads * d_kv; F = 2 d d_ff, 3 d d_ff gated; cross-attention K/V run on encoder tokens)
  attention = 4 i * (L_enc S^2 + L_dec (T^2 + T S))           (QK^T and AV)
  step      = 3 * linear + 3 * attention   for ft   (backward = activation grads + weight grads = 2x forward)
            = 2 * linear + 3 * attention   for prompt methods (frozen T5: activation grads only, no weight
                                             grads, so the linear layers' backward costs 1x forward)
"useful" TFLOP/s counts real tokens (MFU), "hardware" TFLOP/s counts padded tokens (what the chip computed).
The fraction of peak uses --peak-tflops, else the card's dense bf16 peak from PEAK_BF16_TFLOPS (CUDA + bf16).

    # CPU, as docs/speed.md was measured (2 shared cores: --threads 1; 10-15 minutes per run there)
    python prepare_data.py --source ../shared/data/raw --tasks rte sst2 --out /tmp/benchdata --tokenizer ../shared/data/t5
    python scripts/bench.py --method ept --model ../shared/data/t5/t5-small --random-init --tokenizer ../shared/data/t5 \\
        --task rte --data-dir /tmp/benchdata --steps 20 --threads 1 --json bench_rte_ept.json
    # one GPU: t5-base with bf16 autocast (and optionally --compile); ept against ft for peak memory
    python scripts/bench.py --method ept --model ../shared/data/t5/t5-base --random-init --tokenizer ../shared/data/t5 \\
        --task rte --data-dir /tmp/benchdata --steps 50 --untimed-steps 5 --dtype bf16
    python scripts/bench.py --method ft  --model ../shared/data/t5/t5-base --random-init --tokenizer ../shared/data/t5 \\
        --task rte --data-dir /tmp/benchdata --steps 50 --untimed-steps 5 --dtype bf16 --skip-eval
"""
import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages and ept/
import model as M  # noqa: E402
import train  # noqa: E402
from ept import batching, cli, costs, decoding, errors, files, optim, pretrained, runtime  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
# data
group = parser.add_argument_group("data")
group.add_argument("--task", required=True, help="task name: data/<task>/ written by prepare_data.py")
group.add_argument("--data-dir", default="data", help="folder holding <task>/meta.json and the split files")
group.add_argument("--max-length", type=int, default=None, help="max input tokens (default: meta.json's, 256)")
group.add_argument("--eval-examples", type=int, default=256, help="held-out examples to decode (validation, then test)")
# model
group = parser.add_argument_group("model")
group.add_argument("--model", default="t5-base", help="Hub name or local folder of the T5")
group.add_argument("--tokenizer", default=None, help="Hub name or folder of the tokenizer (default: --model)")
group.add_argument("--random-init", action="store_true", help="random T5 weights from the config (speed only)")
group.add_argument("--method", default="ept", choices=M.METHODS, help="ft = full fine-tuning, else a prompt method")
group.add_argument("--prompt-length", type=int, default=10, help="prompt rows n for pt/ptuning/resprompt")
group.add_argument("--reparam", default="mlp", choices=M.REPARAMS, help="ptuning's reparameterization network")
# optimisation
group = parser.add_argument_group("optimisation")
group.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step (the paper's 16)")
group.add_argument("--steps", type=int, default=20, help="timed optimizer steps per training config")
group.add_argument("--untimed-steps", type=int, default=2, help="untimed steps per training config first (allocator, compile)")
group.add_argument("--warm-shapes", action=argparse.BooleanOptionalAction, default=None,
                   help="run the timed batches once untimed first (default: on CUDA only; see the docstring)")
group.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 0.3 prompts, 1e-5 ft)")
group.add_argument("--seed", type=int, default=0, help="seeds the T5 weights, the prompt, the data order and dropout")
group.add_argument("--dtype", default="fp32", choices=runtime.DTYPES, help="as train.py --dtype: fp32 (the paper's), tf32, bf16")
group.add_argument("--compile", action="store_true", help="torch.compile the training forward, as train.py --compile")
group.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default: torch's, one per core); 1 on cores shared with other jobs, "
                        "where threads waiting for each other at every op swamp small batches (docs/speed.md)")
group.add_argument("--dropout", type=float, default=None,
                   help="override T5's dropout (default: the config's 0.1); with 0, (a) and (c) must give the same losses")
# evaluation
group = parser.add_argument_group("evaluation")
group.add_argument("--eval-batch-size", type=int, default=64, help="examples per decoding batch, every eval config")
group.add_argument("--reference-max-length", type=int, default=20, help="HF generate's max_length in (3) (HF default 20)")
group.add_argument("--eval-repeats", type=int, default=3, help="rounds over the evaluation configs; the median is kept")
group.add_argument("--skip-train", action="store_true", help="only the evaluation configs")
group.add_argument("--skip-eval", action="store_true", help="only the training configs")
# output
group = parser.add_argument_group("output")
group.add_argument("--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s for the fraction (default: table)")
group.add_argument("--json", default=None, help="also write every figure to this JSON file")

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets; first match of the device name wins.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0))


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
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"device": device, "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
            "cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


# --- FLOPs (module docstring) -----------------------------------------------------------------------

forward_flops, train_flops = costs.forward_flops, costs.train_flops  # shared with the GPU-hour model


# --- memory -----------------------------------------------------------------------------------------

def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """CUDA: max_memory_allocated over the block. CPU: peak RSS over the block minus RSS at its start."""

    def __init__(self, device):
        self.cuda = device.startswith("cuda")
        self.device = device
        self.kind = "cuda_max_memory_allocated" if self.cuda else "cpu_peak_rss_delta"

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:  # hand freed heap back to the OS so the baseline is what is really live
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.base = self.peak = _rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, _rss())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.mib = (max(self.peak, _rss()) - self.base) / 2**20
        return False


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# --- training: train.py's step -------------------------------------------------------------------------

class PaddedData(train.TrainData):
    """train.TrainData whose batches are padded to `pad_to` (None: the batch's own longest row), counting the
    padded input + label tokens it hands out: how bench.py runs the reference stack's padding through
    train.train_step unchanged."""

    def __init__(self, source_ids, target_ids, pad_id, pad_to):
        super().__init__(source_ids, target_ids, pad_id)
        self.pad_to, self.padded = pad_to, 0

    def batch(self, idx):
        input_ids, mask, labels = batching.collate(idx, self.source_ids, self.target_ids, self.pad_id, self.pad_to)
        self.padded += input_ids.numel() + labels.numel()
        return input_ids, mask, labels


def run_step(model, raw_model, idx, args, pad_to, optimizer, scheduler):
    """train.train_step on one rank, the whole batch in one micro-batch: (loss, padded tokens)."""
    data = PaddedData(args["source_ids"], args["target_ids"], args["pad_id"], pad_to)
    loss, *_ = train.train_step(model, raw_model, optimizer, scheduler, idx, data, amp=args["amp"],
                                device=args["device"], micro_batch_size=len(idx))
    return loss, data.padded


class TrainConfig:
    """One training config's own trainable copy, optimizer, schedule and dropout RNG, all from the same start.
    `step` puts its copy into the shared PromptedT5 first (the frozen T5 is shared; `ft` copies all of T5)."""

    def __init__(self, name, label, batches, pad_to, raw_model, init_state, lr, seed, device):
        self.name, self.label, self.batches, self.pad_to = name, label, batches, pad_to
        self.attr = "t5" if raw_model.prompt_module is None else "prompt_module"
        self.module = copy.deepcopy(getattr(raw_model, self.attr))
        self.module.load_state_dict(init_state)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = optim.make_optimizer(self.params, lr, 0.01, device.startswith("cuda"), 30000)
        gen = torch.Generator().manual_seed(seed)  # the same dropout stream start for every config
        self.rng = (gen.get_state(), torch.cuda.get_rng_state(device) if device.startswith("cuda") else None)
        self.seconds, self.losses, self.padded, self.cold_seconds = [], [], 0, []

    def step(self, idx, raw_model, model, args, timed, cold=False):
        setattr(raw_model, self.attr, self.module)
        torch.set_rng_state(self.rng[0])
        if self.rng[1] is not None:
            torch.cuda.set_rng_state(self.rng[1])
        sync(args["device"])
        t0 = time.perf_counter()
        loss, padded = run_step(model, raw_model, idx, args, self.pad_to, self.optimizer, self.scheduler)
        sync(args["device"])
        seconds = time.perf_counter() - t0
        if cold:
            self.cold_seconds.append(seconds)
        if timed:
            self.seconds.append(seconds)
            self.losses.append(loss)
            self.padded += padded
        self.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(args["device"]) if self.rng[1] is not None else None)


def measure_train_memory(batches, pad_to, raw_model, model, init_state, args, lr):
    """Peak memory of one config alone: a fresh optimizer, two steps on its largest padded batch (the
    optimizer state appears at the first step, the steady peak at the second), on the shared model itself."""
    attr = "t5" if raw_model.prompt_module is None else "prompt_module"
    src, tgt = args["source_ids"], args["target_ids"]
    big = max(batches, key=lambda b: len(b) * (max(pad_to[0] or 0, max(len(src[i]) for i in b))
                                                + max(pad_to[1] or 0, max(len(tgt[i]) for i in b))))
    module = getattr(raw_model, attr)
    params = [p for p in module.parameters() if p.requires_grad]
    with PeakMemory(args["device"]) as mem:
        optimizer, scheduler = optim.make_optimizer(params, lr, 0.01, args["device"].startswith("cuda"), 30000)
        for _ in range(2):
            run_step(model, raw_model, big, args, pad_to, optimizer, scheduler)
        del optimizer, scheduler
    module.load_state_dict(init_state)
    return mem.mib, mem.kind


def padding_fraction(batches, source_ids, target_ids, pad_to):
    """Share of the input + label tensor elements that are padding, over `batches`."""
    real = padded = 0
    for b in batches:
        real += sum(len(source_ids[i]) + len(target_ids[i]) for i in b)
        padded += len(b) * (max(pad_to[0] or 0, max(len(source_ids[i]) for i in b))
                            + max(pad_to[1] or 0, max(len(target_ids[i]) for i in b)))
    return 1 - real / padded


def flop_ceiling(t5_config, source_ids, target_ids, n_prompt, full, pad_to):
    """FLOPs per example padded to `pad_to` over FLOPs per example at the real lengths, whole split: the most
    that removing padding can speed training up by (no padding left at all, equal efficiency per FLOP)."""
    real = sum(train_flops(t5_config, len(s) + n_prompt, len(t), full) for s, t in zip(source_ids, target_ids))
    return len(source_ids) * train_flops(t5_config, pad_to[0] + n_prompt, pad_to[1], full) / real


def train_row(cfg, args, n_prompt, full, t5_config):
    """Figures of one timed config: examples, real and padded tokens, useful and hardware FLOPs per second."""
    src, tgt = args["source_ids"], args["target_ids"]
    seconds = sum(cfg.seconds)
    examples = sum(len(b) for b in cfg.batches)
    real = sum(len(src[i]) + len(tgt[i]) for b in cfg.batches for i in b)
    useful = hardware = 0
    for b in cfg.batches:  # FLOPs: real lengths per example, and the padded shapes the chip computed
        S_pad = max(cfg.pad_to[0] or 0, max(len(src[i]) for i in b)) + n_prompt
        T_pad = max(cfg.pad_to[1] or 0, max(len(tgt[i]) for i in b))
        useful += sum(train_flops(t5_config, len(src[i]) + n_prompt, len(tgt[i]), full) for i in b)
        hardware += len(b) * train_flops(t5_config, S_pad, T_pad, full)
    return {"config": cfg.name, "label": cfg.label, "steps": len(cfg.batches), "examples": examples, "seconds": seconds,
            "examples_per_s": examples / seconds, "real_tokens_per_s": real / seconds,
            "padded_tokens_per_s": cfg.padded / seconds, "padding_fraction": 1 - real / cfg.padded,
            "useful_tflops": useful / seconds / 1e12, "hardware_tflops": hardware / seconds / 1e12,
            "mean_loss": float(np.mean(cfg.losses)), "losses": cfg.losses, "step_seconds": cfg.seconds,
            "cold_step_seconds": cfg.cold_seconds,
            "cold_examples_per_s": examples / sum(cfg.cold_seconds) if cfg.cold_seconds else None}


# --- evaluation -------------------------------------------------------------------------------------

@torch.no_grad()
def reference_predict(model, tokenizer, ids, *, batch_size, pad_length, device, dtype, max_length=20,
                      max_new_tokens=None):
    """The reference stack's decoding: batches in data order, every input padded to `pad_length`, HF generate
    with max_length (HF default 20), which stops early only when every row of the batch has emitted </s>."""
    limit = {"max_new_tokens": max_new_tokens} if max_new_tokens else {"max_length": max_length}
    out = []
    was_training = model.training
    model.eval()
    for start in range(0, len(ids), batch_size):
        input_ids, mask = batching.pad(ids[start:start + batch_size], tokenizer.pad_token_id, pad_length)
        with runtime.autocast(device, dtype):
            gen = model.generate(input_ids.to(device), mask.to(device), do_sample=False, num_beams=1, **limit)
        out += [text.strip() for text in tokenizer.batch_decode(gen, skip_special_tokens=True)]
    model.train(was_training)
    return out


def count_decode_steps(net):
    """Wrap net.generate to record the new tokens of every batch (the output has the start token first)."""
    steps, generate = [], net.generate

    def counted(*args, **kwargs):
        gen = generate(*args, **kwargs)
        steps.append(gen.size(1) - 1)
        return gen
    net.generate = counted
    return steps


# --- output -----------------------------------------------------------------------------------------

def print_tables(result):
    a = result["args"]
    print(f"\nbench: {a['method']} on {a['task']}, {Path(a['model']).name}{' (random init)' if a['random_init'] else ''}, "
          f"{result['dtype']}, {result['machine']['gpu'] or result['machine']['cpu']} "
          f"({result['machine']['torch_threads']} threads), torch {result['machine']['torch']}")
    if result["train"]:
        peak = result["peak_tflops"]
        print(f"\ntraining: batch {a['batch_size']}, {a['steps']} timed steps per config after {a['untimed_steps']} warm-up, "
              f"interleaved; {result['n_trainable']:,} trainable parameters; memory = {result['train'][0]['peak_memory_kind']}")
        head = f"{'config':<30}{'ex/s':>8}{'real tok/s':>11}{'pad tok/s':>10}{'pad %':>6}{'peak MiB':>9}{'TFLOP/s':>9}"
        print(head + (f"{'MFU %':>7}{'HFU %':>7}" if peak else "") + f"{'x (c)':>7}")
        ref = result["train"][-1]["examples_per_s"]
        for r in result["train"]:
            line = (f"{r['label']:<30}{r['examples_per_s']:>8.2f}{r['real_tokens_per_s']:>11.0f}"
                    f"{r['padded_tokens_per_s']:>10.0f}{100 * r['padding_fraction']:>6.1f}{r['peak_memory_mib']:>9.0f}"
                    f"{r['useful_tflops']:>9.4f}")
            if peak:
                line += f"{100 * r['useful_tflops'] / peak:>7.2f}{100 * r['hardware_tflops'] / peak:>7.2f}"
            print(line + f"{r['examples_per_s'] / ref:>7.2f}")
        print("TFLOP/s: useful (real tokens; hardware, padded: "
              + ", ".join(f"{r['hardware_tflops']:.4f}" for r in result["train"]) + f"); peak: {result['peak_source']}")
        if result["train"][0]["cold_examples_per_s"]:
            print("cold (first pass over the same batches, --warm-shapes) ex/s: "
                  + ", ".join(f"{r['label'][:3]} {r['cold_examples_per_s']:.2f}" for r in result["train"]))
        print("padding over the whole epoch 0 as train.py orders it: "
              + ", ".join(f"{r['label'][:3]} {100 * r['epoch_padding_fraction']:.1f}%" for r in result["train"]))
        print(f"FLOP ceiling: (c)'s FLOPs per example / the real ones, whole training split = "
              f"{result['train_flop_ceiling']:.2f}x (the most padding removal can give at equal FLOP/s)")
        if "loss_max_rel_diff_a_vs_c" in result:
            print(f"dropout 0: (a) vs (c) losses, max relative difference {result['loss_max_rel_diff_a_vs_c']:.2e}")
    if result["eval"]:
        print(f"\nevaluation: {result['eval'][0]['examples']} held-out examples, batch {a['eval_batch_size']}, "
              f"median of {a['eval_repeats']} interleaved rounds; memory = {result['eval'][0]['peak_memory_kind']}")
        print(f"{'config':<50}{'ex/s':>8}{'seconds':>9}{'steps/batch':>12}{'peak MiB':>9}{'x (3)':>7}{'same as (1)':>12}")
        ref = next(r for r in result["eval"] if r["config"] == "reference")["examples_per_s"]
        for r in result["eval"]:
            same = "" if r.get("agreement_with_1") is None else f"{100 * r['agreement_with_1']:.0f}%"
            steps = "" if r["decode_steps_per_batch"] is None else f"{r['decode_steps_per_batch']:.1f}"
            print(f"{r['label']:<50}{r['examples_per_s']:>8.1f}{r['seconds']:>9.2f}{steps:>12}"
                  f"{r['peak_memory_mib']:>9.0f}{r['examples_per_s'] / ref:>7.2f}{same:>12}")
    print("\nspeedups: " + ", ".join(f"{k} {v:.2f}x" for k, v in result["speedups"].items()))
    print("load average (1 min) at start / after training / end: "
          + " / ".join(f"{v[0]:.1f}" for v in result["load_average"].values()))


@errors.script
def main(argv=None):
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype
    amp = runtime.set_precision(dtype, device)  # as train.py
    lr = args.lr if args.lr is not None else (1e-5 if args.method == "ft" else 0.3)
    warm_shapes = device == "cuda" if args.warm_shapes is None else args.warm_shapes

    # --- data: train.py's tokenization (cached) and epoch-0 order
    meta = files.load_meta(args.data_dir, args.task)
    max_length = args.max_length or meta["max_length"]
    tokenizer = pretrained.load_tokenizer(args.tokenizer or args.model)
    data = Path(args.data_dir) / args.task
    _, train_src, train_tgt = batching.load_split(data / "train.jsonl", tokenizer, max_length)
    pad_id = tokenizer.pad_token_id
    lengths = [len(s) + len(t) for s, t in zip(train_src, train_tgt)]
    bs, n_timed = args.batch_size, args.steps * args.batch_size
    order = batching.epoch_order(len(train_src), args.seed, 0, bs)
    order = np.resize(order, n_timed + args.untimed_steps * bs)  # a tiny train file wraps around
    timed, warm = order[:n_timed], order[n_timed:]
    grouped = timed[batching.epoch_order(len(timed), args.seed, 0, bs, [lengths[i] for i in timed])]  # same examples
    as_batches = lambda o: [o[i:i + bs].tolist() for i in range(0, len(o), bs)]  # noqa: E731
    pad_max = (max_length, max(meta["max_target_length"], max(map(len, train_tgt))))  # the reference stack's padding

    # --- model: as train.py builds it
    t5 = pretrained.load_t5(args.model, random_init=args.random_init, seed=args.seed)
    if args.dropout is not None:  # as train.py --dropout
        train.set_dropout(t5, args.dropout)
    torch.manual_seed(args.seed)
    module = M.build_prompt_module(args.method, t5.config.d_model, prompt_length=args.prompt_length,
                                     reparam=args.reparam, embedding=t5.get_input_embeddings().weight,
                                     generator=torch.Generator().manual_seed(args.seed))
    raw_model = M.PromptedT5(t5, module).to(device)
    raw_model.train()  # T5's dropout active, as in train.py
    n_prompt = 0 if module is None else module().size(0)
    init_state = {k: v.cpu() for k, v in raw_model.trainable_state_dict().items()}  # on CPU: not in the GPU peak
    peak, peak_source = peak_tflops(device, dtype, args.peak_tflops)
    result = {"args": vars(args), "machine": machine(device), "dtype": dtype, "n_trainable": M.count_trainable(raw_model),
              "n_prompt": n_prompt, "peak_tflops": peak, "peak_source": peak_source, "train": [], "eval": [], "speedups": {}}
    print(f"bench: {args.method} on {args.task}: {len(train_src)} training rows, {result['n_trainable']:,} trainable "
          f"parameters, {device} {dtype}, {torch.get_num_threads()} threads")

    result["load_average"] = {"start": os.getloadavg()}  # a shared machine: other work slows every config alike
    if not args.skip_train:
        model = torch.compile(raw_model) if args.compile else raw_model
        shared = dict(source_ids=train_src, target_ids=train_tgt, pad_id=pad_id, amp=amp, device=device)
        original = raw_model.t5 if module is None else raw_model.prompt_module
        names = (("own_longest", "(a) pad to batch's longest"), ("group_by_length", "(b) (a) + --group-by-length"),
                 ("pad_to_max_length", f"(c) reference: pad to {max_length}"))
        specs = ((as_batches(timed), (None, None)), (as_batches(grouped), (None, None)), (as_batches(timed), pad_max))
        torch.manual_seed(args.seed)
        configs = [TrainConfig(name, label, batches, pad_to, raw_model, init_state, lr, args.seed, device)
                   for (name, label), (batches, pad_to) in zip(names, specs)]
        print(f"bench: training, {args.untimed_steps} warm-up + {args.steps} timed steps per config, interleaved step by step",
              flush=True)
        for idx in as_batches(warm):  # warm-up: allocator, compile, lazy init
            for cfg in configs:
                cfg.step(idx, raw_model, model, shared, timed=False)
        if warm_shapes:  # each timed batch's shapes once, untimed: first-use costs that a long run amortizes
            print("bench: --warm-shapes: one untimed pass over the timed batches first", flush=True)
            for j in range(args.steps):
                for cfg in configs:
                    cfg.step(cfg.batches[j], raw_model, model, shared, timed=False, cold=True)
        for j in range(args.steps):  # interleaved: a load spike on a shared machine hits every config alike
            for cfg in configs:
                cfg.step(cfg.batches[j], raw_model, model, shared, timed=True)
        rows = [train_row(cfg, shared, n_prompt, module is None, t5.config) for cfg in configs]
        setattr(raw_model, configs[0].attr, original)
        del configs, cfg  # free the copies (and their optimizer state) before measuring memory config by config
        for row, (batches, pad_to) in zip(rows, specs):
            print(f"bench: peak memory of {row['label']} ...", flush=True)
            row["peak_memory_mib"], row["peak_memory_kind"] = measure_train_memory(
                batches, pad_to, raw_model, model, init_state, shared, lr)
        result["train"] = rows
        n = len(train_src)  # the whole epoch 0 as train.py orders it: is the timed sample representative?
        for row, order_e, pad_to in ((rows[0], batching.epoch_order(n, args.seed, 0, bs), (None, None)),
                                     (rows[1], batching.epoch_order(n, args.seed, 0, bs, lengths), (None, None)),
                                     (rows[2], batching.epoch_order(n, args.seed, 0, bs), pad_max)):
            row["epoch_padding_fraction"] = padding_fraction(as_batches(order_e), train_src, train_tgt, pad_to)
        result["train_flop_ceiling"] = flop_ceiling(t5.config, train_src, train_tgt, n_prompt, module is None, pad_max)
        ref = rows[-1]
        for row in rows[:-1]:
            result["speedups"][f"train {row['config']}"] = row["examples_per_s"] / ref["examples_per_s"]
        per_step = [c / a for a, c in zip(rows[0]["step_seconds"], ref["step_seconds"])]  # same batches, same step
        result["speedups"]["train own_longest, median per step"] = float(np.median(per_step))
        if args.dropout == 0:  # same batches, same start, no dropout: (a) and (c) follow one trajectory
            result["loss_max_rel_diff_a_vs_c"] = max(abs(a - c) / max(abs(c), 1e-12)
                                                     for a, c in zip(rows[0]["losses"], ref["losses"]))

    result["load_average"]["after_train"] = os.getloadavg()
    if not args.skip_eval:
        raw_model.load_trainable_state_dict({k: v.to(device) for k, v in init_state.items()})
        with torch.no_grad():
            prompt = raw_model.prompt()
        net = raw_model if prompt is None else M.PromptedT5(t5, M.FoldedPrompt(prompt.float())).to(device)  # only P'
        ids = []
        for split in ("validation", "test"):
            if len(ids) < args.eval_examples and (data / f"{split}.jsonl").exists():
                ids += batching.load_split(data / f"{split}.jsonl", tokenizer, max_length)[1]
        ids = ids[:args.eval_examples]
        steps = count_decode_steps(net)
        new_tokens = meta["max_target_length"]
        kw = dict(batch_size=args.eval_batch_size, device=device, dtype=dtype)
        configs = [("generate_sorted", f"(1) batched greedy, sorted, max_new_tokens={new_tokens}",
                    lambda x: decoding.predict(net, tokenizer, x, max_new_tokens=new_tokens, max_length=max_length, **kw))]
        if meta.get("labels"):
            configs.append(("rank", "(2) rank classification",
                            lambda x: decoding.rank_classify(net, tokenizer, x, meta["labels"], max_length=max_length, **kw)))
        configs += [("reference", f"(3) reference: data order, pad {max_length}, max_length {args.reference_max_length}",
                     lambda x: reference_predict(net, tokenizer, x, pad_length=max_length,
                                                 max_length=args.reference_max_length, **kw)),
                    ("reference_short", f"(3b) reference padding+order, max_new_tokens={new_tokens}",
                     lambda x: reference_predict(net, tokenizer, x, pad_length=max_length, max_new_tokens=new_tokens, **kw))]
        print(f"bench: evaluation, {len(ids)} examples, {args.eval_repeats} rounds over the configs", flush=True)
        for _, _, fn in configs:
            fn(ids[:min(8, len(ids))])  # untimed warm-up: allocation, lazy init
        runs = {name: [] for name, _, _ in configs}
        preds = {}
        for _ in range(args.eval_repeats):  # rounds: a load spike hits every config alike; the median is kept
            for name, _, fn in configs:
                steps.clear()
                with PeakMemory(device) as mem:
                    sync(device)
                    t0 = time.perf_counter()
                    preds[name] = fn(ids)
                    sync(device)
                    seconds = time.perf_counter() - t0
                runs[name].append((seconds, mem.mib, float(np.mean(steps)) if steps else None))
        for name, label, _ in configs:
            seconds = float(np.median([r[0] for r in runs[name]]))
            result["eval"].append({
                "config": name, "label": label, "examples": len(ids), "seconds": seconds,
                "examples_per_s": len(ids) / seconds, "round_seconds": [r[0] for r in runs[name]],
                "decode_steps_per_batch": runs[name][0][2], "peak_memory_mib": max(r[1] for r in runs[name]),
                "peak_memory_kind": mem.kind,
                "agreement_with_1": (float(np.mean([p == q for p, q in zip(preds[name], preds["generate_sorted"])]))
                                     if name == "reference_short" else None)})  # same decoding length as (1)
        ref = next(r for r in result["eval"] if r["config"] == "reference")["examples_per_s"]
        for row in result["eval"]:
            if row["config"] != "reference":
                result["speedups"][f"eval {row['config']}"] = row["examples_per_s"] / ref

    result["load_average"]["end"] = os.getloadavg()
    print_tables(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"bench: wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
