"""Re-exports dist_gpt.parallel.precision under its old path `dist_gpt.precision` (nothing in the package imports it)."""

from dist_gpt.parallel.precision import (DTYPES, PRECISIONS, Precision, cpu_has_native_bf16, resolve_precision)

__all__ = ["DTYPES", "PRECISIONS", "Precision", "cpu_has_native_bf16", "resolve_precision"]
