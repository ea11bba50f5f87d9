"""Train one method on one task: the paper's loop (docs/paper.md, "Training"), CPU, one GPU or many.
Writes the run folder: config.json, log.jsonl, best.pt, last.pt, prompt.pt (the best checkpoint's
folded P') and metrics.json. SIGTERM/SIGUSR1/Ctrl-C: last.pt, exit 143/138/130; then --resume.

    python train.py --method ept                  # EPT on RTE, t5-base: the paper's setting
    torchrun --standalone --nproc_per_node=4 train.py --task boolq --method ept_star  # 4 GPUs
    python train.py --method pt ept --seed 0 1  # a pack: 4 prompt runs on one T5 (ept/pack.py)
    python train.py --method ept --model ../shared/data/t5/t5-small --random-init --max-steps 30 \\
        --tokenizer ../shared/data/t5 --eval-every 30 --max-eval-examples 32  # a CPU smoke run
"""
import math
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

import model as M
from ept import cli, evaluation, files, options, runfolder, runtime, tasks

options.parser.description = __doc__  # the flags live in ept/options.py: the drivers plan by them


@cli.script
def main(argv=None):
    """Flags; setup; the run folder; data; model; train; finish. Several runs: ept/pack.py."""
    ranks = runtime.ranks()  # DDP: the process group joined; ranks.first: rank 0 checks first
    args = ranks.first(lambda: options.parser.parse_args(argv), everyone=True)  # usage: rank 0's
    runs_file, max_rows = vars(args).pop("runs"), vars(args).pop("pack_max_rows")  # not a run's
    if runs_file or any(isinstance(getattr(args, k), list) for k in options.SWEEP):
        from ept import pack
        return pack.main(args, ranks, max_rows, runs_file)
    args = options.resolve(args)  # the method's defaults
    args.out_dir = args.out_dir or str(Path("runs") / options.run_name(vars(args)))
    ranks.first(lambda: check(args, args.out_dir))
    say, out_dir, held = print if ranks.master else (lambda *a, **k: None), Path(args.out_dir), []
    with runtime.stop_on_signals(), runfolder.cleanup([out_dir], held, ranks.master):
        resume_path = ranks.first(lambda: runfolder.open_folder(args, out_dir, held, say))
        if resume_path == "finished":
            return {"out_dir": str(out_dir), "finished": True}
        task = ranks.first(lambda: tasks.load_task(args, ranks, say), everyone=True)
        t5 = ranks.first(lambda: load_t5(args, task, ranks), everyone=True)
        run = ranks.first(lambda: Run(t5, args, task, ranks, out_dir=out_dir,
                                      resume_path=resume_path), everyone=True)
        run.log = ranks.first(lambda: runfolder.start_log(run, task, ranks, say), everyone=True)
        return train(run, task, wrap(run.net, args, ranks), ranks, say)


def check(args, out_dir=None):
    """One sentence before anything loads: offline, every Hub-bound input missing; a bad folder."""
    runtime.local_folder(args.model)  # a mistyped --model path is named as the model's
    prepared = (Path(args.data_dir) / args.task / "meta.json").exists()
    hub_id = None if prepared or args.source else tasks.TASKS.get(args.task)
    runtime.check_offline(args.model, args.tokenizer or args.model, hub_id or None)
    if out_dir and (problem := cli.run_folder_problem(out_dir)):
        raise cli.Failure(f"train: --out-dir {problem}")


