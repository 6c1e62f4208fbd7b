"""Where Muon orthogonalises each matrix, and how its update gets there and back (used by dist_gpt.optim.muon).

A parameter is held in one of these layouts (`Layout`):

    plain tensor, no group          whole, on this process only: it does all its own work
    plain tensor + process_group    whole on every rank of the group (DDP)
    DTensor (Shard(d),)             FSDP2 on a 1-D mesh: each rank holds a slice along dim d, in
                                    torch.chunk sizes (ceil(rows / S) rows each, the last ranks fewer
                                    or none; FSDP2 pads its own storage, the DTensor's local slice is
                                    unpadded)
    DTensor (Replicate(), Shard(d)) HSDP: sliced across the shard dim, whole-slice copies across the
                                    replicate dim

With S ranks per shard group and R replicas, matrix i is given to one worker w(i) of the R x S
(`assign_workers`): replica w // S orthogonalises it, on its shard rank w % S (the owner). Then

1. shard exchange (S > 1, within each replica's shard group): one all_to_all sends every slice of
   each matrix to its owner, the owner concatenates the slices, runs Newton-Schulz on its matrices
   (same shapes batched), and a second all_to_all sends each rank its slice of every result;
2. replica exchange (R > 1, across the replicate group): every rank holds the results (its slices) of
   the matrices its replica did; one all_gather gives it all the others'.

Each rank thus does 1/(R x S) of the Newton-Schulz work and receives what it holds of every result.
Collectives move the update in the iteration's dtype (bf16 by default): NS starts by casting to it,
so sending the cast halves the bytes and changes no bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch < 2.5: no public DTensor, so no FSDP2 parameters to meet
    DTensor, Replicate, Shard = (), (), ()

# torch 2.13 renamed all_gather_into_tensor (and deprecated the old name)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# (indices of the matrices, their whole updates) -> their orthogonalised updates
NewtonSchulz = Callable[[list[int], list[Tensor]], list[Tensor]]


def local(t: Tensor) -> Tensor:
    """The part of t this rank holds (a DTensor's local slice, which in-place ops update)."""
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass(frozen=True)
class Layout:
    """How one set of parameters is spread over processes (see the module docstring)."""

    shard_group: object = None      # ProcessGroup of the ranks holding slices (FSDP), or None
    shard_dim: int = 0
    shards: int = 1                 # S: ranks in shard_group
    shard_rank: int = 0
    replicate_group: object = None  # ProcessGroup of the ranks holding copies (DDP, HSDP), or None
    replicas: int = 1               # R
    replica_rank: int = 0

    def slice_range(self, shape: Sequence[int], shard_rank: int) -> tuple[int, int]:
        """(start, length) along shard_dim of shard_rank's slice: torch.chunk's split, as DTensor's Shard."""
        n = shape[self.shard_dim]
        size = -(-n // self.shards)
        start = min(n, shard_rank * size)
        return start, min(n, start + size) - start

    def slice_numel(self, shape: Sequence[int], shard_rank: int) -> int:
        return self.slice_range(shape, shard_rank)[1] * shape[1 - self.shard_dim]


def layout_key(param: Tensor):
    """Parameters with equal keys share a Layout: a DTensor's mesh and placements; None for plain tensors."""
    return (param.device_mesh, tuple(param.placements)) if isinstance(param, DTensor) else None


def layout_of(param: Tensor, process_group) -> Layout:
    """The Layout of a parameter: a DTensor's from its mesh, a plain tensor's from `process_group`."""
    if not isinstance(param, DTensor):
        if process_group is None or dist.get_world_size(process_group) == 1:
            return Layout()
        return Layout(replicate_group=process_group, replicas=dist.get_world_size(process_group),
                      replica_rank=dist.get_rank(process_group))
    mesh, placements = param.device_mesh, param.placements
    shard_dims = [i for i, pl in enumerate(placements) if type(pl) is Shard]
    replicate_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Replicate)]
    if len(shard_dims) > 1 or len(replicate_dims) > 1 or len(shard_dims) + len(replicate_dims) != len(placements):
        raise ValueError(f"Muon orthogonalises DTensor parameters sharded on at most one mesh dimension (FSDP2) "
                         f"and replicated on at most one (HSDP); this one has placements {placements}")
    layout = {}
    if shard_dims:
        dim = shard_dims[0]
        layout.update(shard_group=mesh.get_group(dim), shard_dim=placements[dim].dim, shards=mesh.size(dim),
                      shard_rank=mesh.get_local_rank(dim))
    if replicate_dims:
        dim = replicate_dims[0]
        layout.update(replicate_group=mesh.get_group(dim), replicas=mesh.size(dim),
                      replica_rank=mesh.get_local_rank(dim))
    return Layout(**layout)


def ns_cost(shape: Sequence[int]) -> int:
    """Multiply-adds of one Newton-Schulz iteration on an (m, n) matrix, m <= n: two m x m x n products
    (X X^T, B X) and one m x m x m (A A)."""
    m, n = sorted(shape[:2])
    return m * m * (2 * n + m)


