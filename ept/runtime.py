"""Where and how the model runs: torchrun ranks; stop signals (last.pt at a step boundary, exit
128 + the signal); T5 and its tokenizer from a folder or the Hub (offline: one sentence)."""
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


def ranks():
    """This process under torchrun (the group joined; safe to call again); first: master_first."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="gloo" if device == "cpu" else "nccl")
    first = functools.partial(master_first, rank=rank, world_size=world_size)
    return SimpleNamespace(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                           master=rank == 0, first=first)


class PeerStopped(cli.Failure):
    """Rank 0 stopped the run and said why; this rank exits 1 without repeating the sentence."""


def master_first(fn, rank, world_size, everyone=False):
    """fn() on rank 0, then on the others (everyone) or its result sent to them. A failure on rank 0
    is its sentence; the others exit quietly (PeerStopped), not hang on a collective it skips."""
    if world_size == 1:
        return fn()
    if rank != 0:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0][0]:  # failed: under torchrun rank 0 exits first, so its summary names rank 0
            time.sleep(2 if os.environ.get("TORCHELASTIC_ERROR_FILE") else 0)
            raise PeerStopped()
        return fn() if everyone else box[0][1]
    failed, result = True, None
    try:
        result, failed = fn(), False
        return result
    finally:  # a failure on rank 0 (its sentence, or a bug's traceback) still answers the others
        dist.broadcast_object_list([(failed, None if everyone or failed else result)], src=0)


def autocast(device, dtype):
    """bf16 autocast when asked, else nothing (fp32 / tf32)."""
    bf16 = dtype == "bf16"
    return torch.autocast(torch.device(device).type, torch.bfloat16) if bf16 else nullcontext()


def set_precision(dtype, device):
    """Apply `dtype` to the process (TF32 switches); returns the forwards' autocast context."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    return autocast(device, dtype)


class Throughput:
    """Examples, tokens and seconds summed over the steady-state steps (after the first `warm`)."""

    def __init__(self, warm):
        self.warm, self.steps, self.sums = warm, 0, (0, 0, 0.0)

    def add(self, examples, tokens, seconds):
        self.steps += 1
        if self.steps > self.warm:
            self.sums = tuple(map(sum, zip(self.sums, (examples, tokens, seconds))))

    def summary(self, device):
        (examples, tokens, time_s), cuda = self.sums, device.startswith("cuda")
        peak_mb = (torch.cuda.max_memory_allocated(device) / 2**20 if cuda
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return {"train_examples_per_s": examples / max(time_s, 1e-9),
                "train_tokens_per_s": tokens / max(time_s, 1e-9), "train_time_s": time_s,
                "timed_steps": max(0, self.steps - self.warm), "peak_memory_mb": peak_mb,
                "peak_memory_kind": "cuda_max_memory_allocated" if cuda else "cpu_max_rss"}


# --- stopping cleanly on a signal ---------------------------------------------------------------

_received, _stopping = [], []  # the signal (read at each step boundary); set once the run stops


@contextmanager
def stop_on_signals():
    """While the loop runs, a stop signal is noted, read at each step boundary; Ctrl-C twice stops
    at once, files whole (main thread only: a thread cannot install a handler)."""
    def note(sig, _):  # once stopping (locks released, files closed) a signal is only noted
        if sig == signal.SIGINT and sig in _received and not _stopping:
            _stopping.append(sig)
            raise KeyboardInterrupt
        _received.append(sig)
    main = threading.current_thread() is threading.main_thread()
    if main:  # a new run: nothing received yet
        del _received[:], _stopping[:]
    with ExitStack() as restore:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT) if main else ():
            restore.callback(signal.signal, sig, signal.signal(sig, note))
        yield


def received():
    """The stop signal of the last run, or None: a driver stops before its next run even so."""
    return _received[0] if _received else None


def stop_requested(ranks):
    """The signal to stop on (or None), agreed by every rank: one may receive it a step later."""
    if ranks.world_size == 1:  # no tensor, no sync with the GPU
        return received()
    sig = torch.tensor([received() or 0], device=ranks.device)
    dist.all_reduce(sig, op=dist.ReduceOp.MAX)
    return int(sig.item()) or None


def stopped(sig, runs):
    """The Failure to raise once the runs wrote last.pt: exit 128 + the signal, rank 0 says why."""
    _stopping.append(sig)
    folders = " ".join(str(run.out_dir) for run in runs)
    return cli.Failure(f"train: {signal.Signals(sig).name} received: stopped at step "
                       f"{min(run.step for run in runs)}, last.pt written in {folders}; run the "
                       f"same command with --resume to continue (exit status {128 + sig})"
                       if int(os.environ.get("RANK", 0)) == 0 else "", status=128 + sig)


def run(main):
    """train.py's main(): Ctrl-C outside the loop, or twice, exits 130 (files whole), after a stop
    or a failure it is ignored; every rank ends the process group."""
    try:
        main()
    except (SystemExit, KeyboardInterrupt) as err:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if isinstance(err, KeyboardInterrupt) and int(os.environ.get("RANK", 0)) == 0:
            print("train: interrupted (Ctrl-C); last.pt, if any, is the last checkpoint, whole: "
                  "run the same command with --resume to continue", file=sys.stderr, flush=True)
        raise err if isinstance(err, SystemExit) else SystemExit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- T5 and its tokenizer: a folder or a Hub name ------------------------------------------------
# Without a network, HF_HUB_OFFLINE=1: the Hub client reads its local cache only, and a name missing
# there fails at once (unset, the client retries for ~25 s first).

