#!/usr/bin/env bash
# Bring up a one-node Slurm 22.05 cluster on this Debian 12 machine (as root, no systemd).
# Writes the pids of the daemons it starts to $SLURM_LOCAL_STATE/*.pid for slurm-down.sh.
set -euo pipefail
STATE=${SLURM_LOCAL_STATE:-/tmp/slurm-local}
mkdir -p "$STATE"
export DEBIAN_FRONTEND=noninteractive

# 1. Packages (only if missing). --no-install-recommends skips ~35 optional plugin/-dev packages.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# 2. munge: key + dirs owned by munge, daemon started as the munge user.
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged --force      # --force: get past a stale socket
  for _ in $(seq 1 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$STATE/munged.pid"
  munge -n | unmunge >/dev/null
fi

# 3. slurm.conf for one node: this host, all CPUs, memory from free -m.
NODE=$(hostname -s)
MEM=$(free -m | awk '/^Mem:/{print $2}')
install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=localcluster
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=pmi2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# 4. Daemons (they fork into the background themselves and close stdio). -c = start with clean state.
slurmctld -c
for _ in $(seq 1 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
cp /run/slurmctld.pid "$STATE/slurmctld.pid"
slurmd -c -N "$NODE"
for _ in $(seq 1 50); do [ -s /run/slurmd.pid ] && break; sleep 0.1; done
cp /run/slurmd.pid "$STATE/slurmd.pid"

# 5. Wait for the node to be idle (usually < 1 s).
for _ in $(seq 1 120); do
  [ "$(sinfo -h -n "$NODE" -o %T 2>/dev/null)" = idle ] && break; sleep 0.25
done
sinfo
[ "$(sinfo -h -n "$NODE" -o %T)" = idle ] || { tail -n 30 /var/log/slurm/*.log; exit 1; }
