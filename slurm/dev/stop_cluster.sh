#!/bin/bash
# Stop a cluster that slurm/dev/start_cluster.sh started: every daemon named by a pid file in its folder
# gets SIGTERM, then SIGKILL if it is still alive after STOP_TIMEOUT seconds (default 10). Only those
# pids are touched, so other Slurm or munge daemons on the machine are left alone.
# Usage: bash slurm/dev/stop_cluster.sh DIR [--remove]    (--remove also deletes DIR)
set -uo pipefail
dir=${1:?usage: stop_cluster.sh DIR [--remove]}
timeout=${STOP_TIMEOUT:-10}
shopt -s nullglob
# Cancel the cluster's jobs first: their slurmstepd processes are not daemons with pid files and would
# otherwise keep running (and keep the jobs' processes alive) after slurmd is gone.
if [ -f "$dir/slurm.conf" ] && [ -f "$dir/run/slurmctld.pid" ]; then
    export SLURM_CONF="$dir/slurm.conf"
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        for _ in $(seq 50); do
            [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
fi
pids=()
for f in "$dir"/run/*.pid; do
    pid=$(tr -dc 0-9 < "$f")
    # Skip stale pid files whose process is gone (or was reused by something else than a daemon of ours).
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
        && grep -qE 'slurmctld|slurmd|munged' "/proc/$pid/comm" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    fi
done
deadline=$((SECONDS + timeout))
for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "stop_cluster.sh: pid $pid ignored SIGTERM for ${timeout}s, sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null
    fi
done
rm -f "$dir"/run/*.pid
if [ "${2:-}" = "--remove" ]; then
    [ -L "$dir/munge" ] && rm -rf "$(readlink -f "$dir/munge")"
    rm -rf "$dir"
fi
echo "stopped ${#pids[@]} daemon(s) of $dir"
