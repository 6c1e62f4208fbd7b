"""dist_gpt's data layer: token shards, tokenizers, the prepare pipeline, sampler and loaders.

    from dist_gpt.data import Dataset, TrainBatches, ValBlocks, DataConfig, ensure_default_dataset

Inside the package, code imports from the defining modules (dist_gpt.data.dataset, .loader, ...).
"""

from __future__ import annotations

from .config import DataConfig
from .dataset import Dataset
from .default import ensure_default_dataset

__all__ = ["DataConfig", "Dataset", "TrainBatches", "ValBlocks", "ensure_default_dataset"]


def __getattr__(name: str):
    # Measured start-up cost: the loaders need torch (`import torch` takes 2-5 s on a 2-core AMD EPYC,
    # python -X importtime), and prepare's worker processes import this package to encode text with
    # numpy alone; so TrainBatches and ValBlocks load on first use, through an import statement.
    if name in ("TrainBatches", "ValBlocks"):
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'dist_gpt.data' has no attribute {name!r}")
