"""Re-exports dist_gpt.convert.notebook under its old path `dist_gpt.notebook` (nothing in the package imports it)."""

from dist_gpt.data.tokenizers import read_char_vocab as read_vocab
from dist_gpt.convert.notebook import (BLOCK, EMBEDDINGS, FINAL, HEAD, HEAD_MASK, LAYERNORM_EPS,
                                       NOTEBOOK_ARCHITECTURE, NOTEBOOK_CLASSES, STORAGE_DTYPES, TORCH_LAYERS,
                                       ImportResult, InertModule, NotebookState, Rename, Sizes, import_notebook,
                                       load_notebook_state, map_to_dist_gpt)

__all__ = ["read_vocab", "BLOCK", "EMBEDDINGS", "FINAL", "HEAD", "HEAD_MASK", "LAYERNORM_EPS", "NOTEBOOK_ARCHITECTURE",
           "NOTEBOOK_CLASSES", "STORAGE_DTYPES", "TORCH_LAYERS", "ImportResult", "InertModule", "NotebookState",
           "Rename", "Sizes", "import_notebook", "load_notebook_state", "map_to_dist_gpt"]
