#!/bin/bash
# Train dist_gpt on SLURM: one torchrun per node, c10d rendezvous on the first node, requeue on warning.
#
#   mkdir -p logs/slurm     # sbatch does not create the --output directory; without it the job dies silently
#   sbatch slurm/train.sh --preset gpt2-124m                               # 1 node, 8 GPUs (header below)
#   sbatch -N 4 -p gpu -A myacct --time=2-00:00:00 slurm/train.sh --preset gpt2-124m --data.path /shared/fineweb
#   NPROC_PER_NODE=1 sbatch -N 2 --gpus-per-node=0 --cpus-per-task=1 slurm/train.sh --preset debug  # CPU nodes, gloo
#
# Every argument after the script name goes to `python -m dist_gpt.train` unchanged. sbatch flags on the
# command line override the #SBATCH lines below. The log is logs/slurm/<job name>-<job id>.out, appended
# to across requeues; the run (checkpoints, TensorBoard) is the trainer's run directory (--train.run_dir,
# by default runs/<train.name>), so submitting the same command again resumes the same run.
#
# Time limit and preemption: `--signal=B:USR2@120` warns this script 120 s before the limit. It passes the
# warning on to every process of the job step (`scancel --signal`) once the trainer is up, i.e. once
# every rank has its stop handlers (a fresh <run_dir>/run.json); a warning that arrives during start-up
# waits for that instead of killing a process that cannot handle it yet. torchrun forwards it to its
# workers instead of dying of it (--signals-to-handle); the ranks agree on the next step boundary, save
# a checkpoint, rank 0 writes <run_dir>/requeue.json and they exit 0. This script then consumes the
# marker and runs `scontrol requeue`; the requeued job runs the same command and resumes from the latest
# checkpoint. A lost node is requeued by SLURM itself (--requeue). `scancel --signal=USR2 <job id>`
# takes the same path at once. SIGTERM (scancel, preemption, the limit itself) also checkpoints, but is
# not requeued from here: a cancelled job stays cancelled.
#
# Environment overrides (export before sbatch; sbatch passes the environment on):
#   NPROC_PER_NODE     workers per node (default: GPUs allocated on the node, else visible GPUs, else 1)
#   RDZV_PORT          rendezvous port on the first node (default 20000 + job id % 10000)
#   SHUTDOWN_TIMEOUT   seconds torchrun waits for workers to save and exit after a signal (default 300)
#   MAX_RESTARTS       torchrun in-place restarts of a failed worker group (default 0: SLURM requeues)
#   PYTHON             interpreter with dist_gpt installed (default: python on PATH)
#
#SBATCH --job-name=dist_gpt
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/slurm/%x-%j.out
set -uo pipefail

PYTHON=${PYTHON:-python}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-300}
MAX_RESTARTS=${MAX_RESTARTS:-0}
RDZV_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
log() { echo "[train.sh] $(date -Is) $*"; }

# Until the trainer is up, a warning is only remembered (see the header).
WARNING=""
trap 'WARNING=USR1' USR1
trap 'WARNING=USR2' USR2

gpus_on_node() {
    if [[ ${SLURM_GPUS_ON_NODE:-0} =~ ^[1-9][0-9]*$ ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | wc -l
    else
        echo 1
    fi
}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpus_on_node)}

# The run directory exactly as the trainer resolves it (preset, --config TOML, command line), so the
# requeue marker is looked for where the trainer writes it; a bad option fails here, before srun.
RUN_DIR=$("$PYTHON" -c '
import sys
from dist_gpt import config
from dist_gpt.errors import UserError
try:
    cfg = config.parse(sys.argv[1:])
except UserError as e:
    sys.exit(f"error: {e}")
print(cfg.run_dir if cfg else "")
' "$@") || exit 2
[[ -n $RUN_DIR ]] || exit 0  # --help was printed
MARKER=$RUN_DIR/requeue.json
# A marker left by a run whose batch script was killed (SIGTERM) must not requeue this one.
rm -f "$MARKER"

# Only needed when torchrun restarts workers in place: restarted gloo workers otherwise may read the
# previous group's addresses from the shared rendezvous store and hang.
if (( MAX_RESTARTS > 0 )); then export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; fi

# Rank 0 writes run.json (a new file each time) after every rank installed its stop handlers and joined
# the process group. Compared with the one a previous run left, not by clock: nodes' clocks may differ.
run_json_id() { stat -c '%i %y' "$RUN_DIR/run.json" 2>/dev/null; }
OLD_RUN_JSON=$(run_json_id)
trainer_up() {
    local now
    now=$(run_json_id)
    [[ -n $now && $now != "$OLD_RUN_JSON" ]]
}

# Wait for srun; pass a warning on to the job step as soon as the trainer can take it (the warning
# may also have come before srun started). Returns srun's status.
wait_and_forward() {
    local pid=$1 rc
    while true; do
        if [[ -n $WARNING ]] && trainer_up; then
            log "warning SIG$WARNING: passing it to the job step"
            scancel --signal="$WARNING" "$SLURM_JOB_ID"
            WARNING=""
        fi
        if [[ -n $WARNING ]]; then
            sleep 1  # held until the trainer is up
            kill -0 "$pid" 2>/dev/null || { wait "$pid"; return; }
        else
            wait "$pid"; rc=$?
            kill -0 "$pid" 2>/dev/null || return "$rc"  # srun ended (else a trapped signal ended the wait)
        fi
    done
}

log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_JOB_NUM_NODES} node(s) ($SLURM_JOB_NODELIST)" \
    "x $NPROC_PER_NODE worker(s), rendezvous $HEAD_NODE:$RDZV_PORT, run dir $RUN_DIR"

# One torchrun agent per node (one srun task each). --kill-on-bad-exit stops the other nodes at once
# when one fails instead of leaving them blocked in a collective. srun in SLURM 22.05+ does not inherit
# --cpus-per-task from sbatch, hence passed again. In the background, so that the warning trap runs.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    "$PYTHON" -m torch.distributed.run \
    --nnodes="$SLURM_JOB_NUM_NODES" \
    --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$HEAD_NODE:$RDZV_PORT" \
    --rdzv_id="$SLURM_JOB_ID" \
    --max-restarts="$MAX_RESTARTS" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 \
    --shutdown-timeout="$SHUTDOWN_TIMEOUT" \
    -m dist_gpt.train "$@" &
wait_and_forward $!
rc=$?

if [[ -f $MARKER ]]; then
    log "requeue marker: $(tr -d ' \n' < "$MARKER")"
    signal=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("signal", ""))' "$MARKER" 2>/dev/null)
    rm -f "$MARKER"
    case $signal in
        SIGUSR1|SIGUSR2)
            log "checkpoint saved after $signal: requeueing job $SLURM_JOB_ID"
            scontrol requeue "$SLURM_JOB_ID"
            exit 0 ;;
        *)
            log "checkpoint saved after ${signal:-an unknown signal}: not requeueing (submit again to resume)" ;;
    esac
fi
log "srun exited with status $rc"
exit "$rc"
