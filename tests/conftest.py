"""Shared fixtures: a tiny dataset made from a text kept in the repository, and real launchers.

The integration tests run the real entry points (`python -m dist_gpt.train`, `torchrun`) on the
`debug` preset, in fp32 so losses can be compared exactly, with per-step losses read back from the
run's `metrics.jsonl`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "assets"

# Every integration run: the debug preset, fp32, dropout 0, a loss logged at every step.
EXACT = ["--preset", "debug", "--train.precision=fp32", "--model.dropout=0", "--log.interval=1",
         "--log.tensorboard=false", "--eval.sample_tokens=0"]


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIST_GPT_FAULT", "TORCHELASTIC"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    # torchrun restarts with gloo need the rendezvous store not to be shared with the restarted
    # workers (see docs/CLUSTER.md); harmless without restarts.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    env.update(extra or {})
    return env


def export_main(argv: list[str]) -> int:
    """`python -m dist_gpt.export ARGV` in this process: its exit code (the entry point itself ends
    the process through dist.run_main)."""
    from dist_gpt import export
    from dist_gpt.parallel.dist import exit_code

    return exit_code(export.run, argv)


def sample_main(argv: list[str]) -> int:
    """`python -m dist_gpt.sample ARGV` in this process: its exit code."""
    from dist_gpt import sample
    from dist_gpt.parallel.dist import exit_code

    return exit_code(sample.run, argv)


def require(module: str):
    """Import an optional test dependency of the dev extra (transformers, lm_eval): skip with the
    reason where it is missing, except under CI=true, where the dev extra is installed and a
    missing module must fail the run rather than hide the tests."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(module)


def run_train(args: list[str], nproc: int = 1, env: dict | None = None, timeout: float = 300,
              max_restarts: int = 0, module: str = "dist_gpt.train", check: bool = True,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run an entry point in 1 process (plain python) or `nproc` processes (torchrun, gloo)."""
    if nproc == 1 and max_restarts == 0:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               f"--max-restarts={max_restarts}", "-m", module, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(env), cwd=cwd or REPO)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}\n--- stdout\n{out.stdout[-4000:]}"
                             f"\n--- stderr\n{out.stderr[-6000:]}")
    return out


def pause_env(folder: Path, *points: str | int) -> dict:
    """The environment that holds a child at `points` (dist_gpt.hooks.pause) until the test releases it."""
    folder.mkdir(parents=True, exist_ok=True)
    return {"DIST_GPT_FAULT_PAUSE_AT": ",".join(map(str, points)), "DIST_GPT_FAULT_PAUSE_DIR": str(folder)}


def wait_paused(folder: Path, point: str | int, count: int, alive: Callable[[], bool], timeout: float = 600) -> None:
    """Block until `count` processes are held at `point` (each wrote paused-POINT-PID when it got there).

    The processes wait for the test, so nothing here races them: `alive()` turning false fails at once
    (the child ended without reaching the point), and `timeout` only bounds a hang."""
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(f"paused-{point}-*"))) < count:
        assert alive(), f"the process ended before it reached pause point {point}"
        assert time.monotonic() < deadline, f"nothing reached pause point {point} within {timeout:.0f} s"
        time.sleep(0.05)


def release(folder: Path, point: str | int) -> None:
    """Let the processes held at `point` go on."""
    (folder / f"release-{point}").touch()


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from the run's metrics.jsonl (the last record of a step wins)."""
    out: dict[int, float] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            out[rec["step"]] = rec["train/loss"]
    return out


def final(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "final.json").read_text())


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory) -> Path:
    """The embedded default dataset (the Python standard library's source, byte level, ~30 MB), built
    once per session: enough text that a few hundred steps of the `cpu` preset stay within one epoch."""
    from dist_gpt.data.default import ensure_default_dataset

    return ensure_default_dataset(tmp_path_factory.mktemp("data") / "stdlib")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A byte-level dataset of the license texts in tests/assets (80 KB), made by tools.prepare."""
    out = tmp_path_factory.mktemp("data") / "licenses"
    subprocess.run([sys.executable, "-m", "tools.prepare", str(ASSETS / "licenses.txt"), "--tokenizer", "byte",
                    "--out", str(out)], check=True, capture_output=True, text=True, env=_env(), cwd=REPO)
    return out
