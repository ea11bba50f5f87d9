"""The packing benchmark: packed steps of R prompt runs on one frozen T5 against R solo steps.

The solo step is the step train.py takes for one run: a pack.Pack of that one run (train.train_step's arithmetic), its whole
batch in one forward pass (train.py without --pack-max-rows). "R solo / pack" = R x that step's
time / the packed step's time: above 1, a pack of R trains faster than R lone runs.

    python scripts/bench_pack.py     # CPU: one packed step for R = 1, 4, 16, 32 (t5-small, random)
    python scripts/bench_pack.py --runs 1 8 --batch-size 16 --length 128 --threads 2
    python scripts/bench_pack.py --device cuda --dtype bf16 --max-rows 0 \\
        --config ../shared/data/t5/t5-base   # a GPU

docs/packing.md and docs/speed.md have the measured figures and the machine each came from.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages and ept/
import costs  # noqa: E402  (scripts/costs.py)
from ept import cli, runtime  # noqa: E402
from make_tiny import TINY  # noqa: E402
from ept.pack import Pack, make_run  # noqa: E402
from train import update  # noqa: E402

METHOD_MIXES = (("mixed", ("pt", "ept", "ept_star", "ptuning", "resprompt")),
                ("small", ("pt", "ept")))

parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
parser.add_argument("--config",
                    default=str(Path(__file__).resolve().parents[2] / "shared/data/t5/t5-small"),
                    help="T5 config folder (random weights are built from it; default "
                         "../shared/data/t5/t5-small)")
parser.add_argument("--runs", type=int, nargs="+", default=[1, 4, 16, 32],
                    help="pack sizes R to time")
parser.add_argument("--batch-size", type=int, default=16, help="examples per run per step")
parser.add_argument("--length", type=int, default=82, help="input ids per example, </s> included "
                    "(82 + 2 target ids = RTE's mean of 84 real tokens)")
parser.add_argument("--target-length", type=int, default=2,
                    help="target ids per example (</s> included)")
parser.add_argument("--methods", nargs="+", default=["ept"],
                    help="the runs cycle through these methods")
parser.add_argument("--steps", type=int, default=1, help="timed steps per R")
parser.add_argument("--warmup", type=int, default=0,
                    help="untimed steps per R (a 1-run step always comes first)")
parser.add_argument("--max-rows", type=int, default=16, help="examples per forward pass (default "
                    "16, one solo batch; 0: every run's batch in one pass)")
parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
parser.add_argument("--device", default="cpu", help="cpu or cuda (a GPU session)")
parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="fp32: train.py's "
                    "default and the paper's; bf16: autocast, as train.py --dtype bf16")
parser.add_argument("--update-runs", type=int, default=32,
                    help="R for the update-overhead measurement (0: skip)")
parser.add_argument("--peak-tflops", type=float, help="the device's peak for the MFU column "
                    "(default: an H200's, on cuda: 989 bf16, 67 fp32)")
parser.add_argument("--json", help="also write the figures here")


def synthetic(n, length, target_length, vocab, seed=0):
    """n random examples: `length` input and `target_length` target ids, each ending in </s> (1)."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(3, vocab, (k - 1,), generator=g).tolist() + [1] for _ in range(n)]
            for k in (length, target_length)]


def random_t5(config=None):
    """A T5 with random weights (seed 0) in training mode, its dropout on as in train.py: built from
    the config folder `config` (runtime.load_t5), or (None) make_tiny.TINY's shape with T5's
    vocabulary."""
    if config:
        return runtime.load_t5(config, random_init=True).train()
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=32128, dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1, **TINY)).train()


def _load():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def bench(config, runs=(1, 4, 16, 32), batch_size=16, length=82, target_length=2, methods=("ept",),
          steps=1, warmup=0, threads=1, max_rows=None, lr=0.3, device="cpu", dtype="fp32"):
    """Time packed steps for each R in `runs`: a random-weight T5 built from `config`, synthetic
    inputs of `length` ids and targets of `target_length` ids (</s> included; no padding),
    `batch_size` examples per run, the runs cycling through `methods` with seeds 0..R-1. One untimed
    step of a 1-run pack first (first-use costs), then one timed solo step, then per R `warmup`
    untimed and `steps` timed steps. `max_rows`: examples per forward pass (None: every run's batch
    in one pass). `device`/`dtype` (fp32 or bf16 autocast) for a GPU; the step ends with a host
    sync, so wall times are complete. One dict per R, each against the solo step."""
    torch.set_num_threads(threads)
    t5 = random_t5(config).to(device)
    amp = runtime.autocast(device, dtype)
    src, tgt = synthetic(max(runs) * batch_size * (steps + warmup + 1), length, target_length,
                         t5.config.vocab_size)

    def pack_of(r, max_rows=max_rows):
        runs = [make_run(t5, methods[i % len(methods)], seed=i, lr=lr, batch_size=batch_size,
                         max_steps=1000) for i in range(r)]
        return Pack(t5, runs, (src, tgt, 0), max_rows=max_rows, amp=amp)
    pack_of(1).step()
    solo_pack = pack_of(1, max_rows=None)  # train.py's lone run: its batch in one pass
    solo = timed_steps(solo_pack, 1)
    prompt_rows = solo_pack.runs[0].net.prompt().shape[0]
    flops_per_example = costs.train_flops(t5.config, length + prompt_rows, target_length, False)
    rows = []
    for r in runs:
        row = bench_size(pack_of, r, steps, warmup, device)
        rows.append(row)
        if row.get("oom"):  # R until memory: the first R that does not fit ends the sweep
            break
        examples = r * batch_size
        row.update(tflops=examples * flops_per_example / row["step_s"] / 1e12,
                   examples_per_step=examples, examples_per_s=examples / row["step_s"],
                   solo_step_s=solo[0], solo_cpu_s=solo[1], step_vs_solo=row["step_s"] / solo[0],
                   cpu_vs_solo=row["cpu_s"] / solo[1], speedup_vs_solo=r * solo[0] / row["step_s"],
                   cpu_speedup_vs_solo=r * solo[1] / row["cpu_s"])  # CPU: less hit by other jobs
    return rows


