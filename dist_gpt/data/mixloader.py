"""A weighted mixture of prepared datasets as the training stream (`data.mix`).

    mix = open_mixture(cfg.data)                  # every source opened and checked, one tokenizer
    batches = MixtureBatches(mix, cfg.data, ...)  # TrainBatches' interface: next(), skip(), state_dict()

Which source and which of its blocks each global sample reads is dist_gpt.data.mixture's pure
function of (seed, sample index); each source's block k is sample k of that source's own
single-dataset layout (dist_gpt.data.sampler). The only state is TrainBatches' position, the blocks
each source has delivered (counted from the samples read, for the metrics), and the schedule's
history (the declared weights and phases, and any change made on resume with data.mix_override).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from dist_gpt.data.dataset import Dataset
from dist_gpt.data.loader import TrainBatches, _HostToDevice
from dist_gpt.data.mixspec import parse_mix, parse_phases, parse_weights
from dist_gpt.data.mixture import MixSchedule, resumed_segments, segments_of, source_seed
from dist_gpt.data.sampler import WINDOW, DocumentLayout, TrainLayout, document_ids, rank_samples
from dist_gpt.errors import DataError


@dataclass
class MixSource:
    name: str
    path: str
    weight: float   # normalised
    ds: Dataset


class Mixture:
    """The sources of data.mix, opened. Everything a single Dataset answers for the whole run (the
    tokenizer, vocab_size, eot_id, dtype) it answers from the first source: they share one tokenizer."""

    def __init__(self, sources: list[MixSource], phases: list[tuple[int, list[float]]], eval_weights: list[float],
                 spec: str):
        self.sources, self.phases, self.eval_weights, self.spec = sources, phases, eval_weights, spec
        self.names = [s.name for s in sources]
        self.primary = sources[0].ds
        ident = hashlib.sha256(b"mixture")
        for s in sources:
            ident.update(f"{s.name}:{s.ds.fingerprint}".encode())
        self.fingerprint = ident.hexdigest()  # which datasets under which names, not their weights

    def __getattr__(self, name):
        if name == "primary":  # not yet set (copying, unpickling): no delegation loop
            raise AttributeError(name)
        return getattr(self.primary, name)

    def num_tokens(self, split: str) -> int:
        return sum(s.ds.num_tokens(split) for s in self.sources)

    def declared(self) -> list[tuple[int, list[float]]]:
        return segments_of([s.weight for s in self.sources], self.phases)


def open_mixture(cfg) -> Mixture:
    """Open and check every source of `cfg` (DataConfig with data.mix): each one a prepared dataset
    with a validation split, all made with one tokenizer. DataError naming the source and the fix."""
    specs = parse_mix(cfg.mix)
    names = [s.name for s in specs]
    total = sum(s.weight for s in specs)
    sources = []
    for spec in specs:
        try:
            ds = Dataset.open(spec.path, verify=cfg.verify)
        except DataError as e:
            raise DataError(f"data.mix source {spec.name!r}: {e}") from None
        if not ds.shards["val"] or ds.num_tokens("val") == 0:
            raise DataError(f"data.mix source {spec.name!r} ({spec.path}) has no validation split: prepare it again "
                            f"with a validation split ({ds.rerun}, keeping --val-split above 0)")
        sources.append(MixSource(spec.name, spec.path, spec.weight / total, ds))
    first = sources[0]
    for s in sources[1:]:
        if s.ds.tokenizer_fingerprint != first.ds.tokenizer_fingerprint:
            raise DataError(f"data.mix sources {first.name!r} ({first.path}) and {s.name!r} ({s.path}) were made with "
                            f"different tokenizers: prepare {s.name!r} again with the first one's tokenizer, "
                            f"`python -m tools.prepare ... --tokenizer {tokenizer_argument(first)} --out {s.path} --force`")
    phases = [(p, [w[n] for n in names]) for p, w in parse_phases(cfg.mix_phases or "", names)]
    last = phases[-1][1] if phases else [s.weight for s in sources]
    if cfg.mix_eval_weights:
        chosen = parse_weights(cfg.mix_eval_weights, names, "data.mix_eval_weights")
        last = [chosen[n] for n in names]
    eval_weights = [w / sum(last) for w in last]
    return Mixture(sources, phases, eval_weights, cfg.mix)


def tokenizer_argument(source: MixSource) -> str:
    """What `tools.prepare --tokenizer` takes to reuse this source's tokenizer."""
    spec = source.ds.manifest["tokenizer"]["spec"]
    if spec.get("file"):
        return f"{source.path}/{spec['file']}"
    if spec.get("kind") == "tiktoken":
        return spec.get("encoding", "gpt2")
    return spec.get("kind", "byte")  # byte; char needs --tokenizer char --vocab FILE of the same characters


