"""Train one method on one task: the paper's loop (docs/paper.md, "Training"), CPU, one GPU or many.

Reads data/<task>/ (prepare_data.py; prepared on first use when missing) and a T5 (Hub name or local
folder). Writes the run folder (ept/runfolder.py): config.json, log.jsonl (each step's loss, lr,
grad norm, mu_t of Eq. 4 and throughput; each validation; the end), best.pt and last.pt, prompt.pt
(the best checkpoint's folded P') and metrics.json (its test metrics).

    python train.py --method ept                  # EPT on RTE, t5-base: the paper's setting
    torchrun --standalone --nproc_per_node=4 train.py --task boolq --method ept_star  # 4 GPUs
    python train.py --task rte --method ept --dtype bf16   # bf16 autocast: not our fp32 reading
    python train.py --task rte --method ept --resume        # continue a killed run from its last.pt
    # SIGTERM / SIGUSR1 / Ctrl-C: last.pt at the next step boundary, exit 143 / 138 / 130
    # a pack: 3 x 3 x 2 = 18 prompt runs sharing one T5, a folder each under runs/ (ept/pack.py)
    python train.py --task rte --method pt ept ept_star --seed 0 1 2 --lr 0.3 0.1
    # CPU smoke run: random-weight t5-small from the real config, 30 steps
    python train.py --method ept --model ../shared/data/t5/t5-small --random-init \\
        --tokenizer ../shared/data/t5 --max-steps 30 --eval-every 30 --max-eval-examples 32
"""
import contextlib
import io
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import model as M
from ept import cli, evaluation, files, options, runfolder, runtime, tasks

options.parser.description = __doc__  # the flags live in ept/options.py: the drivers plan by them


class NonFiniteError(cli.Failure):
    """A NaN/inf loss, gradient, prompt or weight: the run stops (exit 1), best.pt and log whole."""


@cli.script
def main(argv=None):
    """Flags; setup; the run folder; data; model; train; finish. Several runs: ept/pack.py."""
    rank = int(os.environ.get("RANK", 0))
    with contextlib.redirect_stderr(io.StringIO()) if rank else contextlib.nullcontext():
        args = options.parser.parse_args(argv)  # a usage error: rank 0's message only
    runs_file, max_rows = vars(args).pop("runs"), vars(args).pop("pack_max_rows")  # not a run's
    ranks = runtime.ranks()  # DDP: the process group joined; ranks.first: rank 0 checks first
    specs = runs_file is None and ranks.first(lambda: options.sweep(args), everyone=True)
    if not specs or len(specs) > 1:  # several runs, or --runs FILE: a pack
        sys.modules.setdefault("train", sys.modules[__name__])  # one copy of this module
        from ept import pack
        return pack.main(args, specs, ranks, max_rows, runs_file)
    ranks.first(lambda: check_offline(args))  # offline: all that is missing in one sentence
    args = ranks.first(lambda: options.resolve_runs(args, specs, False)[0], everyone=True)
    say = print if ranks.master else (lambda *a, **k: None)
    out_dir, held = Path(args.out_dir), []
    with runtime.stop_on_signals(), runfolder.cleanup([out_dir], held, ranks.master):
        resume_path = ranks.first(lambda: runfolder.open_folder(args, out_dir, held, say))
        if resume_path == "finished":
            return {"out_dir": str(out_dir), "finished": True}
        task = ranks.first(lambda: tasks.load_task(args, ranks, say), everyone=True)
        t5 = ranks.first(lambda: load_t5(args, task, ranks), everyone=True)
        run = ranks.first(lambda: new_run(t5, args, task, ranks, out_dir=out_dir,
                                          resume_path=resume_path), everyone=True)
        held.append(run)
        run.log = ranks.first(lambda: runfolder.start_log(run, task, ranks, say), everyone=True)
        return train(run, task, wrap(run.net, args, ranks), ranks, say)


def check_offline(args):
    """Every Hub-bound input (tokenizer, data, model) checked before the first loads."""
    runtime.local_folder(args.model)  # a mistyped --model path is named as the model's
    prepared = (Path(args.data_dir) / args.task / "meta.json").exists()
    hub_id = None if prepared or args.source else tasks.TASKS.get(args.task)
    runtime.check_offline(args.model, args.tokenizer or args.model, hub_id or None)


