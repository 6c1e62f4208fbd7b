"""Downstream benchmarks of a dist_gpt model with EleutherAI's lm-evaluation-harness (`--tasks`).

    pip install -e ".[eval]"                                  # lm-eval and accelerate
    python -m dist_gpt.evaluate --run runs/gpt2-ft --tasks hellaswag,arc_easy
    python -m dist_gpt.evaluate --model exports/cpu --tasks mytask --include-path my_tasks/ --limit 200

The model (a run, checkpoint, export or Hugging Face directory) is exported to a temporary
Hugging Face directory (`dist_gpt.convert.hf`) and scored by lm-eval's own `hf` model through its Python
API (`lm_eval.simple_evaluate`), exactly as `lm_eval --model hf --model_args pretrained=DIR`
scores an export. lm-eval's built-in tasks download their data from the Hugging Face Hub on first
use; a task of your own is a YAML file in the --include-path directory (docs/INTEROP.md).
Runs in one process: lm-eval's `hf` model is not split across ranks here.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .convert.export import export
from .errors import ConfigError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "auto": "auto"}


@dataclass
class TaskOptions:
    """evaluate --tasks and the options that go with it (`python -m dist_gpt.evaluate --help`)."""

    tasks: str                       # comma-separated lm-eval task names
    include_path: str | None = None  # a directory of the user's own task YAML files
    limit: float | None = None       # examples per task (a fraction if < 1)
    num_fewshot: int | None = None
    batch_size: int = 16
    device: str = "auto"
    precision: str = "fp32"
    output: str | None = None        # lm-eval's results as JSON


def run_tasks(source: str, opts: TaskOptions) -> dict:
    """Score `source` on the lm-eval tasks; print the table; return lm-eval's results."""
    tasks, include_path, limit, num_fewshot = opts.tasks, opts.include_path, opts.limit, opts.num_fewshot
    batch_size, device, precision, output = opts.batch_size, opts.device, opts.precision, opts.output
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--tasks runs lm-eval in one process: start it with python -m dist_gpt.evaluate, "
                          "not torchrun")
    try:
        import lm_eval  # optional dependency: pip install 'dist_gpt[eval]'
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise ConfigError("--tasks needs lm-evaluation-harness: pip install 'dist_gpt[eval]' "
                          "(lm-eval and accelerate)") from None
    if precision not in DTYPES:
        raise ConfigError(f"--precision {precision}: choose one of {', '.join(DTYPES)}")
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path}: no such directory of task YAML files")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    manager = TaskManager(include_path=include_path)
    known = set(manager.all_tasks)
    unknown = [t for t in names if t not in known]
    if unknown or not names:
        raise ConfigError(f"--tasks {','.join(unknown) or tasks!r}: lm-eval knows no such task (list them with "
                          "lm_eval ls tasks; a task of your own needs --include-path DIR)")
    with tempfile.TemporaryDirectory(prefix="dist_gpt-lm-eval-") as tmp:
        export(source, Path(tmp) / "model", fmt="hf")
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(Path(tmp) / "model"), "dtype": DTYPES[precision]},
            tasks=names, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
            device=("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device,
            task_manager=manager, log_samples=False)
    print(make_table(results))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps({"source": source, "results": results["results"],
                                            "configs": results.get("configs")}, indent=2, default=str) + "\n")
        print(f"results written to {output}")
    return results["results"]

