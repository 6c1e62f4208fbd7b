"""Progress bars for the commands that can take more than a few seconds: prepare, evaluate, export,
sample, tools.shards verify (never the training loop, which prints its own lines).

A tqdm bar on stderr, shown from the start when stderr is a terminal, with its rate and the time
left; silent when stderr is not a terminal (a log file, a pipe, CI) or with the command's --quiet.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: float | None, desc: str, unit: str = "it", quiet: bool = False, **kwargs):
    """A tqdm bar (a context manager; `.update(n)`), disabled when quiet or stderr is not a terminal.
    unit="B" counts bytes in kB/MB (decimal)."""
    if unit == "B":
        kwargs = {"unit_scale": True, "unit_divisor": 1000, **kwargs}
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
                disable=quiet or not sys.stderr.isatty(), **kwargs)