def train(run, task, model, ranks, say):
    """The loop: validate/save when due; stop at max_steps or on a signal; else one step, logged."""
    args, n_train = run.args, len(task.data[0])
    lengths = [len(s) + len(t) for s, t in zip(*task.data[:2])]  # tokens/s, --group-by-length
    amp = runtime.set_precision(args.dtype, ranks.device)
    meter = runtime.Throughput(warm=2 if args.max_steps - run.step >= 10 else 0)
    with tqdm(total=args.max_steps, initial=run.step, desc=run.out_dir.name, dynamic_ncols=True,
              **({} if ranks.master else {"disable": True})) as bar:  # TQDM_DISABLE=1 still works
        while True:
            if not validate_and_save(run, task, ranks):
                raise nonfinite_stop(run, ["weights"], run.scheduler.get_last_lr()[0], ranks.master)
            if run.step == args.max_steps:
                break
            if sig := runtime.stop_requested(ranks):  # preempted or cancelled: last.pt, then exit
                if runfolder.weights_finite(run.params):  # never a NaN/inf state on disk
                    runfolder.save_checkpoint(run, ranks, "last.pt")
                raise runtime.stopped(sig, [run])
            batch, t0 = next_batch(run, n_train, lengths), time.time()
            record = train_step(model, run, batch, task.data, amp, ranks)
            seconds, tokens = time.time() - t0, sum(lengths[i] for i in batch)
            run.advance(len(batch), n_train)
            meter.add(len(batch), tokens, seconds)
            run.log(train_event(run, record, len(batch), tokens, seconds))
            if bad := [k for k in ("loss", "grad_norm", "prompt_norm")
                       if record[k] is not None and not math.isfinite(record[k])]:
                raise nonfinite_stop(run, bad, record["lr"], ranks.master)
            mu = record["prompt_norm"]
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", norm="-" if mu is None else f"{mu:.3g}")
    return finish(run, task, ranks, say, meter)


def train_step(model, run, batch, data, amp, ranks):
    """One optimizer step of `run` through `model` (net, DDP, compiled): the token-mean NLL."""
    rank, ws, device = ranks.rank, ranks.world_size, ranks.device
    n_tokens = sum(len(data[1][i]) for i in batch)  # target tokens: every rank holds the data
    shard, micro = batch[rank::ws], run.args.micro_batch_size  # this rank's, in micro-batches
    n_micro, loss_sum = math.ceil(len(batch[::ws]) / micro), torch.zeros((), device=device)
    for m in range(n_micro):
        idx = shard[m * micro:(m + 1) * micro]
        weight = 1.0 if idx else 0.0  # a rank short of examples still joins DDP's all-reduce
        input_ids, mask, labels = (t.to(device) for t in tasks.collate(idx or batch[:1], *data))
        if ws > 1:
            model.require_backward_grad_sync = m == n_micro - 1  # n_micro: rank 0's, on all ranks
        with amp, M.dropout_keys(M.example_keys(run.args.seed, run.step, idx or batch[:1], device)):
            logits = model(input_ids, mask, decoder_input_ids=run.net.t5._shift_right(labels),
                           use_cache=False).logits  # the prompt prepended (PromptedT5.embed)
        nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                                ignore_index=-100, reduction="sum") * weight
        (nll * (ws / n_tokens)).backward()  # DDP's mean over ranks: the batch's token mean
        loss_sum += nll.detach()
    if ws > 1:
        torch.distributed.all_reduce(loss_sum)
    [(loss, grad_norm, lr, (mu, s))] = update([run], (loss_sum / n_tokens)[None])
    return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "prompt_norm": mu, "ept_s": s}


def update(runs, losses):
    """Clip, AdamW, schedule (not if non-finite), one sync: [(loss, norm, lr, (mu_t, s_t))]."""
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
    """mu_t (Eq. 4: P's mean row norm) and, for EPT, s_t: W_down P1 (h = 1), else its norm."""
    if module is None:
        return None, None
    values = [module().float().norm(dim=1).mean()]
    if isinstance(module, M.EPT):
        hidden = module.blocks[0].down(module.prompt).float().flatten()
        values.append(hidden[0] if hidden.numel() == 1 else hidden.norm())
    return (*torch.stack(values).tolist(), None)[:2]


