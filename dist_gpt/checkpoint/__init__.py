"""Sharded checkpoints: DCP tensors + JSON metadata, atomic commit, retention, safe loading."""

from .config import CheckpointConfig

__all__ = ["CheckpointConfig"]
