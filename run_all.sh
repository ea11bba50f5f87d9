#!/usr/bin/env bash
# EPT: Explosive Prompt Tuning -- every table and figure of the paper, one section each.
#
# Hardware: the paper used 10 RTX A6000s. Estimate for this recipe (DRY_RUN=1 prints it): about
# 3,528 distinct runs, ~1,980 GPU-hours on one H200 per run, from step times measured there (ablate.py,
# docs/experiments.md) (Table 1 with the SuperGLUE lr search is ~70% of it), plus the Figure 10 transfer
# evaluations. Disk: prompt runs keep small checkpoints; an `ft` run's best.pt/last.pt hold T5 and
# its AdamW state (~2.7 GB each on t5-base, ~9 GB on t5-large, ~3 TB over the recipe), so this
# recipe deletes them once the run's metrics are collected (--prune-ft-checkpoints). Needs the
# Hugging Face Hub (t5-small/base/large and the datasets) or local copies (prepare_data.py --source).
#
#   bash run_all.sh                  # everything; resumable: rerun after a crash, finished runs are skipped
#   GPUS=8 bash run_all.sh           # a local pool: 8 child processes, each pinned to its GPU, one plan per section
#   GPUS=8 NPROC=2 bash run_all.sh   # 4 children, each unit on 2 GPUs through torchrun (global batch stays 16)
#   NPROC=4 bash run_all.sh          # one run at a time, on 4 GPUs through torchrun
#   DRY_RUN=1 GPUS=8 bash run_all.sh # every run with its status, counts, GPU-hours and the wall time on 8 GPUs
#   PART=setup|train|report bash run_all.sh   # one part: data; the training sections; analyses + report
#   DTYPE=bf16 bash run_all.sh       # bf16 autocast: faster, not our fp32 reading (the default; the paper names no precision)
#   SMOKE=1 bash run_all.sh          # the whole recipe tiny on a CPU in a few minutes -> smoke/report/
#   SECTIONS="init hidden" bash run_all.sh   # only these training sections (names: see `section` below)
#   SLURM=1 SLURM_PARTITION=gpu SLURM_TIME=12:00:00 SLURM_MAX_TASKS=32 SLURM_OPTS="--account=nlp" \
#     bash run_all.sh                # a SLURM cluster: each section one job array (+ its collect job),
#                                    # one after another; the analyses and report as a job after them all
#
# Plans: each section's driver writes its plan, results/<experiment>.plan (one unit a line: a pack of prompt
# runs or a solo run, a complete shell command), runs it (in this process, or GPUS/NPROC pool children that
# take the units longest first), then appends each finished run's row once. Any engine can run the same lines
# (docs/experiments.md, "The plan"); Ctrl-C stops everything, a rerun resumes what was left.
#
# SLURM=1 (docs/experiments.md, "SLURM"): setup runs here (the data, on a shared file system); each training
# section's driver submits its plan with --slurm: one array, task i = line i, SLURM_GPUS GPUs a task (default
# NPROC; 0 on a CPU cluster), SLURM_MAX_TASKS at once, SLURM_TIME each (a unit checkpoints before it and
# requeues), SLURM_PARTITION, SLURM_OPTS (sbatch options, space-separated, for every job), then its collect
# job after it. Sections share runs (a Table 1 cell is a Figure 5/8/9 or Table 6 point), so each array
# waits until the previous section's array ended (afterany). The analyses and report (`PART=report`) are one
# more job after every collect job. Submitting again resumes: finished units exit at once. Plans are made on
# this machine: without a GPU here, packs are of one run unless PACK_SIZE=R is given.
#
# SMOKE: a random-weight tiny T5 with a tokenizer trained offline (SMOKE_TOKENIZER=DIR uses a real
# one), the fixture files in tests/fixtures/raw, 6 training steps, 1 seed where the paper uses 3
# and 2 where it uses 6, k = 4 only, no lr search, every task and every section, one CPU thread per
# run (a tiny model gains nothing from more, and thread oversubscription on a busy machine slows it
# 30x); everything under smoke/. Its numbers are noise: it proves the recipe runs end to end and that
# every table and figure gets drawn.
set -euo pipefail
cd "$(dirname "$0")"
# a failing stage stops the recipe with one line naming it (its own message is just above)
trap 'echo "run_all.sh: stage failed (exit $?) at line $LINENO: ${STAGE:-$BASH_COMMAND}; fix it and rerun" \
  "(finished runs are skipped)" >&2' ERR

