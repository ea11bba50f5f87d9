"""Where and how the model runs: T5 and its tokenizer (from the Hugging Face Hub or a local folder;
every loader fails with one sentence when the Hub is out of reach or a folder lacks a file), the
tiny random T5 of the tests, the device, the ranks of a torchrun group, and the precision.

Precision (one name everywhere: --dtype, config.json "dtype"):
    fp32  our reading (the paper names none; the HF Trainer's: fp32, TF32 off as PyTorch leaves it)
    tf32  fp32 weights and activations, matmuls on TF32 tensor cores (CUDA; on a CPU it is fp32)
    bf16  bf16 autocast around the forward passes, trainable parameters and loss in fp32 (CUDA; T5
          overflows in fp16). A speed option, not the paper's setting.

    python -m ept.runtime --make-tiny smoke/tiny-t5   # a tokenizer trained offline
    python -m ept.runtime --make-tiny DIR --tokenizer ../shared/data/t5   # T5's vocabulary
"""
import argparse
import functools
import hashlib
import os
import resource
import socket
import sys
import threading
import time
import urllib.parse
from contextlib import nullcontext
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
    """fn() on rank 0, then on the other ranks (everyone) or its result sent to them. Rank 0 tells
    the others whether it got through: a failing check prints its one sentence from rank 0, and
    every other rank exits 1 quietly (PeerStopped) instead of waiting on a collective rank 0 never
    joins (gloo's "Connection closed by peer" tracebacks)."""
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


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_precision(dtype, device):
    """Apply `dtype` to the process (TF32 switches); returns the forwards' autocast context."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
        torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    return autocast(device, dtype)


def autocast(device, dtype):
    """bf16 autocast when asked, else nothing (fp32 / tf32)."""
    if dtype == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


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
        if device.startswith("cuda"):
            peak_mb, kind = (torch.cuda.max_memory_allocated(device) / 2**20,
                             "cuda_max_memory_allocated")
        else:
            peak_mb, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"
        return {"train_examples_per_s": self.examples / max(self.seconds, 1e-9),
                "train_tokens_per_s": self.tokens / max(self.seconds, 1e-9),
                "train_time_s": self.seconds, "timed_steps": max(0, self.steps - self.warm),
                "peak_memory_mb": peak_mb, "peak_memory_kind": kind}


# --- T5 and its tokenizer: the Hub or a folder ---------------------------------------------------

PROBE_SECONDS = 3.0
offline_reason = None  # why hub_reachable() found the Hub out of reach
FLAGS = {"model": "--model DIR, a local T5 folder",
         "tokenizer": "--tokenizer DIR, a folder with the T5 tokenizer",
         "dataset": "--source DIR, a folder of the official files (docs/data.md)"}


@functools.cache
def hub_reachable():
    """One quick probe of the Hub (HF_ENDPOINT, or the proxy in front of it): a TCP connection
    within PROBE_SECONDS. Without an answer, or with HF_HUB_OFFLINE=1 set, this process reads the
    Hub's local cache only (HF_HUB_OFFLINE=1 from here on): a name that is not cached fails at once,
    not after the Hub client's ~50 s of "Retrying in Ns" lines."""
    global offline_reason
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        offline_reason = "HF_HUB_OFFLINE is set"
        return False
    target = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "HF_ENDPOINT")
                   if os.environ.get(k)), "https://huggingface.co")
    url = urllib.parse.urlparse(target if "://" in target else f"http://{target}")
    answered = []

    def probe():  # in a thread: a DNS lookup has no timeout of its own
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
            socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS).close()
            answered.append(True)
        except (OSError, ValueError):
            pass
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS)
    if not answered:
        offline_reason = f"the Hugging Face Hub ({url.hostname}) cannot be reached"
        # for the Hub libraries imported from now on, and those already loaded:
        os.environ["HF_HUB_OFFLINE"] = "1"
        for module in ("huggingface_hub.constants", "datasets.config"):
            if module in sys.modules:
                setattr(sys.modules[module], "HF_HUB_OFFLINE", True)
    return bool(answered)


RUN_FIX = ("a run trained on a Hub name needs it in the local Hugging Face cache (HF_HOME): "
           "load it once online")


