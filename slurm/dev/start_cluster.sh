#!/bin/bash
# Start a real local Slurm cluster (Debian slurm-wlm 22.05 + munge) for tests and for trying the sbatch
# scripts: one controller and one or two nodes on this machine, everything (config, munge key and
# socket, state, spool, logs, pid files) in one folder, so it neither needs nor touches /etc/slurm.
#
# Usage: bash slurm/dev/start_cluster.sh [--nodes 1|2] [--dir DIR]
#   --nodes 2 simulates two nodes on this host (`slurmd -N n1` and `-N n2`, each with its own port).
#   --dir defaults to a new temp folder. Prints `export SLURM_CONF=DIR/slurm.conf` on its last line;
#   stop with `bash slurm/dev/stop_cluster.sh DIR`.
# Run as root (the daemons run as root, munged as the munge user). Node names are n1, n2 with
# NodeAddr=127.0.0.1, names that do not resolve: jobs must take the address from `scontrol show node`.
set -euo pipefail
nodes=1
dir=
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) nodes=$2; shift 2 ;;
        --dir) dir=$2; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "start_cluster.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$nodes" in 1|2) ;; *) echo "start_cluster.sh: --nodes must be 1 or 2, got $nodes" >&2; exit 2 ;; esac
for bin in slurmctld slurmd munged sinfo; do
    if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then
        echo "start_cluster.sh: $bin not found; install Slurm with: bash slurm/dev/install.sh" >&2
        exit 3
    fi
done
export PATH="$PATH:/usr/sbin"
dir=${dir:-$(mktemp -d /tmp/m2train-slurm.XXXXXX)}
dir=$(cd "$dir" 2>/dev/null && pwd || { mkdir -p "$dir" && cd "$dir" && pwd; })
mkdir -p "$dir"/{run,log,state,spool}
# munged runs as the munge user, which must reach its key, socket and log: DIR may sit under a private
# parent (pytest's tmp folders are 0700), so munge gets its own folder under /tmp, linked as DIR/munge.
if [ ! -L "$dir/munge" ]; then
    ln -s "$(mktemp -d /tmp/m2train-munge.XXXXXX)" "$dir/munge"
fi

# Free TCP ports for the controller and each node, so several clusters (or a system Slurm) can coexist.
read -r -a ports < <(python3 - "$nodes" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(1 + int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)

# munge: a private key and socket, so this cluster works whether or not a system munged runs.
mdir=$(readlink -f "$dir/munge")
chown munge:munge "$mdir"
chmod 711 "$mdir"     # munged: clients must be able to reach the socket
if [ ! -f "$mdir/munge.key" ]; then
    dd if=/dev/urandom of="$mdir/munge.key" bs=1024 count=1 status=none
fi
chown munge:munge "$mdir/munge.key"
chmod 400 "$mdir/munge.key"
sock="$mdir/munge.sock"
runuser -u munge -- munged --socket="$sock" --key-file="$mdir/munge.key" \
    --pid-file="$mdir/munged.pid" --log-file="$mdir/munged.log" --seed-file="$mdir/munged.seed"
for _ in $(seq 50); do [ -S "$sock" ] && [ -s "$mdir/munged.pid" ] && break; sleep 0.1; done
cp "$mdir/munged.pid" "$dir/run/munged.pid"

cpus=$(nproc)
# Leave the OS some memory; Slurm rejects jobs asking for more than RealMemory.
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
host=$(hostname -s)
{
    cat <<CONF
# Written by slurm/dev/start_cluster.sh ($(date -u +%FT%TZ)).
ClusterName=m2train-dev
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job becomes eligible again only this many seconds later (default 120).
AuthInfo=socket=${sock},cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule within seconds (defaults: 60 s main loop, 30 s backfill) so tests need not wait for a pass.
SchedulerParameters=sched_interval=2,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
# Finished jobs stay visible to \`scontrol show job\` for 10 minutes (there is no accounting database).
MinJobAge=600
KillWait=30
StateSaveLocation=${dir}/state
SlurmdSpoolDir=${dir}/spool/%n
SlurmctldPidFile=${dir}/run/slurmctld.pid
SlurmdPidFile=${dir}/run/slurmd-%n.pid
SlurmctldLogFile=${dir}/log/slurmctld.log
SlurmdLogFile=${dir}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
CONF
    names=()
    for i in $(seq "$nodes"); do
        echo "NodeName=n$i NodeHostname=${host} NodeAddr=127.0.0.1 Port=${ports[$i]} CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN"
        names+=("n$i")
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${names[*]}") Default=YES MaxTime=INFINITE State=UP"
} > "$dir/slurm.conf"
export SLURM_CONF="$dir/slurm.conf"

slurmctld -f "$SLURM_CONF" -i
for i in $(seq "$nodes"); do
    mkdir -p "$dir/spool/n$i"
    slurmd -f "$SLURM_CONF" -N "n$i"
done

# Wait until every node is idle (a fresh controller lists them as unknown/down for a moment).
for _ in $(seq 150); do
    idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l || true)
    [ "$idle" -ge "$nodes" ] && break
    sleep 0.2
done
if [ "${idle:-0}" -lt "$nodes" ]; then
    echo "start_cluster.sh: nodes not idle after 30 s; see $dir/log/" >&2
    sinfo -N >&2 || true
    exit 1
fi
echo "cluster up: $nodes node(s), logs in $dir/log; stop with: bash slurm/dev/stop_cluster.sh $dir"
echo "export SLURM_CONF=$SLURM_CONF"
