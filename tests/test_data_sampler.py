"""The sampler's contract: disjoint blocks within an epoch, full coverage, determinism, exact state
round-trip, and the same global stream of blocks on 1, 2 and 4 ranks; for blocks aligned to
document starts (data.align=document) too, with the per-token document ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_gpt.data import Dataset, TrainBatches, ValBlocks
from dist_gpt.data.format import read_header
from dist_gpt.data.permutation import FeistelPermutation
from dist_gpt.data.sampler import WINDOW, TrainLayout, shard_block_starts
from dist_gpt.errors import DataError
from tests.data_fixtures import as_version_1, counting_dataset, documents_dataset, open_memmap, random_dataset

T = 15  # block_size; blocks are T + 1 = 16 tokens


@pytest.fixture
def ds(tmp_path):
    return Dataset.open(counting_dataset(tmp_path / "ds"))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 100, 1000, 4097])
def test_permutation_is_a_bijection(n):
    for key in (0, 1, 12345):
        out = FeistelPermutation(n, key)(np.arange(n))
        assert sorted(out.tolist()) == list(range(n))
    if n >= 64:  # and a shuffle, not the identity
        assert (FeistelPermutation(n, 7)(np.arange(n)) != np.arange(n)).mean() > 0.9


def _blocks(layout: TrainLayout, samples) -> list[tuple[int, int]]:
    shard, start = layout.locate(np.asarray(samples))
    return list(zip(shard.tolist(), start.tolist()))


def test_epoch_is_disjoint_and_covers_every_block(ds):
    lengths = [s.num_tokens for s in ds.shards["train"]]
    layout = TrainLayout(lengths, T + 1, seed=3)
    n = layout.blocks_per_epoch
    assert n == sum((x - T) // (T + 1) for x in lengths)
    for epoch in range(3):
        blocks = _blocks(layout, range(epoch * n, (epoch + 1) * n))
        assert len(set(blocks)) == n  # no block twice
        for s, length in enumerate(lengths):
            starts = sorted(st for sh, st in blocks if sh == s)
            # this shard's share is exactly its non-overlapping blocks: proportional to its tokens
            assert len(starts) == layout.blocks_per_shard[s]
            assert all(b - a == T + 1 for a, b in zip(starts, starts[1:]))  # one offset, no overlap
            assert starts[0] >= 0 and starts[-1] + T + 1 <= length
    # a fresh offset and order each epoch
    e0 = _blocks(layout, range(0, n))
    e1 = _blocks(layout, range(n, 2 * n))
    assert e0 != e1 and set(e0) != set(e1)


def test_offsets_reach_every_phase_over_epochs(ds):
    layout = TrainLayout([s.num_tokens for s in ds.shards["train"]], T + 1, seed=0)
    n = layout.blocks_per_epoch
    phases = {start % (T + 1) for e in range(60) for sh, start in _blocks(layout, [e * n]) }
    assert len(phases) > (T + 1) // 2


@pytest.mark.parametrize("lengths", [[5000, 3000, 7000, 1200], [10_000_000, 3_000_000]])
def test_cached_windows_equal_the_definition(lengths):
    layout = TrainLayout(lengths, T + 1, seed=5)
    w = layout.window
    samples = np.concatenate([np.arange(0, 50), np.arange(w - 7, w + 9), [10 * w + 3, 3, 5 * WINDOW + 1]])
    fast = layout.locate(samples)
    exact = layout.locate_exact(samples)
    assert all(np.array_equal(a, b) for a, b in zip(fast, exact))


def _global_stream(ds, world_size, micro, batches=6, B=8, seed=11, **kw):
    """Reassemble each global batch from every rank's micro-batches (per the sampling contract)."""
    loaders = [TrainBatches(ds, T, B, micro, rank=r, world_size=world_size, seed=seed, **kw) for r in range(world_size)]
    stream = []
    for _ in range(batches):
        per_rank = [ld.next() for ld in loaders]
        rows = [None] * B
        for r, micro_steps in enumerate(per_rank):
            assert len(micro_steps) == B // (micro * world_size)
            for a, (x, y, *doc) in enumerate(micro_steps):
                assert x.shape == (micro, T) and x.dtype == torch.int64 and x.is_contiguous() and y.is_contiguous()
                assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
                for j in range(micro):  # a row: its L tokens, then its T document ids if there are any
                    rows[(a * world_size + r) * micro + j] = torch.cat([x[j], y[j, -1:], *(d[j] for d in doc)])
        stream.append(torch.stack(rows))
    return torch.stack(stream)


