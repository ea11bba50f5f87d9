"""Host overhead of a tiny T5 training step on the CPU: where N steps spend their time.

The step is train.py's own (train.train_step) for one `ept` run, its whole batch in one forward
pass.

    python scripts/profile_step.py 300 16 82   # steps, batch, input length (docs/speed.md)
"""
import argparse
import collections
import contextlib
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the stages and ept/
from bench_pack import random_t5, synthetic  # noqa: E402
import train  # noqa: E402
from ept import cli, pack, runtime  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
parser.add_argument("steps", nargs="?", type=cli.positive_int, default=300, help="timed steps")
parser.add_argument("batch", nargs="?", type=cli.positive_int, default=16, help="examples per step")
parser.add_argument("length", nargs="?", type=cli.positive_int, default=82,
                    help="input ids per example")

GROUPS = (("transformers/models/t5", "HF T5 modeling (Python)"),
          ("torch/nn/modules/module.py", "nn.Module __call__ machinery"),
          ("torch/nn/modules", "torch.nn layers (Python)"),
          ("torch/nn/functional", "torch.nn layers (Python)"),
          ("torch/autograd", "autograd (backward incl. kernels)"),
          ("torch/_tensor", "autograd (backward incl. kernels)"),
          ("torch/optim", "torch.optim (AdamW, schedule)"),
          (str(REPO), "project code (train.py, model.py, ept/: batching)"))


def group_of(file):
    """The share of time `file` counts under (the first GROUPS entry its path contains)."""
    if file == "~":
        return "C builtins / torch ops called from Python"
    return next((g for key, g in GROUPS if key in file),
                "other Python (transformers utils, torch misc)")


def main():
    args = parser.parse_args()
    torch.set_num_threads(1)
    t5 = random_t5()
    B, L, N = args.batch, args.length, args.steps
    run = pack.make_run(t5, "ept", seed=0, lr=0.3, batch_size=B, max_steps=100000)
    data, ranks = (*synthetic(B * 400, L, 2, 32128), 0), runtime.ranks()

    def step():
        batch = train.next_batch(run, len(data[0]))
        train.train_step(run.net, run, batch, data, contextlib.nullcontext(), ranks)
        run.advance(len(batch), len(data[0]))
    for _ in range(20):
        step()
    t0 = time.perf_counter()
    for _ in range(N):
        step()
    plain = (time.perf_counter() - t0) / N
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(N):
        step()
    prof.disable()
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values())  # tottime
    groups = collections.Counter()
    for (file, _, _), (_, _, tottime, _, _) in st.stats.items():
        groups[group_of(file)] += tottime
    print(f"tiny T5 (2+2 layers, d=32), ept, batch {B} x ({L}+2) tokens, CPU 1 thread: "
          f"{plain * 1e3:.1f} ms/step unprofiled, {N} steps")
    for g, t in groups.most_common():
        print(f"  {g:<55} {100 * t / total:5.1f} %  ({1e3 * t / N:.2f} ms/step)")
    st.sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
