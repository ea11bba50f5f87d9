"""A pack: R prompt runs (train.Run) on one frozen T5 beneath train.py (a sweep, --runs FILE); each
example with its run's prompt (left-padded), each run's loss its own token mean. docs/packing.md."""
import argparse
import itertools
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import model as M
import train
from ept import cli, files, options, runfolder, runtime, tasks


def main(args, ranks, max_rows=None, runs_file=None):
    """train.py's main for several runs: folders checked, one T5 loaded, runs built, trained."""
    specs = ranks.first(lambda: resolve_runs(args, runs_file), everyone=True)
    ranks.first(lambda: train.check(args))  # offline: all that is missing in one sentence
    say, held, left_out, found = print if ranks.master else (lambda *a, **k: None), [], [], []

    def open_folders():  # each run's folder claimed and checked: [(spec, resume path)] to train
        for s in specs:
            try:
                found.append((s, runfolder.open_folder(s, Path(s.out_dir), held, say, packed=True)))
            except runfolder.Busy as err:
                say(f"train: left out of the pack: {err}")
                left_out.append(str(Path(s.out_dir)))
        return [(spec, resume_path) for spec, resume_path in found if resume_path != "finished"]

    def start():  # every run built and checked; only then config.json and log.jsonl written
        for spec, _ in todo:
            spec.max_length = todo[0][0].max_length  # the task's, as load_task resolved it
        team = [train.Run(t5, spec, task, ranks, out_dir=Path(spec.out_dir),
                          resume_path=resume_path) for spec, resume_path in todo]
        for run, lock in zip(team, held):  # held (rank 0 only): the locks of `todo`, in order
            run.lock = lock  # released when the run leaves the pack
        held[:] = team
        extra = {"pack": {"size": len(team), "runs": [r.out_dir.name for r in team]}}
        for run in team:
            run.log = runfolder.start_log(run, task, ranks, say, **extra)
        return team
    with runtime.stop_on_signals(), runfolder.cleanup([s.out_dir for s in specs], held,
                                                      ranks.master):
        if todo := ranks.first(open_folders):
            task = ranks.first(lambda: tasks.load_task(todo[0][0], ranks, say), everyone=True)
            t5 = ranks.first(lambda: train.load_t5(todo[0][0], task, ranks), everyone=True)
            team = ranks.first(start, everyone=True)
            say(table(team, results := train_pack(team, task, t5, ranks, say, max_rows)))
        else:
            say(f"train: nothing left to train of the {len(specs)} runs")
    if left_out:  # the pack is not finished: its command must not read as done
        raise runfolder.Busy(f"train: {len(left_out)} run(s) of the pack were left out, held by "
                             f"another process: {' '.join(left_out)}; run the same command again "
                             "once it is done")
    return {"runs": results} if todo else {"runs": {}, "finished": True}


def sweep(args):
    """The runs of a sweep: the product of its values (EPT x 2 prompt lengths: one run)."""
    values = [v if isinstance(v := getattr(args, k), list) else [v] for k in options.SWEEP]
    specs = [run_spec(args, dict(zip(options.SWEEP, c))) for c in itertools.product(*values)]
    return list({repr(vars(s)): s for s in specs}.values())


def run_spec(args, values, out_dir=None):
    """The flags and a run's `values`, resolved; its folder: out_dir or <--out-dir or runs>/name."""
    spec = options.resolve(argparse.Namespace(**{**vars(args), **values}))
    spec.out_dir = out_dir or str(Path(args.out_dir or "runs") / options.run_name(vars(spec)))
    return spec


def resolve_runs(args, runs_file=None):
    """The runs (--runs FILE's, or the sweep's) if they can share one T5 and each has its folder."""
    specs = read_runs(args, runs_file) if runs_file else sweep(args)
    if any(s.method == "ft" for s in specs):
        raise cli.Failure("train: ft trains T5 itself: train it alone, not in a pack")
    folders = [str(Path(s.out_dir).resolve()) for s in specs]
    if shared := sorted({f for f in folders if folders.count(f) > 1}):
        raise cli.Failure(f"train: two runs of the pack share a folder: {', '.join(shared)}")
    if args.random_init and len({s.seed for s in specs}) > 1:
        raise cli.Failure("train: --random-init builds the pack's one T5 from one seed")
    return specs


