"""Runs on one frozen T5: one pack step is one optimizer step of every run. train.py trains every
run this way, a lone run as a pack of one (`ft` too: its Run's module is T5 itself, never shared).

Each run keeps what a run alone has: its prompt module (any method and length), data order, batch
and micro-batch sizes, AdamW + linear schedule (stepped run after run: its state_dicts are a solo
run's), clipping on its own gradient norm, mu_t, non-finite guard and checkpoint. The runs share
the frozen T5 and so the forward and backward passes: their batches are concatenated, example i
carrying its run's prompt, left-padded with masked zero rows (T5 has relative positions only), and
the objective sum_r (run r's summed target NLL / run r's target tokens) gives each run exactly its
solo gradient. With dropout 0 in fp32 a packed run equals its solo run within float rounding
(tests/test_packing.py); with dropout on, in its dropout random numbers only (one shared stream).
Why, why not one AdamW for all, the API and speed (scripts/bench_pack.py): docs/packing.md.
"""
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import model as M
from ept import batching, optim

# train.py's last.pt / best.pt, as Run.checkpoint_state writes them (checked on --resume)
CHECKPOINT_KEYS = ("step", "trainable", "optimizer", "scheduler", "rng", "data", "best_score",
                   "best_step", "world_size")


# --- one run of a pack ----------------------------------------------------------------------------

