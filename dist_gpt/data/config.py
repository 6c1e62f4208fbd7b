"""The `data` config section (block size is `model.block_size`; batch sizes are `train.*`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dist_gpt.data.mixspec import parse_mix, parse_phases, parse_weights
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

    mix: str | None = field(default=None, metadata={
        "help": "train on a weighted mixture of prepared datasets instead of data.path: NAME:PATH:WEIGHT,... "
                "(e.g. web:data/web:0.7,code:data/code:0.3; in TOML one [data.mix.NAME] table per source with "
                "path = and weight =). Weights count tokens and are normalised; all sources need one tokenizer "
                "(docs/DESIGN.md, Mixtures)"})
    mix_phases: str | None = field(default=None, metadata={
        "help": "change data.mix's weights from a global batch position on: FROM:NAME=WEIGHT,... with phases "
                "separated by ';' (e.g. 800:web=0,code=1 anneals on code from position 800; a source not named "
                "gets 0); in TOML [[data.mix_phases]] tables with from = and NAME = WEIGHT"})
    mix_eval_weights: str | None = field(default=None, metadata={
        "help": "weights of the sources' validation losses in val/loss: NAME=WEIGHT,... (default: the last "
                "phase's weights, or data.mix's)"})
    mix_override: bool = field(default=False, metadata={
        "help": "on resume, accept data.mix / data.mix_phases weights that differ from the checkpoint's: the "
                "stream continues from the current position with the new ones (the same sources are required)"})
    max_epochs: float = field(default=4.0, metadata={
        "help": "warn once when the dataset (or any source of data.mix) is repeated more than this many epochs "
                "(repeated data stops helping after about 4, Muennighoff et al. 2023)"})

    def __post_init__(self):
        if self.mix is not None:
            names = [s.name for s in parse_mix(self.mix)]
            parse_phases(self.mix_phases or "", names)
            if self.mix_eval_weights:
                parse_weights(self.mix_eval_weights, names, "data.mix_eval_weights")
        elif self.mix_phases or self.mix_eval_weights:
            raise ConfigError("data.mix_phases and data.mix_eval_weights need data.mix (the sources they weigh)")
        if not self.max_epochs > 0:
            raise ConfigError(f"data.max_epochs must be above 0, got {self.max_epochs}")
        if not self.path:
            raise ConfigError("data.path must name a dataset directory")
        if self.align not in ("random", "document"):
            raise ConfigError(f"data.align must be random or document, got {self.align!r}")