class MixtureBatches(TrainBatches):
    """TrainBatches over a Mixture: the same micro-batches, positions, skips and prefetching; each
    sample is read from the source and block the schedule gives it."""

    def __init__(self, mix: Mixture, block_size: int, global_batch: int, micro_batch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device="cpu", prefetch: bool = True,
                 align: str = "random", documents: bool = False, override: bool = False):
        layouts, docs = [], []
        for s in mix.sources:  # checked first, so that every error names its source
            try:
                layouts.append(_layout(s, block_size, align, seed))
                docs.append(s.ds.doc_starts("train", "model.doc_mask") if documents else None)
            except DataError as e:
                raise DataError(f"data.mix source {s.name!r}: {e}") from None
        super().__init__(mix.primary, block_size, global_batch, micro_batch, rank, world_size, seed, device,
                         prefetch)
        self.ds, self.mix, self.override, self.align = mix, mix, override, align
        self.layouts, self.docs = layouts, docs
        self.readers = [s.ds.reader("train") for s in mix.sources]
        self.documents = documents
        rows = self.grad_accum * micro_batch
        self._rows = np.empty((rows, block_size + 1), dtype=np.result_type(*(s.ds.dtype for s in mix.sources)))
        self._h2d = _HostToDevice(self._h2d.device, rows, block_size, 3 if documents else 2)
        self.history: list[tuple[int, list]] = [(0, mix.declared())]
        self.schedule = MixSchedule(mix.declared(), global_batch)
        self._window = None  # (window, source, shard, start) of WINDOW consecutive global samples
        self.delivered = np.zeros(len(mix.sources), dtype=np.int64)  # blocks read by training, per source

    def _locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global sample indices (increasing) -> (source, shard, start): the schedule, then each source's
        layout, computed WINDOW samples at a time and cached (a cache of a pure function)."""
        w = int(samples[0]) // WINDOW
        if int(samples[-1]) // WINDOW != w:  # a batch across two windows: each part on its own
            cut = int(np.searchsorted(samples, (w + 1) * WINDOW))
            return tuple(np.concatenate(p) for p in zip(self._locate(samples[:cut]), self._locate(samples[cut:])))
        win = self._window  # one read: the prefetch thread may replace it meanwhile
        if win is None or win[0] != w:
            source, block = self.schedule.locate(np.arange(w * WINDOW, (w + 1) * WINDOW))
            shard, start = np.empty_like(block), np.empty_like(block)
            for s in np.unique(source).tolist():
                sel = source == s
                shard[sel], start[sel] = self.layouts[s].locate_exact(block[sel])
            win = self._window = (w, source, shard, start)
        i = samples - w * WINDOW
        return win[1][i], win[2][i], win[3][i]

    def _build(self, first_sample: int):
        samples = rank_samples(0, self.global_batch, self.micro_batch, self.rank, self.world_size, first_sample)
        source, shard, start = self._locate(samples)
        doc = np.zeros((samples.size, self.block_size), dtype=np.int64) if self.documents else None
        present = [(s, np.flatnonzero(source == s)) for s in np.flatnonzero(np.bincount(source)).tolist()]
        for s, rows in present:
            self.readers[s].read(shard[rows], start[rows], self._rows, rows, check=False)  # into the shared buffer
            if doc is not None:
                doc[rows] = document_ids(self.docs[s], shard[rows], start[rows], self.block_size)
        if int(self._rows.max()) >= self.mix.vocab_size:  # one check for all sources (one vocabulary)
            for s, rows in present:  # which source's shard holds it, for the error
                self.readers[s].check_ids(shard[rows], start[rows], self._rows[rows])
        return self._h2d.convert(self._rows, doc)

    def next(self):
        first = self._next_sample
        micro = super().next()
        # the blocks each source gave the whole global batch (every rank's samples), counted from the stream
        win = self._window
        if win is not None and win[0] == first // WINDOW and (first + self.global_batch - 1) // WINDOW == win[0]:
            source = win[1][first - win[0] * WINDOW:first - win[0] * WINDOW + self.global_batch]  # a view
        else:
            source = self._locate(np.arange(first, first + self.global_batch))[0]
        self.delivered += np.bincount(source, minlength=len(self.readers))
        return micro

    @property
    def epoch(self) -> float:
        """The most any source has been repeated, in epochs."""
        return max(self.source_epochs().values())

    def source_epochs(self) -> dict[str, float]:
        """Epochs each source has gone through (its blocks drawn / blocks per epoch)."""
        drawn = self.schedule.drawn_before(self._next_sample)
        return {s.name: int(d) / lay.blocks_per_epoch for s, d, lay in zip(self.mix.sources, drawn, self.layouts)}

    def source_metrics(self) -> dict[str, float]:
        """data/<name>/tokens (training tokens read from the source) and data/<name>/epochs."""
        epochs = self.source_epochs()
        out = {}
        for s, blocks in zip(self.mix.sources, self.delivered.tolist()):
            out[f"data/{s.name}/tokens"] = blocks * self.block_size
            out[f"data/{s.name}/epochs"] = epochs[s.name]
        return out

    def delivered_summary(self) -> dict:
        """final.json's record of what each source delivered."""
        epochs = self.source_epochs()
        return {s.name: {"path": s.path, "tokens": int(b) * self.block_size, "blocks": int(b), "epochs": epochs[s.name],
                         "weight_now": self.schedule.weights_at(self.position)[i] / sum(self.schedule.weights_at(self.position))}
                for i, (s, b) in enumerate(zip(self.mix.sources, self.delivered.tolist()))}

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["mixture"] = {"names": self.mix.names, "fingerprint": self.mix.fingerprint,
                            "history": [[p, [[q, w] for q, w in d]] for p, d in self.history],
                            "delivered": self.delivered.tolist()}
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("mixture")
        if saved is None:
            raise DataError("the checkpoint was trained on one dataset (data.path), this run on data.mix: resume with "
                            "the checkpoint's --data.path, or start a new run")
        if saved["names"] != self.mix.names or saved["fingerprint"] != self.mix.fingerprint:
            raise DataError(f"the checkpoint's data.mix has sources {', '.join(saved['names'])} (or other datasets "
                            f"under those names) than this run's ({', '.join(self.mix.names)}): resume with the "
                            "checkpoint's data.mix sources (data.mix_override changes only weights and phases)")
        super().load_state_dict({**state, "dataset": self.ds.fingerprint})
        history = [(int(p), [(int(q), list(w)) for q, w in d]) for p, d in saved["history"]]
        declared = self.mix.declared()
        if history[-1][1] != declared:
            if not self.override:
                raise DataError("data.mix / data.mix_phases weights differ from the checkpoint's: resume with the "
                                "same weights and phases, or pass --data.mix_override=true to continue the stream "
                                f"from global batch {self.position} with the new ones")
            history = [h for h in history if h[0] < self.position] + [(self.position, declared)]
        self.history = history
        self.schedule = MixSchedule(resumed_segments(history), self.global_batch)
        self._window = None
        self.delivered = np.array(saved["delivered"], dtype=np.int64)


def _layout(source: MixSource, block_size: int, align: str, seed: int):
    ds = source.ds
    lengths = [s.num_tokens for s in ds.shards["train"]]
    if align == "document":
        return DocumentLayout(lengths, ds.doc_starts("train", "data.align=document"), block_size + 1,
                              source_seed(seed, source.name))
    return TrainLayout(lengths, block_size + 1, source_seed(seed, source.name))
