"""`train.compile=auto`: the rule's decisions, and a resumed run that keeps the choice it recorded.

The rule (dist_gpt/parallel/compile_rule.py) is a pure function of the run's steps, shape, device
and what cannot compile here; it is checked at a few points. The record is the checkpoint's
resolved train.compile: a real run writes it, a real resume keeps it, and the choice read back
from that checkpoint stays eager even where a fresh run of the new length would compile.
"""

from __future__ import annotations

import json

import pytest

from conftest import EXACT, run_train
from dist_gpt import config
from dist_gpt.checkpoint.layout import META, crc32_file, read_manifest, write_done
from dist_gpt.errors import ConfigError
from dist_gpt.parallel import compile_rule
from dist_gpt.parallel.compile_rule import CompileCase, decide
from dist_gpt.parallel.dist import DistEnv
from dist_gpt.training import compile_choice
from dist_gpt.training.compile_choice import choose_compile, compile_case


def _cpu_case(steps: int, preset: str = "cpu", world: int = 2, threads: int = 1, **keys) -> CompileCase:
    cfg = config.build(preset, overrides={"train.steps": steps, **keys})
    return compile_case(cfg, world, "cpu", threads)


def test_rule_decisions_at_a_few_points():
    # the default main job (cpu preset, 800 steps, 2 ranks x 1 thread) stays eager; the same shape
    # trained 100x longer compiles; so does a deep model's long run, but not its short one
    main = decide(None, _cpu_case(800))
    assert not main.on and main.reason.startswith("auto -> off (800 steps x ~")
    assert decide(None, _cpu_case(80_000)).on
    assert decide(None, _cpu_case(100_000, **{"model.n_layer": 12})).on
    assert not decide(None, _cpu_case(800, **{"model.n_layer": 12})).on
    # the debug preset's tiny model never repays a compile in any run the tests make
    assert not decide(None, _cpu_case(1000, "debug", world=1)).on
    # CUDA compiles; an explicit setting always wins; what cannot compile stays eager under auto
    cuda = CompileCase("cuda", steps=10, n_layer=2, micro_steps=1, width_work=1.0)
    assert decide(None, cuda).on and decide(False, _cpu_case(80_000)).reason == "false (set)"
    assert decide(True, _cpu_case(10)).on
    refused = CompileCase("cpu", 10**9, 4, 1, 1e9, refused="no C++ compiler for inductor's CPU kernels")
    assert decide(None, refused) == compile_rule.CompileChoice(False, "auto -> off (no C++ compiler for "
                                                                      "inductor's CPU kernels)")
    # resumed: the record wins over the rule; no record (an older checkpoint): auto as it was then
    assert not decide(None, _cpu_case(10**7), recorded=False, resumed=True).on
    assert decide(None, _cpu_case(10), recorded=True, resumed=True).on
    assert not decide(None, _cpu_case(10**7), recorded=None, resumed=True).on
    assert decide(None, cuda, recorded=None, resumed=True).on


def test_compile_true_where_it_cannot_work_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(compile_choice, "refusal", lambda device: "no C++ compiler for inductor's CPU kernels")
    cfg = config.build("debug", overrides={"train.run_dir": str(tmp_path / "run"), "train.compile": True})
    with pytest.raises(ConfigError, match=r"train.compile=true cannot work here: no C\+\+ compiler"):
        choose_compile(cfg, DistEnv())
    cfg.train.compile = None
    assert choose_compile(cfg, DistEnv()).reason == "auto -> off (no C++ compiler for inductor's CPU kernels)"


def _set_recorded(ckpt, value) -> None:
    """Rewrite the checkpoint's recorded train.compile (and its DONE checksums), as an older
    dist_gpt, which saved auto unresolved, would have written it."""
    meta = json.loads((ckpt / META).read_text())
    meta["config"]["train"]["compile"] = value
    (ckpt / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    done = read_manifest(ckpt)
    done["files"][META] = {"size": (ckpt / META).stat().st_size, "crc32": crc32_file(ckpt / META)}
    write_done(ckpt, done)


def test_resume_keeps_the_recorded_choice(tiny_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = [*EXACT, f"--data.path={tiny_data}", f"--train.run_dir={run}"]
    out = run_train([*args, "--train.steps=10"])
    assert "compile: auto -> off (10 steps x ~" in out.stdout
    ckpt = run / "checkpoints" / "step_0000010"
    assert json.loads((ckpt / META).read_text())["config"]["train"]["compile"] is False

    # with a margin of 0 any fresh CPU run compiles; the resumed one keeps its recorded eager choice
    monkeypatch.setattr(compile_rule, "MARGIN", 0.0)
    longer = config.build("debug", overrides={"train.run_dir": str(run), "train.steps": 10**6})
    assert choose_compile(longer, DistEnv()).reason == "auto -> off (as the resumed run recorded)"
    fresh = config.build("debug", overrides={"train.run_dir": str(tmp_path / "fresh"), "train.steps": 10**6})
    assert choose_compile(fresh, DistEnv()).on
    _set_recorded(ckpt, None)  # a checkpoint from before the record: auto as it decided then (CPU: off)
    assert choose_compile(longer, DistEnv()).reason.startswith("auto -> off (resumed from a checkpoint without")
    _set_recorded(ckpt, False)

    out = run_train([*args, "--train.steps=20"])  # the real resume, trained longer
    assert "compile: auto -> off (as the resumed run recorded)" in out.stdout
    assert json.loads((run / "run.json").read_text())["compile"] is False
    assert (run / "checkpoints" / "step_0000020" / "DONE").exists()