def read_runs(args, runs_file):
    """--runs FILE's runs: its list of option dicts over the flags' options."""
    rows = files.read_json(Path(runs_file), "run list")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise cli.Failure(f"train: --runs {runs_file} must be a non-empty list of option dicts")
    if swept := [k for k in options.SWEEP if isinstance(getattr(args, k), list)]:
        raise cli.Failure("train: --runs gives the runs; the flags give only what they share: "
                          f"one value for --{', --'.join(k.replace('_', '-') for k in swept)}")
    if bad := [p for r in rows if "out_dir" in r and (p := cli.run_folder_problem(r["out_dir"]))]:
        raise cli.Failure(f"train: --runs {runs_file}: out_dir {bad[0]}")
    return [run_spec(args, {k: per_run_value(args, k, v) for k, v in row.items() if k != "out_dir"},
                     row.get("out_dir")) for row in rows]


def per_run_value(args, key, value):
    """A --runs FILE value checked and converted as the command line would take it."""
    if key not in vars(args):
        raise cli.Failure(f"train: --runs: unknown option {key!r} (train.py's, with underscores)")
    action = next(a for a in options.parser._actions if a.dest == key)
    try:
        if action.nargs == 0 and not isinstance(value, bool):  # a flag (store_true)
            raise ValueError(f"must be true or false, not {value!r}")
        value = value if value is None or action.type is None else action.type(str(value))
        if value is not None and value not in (action.choices or [value]):
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, action.choices))}")
    except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
        raise cli.Failure(f"train: --runs: {key}: {err}") from None
    if key not in options.PER_RUN and value != vars(args)[key]:  # one task, data and T5
        raise cli.Failure(f"train: --runs: {key} is shared by the runs of a pack: give it once")
    return value


