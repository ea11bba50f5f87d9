"""The optimizer and schedule of the paper's training, as the HF Trainer sets them up
(docs/paper.md, "Training"): each run's own (multirun.make_run)."""
import torch


def make_optimizer(params, lr, weight_decay, fused, max_steps, warmup_steps=0):
    """AdamW (weight decay not on biases/norms, as the HF Trainer) and HF's
    get_linear_schedule_with_warmup: linear warm-up over `warmup_steps`, then linear decay to 0 at
    `max_steps`."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused)

    def lr_lambda(s):
        if s < warmup_steps:
            return s / max(1, warmup_steps)
        return max(0.0, (max_steps - s) / max(1, max_steps - warmup_steps))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
