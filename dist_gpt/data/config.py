"""The `data` config section (block size is `model.block_size`; batch sizes are `train.*`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dist_gpt.errors import ConfigError


@dataclass
class DataConfig:
    path: str = field(default="data/stdlib", metadata={
        "help": "dataset directory made by `dist-gpt-prepare` (manifest.json + shards; not a shard file, not raw text)"})
    prepare_if_missing: bool = field(default=True, metadata={
        "help": "build the default stdlib byte dataset when data.path is data/stdlib and missing"})
    prefetch: bool = field(default=True, metadata={
        "help": "on CUDA, read and copy the next batch in a background thread while the current one "
                "computes (on CPU batches are read inline: the thread would only compete for cores)"})
    verify: bool = field(default=False, metadata={
        "help": "check every shard's checksum and token ids at start (reads the whole dataset once)"})
    align: str = field(default="random", metadata={
        "help": "where training blocks start: random (anywhere) | document (at document starts, and every "
                "block_size into longer documents; short documents are packed after one another; needs the "
                "dataset's document index, see docs/FORMAT.md)"})

    def __post_init__(self):
        if not self.path:
            raise ConfigError("data.path must name a dataset directory")
        if self.align not in ("random", "document"):
            raise ConfigError(f"data.align must be random or document, got {self.align!r}")
