"""Re-exports dist_gpt.convert.notebook under its old path `dist_gpt.notebook` (nothing in the package imports it)."""

from dist_gpt.convert.notebook import (LAYERNORM_EPS, NOTEBOOK_ARCHITECTURE, NOTEBOOK_CLASSES, STORAGE_DTYPES,
                                       TORCH_LAYERS, ImportResult, InertModule, NotebookState, import_notebook,
                                       load_notebook_state, map_to_dist_gpt, read_vocab)

__all__ = ["LAYERNORM_EPS", "NOTEBOOK_ARCHITECTURE", "NOTEBOOK_CLASSES", "STORAGE_DTYPES", "TORCH_LAYERS",
           "ImportResult", "InertModule", "NotebookState", "import_notebook", "load_notebook_state",
           "map_to_dist_gpt", "read_vocab"]
