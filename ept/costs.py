"""What a grid costs and how its runs are packed: the GPU-hour estimate of a run from measured step
times, the FLOPs of a training step (the formula's one home: scripts/bench.py imports it), and the
grouping of prompt runs into packs (several runs on one frozen T5: docs/packing.md).
"""
import functools
import math
import types
from pathlib import Path

import model as M
from ept import files, options, runs, tasks as registry  # eval's rename

# --- the GPU-hour estimate: measured step times --------------------------------------------------
# Seconds per optimizer step at batch 16, measured by bench.py on one NVIDIA H200
# (docs/gpu/run2_*.json: random-weight t5-base, bf16 autocast, after an untimed pass over the same
# shapes). The GPU waits on the host at this batch size, so a step costs about the same at any
# input length (RTE 0.0746 s, SST-2 0.0687 s). t5-small and t5-large were not measured: host-bound
# time follows the number of layers (6, 12, 24 per stack), so they are t5-base's scaled by 0.5, 2.
# tests/test_experiments.py checks these numbers against the JSON files.
MEASURED_STEP_S = {"prompt": 16 / 214.49, "ft": 16 / 132.27}  # t5-base, H200: run2_rte_{ept,ft}
LAYER_SCALE = {"t5-small": 0.5, "t5-base": 1.0, "t5-large": 2.0, "other": 1.0}
MEASURED_EVAL_S = 1 / 733.1  # greedy decoding, batch 64, t5-base RTE, per example (run2_rte_ept)
QA_DECODE_FACTOR = 5  # assumed: MRQA answers are many tokens long, classification targets 1 or 2
DEFAULT_SPLITS = (10000, 1000, 1000)  # a task neither prepared nor the paper's: a guess


def size_key(model_name):
    """t5-small / t5-base / t5-large when the model's name says so, else "other"."""
    tag = runs.model_tag(model_name)
    return next((size for size in M.SIZES if size in tag), "other")


def split_sizes(task, data_dir):
    """(train, validation, test) examples: the prepared meta.json, else the paper's Table 5."""
    meta = Path(data_dir or "data") / task / "meta.json"
    if meta.exists():
        splits = files.read_json(meta, "task description").get("splits", {})
        return splits.get("train", 0), splits.get("validation", 0), splits.get("test", 0)
    return registry.PAPER_SPLITS.get(task, DEFAULT_SPLITS)


def run_steps(spec, data_dir, batch_size=16):
    """Optimizer steps of one run: its epochs over the training split, else its --max-steps."""
    if spec.get("epochs"):
        return spec["epochs"] * math.ceil(split_sizes(spec["task"], data_dir)[0] / batch_size)
    return spec.get("max_steps") or options.defaults(spec["method"])["max_steps"]


def estimate_hours(spec, data_dir=None, batch_size=16):
    """GPU-hours of one run from the measured step times above (ideal scaling: the same on 1 or N
    GPUs), validating every spec["eval_every"] steps (else the method's default)."""
    eval_every = spec.get("eval_every") or options.defaults(spec["method"])["eval_every"]
    scale = LAYER_SCALE[size_key(spec["model"])]
    _, val, test = split_sizes(spec["task"], data_dir)
    steps = run_steps(spec, data_dir, batch_size)
    decode = QA_DECODE_FACTOR if spec["task"] in registry.GROUPS["mrqa"] else 1
    eval_s = (math.ceil(steps / eval_every) * val + test) * MEASURED_EVAL_S * scale * decode
    return (steps * floor_seconds(spec, batch_size) + eval_s) / 3600


def plan_hours(plan, data_dir, extra):
    """{run: estimated GPU-hours} of a plan ({name: (spec, ...)}) at the pass-through --batch-size
    (the pass-through --max-steps and --eval-every are in the specs: plans.plan_runs)."""
    batch = extra_value(extra, "--batch-size", 16, int)
    return {name: estimate_hours(spec, data_dir, batch) for name, (spec, *_) in plan.items()}


