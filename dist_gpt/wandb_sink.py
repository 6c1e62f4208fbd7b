"""Weights & Biases, optional (`--log.wandb=true`; `pip install 'dist_gpt[wandb]'`).

    python -m dist_gpt.train --log.wandb=true                          # online: `wandb login` first
    WANDB_MODE=offline python -m dist_gpt.train --log.wandb=true       # no network; `wandb sync` later

Rank 0's `MetricsLogger` hands this sink what it writes to TensorBoard: every scalar (the same tags
as metrics.jsonl), the evaluation samples and the resolved config. TensorBoard stays the default
and does not change. The W&B run lives in `<run_dir>/wandb/`; its id is derived from the run
directory's absolute path (`run_id`), so a requeued or resumed job continues the same W&B run
(`resume="allow"`) instead of starting a new one. W&B keeps one value per step and ignores steps
that go backwards: after a NaN rollback the replayed steps show in TensorBoard and metrics.jsonl only.
WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE and WANDB_API_KEY are read by wandb itself.
"""

from __future__ import annotations

import hashlib
import html
import re
from pathlib import Path


def run_id(run_dir: str | Path) -> str:
    """A W&B run id that is the same for every job of one run directory: its name (W&B's allowed
    characters) and 12 hex digits of the hash of its absolute path, e.g. 'cpu-3f2a9c01b7d4'."""
    path = Path(run_dir).resolve()
    name = re.sub(r"[^A-Za-z0-9_-]", "-", path.name)[:40]
    return f"{name}-{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"


class WandbSink:
    """One W&B run per run directory; rank 0 only (it lives in rank 0's RunLogger)."""

    def __init__(self, run_dir: str | Path, project: str) -> None:
        import wandb  # optional: pip install 'dist_gpt[wandb]' (log.wandb checks it at start)

        self.wandb = wandb
        self.run = wandb.init(project=project, id=run_id(run_dir), name=Path(run_dir).resolve().name,
                              resume="allow", dir=str(run_dir),
                              # dist_gpt prints its own console lines; wandb's capture would duplicate them
                              settings=wandb.Settings(console="off", quiet=True))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)  # a resume may change e.g. train.steps

    def close(self) -> None:
        self.run.finish()
