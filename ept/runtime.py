"""Where and how the model runs: torchrun ranks, precision, stop signals, T5 and its tokenizer."""
import functools
import hashlib
import os
import resource
import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from ept import cli, files

# --dtype on CUDA: tf32 matmuls on tensor cores; bf16 autocast around the forwards, trainable
# parameters and loss in fp32 (speed; T5 overflows in fp16). fp32: the HF Trainer's, our reading.
DTYPES = ("fp32", "tf32", "bf16")
PeerStopped = cli.Failure  # PeerStopped(): rank 0 said why; this rank exits 1 without a word


def ranks():
    """This process under torchrun (the group joined; safe to call again); first: master_first."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="gloo" if device == "cpu" else "nccl")
    first = functools.partial(master_first, rank=rank, world_size=world_size)
    return SimpleNamespace(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                           master=rank == 0, first=first)


def master_first(fn, rank, world_size, everyone=False):
    """fn() on rank 0, then on the others (everyone) or its result sent to them; if rank 0 fails
    (its sentence), the others exit quietly (PeerStopped), not hang on a collective it skips."""
    if world_size == 1:
        return fn()
    box = [(True, None)]  # (failed, result)
    if rank == 0:
        try:
            box = [(False, fn())]
        finally:  # rank 0's failure (its sentence, or a bug's traceback) still answers the others
            dist.broadcast_object_list([(box[0][0], None if everyone else box[0][1])], src=0)
        return box[0][1]
    dist.broadcast_object_list(box, src=0)
    if box[0][0]:  # failed: under torchrun rank 0 exits first, so its summary names rank 0
        time.sleep(2 if os.environ.get("TORCHELASTIC_ERROR_FILE") else 0)
        raise PeerStopped()
    return fn() if everyone else box[0][1]


def autocast(device, dtype):
    """bf16 autocast when asked, else nothing (fp32 / tf32)."""
    bf16 = dtype == "bf16"
    return torch.autocast(torch.device(device).type, torch.bfloat16) if bf16 else nullcontext()


def set_precision(dtype, device):
    """Apply `dtype` to the process (TF32 switches); returns the forwards' autocast context."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    return autocast(device, dtype)


class Throughput:
    """Examples, tokens and seconds of each step, summed over the steady state (after `warm`)."""

    def __init__(self, warm):
        self.warm, self.steps = warm, []

    def add(self, *counts):  # examples, tokens, seconds
        self.steps.append(counts)

    def summary(self, device):
        examples, tokens, time_s = (sum(c) for c in zip((0, 0, 0.0), *self.steps[self.warm:]))
        cuda, span = device.startswith("cuda"), max(time_s, 1e-9)
        return {"train_examples_per_s": examples / span, "train_tokens_per_s": tokens / span,
                "train_time_s": time_s, "timed_steps": max(0, len(self.steps) - self.warm),
                "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_memory_kind": "cuda_max_memory_allocated" if cuda else "cpu_max_rss"}


# --- stopping cleanly: a signal is read at the next step boundary, last.pt, exit 128 + signal ----

_received, _stopping = [], []  # the stop signals noted; set once the run stops


@contextmanager
def stop_on_signals():
    """A stop signal is noted for the next step boundary; Ctrl-C twice stops now, files whole."""
    def note(sig, _):  # once stopping (locks released, files closed) a signal is only noted
        if sig == signal.SIGINT and sig in _received and not _stopping:
            _stopping.append(sig)
            raise KeyboardInterrupt
        _received.append(sig)
    main = threading.current_thread() is threading.main_thread()  # a thread sets no handler
    with ExitStack() as restore:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT) if main else ():
            _received[:] = _stopping[:] = []  # a new run: nothing received yet
            restore.callback(signal.signal, sig, signal.signal(sig, note))
        yield


def stop_requested(ranks=None):
    """The stop signal (or None), agreed by every rank (one may get it a step later); no `ranks`:
    this process's, of its last run (a driver stops before its next run even so)."""
    sig = _received[0] if _received else None
    if ranks is None or ranks.world_size == 1:  # no tensor, no sync with the GPU
        return sig
    sig = torch.tensor([sig or 0], device=ranks.device)
    dist.all_reduce(sig, op=dist.ReduceOp.MAX)
    return int(sig.item()) or None


def stopped(sig, runs):
    """The Failure to raise once the runs wrote last.pt: exit 128 + the signal, rank 0 says why."""
    _stopping.append(sig)
    failure = cli.Failure("" if os.environ.get("RANK", "0") != "0" else
                          f"train: {signal.Signals(sig).name} received: stopped at step "
                          f"{min(r.step for r in runs)}, last.pt written in "
                          f"{' '.join(str(r.out_dir) for r in runs)}; run the same command with "
                          f"--resume to continue (exit status {128 + sig})")
    failure.status = 128 + sig
    return failure


