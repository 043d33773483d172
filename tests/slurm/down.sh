#!/usr/bin/env bash
# Stop the private cluster up.sh started in $SLURM_LOCAL_STATE: cancel the jobs named in
# $SLURM_LOCAL_STATE/jobs (the ones the tests submitted), then stop its own daemons by recorded pid
# (TERM, then KILL after 30 s). Nothing else is touched.
STATE=${SLURM_LOCAL_STATE:?set SLURM_LOCAL_STATE to the folder up.sh used}
export SLURM_CONF=$STATE/slurm.conf
if [ -s "$STATE/jobs" ]; then scancel $(cat "$STATE/jobs") 2>/dev/null; sleep 1; fi
alive() {  # running and not a zombie (init here reaps orphans late; kill -0 is true for zombies)
  [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat")" != Z ]
}
for name in slurmd slurmctld munged; do
  f="$STATE/$name.pid"; [ -s "$f" ] || continue
  pid=$(cat "$f")
  if alive "$pid" && [ "$(cat /proc/$pid/comm)" = "$name" ]; then
    kill "$pid"
    for _ in $(seq 1 300); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && { echo "$name $pid ignored TERM, killing"; kill -9 "$pid"; }
  fi
  rm -f "$f"
done
