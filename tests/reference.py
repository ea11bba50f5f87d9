"""The reference solo step the tests hold train.py's step against: one run, plain PyTorch, no pack.

train.py trains every run through ept.multirun.Pack (a lone run is a pack of one); this is the step
as one would write it for a single PromptedT5, kept here only so that tests/test_packing.py and
tests/test_fastpaths.py can show the two give the same losses, gradients and updates.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ept import batching


class TrainData:
    """The training split as token ids; `batch(idx)` is a padded (input ids, mask, labels) batch."""

    def __init__(self, source_ids, target_ids, pad_id):
        self.source_ids, self.target_ids, self.pad_id = source_ids, target_ids, pad_id

    def __len__(self):
        return len(self.source_ids)

    def tokens(self, idx):
        return sum(len(self.target_ids[i]) for i in idx)

    def batch(self, idx):
        return batching.collate(idx, self.source_ids, self.target_ids, self.pad_id)


def token_nll(model, shift_right, input_ids, mask, labels, amp):
    """Summed cross-entropy over the non-pad target tokens (fp32), so the caller decides the mean."""
    with amp:
        logits = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=shift_right(labels), use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def train_step(model, raw_model, optimizer, scheduler, batch, data, *, amp, device, micro_batch_size,
               max_grad_norm=1.0, rank=0, world_size=1):
    """One optimizer step on the global `batch` (indices into `data`, a TrainData).

    This rank takes batch[rank::world_size] in micro-batches of `micro_batch_size` (gradient accumulation);
    each micro-batch's summed target NLL is scaled by world_size / (the global batch's target tokens), so
    DDP's average over ranks gives the token-mean loss of the whole batch. Then clipping at `max_grad_norm`
    (0 = off), AdamW and the schedule; a non-finite loss or gradient norm skips the update (the caller
    stops the run). `model` runs the forward (raw_model, compiled and/or DDP-wrapped).
    Returns (loss, grad norm, lr of this step, mean prompt row norm mu_t of Eq. 4 or None).
    """
    n_tokens = data.tokens(batch)  # global target tokens: every rank knows them
    shard = batch[rank::world_size]
    n_micro = math.ceil(math.ceil(len(batch) / world_size) / micro_batch_size)  # the same on every rank
    loss_sum = torch.zeros((), device=device)
    for micro in range(n_micro):
        idx = shard[micro * micro_batch_size:(micro + 1) * micro_batch_size]
        weight = 1.0 if idx else 0.0  # a rank short of examples still joins DDP's all-reduce
        input_ids, mask, labels = data.batch(idx or batch[:1])
        if world_size > 1:
            model.require_backward_grad_sync = micro == n_micro - 1
        nll = token_nll(model, raw_model.t5._shift_right, input_ids.to(device), mask.to(device), labels.to(device),
                        amp) * weight
        (nll * (world_size / n_tokens)).backward()
        loss_sum += nll.detach()
    if world_size > 1:
        dist.all_reduce(loss_sum)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    loss, grad_norm = torch.stack([loss_sum / n_tokens, grad_norm.float()]).tolist()  # one host sync
    lr = scheduler.get_last_lr()[0]
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        prompt = raw_model.prompt()
        prompt_norm = None if prompt is None else prompt.float().norm(dim=1).mean().item()  # Eq. (4)
    return loss, grad_norm, lr, prompt_norm