FLAGS = {"model": "--model DIR, a local T5 folder",
         "tokenizer": "--tokenizer DIR, a folder with the T5 tokenizer",
         "dataset": "--source DIR, a folder of the official files (docs/data.md)"}
RUN_FIX = ("a run trained on a Hub name needs it in the local Hugging Face cache (HF_HOME): "
           "load it once online")
VOCABULARY = ("tokenizer.json", "spiece.model")


def _cached(what, name):
    """A Hub name whose files are in the local Hugging Face cache (what an offline load reads)."""
    from huggingface_hub import constants, try_to_load_from_cache
    if what != "dataset":
        return any(isinstance(try_to_load_from_cache(name, f), str)
                   for f in (VOCABULARY if what == "tokenizer" else ("config.json",)))
    datasets = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"
    return hub.is_dir() or (datasets / name.replace("/", "___")).is_dir()


def check_offline(model, tokenizer, dataset=None):
    """Offline, before any load: every Hub name neither a folder nor cached, in ONE sentence."""
    from huggingface_hub import constants
    missing = constants.HF_HUB_OFFLINE and [
        f"the {what} {name if what == 'dataset' else repr(name)} (pass {FLAGS[what]})"
        for what, name in (("tokenizer", tokenizer), ("dataset", dataset), ("model", model))
        if name and (what == "dataset" or not local_folder(name, what)) and not _cached(what, name)]
    if missing:
        raise cli.Failure("HF_HUB_OFFLINE is set and these are not in the local cache: "
                          + "; ".join(missing))


def load(what, name, loader, fix=None, folder=None):
    """loader(), the library's many error types at one boundary: a local `folder` that fails is its
    error and `fix`; a Hub `name`, why (offline, unreachable, refused) and `fix` (else the flag)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return loader()
    except Exception as err:
        if folder is not None:
            raise cli.Failure(f"the {what} in {folder} cannot be loaded, its files are damaged, "
                              f"missing or not a T5's ({type(err).__name__}: {_first_line(err)}); "
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
    """The folder `name_or_dir` names, or None for a Hub name. A file, or a missing path that is no
    Hub 'org/name' (absolute, ./, ../, ~, deeper), is one sentence here, not a Hub lookup."""
    path, text = Path(name_or_dir), str(name_or_dir)
    if path.exists() and not path.is_dir():
        raise cli.Failure(f"{name_or_dir} is a file; pass the {what} folder that holds it")
    if not path.exists() and (path.is_absolute() or text.startswith((".", "~"))
                              or text.count("/") > 1):
        raise cli.Failure(f"no {what} folder {name_or_dir} (it does not exist); check the path")
    return path if path.is_dir() else None


def _first_line(err):
    return (str(err).strip().splitlines() or [""])[0][:200]


def load_t5(name_or_dir, random_init=False, seed=0, fix=None):
    """T5 from a folder or the Hub (`random_init`: seeded random weights); `fix`: load's."""
    from transformers import T5Config, T5ForConditionalGeneration as T5, logging
    logging.disable_progress_bar()  # one bar per shard is noise in every log
    folder = local_folder(name_or_dir)
    if folder is not None and not (folder / "config.json").exists():
        raise cli.Failure(f"{name_or_dir} holds no config.json: it is not a T5 model folder")
    if folder is not None:
        files.read_json(folder / "config.json", "model configuration")  # damaged JSON: one sentence
    if random_init:
        torch.manual_seed(seed)  # random weights are reproducible
    build = ((lambda: T5(T5Config.from_pretrained(name_or_dir))) if random_init
             else functools.partial(T5.from_pretrained, name_or_dir))
    return load("model", name_or_dir, build, fix if folder is None else
                "restore the folder (--random-init: random weights from its config)", folder)


def load_tokenizer(name_or_dir, say=print, fix=None):
    """The T5 tokenizer of a Hub name or a folder (one without a vocabulary: its parent's, said)."""
    from transformers import AutoTokenizer
    folder, candidate = local_folder(name_or_dir, "tokenizer"), name_or_dir
    how = "pass --tokenizer DIR with the T5 tokenizer"
    if folder is not None and not any((folder / f).exists() for f in VOCABULARY):
        if not any((folder.parent / f).exists() for f in VOCABULARY):
            raise cli.Failure(f"{name_or_dir} holds no tokenizer (no tokenizer.json or "
                              f"spiece.model); {how}")
        candidate = folder = folder.parent
        say(f"tokenizer: {name_or_dir} holds no vocabulary; using the one in {candidate} "
            "(--tokenizer to choose)")
    tok = load("tokenizer", name_or_dir, lambda: AutoTokenizer.from_pretrained(str(candidate)),
               fix if folder is None else how, folder)
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


def tokenizer_fingerprint(tokenizer):
    """A hash of the tokenizer's whole definition: the key of the tokenization cache."""
    return hashlib.sha1(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:12]


def set_dropout(t5, rate):
    """T5's dropout rate (None: the config's) in nn.Dropout and the float HF's attention keeps."""
    if rate is not None:
        t5.config.dropout_rate = rate
        for module in t5.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = rate
            elif isinstance(getattr(module, "dropout", None), float):
                module.dropout = rate


def check_vocab(tokenizer, t5):
    """A T5 must have an embedding for every token of the tokenizer it will read."""
    if len(tokenizer) > t5.config.vocab_size:
        raise cli.Failure(f"train: the tokenizer has {len(tokenizer)} tokens, the model "
                          f"{t5.config.vocab_size}")
