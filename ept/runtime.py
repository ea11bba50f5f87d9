"""Where and how the model runs: T5 and its tokenizer (a Hub name or a folder; one sentence when
either cannot be loaded), the ranks of a torchrun group (stopped together on a signal: SIGTERM,
SIGUSR1, Ctrl-C; last.pt at the next step boundary, then exit), and the precision (--dtype):
    fp32  our reading (the paper names none; the HF Trainer's: fp32, TF32 off as PyTorch leaves it)
    tf32  fp32 weights and activations, matmuls on TF32 tensor cores (CUDA; on a CPU it is fp32)
    bf16  bf16 autocast around the forwards, trainable parameters and loss in fp32 (CUDA; T5
          overflows in fp16). A speed option, not the paper's setting."""
import functools
import hashlib
import os
import resource
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from ept import cli, files

DTYPES = ("fp32", "tf32", "bf16")


def ranks():
    """This process's place under torchrun (the group joined; safe to call again): rank, local_rank,
    world_size, device, master, and first(check, everyone=False): master_first on these ranks."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return SimpleNamespace(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                           master=rank == 0,
                           first=functools.partial(master_first, rank=rank, world_size=world_size))


class PeerStopped(cli.Failure):
    """Rank 0 stopped the run and printed why; this rank exits 1 without repeating the sentence."""


def master_first(fn, rank, world_size, everyone=False):
    """fn() on rank 0, then on the other ranks (everyone) or its result sent to them. A failure on
    rank 0 is its one sentence there, and every other rank exits 1 quietly (PeerStopped) instead of
    waiting on a collective rank 0 never joins (gloo's "Connection closed by peer" tracebacks)."""
    if world_size == 1:
        return fn()
    if rank != 0:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        failed, result = box[0]
        if failed:  # under torchrun rank 0 exits first: its summary names rank 0's sentence
            time.sleep(2 if os.environ.get("TORCHELASTIC_ERROR_FILE") else 0)
            raise PeerStopped()
        return fn() if everyone else result
    failed, result = True, None
    try:
        result, failed = fn(), False
        return result
    finally:  # a failure on rank 0 (its sentence, or a bug's traceback) still answers the others
        dist.broadcast_object_list([(failed, None if everyone or failed else result)], src=0)


def set_precision(dtype, device):
    """Apply `dtype` to the process (TF32 switches); returns the forwards' autocast context."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    return autocast(device, dtype)


def autocast(device, dtype):
    """bf16 autocast when asked, else nothing (fp32 / tf32)."""
    bf16 = dtype == "bf16"
    return torch.autocast(torch.device(device).type, torch.bfloat16) if bf16 else nullcontext()


class Throughput:
    """Examples and tokens per second over the steady-state steps (after the first `warm`)."""

    def __init__(self, warm):
        self.warm, self.steps, self.examples, self.tokens, self.seconds = warm, 0, 0, 0, 0.0

    def add(self, examples, tokens, seconds):
        self.steps += 1
        if self.steps > self.warm:
            self.examples, self.tokens, self.seconds = (
                self.examples + examples, self.tokens + tokens, self.seconds + seconds)

    def summary(self, device):
        cuda, seconds = device.startswith("cuda"), max(self.seconds, 1e-9)
        peak_mb = (torch.cuda.max_memory_allocated(device) / 2**20 if cuda
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return {"train_examples_per_s": self.examples / seconds,
                "train_tokens_per_s": self.tokens / seconds, "train_time_s": self.seconds,
                "timed_steps": max(0, self.steps - self.warm), "peak_memory_mb": peak_mb,
                "peak_memory_kind": "cuda_max_memory_allocated" if cuda else "cpu_max_rss"}


# --- stopping cleanly on a signal ---------------------------------------------------------------

class Stopped(cli.Failure):
    """A stop signal arrived: last.pt was written at a step boundary; exit 128 + the signal."""


_stop_signal = []  # the signal received, set by the handler, read at each step boundary
_stopping = []  # set once the run stops (Stopped, a second Ctrl-C): later signals wait for cleanup


def _on_signal(sig, _):
    if _stopping:  # the locks are being released and the files closed: let that finish
        return
    if sig == signal.SIGINT and signal.SIGINT in _stop_signal:  # twice: stop now (files stay whole)
        _stopping.append(sig)
        raise KeyboardInterrupt
    if sig == signal.SIGINT and int(os.environ.get("RANK", 0)) == 0:
        print("train: Ctrl-C: stopping at the next step boundary, after writing last.pt (Ctrl-C "
              "again to stop at once)", file=sys.stderr, flush=True)
    _stop_signal.append(sig)


@contextmanager
def stop_on_signals():
    """The handlers above while the loop runs. Main thread only: a thread cannot install handlers,
    and then the caller's stay."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _stop_signal.clear()
    _stopping.clear()
    before = {sig: signal.signal(sig, _on_signal)
              for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def received():
    """The stop signal of the last run, or None: a driver stops before its next run even so."""
    return _stop_signal[0] if _stop_signal else None


def stop_requested(ranks):
    """The signal to stop on (or None), agreed by every rank: one may receive it a step later."""
    sig = received() or 0
    if ranks.world_size > 1:
        box = torch.tensor([int(sig)], device=ranks.device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        sig = int(box.item())
    return sig or None


def stopped(sig, runs):
    """The Stopped to raise once the runs wrote last.pt: rank 0 says why and how to resume; each
    rank exits 128 + the signal."""
    _stopping.append(sig)
    name, step = signal.Signals(sig).name, min(run.step for run in runs)
    folders = " ".join(str(run.out_dir) for run in runs)
    said = int(os.environ.get("RANK", 0)) == 0  # once under torchrun
    return Stopped(f"train: {name} received: stopped at step {step}, last.pt written in "
                   f"{folders}; run the same command with --resume to continue (exit status "
                   f"{128 + sig})" if said else "", status=128 + sig)


def run(main):
    """train.py's main(): a Ctrl-C after a stop or failure is ignored; a second one, or one outside
    the loop, exits 130 (files whole). Every rank ends the process group."""
    try:
        main()
    except SystemExit:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if int(os.environ.get("RANK", 0)) == 0:
            print("train: interrupted (Ctrl-C); last.pt, if any, is the last checkpoint, whole: "
                  "run the same command with --resume to continue", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- T5 and its tokenizer: the Hub or a folder ---------------------------------------------------
# Without a network, HF_HUB_OFFLINE=1: the Hub client reads its local cache only, and a name missing
# there fails at once (unset, the client retries for ~25 s first).

FLAGS = {"model": "--model DIR, a local T5 folder",
         "tokenizer": "--tokenizer DIR, a folder with the T5 tokenizer",
         "dataset": "--source DIR, a folder of the official files (docs/data.md)"}
VOCABULARY = ("tokenizer.json", "spiece.model")
TOKENIZER_FIX = "pass --tokenizer DIR with the T5 tokenizer"
RUN_FIX = ("a run trained on a Hub name needs it in the local Hugging Face cache (HF_HOME): "
           "load it once online")
wanted = []  # train.py's Hub-bound inputs (check_offline): a failed load names every missing one


def hub_offline():  # HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, as the Hub client reads it
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE")


def _cached(what, name):
    """A Hub name whose files are in the local Hugging Face cache (what an offline load reads)."""
    from huggingface_hub import constants, try_to_load_from_cache
    if what == "dataset":
        roots = (Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}",
                 Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
                 / name.replace("/", "___"))
        return any(root.is_dir() for root in roots)
    return any(isinstance(try_to_load_from_cache(name, f), str)
               for f in (VOCABULARY if what == "tokenizer" else ("config.json",)))


def _missing():
    """Each of `wanted` that is neither a local folder nor in the local cache, with its flag."""
    return [f"the {what} {name if what == 'dataset' else repr(name)} (pass {FLAGS[what]})"
            for what, name in wanted
            if (what == "dataset" or local_folder(name, what) is None) and not _cached(what, name)]


def check_offline(model, tokenizer, dataset=None):
    """train.py, before anything loads: every Hub-bound input neither a folder nor cached, in ONE
    sentence (here if HF_HUB_OFFLINE is set, else when the first load finds the Hub out of reach).
    `dataset`: the Hub id a missing data/<task>/ would be prepared from."""
    wanted[:] = [("tokenizer", tokenizer), *([("dataset", dataset)] if dataset else []),
                 ("model", model)]
    if hub_offline() and (missing := _missing()):
        raise cli.Failure(f"HF_HUB_OFFLINE is set and these are not in the local cache: "
                          f"{'; '.join(missing)}")


def offline_error(what, name, err, fix=None):
    """The one sentence for a Hub name that could not be loaded: why, and the way out (`fix`, by
    default the flag that takes a folder)."""
    from huggingface_hub.errors import LocalEntryNotFoundError
    cause, offline, fix = err, hub_offline(), fix or f"pass {FLAGS[what]}"
    while cause is not None and not isinstance(cause, (LocalEntryNotFoundError, ConnectionError)):
        cause = cause.__cause__ or cause.__context__  # the client's "no connection, not cached"
    if not offline and cause is None:
        return cli.Failure(f"could not load the {what} {name!r}: the Hub has no such name, or "
                           f"refused it ({type(err).__name__}); {fix}")
    reason, hint = ("HF_HUB_OFFLINE is set", "") if offline else (
        "the Hugging Face Hub cannot be reached", " (without a network, export HF_HUB_OFFLINE=1)")
    if (what, name) in wanted and len(missing := _missing()) > 1:
        return cli.Failure(f"{reason} and these are not in the local cache: "
                           f"{'; '.join(missing)}{hint}")
    return cli.Failure(f"could not load the {what} {name!r}: {reason} and it is not in the local "
                       f"cache; {fix}{hint}")


def local_folder(name_or_dir, what="model"):
    """The folder `name_or_dir` names, or None for a Hub name. A file, or a missing path that is no
    Hub 'org/name' (absolute, ./, ../, ~, deeper), is one sentence here, not a Hub lookup."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    if path.exists():
        raise cli.Failure(f"{name_or_dir} is a file; pass the {what} folder that holds it")
    text = str(name_or_dir)
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        raise cli.Failure(f"no {what} folder {name_or_dir} (it does not exist); check the path")
    return None


def _first_line(err):
    return (str(err).strip().splitlines() or [""])[0][:200]


def load_t5(name_or_dir, random_init=False, seed=0, fix=None):
    """T5ForConditionalGeneration from the Hub or a folder; `random_init` builds it from the config.
    `fix`: the way out an offline failure names (default: --model DIR)."""
    from transformers import T5Config, T5ForConditionalGeneration, logging
    logging.disable_progress_bar()  # one bar per shard is noise in every log
    folder = local_folder(name_or_dir)
    if folder is not None:
        if not (folder / "config.json").exists():
            raise cli.Failure(f"{name_or_dir} holds no config.json: it is not a T5 model folder")
        files.read_json(folder / "config.json", "model configuration")  # damaged JSON: one sentence
    try:
        if random_init:
            config = T5Config.from_pretrained(name_or_dir)
            torch.manual_seed(seed)  # random weights are reproducible
            return T5ForConditionalGeneration(config)
        return T5ForConditionalGeneration.from_pretrained(name_or_dir)
    # the library's many error types, at the one boundary where files become a model
    except Exception as err:
        if isinstance(err, ValueError):  # a config.json that is not a T5's
            raise cli.Failure(f"{name_or_dir} does not hold a T5 model "
                              f"({_first_line(err)})") from None
        if folder is None and isinstance(err, OSError):
            raise offline_error("model", name_or_dir, err, fix) from None
        if folder is None:
            raise
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise cli.Failure(f"{name_or_dir} has a config but no weights; pass --random-init "
                              "to build random weights from it (tests, speed only)")
        raise cli.Failure(f"the model in {name_or_dir} cannot be loaded, its files are damaged "
                          f"or not a T5's ({type(err).__name__}: {_first_line(err)}); "
                          "restore the folder") from None


def load_tokenizer(name_or_dir, say=print, fix=None):
    """The T5 tokenizer of a Hub name or a folder. A folder without a vocabulary (a bare config, as
    in ../shared/data/t5/t5-small) takes its parent's, and says so; with neither, it is an error."""
    from transformers import AutoTokenizer
    folder, candidate = local_folder(name_or_dir, "tokenizer"), name_or_dir
    if folder is not None and not any((folder / f).exists() for f in VOCABULARY):
        if not any((folder.parent / f).exists() for f in VOCABULARY):
            raise cli.Failure(f"{name_or_dir} holds no tokenizer (no tokenizer.json or "
                              f"spiece.model); {TOKENIZER_FIX}")
        candidate = str(folder.parent)
        say(f"tokenizer: {name_or_dir} holds no vocabulary; using the one in {candidate} "
            "(--tokenizer to choose)")
    try:
        tok = AutoTokenizer.from_pretrained(candidate)
    except Exception as err:  # as in load_t5: the library's error types, at the boundary
        if folder is None and isinstance(err, (OSError, ValueError, TypeError)):
            raise offline_error("tokenizer", name_or_dir, err, fix) from None
        if folder is None:
            raise
        raise cli.Failure(f"the tokenizer in {candidate} cannot be loaded, its files are damaged "
                          f"or not a tokenizer's ({type(err).__name__}: {_first_line(err)}); "
                          f"{TOKENIZER_FIX}") from None
    for role, token in (("pad_token", "<pad>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
        if getattr(tok, role) is None:  # a bare tokenizer.json names none; T5's are fixed
            setattr(tok, role, token)
    if all(i == tok.unk_token_id for i in tok("the cat sat on the mat")["input_ids"][:-1]):
        raise cli.Failure(f"the tokenizer from {name_or_dir!r} maps plain English to <unk>; "
                          f"{TOKENIZER_FIX}")
    return tok


def t5_fingerprint(t5):
    """A cheap hash of the frozen weights: evaluate.py checks it rebuilt the T5 train.py used."""
    h = hashlib.sha1()
    for name, p in sorted(t5.state_dict().items()):  # the name, then the first 256 values
        h.update(name.encode() + p.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer):
    """A hash of the tokenizer's whole definition: the key of the tokenization cache."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = (backend.to_str() if backend is not None
            else f"{type(tokenizer).__name__} {len(tokenizer)} {tokenizer.name_or_path}")
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def set_dropout(t5, rate):
    """T5's dropout rate everywhere: nn.Dropout modules and the float rate HF's attention keeps
    (None: the config's, unchanged)."""
    if rate is None:
        return
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
