"""torch.compile over two length buckets on the CPU: eager vs compiled ms per training step.

The tiny 2 + 2-layer T5, one `ept` run, batch 2, inputs of 16 and 32 ids alternating. The step is
train.py's own (train.train_step), compiled as train.py --compile does (torch.compile around the
forward module, train.wrap). docs/speed.md, "Packing".

    python scripts/compile_buckets.py
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages and ept/
from contextlib import nullcontext  # noqa: E402

import train  # noqa: E402
from bench_pack import random_t5, synthetic  # noqa: E402
from ept import cli, pack, runtime  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
B, N = 2, 50  # batch size; examples per length bucket


def steps(model, run, data, n):
    """Mean seconds per step over n steps, the batch alternating between the two length buckets."""
    t0 = time.perf_counter()
    for i in range(n):
        start = (i % 2) * N + (i // 2 * B) % N  # bucket i % 2, its examples in turn
        train.train_step(model, run, list(range(start, start + B)), data, nullcontext(),
                         runtime.ranks())
    return (time.perf_counter() - t0) / n


def main():
    parser.parse_args()  # --help; no options
    torch.set_num_threads(1)
    t5 = random_t5()
    short, long = synthetic(N, 16, 2, 32128), synthetic(N, 32, 2, 32128)
    data = (short[0] + long[0], short[1] + long[1], 0)  # bucket 0: ids 0..N-1, bucket 1: N..2N-1
    run = pack.make_run(t5, "ept", seed=0, lr=0.3, batch_size=B, max_steps=100000)
    eager, compiled = run.net, torch.compile(run.net)  # the same run, compiled
    steps(eager, run, data, 20)
    eager_s = steps(eager, run, data, 200)
    t0 = time.perf_counter()
    steps(compiled, run, data, 4)
    compile_s = time.perf_counter() - t0
    compiled_s = steps(compiled, run, data, 200)
    eager2 = steps(eager, run, data, 200)
    print(f"batch {B}, 2 length buckets (16/32 ids): eager {eager_s * 1e3:.1f} / {eager2 * 1e3:.1f} "
          f"ms/step, compiled {compiled_s * 1e3:.1f} ms/step, first 4 compiled steps (compile) "
          f"{compile_s:.0f} s")


if __name__ == "__main__":
    main()
