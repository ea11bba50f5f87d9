"""A pack: R prompt runs on one frozen T5, an accelerator beneath train.py (a sweep or --runs FILE).

Each run is a train.Run, built, validated, checkpointed and finished by train.py's own functions;
only the step is shared: the runs' batches are concatenated, example i carrying its run's prompt,
left-padded with masked zero rows (T5 has relative positions only), and the objective sum_r (run
r's summed target NLL / run r's target tokens) gives each run exactly its train.py gradient; each
run clips and steps its own AdamW and schedule. A packed run equals its solo run within float
rounding, dropout on or off (tests/test_packing.py). Why, and the speed: docs/packing.md.
"""
import argparse
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import model as M
import train
from ept import cli, files, options, runfolder, runtime, tasks


def main(args, specs, ranks, max_rows=None, runs_file=None):
    """train.py's main for several runs (a sweep's `specs`, or --runs FILE's): every folder checked
    (a busy one left out, a finished one skipped), one T5 loaded, every run built, then trained."""
    if runs_file is not None:
        specs = ranks.first(lambda: read_runs(args, runs_file), everyone=True)
    ranks.first(lambda: train.check_offline(args))  # offline: all that is missing in one sentence
    specs = ranks.first(lambda: options.resolve_runs(args, specs, True), everyone=True)
    say = print if ranks.master else (lambda *a, **k: None)
    held, left_out = [], []
    with runtime.stop_on_signals(), runfolder.cleanup([s.out_dir for s in specs], held,
                                                      ranks.master):
        todo = ranks.first(lambda: open_folders(specs, held, left_out, say))
        if todo:
            task = ranks.first(lambda: tasks.load_task(todo[0][0], ranks, say), everyone=True)
            t5 = ranks.first(lambda: train.load_t5(todo[0][0], task, ranks), everyone=True)
            team = ranks.first(lambda: start(t5, todo, task, ranks, held, say), everyone=True)
            results = train_pack(team, task, t5, ranks, say, max_rows)
            say(table(team, results))
        else:
            say(f"train: nothing left to train of the {len(specs)} runs")
    if left_out:  # the pack is not finished: its command must not read as done
        raise runfolder.Busy(f"train: {len(left_out)} run(s) of the pack were left out, held by "
                             f"another process: {' '.join(left_out)}; run the same command again "
                             "once it is done")
    return {"runs": results} if todo else {"runs": {}, "finished": True}


def read_runs(args, runs_file):
    """--runs FILE's runs, unresolved: its list of option dicts over the flags' options."""
    rows = files.read_json(Path(runs_file), "run list")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise cli.Failure(f"train: --runs {runs_file} must hold a non-empty JSON list of "
                          "option dicts")
    if swept := [k for k in options.SWEEP if isinstance(getattr(args, k), list)]:
        raise cli.Failure("train: --runs gives the runs; the flags give only what they share: "
                          f"one value for --{', --'.join(k.replace('_', '-') for k in swept)}")
    specs = []
    for row in rows:
        spec = dict(vars(args), out_dir=row.get("out_dir"))
        for key, value in row.items():
            if key == "out_dir":
                if problem := cli.run_folder_problem(value):
                    raise cli.Failure(f"train: --runs {runs_file}: out_dir {problem}")
            elif key in options.PER_RUN:
                spec[key] = per_run_value(key, value)
            elif key not in vars(args):
                raise cli.Failure(f"train: --runs: unknown option {key!r} (train.py's option "
                                  "names, with underscores)")
            elif per_run_value(key, value) != getattr(args, key):  # the same as the command line's
                raise cli.Failure(f"train: --runs: {key} is shared by the runs of a pack (one "
                                  "task, data and T5): give it once on the command line, not "
                                  f"{value!r} for one run")
        specs.append(argparse.Namespace(**options.method_defaults(spec)))
    return specs


def per_run_value(key, value):
    """A --runs FILE value checked and converted as the command line would take it."""
    action = next(a for a in options.parser._actions if a.dest == key)
    if action.nargs == 0 and not isinstance(value, bool):  # a flag (store_true)
        raise cli.Failure(f"train: --runs: {key} must be true or false, not {value!r}")
    if action.nargs == 0 or value is None:
        return value
    try:
        value = action.type(str(value)) if action.type else value
    except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
        raise cli.Failure(f"train: --runs: {key}: {err}") from None
    if action.choices is not None and value not in action.choices:
        raise cli.Failure(f"train: --runs: {key} {value!r} is not one of "
                          f"{', '.join(map(str, action.choices))}")
    return value