@dataclass(eq=False)
class Run:
    """One run: its module (prompt module; for `full` fine-tuning T5 itself), optimizer, schedule,
    data position (`epoch`, `index` into its order) and bookkeeping. `stopped`: None while it
    trains, "nonfinite" (left the pack) or "done"; `config`: method, seed, lr, prompt options."""
    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    seed: int = 0
    batch_size: int = 16
    max_steps: int = 30000
    micro_batch_size: int | None = None  # examples per forward pass on one rank (None: all)
    max_grad_norm: float = 1.0  # 0 = no clipping
    group_by_length: bool = False
    config: dict = field(default_factory=dict)
    step: int = 0
    epoch: int = 0
    index: int = 0
    best_score: float = -math.inf
    best_step: int | None = None
    stopped: str | None = None
    full: bool = False  # ft: `module` is T5, there is no prompt
    _order: tuple = field(default=(None, None), repr=False)  # (epoch, order) cache

    @property
    def params(self):
        """The trainable parameters in the optimizer's order (what clip_runs clips)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def training(self):
        return self.stopped is None and self.step < self.max_steps

    def next_batch(self, n_train, lengths=None):
        """The global batch of the next step: [index:index + batch_size] of this epoch's order
        (batching.epoch_order, cached; `lengths` for group_by_length)."""
        if self._order[0] != self.epoch:
            self._order = (self.epoch, batching.epoch_order(
                n_train, self.seed, self.epoch, self.batch_size,
                lengths if self.group_by_length else None))
        return self._order[1][self.index:self.index + self.batch_size].tolist()

    def advance(self, n_examples, n_train):
        """After a step: the next data position (a fresh epoch once the split is used up)."""
        self.step += 1
        self.index += n_examples
        if self.index >= n_train:
            self.epoch, self.index = self.epoch + 1, 0

    @torch.no_grad()
    def prompt(self):
        """P' (n, d) now: a detached fp32 copy (None for ft)."""
        return None if self.full else self.module().detach().float().clone()

    def prompted(self, t5):
        """A PromptedT5 of this run on the shared T5 (validation, generation, prompt.pt)."""
        return M.PromptedT5(t5, None if self.full else self.module)

    def checkpoint_state(self, rng=None, world_size=1):
        """This run's last.pt / best.pt (weights_only-loadable). `rng`: the per-rank RNG states
        (runtime.rng_state(), gathered under DDP; a pack's runs share one RNG)."""
        return {"step": self.step,
                "trainable": {k: v.detach().clone() for k, v in self.module.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": list(rng or []), "data": {"epoch": self.epoch, "index": self.index},
                "best_score": self.best_score, "best_step": self.best_step,
                "world_size": world_size}

    def load_checkpoint_state(self, state):
        """Continue from a checkpoint of this run (from a pack or from a solo train.py run)."""
        self.module.load_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.index = (state["step"], state["data"]["epoch"],
                                             state["data"]["index"])
        self.best_score, self.best_step = state["best_score"], state["best_step"]
        self._order = (None, None)


def make_run(t5, method, *, seed=0, lr=None, max_steps=30000, batch_size=16, micro_batch_size=None,
             weight_decay=0.01, warmup_steps=0, max_grad_norm=1.0, group_by_length=False,
             init="uniform", label_ids=None, fused=None, name=None, **module_options):
    """A Run: its prompt module seeded by `seed` on T5's device (ft: T5 itself, unfrozen), AdamW +
    schedule (optim.make_optimizer, fused on CUDA); `module_options`: model.PROMPT_OPTIONS' keys."""
    device = t5.get_input_embeddings().weight.device
    lr = M.default_lr(method) if lr is None else lr
    # one stream, used in sequence as the public EPT code does: the prompt table first, then the
    # default-initialised layers (Linear, LSTM); a second stream seeded alike would repeat P in them
    torch.manual_seed(seed)
    module = M.build_prompt_module(method, t5.config.d_model, **module_options, init=init,
                                   embedding=t5.get_input_embeddings().weight, label_ids=label_ids)
    module = t5.requires_grad_(True) if module is None else module.to(device)
    fused = device.type == "cuda" if fused is None else fused
    optimizer, scheduler = optim.make_optimizer([p for p in module.parameters() if p.requires_grad],
                                                lr, weight_decay, fused, max_steps, warmup_steps)
    name = name or f"{method}_s{seed}_lr{lr:g}"
    return Run(name, module, optimizer, scheduler, seed=seed, batch_size=batch_size,
               max_steps=max_steps, micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm,
               group_by_length=group_by_length, full=method == "ft",
               config=dict(method=method, seed=seed, lr=lr, **module_options))


# --- the shared forward ---------------------------------------------------------------------------

class PackedT5(nn.Module):
    """One frozen T5 and R prompt modules; example i gets the prompt of run `run_ids[i]`: its input
    is [0 ... 0; P'_r; embed(x_i)], mask [0 ... 0; 1 ... 1; mask_i] (LEFT padding). Every forward
    computes all `active` runs' prompts: under DDP every trainable parameter of an active run then
    gets a gradient (zero if none of its examples is in this micro-batch)."""

    def __init__(self, t5, modules):
        super().__init__()
        # PromptedT5 freezes T5 and its embed prepends the per-example prompts built here: a pack
        # and a solo run share one prepend. No modules: full fine-tuning, T5 trains, no prompt.
        self.prompted = M.PromptedT5(t5, nn.ModuleList(modules) if modules else None)
        self.active = list(range(len(modules)))

    def set_active(self, run_ids):
        self.active = list(run_ids)

    def prompts(self):
        """(P (A, n_max, d) fp32, mask (A, n_max) long) of the active runs; None for ft."""
        if self.prompted.prompt_module is None:
            return None
        outs = [self.prompted.prompt_module[i]() for i in self.active]
        lengths = [p.size(0) for p in outs]
        n_max = max(lengths)
        stacked = torch.stack([F.pad(p, (0, 0, n_max - p.size(0), 0)) for p in outs])  # left pad
        pad = torch.tensor([n_max - n for n in lengths], device=outs[0].device)
        mask = (torch.arange(n_max, device=pad.device)[None, :] >= pad[:, None]).long()
        return stacked, mask

    def slots(self, run_ids):
        """Positions in `active` of the runs `run_ids` (LongTensor (B,) of run ids)."""
        lookup = torch.full((len(self.prompted.prompt_module),), -1, dtype=torch.long)
        lookup[torch.tensor(self.active, dtype=torch.long)] = torch.arange(len(self.active))
        slots = lookup[run_ids.cpu()]
        if (slots < 0).any():
            inactive = sorted(set(run_ids[slots < 0].tolist()))
            raise ValueError(f"packing: examples of runs that are not active: {inactive}")
        return slots

    def embed(self, input_ids, attention_mask, run_ids):
        """Encoder inputs: each example's run prompt first (left-padded), the mask extended."""
        prompts = self.prompts()
        if prompts is None:
            return self.prompted.embed(input_ids, attention_mask)
        stacked, pmask = prompts
        slots = self.slots(run_ids).to(stacked.device)
        return self.prompted.embed(input_ids, attention_mask, stacked.index_select(0, slots),
                                   pmask.index_select(0, slots))  # (B, n_max, d), (B, n_max)

    def forward(self, input_ids, attention_mask, run_ids, **kwargs):
        inputs_embeds, mask = self.embed(input_ids, attention_mask, run_ids)
        return self.prompted.t5(inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs)


# --- the per-run update ---------------------------------------------------------------------------

def clip_runs(runs):
    """Clip each run's gradients at its own max_grad_norm (0 = off); (R,) norms before clipping."""
    return torch.stack([torch.nn.utils.clip_grad_norm_(
        r.params, r.max_grad_norm if r.max_grad_norm > 0 else math.inf).float() for r in runs])


def step_runs(runs, stepping):
    """AdamW and the schedule for the runs in `stepping` (those whose loss and gradient are finite),
    every run's gradients dropped, and mu_t (Eq. 4) of each run: the mean row norm of its P'."""
    for r in stepping:
        r.optimizer.step()
        r.scheduler.step()
    for r in runs:
        r.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        norms = [r.module().float().norm(dim=1).mean() for r in runs if not r.full]
        norms = iter(torch.stack(norms).tolist() if norms else [])  # one host sync
        return [None if r.full else next(norms) for r in runs]


def ept_s(module):
    """EPT's s_t = P1 . W_down (h = 1; for h > 1 the norm of that hidden vector); None else."""
    if not isinstance(module, M.EPT):
        return None
    with torch.no_grad():
        s = module.blocks[0].down(module.prompt).float()
    return s.item() if s.numel() == 1 else s.norm().item()


# --- the pack -------------------------------------------------------------------------------------

class Pack:
    """R runs training together on one frozen T5 and one training split, `data` = (source ids,
    target ids, pad id). `wrap(packed)`: the module that runs the forward (PackedT5, or DDP and/or
    torch.compile around it), made again whenever the set of training runs changes (DDP must not
    hold parameters that get no gradient). `amp`: the autocast context. Forward pass m takes every
    run's m-th micro-batch (each rank its shard); with `max_rows`, the rank's examples of all runs
    sorted longest first (`sort_by_length`) and cut into passes of at most `max_rows`: less
    padding, the same gradient (a sum of per-example losses does not depend on their grouping)."""

    def __init__(self, t5, runs, data, *, device=None, amp=None, rank=0, world_size=1,
                 pad_to=(None, None), max_rows=None, sort_by_length=True, wrap=None):
        names = [r.name for r in runs]
        if len(set(names)) != len(names):
            raise ValueError(f"packing: run names must be unique: {names}")
        self.t5, self.runs, self.data = t5, list(runs), data
        self.device = device or t5.get_input_embeddings().weight.device
        self.amp = amp or nullcontext()
        self.rank, self.world_size, self.pad_to = rank, world_size, pad_to
        self.max_rows, self.sort_by_length = max_rows, sort_by_length
        self.wrap = wrap or (lambda packed: packed)
        if any(r.full for r in self.runs) and len(self.runs) > 1:
            raise ValueError("packing: ft trains T5 itself and cannot share it with other runs")
        self.packed = PackedT5(t5, [r.module for r in self.runs if not r.full])
        self.n_train = len(data[0])
        self.lengths = [len(s) + len(t) for s, t in zip(data[0], data[1])]  # group_by_length
        self.model, self._wrapped_for, self.timings = None, None, {}

    @property
    def training(self):
        """The runs that take part in the next step (not stopped, below their max_steps)."""
        return [r for r in self.runs if r.training]

    def stop(self, run, reason):
        """Take `run` out of the pack (its parameters freeze; the others go on)."""
        run.stopped = reason
        run.module.requires_grad_(False)

    def step(self):
        """One optimizer step of every training run on its own next global batch. Returns {run
        name: {"step", "loss", "lr" (of this step), "grad_norm" (before clipping), "prompt_norm"
        (mu_t after the step), "epoch", "examples", "tokens", "nonfinite" (names of the non-finite
        values)}}. A run with a non-finite loss or gradient norm is not updated; it, or one with a
        non-finite mu_t, leaves the pack ("nonfinite"), as one at max_steps does ("done")."""
        runs = self.training
        if not runs:
            return {}
        ids = [self.runs.index(r) for r in runs]
        if ids != self._wrapped_for:  # the set of training runs changed: DDP sees only live ones
            for r in self.runs:
                if not r.training:
                    r.module.requires_grad_(False)
            self.packed.set_active(ids)
            self.model, self._wrapped_for = self.wrap(self.packed), ids
        batches = [r.next_batch(self.n_train, self.lengths) for r in runs]
        stats = self._step(runs, ids, batches)
        records = {}
        for r, batch, (loss, grad_norm, lr, prompt_norm) in zip(runs, batches, stats):
            r.advance(len(batch), self.n_train)
            values = {"loss": loss, "grad_norm": grad_norm, "prompt_norm": prompt_norm}
            bad = [k for k, v in values.items() if v is not None and not math.isfinite(v)]
            records[r.name] = {"step": r.step, **values, "lr": lr, "epoch": r.epoch,
                               "examples": len(batch), "nonfinite": bad,
                               "tokens": sum(self.lengths[i] for i in batch),
                               "ept_s": ept_s(r.module)}
            if bad:
                self.stop(r, "nonfinite")
            elif r.step >= r.max_steps:
                r.stopped = "done"
        return records

    def _plan(self, runs, batches):
        """This rank's forward passes, lists of (slot, example index, weight), as many on every rank
        (DDP: every rank in every pass); a pass with no example here is a zero-weight stand-in."""
        ws, rank = self.world_size, self.rank
        if self.max_rows:
            def entries(k):
                out = [(s, i) for s, b in enumerate(batches) for i in b[k::ws]]
                if self.sort_by_length:  # stable: ties keep run, then data order
                    out.sort(key=lambda e: -self.lengths[e[1]])
                return out
            mine = entries(rank)
            n_passes = max(math.ceil(len(entries(k)) / self.max_rows) for k in range(ws))
            chunks = [mine[k * self.max_rows:(k + 1) * self.max_rows] for k in range(n_passes)]
        else:
            micro = [min(r.micro_batch_size or math.ceil(r.batch_size / ws),
                         math.ceil(r.batch_size / ws)) for r in runs]
            n_passes = max(math.ceil(math.ceil(len(b) / ws) / mb) for b, mb in zip(batches, micro))
            shards = [b[rank::ws] for b in batches]
            chunks = [[(s, i) for s, (shard, mb) in enumerate(zip(shards, micro))
                       for i in shard[m * mb:(m + 1) * mb]] for m in range(n_passes)]
        stand_in = [(0, batches[0][0], 0.0)]
        return [[(s, i, 1.0) for s, i in chunk] if chunk else stand_in for chunk in chunks or [[]]]

    def _step(self, runs, ids, batches):
        source_ids, target_ids, pad_id = self.data
        device, ws = self.device, self.world_size
        t0 = time.perf_counter()
        # per-run global target tokens (every rank holds the data, so every rank knows them)
        n_tokens = torch.tensor([sum(len(target_ids[i]) for i in b) for b in batches],
                                dtype=torch.float32, device=device)
        scale = ws / n_tokens  # DDP averages over ranks: x world_size, the sum; / tokens, the mean
        loss_sums = torch.zeros(len(runs), device=device)
        plan, padded = self._plan(runs, batches), 0
        for k, chunk in enumerate(plan):
            slots = torch.tensor([s for s, _, _ in chunk], device=device)
            weight = torch.tensor([w for _, _, w in chunk], device=device)
            input_ids, mask, labels = batching.collate([i for _, i, _ in chunk], source_ids,
                                                       target_ids, pad_id, self.pad_to)
            padded += input_ids.numel() + labels.numel()
            run_ids = torch.tensor([ids[s] for s, _, _ in chunk])
            if ws > 1:
                self.model.require_backward_grad_sync = k == len(plan) - 1
            labels = labels.to(device)
            with self.amp:
                logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                    run_ids=run_ids, decoder_input_ids=self.t5._shift_right(labels),
                                    use_cache=False).logits
            nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                  reduction="none").view(labels.shape).sum(1) * weight  # (B,)
            (nll * scale.index_select(0, slots)).sum().backward()
            loss_sums.index_add_(0, slots, nll.detach())
        if ws > 1:
            dist.all_reduce(loss_sums)
        t1 = time.perf_counter()
        grad_norms = clip_runs(runs)  # then one host sync:
        losses, norms = torch.stack([loss_sums / n_tokens, grad_norms.to(device)]).tolist()
        lrs = [r.scheduler.get_last_lr()[0] for r in runs]
        finite = [math.isfinite(a) and math.isfinite(b) for a, b in zip(losses, norms)]
        mu = step_runs(runs, [r for r, ok in zip(runs, finite) if ok])
        t2 = time.perf_counter()
        self.timings = {"forward_backward_s": t1 - t0, "update_s": t2 - t1,
                        "forward_passes": len(plan), "padded_tokens": padded}
        return list(zip(losses, norms, lrs, mu))
