"""A fake unit of a plan, for tests/test_slurm.py: what a train.py line promises, in a few lines.

    python fake_unit.py DIR NAME STEPS [--step-s S] [--fail]   # one unit: DIR/NAME/
    python fake_unit.py --collect DIR                          # the collect step

A unit counts STEPS steps (one line each in steps.log), resumes from its checkpoint (ckpt), and on
SIGTERM or SIGUSR1 writes the checkpoint after the step in progress and exits 143. Finished, it
writes result.json and appends its row to DIR/rows.jsonl once; run again, it exits 0 at once.
--fail: fails after one step (failed.txt says why, exit 3). The collect step appends any missing
row, prints the finished and the failed units, writes DIR/collected.json, and exits 1 if one failed.
"""
import json
import os
import signal
import sys
import time
from pathlib import Path


def write(path, text):  # atomic, as files.write_text
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def append_row(root, name, result):
    rows = root / "rows.jsonl"
    have = [json.loads(line)["unit"] for line in rows.read_text().splitlines()] if rows.exists() else []
    if name not in have:
        with open(rows, "a") as f:
            f.write(json.dumps({"unit": name, **result}) + "\n")


def unit(root, name, steps, step_s, fail):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "result.json").exists():
        append_row(root, name, json.loads((folder / "result.json").read_text()))
        return 0
    start = int((folder / "ckpt").read_text()) if (folder / "ckpt").exists() else 0
    with open(folder / "starts.log", "a") as f:
        f.write(f"{start} {os.environ.get('SLURM_JOB_ID', '-')}\n")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append("TERM"))
    signal.signal(signal.SIGUSR1, lambda *_: stop.append("USR1"))
    for step in range(start, steps):
        time.sleep(step_s)
        with open(folder / "steps.log", "a") as f:
            f.write(f"{step}\n")
        if fail:
            (folder / "failed.txt").write_text(f"step {step}: the loss is not finite\n")
            return 3
        if stop:  # checkpoint after the step in progress, then exit
            write(folder / "ckpt", str(step + 1))
            return 143
    result = {"steps": steps, "end": time.time()}
    write(folder / "result.json", json.dumps(result))
    append_row(root, name, result)
    return 0


def collect(root):
    done, failed = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if (folder / "result.json").exists():
            append_row(root, folder.name, json.loads((folder / "result.json").read_text()))
            done.append(folder.name)
        elif (folder / "failed.txt").exists():
            failed.append(folder.name)
    write(root / "collected.json", json.dumps({"start": time.time(), "done": done, "failed": failed}))
    print(f"finished: {' '.join(done) or '-'}")
    print(f"failed: {' '.join(failed) or '-'}")
    return 1 if failed else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[0] == "--collect":
        sys.exit(collect(Path(args[1])))
    step_s = float(args[args.index("--step-s") + 1]) if "--step-s" in args else 0.1
    sys.exit(unit(Path(args[0]), args[1], int(args[2]), step_s, "--fail" in args))