def table(team, results):
    """The sweep's runs at the end (issue 29): name, best validation score and step, test score,
    mu_t at the last step ("-" where there is none)."""
    def cell(v):
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
    rows = [("run", "best val", "step", "test", "mu_t end")]
    for run in team:
        r = results.get(str(run.out_dir), {})
        end = f"stopped: {r['stopped']}" if r.get("stopped") else cell(r.get("mu_t_end"))
        rows.append((run.out_dir.name, cell(r.get("best_score")), cell(r.get("best_step")),
                     cell((r.get("metrics") or {}).get("score")), end))
    widths = [max(len(row[k]) for row in rows) for k in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def open_folders(specs, held, left_out, say):
    """runfolder.open_folder for each run: [(spec, resume path)] of those to train."""
    todo = []
    for spec in specs:
        out_dir = Path(spec.out_dir)
        try:
            resume_path = runfolder.open_folder(spec, out_dir, held, say, packed=True)
        except runfolder.Busy as err:
            say(f"train: left out of the pack: {err}")
            left_out.append(str(out_dir))
            continue
        if resume_path != "finished":
            todo.append((spec, resume_path))
    return todo


def start(t5, todo, task, ranks, held, say):
    """Every run built (train.new_run) and checked; only then config.json and log.jsonl written."""
    team = []
    locks = {str(lock.path.parent): lock for lock in held if isinstance(lock, runfolder.Lock)}
    for spec, resume_path in todo:
        spec.max_length = todo[0][0].max_length  # the task's, as load_task resolved it
        run = train.new_run(t5, spec, task, ranks, out_dir=Path(spec.out_dir),
                            resume_path=resume_path)
        run.lock = locks.pop(str(run.out_dir), None)  # the run releases its own when it leaves
        team.append(run)
    held[:] = [*locks.values(), *team]
    extra = {"pack": {"size": len(team), "runs": [r.out_dir.name for r in team]}}
    for run in team:  # every run checked: only now does any run's folder change
        run.log = runfolder.start_log(run, task, ranks, say, **extra)
    return team


def train_pack(team, task, t5, ranks, say, max_rows=None):
    """train.train for R runs: at the top of each step a run validates and saves when due and
    finishes at its last (train.py's functions); then one pack step trains the others."""
    args = team[0].args
    pack = Pack(t5, team, task.data, device=ranks.device, rank=ranks.rank,
                amp=runtime.set_precision(args.dtype, ranks.device), world_size=ranks.world_size,
                max_rows=max_rows, wrap=lambda net: train.wrap(net, args, ranks))
    meters = {r.name: runtime.Throughput(warm=2 if r.args.max_steps - r.step >= 10 else 0)
              for r in team}
    live, results, faults, mu = list(team), {}, [], {}  # mu: each run's last mu_t
    bar = tqdm(total=max(r.args.max_steps for r in team), initial=min(r.step for r in team),
               desc=f"pack of {len(team)}", dynamic_ncols=True,
               **({} if ranks.master else {"disable": True}))

    def leave(run, result):
        live.remove(run)
        results[str(run.out_dir)] = {**result, "mu_t_end": mu.get(run.name)}
        runfolder.close(run)

    def drop(run, what, lr):  # a non-finite run stops alone
        pack.stop(run, "nonfinite")
        faults.append(str(train.nonfinite_stop(run, what, lr, True)))
        leave(run, {"out_dir": str(run.out_dir), "stopped": "nonfinite"})

    while live:
        for run in list(live):
            if not train.validate_and_save(run, task, ranks):
                drop(run, ["weights"], run.scheduler.get_last_lr()[0])
            elif run.step == run.args.max_steps:
                leave(run, train.finish(run, task, ranks, say, meters[run.name]))
        if not live:
            break
        if sig := runtime.stop_requested(ranks):  # every live run's last.pt, then exit
            for run in live:
                if runfolder.weights_finite(run.params):
                    runfolder.save_checkpoint(run, ranks, "last.pt")
            raise runtime.stopped(sig, live)
        t0 = time.time()
        records = pack.step()  # one optimizer step of every live run
        seconds = time.time() - t0
        for run in list(live):
            r = records[run.name]
            meters[run.name].add(r["examples"], r["tokens"], seconds)
            mu[run.name] = r["prompt_norm"]
            run.log(train.train_event(run, r, r["examples"], r["tokens"], seconds))
            if r["nonfinite"]:
                drop(run, r["nonfinite"], r["lr"])
        bar.update(1)
    bar.close()
    if faults:  # all-reduced, so every rank meets them: rank 0 says why, the others exit 1 quietly
        head = ("" if len(team) == 1 else f"train: all {len(team)} runs of the pack stopped. "
                if len(faults) == len(team) else f"train: {len(faults)} of the {len(team)} runs "
                "of the pack stopped; the others finished. ")
        if not ranks.master:
            raise runtime.PeerStopped()
        raise train.NonFiniteError(head + " ".join(faults))
    return results


def make_run(t5, method, *, name=None, label_ids=None, fused=None, world_size=1, **overrides):
    """A train.Run of `method` on `t5` without a task or folder (tests, benchmarks): train.py's
    defaults with `overrides` (its option names: seed, lr, batch_size, prompt_length, ...)."""
    args = options.parser.parse_args(["--method", method])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"make_run: train.py has no option {key!r}")
        setattr(args, key, value)
    args = options.resolve(args)
    options.batch_plan(args, 1, world_size)  # the micro-batch size
    return train.new_run(t5, args, label_ids=label_ids, name=name or f"{method}_s{args.seed}",
                         fused=fused)


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

    def prompts(self):
        """(P (A, n_max, d) fp32, mask (A, n_max) long) of the active runs; None for ft."""
        if self.prompted.prompt_module is None:
            return None
        outs = [self.prompted.prompt_module[i]() for i in self.active]
        n_max = max(p.size(0) for p in outs)
        stacked = torch.stack([F.pad(p, (0, 0, n_max - p.size(0), 0)) for p in outs])  # left pad
        pad = torch.tensor([n_max - p.size(0) for p in outs], device=stacked.device)
        mask = (torch.arange(n_max, device=pad.device)[None, :] >= pad[:, None]).long()
        return stacked, mask

    def embed(self, input_ids, attention_mask, run_ids):
        """Encoder inputs: each example's run prompt first (left-padded), the mask extended."""
        prompts = self.prompts()
        if prompts is None:
            return self.prompted.embed(input_ids, attention_mask)
        stacked, pmask = prompts
        if inactive := sorted(set(run_ids.tolist()) - set(self.active)):
            raise ValueError(f"packing: examples of runs that are not active: {inactive}")
        slots = torch.tensor([self.active.index(i) for i in run_ids.tolist()],
                             device=stacked.device)  # positions in `active`
        return self.prompted.embed(input_ids, attention_mask, stacked.index_select(0, slots),
                                   pmask.index_select(0, slots))  # (B, n_max, d), (B, n_max)

    def forward(self, input_ids, attention_mask, run_ids, **kwargs):
        inputs_embeds, mask = self.embed(input_ids, attention_mask, run_ids)
        return self.prompted.t5(inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs)


