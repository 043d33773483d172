#!/usr/bin/env bash
# Bring up a private one-node Slurm cluster whose every file lives in $SLURM_LOCAL_STATE: config,
# munge key and socket, spool, logs, pids. Nothing under /etc, /run or /var is written, and a
# system Slurm or munge, if any, is left alone. Needs root and the packages slurmctld slurmd
# slurm-client munge (installing them is set-up: .ci/run does it; this script never installs).
# Ports: $SLURM_LOCAL_PORT and the next one (pick free ones so two clusters cannot collide).
# Prints the line to eval for clients: export SLURM_CONF=...
set -euo pipefail
for c in slurmctld slurmd sbatch munged; do
  command -v $c >/dev/null || { echo "slurm-up: $c is not installed" >&2; exit 3; }
done
STATE=${SLURM_LOCAL_STATE:?set SLURM_LOCAL_STATE to an empty folder of this cluster}
PORT0=${SLURM_LOCAL_PORT:?set SLURM_LOCAL_PORT to a free TCP port (the next one is used too)}
mkdir -p "$STATE"; chmod 755 "$STATE"
M=$STATE/munge
install -d -o munge -g munge -m 0700 "$M"
dd if=/dev/urandom of="$M/munge.key" bs=1 count=128 status=none
chown munge:munge "$M/munge.key"; chmod 0400 "$M/munge.key"
runuser -u munge -- /usr/sbin/munged --force --key-file="$M/munge.key" --socket="$M/munge.socket" \
  --pid-file="$M/munged.pid" --log-file="$M/munged.log" --seed-file="$M/munged.seed"
for _ in $(seq 1 50); do [ -s "$M/munged.pid" ] && break; sleep 0.1; done
cp "$M/munged.pid" "$STATE/munged.pid"
chmod 0711 "$M"  # Slurm's daemons and job users reach the socket
NODE=$(hostname -s)
MEM=$(free -m | awk '/^Mem:/{print $2}')
install -d -m 0755 "$STATE/ctld" "$STATE/d" "$STATE/log"
cat > "$STATE/slurm.conf" <<CONF
ClusterName=mpinntest$$
SlurmctldHost=localhost
SlurmctldPort=$PORT0
SlurmdPort=$((PORT0 + 1))
Include $(cd "$(dirname "$0")" && pwd)/common.conf
AuthInfo=socket=$M/munge.socket,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pidfile
SlurmdPidFile=$STATE/slurmd.pidfile
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc --all) RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$STATE/slurm.conf
slurmctld -f "$SLURM_CONF" -c
for _ in $(seq 1 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
cp "$STATE/slurmctld.pidfile" "$STATE/slurmctld.pid"
slurmd -f "$SLURM_CONF" -N "$NODE"
for _ in $(seq 1 50); do [ -s "$STATE/slurmd.pidfile" ] && break; sleep 0.1; done
cp "$STATE/slurmd.pidfile" "$STATE/slurmd.pid"
for _ in $(seq 1 120); do [ "$(sinfo -h -n "$NODE" -o %T 2>/dev/null)" = idle ] && break; sleep 0.25; done
[ "$(sinfo -h -n "$NODE" -o %T)" = idle ] || { tail -n 30 "$STATE"/log/*.log "$M/munged.log" >&2; exit 1; }
echo "export SLURM_CONF=$SLURM_CONF SLURM_LOCAL_STATE=$STATE"
