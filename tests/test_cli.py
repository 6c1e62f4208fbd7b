"""The user-facing entry points around a trained run: sample, evaluate, export, --help."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, _env, final, run_train


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    run_train(["--preset", "debug", f"--data.path={tiny_data}", f"--train.run_dir={run}", "--train.steps=20"])
    return run


def _val_loss(stdout: str) -> float:
    return float(re.search(r"val loss ([0-9.]+) nats/token", stdout).group(1))


def test_evaluate_whole_split_on_one_and_two_ranks_agree(trained, tiny_data):
    one = run_train(["--run", str(trained)], module="dist_gpt.evaluate")
    two = run_train(["--run-dir", str(trained)], module="dist_gpt.evaluate", nproc=2)
    assert "bits/byte" in one.stdout
    assert abs(_val_loss(one.stdout) - _val_loss(two.stdout)) < 1e-4  # printed to 4 decimals
    # The whole split: every block of the 4,000-token validation split once.
    blocks = int(re.search(r"over (\d+) blocks", one.stdout).group(1))
    assert blocks == (4000 - 1) // 33


def test_evaluate_refuses_a_dataset_of_another_tokenizer(trained, tmp_path):
    """A char dataset's ids fit the byte model's vocabulary, but mean other characters: refused in one
    line, or evaluated with a loud warning when asked for on purpose."""
    from conftest import ASSETS
    from dist_gpt.data.prepare import main as prepare_main

    other = tmp_path / "char"
    assert prepare_main([str(ASSETS / "licenses.txt"), "--tokenizer", "char", "--out", str(other), "--quiet"]) == 0
    out = run_train(["--run", str(trained), "--data", str(other)], module="dist_gpt.evaluate", check=False)
    assert out.returncode == 2 and out.stdout == "", out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"error: dataset {other} was made with another tokenizer (char") and "(byte, " in line
    assert line.endswith("pass --allow-tokenizer-mismatch to evaluate anyway")
    out = run_train(["--run", str(trained), "--data", str(other), "--allow-tokenizer-mismatch", "--max-blocks", "4"],
                    module="dist_gpt.evaluate")
    assert out.stderr.startswith(f"WARNING: dataset {other} was made with another tokenizer") and "val loss" in out.stdout


def on_terminal(module: str, *args: str) -> tuple[int, str, str]:
    """Run an entry point with stderr on a pseudo-terminal, as a person at a terminal sees it:
    (exit status, stdout, what the terminal showed)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # rows, columns
    proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=slave,
                            env=_env(), cwd=REPO)
    os.close(slave)
    shown = []
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: every end of the terminal the child held is closed
            break
        if not chunk:
            break
        shown.append(chunk)
    os.close(master)
    out = proc.stdout.read().decode()
    return proc.wait(timeout=60), out, b"".join(shown).decode(errors="replace")


@pytest.mark.slow
def test_long_commands_show_progress_on_a_terminal_only(trained, tiny_data, tmp_path):
    code, out, shown = on_terminal("dist_gpt.evaluate", "--run", str(trained))
    assert code == 0 and "val loss" in out
    assert re.search(r"loading step_\d+: 100%.*B/s", shown), shown           # the checkpoint's bytes
    assert re.search(r"evaluate: 100%.*\| 121/121 \[.*blocks/s\]", shown), shown  # every block, its rate
    code, out, shown = on_terminal("dist_gpt.evaluate", "--run", str(trained), "--quiet")
    assert code == 0 and "val loss" in out and shown == ""
    code, out, shown = on_terminal("tools.shards", "verify", str(tiny_data))
    assert code == 0 and re.search(r"verify: 100%", shown), shown
    exported = tmp_path / "m.safetensors"
    code, out, shown = on_terminal("dist_gpt.export", "--checkpoint", str(trained), "--out", str(exported))
    assert code == 0 and re.search(r"loading step_\d+: 100%", shown), shown
    # sample's text is its progress on a terminal; written elsewhere, a bar counts the tokens
    code, out, shown = on_terminal("dist_gpt.sample", "--model", str(exported), "--max-new-tokens", "20")
    assert code == 0 and re.search(r"loading m.safetensors: 100%", shown) and re.search(r"sample: .*tok/s", shown)
    # and not a terminal (a log, a pipe): nothing but the result
    out = run_train(["--run", str(trained)], module="dist_gpt.evaluate")
    assert out.stderr == ""


