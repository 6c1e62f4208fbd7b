#!/usr/bin/env bash
# Multi-node training without a scheduler: run this same command on every node, then it rendezvouses.
#
#     # on each of the 2 nodes (HEAD = a host name or address every node can reach, e.g. node 0's):
#     NNODES=2 HEAD=node0.example.com bash launch/multinode.sh --preset gpt2-124m --data.path /shared/data/fineweb
#
#     # both "nodes" on this machine, CPU only (what the tests do):
#     NNODES=2 HEAD=127.0.0.1 NPROC_PER_NODE=1 bash launch/multinode.sh --preset debug &
#     NNODES=2 HEAD=127.0.0.1 NPROC_PER_NODE=1 bash launch/multinode.sh --preset debug
#
# Ranks are assigned by the c10d rendezvous (no node rank to set); the first agent to reach HEAD:PORT
# hosts the store, so HEAD must be one of the nodes. Data and --train.run_dir must be on a filesystem
# every node sees. Variables: NNODES (required), HEAD (required), PORT (29400), RUN_ID (a name shared by
# the nodes of one run; default dist_gpt), NPROC_PER_NODE (default: GPUs, else 1), MAX_RESTARTS (0),
# SHUTDOWN_TIMEOUT (300 s for the workers to save after a signal), PYTHON.
set -euo pipefail

: "${NNODES:?set NNODES to the number of nodes}"
: "${HEAD:?set HEAD to a host every node can reach, e.g. the first node}"
if [[ -z ${NPROC_PER_NODE:-} ]]; then
    NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    (( NPROC_PER_NODE > 0 )) || NPROC_PER_NODE=1
fi
MAX_RESTARTS=${MAX_RESTARTS:-0}
# With restarts, restarted gloo workers can read the previous group's addresses from the agent's
# shared rendezvous store and hang; a store of their own avoids it.
if (( MAX_RESTARTS > 0 )); then export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; fi

exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$HEAD:${PORT:-29400}" \
    --rdzv_id="${RUN_ID:-dist_gpt}" \
    --max-restarts="$MAX_RESTARTS" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 \
    --shutdown-timeout="${SHUTDOWN_TIMEOUT:-300}" \
    -m dist_gpt.train "$@"
