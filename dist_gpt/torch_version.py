"""The torch versions dist_gpt runs on, checked before anything imports torch.

`dist_gpt/__init__.py` calls `require_torch()` first thing, so every command (`python -m
dist_gpt.train`, `tools.prepare`, ...) on an older torch stops with one line naming the installed and
the required version, instead of an ImportError from deep inside a module. The version comes from the
package metadata (`importlib.metadata`), never from `import torch`: prepare's encoding workers
import dist_gpt but not torch, and must stay that light.

Why 2.9: `fully_shard`, `MixedPrecisionPolicy` and `register_fsdp_forward_method` are public in
`torch.distributed.fsdp` from 2.6 on (parallel/dist.py), but the registry's 2.6.0 and 2.7.1 failed the
fast tests: 2.6's `torch.distributed.checkpoint.save` has no `no_dist` argument (checkpoint writing),
and on both the FlexAttention block mask differs from the boolean mask (test_doc_mask) and the sharded
layouts do not match one process (test_parallel). 2.9.1 passed them (README, "Supported torch
versions"); 2.8 was not run, so it is not claimed.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import metadata

MIN_TORCH = (2, 9)


def parse_version(text: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string, without local or pre-release suffixes:
    "2.6.0+cu124" -> (2, 6, 0), "2.10.0.dev20250601" -> (2, 10, 0), "2.7.0a0+git1234" -> (2, 7, 0)."""
    numbers = re.match(r"\d+(?:\.\d+)*", text.strip())
    return tuple(int(n) for n in numbers.group(0).split(".")) if numbers else ()


def installed_torch() -> str | None:
    """The installed torch's version from its metadata; None where torch is not installed (only
    data preparation works then, and it does not need torch)."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def torch_problem(installed: str | None) -> str | None:
    """The one-line message for `installed` when dist_gpt cannot run on it, else None."""
    if installed is None or parse_version(installed)[:2] >= MIN_TORCH:
        return None
    need = ".".join(map(str, MIN_TORCH))
    return (f"torch {installed} is installed, dist_gpt needs torch>={need} (FSDP2, DCP and FlexAttention "
            f"as of 2.9): pip install --upgrade 'torch>={need}'")


def require_torch(installed: str | None = None) -> None:
    """Stop the process on a torch older than MIN_TORCH: the message on stderr (from the launch's
    rank 0 only, so torchrun prints it once) and exit status 2, as for every other user error."""
    problem = torch_problem(installed if installed is not None else installed_torch())
    if problem is None:
        return
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        print(f"error: {problem}", file=sys.stderr)
    raise SystemExit(2)
