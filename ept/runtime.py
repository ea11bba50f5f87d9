"""Where and how the model runs: the device, the ranks of a torchrun group, and the precision.

Precision (one name everywhere: --dtype, config.json "dtype"):
    fp32  the paper's setting (the HF Trainer's: fp32, TF32 off as PyTorch leaves it); default
    tf32  fp32 weights and activations, matmuls on TF32 tensor cores (CUDA; on a CPU it is fp32)
    bf16  bf16 autocast around the forward passes, trainable parameters and loss in fp32 (CUDA; T5
          overflows in fp16). A speed option, not the paper's setting.
"""
import functools
import os
import random
import resource
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from ept import errors

DTYPES = ("fp32", "tf32", "bf16")


def ranks():
    """This process's place under torchrun (the group joined; safe to call again): rank, local_rank,
    world_size, device, master, and first(check, everyone=False): master_first on these ranks."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return SimpleNamespace(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                           master=rank == 0,
                           first=functools.partial(master_first, rank=rank, world_size=world_size))


class PeerStopped(errors.Failure):
    """Rank 0 stopped the run and printed why; this rank exits 1 without repeating the sentence."""


def master_first(fn, rank, world_size, everyone=False):
    """fn() on rank 0, then on the other ranks (everyone) or its result sent to them. Rank 0 tells
    the others whether it got through: a failing check prints its one sentence from rank 0, and
    every other rank exits 1 quietly (PeerStopped) instead of waiting on a collective rank 0 never
    joins (gloo's "Connection closed by peer" tracebacks)."""
    if world_size == 1:
        return fn()
    if rank != 0:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        failed, result = box[0]
        if failed:  # under torchrun rank 0 exits first: its summary names rank 0's sentence
            time.sleep(2 if os.environ.get("TORCHELASTIC_ERROR_FILE") else 0)
            raise PeerStopped()
        return fn() if everyone else result
    failed, result = True, None
    try:
        result, failed = fn(), False
        return result
    finally:  # a failure on rank 0 (its sentence, or a bug's traceback) still answers the others
        dist.broadcast_object_list([(failed, None if everyone or failed else result)], src=0)


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_precision(dtype, device):
    """Apply `dtype` to the process (TF32 switches); returns the forwards' autocast context."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
        torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    return autocast(device, dtype)


def autocast(device, dtype):
    """bf16 autocast when asked, else nothing (fp32 / tf32)."""
    if dtype == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


# --- the process's random state: saved in checkpoints, restored on resume -------------------------

def rng_state():
    """Every RNG as tensors and plain values (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class Throughput:
    """Examples and tokens per second over the steady-state steps (after the first `warm`)."""

    def __init__(self, warm):
        self.warm, self.steps, self.examples, self.tokens, self.seconds = warm, 0, 0, 0, 0.0

    def add(self, examples, tokens, seconds):
        self.steps += 1
        if self.steps > self.warm:
            self.examples, self.tokens, self.seconds = (
                self.examples + examples, self.tokens + tokens, self.seconds + seconds)

    def summary(self, device):
        if device.startswith("cuda"):
            peak_mb, kind = (torch.cuda.max_memory_allocated(device) / 2**20,
                             "cuda_max_memory_allocated")
        else:
            peak_mb, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"
        return {"train_examples_per_s": self.examples / max(self.seconds, 1e-9),
                "train_tokens_per_s": self.tokens / max(self.seconds, 1e-9),
                "train_time_s": self.seconds, "timed_steps": max(0, self.steps - self.warm),
                "peak_memory_mb": peak_mb, "peak_memory_kind": kind}
