"""Re-exports dist_gpt.convert.hf under its old path `dist_gpt.hf` (nothing in the package imports it)."""

from dist_gpt.convert.hf import (ARCHS, EMBEDDED, export_config, export_model, init_model_config, init_state_dict,
                                 is_model_dir, model_config, read_hf_config, read_model)

__all__ = ["ARCHS", "EMBEDDED", "export_config", "export_model", "init_model_config", "init_state_dict",
           "is_model_dir", "model_config", "read_hf_config", "read_model"]
