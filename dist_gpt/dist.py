"""The one module that knows about ranks: environment detection, device, process group, wrapping.

One launch contract, three launchers: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/PORT;
`srun python -m dist_gpt.train` (one SLURM task per rank, no torchrun) sets SLURM_PROCID/NTASKS/
LOCALID, from which the same variables are derived; a plain `python -m dist_gpt.train` is rank 0
of a world of 1 and starts no process group at all.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError, UserError


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (world of 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _slurm_to_torch_env() -> None:
    """Map a SLURM task (srun without torchrun) onto the torchrun variables."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    if int(os.environ["SLURM_NTASKS"]) == 1 and "SLURM_STEP_ID" not in os.environ:
        return  # the batch script itself, not a step of ranks
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    if "MASTER_ADDR" not in os.environ:
        nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        os.environ["MASTER_ADDR"] = nodes[0]
    # A port derived from the job id: the same on every task, unlikely to collide between jobs.
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible: use --train.device=cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _cpu_threads(local_world_size: int, threads: int | None) -> int:
    """Each rank gets its share of the cores this process may run on (the cgroup/affinity view)."""
    if threads:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


def _keep_freed_memory() -> None:
    """Stop glibc from handing the memory a CPU training step frees back to the kernel.

    Every step frees and re-allocates the same activations. By default glibc serves blocks above
    its mmap threshold with fresh mappings and trims freed memory at the top of a heap, so each
    step page-faults (and zero-fills) that memory in again: ~3,400 faults and ~7 ms of a 70-100 ms
    step of the 4 x 4 x 128 model (docs/PERFORMANCE.md). Serving blocks up to 32 MiB (glibc's
    largest threshold) from the heap and never trimming it removes them; the process keeps its peak
    heap mapped, which the next step needs anyway. Linux with glibc only; elsewhere nothing changes.
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def init(device: str = "auto", timeout_s: float = 600.0, threads: int | None = None) -> DistEnv:
    """Detect the launcher, pick device and backend (nccl on CUDA, gloo on CPU), start the group."""
    _slurm_to_torch_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = _pick_device(device, local_rank)
    if dev.type == "cpu":
        # torchrun sets OMP_NUM_THREADS=1 per worker; give each rank its share of the cores instead.
        torch.set_num_threads(_cpu_threads(local_world, threads))
        _keep_freed_memory()
    env = DistEnv(rank, local_rank, world, local_world, dev, None)
    if world > 1:
        env.backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=env.backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return env


def wrap(model: nn.Module, env: DistEnv) -> nn.Module:
    """DDP around the model on several ranks; the raw model stays the caller's for saving/sampling.

    gradient_as_bucket_view avoids a copy of every gradient into the buckets. (static_graph is left
    off: it trips an internal assert with `no_sync` gradient accumulation.)
    """
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
               gradient_as_bucket_view=True, bucket_cap_mb=25)


def is_collective_failure(error: BaseException) -> bool:
    """A timeout or a lost peer inside a collective, as opposed to a bug."""
    kinds = tuple(getattr(dist, name) for name in ("DistBackendError", "DistNetworkError", "DistError") if hasattr(dist, name))
    text = str(error)
    return isinstance(error, kinds) or any(s in text for s in ("Timed out", "timed out", "Connection closed by peer",
                                                               "Connection reset by peer", "Broken pipe"))


# ---------------------------------------------------------------------------------------------
# Collectives that are a no-op in a world of 1, so callers never branch on rank.

def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def from_rank0(obj):
    """Rank 0's `obj` on every rank (a collective; the object itself in a world of 1)."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def default_store():
    """The default process group's store (the rendezvous TCPStore), where the heartbeat writes."""
    return dist.distributed_c10d._get_default_store()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown(code: int = 0) -> None:
    """End an entry point: barrier, destroy the group, flush, `os._exit` (writers are closed by then).

    gloo can abort at interpreter exit (a gloo thread frees a tensor while Python finalizes) even
    after destroy_process_group; leaving through os._exit after flushing avoids it entirely.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to synchronise with
            code = code or 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_main(run, argv: list[str]) -> None:
    """The one way an entry point ends: `run(argv)` returns the exit code; a UserError becomes its
    one-line message and exit code 2, a lost peer (faults.PeerLost) its message and 4; then
    `shutdown` on every rank.

    A ConfigError raised before the process group exists comes from the command line, which every
    rank of a launch shares: only the launch's rank 0 prints it, so it appears once, first.
    """
    from .faults import PeerLost

    code = 1
    try:
        code = run(argv)
    except (UserError, PeerLost) as e:
        same_everywhere = isinstance(e, ConfigError) and not (dist.is_available() and dist.is_initialized())
        if not same_everywhere or launch_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        code = e.exit_code
    shutdown(code)


def launch_rank() -> int:
    """This process's rank as the launcher set it (torchrun's RANK or SLURM's SLURM_PROCID), before init."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def launch_world_size() -> int:
    """The world size the launcher set up (torchrun's WORLD_SIZE, or the SLURM tasks of a step), before init."""
    _slurm_to_torch_env()
    return int(os.environ.get("WORLD_SIZE", "1"))