def extra_value(extra, flag, default, cast):
    """The last value of `flag` among the pass-through flags (`--flag VALUE`), or default."""
    extra = list(extra)
    values = [extra[i + 1] for i, a in enumerate(extra[:-1]) if a == flag]
    return cast(values[-1]) if values else default


def wall_hours(gpu_hours, longest, gpus, nproc):
    """(low, high) wall time of units of `gpu_hours` on `gpus` GPUs, `nproc` per unit: at least
    max(gpu_hours / gpus, the longest), at most that + the longest (a free slot takes the next)."""
    return max(gpu_hours / gpus, longest / nproc), gpu_hours / gpus + longest / nproc


# --- FLOPs of a T5 step (bench.py's MFU and the packed model below) ------------------------------

def forward_flops(cfg, S, T):
    """(linear, attention) forward FLOPs of one example with S encoder and T decoder tokens."""
    d, i, V = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.vocab_size
    F = (3 if cfg.is_gated_act else 2) * d * cfg.d_ff
    L_enc, L_dec = cfg.num_layers, cfg.num_decoder_layers
    linear = 2 * (S * L_enc * (4 * d * i + F) + T * L_dec * (6 * d * i + F) + S * L_dec * 2 * d * i
                  + T * d * V)
    attention = 4 * i * (L_enc * S * S + L_dec * (T * T + T * S))
    return linear, attention


def train_flops(cfg, S, T, full):
    """Forward + backward FLOPs of one example; `full`: the weights' gradients too (ft)."""
    linear, attention = forward_flops(cfg, S, T)
    return (3 if full else 2) * linear + 3 * attention


# --- the packed GPU-hour model -------------------------------------------------------------------
# Not measured yet. A GPU step of a pack of R runs costs max(host floor, R x compute per run): the
# floor is the measured solo step (MEASURED_STEP_S: bf16, where the H200 waits on the host),
# compute is the step's FLOPs (train_flops: RTE-like inputs, 1.4 TFLOP per t5-base step of 16) over
# the card's dense peak x an assumed utilisation. Solo runs cost max(floor, compute) the same way,
# which at bf16 is the measured step. Validation is per run, unpacked.
PEAK_TFLOPS = {"bf16": 989.0, "fp32": 67.0}  # H200 dense: bf16 tensor cores; fp32 without TF32
ASSUMED_UTILISATION = 0.4
ASSUMED_TOKENS = (200, 3)  # per example: source (RTE padded to the batch's longest), target


@functools.cache
def step_flops(size, full, batch_size=16):
    """FLOPs of one training step of `batch_size` examples (`full`: ft's weight gradients)."""
    shape = M.SIZES.get(size, M.SIZES["t5-base"])
    cfg = types.SimpleNamespace(**shape, d_kv=64, vocab_size=32128, is_gated_act=False,
                                num_decoder_layers=shape["num_layers"])
    return train_flops(cfg, *ASSUMED_TOKENS, full) * batch_size


def floor_seconds(spec, batch_size=16):
    """The measured (host-bound, bf16) seconds of one solo step: estimate_hours' step time."""
    measured = MEASURED_STEP_S["ft" if spec["method"] == "ft" else "prompt"]
    return measured * LAYER_SCALE[size_key(spec["model"])] * batch_size / 16


def step_seconds(spec, precision, runs=1, batch_size=16):
    """Modelled seconds of one optimizer step of `runs` packed runs like `spec` (1: a solo run)."""
    flops = step_flops(size_key(spec["model"]), spec["method"] == "ft", batch_size)
    compute = flops / (PEAK_TFLOPS[precision] * 1e12 * ASSUMED_UTILISATION)
    return max(floor_seconds(spec, batch_size), runs * compute)


