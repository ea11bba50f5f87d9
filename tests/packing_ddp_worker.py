"""A pack of 3 runs on a tiny random T5 under torchrun (gloo) or alone; tests/test_packing.py compares the two.

    torchrun --standalone --nproc_per_node=2 tests/packing_ddp_worker.py OUT.pt
    EPT_TEST_DROPOUT=0.1 python tests/packing_ddp_worker.py OUT.pt   # T5's dropout on (stateless)
    python tests/packing_ddp_worker.py OUT.pt          # one process, no DDP

Run "b" is poisoned (a NaN in its prompt) before step 3: it must leave the pack on every rank at once and
the DDP wrapper be rebuilt without it. Rank 0 writes every step record and the final prompts to OUT.pt.
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import model as M  # noqa: E402
from ept import pack as packing  # noqa: E402
from make_tiny import TINY  # noqa: E402

SPECS = [dict(name="a", method="pt", seed=0, lr=0.3, batch_size=5, prompt_length=6),  # 5 over 2 ranks: uneven
         dict(name="b", method="ept", seed=1, lr=0.1, batch_size=4),
         dict(name="c", method="ept_star", seed=2, lr=0.03, batch_size=4, micro_batch_size=1, max_grad_norm=0.05)]
STEPS, POISON_AT = 5, 3


def tiny_t5(dropout=0.0):
    """Dropout > 0: stateless masks (model.stateless_dropout), a function of each example, not of the rank."""
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    config = T5Config(vocab_size=64, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=dropout,
                      **TINY)
    return M.stateless_dropout(T5ForConditionalGeneration(config)).train()


def synthetic(n=9, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    def ids(lo, hi):
        return torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist() + [1]
    return [ids(2, 20) for _ in range(n)], [ids(1, 3) for _ in range(n)]


def main(out):
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world_size > 1:
        dist.init_process_group("gloo")
    t5 = tiny_t5(float(os.environ.get("EPT_TEST_DROPOUT", "0")))
    src, tgt = synthetic()
    runs = [packing.make_run(t5, max_steps=STEPS + 1, **spec) for spec in SPECS]
    wrap = (lambda packed: DDP(packed)) if world_size > 1 else None
    pack = packing.Pack(t5, runs, (src, tgt, 0), rank=rank, world_size=world_size, wrap=wrap)
    records = []
    for step in range(1, STEPS + 1):
        if step == POISON_AT:
            with torch.no_grad():
                runs[1].module.prompt[0, 0] = float("nan")
        records.append(pack.step())
    if rank == 0:
        torch.save({"records": records, "prompts": {r.name: r.net.prompt() for r in runs},
                    "stopped": {r.name: r.stopped for r in runs}}, out)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