# --- the pack -------------------------------------------------------------------------------------

class Pack:
    """R runs training together on one frozen T5 and one training split, `data` = (source ids,
    target ids, pad id). `wrap(packed)`: what runs the forward (PackedT5, or DDP / torch.compile
    around it), made again whenever the set of training runs changes (DDP must not hold parameters
    that get no gradient). Forward pass m takes every run's m-th micro-batch (each rank its shard);
    with `max_rows`, the rank's examples of all runs sorted longest first and cut into passes of at
    most `max_rows`: less padding, the same gradient (a sum of per-example losses)."""

    def __init__(self, t5, runs, data, *, device=None, amp=None, rank=0, world_size=1,
                 pad_to=(None, None), max_rows=None, wrap=None):
        names = [r.name for r in runs]
        if len(set(names)) != len(names):
            raise ValueError(f"packing: run names must be unique: {names}")
        self.t5, self.runs, self.data = t5, list(runs), data
        self.device = device or t5.get_input_embeddings().weight.device
        self.amp = amp or nullcontext()
        self.rank, self.world_size, self.pad_to, self.max_rows = rank, world_size, pad_to, max_rows
        self.wrap = wrap or (lambda packed: packed)
        full = [r for r in self.runs if r.net.prompt_module is None]
        if full and len(self.runs) > 1:
            raise ValueError("packing: ft trains T5 itself and cannot share it with other runs")
        self.packed = PackedT5(t5, [] if full else [r.module for r in self.runs])
        self.n_train = len(data[0])
        self.lengths = [len(s) + len(t) for s, t in zip(data[0], data[1])]  # group_by_length
        self.model, self._wrapped_for, self.timings = None, None, {}
        with torch.no_grad():  # prompt rows per run: an example's offset behind its left padding
            self.rows = [0 if full else r.net.prompt().size(0) for r in self.runs]

    @property
    def training(self):
        """The runs that take part in the next step (not stopped, below their max_steps)."""
        return [r for r in self.runs if r.stopped is None and r.step < r.args.max_steps]

    def stop(self, run, reason):
        """Take `run` out of the pack (its parameters freeze; the others go on)."""
        run.stopped = reason
        run.module.requires_grad_(False)

    def step(self, batches=None):
        """One optimizer step of every training run on its own next global batch: {run name:
        train.train_step's record + "step", "epoch", "examples", "tokens", "nonfinite" (the names
        of the non-finite values: the run leaves the pack, as one at max_steps does)}."""
        runs = self.training
        if not runs:
            return {}
        ids = [self.runs.index(r) for r in runs]
        if ids != self._wrapped_for:  # the set of training runs changed: DDP sees only live ones
            for r in self.runs:
                if r not in runs:
                    r.module.requires_grad_(False)
            self.packed.active = ids
            self.model, self._wrapped_for = self.wrap(self.packed), ids
        batches = batches or [train.next_batch(r, self.n_train, self.lengths) for r in runs]
        stats = self._step(runs, ids, batches)
        records = {}
        for r, batch, (loss, grad_norm, lr, (prompt_norm, s)) in zip(runs, batches, stats):
            r.advance(len(batch), self.n_train)
            values = {"loss": loss, "grad_norm": grad_norm, "prompt_norm": prompt_norm}
            bad = [k for k, v in values.items() if v is not None and not math.isfinite(v)]
            records[r.name] = {"step": r.step, **values, "ept_s": s, "lr": lr, "epoch": r.epoch,
                               "examples": len(batch), "nonfinite": bad,
                               "tokens": sum(self.lengths[i] for i in batch)}
            if bad:
                self.stop(r, "nonfinite")
            elif r.step >= r.args.max_steps:
                r.stopped = "done"
        return records

    def _plan(self, runs, batches):
        """This rank's forward passes, lists of (slot, example index, weight), as many on every rank
        (DDP: every rank in every pass); a pass with no example here is a zero-weight stand-in."""
        ws, rank = self.world_size, self.rank
        if self.max_rows:
            def entries(k):
                out = [(s, i) for s, b in enumerate(batches) for i in b[k::ws]]
                return sorted(out, key=lambda e: -self.lengths[e[1]])  # stable: ties keep order
            mine = entries(rank)
            n_passes = max(math.ceil(len(entries(k)) / self.max_rows) for k in range(ws))
            chunks = [mine[k * self.max_rows:(k + 1) * self.max_rows] for k in range(n_passes)]
        else:
            micro = [min(r.args.micro_batch_size or math.ceil(r.args.batch_size / ws),
                         math.ceil(r.args.batch_size / ws)) for r in runs]
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
        n_max = max(self.rows[i] for i in ids)  # the prompts' left padding: PackedT5.prompts
        for k, chunk in enumerate(plan):
            in_slots, idx, weights = zip(*chunk)
            slots, weight = (torch.tensor(v, device=device) for v in (in_slots, weights))
            input_ids, mask, labels = tasks.collate(list(idx), source_ids, target_ids, pad_id,
                                                    self.pad_to)
            padded += input_ids.numel() + labels.numel()
            run_ids = torch.tensor([ids[s] for s in in_slots])
            if ws > 1:
                self.model.require_backward_grad_sync = k == len(plan) - 1
            labels = labels.to(device)
            keys = M.example_keys([runs[s].args.seed for s in in_slots],  # dropout's, as alone
                                  [runs[s].step for s in in_slots], list(idx), device)
            offset = torch.tensor([n_max - self.rows[ids[s]] for s in in_slots], device=device)
            with self.amp, M.dropout_keys(keys, offset):
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
        stats = train.update(runs, loss_sums / n_tokens)
        self.timings = {"forward_backward_s": t1 - t0, "update_s": time.perf_counter() - t1,
                        "forward_passes": len(plan), "padded_tokens": padded}
        return stats

