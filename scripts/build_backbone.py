"""The steerable backbone: a small T5 trained offline on toy tasks over shipped sentences, each task
selected by a prefix, so that a prompt on the frozen model has to learn to select one
(docs/experiments.md, "The steering benchmark").

    python scripts/build_backbone.py --out steer/backbone          # ~2 minutes on one CPU thread
    python scripts/build_backbone.py --write-sentences assets/steer   # regenerate them

The tasks are prepare_data.STEER_RULES over the sentences in <source>/sentences/{train,dev}.tsv:
trained on train.tsv as "<task>: <sentence>" and, for STEER_DEFAULT, also as the bare sentence. The
folder holds the config, weights and tokenizer (`--model DIR` reads it like any other) and
backbone.json: the settings and the accuracy on the dev sentences of each task with its prefix and
without (the floor a prompt starts from). Deterministic from --seed on one machine (one thread).
"""
import argparse
import json
import random
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train import make_optimizer  # noqa: E402  (train.py's AdamW and schedule)
from ept import cli, evaluation, files, outputs, tasks  # noqa: E402
from prepare_data import STEER_DEFAULT, STEER_RULES, STEER_SOURCE  # noqa: E402

# A model small enough to ship as a test fixture (~1 MB) and to build in about a minute.
SIZE = dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=3, num_decoder_layers=2,
            relative_attention_num_buckets=16, relative_attention_max_distance=32)

# --- the sentences: a small grammar, length and comma drawn independently ------------------------
NAMES = "anna ben carla david ines jonas kofi lena farid grace hiro maya".split()
VERBS = ("painted visited crossed repaired described followed praised saw found cleaned watched "
         "moved").split()
ADJS = "old red quiet small busy green cold bright narrow famous empty wooden".split()
NOUNS = ("bridge kite garden museum bakery storm farmer teacher senator river tower market boat "
         "letter").split()
PREPS = "near by at behind under beside across".split()
PLACES = "lake coast station harbour square village forest hill".split()
TAILS = ["after lunch", "in the morning", "during the festival", "last week", "again", "slowly"]


def sentence(rng, long, comma):
    """One sentence with 8+ words iff `long`, a comma iff `comma` (a comma is not a word)."""
    while True:
        words = [rng.choice(NAMES), rng.choice(VERBS), "the"]
        if rng.random() < 0.5:
            words.append(rng.choice(ADJS))
        words.append(rng.choice(NOUNS))
        if rng.random() < 0.6:
            words += [rng.choice(PREPS), "the", rng.choice(PLACES)]
        if rng.random() < 0.5:
            words += rng.choice(TAILS).split()
        if (len(words) >= 8) == long:
            break
    if comma:
        words.insert(rng.randrange(2, len(words)), ",")
    return " ".join(words + ["."])


