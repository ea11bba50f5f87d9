"""The packing benchmark: packed steps of R prompt runs on one frozen T5 against R solo train.py steps.

    python bench_pack.py            # CPU: one packed step for R = 1, 4, 16, 32 (t5-small, random)
    python bench_pack.py --runs 1 8 --batch-size 16 --length 128 --threads 2
    python bench_pack.py --device cuda --dtype bf16 --max-rows 0 --config ../shared/data/t5/t5-base   # a GPU

docs/packing.md and docs/speed.md have the measured figures and the machine each came from.
"""
import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import cli
import model as M
import train
from packing import Pack, clip_runs, make_run, step_runs

# --- the benchmark --------------------------------------------------------------------------------

def _synthetic(n, length, target_length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = [torch.randint(3, vocab, (length - 1,), generator=g).tolist() + [1] for _ in range(n)]
    tgt = [torch.randint(3, vocab, (target_length - 1,), generator=g).tolist() + [1] for _ in range(n)]
    return src, tgt


def _load():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def bench(config, runs=(1, 4, 16, 32), batch_size=16, length=82, target_length=2, methods=("ept",), steps=1,
          warmup=0, threads=1, max_rows=None, lr=0.3, device="cpu", dtype="fp32"):
    """Time packed steps for each R in `runs`: a random-weight T5 built from `config` (training mode, its
    dropout on), synthetic inputs of `length` ids and targets of `target_length` ids (</s> included; no
    padding), `batch_size` examples per run, the runs cycling through `methods` with seeds 0..R-1. One
    untimed step of a 1-run pack first (first-use costs), then per R `warmup` untimed and `steps` timed steps.
    `max_rows`: examples per forward pass (None: every run's batch in one pass). `device`/`dtype` (fp32 or
    bf16 autocast) for a GPU; the step ends with a host sync, so wall times are complete. One dict per R."""
    from transformers import T5Config, T5ForConditionalGeneration
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config.from_pretrained(config)).to(device).train()
    amp = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    src, tgt = _synthetic(max(runs) * batch_size * (steps + warmup + 1), length, target_length, t5.config.vocab_size)

    def pack_of(r):
        return Pack(t5, [make_run(t5, methods[i % len(methods)], seed=i, lr=lr, batch_size=batch_size, max_steps=1000)
                         for i in range(r)], (src, tgt, 0), max_rows=max_rows, amp=amp)
    pack_of(1).step()
    # the baseline: one solo run's step, as train.py takes it (PromptedT5 + train.train_step)
    solo = make_run(t5, methods[0], seed=0, lr=lr, batch_size=batch_size, max_steps=1000)
    net = M.PromptedT5(t5, solo.module)
    t0, c0 = time.perf_counter(), time.process_time()
    train.train_step(net, net, solo.optimizer, solo.scheduler, solo.next_batch(len(src)), train.TrainData(src, tgt, 0),
                     amp=amp, device=device, micro_batch_size=batch_size)
    solo_s, solo_cpu = time.perf_counter() - t0, time.process_time() - c0
    import bench as BENCH
    prompt_rows = max(x.prompt().shape[0] for x in pack_of(1).runs)
    flops_per_example = BENCH.train_flops(t5.config, length + prompt_rows, target_length, False)
    cuda = torch.device(device).type == "cuda"
    rows = []
    for r in runs:
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            pack = pack_of(r)
            for _ in range(warmup):
                pack.step()
            load = _load()
            seconds, cpu, update = 0.0, 0.0, 0.0
            for _ in range(steps):
                t0, c0 = time.perf_counter(), time.process_time()
                pack.step()
                seconds += time.perf_counter() - t0
                cpu += time.process_time() - c0
                update += pack.timings["update_s"]
            passes = pack.timings["forward_passes"]
        except torch.OutOfMemoryError:  # R until memory: the first R that does not fit ends the sweep
            rows.append({"runs": r, "oom": True})
            break
        finally:
            pack = None  # its runs' optimizer state and activations go before the next R
        rows.append({"runs": r, "examples_per_step": r * batch_size, "step_s": seconds / steps, "cpu_s": cpu / steps,
                     "examples_per_s": r * batch_size * steps / seconds, "update_ms": 1e3 * update / steps,
                     "tflops": r * batch_size * flops_per_example / (seconds / steps) / 1e12,
                     "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
                     "forward_passes": passes, "load_before": load,
                     "load_after": _load()})
    for row in rows:  # against train.train_step's solo step; process CPU time is less sensitive to other jobs
        if row.get("oom"):
            continue
        row.update(solo_step_s=solo_s, solo_cpu_s=solo_cpu, step_vs_solo=row["step_s"] / solo_s,
                   cpu_vs_solo=row["cpu_s"] / solo_cpu, speedup_vs_solo=row["runs"] * solo_s / row["step_s"],
                   cpu_speedup_vs_solo=row["runs"] * solo_cpu / row["cpu_s"])
    return rows


