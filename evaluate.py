"""Evaluate a trained run: every metric of the paper, greedy decoding or rank classification.

Reads a run folder written by train.py (config.json, prompt.pt / best.pt / last.pt) and the
task's data folder written by prepare_data.py (<split>.jsonl, meta.json). Rebuilds T5, the
tokenizer and P' from config.json alone (a flag that overrides it is announced on stdout), and
uses only the folded prompt P' (no reparameterization network at inference). Writes
RUN_DIR/eval/<task>_<split>.metrics.json and .predictions.jsonl (atomically) and prints the metrics.

    python evaluate.py runs/rte_ept_t5-base_s0                 # test split, best checkpoint
    python evaluate.py runs/rte_ept_t5-base_s0 --split validation --eval-mode rank
    python evaluate.py runs/rte_ept_t5-base_s0 --task cb       # zero-shot transfer (Figure 10)
    python evaluate.py runs/rte_ept_t5-base_s0 --input new.jsonl --output preds.jsonl   # new inputs

What the other stages call lives in ept/outputs.py (load_run, evaluate_run) and ept/evaluation.py.
"""
import argparse
import json
from pathlib import Path

from ept import cli, files, outputs, runtime

parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
parser.add_argument("run_dir", help="a run folder written by train.py")
# data
parser.add_argument("--split", default="test", choices=("test", "validation", "train"),
                    help="which split to score")
parser.add_argument("--task", default=None, type=cli.name,
                    help="evaluate on another task (zero-shot transfer); default: the run's")
parser.add_argument("--data-dir", help="data folder (default: the run's config.json data_dir)")
parser.add_argument("--max-eval-examples", type=cli.positive_int, default=None,
                    help="score only the first N examples (default: all)")
# model
parser.add_argument("--checkpoint", default="best", choices=("best", "last"),
                    help="which checkpoint's prompt to use")
# evaluation
parser.add_argument("--eval-mode", default="generate", choices=("generate", "rank"),
                    help="greedy generation, or rank classification over the label set "
                         "(never invalid)")
parser.add_argument("--eval-batch-size", type=cli.positive_int, default=64,
                    help="examples per forward pass")
# new inputs
parser.add_argument("--input", help="jsonl with a 'source' field, or .txt with one input per line")
parser.add_argument("--output", help="with --input: where the predictions go (jsonl)")


def read_inputs(path):
    """New inputs: a .jsonl of rows with a 'source' string, or a text file with one input a line."""
    path = Path(path)
    if path.suffix not in (".jsonl", "", ".txt", ".text", ".tsv", ".csv", ".md"):
        raise files.FileFault(f"--input {path}: a {path.suffix} file is neither a .jsonl of "
                              "{\"source\": ...} rows nor a text file with one input a line; "
                              "convert it to one of those")
    if path.suffix == ".jsonl":
        rows = files.read_jsonl(path, what="input file")
        bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r.get("source"), str)), None)
        if bad:
            raise files.FileFault(f"{path}: row {bad} has no 'source' string; each row needs one")
    else:
        rows = [{"source": line.strip()}
                for line in files.read_text(path, "input file").splitlines() if line.strip()]
    if not rows:
        raise files.FileFault(f"{path} holds no inputs")
    return rows


def predict_file(run_dir, input_path, output_path, *, checkpoint="best", mode="generate",
                 batch_size=64, device=None):
    """Run the trained prompt on new inputs (read_inputs); the predictions go to `output_path`."""
    rows = read_inputs(input_path)
    if Path(output_path).resolve() == Path(input_path).resolve():
        raise cli.Failure(f"--output {output_path} is the input file; name another file")
    net, tokenizer, config = outputs.load_run(run_dir, checkpoint, None, device)
    device = device or runtime.ranks().device
    # config.json keeps the task's meta.json (labels, lengths)
    preds = outputs.run_predictions(
        net, tokenizer, [r["source"] for r in rows], config["meta"], mode=mode,
        max_length=config["max_length"], batch_size=batch_size, device=device,
        dtype=outputs.run_dtype(config, device), progress="predict")
    files.write_jsonl(output_path, [{**r, "prediction": p} for r, p in zip(rows, preds)])
    return preds


@cli.script
def main(argv=None):
    args = parser.parse_args(argv)
    if args.input:
        out = args.output or f"{Path(args.input).with_suffix('')}.predictions.jsonl"
        preds = predict_file(args.run_dir, args.input, out, checkpoint=args.checkpoint,
                             mode=args.eval_mode, batch_size=args.eval_batch_size)
        print(f"evaluate: {len(preds)} predictions -> {out}")
        return preds
    metrics = outputs.evaluate_run(args.run_dir, args.task, args.split, args.eval_mode,
                                      checkpoint=args.checkpoint, data_dir=args.data_dir,
                                      batch_size=args.eval_batch_size,
                                      max_examples=args.max_eval_examples)
    print(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    main()
