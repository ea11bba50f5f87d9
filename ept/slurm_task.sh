task=${SLURM_ARRAY_TASK_ID:?"run under sbatch, or set SLURM_ARRAY_TASK_ID=i for line i+1"}
unit=$(sed -n "$((task + 1))p" "$plan")
[ -n "$unit" ] || { echo "no line $((task + 1)) in $plan" >&2; exit 2; }
echo "== $(date -Is) task $task of ${SLURM_ARRAY_JOB_ID:-(no job)}," \
     "start $((${SLURM_RESTART_COUNT:-0} + 1)), on $(hostname): $unit"

# USR1: the time limit is near (--signal); TERM: scancel, preemption or scontrol requeue; INT:
# Ctrl-C when run by hand. Each sends SIGTERM to every process of the unit: train.py writes its
# checkpoint and exits, and this shell waits for it (the unit runs in the background: bash runs a
# trap only between commands). setsid gives the unit its own process group, so the signal reaches
# train.py behind a `cd ... &&`; the unit's bash outlives SIGTERM (trap :) until train.py exits.
got= n=0
stop() { got=$1 n=$((n + 1)); kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null; }
trap 'stop USR1' USR1
trap 'stop TERM' TERM
trap 'stop INT' INT
setsid bash -c "trap : TERM; $unit" &
pid=$!
while :; do
  seen=$n; wait "$pid"; rc=$?
  if [ "$rc" -le 128 ] || [ "$n" = "$seen" ]; then break; fi  # the unit's status, not a trap's
done

if [ "$rc" -eq 0 ]; then
  echo "== $(date -Is) unit finished"
elif [ "$got" = USR1 ] && [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
  echo "== $(date -Is) time limit near: unit stopped (exit $rc); requeueing this task to resume it"
  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${task}"
elif [ -n "$got" ]; then
  echo "== $(date -Is) unit stopped by SIG$got (exit $rc); it resumes when run again"
else
  echo "== $(date -Is) unit failed (exit $rc): $unit"
fi
exit "$rc"