def train(run, task, model, ranks, say):
    """The loop: at the top of each step validate and save when due; at max_steps finish; on a stop
    signal write last.pt and exit; else one optimizer step (train_step) and its log line."""
    args, n_train = run.args, len(task.data[0])
    lengths = [len(s) + len(t) for s, t in zip(*task.data[:2])]  # tokens/s, --group-by-length
    amp = runtime.set_precision(args.dtype, ranks.device)
    meter = runtime.Throughput(warm=2 if args.max_steps - run.step >= 10 else 0)
    bar = tqdm(total=args.max_steps, initial=run.step, desc=run.out_dir.name, dynamic_ncols=True,
               **({} if ranks.master else {"disable": True}))  # TQDM_DISABLE=1 still works
    while True:
        if not validate_and_save(run, task, ranks, bar):
            raise nonfinite_stop(run, ["weights"], run.scheduler.get_last_lr()[0], ranks.master)
        if run.step == args.max_steps:
            break
        if sig := runtime.stop_requested(ranks):  # preempted or cancelled: last.pt, then exit
            if runfolder.weights_finite(run.params):  # never a NaN/inf state on disk
                runfolder.save_checkpoint(run, ranks, "last.pt")
            raise runtime.stopped(sig, [run])
        batch = next_batch(run, n_train, lengths)
        t0 = time.time()
        record = train_step(model, run, batch, task.data, amp, ranks)
        seconds = time.time() - t0
        run.advance(len(batch), n_train)
        tokens = sum(lengths[i] for i in batch)
        meter.add(len(batch), tokens, seconds)
        run.log(train_event(run, record, len(batch), tokens, seconds))
        if bad := [k for k in ("loss", "grad_norm", "prompt_norm")
                   if record[k] is not None and not math.isfinite(record[k])]:
            raise nonfinite_stop(run, bad, record["lr"], ranks.master)
        bar.update(1)
        mu = record["prompt_norm"]
        bar.set_postfix(loss=f"{record['loss']:.4f}", norm="-" if mu is None else f"{mu:.3g}")
    bar.close()
    return finish(run, task, ranks, say, meter)


def train_step(model, run, batch, data, amp, ranks):
    """One optimizer step of `run` on the global `batch` (indices into `data`) through `model`
    (run.net, or DDP / torch.compile around it): the token-mean NLL over the whole batch."""
    rank, ws, device = ranks.rank, ranks.world_size, ranks.device
    n_tokens = sum(len(data[1][i]) for i in batch)  # target tokens: every rank holds the data
    shard, micro = batch[rank::ws], run.args.micro_batch_size  # this rank's, in micro-batches
    n_micro = math.ceil(math.ceil(len(batch) / ws) / micro)  # the same on every rank
    loss_sum = torch.zeros((), device=device)
    for m in range(n_micro):
        idx = shard[m * micro:(m + 1) * micro]
        weight = 1.0 if idx else 0.0  # a rank short of examples still joins DDP's all-reduce
        input_ids, mask, labels = (t.to(device) for t in tasks.collate(idx or batch[:1], *data))
        if ws > 1:
            model.require_backward_grad_sync = m == n_micro - 1
        keys = M.example_keys(run.args.seed, run.step, idx or batch[:1], device)  # dropout's
        with amp, M.dropout_keys(keys):  # forward with the prompt prepended (PromptedT5.embed)
            logits = model(input_ids, mask, decoder_input_ids=run.net.t5._shift_right(labels),
                           use_cache=False).logits
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                              reduction="sum") * weight
        (nll * (ws / n_tokens)).backward()  # DDP's mean over ranks: the batch's token mean
        loss_sum += nll.detach()
    if ws > 1:
        dist.all_reduce(loss_sum)
    [(loss, grad_norm, lr, (mu, s))] = update([run], (loss_sum / n_tokens)[None])
    return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "prompt_norm": mu, "ept_s": s}


def update(runs, losses):
    """Each run's clip, AdamW and schedule step (skipped for a non-finite loss or gradient norm),
    one host sync for all (a pack's runs too): [(loss, grad norm, lr of this step, (mu_t, s_t))]."""
    grad_norms = torch.stack([torch.nn.utils.clip_grad_norm_(r.params, r.args.max_grad_norm
                                                             or math.inf).float() for r in runs])
    losses, norms = torch.stack([losses, grad_norms.to(losses.device)]).tolist()
    lrs = [r.scheduler.get_last_lr()[0] for r in runs]
    for r, loss, norm in zip(runs, losses, norms):
        if math.isfinite(loss) and math.isfinite(norm):
            r.optimizer.step()
            r.scheduler.step()
        r.optimizer.zero_grad(set_to_none=True)
    return list(zip(losses, norms, lrs, [prompt_stats(r.net.prompt_module) for r in runs]))


@torch.no_grad()
def prompt_stats(module):
    """(mu_t, s_t): mu_t (Eq. 4) the mean row norm of P'; s_t, for EPT and EPT*, the first block's
    hidden activation W_down P1, or its norm for h > 1. One host sync."""
    if module is None:
        return None, None
    values = [module().float().norm(dim=1).mean()]
    if isinstance(module, M.EPT):
        hidden = module.blocks[0].down(module.prompt).float().flatten()
        values.append(hidden[0] if hidden.numel() == 1 else hidden.norm())
    return (*torch.stack(values).tolist(), None)[:2]