def assign_workers(shapes: Sequence[Sequence[int]], workers: int) -> list[int]:
    """Each matrix's worker in [0, workers): the costliest first (same shapes together), each to the least
    loaded worker (the lowest on ties), so the load is balanced and each shape spreads evenly (each
    worker batches its share). Depends on the shapes only: every rank computes the same assignment."""
    load = [0] * workers
    owner = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-ns_cost(shapes[i]), tuple(shapes[i]), i)):
        w = min(range(workers), key=lambda w: (load[w], w))
        owner[i] = w
        load[w] += ns_cost(shapes[i])
    return owner


def orthogonalise_across(layout: Layout, updates: list[Tensor], shapes: list[torch.Size],
                         ns: NewtonSchulz) -> list[Tensor]:
    """Newton-Schulz of every whole matrix, returned as the part of it this rank holds.

    updates: this rank's part of each matrix's update (whole, or its slice), in the NS dtype;
    shapes: the whole matrices' shapes; ns: orthogonalises whole matrices given their indices.
    """
    worker = assign_workers(shapes, layout.replicas * layout.shards)
    replica = [w // layout.shards for w in worker]
    mine = [i for i in range(len(updates)) if replica[i] == layout.replica_rank]
    if layout.shards == 1:
        done = dict(zip(mine, ns(mine, [updates[i] for i in mine]))) if mine else {}
    else:
        owner = {i: worker[i] % layout.shards for i in mine}
        done = _through_owners(layout, mine, owner, updates, shapes, ns) if mine else {}
    if layout.replicas > 1:
        done = _across_replicas(layout, replica, done, updates)
    return [done[i] for i in range(len(updates))]


def _all_to_all(layout: Layout, chunks: list[Tensor], send_sizes: list[int], recv_sizes: list[int],
                like: Tensor) -> Tensor:
    """One all_to_all_single in the shard group: chunks go out in destination order, the result holds
    what each source sent, in source order."""
    send = torch.cat(chunks) if chunks else like.new_empty(0)
    recv = like.new_empty(sum(recv_sizes))
    dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes,
                           group=layout.shard_group)
    return recv


def _through_owners(layout: Layout, mine: list[int], owner: dict[int, int], updates: list[Tensor],
                    shapes: list[torch.Size], ns: NewtonSchulz) -> dict[int, Tensor]:
    """Slices to owners, NS there, slices of the results back. Returns {i: this rank's slice of NS(i)}."""
    S, me, d = layout.shards, layout.shard_rank, layout.shard_dim
    for i in mine:  # the exchange sizes assume torch.chunk's slices: refuse any other
        if updates[i].shape[d] != layout.slice_range(shapes[i], me)[1]:
            raise ValueError(f"Muon: shard rank {me} of {S} holds {tuple(updates[i].shape)} of a {tuple(shapes[i])} "
                             f"matrix sliced on dim {d}, not torch.chunk's slice")
    like = updates[mine[0]]
    to = [[i for i in mine if owner[i] == r] for r in range(S)]  # matrices owned by rank r, in order
    owned = to[me]

    # 1. every slice to its owner: rank r sends its slice of each matrix rank `dest` owns
    sizes_out = [sum(updates[i].numel() for i in to[dest]) for dest in range(S)]
    sizes_in = [sum(layout.slice_numel(shapes[i], src) for i in owned) for src in range(S)]
    recv = _all_to_all(layout, [updates[i].reshape(-1) for dest in range(S) for i in to[dest]],
                       sizes_out, sizes_in, like)
    slices: list[list[Tensor]] = [[] for _ in owned]  # slices[k][src]
    offset = 0
    for src in range(S):
        for k, i in enumerate(owned):
            shape = list(shapes[i])
            shape[d] = layout.slice_range(shapes[i], src)[1]
            n = shape[0] * shape[1]
            slices[k].append(recv[offset:offset + n].view(shape))
            offset += n
    results = ns(owned, [torch.cat(parts, dim=d) for parts in slices]) if owned else []

    # 2. each rank its slice of every result: the owner sends rank `dest` its range of each result
    chunks = [r.narrow(d, *layout.slice_range(shapes[i], dest)).reshape(-1)
              for dest in range(S) for i, r in zip(owned, results)]
    recv = _all_to_all(layout, chunks, sizes_in, sizes_out, results[0] if results else like)
    done, offset = {}, 0
    for src in range(S):
        for i in to[src]:
            n = updates[i].numel()
            done[i] = recv[offset:offset + n].view(updates[i].shape)
            offset += n
    return done


def _across_replicas(layout: Layout, replica: list[int], done: dict[int, Tensor],
                     updates: list[Tensor]) -> dict[int, Tensor]:
    """All-gather across the replicate group: each replica's results (this rank's part of them) to all.

    Every rank of a replicate group holds the same part of every matrix (the same shard rank), so the
    sizes are known everywhere; each replica's contribution is padded to the longest one."""
    R = layout.replicas
    members = [[i for i in range(len(updates)) if replica[i] == q] for q in range(R)]
    width = max(sum(updates[i].numel() for i in m) for m in members)
    like = next(iter(done.values())) if done else updates[0]
    send = like.new_zeros(width)
    if done:
        flat = torch.cat([done[i].reshape(-1) for i in members[layout.replica_rank]])
        send[:flat.numel()] = flat
    gathered = like.new_empty(R * width)
    _all_gather_single(gathered, send, group=layout.replicate_group)
    out = {}
    for q in range(R):
        offset = q * width
        for i in members[q]:
            n = updates[i].numel()
            out[i] = gathered[offset:offset + n].view(updates[i].shape)
            offset += n
    return out
