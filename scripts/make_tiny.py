"""A random-weight tiny T5 and its tokenizer in one folder, for the tests and the SMOKE recipe
(run_all.sh). The tokenizer is trained offline on the test fixtures unless --tokenizer names one.

    python scripts/make_tiny.py smoke/tiny-t5                       # a tokenizer trained offline
    python scripts/make_tiny.py DIR --tokenizer ../shared/data/t5   # T5's vocabulary
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the stages and ept/
from ept import cli, files, runtime  # noqa: E402

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


def fixture_corpus(root):
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
        tok = runtime.load_tokenizer(tokenizer)
    else:
        tok = offline_tokenizer(fixture_corpus(corpus_dir or ROOT / "tests" / "fixtures" / "raw"))
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
    parser = argparse.ArgumentParser(prog="python scripts/make_tiny.py", description=__doc__,
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("out", metavar="DIR", type=cli.folder,
                        help="write a random-weight tiny T5 + tokenizer to DIR")
    parser.add_argument("--tokenizer", default=None, help="copy this tokenizer (default: train "
                        "one offline on the test fixtures)")
    args = parser.parse_args(argv)
    print(f"wrote {make_tiny(args.out, tokenizer=args.tokenizer)}")


if __name__ == "__main__":
    sys.exit(main())
