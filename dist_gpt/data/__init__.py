"""dist_gpt's data layer: token shards, tokenizers, the prepare pipeline, sampler and loaders.

    from dist_gpt.data import Dataset, TrainBatches, ValBlocks, DataConfig, ensure_default_dataset

Names are imported on first use, so `dist_gpt.data.prepare` and its worker processes never pay for
importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Dataset": "dist_gpt.data.dataset",
    "TrainBatches": "dist_gpt.data.loader",
    "ValBlocks": "dist_gpt.data.loader",
    "DataConfig": "dist_gpt.data.config",
    "ensure_default_dataset": "dist_gpt.data.default",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dist_gpt.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