def offline_error(what, name, err=None, fix=None):
    """The one sentence for a Hub name that could not be loaded: why, and the way out (by default
    the flag that takes a folder; `fix` where there is no such flag: a run folder's config.json
    names the model)."""
    if not hub_reachable():
        why = f"{offline_reason} and it is not in the local cache"
    else:
        why = "the Hub has no such name, or refused it" + (f" ({type(err).__name__})"
                                                           if err is not None else "")
    return cli.Failure(f"could not load the {what} {name!r}: {why}; "
                          f"{fix or 'pass ' + FLAGS[what]}")


def local_folder(name_or_dir, what="model"):
    """The folder `name_or_dir` names, or None for a Hub name. A file, or a path that does not exist
    (absolute, relative with ./ or ../, or deeper than a Hub 'org/name'), is one sentence here, not
    a Hub lookup."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    if path.exists():
        raise cli.Failure(f"{name_or_dir} is a file; pass the {what} folder that holds it")
    text = str(name_or_dir)
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        raise cli.Failure(f"no {what} folder {name_or_dir} (it does not exist); check the path")
    return None


def _cached(name, filenames, kind="model"):
    """A Hub name whose files are in the local Hugging Face cache (what an offline load reads)."""
    from huggingface_hub import constants, try_to_load_from_cache
    if kind == "dataset":
        roots = (Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}",
                 Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
                 / name.replace("/", "___"))
        return any(root.is_dir() for root in roots)
    return any(isinstance(try_to_load_from_cache(name, f), str) for f in filenames)


def check_offline(model, tokenizer, dataset=None):
    """Before anything loads: with the Hub out of reach, every Hub-bound input that is neither a
    local folder nor in the local cache, named in ONE sentence with its local alternative (not one
    failure after another). `dataset`: the Hub id a missing data/<task>/ would be prepared from."""
    if hub_reachable():
        return
    wanted = [("tokenizer", tokenizer, ("tokenizer.json", "spiece.model")),
              ("model", model, ("config.json",))]
    missing = [f"the {what} {name!r} (pass {FLAGS[what]})" for what, name, filenames in wanted
               if local_folder(name, what) is None and not _cached(name, filenames)]
    if dataset and not _cached(dataset, (), "dataset"):
        missing.insert(1, f"the dataset {dataset} (pass {FLAGS['dataset']})")
    if missing:
        raise cli.Failure(f"{offline_reason} and these are not in the local cache: "
                             f"{'; '.join(missing)}")


def _first_line(err):
    return (str(err).strip().splitlines() or [""])[0][:200]


def load_t5(name_or_dir, random_init=False, seed=0, fix=None):
    """T5ForConditionalGeneration from the Hub or a folder; `random_init` builds it from the config.
    `fix`: the way out an offline failure names (default: --model DIR)."""
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.utils import logging
    logging.disable_progress_bar()  # one bar per shard is noise in every log
    folder = local_folder(name_or_dir)
    if folder is not None:
        if not (folder / "config.json").exists():
            raise cli.Failure(f"{name_or_dir} holds no config.json: it is not a T5 model folder")
        files.read_json(folder / "config.json", "model configuration")  # damaged JSON: one sentence
    else:
        hub_reachable()  # unreachable: the cache only, no retries
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
        if folder is None:
            if isinstance(err, OSError):
                raise offline_error("model", name_or_dir, err, fix)
            raise
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise cli.Failure(f"{name_or_dir} has a config but no weights; pass --random-init "
                                 "to build random weights from it (tests, speed only)")
        raise cli.Failure(f"the model in {name_or_dir} cannot be loaded, its files are damaged "
                             f"or not a T5's ({type(err).__name__}: {_first_line(err)}); "
                             "restore the folder") from None


def _has_vocabulary(folder):
    return (folder / "tokenizer.json").exists() or (folder / "spiece.model").exists()


def load_tokenizer(name_or_dir, say=print, fix=None):
    """The T5 tokenizer of a Hub name or a folder. A folder without a vocabulary (a bare config, as
    in ../shared/data/t5/t5-small) takes its parent's, and says so; with neither, it is an error."""
    from transformers import AutoTokenizer
    folder = local_folder(name_or_dir, "tokenizer")
    candidate = name_or_dir
    if folder is not None and not _has_vocabulary(folder):
        if not _has_vocabulary(folder.parent):
            raise cli.Failure(f"{name_or_dir} holds no tokenizer (no tokenizer.json or "
                                 "spiece.model); pass --tokenizer DIR with the T5 tokenizer")
        candidate = str(folder.parent)
        say(f"tokenizer: {name_or_dir} holds no vocabulary; using the one in {candidate} "
            "(--tokenizer to choose)")
    if folder is None:
        hub_reachable()  # unreachable: the cache only, no retries
    try:
        tok = AutoTokenizer.from_pretrained(candidate)
    except Exception as err:  # as in load_t5: the library's error types, at the boundary
        if folder is None:
            if isinstance(err, (OSError, ValueError, TypeError)):
                raise offline_error("tokenizer", name_or_dir, err, fix)
            raise
        raise cli.Failure(f"the tokenizer in {candidate} cannot be loaded, its files are "
                             f"damaged or not a tokenizer's ({type(err).__name__}: "
                             f"{_first_line(err)}); pass --tokenizer DIR with the T5 "
                             "tokenizer") from None
    for role, token in (("pad_token", "<pad>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
        # a bare tokenizer.json names no special tokens; T5's are fixed
        if getattr(tok, role) is None:
            setattr(tok, role, token)
    probe = tok("the cat sat on the mat")["input_ids"]
    if all(i == tok.unk_token_id for i in probe[:-1]):
        raise cli.Failure(f"the tokenizer from {name_or_dir!r} maps plain English to <unk>; "
                             "pass --tokenizer DIR with the T5 tokenizer")
    return tok


def t5_fingerprint(t5):
    """A cheap hash of the frozen weights: evaluate.py checks it rebuilt the T5 train.py used."""
    h = hashlib.sha1()
    for name, p in sorted(t5.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().flatten()[:256].float().cpu().numpy().tobytes())
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


# --- a tiny random T5 for tests and the SMOKE recipe ----------------------------------------------

TINY = dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=32)


def offline_tokenizer(corpus, vocab_size=600):
    """A T5-style unigram tokenizer trained on `corpus` offline (pad 0, eos 1, unk 2, adds </s>)."""
    import tokenizers
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = tokenizers.Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size,
                                      special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", shrinking_factor=0.75)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def _fixture_corpus(root):
    """Every text field of the fixture files: enough to train a small vocabulary."""
    lines = []
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and path.suffix in (".jsonl", ".tsv", ".txt", ".csv", ".json"):
            lines += path.read_text(encoding="utf-8", errors="ignore").splitlines()
    return lines + [str(i) for i in range(10)] + ["0.0 0.2 0.4 0.6 0.8 1.0 2.0 3.0 4.0 5.0"]


def make_tiny(out_dir, tokenizer=None, corpus_dir=None):
    """Save a random-weight tiny T5 and a tokenizer in `out_dir` (a folder load_t5 can read)."""
    from transformers import T5Config, T5ForConditionalGeneration
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        root = Path(__file__).resolve().parents[1]
        tok = offline_tokenizer(_fixture_corpus(corpus_dir or root / "tests" / "fixtures" / "raw"))
    config = T5Config(vocab_size=len(tok), decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                      dropout_rate=0.1, **TINY)
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(config)
    out = files.make_dir(out_dir, "model folder")
    try:
        t5.save_pretrained(out)
        tok.save_pretrained(out)
    except OSError as err:
        raise files.FileFault(f"cannot write the tiny model into {out}: {files.why(err)}") from None
    return out


@cli.script
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ept.runtime", description=__doc__,
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("--make-tiny", metavar="DIR", required=True,
                        help="write a random-weight tiny T5 + tokenizer to DIR")
    parser.add_argument("--tokenizer", default=None, help="copy this tokenizer (default: train "
                        "one offline on the test fixtures)")
    args = parser.parse_args(argv)
    print(f"wrote {make_tiny(args.make_tiny, tokenizer=args.tokenizer)}")


if __name__ == "__main__":
    sys.exit(main())
