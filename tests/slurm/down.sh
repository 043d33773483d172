#!/usr/bin/env bash
# Stop only the daemons slurm-up.sh started (pids it recorded), TERM then KILL after 30 s.
STATE=${SLURM_LOCAL_STATE:-/tmp/slurm-local}
# cancel whatever is still queued/running so slurmd has no steps left
ids=$(squeue -h -o %i 2>/dev/null || true); [ -n "$ids" ] && scancel $ids && sleep 1
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
