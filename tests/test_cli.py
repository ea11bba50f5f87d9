"""What a user meets on the command line: --help with defaults in every script, one clear sentence for
an offline or bad start (once, under torchrun too), and nothing on disk after a refused start.

    python -m pytest -q tests/test_cli.py          # ~1 minute on 2 CPU cores (two torchrun groups)
"""
import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("ablate", "analyze", "bench", "bench_pack", "evaluate", "export", "fewshot", "model", "prepare_data",
           "pretrained", "report", "train")


def help_parser(module_name):
    """The ArgumentParser `module.main(["--help"])` builds, caught as it parses."""
    module = importlib.import_module(module_name)
    caught = []

    def catch(self, *a, **k):
        caught.append(self)
        raise SystemExit(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", catch)
        mp.setattr(argparse.ArgumentParser, "parse_known_args", catch)
        with pytest.raises(SystemExit):
            module.main(["--help"])
    return caught[0]


def option_help(text, action):
    """The --help text of one option: from its first line to the next option's."""
    name = action.option_strings[-1] if action.option_strings else action.dest
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"  {re.escape(name)}\b", line))
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"\s{2,}-|\S", lines[i])
                and not re.match(r"\s{8,}", lines[i])), len(lines))
    return " ".join(lines[start:end])


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default(script):
    """Every option with a value by default names it in --help (a flag or a None default says in words)."""
    parser = help_parser(script)
    text = parser.format_help()
    shown = 0
    for action in parser._actions:
        if action.default in (None, argparse.SUPPRESS) or action.nargs == 0 or action.default is False:
            continue
        assert "default" in option_help(text, action), f"{script} --help: {action.dest} hides its default"
        shown += 1
    if script == "train":
        for option, value in (("--model", "t5-base"), ("--method", "ept"), ("--batch-size", "16"),
                              ("--max-steps", "30000"), ("--eval-every", "1000")):
            action = next(a for a in parser._actions if option in a.option_strings)
            assert f"(default: {value})" in re.sub(r"\s+", " ", option_help(text, action))


@pytest.mark.parametrize("script", ["scripts/profile_step.py", "scripts/compile_buckets.py"])
def test_helper_scripts_help(script):
    """scripts/ answer --help (without running their benchmark) and name their defaults."""
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr
    if "profile_step" in script:
        assert "(default: 300)" in out.stdout
