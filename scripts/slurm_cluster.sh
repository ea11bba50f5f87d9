#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests of the --slurm path (tests/test_slurm.py) and
# for trying a plan by hand. Run as root; there is no systemd, so the daemons are started by hand.
#
#   bash scripts/slurm_cluster.sh start    # install slurm-wlm + munge if missing, write slurm.conf,
#                                          # start munged, slurmctld, slurmd; wait until the node is idle
#   bash scripts/slurm_cluster.sh status   # sinfo; exit 0 when the node takes jobs
#   bash scripts/slurm_cluster.sh stop     # stop the three daemons (the job state is kept)
#
# `start` is idempotent: on a running cluster it only checks the node. It writes /etc/slurm/slurm.conf
# only when that file is missing or was written by this script, so a real cluster's config is never
# touched. CPUs: max(nproc, 4) (SLURM_CPUS=N overrides), so that a 4-task array of one-CPU tasks runs at
# once even on a 2-core machine; the units are GPU-bound and the test units sleep, so the CPU count
# is a slot count here. Logs: /var/log/slurm/{slurmctld,slurmd}.log.
set -uo pipefail
CONF=/etc/slurm/slurm.conf
MARK="# written by scripts/slurm_cluster.sh"
LOGS=/var/log/slurm
WAIT_S=${SLURM_WAIT_S:-60}

die() { echo "slurm_cluster: $*" >&2; exit 1; }

install() {
  local need=()
  for c in munged slurmctld slurmd sbatch; do command -v "$c" >/dev/null || need+=("$c"); done
  [[ ${#need[@]} -eq 0 ]] && return 0
  command -v apt-get >/dev/null || die "${need[*]} missing and no apt-get to install slurm-wlm and munge."
  echo "slurm_cluster: installing slurm-wlm and munge (missing: ${need[*]})"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge; } \
    >/tmp/slurm_cluster_apt.log 2>&1 \
    || die "apt-get could not install slurm-wlm and munge (see /tmp/slurm_cluster_apt.log)."
}

write_conf() {
  if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching a real cluster's config."
  fi
  local host cpus mem
  host=$(hostname -s)
  cpus=${SLURM_CPUS:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}
  mem=$(( $(free -m | awk '/^Mem:/ {print $2}') * 9 / 10 ))   # RealMemory below what free -m shows
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGS"
  cat >"$CONF.tmp" <<EOF
$MARK: a one-node test cluster.
ClusterName=ept
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds (default 120) before it may start again, and the scheduler
# looks at pending jobs every sched_interval (default 60): both short here so the tests take seconds
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=2,bf_interval=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# no slurmdbd: no accounting (sacct has nothing), the job records live MinJobAge seconds in scontrol
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# batch jobs may be requeued (scontrol requeue, sbatch --requeue); a node that was down comes back
JobRequeue=1
ReturnToService=2
# the node may declare more CPUs than the machine has (slots for GPU-bound units; see the header)
SlurmdParameters=config_overrides
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  if cmp -s "$CONF.tmp" "$CONF"; then rm "$CONF.tmp"; return 0; fi
  # a changed config: daemons that read the old one restart (reconfigure misses AuthInfo)
  if alive /run/slurmctld.pid || alive /run/slurmd.pid; then echo "slurm_cluster: slurm.conf changed"; stop; fi
  mv "$CONF.tmp" "$CONF"
}

alive() { local pid; pid=$(cat "$1" 2>/dev/null) && kill -0 "$pid" 2>/dev/null; }

# compact state: idle, mix, alloc, comp, drain, down, ...; a trailing * means slurmd does not answer
node_state() { sinfo -h -N -o %t 2>/dev/null | head -1; }

start() {
  [[ $(id -u) -eq 0 ]] || die "start needs root (it installs packages and starts daemons)."
  install
  write_conf
  # munged runs as the munge user; the Debian package creates the key on install
  [[ -f /etc/munge/munge.key ]] || mungekey --create >/dev/null 2>&1 || die "no munge key, and mungekey failed."
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if ! alive /run/munge/munged.pid; then
    runuser -u munge -- munged || die "munged did not start (see /var/log/munge/munged.log)."
  fi
  if alive /run/slurmctld.pid; then scontrol reconfigure >/dev/null 2>&1
  else slurmctld || die "slurmctld did not start (see $LOGS/slurmctld.log)."; fi
  alive /run/slurmd.pid || slurmd || die "slurmd did not start (see $LOGS/slurmd.log)."
  local t state
  for (( t = 0; t < WAIT_S; t++ )); do
    state=$(node_state)
    if [[ $state =~ ^(idle|mix|alloc|comp)$ ]] && alive /run/slurmd.pid; then
      echo "slurm_cluster: node $(hostname -s) is $state"; return 0
    fi
    # the pid file appears a moment after slurmd forked
    (( t < 5 )) || alive /run/slurmd.pid || die "slurmd stopped (see $LOGS/slurmd.log)."
    [[ $state == drain* || $state == down* ]] && scontrol update nodename="$(hostname -s)" state=resume
    sleep 1
  done
  die "the node is '${state:-not listed}' after ${WAIT_S}s, not idle" \
      "(see $LOGS/slurmctld.log and $LOGS/slurmd.log)."
}

stop() {
  # by pid file, the daemons this script started; scontrol shutdown would also stop them, but needs
  # a live controller
  local f
  for f in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    if alive "$f"; then
      kill "$(cat "$f")" 2>/dev/null
      for _ in $(seq 20); do alive "$f" || break; sleep 0.5; done
    fi
  done
  echo "slurm_cluster: stopped"
}

status() {
  command -v sinfo >/dev/null || die "SLURM is not installed (run: bash $0 start)."
  sinfo || die "no controller answers (run: bash $0 start)."
  case $(node_state) in idle|mix|alloc|comp) return 0 ;; *) return 1 ;; esac
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: bash $0 start|stop|status" >&2; exit 2 ;;
esac
