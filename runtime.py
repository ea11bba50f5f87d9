"""Where and how the model runs: the device, the ranks of a torchrun group, and the precision.

Precision (one name everywhere: --dtype, config.json "dtype"):
    fp32  the paper's setting (the HF Trainer's default: fp32, TF32 off as PyTorch leaves it); default
    tf32  fp32 weights and activations, matmuls on TF32 tensor cores (CUDA; on a CPU it is fp32)
    bf16  bf16 autocast around the forward passes, trainable parameters and loss in fp32 (CUDA; T5
          overflows in fp16). A speed option, not the paper's setting.
"""
import os
import random
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

DTYPES = ("fp32", "tf32", "bf16")


def setup_distributed():
    """(rank, local_rank, world_size, device) from the torchrun environment; safe to call again."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, local_rank, world_size, device


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_precision(dtype, device):
    """Apply `dtype` to the process (TF32 switches); returns the autocast context of the forward passes."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
        torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    return autocast(device, dtype)


def autocast(device, dtype):
    """bf16 autocast when asked, else nothing (fp32 / tf32)."""
    if dtype == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


# --- the process's random state: saved in checkpoints, restored on resume -----------------------------

def rng_state():
    """Every RNG as tensors and plain values (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss], "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


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
