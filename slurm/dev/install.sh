#!/bin/bash
# Install what slurm/dev/start_cluster.sh needs: Debian's slurm-wlm (controller, node daemon, client
# commands) and munge. Idempotent: does nothing when every binary is already there.
# Usage: sudo bash slurm/dev/install.sh      (root, or a user allowed to run apt-get)
set -euo pipefail
need=()
for bin in slurmctld slurmd sbatch munged; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need+=("$bin")
done
if [ ${#need[@]} -eq 0 ]; then
    echo "slurm/dev/install.sh: slurmctld, slurmd, sbatch and munged are already installed"
    exit 0
fi
echo "slurm/dev/install.sh: installing (missing: ${need[*]})"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q slurmctld slurmd slurm-client munge