def test_sample_streams_text_from_the_run_and_from_an_export(trained, tmp_path):
    out = run_train(["--run", str(trained), "--prompt", "The ", "--max-new-tokens", "30", "--temperature", "0"],
                    module="dist_gpt.sample")
    assert out.stdout.startswith("The ") and len(out.stdout) > 10
    exported = tmp_path / "model.safetensors"
    run_train(["--checkpoint", final(trained)["checkpoint"], "--out", str(exported)], module="dist_gpt.export")
    again = run_train(["--model", str(exported), "--prompt", "The ", "--max-new-tokens", "30", "--temperature", "0"],
                      module="dist_gpt.sample")
    assert again.stdout == out.stdout  # greedy: the same weights give the same text


def test_sample_bad_argument_is_one_line(trained):
    out = run_train(["--run", str(trained), "--temperature", "-1"], module="dist_gpt.sample", check=False)
    assert out.returncode == 2 and out.stderr.startswith("error:") and "Traceback" not in out.stderr


def test_train_help_lists_options():
    out = run_train(["--help"])
    assert "--train.global_batch=" in out.stdout and "--checkpoint.resume=" in out.stdout


def test_a_refusal_is_recorded_where_torchrun_reads_a_workers_root_cause(tmp_path, monkeypatch, capsys):
    """dist.refuse writes the error file that torch's own ProcessFailure parses for torchrun's summary."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from dist_gpt.parallel.dist import exit_code
    from dist_gpt.errors import DataError
    from dist_gpt.training.faults import NonFiniteLoss

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    def refused(argv):
        raise DataError(f"{argv[0]}: damaged")

    assert exit_code(refused, ["data/x"]) == 2
    assert capsys.readouterr().err == "error: data/x: damaged\n"
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    assert failure.message["extraInfo"]["py_callstack"] == "error: data/x: damaged"  # the summary's traceback line

    def nan_stop(argv):
        raise NonFiniteLoss("non-finite loss at step 2")

    assert exit_code(nan_stop, []) == 3


def test_every_tool_is_a_console_script_that_works_from_any_directory(tmp_path):
    """`python -m tools.X` works only from the repository root (tools/ is not installed): every tool has
    a `dist-gpt-X` script whose code lives in the installed package. Run here as the script's wrapper
    runs it (`sys.exit(main())`), from another directory, with the repository's package on the path
    (not the tools/ folder's own code: the script's target must be inside dist_gpt)."""
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    tools = sorted(p.stem for p in (REPO / "tools").glob("*.py") if p.stem != "__init__")
    assert tools == ["import_notebook", "prepare", "shards"]
    for tool in tools:
        target = scripts[f"dist-gpt-{tool.replace('_', '-')}"]
        assert target.startswith("dist_gpt."), target  # setuptools installs dist_gpt* only

    def script(name: str, *args: str) -> subprocess.CompletedProcess:
        module, func = scripts[name].split(":")
        return subprocess.run([sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())",
                               *args], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)

    (tmp_path / "corpus.txt").write_text("a small corpus of text, for a dataset made from elsewhere.\n" * 200)
    made = script("dist-gpt-prepare", "corpus.txt", "--tokenizer", "byte", "--out", "ds", "--quiet")
    assert made.returncode == 0 and (tmp_path / "ds" / "manifest.json").is_file(), made.stderr
    verified = script("dist-gpt-shards", "verify", "ds", "--quiet")
    assert verified.returncode == 0, verified.stderr
    helped = script("dist-gpt-import-notebook", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: dist-gpt-import-notebook"), helped.stderr