def pack_hours(plan, pack, hours, data_dir, extra, precision):
    """{run: (unpacked GPU-hours, its share of the pack's GPU-hours = the pack's / R)} at
    `precision`; `hours`: plan_hours (the measured estimate; its validation part kept, per run)."""
    batch = extra_value(extra, "--batch-size", 16, int)
    unpacked, eval_h, steps = {}, {}, {}
    for name in pack:
        spec = plan[name][0]
        steps[name] = run_steps(spec, data_dir, batch)
        eval_h[name] = hours[name] - steps[name] * floor_seconds(spec, batch) / 3600
        unpacked[name] = steps[name] * step_seconds(spec, precision, 1, batch) / 3600 + eval_h[name]
    pack_step = step_seconds(plan[pack[0]][0], precision, len(pack), batch)
    share = (max(steps.values()) * pack_step / 3600 + sum(eval_h.values())) / len(pack)
    return {name: (unpacked[name], share) for name in pack}


# --- packs: several prompt runs in one train.py call ---------------------------------------------
# A pack is runs that may share one T5 forward: same task, same T5, same data (the few-shot sample)
# and the same schedule; every other option (method, seed, lr, prompt length, hidden size, ...) is
# per run. The driver's data dir, max length and pass-through train.py flags are the same for every
# run of one call, so they are shared by construction. `ft` trains T5 itself and is never packed.
PACK_KEYS = ("task", "model", "fewshot_k", "fewshot_seed", "epochs", "max_steps", "eval_every",
             "batch_size")
MAX_PACK = 16  # a pack's step is R x 16 examples: past 16 runs a GPU is compute-bound (see above)
# The --pack-size rule on CUDA: runs that fit in 80 % of the card's memory after T5's weights, at
# the memory of one prompt run of batch 16 (activations for the backward, fp32; docs/speed.md
# measured ept on t5-base RTE at 3.0 GB peak on an H200 with the weights), capped at MAX_PACK. 80
# GB: 16 for t5-small/base, 8 for t5-large.
RUN_GB = {"t5-small": 1.5, "t5-base": 3.0, "t5-large": 7.0, "other": 3.0}
WEIGHTS_GB = {"t5-small": 0.25, "t5-base": 0.9, "t5-large": 3.0, "other": 1.0}
ASSUMED_GPU_GB = 141  # the H200 the step times were measured on: what a dry run sizes packs for


def pack_key(spec):
    """What runs of one pack must share (None: `ft`, never packed)."""
    if spec["method"] == "ft":
        return None
    return tuple((k, spec.get(k)) for k in PACK_KEYS)


def memory_pack_size(model, gpu_gb):
    """Runs per pack that fit a GPU of `gpu_gb` GB (the rule above); at least 1."""
    size = size_key(model)
    return max(1, min(MAX_PACK, int(0.8 * (gpu_gb - WEIGHTS_GB[size]) / RUN_GB[size])))


def pack_size(args, model, device=None):
    """--pack-size, else: on CUDA the memory rule for this machine's GPU 0; on a CPU 1 (no packing:
    a CPU is FLOP-bound, a pack of R costs R solo steps; docs/packing.md); "dry": the H200."""
    if getattr(args, "pack_size", None):
        return args.pack_size
    if device == "dry":
        return memory_pack_size(model, ASSUMED_GPU_GB)
    import torch
    if torch.cuda.is_available():
        return memory_pack_size(model, torch.cuda.get_device_properties(0).total_memory / 1e9)
    return 1


def make_packs(plan, names, size_of):
    """The runs `names` (in that order) grouped into packs: runs of one pack_key, at most
    size_of(model) per pack, in the order of their first runs; `ft` and size 1: packs of one."""
    packs, open_packs = [], {}
    for name in names:
        spec = plan[name][0]
        key, limit = pack_key(spec), size_of(spec["model"])
        if key is None or limit <= 1:
            packs.append([name])
            continue
        if key not in open_packs:
            packs.append(open_packs.setdefault(key, []))
        open_packs[key].append(name)
        if len(open_packs[key]) >= limit:
            del open_packs[key]
    return packs
