#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests and demos (Debian's slurm-wlm 22.05 +
# munge, run as root).  Usage:
#   launch/local_slurm.sh start STATE_DIR   # prints `export SLURM_CONF=...`; idempotent
#   launch/local_slurm.sh stop STATE_DIR
# Needs: apt-get install slurmctld slurmd slurm-client munge. No cgroups are used (containers
# rarely allow them): proctrack/linuxproc; task/affinity binds each task to its cores with
# sched_setaffinity, as production clusters do, so a task sees only the CPUs it was given.
set -euo pipefail
cmd=${1:?usage: local_slurm.sh start|stop STATE_DIR}
state=$(mkdir -p "${2:?usage: local_slurm.sh start|stop STATE_DIR}" && cd "$2" && pwd)
conf="$state/slurm.conf"
host=$(hostname -s)

stop() {
  # munged only when this cluster started it (munged.pid is written then).
  for pidfile in "$state/slurmd.pid" "$state/slurmctld.pid" "$state/munged.pid"; do
    if [[ -f $pidfile ]]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
}

if [[ $cmd == stop ]]; then
  # Let running jobs end first: killing slurmd under a finishing job orphans its slurmstepd.
  if [[ -f $conf && -f $state/slurmctld.pid ]]; then
    export SLURM_CONF="$conf"
    scancel --full --quiet --partition debug 2>/dev/null || true
    for _ in $(seq 60); do
      [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
      sleep 0.5
    done
  fi
  stop
  exit 0
fi
[[ $cmd == start ]] || { echo "unknown command $cmd (start|stop)" >&2; exit 2; }
for tool in slurmctld slurmd munged sbatch; do
  command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install slurmctld slurmd slurm-client munge" >&2; exit 3; }
done

# munge authenticates every Slurm message; one daemon serves all clusters on the host.
munge_pid=/run/munge/munged.pid
if ! { [[ -f $munge_pid ]] && kill -0 "$(cat "$munge_pid")" 2>/dev/null; }; then
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [[ -s /etc/munge/munge.key ]] || { mungekey --create --force && chown munge:munge /etc/munge/munge.key; }
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 20); do [[ -s $munge_pid ]] && break; sleep 0.25; done
  cp "$munge_pid" "$state/munged.pid"
fi

cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p "$state/spool" "$state/ctld"
cat > "$conf" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
AuthType=auth/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
TaskPluginParam=Cores
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
MpiDefault=none
KillWait=30
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

for pidfile in "$state/slurmd.pid" "$state/slurmctld.pid"; do  # a previous start of this cluster
  [[ -f $pidfile ]] && { kill "$(cat "$pidfile")" 2>/dev/null || true; rm -f "$pidfile"; }
done
slurmctld -f "$conf"
slurmd -f "$conf"
export SLURM_CONF="$conf"
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "export SLURM_CONF=$conf"
    exit 0
  fi
  sleep 0.5
done
echo "the local SLURM node did not become idle in 30 s; see $state/slurmctld.log and $state/slurmd.log" >&2
sinfo >&2 || true
exit 1
