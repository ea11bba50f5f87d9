"""What a grid costs: the drivers' --dry-run (every run's status, GPU-hours and pack; the wall time
on the GPUs given), the FLOPs of a training step (the formula's one home: scripts/bench.py imports
it) and the packed GPU-hour model. The measured step times a run's estimate starts from, and the
packing rule, are ept/grid.py's (the plan orders its units longest first by them).
"""
import functools
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages and ept/
import tables  # noqa: E402
from ept import grid, outputs  # noqa: E402
from ept.grid import floor_seconds, size_key  # noqa: E402


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
    shape = tables.SIZES.get(size, tables.SIZES["t5-base"])
    cfg = types.SimpleNamespace(**shape, d_kv=64, vocab_size=32128, is_gated_act=False,
                                num_decoder_layers=shape["num_layers"])
    return train_flops(cfg, *ASSUMED_TOKENS, full) * batch_size


def step_seconds(spec, precision, runs=1, batch_size=16):
    """Modelled seconds of one optimizer step of `runs` packed runs like `spec` (1: a solo run)."""
    flops = step_flops(size_key(spec["model"]), spec["method"] == "ft", batch_size)
    compute = flops / (PEAK_TFLOPS[precision] * 1e12 * ASSUMED_UTILISATION)
    return max(floor_seconds(spec, batch_size), runs * compute)


def pack_hours(plan, pack, hours, data_dir, extra, precision):
    """{run: (unpacked GPU-hours, its share of the pack's GPU-hours = the pack's / R)} at
    `precision`; `hours`: grid.estimate_hours's (its validation part kept, per run)."""
    batch = grid.extra_value(extra, "--batch-size", 16, int)
    unpacked, eval_h, steps = {}, {}, {}
    for name in pack:
        spec = plan[name][0]
        steps[name] = grid.run_steps(spec, data_dir, batch)
        eval_h[name] = hours[name] - steps[name] * floor_seconds(spec, batch) / 3600
        unpacked[name] = steps[name] * step_seconds(spec, precision, 1, batch) / 3600 + eval_h[name]
    pack_step = step_seconds(plan[pack[0]][0], precision, len(pack), batch)
    share = (max(steps.values()) * pack_step / 3600 + sum(eval_h.values())) / len(pack)
    return {name: (unpacked[name], share) for name in pack}


# --- the dry run ---------------------------------------------------------------------------------

def dry_pack_size(args, model):  # --pack-size, else the memory rule for the H200 measured on
    return args.pack_size or grid.memory_pack_size(model, grid.ASSUMED_GPU_GB)


def dry_run(experiment, plan, args, extra):
    """Every run with its status, estimated GPU-hours and the pack it would train in (a row each in
    dry_run.tsv), then the summary lines (wall time; GPU-hours unpacked, packed; fp32, bf16)."""
    batch = grid.extra_value(extra, "--batch-size", 16, int)
    hours = {name: grid.estimate_hours(s, args.data_dir, batch) for name, (s, *_) in plan.items()}
    states = {name: outputs.status(run_dir) for name, (_, _, run_dir) in plan.items()}
    todo = sorted((n for n in plan if states[n] != "done"), key=lambda n: -hours[n])  # as units go
    packs = grid.make_packs(plan, todo, lambda model: dry_pack_size(args, model))
    # {run: {precision: (unpacked GPU-hours, its share of its pack's)}}; a finished run: hours twice
    figures = {name: {p: (hours[name], hours[name]) for p in PEAK_TFLOPS} for name in plan}
    for pack in packs:
        for p in PEAK_TFLOPS:
            for name, pair in pack_hours(plan, pack, hours, args.data_dir, extra, p).items():
                figures[name][p] = pair
    pack_of = {name: i for i, pack in enumerate(packs) for name in pack}
    lines = []
    for name in plan:
        pack = pack_of.get(name)
        where = f"  pack {pack} ({len(packs[pack])} runs)" if pack is not None else ""
        print(f"  {states[name]:<7} {hours[name]:7.2f} GPU-h  {name}{where}")
        f32, b16 = figures[name]["fp32"], figures[name]["bf16"]
        lines.append(f"{experiment}\t{states[name]}\t{hours[name]:.4f}\t{name}\t{f32[0]:.4f}\t"
                     f"{f32[1]:.4f}\t{b16[0]:.4f}\t{b16[1]:.4f}\t{pack_of.get(name, '')}\n")
    outputs.append_lines(Path(args.results_dir) / "dry_run.tsv", lines)  # run_all.sh sums it
    print_dry_summary(experiment, args, extra, hours, todo, packs, figures)
    return [], []


def print_dry_summary(experiment, args, extra, hours, todo, packs, figures):
    """The DRY-RUN and DRY-RUN-PACKS lines run_all.sh parses."""
    sums = {p: [sum(figures[n][p][k] for n in todo) for k in (0, 1)] for p in PEAK_TFLOPS}
    # the headline: the precision this call trains at (train.py's default fp32 unless --dtype bf16),
    # packed as this call packs (GPU-hours of a unit: its runs' shares; a pack of one: a solo run)
    precision = "bf16" if grid.extra_value(extra, "--dtype", "fp32", str) == "bf16" else "fp32"
    packing = "packed" if any(len(p) > 1 for p in packs) else "unpacked"
    units = [sum(figures[n][precision][1] for n in pack) for pack in packs]
    todo_h, longest = sum(units), max(units, default=0.0)
    slots = args.slurm_max_tasks or (args.gpus or args.nproc) // args.nproc
    low, high = wall_hours(todo_h, longest, slots * args.nproc, args.nproc)
    measured = sum(hours[n] for n in todo)
    print(f"DRY-RUN {experiment} runs={len(hours)} to_train={len(todo)} gpu_hours={todo_h:.1f} "
          f"at {precision} ({packing}; measured bf16 unpacked: {measured:.1f}, all runs: "
          f"{sum(hours.values()):.1f}); wall ~{low:.1f}-{high:.1f} h with {slots} unit(s) at once "
          f"x {args.nproc} GPU(s) (--gpus {slots * args.nproc}, or {slots} SLURM array tasks at "
          f"once; longest unit {longest / args.nproc:.1f} h; ideal scaling within a run assumed)")
    sizes = sorted({len(p) for p in packs}, reverse=True)
    size = args.pack_size or f"for a {grid.ASSUMED_GPU_GB} GB GPU"
    print(f"DRY-RUN-PACKS {experiment} to_train={len(todo)} packs={len(packs)} (sizes "
          f"{'/'.join(map(str, sizes)) or '-'}; --pack-size {size}) GPU-hours to go: "
          f"fp32 {sums['fp32'][0]:.1f} unpacked, {sums['fp32'][1]:.1f} packed; "
          f"bf16 {sums['bf16'][0]:.1f} unpacked, {sums['bf16'][1]:.1f} packed "
          f"(packed and fp32 figures: a FLOP model at {ASSUMED_UTILISATION:.0%} of the "
          "H200's peak, not measured)")