NPROC=${NPROC:-1}
GPUS=${GPUS:-}                 # GPUs of this node to fill: GPUS/NPROC pool children (unset: one unit at a time)
PART=${PART:-all}              # all | setup | train | report
DRY=${DRY_RUN:+--dry-run}
SLURM=${SLURM:-0}              # 1: submit each section to SLURM (see above)
ALL_SECTIONS="table1 table2 fewshot table4 init hidden broadcast lr structure steer"
SECTIONS=${SECTIONS:-$ALL_SECTIONS}
case $PART in all|setup|train|report) ;; *) echo "PART=$PART: use all, setup, train or report" >&2; exit 2;; esac
for s in $SECTIONS; do
  [[ " $ALL_SECTIONS " == *" $s "* ]] || { echo "SECTIONS: no section $s (sections: $ALL_SECTIONS)" >&2
                                           exit 2; }
done
if [[ $SLURM == 1 && -n $GPUS ]]; then
  echo "SLURM=1 hands each unit to its own array task; GPUS is for one node without SLURM: set one" >&2; exit 2
fi
part() { [[ $PART == all || $PART == "$1" ]]; }
if [[ "${SMOKE:-0}" == 1 ]]; then
  ROOT=smoke
  MODEL=smoke/tiny-t5 SIZES=smoke/tiny-t5 LR_SIZES=smoke/tiny-t5 SEEDS="--seeds 0" FEWSHOT="--shots 4 --seeds 0 1" LR_SEARCH=""
  TRAIN="--max-steps 6 --eval-every 3 --batch-size 4 --max-eval-examples 8 --eval-batch-size 8"
  NAMED="_steps6_ev3"  # a run's name carries the options that differ from train.py's defaults (docs/training.md)
  EPOCHS="--epochs 1" LAUNCH="" REPORT_FLAGS="--smoke"  # index.md says the numbers are noise
  export OMP_NUM_THREADS=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
else
  ROOT=.
  MODEL=t5-base SIZES="t5-small t5-base t5-large" LR_SIZES="t5-base t5-large" SEEDS="" FEWSHOT="" LR_SEARCH="--lr-search" TRAIN="" EPOCHS=""
  LAUNCH="--subprocess --prune-ft-checkpoints"  # a fresh process per run frees GPU memory and cached data
  REPORT_FLAGS="" NAMED=""
fi
TRAIN="$TRAIN ${DTYPE:+--dtype $DTYPE}"  # DTYPE=bf16|tf32: faster, not our fp32 reading (the default)
DATA=$ROOT/data RUNS=$ROOT/runs RESULTS=$ROOT/results REPORT=$ROOT/report
COMMON="--data-dir $DATA --runs-dir $RUNS --results-dir $RESULTS --nproc $NPROC ${GPUS:+--gpus $GPUS} $LAUNCH $DRY"
COMMON="$COMMON ${PACK_SIZE:+--pack-size $PACK_SIZE} ${SLURM_MAX_TASKS:+--slurm-max-tasks $SLURM_MAX_TASKS}"
SLURM_GPUS=${SLURM_GPUS:-$NPROC}
if [[ $SLURM == 1 ]]; then
  SUBMIT="--slurm --slurm-gpus $SLURM_GPUS ${SLURM_PARTITION:+--slurm-partition $SLURM_PARTITION}"
  SUBMIT="$SUBMIT ${SLURM_TIME:+--slurm-time $SLURM_TIME}"
  for o in ${SLURM_OPTS:-}; do SUBMIT="$SUBMIT --slurm-option=$o"; done
fi
ARRAY="" COLLECTS=""  # SLURM=1: the last section's array job, and every section's collect job (a:b:...)

# section NAME DRIVER...: one training section (skipped unless SECTIONS names it). SLURM=1: the driver submits
# its plan after the previous section's array (the ids are read from slurm.py's "submitted" line).
section() {
  local name=$1 out collect; shift
  [[ " $SECTIONS " == *" $name "* ]] || return 0
  # a failing driver returns its status here (`|| return`), and the ERR trap names STAGE
  STAGE="$*"
  if [[ $SLURM != 1 || -n "$DRY" ]]; then "$@" || return; STAGE=; return; fi
  out=$(mktemp)
  "$@" $SUBMIT ${ARRAY:+--slurm-after $ARRAY} | tee "$out" || return
  STAGE=
  read -r ARRAY collect < <(sed -n \
    's/^submitted .*: array job \([0-9]*\) .*, collect job \([0-9]*\) after it$/\1 \2/p' "$out") || true
  rm -f "$out"
  [[ -n $collect ]] || { echo "run_all.sh: no job ids in $name's submission (above)" >&2; exit 1; }
  COLLECTS+=${COLLECTS:+:}$collect
}
TAG=$(basename "$MODEL")
[[ -n "$DRY" ]] && rm -f "$RESULTS/dry_run.tsv"

