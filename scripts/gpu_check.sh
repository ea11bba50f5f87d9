#!/usr/bin/env bash
# GPU check for packing (one short script, ~5-8 minutes on an H200): what the packed GPU-hours of the dry
# run rest on, measured. Prints examples/s, step time, achieved TFLOP/s, MFU and peak memory per pack size R.
#
#   bash scripts/gpu_check.sh            # on a GPU machine; figures also in $OUT (or /tmp/gpu_check/) as JSON
#   bash scripts/gpu_check.sh --cpu      # the same steps on the CPU with tiny sizes (checks the script, ~1 min)
#
# Models are random-weight T5s built from ../shared/data/t5/<size>/config.json (no download); inputs are
# RTE-like (82 input + 2 target ids, docs/packing.md), 16 examples per run, every run `ept`.
set -uo pipefail
cd "$(dirname "$0")/.."
CFG=${T5_CONFIGS:-../shared/data/t5}
OUTDIR=${OUT:-/tmp/gpu_check}
mkdir -p "$OUTDIR"
if [[ "${1:-}" == "--cpu" ]]; then
  DEV=cpu; SMALL="--runs 1 2 --batch-size 2 --length 16 --steps 1 --warmup 0 --update-runs 0"
  BASE=$CFG/t5-small; LARGE=$CFG/t5-small; LARGE_RUNS="--runs 1 2"; TESTS="tests/test_packing.py -k bench"
else
  DEV=cuda; SMALL="--steps 3 --warmup 1 --max-rows 0 --update-runs 32"
  BASE=$CFG/t5-base; LARGE=$CFG/t5-large; LARGE_RUNS="--runs 1 8"; TESTS="tests -m gpu"
fi
echo "== what this image holds: Hugging Face caches and model folders (nothing is downloaded)"
for d in "${HF_HOME:-}" ~/.cache/huggingface /root/.cache/huggingface "$CFG"; do
  [[ -n "$d" && -d "$d" ]] && { echo "-- $d"; find "$d" -maxdepth 3 | head -30; }
done
[[ $DEV == cuda ]] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
run() { echo "== $*"; timeout 240 python scripts/bench_pack.py --device $DEV "$@" || echo "(exit $?)"; }
if [[ $DEV == cuda ]]; then
  run --config "$BASE" --dtype bf16 --runs 1 4 16 32 64 128 $SMALL --json "$OUTDIR/t5-base_bf16.json"
  run --config "$BASE" --dtype fp32 --runs 1 4 16 32 64 $SMALL --update-runs 0 --json "$OUTDIR/t5-base_fp32.json"
else
  run --config "$BASE" --dtype bf16 $SMALL --json "$OUTDIR/t5-base_bf16.json"
  run --config "$BASE" --dtype fp32 $SMALL --json "$OUTDIR/t5-base_fp32.json"
fi
run --config "$LARGE" --dtype bf16 $SMALL $LARGE_RUNS --update-runs 0 --json "$OUTDIR/t5-large_bf16.json"
echo "== CUDA-marked tests (and the packing tests' benchmark entry point)"
timeout 180 python -m pytest -q $TESTS 2>&1 | tail -5
echo "== done: JSON in $OUTDIR"