def table(team, results):
    """The runs at the end: name, best validation score and step, test score, last mu_t or "-"."""
    cell = lambda v: "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
    rows = [("run", "best val", "step", "test", "mu_t end")] + [
        (run.out_dir.name, *map(cell, (r.get("best_score"), r.get("best_step"),
                                       (r.get("metrics") or {}).get("score"))),
         f"stopped: {r['stopped']}" if r.get("stopped") else cell(r.get("mu_t_end")))
        for run in team for r in [results.get(str(run.out_dir), {})]]
    widths = [max(map(len, column)) for column in zip(*rows)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def train_pack(team, task, t5, ranks, say, max_rows=None):
    """train.train for R runs: each validates, saves and finishes by train.py's functions."""
    pack = Pack(t5, team, task.data, device=ranks.device, rank=ranks.rank, max_rows=max_rows,
                amp=runtime.set_precision(team[0].args.dtype, ranks.device),
                world_size=ranks.world_size, wrap=lambda net: train.wrap(net, team[0].args, ranks))
    meters = {r: runtime.Throughput(warm=2 if r.args.max_steps - r.step >= 10 else 0) for r in team}
    live, results, faults, last = list(team), {}, [], {}  # last: each run's last step record

    def leave(run, result):
        live.remove(run)
        results[str(run.out_dir)] = {**result, "mu_t_end": last.get(run, {}).get("prompt_norm")}
        runfolder.close(run)

    def drop(run, what, lr):  # a non-finite run leaves the pack; the others go on
        run.stopped = "nonfinite"
        faults.append(str(train.nonfinite_stop(run, what, lr, ranks.master)))
        leave(run, {"out_dir": str(run.out_dir), "stopped": "nonfinite"})
    with tqdm(total=max(r.args.max_steps for r in team), initial=min(r.step for r in team),
              desc=f"pack of {len(team)}", **({} if ranks.master else {"disable": True})) as bar:
        while live:
            for run in list(live):
                if not train.validate_and_save(run, task, ranks):
                    drop(run, ["weights"], run.scheduler.get_last_lr()[0])
                elif run.step == run.args.max_steps:
                    leave(run, train.finish(run, task, ranks, say, meters[run]))
            if not live:
                break
            if sig := runtime.stop_requested(ranks):  # each live run's last.pt (never NaN); exit
                for run in (run for run in live if runfolder.weights_finite(run.params)):
                    runfolder.save_checkpoint(run, ranks, "last.pt")
                raise runtime.stopped(sig, live)
            t0, records = time.time(), pack.step()  # one optimizer step of every live run
            seconds = time.time() - t0
            for run in list(live):
                last[run] = r = records[run.name]
                meters[run].add(r["examples"], r["tokens"], seconds)
                run.log(train.train_event(run, r, r["examples"], r["tokens"], seconds))
                if r["nonfinite"]:
                    drop(run, r["nonfinite"], r["lr"])
            bar.update(1)
    if faults:  # all-reduced, so every rank meets them: rank 0 says why, the others exit 1 quietly
        n, size = len(faults), len(team)
        head = ("" if size == 1 else f"train: all {size} runs of the pack stopped. " if n == size
                else f"train: {n} of the {size} runs of the pack stopped; the others finished. ")
        raise cli.Failure(head + " ".join(faults)) if ranks.master else runtime.PeerStopped()
    return results


def make_run(t5, method, *, name=None, fused=None, **overrides):
    """A train.Run of `method` on `t5` with train.py's defaults and `overrides` (tests, benches)."""
    args = options.parser.parse_args(["--method", method])
    if unknown := [key for key in overrides if not hasattr(args, key)]:
        raise TypeError(f"make_run: train.py has no option {unknown[0]!r}")
    args = options.resolve(argparse.Namespace(**{**vars(args), **overrides}))
    options.batch_plan(args, 1, 1)  # the micro-batch size
    return train.Run(t5, args, name=name or f"{method}_s{args.seed}", fused=fused)


class PackedT5(torch.nn.Module):
    """T5, R prompts: example i gets run_ids[i]'s (LEFT-padded); each pass runs all `active`."""

    def __init__(self, t5, modules):
        super().__init__()  # PromptedT5.embed prepends the prompts, as for a solo run
        self.prompted = M.PromptedT5(t5, torch.nn.ModuleList(modules) if modules else None)
        self.active = list(range(len(modules)))

    def prompts(self):
        """(P (A, n_max, d) fp32, mask (A, n_max) long) of the active runs."""
        outs = [self.prompted.prompt_module[i]() for i in self.active]
        pad = [max(p.size(0) for p in outs) - p.size(0) for p in outs]  # left padding rows
        return (torch.stack([F.pad(p, (0, 0, k, 0)) for p, k in zip(outs, pad)]),
                torch.stack([F.pad(p.new_ones(len(p)), (k, 0)) for p, k in zip(outs, pad)]).long())

    def embed(self, input_ids, attention_mask, run_ids):
        """Encoder inputs: each example's run prompt first (left-padded), the mask extended."""
        if self.prompted.prompt_module is None:  # ft: no prompt, T5 trains
            return self.prompted.embed(input_ids, attention_mask)
        slot_of = run_ids.new_full((len(self.prompted.prompt_module),), -1)  # run -> its slot
        slot_of[self.active] = torch.arange(len(self.active), device=run_ids.device)
        if ((slots := slot_of[run_ids]) < 0).any():
            raise ValueError("packing: examples of runs that are not active")
        return self.prompted.embed(input_ids, attention_mask,  # (B, n_max, d), (B, n_max)
                                   *(t.index_select(0, slots.to(t.device)) for t in self.prompts()))

    def forward(self, input_ids, attention_mask, run_ids, **kwargs):
        inputs_embeds, mask = self.embed(input_ids, attention_mask, run_ids)
        return self.prompted.t5(inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs)


class Pack:
    """R runs on one frozen T5 and split `data`; wrap(PackedT5): DDP/compile, per set of runs."""
    training = property(lambda self: [r for r in self.runs  # a stopped run: frozen at the next step
                                      if r.stopped is None and r.step < r.args.max_steps])

    def __init__(self, t5, runs, data, *, device=None, amp=None, rank=0, world_size=1,
                 pad_to=(None, None), max_rows=None, wrap=None):
        if (full := any(r.net.prompt_module is None for r in runs)) and len(runs) > 1:
            raise ValueError("packing: ft trains T5 itself and cannot share it with other runs")
        self.t5, self.runs, self.data = t5, list(runs), data
        self.rank, self.world_size, self.pad_to, self.max_rows = rank, world_size, pad_to, max_rows
        self.device, self.model = device or t5.get_input_embeddings().weight.device, None
        self.amp, self.wrap = amp or nullcontext(), wrap or (lambda packed: packed)
        self.packed = PackedT5(t5, [] if full else [r.module for r in runs])
        self.lengths, self.timings = [len(s) + len(t) for s, t in zip(*data[:2])], {}
        self.rows = [0 if full else len(r.net.prompt().detach()) for r in runs]  # prompt rows

    def step(self, batches=None):
        """One optimizer step of every training run: {run name: its record (docs/packing.md)}."""
        if not (runs := self.training):
            return {}
        ids, n_train, records = [self.runs.index(r) for r in runs], len(self.lengths), {}
        if self.model is None or ids != self.packed.active:  # DDP must see only the live runs
            for r in (r for r in self.runs if r not in runs):
                r.module.requires_grad_(False)
            self.packed.active, self.model = ids, self.wrap(self.packed)
        batches = batches or [train.next_batch(r, n_train, self.lengths) for r in runs]
        for r, batch, (loss, norm, lr, (mu, s)) in zip(runs, batches, self._step(runs, batches)):
            r.advance(len(batch), n_train)
            values = {"loss": loss, "grad_norm": norm, "prompt_norm": mu}
            bad = [k for k, v in values.items() if v is not None and not math.isfinite(v)]
            records[r.name] = {"step": r.step, **values, "ept_s": s, "lr": lr, "epoch": r.epoch,
                               "examples": len(batch), "nonfinite": bad,
                               "tokens": sum(self.lengths[i] for i in batch)}
            r.stopped = "nonfinite" if bad else "done" if r.step >= r.args.max_steps else None
        return records

    def _step(self, runs, batches):
        """Every pass's forward and backward, then train.update on each run's token-mean loss."""
        device, ws, ids = self.device, self.world_size, self.packed.active
        # passes of (slot, example), as many on each rank (DDP): pass m, each run's m-th micro-batch
        groups = [[[(s, i) for i in b[k::ws]] for s, b in enumerate(batches)] for k in range(ws)]
        if self.max_rows:  # or all sorted by length, max_rows a pass: less padding, same gradient
            groups = [[sorted(sum(g, []), key=lambda e: -self.lengths[e[1]])] for g in groups]
        cuts = [self.max_rows] if self.max_rows else [min(
            r.args.micro_batch_size or math.inf, math.ceil(r.args.batch_size / ws)) for r in runs]
        n = max(math.ceil(len(g) / c) for rank in groups for g, c in zip(rank, cuts))
        plan = [[e for g, c in zip(groups[self.rank], cuts) for e in g[m * c:(m + 1) * c]]
                for m in range(n)]
        n_tokens = torch.tensor([sum(len(self.data[1][i]) for i in b) for b in batches],
                                dtype=torch.float32, device=device)
        loss_sums, padded = torch.zeros(len(runs), device=device), 0
        n_max = max(self.rows[i] for i in ids)
        # per slot: its run's seed and step (dropout's keys, as alone), prompt padding rows, run id
        table = torch.tensor([(r.args.seed, r.step, n_max - self.rows[i], i)
                              for r, i in zip(runs, ids)])
        for k, chunk in enumerate(plan):
            weight = 1.0 if chunk else 0.0  # a rank short of examples still joins the all-reduce
            slots, idx = (list(v) for v in zip(*chunk or [(0, batches[0][0])]))
            seeds, steps, offset, run_ids = table[slots].T
            x, mask, labels = (t.to(device) for t in tasks.collate(idx, *self.data, self.pad_to))
            padded += x.numel() + labels.numel()
            if ws > 1:
                self.model.require_backward_grad_sync = k == len(plan) - 1
            with self.amp, M.dropout_keys(M.example_keys(seeds, steps, idx, device), offset):
                logits = self.model(x, mask, run_ids, use_cache=False,
                                    decoder_input_ids=self.t5._shift_right(labels)).logits
            nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                  reduction="none").view(labels.shape).sum(1) * weight  # (B,)
            slots = torch.tensor(slots, device=device)
            # DDP's mean over ranks x world_size: the sum; / tokens: each run's token mean
            (nll * (ws / n_tokens)[slots]).sum().backward()
            loss_sums.index_add_(0, slots, nll.detach())
        if ws > 1:
            torch.distributed.all_reduce(loss_sums)
        t0, stats = time.perf_counter(), train.update(runs, loss_sums / n_tokens)  # token means
        self.timings = {"update_s": time.perf_counter() - t0, "forward_passes": len(plan),
                        "padded_tokens": padded}
        return stats
