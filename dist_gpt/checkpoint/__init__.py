"""Sharded checkpoints: DCP tensors + JSON meta, atomic commit, retention, safe loading.

    from dist_gpt.checkpoint import Checkpointer, CheckpointConfig, ModelOptimizerState
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, env, tensors={...}, json_states={...})

See docs/CHECKPOINTS.md for the layout, the commit protocol and what the safe reader admits.
"""

from .config import CheckpointConfig
from .layout import read_manifest, read_meta
from .loading import load_tensors
from .manager import Checkpointer
from .retention import resolve_checkpoint
from .safe_reader import read_metadata
from .state import JsonState, ModelOptimizerState

__all__ = ["CheckpointConfig", "Checkpointer", "JsonState", "ModelOptimizerState", "load_tensors", "read_manifest",
           "read_meta", "read_metadata", "resolve_checkpoint"]
