"""Re-exports dist_gpt.model.gpt under the old path `dist_gpt.model` (nothing in the package imports it)."""

from .gpt import (BLOCKS, DEFAULT_EPS, GPT, MLP, MLPS, NORMS, POSITIONS, Block, CausalSelfAttention, GPTConfig,
                  KVCache, Norm, apply_rope, attention, rope_tables)

__all__ = ["BLOCKS", "DEFAULT_EPS", "GPT", "MLP", "MLPS", "NORMS", "POSITIONS", "Block", "CausalSelfAttention",
           "GPTConfig", "KVCache", "Norm", "apply_rope", "attention", "rope_tables"]