def run(main):
    """train.py's main(): Ctrl-C outside the loop, or twice, exits 130 (files whole), then none."""
    try:
        main()
    except (SystemExit, KeyboardInterrupt) as err:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if isinstance(err, KeyboardInterrupt) and os.environ.get("RANK", "0") == "0":
            print("train: interrupted (Ctrl-C); last.pt, if any, is the last checkpoint, whole: "
                  "run the same command with --resume to continue", file=sys.stderr, flush=True)
        raise err if isinstance(err, SystemExit) else SystemExit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- T5 and its tokenizer: a folder or a Hub name (HF_HUB_OFFLINE=1 without a network: the client
# reads its cache only, and a name missing there fails at once; unset, it retries for ~25 s first)

FLAGS = {"model": "--model DIR, a local T5 folder",
         "tokenizer": "--tokenizer DIR, a folder with the T5 tokenizer",
         "dataset": "--source DIR, a folder of the official files (docs/data.md)"}
NEEDS = {"model": ("config.json",), "tokenizer": ("tokenizer.json", "spiece.model")}


def check_offline(model, tokenizer, dataset=None):
    """Offline, before any load: every Hub name neither a folder nor cached, in ONE sentence."""
    from huggingface_hub import constants as hub, try_to_load_from_cache

    def cached(what, name):  # what an offline load reads
        if what != "dataset":
            return any(isinstance(try_to_load_from_cache(name, f), str) for f in NEEDS[what])
        datasets = Path(os.environ.get("HF_DATASETS_CACHE", Path(hub.HF_HOME) / "datasets"))
        return any(path.is_dir() for path in (datasets / name.replace("/", "___"),  # its library's
                   Path(hub.HF_HUB_CACHE, f"datasets--{name.replace('/', '--')}")))  # Hub files
    missing = hub.HF_HUB_OFFLINE and [
        f"the {what} {name if what == 'dataset' else repr(name)} (pass {FLAGS[what]})"
        for what, name in (("tokenizer", tokenizer), ("dataset", dataset), ("model", model))
        if name and (what == "dataset" or not local_folder(name, what)) and not cached(what, name)]
    if missing:
        raise cli.Failure("HF_HUB_OFFLINE is set and these are not in the local cache: "
                          + "; ".join(missing))


def load(what, name, loader, fix=None, folder=None):
    """loader(); its error as one sentence: a `folder`'s, or why a Hub `name` failed, then `fix`."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return loader()
    except Exception as err:
        if folder is not None:
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise cli.Failure(f"the {what} in {folder} cannot be loaded, its files are damaged, "
                              f"missing or not a T5's ({type(err).__name__}: {first}); "
                              f"{fix}") from None
        cause, offline = err, constants.HF_HUB_OFFLINE
        while cause and not isinstance(cause, (LocalEntryNotFoundError, ConnectionError)):
            cause = cause.__cause__ or cause.__context__  # the client's "no connection, not cached"
        why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if offline else
               "the Hugging Face Hub cannot be reached and it is not in the local cache" if cause
               else f"the Hub has no such name, or refused it ({type(err).__name__})")
        hint = " (without a network, export HF_HUB_OFFLINE=1)" if cause and not offline else ""
        raise cli.Failure(f"could not load the {what} {name!r}: {why}; "
                          f"{fix or 'pass ' + FLAGS[what]}{hint}") from None


def local_folder(name_or_dir, what="model"):
    """The folder named, or None for a Hub name; a file, or a missing path no Hub name could be."""
    path, text = Path(name_or_dir), str(name_or_dir)
    if path.exists() and not path.is_dir():
        raise cli.Failure(f"{name_or_dir} is a file; pass the {what} folder that holds it")
    if not path.exists() and (text[:1] in ("/", ".", "~") or text.count("/") > 1):  # not org/name
        raise cli.Failure(f"no {what} folder {name_or_dir} (it does not exist); check the path")
    return path if path.is_dir() else None


def load_t5(name_or_dir, random_init=False, seed=0, fix=None, dropout=None):
    """T5 from a folder or the Hub (`random_init`: seeded random weights); `fix`: load's;
    `dropout`: its rate (None: the config's), in nn.Dropout and the attention's float alike."""
    from transformers import T5Config, T5ForConditionalGeneration as T5, logging
    logging.disable_progress_bar()  # one bar per shard is noise in every log
    if (folder := local_folder(name_or_dir)) is not None:
        if not (folder / "config.json").exists():
            raise cli.Failure(f"{name_or_dir} holds no config.json: it is not a T5 model folder")
        files.read_json(folder / "config.json", "model configuration")  # damaged JSON: one sentence
        fix = "restore the folder (--random-init: random weights from its config)"
    if random_init:
        torch.manual_seed(seed)  # random weights are reproducible
    rate = {} if dropout is None else {"dropout_rate": dropout}
    return load("model", name_or_dir, (lambda: T5(T5Config.from_pretrained(name_or_dir, **rate)))
                if random_init else functools.partial(T5.from_pretrained, name_or_dir, **rate),
                fix, folder)


def load_tokenizer(name_or_dir, say=print, fix=None):
    """The T5 tokenizer of a Hub name or a folder (one without a vocabulary: its parent's, said)."""
    from transformers import AutoTokenizer
    folder = local_folder(name_or_dir, "tokenizer")
    how = "pass --tokenizer DIR with the T5 tokenizer"
    if folder and not any((folder / f).exists() for f in NEEDS["tokenizer"]):
        if not any(((folder := folder.parent) / f).exists() for f in NEEDS["tokenizer"]):
            raise cli.Failure(f"{name_or_dir} holds no tokenizer (no tokenizer.json or "
                              f"spiece.model); {how}")
        say(f"tokenizer: {name_or_dir} holds no vocabulary; using the one in {folder} "
            "(--tokenizer to choose)")
    tok = load("tokenizer", name_or_dir, lambda: AutoTokenizer.from_pretrained(
        str(folder or name_or_dir)), how if folder else fix, folder)
    for role, token in (("pad_token", "<pad>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
        if getattr(tok, role) is None:  # a bare tokenizer.json names none; T5's are fixed
            setattr(tok, role, token)
    if all(i == tok.unk_token_id for i in tok("the cat sat on the mat")["input_ids"][:-1]):
        raise cli.Failure(f"the tokenizer from {name_or_dir!r} maps plain English to <unk>; {how}")
    return tok


def t5_fingerprint(t5):
    """A cheap hash of the frozen weights: evaluate.py checks it rebuilt the T5 train.py used."""
    h = hashlib.sha1()
    for name, p in sorted(t5.state_dict().items()):  # the name, then the first 256 values
        h.update(name.encode() + p.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]