def train_event(run, record, examples, tokens, seconds):
    """A step's log line: loss, lr, grad norm, mu_t (s_t for EPT), epoch and throughput."""
    kept = {k: record[k] for k in ("loss", "lr", "grad_norm", "prompt_norm", "ept_s")
            if k != "ept_s" or record[k] is not None}
    return {"event": "train", "step": run.step, **kept, "epoch": run.epoch,
            "examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds}


# --- the run: its model, AdamW and schedule, data position ----------------------------------------

class Run:
    """One run: its resolved options, PromptedT5 (`net`), AdamW + schedule, data position, best."""
    module = property(lambda self: self.net.trainable)  # what trains: prompt module, or T5 (ft)
    # the trainable parameters in the optimizer's order (what is clipped)
    params = property(lambda self: [p for g in self.optimizer.param_groups for p in g["params"]])

    def __init__(self, args, net, optimizer, scheduler, name="", out_dir=None, resumed=False):
        self.args, self.net, self.optimizer, self.scheduler = args, net, optimizer, scheduler
        self.name, self.out_dir, self.resumed = name, out_dir, resumed
        self.step = self.epoch = self.index = self.start_step = 0  # start_step: started/resumed at
        self.best_score, self.best_step, self.order = -math.inf, None, (None, None)  # (epoch, ids)
        self.stopped = self.lock = self.log = self.config = None  # stopped: a pack's, once it left

    def advance(self, n_examples, n_train):
        self.step, self.index = self.step + 1, self.index + n_examples
        if self.index >= n_train:
            self.epoch, self.index = self.epoch + 1, 0

    def state(self):
        """last.pt / best.pt (runfolder.CHECKPOINT_KEYS; weights_only-loadable). No RNG state:
        dropout masks and the data order are functions of (seed, step, example)."""
        return {"step": self.step,
                "trainable": {k: v.detach().clone() for k, v in self.module.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "data": {"epoch": self.epoch, "index": self.index},
                "best_score": self.best_score, "best_step": self.best_step}

    def load_state(self, state):
        """Continue from a checkpoint of this run (written alone or in a pack)."""
        self.module.load_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = self.start_step = state["step"]
        self.best_score, self.best_step = state["best_score"], state["best_step"]
        self.epoch, self.index = state["data"]["epoch"], state["data"]["index"]


def next_batch(run, n_train, lengths=None):
    """The next global batch: [index:index + batch_size] of its epoch's order (seed, epoch)."""
    args = run.args
    if run.order[0] != run.epoch:
        run.order = (run.epoch, tasks.epoch_order(n_train, args.seed, run.epoch, args.batch_size,
                                                  lengths if args.group_by_length else None))
    return run.order[1][run.index:run.index + args.batch_size].tolist()


def make_optimizer(params, args, fused=None):
    """AdamW (weight decay not on biases/norms, as the HF Trainer; fused on CUDA) and HF's
    get_linear_schedule_with_warmup: linear warm-up over --warmup-steps, then linear decay to 0."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, fused=(
        params[0].device.type == "cuda" if fused is None else fused))
    warmup, total = args.warmup_steps, args.max_steps
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (
        s / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))))


def new_run(t5, args, task=None, ranks=None, *, out_dir=None, resume_path=None, label_ids=None,
            name=None, fused=None):
    """A Run of `args` on the shared T5: its prompt module seeded by --seed, AdamW and schedule,
    resumed from `resume_path` (last.pt); with `task`, options.batch_plan fills args."""
    if task is not None:
        options.batch_plan(args, len(task.data[0]), ranks.world_size)
        label_ids = task.label_ids
        if args.init == "label" and label_ids is None:
            raise cli.Failure(f"train: --init label needs a task with a label set; {args.task} "
                              "has none")
    # one stream in sequence, as the public EPT code: P first, then the layers (independent)
    torch.manual_seed(args.seed)
    module = M.build_prompt_module(args.method, t5.config.d_model, **M.prompt_options(vars(args)),
                                   init=args.init, embedding=t5.get_input_embeddings().weight,
                                   label_ids=label_ids)
    net = M.PromptedT5(t5, None if module is None else module.to(t5.device))  # ft: T5 trains
    trainable = [p for p in net.trainable.parameters() if p.requires_grad]
    run = Run(args, net, *make_optimizer(trainable, args, fused), name=name or str(out_dir),
              out_dir=out_dir, resumed=resume_path is not None)
    if resume_path is not None:
        runfolder.resume(run, resume_path, ranks)
    return run


def load_t5(args, task, ranks):
    """The frozen T5, its dropout on as under the HF Trainer (docs/paper.md) and stateless."""
    t5 = runtime.load_t5(args.model, random_init=args.random_init, seed=args.seed)
    runtime.check_vocab(task.tokenizer, t5)
    runtime.set_dropout(t5, args.dropout)
    return M.stateless_dropout(t5).to(ranks.device).train()


def wrap(net, args, ranks):
    """What runs the forward: `net`, compiled (--compile), under DDP (T5's buffers never change)."""
    net = torch.compile(net) if args.compile else net
    return net if ranks.world_size == 1 else DDP(net, forward_sync_buffers=False, device_ids=(
        [ranks.local_rank] if ranks.device.startswith("cuda") else None))


# --- validation, checkpoints, the end -------------------------------------------------------------

def validate_and_save(run, task, ranks, bar=None):
    """The top of a step: validate (then best.pt if improved, last.pt) every --eval-every steps and
    at the last, or last.pt every --save-every steps. False: weights not finite (nothing saved)."""
    args = run.args
    due = run.step > run.start_step or (run.step > 0 and not run.resumed)
    evaluate = due and (run.step % args.eval_every == 0 or run.step == args.max_steps)
    if not (evaluate or due and run.step % (args.save_every or args.eval_every) == 0):
        return True
    if not runfolder.weights_finite(run.params):
        return False
    improved = False
    if evaluate:
        t0 = time.time()
        scores = evaluation.score_split(run.net, task.tokenizer, task.meta, *task.val, ranks, args)
        seconds = time.time() - t0
        run.log({"event": "eval", "step": run.step, "split": "validation", **scores, "eval_time_s":
                 seconds, "eval_examples_per_s": len(task.val[0]) / max(seconds, 1e-9)})
        if bar is not None:
            bar.set_postfix(score=f"{scores['score']:.2f}")
        if improved := scores["score"] > run.best_score:
            run.best_score, run.best_step = scores["score"], run.step
    runfolder.save_checkpoint(run, ranks, *(["best.pt"] if improved else []), "last.pt")
    return True


def nonfinite_stop(run, what, lr, master=True):
    """Log the "nonfinite" event of a run that must stop and say why in its failed.txt (rank 0);
    returns the error to raise: the sentence on rank 0, a quiet exit 1 on the others."""
    run.log({"event": "nonfinite", "step": run.step, "what": what})
    kept = (f"best.pt (step {run.best_step}) and log.jsonl in {run.out_dir} are intact"
            if run.best_step else f"no checkpoint was saved; log.jsonl in {run.out_dir} records it")
    err = NonFiniteError(f"train: non-finite {' and '.join(what)} at step {run.step} (lr {lr:g}); "
                         f"stopped. {kept}")
    if master:
        files.write_text(run.out_dir / runfolder.FAILED_NAME, f"{err}\n")
    return err if master else runtime.PeerStopped()


@torch.no_grad()
def finish(run, task, ranks, say, meter):
    """The end: best.pt folded into P' (prompt.pt), the test split scored with P' alone."""
    args, out_dir, trained = run.args, run.out_dir, run.net
    t = meter.summary(ranks.device)
    if ranks.world_size > 1:
        dist.barrier()  # best.pt is complete on disk
    trained.trainable.load_state_dict(files.load_torch(out_dir / "best.pt")["trainable"])
    prompt = trained.prompt()
    net = trained if prompt is None else M.PromptedT5(trained.t5, M.FoldedPrompt(prompt.float()))
    if prompt is not None and ranks.master:
        M.save_folded_prompt(out_dir / "prompt.pt", prompt, dict(
            task=args.task, method=args.method, step=run.best_step, score=run.best_score))
    test = None
    if not args.no_test:
        scores = evaluation.score_split(net, task.tokenizer, task.meta, *task.test, ranks, args)
        test = {"task": args.task, "split": "test", "mode": args.eval_mode, "checkpoint": "best",
                "best_step": run.best_step, "validation_score": run.best_score, **scores}
        if ranks.master:
            files.write_json(out_dir / "metrics.json", test)
    run.log({"event": "end", "step": run.step, **t, "best_step": run.best_step,
             "best_score": run.best_score, "test_score": test["score"] if test else None})
    say(f"train: done {out_dir.name}: best validation {run.best_score:.2f} at step {run.best_step}"
        + (f", test {test['score']:.2f}" if test else "")
        + f"; {t['train_examples_per_s']:.1f} examples/s, {t['train_tokens_per_s']:.0f} tokens/s, "
        f"peak memory {t['peak_memory_mb']:.0f} MiB ({t['peak_memory_kind']})")
    return {"out_dir": str(out_dir), "best_step": run.best_step, "best_score": run.best_score,
            "metrics": test, "throughput": t, "config": run.config, "model": trained}


if __name__ == "__main__":
    runtime.run(main)  # Ctrl-C outside the loop: exit 130, files whole; the process group ended
