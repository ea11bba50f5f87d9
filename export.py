"""Export a trained prompt as a Hugging Face PEFT prompt-tuning adapter, without importing PEFT.

Reads RUN_DIR/config.json and the folded P' (prompt.pt, the best checkpoint; or last.pt folded once)
and writes OUT_DIR/adapter_model.safetensors ({"prompt_embeddings": P' (n, d) float32}) and
OUT_DIR/adapter_config.json (a PromptTuningConfig), the two files PEFT's save_pretrained writes and
PeftModel.from_pretrained reads, plus a README.md saying where the prompt came from. The format is
PEFT 0.17's with num_transformer_submodules 1, as our prompt enters the encoder alone; EPT's
broadcast P' is stored as the n rows that enter the encoder (docs/experiments.md, "PEFT export").

    python export.py runs/rte_ept_star_t5-base_s0 exports/rte_ept_star
    python export.py runs/rte_ept_star_t5-base_s0 exports/rte_ept_star --checkpoint last
    python export.py runs/rte_ept_star_t5-base_s0 exports/rte_ept_star --overwrite  # replace it

The folder is written beside and swapped in whole, so an old adapter is never left half-replaced;
an existing adapter is replaced only with --overwrite, and a folder that holds other files than an
adapter's is never written into. With PEFT installed, `PeftModel.from_pretrained(t5, OUT_DIR)` loads
the adapter.
"""
import argparse
import json
from pathlib import Path

from safetensors.torch import save_file

import tables
from ept import cli, files, outputs

ADAPTER_CONFIG = "adapter_config.json"  # peft.utils.constants.CONFIG_NAME
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft.utils.constants.SAFETENSORS_WEIGHTS_NAME
# get_peft_model_state_dict / set_peft_model_state_dict key for prompt learning
PROMPT_KEY = "prompt_embeddings"

parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
parser.add_argument("run_dir", help="a run folder written by train.py (a prompt method, not ft)")
parser.add_argument("out_dir", help="the adapter folder to write")
parser.add_argument("--checkpoint", default="best", choices=("best", "last"),
                    help="best: prompt.pt as saved; last: fold last.pt's prompt module once")
parser.add_argument("--base-model", default=None,
                    help="base_model_name_or_path to write (default: the run's --model)")
parser.add_argument("--overwrite", action="store_true",
                    help="replace the files of an existing adapter folder")


def t5_dimensions(name_or_dir):
    """(num_layers, num_heads) of the base T5: its config's if reachable, else the known sizes."""
    from transformers import T5Config
    try:
        config = T5Config.from_pretrained(name_or_dir)
        return config.num_layers, config.num_heads
    except (OSError, ValueError):
        size = tables.SIZES.get(Path(str(name_or_dir)).name)
        return (size["num_layers"], size["num_heads"]) if size else (None, None)


def folded_prompt(run_dir, checkpoint="best"):
    """P' (n, d) float32 of a run: prompt.pt, or the prompt module of last.pt run once."""
    run_dir = Path(run_dir)
    if checkpoint == "best":
        if not (run_dir / "prompt.pt").exists():
            raise cli.Failure(f"export: {run_dir} has no prompt.pt (an ft run, or training did "
                              "not finish)")
        return outputs.load_folded_prompt(run_dir / "prompt.pt")[0].float()
    net, _, _ = outputs.load_run(run_dir, "last", device="cpu")
    return net.prompt().detach().float().cpu()


def adapter_config(prompt, base_model, num_layers, num_heads):
    """PEFT's PromptTuningConfig.to_dict() fields (PEFT 0.17; every one known to PEFT >= 0.7)."""
    return {"auto_mapping": None, "base_model_name_or_path": base_model,
            "inference_mode": True,  # save_pretrained always writes True
            "num_attention_heads": num_heads, "num_layers": num_layers,
            "num_transformer_submodules": 1,  # encoder only: see the module docstring
            "num_virtual_tokens": prompt.size(0), "peft_type": "PROMPT_TUNING",
            "prompt_tuning_init": "RANDOM",  # how PEFT would initialise it; moot once loaded
            "prompt_tuning_init_text": None, "revision": None, "task_type": "SEQ_2_SEQ_LM",
            "token_dim": prompt.size(1), "tokenizer_kwargs": None, "tokenizer_name_or_path": None}


ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md")


def check_out_dir(out_dir, overwrite):
    """The adapter folder may be new or empty, or an existing adapter with --overwrite."""
    if out_dir.exists() and not out_dir.is_dir():
        raise cli.Failure(f"export: {out_dir} is a file; name a folder for the adapter")
    present = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if present and (ADAPTER_CONFIG not in present or not set(present) <= set(ADAPTER_FILES)):
        raise cli.Failure(f"export: {out_dir} already holds {', '.join(present[:5])}, "
                          "not an adapter export; name a new or empty folder")
    if present and not overwrite:
        raise cli.Failure(f"export: {out_dir} already holds an adapter; pass --overwrite to "
                          "replace it or name another folder")


def export(run_dir, out_dir, checkpoint="best", base_model=None, overwrite=False):
    """Write the adapter folder; returns (config dict, prompt tensor)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = outputs.read_config(run_dir, ("task", "method", "model"))
    check_out_dir(out_dir, overwrite)
    if config["method"] == "ft":
        raise cli.Failure(f"export: {run_dir} is full fine-tuning: there is no prompt to export")
    prompt = folded_prompt(run_dir, checkpoint).contiguous()  # (n, d)
    base_model = base_model or config["model"]
    peft_config = adapter_config(prompt, base_model, *t5_dimensions(base_model))
    metrics_path = run_dir / "metrics.json"
    metrics = files.read_json(metrics_path, "test metrics") if metrics_path.exists() else {}
    score = metrics.get("score", "n/a") if isinstance(metrics, dict) else "n/a"
    readme = (f"# {config['method']} prompt for {config['task']}\n\n"
              f"Exported from `{run_dir}` ({checkpoint} checkpoint) by export.py: a PEFT "
              f"PROMPT_TUNING adapter for `{base_model}`, {prompt.size(0)} virtual token(s) of "
              f"dimension {prompt.size(1)}, encoder only (num_transformer_submodules 1).\n\n"
              f"Test score of the run: {score}. Training method: {config['method']}, "
              f"{config.get('n_trainable', '?')} trainable parameters; only the folded prompt P' "
              "is kept.\n")

    # the whole folder is swapped in at once: an old adapter stays whole if anything fails
    def fill(tmp):
        save_file({PROMPT_KEY: prompt}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        # as PEFT writes it
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True))
    files.make_dir(out_dir.parent, "folder")
    outputs.write_folder(out_dir, fill)
    return peft_config, prompt


@cli.script
def main(argv=None):
    args = parser.parse_args(argv)
    peft_config, prompt = export(args.run_dir, args.out_dir, args.checkpoint, args.base_model,
                                 args.overwrite)
    print(f"export: {args.out_dir}/{ADAPTER_WEIGHTS} ({PROMPT_KEY} {tuple(prompt.shape)}) and "
          f"{ADAPTER_CONFIG} (PROMPT_TUNING, SEQ_2_SEQ_LM, {peft_config['num_virtual_tokens']} "
          "virtual tokens)")
    return peft_config


if __name__ == "__main__":
    main()
