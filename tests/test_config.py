"""Configuration: precedence, strict validation, presets that derive, every option documented."""

import dataclasses
import subprocess
import sys

import pytest

from dist_gpt import config, presets
from dist_gpt.errors import ConfigError


def test_precedence_preset_then_file_then_cli(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nsteps = 7\nmicro_batch = 4\n[model]\nn_layer = 3\n")
    cfg = config.parse(["--preset", "debug", "--config", str(toml), "--train.steps=9"])
    assert cfg.preset == "debug"
    assert cfg.model.n_embd == 32                # from the preset
    assert cfg.model.n_layer == 3                # the file beats the preset
    assert cfg.train.micro_batch == 4
    assert cfg.train.steps == 9                  # the command line beats the file


def test_space_separated_values_aliases_and_bool_flags():
    cfg = config.parse(["--preset=debug", "--train.steps", "5", "--resume", "none", "--force",
                        "--train.compile", "--init-from", "x.safetensors"])
    assert cfg.train.steps == 5
    assert cfg.checkpoint.resume == "none" and cfg.checkpoint.force is True
    assert cfg.train.compile is True
    assert cfg.train.init_from == "x.safetensors"


def test_compile_defaults_to_auto_and_unrecorded_auto_resumes_as_before():
    """auto is the default; `use_compile` is how auto resumes a checkpoint written before the choice was
    recorded: on for CUDA, off on CPU (new runs decide with compile_rule, tests/test_compile_auto.py)."""
    import torch
    from dist_gpt.parallel.dist import use_compile
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert config.parse([]).train.compile is None
    assert config.parse(["--train.compile=auto"]).train.compile is None
    assert (use_compile(None, cpu), use_compile(None, cuda)) == (False, True)
    assert (use_compile(True, cpu), use_compile(False, cuda)) == (True, False)  # an explicit setting wins


def test_optional_values_accept_none():
    cfg = config.parse(["--eval.max_blocks=none", "--model.head_dim", "8"])
    assert cfg.eval.max_blocks is None and cfg.model.head_dim == 8


@pytest.mark.parametrize("argv, fragment", [
    (["--train.stepz=3"], "did you mean --train.steps"),
    (["--optim.learning_rate=1e-3"], "did you mean --optim.lr?"),  # a synonym, not the nearest spelling
    (["--train.log_interval=5"], "did you mean --log.interval?"),
    (["--trian.steps=3"], "did you mean --train.steps?"),
    (["--trian.steps=3"], "unknown option --trian.steps"),
    (["--train.steps=three"], "expects an integer"),
    (["--train.compile=maybe"], "true or false"),
    (["--train.precision=fp8"], "train.precision must be one of"),
    (["--model.norm=batchnorm"], "model.norm"),
    (["--preset", "huge"], "unknown preset"),
    (["--recipe", "ancient"], "train.recipe"),
    (["steps=3"], "unexpected argument"),
    (["--train.global_batch=10", "--train.micro_batch=4"], "must be a multiple of train.micro_batch"),
    (["--config", "/nonexistent.toml"], "not found"),
])
def test_bad_options_give_one_line_errors(argv, fragment):
    with pytest.raises(ConfigError) as e:
        config.parse(argv)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_toml_types_and_keys(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = 'ten'\n")
    with pytest.raises(ConfigError, match=f"^config file {bad}: option --train.steps expects an integer"):
        config.parse(["--config", str(bad)])
    bad.write_text("[train]\nstep = 10\n")
    with pytest.raises(ConfigError, match=f"^config file {bad}: unknown option --train.step .did you mean --train.steps"):
        config.parse(["--config", str(bad)])
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.parse(["--config", str(bad)])


def test_presets_derive_and_all_resolve():
    for name in presets.PRESETS:
        cfg = config.build(name)
        assert cfg.train.global_batch % cfg.train.micro_batch == 0
    debug, cpu = presets.debug("classic"), presets.cpu("classic")
    assert debug["data.path"] == cpu["data.path"]            # debug derives from cpu
    seed = config.build("seed")
    assert (seed.model.n_layer, seed.model.n_embd, seed.model.n_head, seed.model.head_dim) == (16, 384, 20, 19)
    assert seed.model.block == "postnorm" and seed.model.mlp == "relu" and not seed.model.tie_embeddings
    assert seed.train.recipe == "classic"


def test_recipe_switch_keeps_individual_overrides():
    classic = config.parse(["--preset", "debug", "--recipe", "classic"])
    assert classic.optim.name == "adamw" and classic.model.positions == "learned"
    modern = config.parse(["--preset", "debug", "--recipe", "modern", "--optim.name=adamw"])
    assert modern.model.positions == "rope" and modern.optim.name == "adamw"


def test_help_lists_every_option_with_default_and_meaning():
    text = config.help_text(config.build("cpu"))
    for name, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"--{name}.{f.name}=" in text
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"


def test_roundtrip_through_dict():
    cfg = config.parse(["--preset", "debug", "--train.steps=3"])
    assert config.from_dict(cfg.to_dict()) == cfg


def test_cli_bad_flag_exits_2_with_one_line():
    out = subprocess.run([sys.executable, "-m", "dist_gpt.train", "--train.stepz=3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: unknown option --train.stepz (did you mean --train.steps?) (see --help)"]


def test_batch_split_is_checked_against_the_launch_world_size():
    """global_batch=9, micro_batch=2 on 3 ranks was refused as `micro_batch × world size = 2 × 1`."""
    with pytest.raises(ConfigError, match=r"train.global_batch=9 must be a multiple of train.micro_batch × world "
                                          r"size = 2 × 3 on 3 ranks"):
        config.parse(["--preset", "debug", "--train.global_batch=9", "--train.micro_batch=2"], world=(3, 3))
    cfg = config.parse(["--preset", "debug", "--train.global_batch=9", "--train.micro_batch=3"], world=(3, 3))
    assert cfg.train.grad_accum(3) == 1


def test_fsdp_with_a_shard_size_is_refused():
    """--parallel.data=fsdp --parallel.shard_size=5 on 3 ranks used to run with no note (fsdp shards over all)."""
    with pytest.raises(ConfigError, match=r"^parallel.shard_size=5 applies to hsdp only: fsdp shards over every rank "
                                          r"\(3\); drop --parallel.shard_size"):
        config.parse(["--preset", "debug", "--train.global_batch=6", "--train.micro_batch=2",
                      "--parallel.data=fsdp", "--parallel.shard_size=5"], world=(3, 3))
    cfg = config.parse(["--preset", "debug", "--train.global_batch=6", "--train.micro_batch=2",
                        "--parallel.data=hsdp", "--parallel.shard_size=3"], world=(3, 3))
    assert cfg.parallel.mesh_shape(3, 3) == (1, 3)
