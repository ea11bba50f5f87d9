"""torch.compile over two length buckets on the CPU: the tiny 2 + 2-layer T5, ept, batch 2, inputs of 16 and 32 ids
alternating; eager vs compiled ms per train_step (docs/speed.md, "Packing").  python scripts/compile_buckets.py"""
import argparse
import contextlib
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import model as M
import train
from ept import cli, multirun, pretrained

argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter).parse_args()  # --help, no options
from transformers import T5Config, T5ForConditionalGeneration

torch.set_num_threads(1); torch.manual_seed(0)
cfg = T5Config(vocab_size=32128, dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **pretrained.TINY)
t5 = T5ForConditionalGeneration(cfg).train()
B = 2
datas = [train.TrainData(*multirun._synthetic(B * 50, L, 2, 32128)[:2], 0) for L in (16, 32)]  # two length buckets
run = multirun.make_run(t5, "ept", seed=0, lr=0.3, batch_size=B, max_steps=100000)
net = M.PromptedT5(t5, run.module)
def steps(model, n):
    t0 = time.perf_counter()
    for i in range(n):
        d = datas[i % 2]
        train.train_step(model, net, run.optimizer, run.scheduler, run.next_batch(B * 50), d, amp=contextlib.nullcontext(), device="cpu", micro_batch_size=B)
    return (time.perf_counter() - t0) / n
steps(net, 20); eager = steps(net, 200)
comp = torch.compile(net)
t0 = time.perf_counter(); steps(comp, 4); ctime = time.perf_counter() - t0
c = steps(comp, 200)
eager2 = steps(net, 200)
print(f"batch {B}, 2 length buckets (16/32 ids): eager {eager*1e3:.1f} / {eager2*1e3:.1f} ms/step, compiled {c*1e3:.1f} ms/step, first 4 compiled steps (compile) {ctime:.0f} s")