# --- Setup: the T5 (SMOKE: a tiny random one) and the 21 tasks' data (+ few-shot samples)
if part setup && [[ -z "$DRY" && "${SMOKE:-0}" == 1 ]]; then
  [[ -f $MODEL/config.json ]] || python scripts/make_tiny.py $MODEL ${SMOKE_TOKENIZER:+--tokenizer $SMOKE_TOKENIZER}
  python prepare_data.py --source tests/fixtures/raw --tasks all --out $DATA --tokenizer $MODEL --fewshot 4 --fewshot-seeds 0 1
elif part setup && [[ -z "$DRY" ]]; then
  python prepare_data.py --tasks all --out $DATA --tokenizer t5-base --fewshot 4 16 32 --fewshot-seeds 0 1 2 3 4 5
fi

if part train || [[ -n "$DRY" ]]; then
# --- Table 1: GLUE + SuperGLUE, 6 methods x 3 sizes x 3 seeds (+ the SuperGLUE lr search of Appendix B.2);
#     Figure 1 is drawn from these runs by report.py
section table1 python ablate.py table1 --models $SIZES $LR_SEARCH $SEEDS $COMMON $TRAIN

# --- Table 2: MRQA + Others on t5-base
section table2 python ablate.py table2 --model $MODEL $SEEDS $COMMON $TRAIN

# --- Table 3: few-shot k = 4, 16, 32 on the 13 tasks, 6 seeds, 10K steps
section fewshot python fewshot.py --model $MODEL $FEWSHOT $COMMON $TRAIN

# --- Table 4: 5 SuperGLUE tasks in the ATTEMPT setting (20/10 epochs validated every epoch, PT n = 100,
#     EPT/EPT* with one extra 1x1 layer)
section table4 python ablate.py table4 --model $MODEL $EPOCHS $SEEDS $COMMON $TRAIN

# --- Table 6: EPT prompt initialisation (uniform / vocabulary / label words)
section init python ablate.py init --model $MODEL $SEEDS $COMMON $TRAIN

# --- Figures 5 and 12: EPT hidden size h in {1, 5, 10, 50, 100, 500, 1000}
section hidden python ablate.py hidden --model $MODEL $SEEDS $COMMON $TRAIN

# --- Figure 7: EPT* broadcast length 1..10 on MultiRC and CoLA
section broadcast python ablate.py broadcast --model $MODEL $SEEDS $COMMON $TRAIN

# --- Figure 8: learning rates {0.003 .. 0.3} for PT, ResPrompt, EPT, EPT* on t5-base and t5-large (§5.3);
#     the same runs as Table 1's SuperGLUE lr search, so nothing new trains here after Table 1
section lr python ablate.py lr --models $LR_SIZES $SEEDS $COMMON $TRAIN

# --- Figure 9: EPT + LayerNorm / residual / ReLU / Tanh / Sigmoid
section structure python ablate.py structure --model $MODEL $SEEDS $COMMON $TRAIN

# --- The steering benchmark (not in the paper; docs/experiments.md): every method on a small frozen backbone
#     that prompts can steer (assets/steer/backbone), 10 seeds, PT/EPT/EPT* on the lr grid 0.03 / 0.3 / 3 (the
#     lr chosen on validation, Appendix B.2), the no-prompt floor, its own 100-step schedule (not $TRAIN's), the
#     prompt runs in packs of 10. In SMOKE too, with seeds 0-2 only and a pool of 2 CPU processes (--slots 2):
#     there it is the one table whose numbers mean something.
#     report.py draws its table, mu_t figure and EPT's s_t. Left out of the dry run (its counts: the paper's grid)
[[ -n "$DRY" ]] || section steer python ablate.py steer $COMMON \
  $([[ "${SMOKE:-0}" == 1 && -z "$GPUS" && $SLURM != 1 ]] && echo --slots 2) $([[ "${SMOKE:-0}" == 1 ]] && echo --seeds 0 1 2)
fi

