#!/usr/bin/env bash
# A throwaway single-node SLURM for the tests, pretending to be a HoreKa node: partitions accelerated and cpuonly,
# 4 (fake) GPUs, reservations aihero-gpu and aihero. Facts behind each line: ../shared/notes/local-slurm.md.
#
#   tests/slurm/cluster.sh up STATE_DIR     install slurm-wlm + munge if missing, start munged, slurmctld, slurmd
#   tests/slurm/cluster.sh down STATE_DIR   cancel every job, stop the daemons this script started (pid files)
#
# Everything lives in STATE_DIR (config, state, logs, pid files); the caller exports SLURM_CONF=STATE_DIR/slurm.conf
# so that sbatch, scontrol and the jobs' own srun find it. Non-default ports keep clear of a real SLURM. Needs root.
set -euo pipefail
action=${1:?usage: cluster.sh up|down STATE_DIR}
state=$(mkdir -p "${2:?usage: cluster.sh up|down STATE_DIR}" && cd "$2" && pwd)
export SLURM_CONF=$state/slurm.conf

stop_pid_file() {  # stop the process whose id the file holds, if it is still alive; bounded wait, then SIGKILL
  local file=$1 pid
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

down() {
  if [ -s "$state/slurmctld.pid" ] && kill -0 "$(cat "$state/slurmctld.pid")" 2>/dev/null; then
    timeout 10 scancel --user=root 2>/dev/null || true
    for _ in $(seq 30); do  # until the jobs' processes are gone (KillWait below is 5 s)
      [ -z "$(timeout 5 squeue -h 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  stop_pid_file "$state/slurmd.pid"
  stop_pid_file "$state/slurmctld.pid"
  stop_pid_file "$state/munged.pid"  # only written when this script started munged
}

if [ "$action" = down ]; then
  down
  exit 0
fi
[ "$action" = up ] || { echo "usage: cluster.sh up|down STATE_DIR" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "cluster.sh: needs root" >&2; exit 3; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -q >"$state/apt.log" 2>&1 || { tail -20 "$state/apt.log" >&2; exit 4; }
  # the packages' service start fails without systemd ("policy-rc.d denied"): harmless, the daemons start below
  timeout 300 apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$state/apt.log" 2>&1 \
    || { tail -20 "$state/apt.log" >&2; exit 4; }
fi

down  # leftovers of an earlier run that was killed before it could clean up
host=$(hostname -s)
mkdir -p "$state/dev"
for i in 0 1 2 3; do  # gres wants character devices for the GPU files; /dev/null's numbers do
  [ -c "$state/dev/nvidia$i" ] || mknod "$state/dev/nvidia$i" c 1 3
done
cat >"$state/slurm.conf" <<CONF
ClusterName=aiherotest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$state/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# a requeued or cancelled job gets SIGKILL 5 s after SIGTERM (default 30); finished jobs stay visible 10 min
KillWait=5
MinJobAge=600
SchedulerParameters=sched_interval=2
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
# The node claims 4 GPUs and the cores of three HoreKa nodes, whatever this machine has: 152 for each reservation
# and 152 for jobs outside them (a reservation of whole nodes keeps any job without it pending, "Reserved for
# maintenance", so the test of "sbatch train.sh -r aihero-gpu" could not see it run)
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=456 RealMemory=500000 Gres=gpu:4 State=UNKNOWN
PartitionName=accelerated Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=cpuonly Nodes=$host MaxTime=INFINITE State=UP
CONF
cat >"$state/gres.conf" <<CONF
AutoDetect=off
Name=gpu File=$state/dev/nvidia[0-3]
CONF

trap down ERR  # whatever fails from here on, no daemon is left behind
if ! munge -n </dev/null >/dev/null 2>&1; then  # no munged answering yet: start one, and stop it in `down`
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged
  cp /run/munge/munged.pid "$state/munged.pid"
  for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
fi
rm -rf "$state/ctld" "$state/spool" && mkdir -p "$state/ctld" "$state/spool"  # no job or reservation of a former run
slurmctld -c
slurmd
for _ in $(seq 60); do
  [ "$(sinfo -h -N -o %T 2>/dev/null | head -1)" = idle ] && break
  sleep 0.5
done
[ "$(sinfo -h -N -o %T 2>/dev/null | head -1)" = idle ] || {
  echo "cluster.sh: node not idle after 30 s" >&2; tail -20 "$state/slurmctld.log" "$state/slurmd.log" >&2; false; }
for name in aihero-gpu:accelerated aihero:cpuonly; do
  scontrol create reservation ReservationName="${name%:*}" PartitionName="${name#*:}" Users=root Nodes="$host" \
    CoreCnt=152 StartTime=now Duration=infinite >/dev/null
done
