"""The torch version gate (dist_gpt/torch_version.py): an older torch stops every command with one
line naming both versions; the check reads package metadata and never imports torch."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, _env
from dist_gpt.torch_version import MIN_TORCH, parse_version, torch_problem

# Runs an entry point with importlib.metadata answering `FAKE` for torch: the version the gate sees.
_INJECT = """
import importlib.metadata as m, runpy, sys
real = m.version
m.version = lambda name: {fake!r} if name == "torch" else real(name)
sys.argv = ["dist_gpt.train", "--help"]
runpy.run_module("dist_gpt.train", run_name="__main__")
"""


def _run_with_torch(fake: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _INJECT.format(fake=fake)], capture_output=True, text=True,
                          env=_env(extra_env), cwd=REPO, timeout=120)


def test_versions_parse_without_local_or_prerelease_suffixes():
    assert parse_version("2.6.0+cu124") == (2, 6, 0)
    assert parse_version("2.13.0+cpu") == (2, 13, 0)
    assert parse_version("2.10.0.dev20250601") == (2, 10, 0)
    assert parse_version("2.7.0a0+git1234abc") == (2, 7, 0)
    assert MIN_TORCH == (2, 9)
    for ok in ("2.9.0", "2.9.1+cu118", "2.13.0+cpu", "2.14.1", "3.0.0", None):
        assert torch_problem(ok) is None
    assert "torch 2.5.1+cu121 is installed" in torch_problem("2.5.1+cu121")
    assert torch_problem("2.6.0+cu124") is not None and torch_problem("2.7.1") is not None  # failed the fast tests (README)


def test_an_older_torch_stops_a_command_with_one_line_once():
    out = _run_with_torch("2.5.1+cu121")
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert lines[0].startswith("error: torch 2.5.1+cu121 is installed, dist_gpt needs torch>=2.9")
    # under torchrun every rank stops, but only rank 0 says why
    other = _run_with_torch("2.4.0", {"RANK": "1"})
    assert other.returncode == 2 and other.stderr == ""
    # a supported version passes the gate: --help prints the options
    fine = _run_with_torch("2.9.0+cu126")
    assert fine.returncode == 0 and "--train.steps" in fine.stdout


def test_the_gate_does_not_import_torch():
    """prepare's encoding workers import dist_gpt (so the gate runs there too) but never torch."""
    code = "import sys, dist_gpt.data.encode, dist_gpt.data.prepare; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=REPO,
                         timeout=60, check=True)
    assert out.stdout.strip() == "False"
