"""Host overhead of a tiny T5 training step on the CPU: where N steps of train.train_step spend their time.

    python scripts/profile_step.py 300 16 82    # steps, batch, input length (docs/speed.md, "Packing")
"""
import argparse
import collections
import cProfile
import pstats
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import model as M
import train
from ept import cli, multirun, pretrained

parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
parser.add_argument("steps", nargs="?", type=cli.positive_int, default=300, help="timed steps")
parser.add_argument("batch", nargs="?", type=cli.positive_int, default=16, help="examples per step")
parser.add_argument("length", nargs="?", type=cli.positive_int, default=82, help="input ids per example")
args = parser.parse_args()
from transformers import T5Config, T5ForConditionalGeneration

torch.set_num_threads(1); torch.manual_seed(0)
cfg = T5Config(vocab_size=32128, dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **pretrained.TINY)
t5 = T5ForConditionalGeneration(cfg).train()
B, L = args.batch, args.length
src, tgt = multirun._synthetic(B * 400, L, 2, 32128)
data = train.TrainData(src, tgt, 0)
run = multirun.make_run(t5, "ept", seed=0, lr=0.3, batch_size=B, max_steps=100000)
net = M.PromptedT5(t5, run.module)
def step():
    train.train_step(net, net, run.optimizer, run.scheduler, run.next_batch(len(src)), data,
                     amp=__import__("contextlib").nullcontext(), device="cpu", micro_batch_size=B)
for _ in range(20): step()
N = args.steps
t0 = time.perf_counter()
for _ in range(N): step()
plain = (time.perf_counter() - t0) / N
prof = cProfile.Profile(); prof.enable()
for _ in range(N): step()
prof.disable()
st = pstats.Stats(prof)
total = sum(v[2] for v in st.stats.values())  # tottime
groups = collections.Counter()
for (file, line, fn), (cc, nc, tt, ct, callers) in st.stats.items():
    if "transformers/models/t5" in file: g = "HF T5 modeling (Python)"
    elif "torch/nn/modules/module.py" in file: g = "nn.Module __call__ machinery"
    elif "torch/nn/modules" in file or "torch/nn/functional" in file: g = "torch.nn layers (Python)"
    elif "torch/autograd" in file or "torch/_tensor" in file: g = "autograd (backward incl. kernels)"
    elif "torch/optim" in file: g = "torch.optim (AdamW, schedule)"
    elif str(__import__("pathlib").Path(__file__).resolve().parents[1]) in file: g = "project code (train/model/batching/prompt modules)"
    elif file == "~": g = "C builtins / torch ops called from Python"
    else: g = "other Python (transformers utils, torch misc)"
    groups[g] += tt
print(f"tiny T5 (2+2 layers, d=32), ept, batch {B} x ({L}+2) tokens, CPU 1 thread: {plain*1e3:.1f} ms/step unprofiled, {N} steps")
for g, t in groups.most_common():
    print(f"  {g:<55} {100*t/total:5.1f} %  ({1e3*t/N:.2f} ms/step)")
st.sort_stats("tottime").print_stats(12)
