"""Fuzzing the files a user keeps: damage a dataset, a checkpoint or an export and run every command
that reads it, in-process, through the real entry points.

A seeded loop picks a file and one kind of damage (a flipped bit, a truncation, a zeroed block,
appended bytes, an emptied or a deleted file), applies it to the live copy, runs each command that
reads that file, and restores the file. Every outcome must be a one-line `UserError` that names the
damaged file, or one of exactly two acceptances:

  (a) payload bytes of a shard changed (size intact) and `data.verify` is off: training and evaluate
      read them as tokens (`tools.shards verify` and `data.verify=true` must still catch them);
  (b) only optimizer-state bytes of the checkpoint's data file changed: evaluate, export and sample
      never read the optimizer state (resuming must still catch them).

Damage that leaves a self-checksummed JSON file (manifest.json, DONE) meaning the same (a trailing
newline cut off) is no damage and is not counted. docs/FORMAT.md and docs/CHECKPOINTS.md list what
each command detects.

    python -m pytest tests/test_fuzz.py -q                         # the CI budget: about a minute
    DIST_GPT_FUZZ_ROUNDS=2000 DIST_GPT_FUZZ_SEED=7 python -m pytest tests/test_fuzz.py -q   # longer
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dist_gpt import config as config_mod
from dist_gpt.checkpoint import read_metadata
from dist_gpt.data.format import HEADER_SIZE
from dist_gpt.data.prepare import main as prepare_main
from dist_gpt.data.shard_tools import verify_dataset
from dist_gpt.parallel.dist import DistEnv
from dist_gpt.errors import UserError
from dist_gpt.evaluate import evaluate
from conftest import export_main
from dist_gpt.training.signals import StopSignals
from conftest import sample_main
from dist_gpt.train import train
from dist_gpt.training.trainer import build

ASSETS = Path(__file__).resolve().parent / "assets"
ROUNDS = int(os.environ.get("DIST_GPT_FUZZ_ROUNDS", "60"))
SEED = int(os.environ.get("DIST_GPT_FUZZ_SEED", "22"))
SELF_CHECKED_JSON = ("manifest.json", "DONE")
DAMAGE = ("bit flip", "truncation", "zeroed block", "appended bytes", "emptied", "deleted")


# ---------------------------------------------------------------------------------------------
# The artifacts: a dataset with its own tokenizer file, a checkpoint of the real trainer, an export

@dataclass
class Artifacts:
    data: Path        # the dataset the checkpoint was trained on (its recorded path)
    checkpoint: Path
    export: Path
    scratch: Path     # fresh run directories and export targets


def _cfg(data: Path, run_dir: Path, *extra: str):
    return config_mod.parse(["--preset", "debug", "--model.vocab_size=0", "--train.precision=fp32", "--log.tensorboard=false",
                             "--eval.sample_tokens=0", "--eval.max_blocks=4", "--train.steps=2",
                             "--checkpoint.interval=0", f"--data.path={data}", f"--train.run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: these tiny models spend their time spinning for busy cores otherwise (a step of
    the debug model took 4-15 s with 2 threads on this shared 2-core machine, 0.3-0.8 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, one_thread) -> Artifacts:
    root = tmp_path_factory.mktemp("fuzz")
    data = root / "data"
    assert prepare_main([str(ASSETS / "licenses.txt"), "--tokenizer", "bpe:300", "--shard-tokens", "12000",
                         "--workers", "0", "--out", str(data), "--quiet"]) == 0
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = build(_cfg(data, root / "run"), DistEnv(), StopSignals())
        assert train(trainer, root / "run") == 0
        trainer.log.close()
        checkpoint = root / "run" / "checkpoints" / "step_0000002"
        assert export_main(["--checkpoint", str(checkpoint), "--out", str(root / "model.safetensors"), "--quiet"]) == 0
    return Artifacts(data, checkpoint, root / "model.safetensors", root / "scratch")


# ---------------------------------------------------------------------------------------------
# The commands, each run in-process; what each one reads

def _scratch(a: Artifacts, name: str) -> Path:
    a.scratch.mkdir(exist_ok=True)
    path = a.scratch / f"{name}-{len(list(a.scratch.iterdir()))}"
    return path


def cmd_verify(a: Artifacts) -> None:  # python -m tools.shards verify
    problems = verify_dataset(a.data)
    if problems:
        raise UserError(" | ".join(problems))


def cmd_train(a: Artifacts, *extra: str) -> None:  # python -m dist_gpt.train, up to its first step
    trainer = build(_cfg(a.data, _scratch(a, "run"), *extra), DistEnv(), StopSignals())
    try:
        trainer.evaluator.maybe_run(0)
        trainer.step()
    finally:
        trainer.log.close()


def cmd_train_verify(a: Artifacts) -> None:  # python -m dist_gpt.train --data.verify=true
    cmd_train(a, "--data.verify=true")


def cmd_resume(a: Artifacts) -> None:  # python -m dist_gpt.train --resume CHECKPOINT
    trainer = build(_cfg(a.data, _scratch(a, "run"), f"--resume={a.checkpoint}"), DistEnv(), StopSignals())
    trainer.log.close()
    assert trainer.state.step == 2


def _entry(main, argv: list[str]) -> None:
    """An entry point that prints its UserError and returns 2: the message becomes a UserError here."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    if code == 2:
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
        raise UserError(lines[0][len("error: "):])
    assert code == 0, err.getvalue()


def cmd_evaluate(a: Artifacts, source: Path) -> None:  # python -m dist_gpt.evaluate
    flag = "--model" if source.suffix == ".safetensors" else "--checkpoint"
    try:
        evaluate([flag, str(source), "--max-blocks", "4", "--quiet"])
    finally:
        torch.set_num_threads(1)  # evaluate's dist.init gave torch the cores


