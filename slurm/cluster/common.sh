# Shared by up.sh and down.sh: where the local cluster keeps its files, and how to tell a daemon is alive.
# shellcheck shell=bash

CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${DIST_GPT_SLURM_STATE:-/var/lib/dist-gpt-slurm}"
CONF=/etc/slurm/slurm.conf
NODES=(n1 n2)
MUNGE_PID=/run/munge/munged.pid
CTLD_PID="$STATE/run/slurmctld.pid"

node_pid_file() { echo "$STATE/run/slurmd-$1.pid"; }

# A killed daemon can linger here as a zombie that `kill -0` still reports alive: read its state instead.
pid_alive() {
    local pid=$1 state
    [[ -n "$pid" && -r "/proc/$pid/stat" ]] || return 1
    state=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ "$state" != Z && "$state" != X ]]
}

pidfile_alive() { [[ -r "$1" ]] && pid_alive "$(tr -dc 0-9 < "$1")"; }

log() { echo "[slurm-cluster] $*"; }
die() { echo "[slurm-cluster] error: $*" >&2; exit 1; }
