#!/usr/bin/env bash
# Train on every GPU of this machine (or N CPU processes) with torchrun; arguments go to dist_gpt.train.
#
#     bash launch/single_node.sh --preset gpt2-124m --data.path data/fineweb     # one worker per visible GPU
#     NPROC_PER_NODE=2 bash launch/single_node.sh --preset debug                 # 2 CPU processes (gloo)
#     MAX_RESTARTS=3 bash launch/single_node.sh --preset cpu                     # restart the group on a crash
#
# Stopping: Ctrl-C (SIGINT) ends it at once. `kill -USR1 <torchrun pid>` (or USR2, TERM) is forwarded to
# the workers, which save a checkpoint at the next step and exit; running the same command again resumes.
set -euo pipefail

if [[ -z ${NPROC_PER_NODE:-} ]]; then
    NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    (( NPROC_PER_NODE > 0 )) || NPROC_PER_NODE=1
fi
MAX_RESTARTS=${MAX_RESTARTS:-0}
# With restarts, restarted gloo workers can read the previous group's addresses from the agent's
# shared rendezvous store and hang; a store of their own avoids it.
if (( MAX_RESTARTS > 0 )); then export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; fi

exec "${PYTHON:-python}" -m torch.distributed.run \
    --standalone \
    --nproc_per_node="$NPROC_PER_NODE" \
    --max-restarts="$MAX_RESTARTS" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 \
    --shutdown-timeout="${SHUTDOWN_TIMEOUT:-300}" \
    -m dist_gpt.train "$@"