def cmd_export(a: Artifacts) -> None:  # python -m dist_gpt.export
    _entry(export_main, ["--checkpoint", str(a.checkpoint), "--out", str(_scratch(a, "m")) + ".safetensors", "--quiet"])


def cmd_sample(a: Artifacts, source: Path) -> None:  # python -m dist_gpt.sample
    flag = "--model" if source.suffix == ".safetensors" else "--checkpoint"
    _entry(sample_main, [flag, str(source), "--prompt", "The ", "--max-new-tokens", "3", "--quiet"])


def readers(a: Artifacts, file: Path) -> dict:
    """The commands that read `file`, by name."""
    if file == a.export:
        return {"evaluate": lambda: cmd_evaluate(a, a.export), "sample": lambda: cmd_sample(a, a.export)}
    if file.parent == a.checkpoint:
        return {"resume": lambda: cmd_resume(a), "evaluate": lambda: cmd_evaluate(a, a.checkpoint),
                "export": lambda: cmd_export(a), "sample": lambda: cmd_sample(a, a.checkpoint)}
    commands = {"verify": lambda: cmd_verify(a), "train": lambda: cmd_train(a),
                "train --data.verify=true": lambda: cmd_train_verify(a),
                "evaluate": lambda: cmd_evaluate(a, a.checkpoint)}
    if file.name == "tokenizer.json":  # sample and export read the dataset's tokenizer file, nothing else of it
        commands.update(export=lambda: cmd_export(a), sample=lambda: cmd_sample(a, a.checkpoint))
    return commands


# ---------------------------------------------------------------------------------------------
# Damage

def damage(raw: bytes, kind: str, rng: random.Random) -> tuple[bytes | None, range | None]:
    """(the damaged bytes or None for a deleted file, the byte range changed in place or None)."""
    n = len(raw)
    if kind == "bit flip":
        at = rng.randrange(n)
        return raw[:at] + bytes([raw[at] ^ (1 << rng.randrange(8))]) + raw[at + 1:], range(at, at + 1)
    if kind == "truncation":
        return raw[:rng.randrange(1, n)], None
    if kind == "zeroed block":
        at = rng.randrange(n)
        end = min(n, at + rng.randint(1, 64))
        return raw[:at] + bytes(end - at) + raw[end:], range(at, end)
    if kind == "appended bytes":
        return raw + bytes(rng.randrange(33, 256) for _ in range(rng.randint(1, 16))), None
    return (b"", None) if kind == "emptied" else (None, None)


def no_damage(file: Path, raw: bytes, damaged: bytes | None) -> bool:
    if damaged == raw:
        return True
    if file.name in SELF_CHECKED_JSON and damaged is not None:
        try:
            return json.loads(damaged) == json.loads(raw)
        except ValueError:
            return False
    return False


def accepted(a: Artifacts, file: Path, changed: range | None, command: str) -> str | None:
    """Which of the two acceptances covers this damage for this command, if any."""
    if (changed is not None and file.suffix == ".bin" and changed.start >= HEADER_SIZE
            and command in ("train", "evaluate")):
        return "(a) shard payload, data.verify off"
    if changed is not None and file.suffix == ".distcp" and command in ("evaluate", "export", "sample"):
        items = [(i.offset, i.offset + i.length, index.fqn)
                 for index, i in read_metadata(a.checkpoint).storage_data.items() if i.relative_path == file.name]
        if all(any(lo <= b < hi and ".optim." in fqn for lo, hi, fqn in items) for b in changed):
            return "(b) optimizer state only"
    return None


# ---------------------------------------------------------------------------------------------
# The loop

@pytest.mark.slow
def test_every_damage_is_refused_in_one_line_naming_the_file_or_explicitly_accepted(artifacts):
    a = artifacts
    files = sorted(p for p in a.data.iterdir() if p.is_file()) + sorted(a.checkpoint.iterdir()) + [a.export]
    rng = random.Random(SEED)
    seen, failures = Counter(), []
    quiet = contextlib.redirect_stdout(io.StringIO())
    for round_ in range(ROUNDS):
        file, kind = rng.choice(files), DAMAGE[round_ % len(DAMAGE)]
        raw = file.read_bytes()
        damaged, changed = damage(raw, kind, rng)
        if no_damage(file, raw, damaged):
            seen["no damage"] += 1
            continue
        if damaged is None:
            file.unlink()
        else:
            file.write_bytes(damaged)
        try:
            for command, run in readers(a, file).items():
                where = f"round {round_}: {kind} of {file.name} ({changed}), {command}"
                try:
                    with quiet:
                        run()
                except UserError as e:
                    message = str(e)
                    if "\n" in message or file.name not in message:
                        failures.append(f"{where}: the error does not name the file in one line: {message}")
                    seen["refused"] += 1
                    continue
                except Exception as e:  # a traceback: what a user must never see
                    failures.append(f"{where}: {type(e).__name__}: {e}")
                    continue
                why = accepted(a, file, changed, command)
                if why is None:
                    failures.append(f"{where}: not detected")
                seen[why or "undetected"] += 1
        finally:
            file.write_bytes(raw)
            shutil.rmtree(a.scratch, ignore_errors=True)
    print(f"{ROUNDS} rounds, seed {SEED}: {dict(seen)}")
    assert not failures, f"{len(failures)} outcomes out of bounds:\n" + "\n".join(failures[:40])
    assert seen["refused"] > ROUNDS  # the loop really damaged things
