#!/usr/bin/env bash
# Stop the local cluster started by up.sh: slurmd n1 n2, slurmctld, munged, each by its PID.
#
#     sudo slurm/cluster/down.sh            # stop the daemons; jobs and state stay for the next up.sh
#     sudo slurm/cluster/down.sh --purge    # also forget all jobs, logs and node state
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

quiet=0 purge=0
for arg in "$@"; do
    case $arg in
        --quiet) quiet=1 ;;
        --purge) purge=1 ;;
        *) die "unknown option $arg (use --purge or --quiet)" ;;
    esac
done
say() { (( quiet )) || log "$@"; }

# SIGTERM, then SIGKILL after 10 s; a zombie left behind counts as stopped.
stop_pidfile() {
    local name=$1 pf=$2 pid i
    [[ -r $pf ]] || return 0
    pid=$(tr -dc 0-9 < "$pf")
    if pid_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do pid_alive "$pid" || break; sleep 0.2; done
        if pid_alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
        say "stopped $name (pid $pid)"
    fi
    rm -f "$pf"
}

for n in "${NODES[@]}"; do stop_pidfile "slurmd $n" "$(node_pid_file "$n")"; done
stop_pidfile slurmctld "$CTLD_PID"
stop_pidfile munged "$MUNGE_PID"
if (( purge )); then
    rm -rf "$STATE"
    say "removed $STATE"
fi
