"""dist_gpt: a readable, production-grade GPT trainer. The torch version is checked first
(torch_version.py), before any module imports torch."""

from .torch_version import require_torch

require_torch()