def train_event(run, record, examples, tokens, seconds):
    kept = {k: record[k] for k in ("loss", "lr", "grad_norm", "prompt_norm", "ept_s")
            if k != "ept_s" or record[k] is not None}
    return {"event": "train", "step": run.step, **kept, "epoch": run.epoch,
            "examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds}


class Run:
    """One run: options, PromptedT5 (`net`), AdamW + schedule, data position, best; or last.pt's."""
    module = property(lambda self: self.net.trainable)  # what trains: prompt module, or T5 (ft)
    params = property(lambda self: [p for g in self.optimizer.param_groups for p in g["params"]])

    def __init__(self, t5, args, task=None, ranks=None, *, out_dir=None, resume_path=None,
                 name=None, fused=None):
        label_ids = task and task.label_ids
        if task is not None:  # batch_plan fills args: steps per epoch, micro-batch
            options.batch_plan(args, len(task.data[0]), ranks.world_size)
            if args.init == "label" and label_ids is None:
                raise cli.Failure(f"train: --init label needs a task with a label set; {args.task} "
                                  "has none")
        torch.manual_seed(args.seed)  # one stream, as the public EPT code: P, then the layers
        module = M.build_prompt_module(args.method, t5.config.d_model, init=args.init,
                                       **M.prompt_options(vars(args)), label_ids=label_ids,
                                       embedding=t5.get_input_embeddings().weight)
        self.net = M.PromptedT5(t5, None if module is None else module.to(t5.device))  # ft: T5
        self.optimizer, self.scheduler = make_optimizer(
            [p for p in self.net.trainable.parameters() if p.requires_grad], args, fused)
        self.args, self.name, self.out_dir = args, name or str(out_dir), out_dir
        self.resumed = resume_path is not None
        self.step = self.epoch = self.index = self.start_step = 0  # start_step: started/resumed at
        self.best_score, self.best_step, self.order = -math.inf, None, (None, None)  # (epoch, ids)
        self.stopped = self.lock = self.log = self.config = None  # stopped: a pack's, once it left
        if self.resumed:
            runfolder.resume(self, resume_path, ranks)

    def advance(self, n_examples, n_train):
        self.step, self.index = self.step + 1, self.index + n_examples
        if self.index >= n_train:
            self.epoch, self.index = self.epoch + 1, 0

    def state(self):
        """last.pt / best.pt (weights_only); no RNG: dropout, data order: (seed, step, example)."""
        return {"step": self.step,
                "trainable": {k: v.detach().clone() for k, v in self.module.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "data": {"epoch": self.epoch, "index": self.index},
                "best_score": self.best_score, "best_step": self.best_step}

    def load_state(self, state):
        self.module.load_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = self.start_step = state["step"]
        self.best_score, self.best_step = state["best_score"], state["best_step"]
        self.epoch, self.index = state["data"]["epoch"], state["data"]["index"]


def next_batch(run, n_train, lengths=None):
    """The next global batch: [index:index + batch_size] of its epoch's order (seed, epoch)."""
    if run.order[0] != run.epoch:
        run.order = (run.epoch, tasks.epoch_order(n_train, run.args.seed, run.epoch,
                     run.args.batch_size, lengths if run.args.group_by_length else None))
    return run.order[1][run.index:run.index + run.args.batch_size].tolist()


def make_optimizer(params, args, fused=None):
    """AdamW (no decay on biases/norms; fused on CUDA), linear warm-up and decay: HF Trainer's."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, fused=(
        params[0].device.type == "cuda" if fused is None else fused))
    return optimizer, get_linear_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)


def load_t5(args, task, ranks):
    """The frozen T5, its dropout on as under the HF Trainer (docs/paper.md) and stateless."""
    t5 = runtime.load_t5(args.model, args.random_init, args.seed, dropout=args.dropout)
    if len(task.tokenizer) > t5.config.vocab_size:  # every token it will read needs an embedding
        raise cli.Failure(f"train: the tokenizer has {len(task.tokenizer)} tokens, the model "
                          f"{t5.config.vocab_size}")
    return M.stateless_dropout(t5).to(ranks.device).train()


def wrap(net, args, ranks):
    """What runs the forward: `net`, compiled (--compile), under DDP (T5's buffers never change)."""
    net = torch.compile(net) if args.compile else net
    return net if ranks.world_size == 1 else DDP(net, forward_sync_buffers=False, device_ids=(
        [ranks.local_rank] if ranks.device.startswith("cuda") else None))


def validate_and_save(run, task, ranks):
    """When due, validate (best.pt if improved) and save last.pt. False: weights not finite."""
    args, due = run.args, run.step > run.start_step  # not at the step it started or resumed at
    evaluate = due and (run.step % args.eval_every == 0 or run.step == args.max_steps)
    save = evaluate or due and run.step % (args.save_every or args.eval_every) == 0
    if not save or not runfolder.weights_finite(run.params):
        return not save  # nothing due: True; due but the weights are not finite: False
    if evaluate:
        t0 = time.time()
        scores = evaluation.score_split(run.net, task.tokenizer, task.meta, *task.val, ranks, args)
        run.log({"event": "eval", "step": run.step, "split": "validation", **scores, "eval_time_s":
                 (s := time.time() - t0), "eval_examples_per_s": len(task.val[0]) / max(s, 1e-9)})
    if improved := evaluate and scores["score"] > run.best_score:
        run.best_score, run.best_step = scores["score"], run.step
    runfolder.save_checkpoint(run, ranks, *(["best.pt"] if improved else []), "last.pt")
    return True


def nonfinite_stop(run, what, lr, master=True):
    """The error for a NaN/inf: logged, in failed.txt (rank 0); the other ranks: quiet exit 1."""
    run.log({"event": "nonfinite", "step": run.step, "what": what})
    kept = (f"best.pt (step {run.best_step}) and log.jsonl in {run.out_dir} are intact"
            if run.best_step else f"no checkpoint was saved; log.jsonl in {run.out_dir} records it")
    err = cli.Failure(f"train: non-finite {' and '.join(what)} at step {run.step} (lr {lr:g}); "
                      f"stopped. {kept}")
    if master:
        files.write_text(run.out_dir / runfolder.FAILED_NAME, f"{err}\n")
    return err if master else runtime.PeerStopped()


@torch.no_grad()
def finish(run, task, ranks, say, meter):
    """The end: best.pt folded into P' (prompt.pt), the test split scored with P' alone."""
    args, out_dir, trained, t = run.args, run.out_dir, run.net, meter.summary(ranks.device)
    ranks.first(lambda: None)  # a barrier: rank 0 wrote best.pt
    trained.trainable.load_state_dict(files.load_torch(out_dir / "best.pt")["trainable"])
    prompt = trained.prompt()
    net = trained if prompt is None else M.PromptedT5(trained.t5, M.FoldedPrompt(prompt.float()))
    if prompt is not None and ranks.master:  # P' alone, fp32: it loads with weights_only=True
        meta = dict(task=args.task, method=args.method, step=run.best_step, score=run.best_score)
        saved = {"prompt": prompt.detach().float().cpu().contiguous(), "meta": meta}
        files.save_torch(out_dir / "prompt.pt", saved)
    test = None if args.no_test else {
        "task": args.task, "split": "test", "mode": args.eval_mode, "checkpoint": "best",
        "best_step": run.best_step, "validation_score": run.best_score,
        **evaluation.score_split(net, task.tokenizer, task.meta, *task.test, ranks, args)}
    if test and ranks.master:
        files.write_json(out_dir / "metrics.json", test)
    run.log({"event": "end", "step": run.step, **t, "best_step": run.best_step,
             "best_score": run.best_score, "test_score": test["score"] if test else None})
    say(f"train: done {out_dir.name}: best validation {run.best_score:.2f} at step {run.best_step}"
        + (f", test {test['score']:.2f}" if test else "") + f"; {t['train_examples_per_s']:.1f} "
        f"examples/s, {t['train_tokens_per_s']:.0f} tokens/s, peak {t['peak_memory_mb']:.0f} MiB")
    return {"out_dir": str(out_dir), "best_step": run.best_step, "best_score": run.best_score,
            "metrics": test, "throughput": t, "config": run.config, "model": trained}


if __name__ == "__main__":
    runtime.run(main)  # Ctrl-C outside the loop: exit 130, files whole; the process group ended
