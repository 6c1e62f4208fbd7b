"""Re-exports dist_gpt.training.run_files under its old path `dist_gpt.runinfo` (nothing in the package imports it)."""

from dist_gpt.training.run_files import (describe_run, git_sha, layout_name, make_run_dir, resolve_model_config,
                                         write_final)

__all__ = ["describe_run", "git_sha", "layout_name", "make_run_dir", "resolve_model_config", "write_final"]
