#!/usr/bin/env bash
# Start a two-node SLURM cluster on this machine (for the tests and for trying slurm/train.sh):
#
#     sudo slurm/cluster/up.sh        # install slurm-wlm + munge if missing, start munged, slurmctld, slurmd n1 n2
#     sinfo                           # debug* up infinite 2 idle n[1-2]
#     sudo slurm/cluster/down.sh      # stop the daemons (by PID)
#
# Idempotent: when everything is already running with the same slurm.conf it only prints the status.
# Needs root (Debian/Ubuntu with apt). Nodes n1 and n2 have one CPU each and both live at 127.0.0.1,
# so a `-N 2` job really starts one torchrun per "node" and its ranks rendezvous over TCP.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons): sudo $0"

install_packages() {
    local pkgs=(slurmctld slurmd slurm-client munge)
    if dpkg-query -W -f='${Status}\n' "${pkgs[@]}" 2>/dev/null | grep -vq '^install ok installed$' \
        || [[ $(dpkg-query -W -f='${Status}\n' "${pkgs[@]}" 2>/dev/null | wc -l) -ne ${#pkgs[@]} ]]; then
        log "installing ${pkgs[*]}"
        command -v apt-get >/dev/null || die "apt-get not found: install ${pkgs[*]} by hand"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
    fi
}

# n1 and n2 must resolve to this machine for srun, and torchrun's rendezvous endpoint is a node name.
ensure_hosts() {
    local n
    for n in "${NODES[@]}"; do
        getent hosts "$n" >/dev/null || { echo "127.0.0.1 ${NODES[*]}" >> /etc/hosts; break; }
    done
}

# Renders the template; returns 0 when the installed slurm.conf changed (daemons must restart).
write_conf() {
    local host new
    host=$(hostname -s)
    new=$(sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$STATE|g" "$CLUSTER_DIR/slurm.conf.in")
    mkdir -p /etc/slurm "$STATE"/{ctld,run,log} "${NODES[@]/#/$STATE/spool/}"
    if [[ -f $CONF ]] && [[ "$(cat "$CONF")" == "$new" ]]; then return 1; fi
    printf '%s\n' "$new" > "$CONF"
    log "wrote $CONF"
}

# submitit calls sacct; without an accounting database it must read the completion log instead.
install_sacct_shim() {
    if ! cmp -s "$CLUSTER_DIR/sacct" /usr/local/bin/sacct; then
        install -m 0755 "$CLUSTER_DIR/sacct" /usr/local/bin/sacct
        log "installed the sacct shim at /usr/local/bin/sacct"
    fi
}

start_munge() {
    pidfile_alive "$MUNGE_PID" && return 0
    [[ -s /etc/munge/munge.key ]] || { mungekey --create; chown munge:munge /etc/munge/munge.key; }
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    rm -f "$MUNGE_PID" /run/munge/munge.socket.2*
    runuser -u munge -- /usr/sbin/munged
    log "started munged"
}

start_daemons() {
    local n pf
    if ! pidfile_alive "$CTLD_PID"; then
        rm -f "$CTLD_PID"
        slurmctld
        log "started slurmctld"
    fi
    for n in "${NODES[@]}"; do
        pf=$(node_pid_file "$n")
        if ! pidfile_alive "$pf"; then
            rm -f "$pf"
            slurmd -N "$n"
            log "started slurmd $n"
        fi
    done
}

wait_idle() {
    local i states
    for i in $(seq 1 60); do
        states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)
        # A node can be busy with someone's job (alloc/mix): that is healthy too.
        if [[ $(grep -cE '^n[12] (idle|alloc|mix|comp)$' <<<"$states") -eq ${#NODES[@]} ]]; then
            sinfo
            return 0
        fi
        # Nodes left down by an earlier run (or by the lost-node test) are put back in service.
        if (( i == 5 )); then scontrol update nodename=n1,n2 state=resume 2>/dev/null || true; fi
        sleep 0.5
    done
    echo "$states" >&2
    die "nodes did not become idle within 30 s; see $STATE/log/"
}

install_packages
ensure_hosts
if write_conf; then
    "$CLUSTER_DIR/down.sh" --quiet
fi
install_sacct_shim
start_munge
start_daemons
wait_idle