if [[ -n "$DRY" ]]; then  # every run once, in the first section that lists it (the one that trains it)
  # The headline is the precision this recipe trains at (DTYPE, default fp32: the paper's), packed as the drivers
  # pack on a GPU (columns 5-8: GPU-hours fp32 unpacked, fp32 packed, bf16 unpacked, bf16 packed; packed, and fp32,
  # are the FLOP model of a step (ept/costs.py), not measured on a GPU yet; scripts/gpu_check.sh measures it; column 3:
  # the measured bf16 step, unpacked). Wall time: the sections run one after another; within one, GPUS/NPROC
  # children (or as many SLURM array tasks at once) take the next unit (column 9: its pack), so a section lasts
  # between max(its GPU-hours / GPUs, its longest unit / NPROC) and GPU-hours / GPUs + its longest unit / NPROC.
  awk -F'\t' -v G="${GPUS:-$(( ${SLURM_MAX_TASKS:-1} * NPROC ))}" -v P="$NPROC" -v D="${DTYPE:-fp32}" 'BEGIN { c = (D == "bf16" ? 8 : 6) }
    !seen[$4]++ { n++; h += $3; if ($2 != "done") {
      t++; th += $c; s[$1] += $c; u[$1 SUBSEP $9] += $c; if (u[$1 SUBSEP $9] > m[$1]) m[$1] = u[$1 SUBSEP $9]
      tm += $3; fu += $5; fp += $6; bu += $7; bp += $8 } }
    END { for (e in s) { a = s[e] / G; b = m[e] / P; lo += (a > b ? a : b); hi += a + b }
      printf "DRY-RUN TOTAL: %d distinct runs, %d to train, ~%.0f GPU-hours to go at %s (%s; packed), ", n, t, th, \
        (D == "bf16" ? "bf16" : "fp32"), (D == "bf16" ? "DTYPE=bf16" : "the default precision, the paper\047s")
      printf "wall ~%.0f-%.0f h on %d GPU(s) = %d unit(s) at once x %d GPU(s) (or %d SLURM array tasks at once)\n", \
        lo, hi, G, G / P, P, G / P
      printf "DRY-RUN TOTAL GPU-hours to go: fp32 ~%.0f packed, ~%.0f unpacked; bf16 ~%.0f packed, ~%.0f unpacked ", fp, fu, bp, bu
      printf "(measured bf16 step, unpacked: ~%.0f; %.0f for all runs); packed and fp32 figures are a model until ", tm, h
      printf "measured on a GPU\n" }' "$RESULTS/dry_run.tsv"
  exit 0
fi
part report || exit 0
if [[ $SLURM == 1 ]]; then  # the analyses and report (this script's report part) as a job after the sections
  mkdir -p $RESULTS/slurm-logs
  job=$(sbatch --parsable --job-name=ept-report --output=$PWD/$RESULTS/slurm-logs/ept-report-%j.log \
    --chdir=$PWD ${COLLECTS:+--dependency=afterany:$COLLECTS} \
    ${SLURM_PARTITION:+--partition=$SLURM_PARTITION} \
    ${SLURM_TIME:+--time=$SLURM_TIME} $([[ $SLURM_GPUS == 0 ]] || echo --gres=gpu:1) ${SLURM_OPTS:-} \
    --wrap "SLURM=0 PART=report bash run_all.sh")
  job=${job%%;*}
  echo "submitted ept-report: job $job${COLLECTS:+ after the collect jobs ${COLLECTS//:/ }} (analyses and report)"
  echo "  follow:  squeue -u ${USER:-$(id -un)}   log: $RESULTS/slurm-logs/ept-report-$job.log   report: $REPORT/index.md"
  exit 0
fi

# --- Figures 2, 3, 4, 10, 11 and Appendix A.1 (neighbours; P-Tuning's two directions, each scored alone):
#     analyses of the t5-base main runs (Figure 10 scores each task's EPT* prompt on all 21 test sets: 420
#     evaluations)
python analyze.py all --model $TAG --results-dir $RESULTS

# --- Export: an EPT* prompt as a Hugging Face PEFT prompt-tuning adapter
python export.py $RUNS/rte_ept_star_${TAG}${NAMED}_s0 $ROOT/exports/rte_ept_star_${TAG} --overwrite  # a rerun re-exports

# --- Report: every table (markdown + CSV) and figure (PNG) -> report/index.md; Table 5 from data/<task>/meta.json
python report.py --results $RESULTS --out $REPORT $REPORT_FLAGS