def timed_steps(pack, steps):
    """(wall s, process CPU s, update s) per step, the mean of `steps` steps of `pack`."""
    seconds = cpu = update = 0.0
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        pack.step()
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        update += pack.timings["update_s"]
    return seconds / steps, cpu / steps, update / steps


def bench_size(pack_of, r, steps, warmup, device):
    """One R: a fresh pack of R runs, `warmup` untimed then `steps` timed steps; {"runs": R,
    "oom": True} when it does not fit in the GPU's memory."""
    cuda = torch.device(device).type == "cuda"
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        pack = pack_of(r)
        for _ in range(warmup):
            pack.step()
        load = _load()
        step_s, cpu_s, update_s = timed_steps(pack, steps)
        passes = pack.timings["forward_passes"]
    except torch.OutOfMemoryError:
        return {"runs": r, "oom": True}
    finally:
        pack = None  # its runs' optimizer state and activations go before the next R
    return {"runs": r, "step_s": step_s, "cpu_s": cpu_s, "update_ms": 1e3 * update_s,
            "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
            "forward_passes": passes, "load_before": load, "load_after": _load()}


def bench_update(t5, r=32, methods=("pt", "ept", "ept_star", "ptuning", "resprompt"), repeats=20):
    """What the per-run update costs for `r` runs, without any forward: the pack's own clipping,
    AdamW, schedule, zeroing and mu_t (train.update) on random gradients; the median of
    `repeats`, in ms."""
    runs = [make_run(t5, methods[i % len(methods)], seed=i, max_steps=1000) for i in range(r)]
    times = []
    for k in range(repeats + 1):  # the first: the optimizers' lazy state
        for p in (p for x in runs for p in x.params):
            p.grad = torch.randn_like(p) * 1e-2
        t0 = time.perf_counter()
        update(runs, torch.zeros(len(runs)))  # clip, the host sync, AdamW, schedule, mu_t
        if k:
            times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def print_rows(args, rows):
    """The table: one line per R, against the solo step; adds each row's "mfu"."""
    print(f"packed step, random-weight {Path(args.config).name}, {args.device} {args.dtype}, "
          f"{args.threads} thread(s), {args.batch_size} examples per run, {args.length} input + "
          f"{args.target_length} target ids, methods {' '.join(args.methods)}, "
          f"{args.max_rows or 'all'} rows per forward pass, {args.steps} timed step(s) per R")
    print(f"one solo step (train.py's step of a lone run, a pack of one): "
          f"{rows[0]['solo_step_s']:.2f} s wall, {rows[0]['solo_cpu_s']:.2f} s CPU")
    print(f"{'R':>4} {'examples':>9} {'passes':>7} {'step s':>8} {'ex/s':>7} {'step/solo':>10} "
          f"{'R solo/pack':>12} {'CPU s':>7} {'CPU/solo':>9} {'R solo/pack CPU':>16} "
          f"{'update ms':>10} {'load':>11} {'TFLOP/s':>7} {'MFU':>6} {'peak MiB':>8}")
    cuda_peak = costs.PEAK_TFLOPS[args.dtype] if args.device.startswith("cuda") else None
    peak = args.peak_tflops or cuda_peak  # costs.PEAK_TFLOPS: an H200's dense peaks
    for row in rows:
        if row.get("oom"):
            print(f"{row['runs']:>4}  out of memory")
            continue
        row["mfu"] = row["tflops"] / peak if peak else None
        mfu = "-" if row["mfu"] is None else format(row["mfu"], ".1%")
        peak_mib = "-" if row["peak_mib"] is None else format(row["peak_mib"], ".0f")
        print(f"{row['runs']:>4} {row['examples_per_step']:>9} {row['forward_passes']:>7} "
              f"{row['step_s']:>8.2f} {row['examples_per_s']:>7.2f} {row['step_vs_solo']:>10.2f} "
              f"{row['speedup_vs_solo']:>11.2f}x {row['cpu_s']:>7.2f} {row['cpu_vs_solo']:>9.2f} "
              f"{row['cpu_speedup_vs_solo']:>15.2f}x {row['update_ms']:>10.2f} "
              f"{row['load_before']!s:>5}/{row['load_after']!s:<5} {row['tflops']:>7.2f} {mfu:>6} "
              f"{peak_mib:>8}")


@cli.script
def main(argv=None):
    args = parser.parse_args(argv)
    t_start = time.time()
    rows = bench(args.config, args.runs, args.batch_size, args.length, args.target_length,
                 tuple(args.methods), args.steps, args.warmup, args.threads, args.max_rows or None,
                 device=args.device, dtype=args.dtype)
    print_rows(args, rows)
    result = {"steps": rows, "args": vars(args), "torch": torch.__version__}
    if args.update_runs:
        t5 = random_t5(args.config).to(args.device)
        for label, methods in METHOD_MIXES:
            update = result[f"update_ms_{label}"] = bench_update(t5, args.update_runs, methods)
            print(f"update of {args.update_runs} runs ({'/'.join(methods)} cycled: clip + AdamW + "
                  f"schedule + zero + mu_t, no forward): {update:.2f} ms")
    result["total_s"] = time.time() - t_start
    print(f"total {result['total_s']:.0f} s; 1-minute load average now {_load()}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