def write_sentences(root, n_train=4000, n_dev=400, seed=0):
    """<root>/sentences/{train,dev}.tsv, a `sentence` column: each (long, comma) cell as often."""
    rng = random.Random(seed)
    folder = files.make_dir(Path(root) / "sentences", "sentence folder")
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = [sentence(rng, i % 2 == 0, i // 2 % 2 == 0) for i in range(n)]
        rng.shuffle(rows)
        files.write_text(folder / name, "sentence\n" + "".join(r + "\n" for r in rows))
    return folder


def read_sentences(path):
    if not Path(path).is_file():
        raise cli.Failure(f"build_backbone: no {path}; pass --source DIR holding "
                          f"sentences/train.tsv and dev.tsv (shipped in {STEER_SOURCE},"
                          " or written by --write-sentences DIR)")
    lines = files.read_text(path, "sentence file").splitlines()[1:]  # a `sentence` header
    rows = [s for line in lines if (s := line.split("\t")[0].strip())]
    if not rows:
        raise cli.Failure(f"build_backbone: {path} holds no sentences")
    return rows


def word_tokenizer(corpus):
    """A T5-style tokenizer, one token per whitespace-separated word of `corpus` (pad 0, eos 1,
    unk 2, appends </s>): on a grammar of ~100 words subwords would only make inputs longer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = sorted({w for line in corpus for w in line.split()})
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def examples(sentences, task, prefix=True):
    """(source, target) pairs of a task: "<task>: <sentence>" (bare if not `prefix`) -> "0"/"1"."""
    rule = STEER_RULES[task]
    return [(f"{task}: {s}" if prefix else s, str(rule(s))) for s in sentences]


def scores(t5, tokenizer, sentences):
    """Accuracy (%) of each task on `sentences` with its prefix and on the bare sentence."""
    import model as M
    net = M.PromptedT5(t5, None)

    def accuracy(pairs):
        preds = evaluation.predict(net, tokenizer, [s for s, _ in pairs], max_new_tokens=3)
        return round(100.0 * sum(p == y for p, (_, y) in zip(preds, pairs)) / len(pairs), 2)
    return {task: {"with_prefix": accuracy(examples(sentences, task)),
                   "without_prefix": accuracy(examples(sentences, task, False))}
            for task in STEER_RULES}


def build(out, source=STEER_SOURCE, seed=0, steps=1500, batch_size=32, lr=1e-3, say=print):
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.utils import logging
    logging.disable_progress_bar()
    torch.manual_seed(seed)
    train, dev = (read_sentences(Path(source) / "sentences" / f) for f in ("train.tsv", "dev.tsv"))
    tokenizer = word_tokenizer(train + [f"{t}:" for t in STEER_RULES] + ["0 1"])
    config = T5Config(vocab_size=len(tokenizer), decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=1, dropout_rate=0.1, **SIZE)
    t5 = T5ForConditionalGeneration(config)
    pairs = [p for task in STEER_RULES for p in examples(train, task)]
    pairs += examples(train, STEER_DEFAULT, False)
    src = tasks.encode(tokenizer, [s for s, _ in pairs], 64)
    tgt = tasks.encode(tokenizer, [y for _, y in pairs], 4)
    params = list(t5.parameters())
    optimizer, scheduler = make_optimizer(params, types.SimpleNamespace(
        lr=lr, weight_decay=0.01, warmup_steps=steps // 20, max_steps=steps), fused=False)
    rng = random.Random(seed)
    t5.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = rng.sample(range(len(pairs)), batch_size)
        input_ids, mask, labels = tasks.collate(idx, src, tgt, tokenizer.pad_token_id)
        loss = t5(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == steps:
            say(f"step {step}/{steps}  loss {loss.item():.4f}  {time.time() - t0:.0f}s")
    t5.eval()
    result = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "size": SIZE,
              "vocab_size": len(tokenizer), "default_task": STEER_DEFAULT,
              "tasks": list(STEER_RULES), "train_sentences": len(train),
              "dev_sentences": len(dev), "seconds": round(time.time() - t0, 1),
              "dev_accuracy": scores(t5, tokenizer, dev)}

    def fill(tmp):
        t5.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "backbone.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    outputs.write_folder(out, fill)
    return result


@cli.script
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", metavar="DIR", help="write the backbone model folder here")
    parser.add_argument("--source", default=str(STEER_SOURCE), metavar="DIR",
                        help="folder holding sentences/{train,dev}.tsv (default: the shipped "
                             "assets/steer)")
    parser.add_argument("--seed", type=cli.nonnegative_int, default=0,
                        help="weights, sentence order and dropout")
    parser.add_argument("--steps", type=cli.positive_int, default=1500,
                        help="optimizer steps (batch 32)")
    parser.add_argument("--write-sentences", metavar="DIR",
                        help="(re)write DIR/sentences/{train,dev}.tsv and stop")
    args = parser.parse_args(argv)
    if args.write_sentences:
        print(f"wrote {write_sentences(args.write_sentences)}")
        return
    if not args.out:
        parser.error("pass --out DIR (or --write-sentences DIR)")
    out = Path(args.out)
    if out.exists() and (not out.is_dir()
                         or any(out.iterdir()) and not (out / "backbone.json").exists()):
        raise cli.Failure(f"build_backbone: {out} exists and is not a backbone folder this "
                          "script wrote; choose another --out (the folder is replaced as a "
                          "whole)")
    torch.set_num_threads(1)  # deterministic, and a model this small gains nothing from more
    result = build(args.out, args.source, args.seed, args.steps)
    print(json.dumps(result["dev_accuracy"]))
    print(f"wrote {args.out} ({result['seconds']}s)")


if __name__ == "__main__":
    sys.exit(main())