def test_world_size_independence(ds):
    one = _global_stream(ds, 1, 2)
    assert torch.equal(one, _global_stream(ds, 1, 8))
    assert torch.equal(one, _global_stream(ds, 2, 2))
    assert torch.equal(one, _global_stream(ds, 4, 1))
    assert torch.equal(one, _global_stream(ds, 4, 2))


def test_blocks_hold_the_file_tokens(ds):
    batches = TrainBatches(ds, T, 8, 8, seed=2)
    layout = batches.layout
    shards = [open_memmap(s.path, read_header(s.path)) for s in ds.shards["train"]]
    for g in range(3):
        (x, y), = batches.next()
        shard, start = layout.locate(np.arange(g * 8, g * 8 + 8))
        for j in range(8):
            want = np.asarray(shards[shard[j]][start[j]:start[j] + T + 1], dtype=np.int64)
            assert torch.equal(torch.cat([x[j], y[j, -1:]]), torch.from_numpy(want))


def test_determinism_and_seed(ds):
    assert torch.equal(_global_stream(ds, 1, 4, seed=1), _global_stream(ds, 1, 4, seed=1))
    assert not torch.equal(_global_stream(ds, 1, 4, seed=1), _global_stream(ds, 1, 4, seed=2))


def test_prefetch_thread_gives_the_same_stream(ds):
    plain = _global_stream(ds, 2, 2, prefetch=False)
    assert torch.equal(plain, _global_stream(ds, 2, 2, prefetch=True, prefetch_on_cpu=True))


def test_state_round_trip_and_skip(ds):
    ref = TrainBatches(ds, T, 8, 4, seed=9)
    stream = [ref.next() for _ in range(7)]
    first = TrainBatches(ds, T, 8, 4, seed=9, prefetch_on_cpu=True)
    for _ in range(4):
        first.next()
    state = first.state_dict()
    assert state["position"] == 4
    resumed = TrainBatches(ds, T, 8, 2, rank=0, world_size=2, seed=9)  # another layout resumes it
    resumed.load_state_dict(state)
    assert resumed.position == 4
    got = resumed.next()
    # ref: grad_accum 2 of m=4, so its first micro-step holds samples 0..3 of batch 4;
    # resumed rank 0 of 2 with m=2: its first micro-step holds samples 0..1
    assert torch.equal(got[0][0], stream[4][0][0][0:2])
    skipped = TrainBatches(ds, T, 8, 4, seed=9)
    skipped.skip(6)
    assert skipped.position == 6
    assert all(torch.equal(a[0], b[0]) for a, b in zip(skipped.next(), stream[6]))
    with pytest.raises(DataError, match="seed"):
        TrainBatches(ds, T, 8, 4, seed=10).load_state_dict(state)