def bench_update(t5, r=32, methods=("pt", "ept", "ept_star", "ptuning", "resprompt"), repeats=20,
                 fused=None):
    """What the per-run update costs for `r` runs, without any forward: the pack's own clipping,
    AdamW, schedule, zeroing and mu_t (Pack.step's update) on random gradients; the median of
    `repeats`, in ms."""
    runs = [make_run(t5, methods[i % len(methods)], seed=i, max_steps=1000, fused=fused)
            for i in range(r)]
    times = []
    for k in range(repeats + 1):  # the first: the optimizers' lazy state
        for x in runs:
            for p in x.params:
                p.grad = torch.randn_like(p) * 1e-2
        t0 = time.perf_counter()
        clip_runs(runs).tolist()  # the host sync Pack.step makes
        step_runs(runs, runs)
        if k:
            times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


PEAK_TFLOPS = {("cuda", "bf16"): 989.0, ("cuda", "fp32"): 67.0}  # H200 dense (fp32: no tensor cores, no TF32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "shared/data/t5/t5-small"),
                        help="T5 config folder (random weights are built from it; default ../shared/data/t5/t5-small)")
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 4, 16, 32], help="pack sizes R to time")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per run per step")
    parser.add_argument("--length", type=int, default=82,
                        help="input ids per example, </s> included (82 + 2 target ids = RTE's mean of 84 real tokens)")
    parser.add_argument("--target-length", type=int, default=2, help="target ids per example (</s> included)")
    parser.add_argument("--methods", nargs="+", default=["ept"], help="the runs cycle through these methods")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per R")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps per R (a 1-run step always comes first)")
    parser.add_argument("--max-rows", type=int, default=16,
                        help="examples per forward pass (default 16, one solo batch; 0: every run's batch in one pass)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (a GPU session)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                        help="fp32: train.py's default and the paper's; bf16: autocast, as train.py --dtype bf16")
    parser.add_argument("--update-runs", type=int, default=32, help="R for the update-overhead measurement (0: skip)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak for the MFU column (default: an H200's, on cuda: 989 bf16, 67 fp32)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    t_start = time.time()
    rows = bench(args.config, args.runs, args.batch_size, args.length, args.target_length, tuple(args.methods),
                 args.steps, args.warmup, args.threads, args.max_rows or None, device=args.device, dtype=args.dtype)
    print(f"packed step, random-weight {Path(args.config).name}, {args.device} {args.dtype}, {args.threads} thread(s), "
          f"{args.batch_size} examples "
          f"per run, {args.length} input + {args.target_length} target ids, methods {' '.join(args.methods)}, "
          f"{args.max_rows or 'all'} rows per forward pass, {args.steps} timed step(s) per R")
    print(f"one solo step (train.train_step): {rows[0]['solo_step_s']:.2f} s wall, {rows[0]['solo_cpu_s']:.2f} s CPU")
    print(f"{'R':>4} {'examples':>9} {'passes':>7} {'step s':>8} {'ex/s':>7} {'step/solo':>10} {'R solo/pack':>12} "
          f"{'CPU s':>7} {'CPU/solo':>9} {'R solo/pack CPU':>16} {'update ms':>10} {'load':>11} {'TFLOP/s':>7} {'MFU':>6} "
          f"{'peak MiB':>8}")
    peak = args.peak_tflops or PEAK_TFLOPS.get((args.device.split(":")[0], args.dtype))
    for row in rows:
        if row.get("oom"):
            print(f"{row['runs']:>4}  out of memory")
            continue
        row["mfu"] = row["tflops"] / peak if peak else None
        print(f"{row['runs']:>4} {row['examples_per_step']:>9} {row['forward_passes']:>7} {row['step_s']:>8.2f} "
              f"{row['examples_per_s']:>7.2f} {row['step_vs_solo']:>10.2f} {row['speedup_vs_solo']:>11.2f}x "
              f"{row['cpu_s']:>7.2f} {row['cpu_vs_solo']:>9.2f} {row['cpu_speedup_vs_solo']:>15.2f}x "
              f"{row['update_ms']:>10.2f} {row['load_before']!s:>5}/{row['load_after']!s:<5} "
              f"{row['tflops']:>7.2f} {'-' if row['mfu'] is None else format(row['mfu'], '.1%'):>6} "
              f"{'-' if row['peak_mib'] is None else format(row['peak_mib'], '.0f'):>8}")
    result = {"steps": rows, "args": vars(args), "torch": torch.__version__}
    if args.update_runs:
        from transformers import T5Config, T5ForConditionalGeneration
        t5 = T5ForConditionalGeneration(T5Config.from_pretrained(args.config)).to(args.device)
        for label, methods in (("mixed", ("pt", "ept", "ept_star", "ptuning", "resprompt")), ("small", ("pt", "ept"))):
            update = bench_update(t5, args.update_runs, methods)
            result[f"update_ms_{label}"] = update
            print(f"update of {args.update_runs} runs ({'/'.join(methods)} cycled: clip + AdamW + "
                  f"schedule + zero + mu_t, no forward): {update:.2f} ms")
    result["total_s"] = time.time() - t_start
    print(f"total {result['total_s']:.0f} s; 1-minute load average now {_load()}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