def test_epochs_roll_over_without_stopping(ds):
    batches = TrainBatches(ds, T, 8, 8, seed=0)
    per_epoch = batches.blocks_per_epoch
    for _ in range(per_epoch // 8 * 2 + 3):
        batches.next()
    assert batches.epoch > 2


def test_bad_batch_shapes_are_clear(ds):
    from dist_gpt.config import TrainConfig
    from dist_gpt.errors import ConfigError

    # the rule lives in the config (TrainConfig.grad_accum, checked by config.parse against the launch's
    # world size); the loader only refuses an impossible split
    with pytest.raises(ConfigError, match=r"train.global_batch=10 must be a multiple of train.micro_batch × world size = 4 × 1"):
        TrainConfig(global_batch=10, micro_batch=4).grad_accum(1)
    with pytest.raises(ConfigError, match=r"= 4 × 2 on 2 ranks: change train.global_batch or train.micro_batch"):
        TrainConfig(global_batch=12, micro_batch=4).grad_accum(2)
    assert TrainConfig(global_batch=16, micro_batch=4).grad_accum(2) == 2
    with pytest.raises(ValueError, match="does not split"):
        TrainBatches(ds, T, 10, 4, world_size=1)
    with pytest.raises(DataError, match="block_size"):
        TrainBatches(ds, 100_000, 8, 8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pinned_prefetched_stream_equals_cpu(ds):
    cpu = _global_stream(ds, 2, 2, batches=8)
    cuda = _global_stream(ds, 2, 2, batches=8, device=torch.device("cuda"))
    assert torch.equal(cpu, cuda.cpu())
    val_cpu = [x for x, _ in ValBlocks(ds, T, 3)]
    val_cuda = [x for x, _ in ValBlocks(ds, T, 3, device="cuda")]
    assert all(torch.equal(a, b.cpu()) for a, b in zip(val_cpu, val_cuda))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_document_stream_equals_cpu(tmp_path):
    docs_ds = Dataset.open(documents_dataset(tmp_path / "docs"))
    kw = dict(align="document", documents=True, batches=8)
    assert torch.equal(_global_stream(docs_ds, 2, 2, **kw), _global_stream(docs_ds, 2, 2, device=torch.device("cuda"), **kw).cpu())


def test_val_blocks_fixed_split_and_complete(ds):
    lengths = [s.num_tokens for s in ds.shards["val"]]
    expect = sum(n // (T + 1) for n in lengths)
    val = ValBlocks(ds, T, batch_size=3)
    assert len(val) == expect
    full = [torch.cat([x, y[:, -1:]], 1) for x, y in val]
    assert sum(b.shape[0] for b in full) == expect
    again = [torch.cat([x, y[:, -1:]], 1) for x, y in val]
    assert all(torch.equal(a, b) for a, b in zip(full, again))  # same blocks every evaluation
    everything = torch.cat(full)
    for world in (2, 3):
        shares = [torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in ValBlocks(ds, T, 2, rank=r, world_size=world)])
                  for r in range(world)]
        assert sum(s.shape[0] for s in shares) == expect
        for r, share in enumerate(shares):  # rank r holds blocks r, r + W, ...
            assert torch.equal(share, everything[r::world])


def test_val_subset_is_fixed(tmp_path):
    ds = Dataset.open(random_dataset(tmp_path / "r"))
    a = [x for x, _ in ValBlocks(ds, T, 4, max_blocks=10)]
    b = [x for x, _ in ValBlocks(ds, T, 4, max_blocks=10)]
    assert sum(x.shape[0] for x in a) == 10 and all(torch.equal(p, q) for p, q in zip(a, b))
    assert len(ValBlocks(ds, T, 4, max_blocks=10)) == 10
    assert len(ValBlocks(ds, T, 4, max_blocks=10**9)) == 4000 // (T + 1)


# ---------------------------------------------------------------- data.align=document

@pytest.fixture
def docs_ds(tmp_path):
    return Dataset.open(documents_dataset(tmp_path / "docs"))


def test_document_block_starts_cover_every_token():
    L = T + 1
    rng = np.random.default_rng(0)
    for case in range(300):
        n = int(rng.integers(0, 120))
        d = np.sort(rng.choice(max(n, 1), size=int(rng.integers(0, max(n // 3, 1) + 1)), replace=False)) if n else np.zeros(0, int)
        starts = shard_block_starts(n, d, L)
        if n < L:
            assert starts.size == 0
            continue
        assert np.all(np.diff(starts) > 0) and starts[0] == 0 and starts[-1] + L <= n  # distinct, inside the shard
        target = np.zeros(n, dtype=int)
        for s in starts.tolist():
            target[s + 1:s + L] += 1
        assert target[1:].all()  # every token but the shard's first is a target of some block
        segments = np.unique(np.concatenate([[0], d]))
        assert set(segments[segments <= n - L].tolist()) <= set(starts.tolist())  # every document start is a start
        for s in starts.tolist():  # and the others lie a whole number of blocks into a document, or end the shard
            seg = segments[np.searchsorted(segments, s, side="right") - 1]
            assert (s - seg) % T == 0 or s == n - L


def test_document_stream_is_the_same_on_1_2_4_ranks(docs_ds):
    kw = dict(align="document", documents=True)
    one = _global_stream(docs_ds, 1, 2, **kw)
    assert torch.equal(one, _global_stream(docs_ds, 2, 2, **kw))
    assert torch.equal(one, _global_stream(docs_ds, 4, 1, **kw))
    assert torch.equal(one, _global_stream(docs_ds, 1, 8, **kw))
    assert torch.equal(one, _global_stream(docs_ds, 2, 2, prefetch=True, prefetch_on_cpu=True, **kw))
    assert not torch.equal(one[..., :T + 1], _global_stream(docs_ds, 1, 2)[..., :T + 1])  # not the random blocks
    tokens, doc = one[..., :T], one[..., T + 1:]
    # every token of document k is 1 + k % 250: a row's document ids count where its tokens change
    assert (doc[..., 0] == 0).all()
    assert torch.equal(doc[..., 1:] - doc[..., :-1], (tokens[..., 1:] != tokens[..., :-1]).long())


def test_document_epoch_draws_every_start_once(docs_ds):
    batches = TrainBatches(docs_ds, T, 8, 8, seed=4, align="document")
    layout, n = batches.layout, batches.blocks_per_epoch
    everything = {(s, int(st)) for s in range(len(docs_ds.shards["train"]))
                  for st in layout.starts[layout.cum[s]:layout.cum[s + 1]]}
    for epoch in range(2):
        drawn = _blocks(layout, range(epoch * n, (epoch + 1) * n))
        assert len(set(drawn)) == n and set(drawn) == everything
    assert _blocks(layout, range(0, 50)) != _blocks(layout, range(n, n + 50))  # a new order each epoch
    starts = [set(a.tolist()) for a in docs_ds.doc_starts("train", "test")]
    first = [st in starts[sh] for sh, st in _blocks(layout, range(n))]
    assert np.mean(first) > 0.5  # mostly document starts (the others: whole blocks into long documents)


def test_document_stream_resumes_exactly(docs_ds):
    ref = TrainBatches(docs_ds, T, 8, 4, seed=9, align="document", documents=True)
    stream = [ref.next() for _ in range(6)]
    first = TrainBatches(docs_ds, T, 8, 4, seed=9, align="document", documents=True)
    for _ in range(3):
        first.next()
    resumed = TrainBatches(docs_ds, T, 8, 2, rank=1, world_size=2, seed=9, align="document", documents=True)
    resumed.load_state_dict(first.state_dict())
    got = resumed.next()  # rank 1 of 2, m=2: samples 2..3 of each micro-step of 4 of the reference
    for want, mine in zip(stream[3][0], got[0]):
        assert torch.equal(mine, want[2:4])
    with pytest.raises(DataError, match="data.align=document, this run has random"):
        TrainBatches(docs_ds, T, 8, 4, seed=9).load_state_dict(first.state_dict())
    with pytest.raises(DataError, match="data.align=random, this run has document"):
        resumed.load_state_dict({"position": 1, "seed": 9})  # made before data.align: random blocks


def test_val_blocks_carry_document_ids(docs_ds):
    plain = list(ValBlocks(docs_ds, T, 4))
    with_docs = list(ValBlocks(docs_ds, T, 4, documents=True))
    assert all(len(b) == 3 and torch.equal(a[0], b[0]) for a, b in zip(plain, with_docs))
    for x, _, doc in with_docs:
        assert torch.equal(doc[:, 1:] - doc[:, :-1], (x[:, 1:] != x[:, :-1]).long())


def test_document_training_needs_the_index(ds, tmp_path):
    import json
    manifest = json.loads((ds.path / "manifest.json").read_text())
    as_version_1(manifest)
    (ds.path / "manifest.json").write_text(json.dumps(manifest))
    old = Dataset.open(ds.path)
    TrainBatches(old, T, 8, 8)  # random blocks need no index
    with pytest.raises(DataError, match="no document index .* data.align=document needs; re-run"):
        TrainBatches(old, T, 8, 8, align="document")
    with pytest.raises(DataError, match="model.doc_mask needs"):
        ValBlocks(old, T, 4, documents=True)
