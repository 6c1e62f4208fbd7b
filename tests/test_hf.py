"""Hugging Face interop: GPT-2, Llama (grouped-query), Qwen2 and Qwen3 directories import with the
logits and greedy generations of transformers; dist_gpt models export as directories transformers
loads with the same logits and generations, and read back bit for bit; tokenizers encode and decode
alike; every preset exports; every refusal is one line naming the file or option.

    python -m pytest tests/test_hf.py -q -x

transformers builds its models from a config here (no download): tiny random models, saved with
save_pretrained into tmp_path. The slow end-to-end test (fine-tune from a GPT-2 directory on 2
ranks, export, score with lm-eval) is in tests/test_hf_e2e.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import require

transformers = require("transformers")  # in the dev extra: CI always runs these

from dist_gpt import config as config_mod  # noqa: E402
from dist_gpt.data.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer  # noqa: E402
from dist_gpt.errors import CheckpointError, ConfigError, UserError  # noqa: E402
from dist_gpt.convert.hf import export_config, init_model_config, init_state_dict  # noqa: E402
from dist_gpt.convert.hf.export import write_export  # noqa: E402
from dist_gpt.convert.hf.tokenizer import tiktoken_tokenizer_json  # noqa: E402
from dist_gpt.model.gpt import GPT, GPTConfig  # noqa: E402
from dist_gpt.presets import PRESETS, RECIPES  # noqa: E402
from dist_gpt.convert.weights import LoadedWeights, load_weights  # noqa: E402

V, T = 101, 24
TEXTS = ["Permission is hereby granted, free of charge", "  two  spaces\tand a tab\nnew line\n\n",
         "unicode: héllo wörld € 😀", "x"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")


def perturbed(model):
    """Add noise to every parameter so zero biases, unit norms and zero-initialised projections work."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.float().eval()


def hf_model(kind: str, **kw):
    """A tiny random transformers model of `kind`."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                         eos_token_id=0, **kw)
        return perturbed(GPT2LMHeadModel(cfg))
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=T, **kw)
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    return perturbed(cls[1](cls[0](**common)))


def assert_same_function(ours: GPT, theirs):
    """Logits within 1e-4 in fp32, and equal greedy generations through dist_gpt's KV cache."""
    ours.eval()
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=1e-4, rtol=0)
    prompt, n = idx[:, :4], T - 4
    theirs.generation_config.eos_token_id = None  # generate all n tokens, as dist_gpt does without eot_id
    expected = theirs.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, n, temperature=0), expected)


def as_dist_gpt(directory: Path) -> GPT:
    loaded = load_weights(directory)
    model = GPT(loaded.config)
    model.load_state_dict(loaded.state_dict, strict=True)
    return model


IMPORTS = {
    "gpt2": ("gpt2", {}),
    "gpt2-untied-exact-gelu": ("gpt2", dict(tie_word_embeddings=False, activation_function="gelu", n_inner=48,
                                            layer_norm_epsilon=1e-6)),
    "llama-gqa-biases": ("llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True, rope_theta=500.0,
                                       rms_norm_eps=1e-5)),
    "llama-tied-head-dim": ("llama", dict(num_key_value_heads=1, head_dim=12, tie_word_embeddings=True)),
    "qwen2": ("qwen2", dict(num_key_value_heads=2)),
    "qwen3-gqa": ("qwen3", dict(num_key_value_heads=2, head_dim=16)),
}


@pytest.mark.parametrize("name", IMPORTS)
def test_import_has_the_logits_and_generations_of_transformers(tmp_path, name):
    kind, kw = IMPORTS[name]
    theirs = hf_model(kind, **kw)
    # a sharded save for one case: model.safetensors.index.json and several files
    theirs.save_pretrained(tmp_path, **({"max_shard_size": "40KB"} if name == "llama-gqa-biases" else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == (name == "llama-gqa-biases")
    ours = as_dist_gpt(tmp_path)
    assert ours.cfg.kv_heads == theirs.config.to_dict().get("num_key_value_heads", ours.cfg.n_head)
    assert_same_function(ours, theirs)


def test_original_gpt2_file_names_without_prefix_and_mask_buffers(tmp_path):
    """The released GPT-2 files were saved from GPT2Model: no `transformer.` prefix, no lm_head, and
    the causal-mask buffers h.{i}.attn.bias; they import all the same."""
    from safetensors.torch import load_file, save_file

    theirs = hf_model("gpt2")
    theirs.save_pretrained(tmp_path)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "model.safetensors").items()}
    tensors |= {f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, T, T)) for i in range(2)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert_same_function(as_dist_gpt(tmp_path), theirs)


def loaded_weights(cfg: GPTConfig, seed: int = 0, tokenizer=None) -> LoadedWeights:
    """A perturbed dist_gpt model of `cfg` with a tokenizer spec, as load_weights returns one."""
    torch.manual_seed(seed)
    model = perturbed(GPT(cfg))
    tok = tokenizer or ByteTokenizer()
    dataset = {"tokenizer": tok.name, "tokenizer_fingerprint": tok.fingerprint, "eot_id": tok.eot_id}
    return LoadedWeights(cfg, model.state_dict(), Path("test"), 7, 1.5, dataset, tok.spec,
                         tok.path.read_text() if isinstance(tok, HFTokenizer) else None)


def recipe_model(recipe: str, **kw) -> GPTConfig:
    base = config_mod.build("debug", overrides={"train.recipe": recipe}).model
    return GPTConfig(**{**base.__dict__, "vocab_size": 256, "block_size": T, **kw})


EXPORTS = {
    "classic": ("classic", {}, "GPT2LMHeadModel"),
    "classic-untied-biases-tanh": ("classic", dict(tie_embeddings=False, bias=True, mlp="gelu_tanh"), "GPT2LMHeadModel"),
    "modern": ("modern", {}, "Qwen3ForCausalLM"),
    "modern-gqa-swiglu": ("modern", dict(n_kv_head=1, mlp="swiglu", tie_embeddings=True), "Qwen3ForCausalLM"),
    "rope-swiglu-biases": ("modern", dict(qk_norm=False, mlp="swiglu", bias=True, n_kv_head=2), "LlamaForCausalLM"),
    "rope-relu2-qkv-bias": ("modern", dict(qk_norm=False, qkv_bias=True, norm_eps=1e-5), "LlamaForCausalLM"),
}


@pytest.mark.parametrize("name", EXPORTS)
def test_export_loads_in_transformers_and_reads_back_bit_for_bit(tmp_path, name):
    from transformers import AutoModelForCausalLM

    recipe, kw, architecture = EXPORTS[name]
    cfg = recipe_model(recipe, **kw)
    loaded = loaded_weights(cfg)
    out = tmp_path / "hf"
    write_export(loaded, loaded.tokenizer_spec, None, out, force=False)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == architecture and theirs.dtype == torch.float32
    ours = GPT(cfg)
    ours.load_state_dict(loaded.state_dict)
    assert_same_function(ours, theirs)
    back = load_weights(out)  # export -> import: the same config and the same bits
    assert back.config == cfg and back.step == 7 and back.val_loss == 1.5
    assert back.state_dict.keys() == loaded.state_dict.keys()
    assert all(torch.equal(back.state_dict[k], v) for k, v in loaded.state_dict.items())


def test_hf_import_then_export_gives_back_the_same_tensors(tmp_path):
    """A Qwen3 directory through dist_gpt and out again: transformers' weights, bit for bit."""
    from safetensors.torch import load_file

    hf_model("qwen3", num_key_value_heads=2).save_pretrained(tmp_path / "in")
    loaded = load_weights(tmp_path / "in")
    write_export(loaded, None, None, tmp_path / "out", force=False)
    a, b = load_file(tmp_path / "in" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_preset_exports(preset, recipe):
    """Every preset's default model has an exact Hugging Face architecture, except the notebook's
    post-norm model (seed), which is refused by name."""
    cfg = config_mod.build(preset, overrides={"train.recipe": recipe}).model
    if preset == "seed":
        with pytest.raises(ConfigError, match=r"^model\.block=postnorm: "):
            export_config(cfg)
        return
    hf = export_config(cfg)
    assert hf["model_type"] == ("gpt2" if recipe == "classic" else "qwen3")


@pytest.mark.parametrize("kw, option", [
    (dict(block="postnorm"), "model.block=postnorm"),
    (dict(logit_softcap=30.0), "model.logit_softcap=30.0"),
    (dict(head_bias=True), "model.head_bias=true"),
    (dict(positions="rope", norm="layernorm"), "model.norm=layernorm"),
    (dict(positions="rope", norm="rmsnorm", mlp="gelu"), "model.mlp=gelu"),
    (dict(mlp="swiglu"), "model.mlp=swiglu"),
    (dict(norm="rmsnorm"), "model.norm=rmsnorm"),
    (dict(head_dim=4), "model.head_dim=4"),
    (dict(n_kv_head=2), "model.n_kv_head=2"),
    (dict(qk_norm=True), "model.qk_norm=true"),
    (dict(positions="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, bias=True), "model.bias=true"),
])
def test_export_refuses_what_no_architecture_computes(kw, option):
    with pytest.raises(ConfigError) as err:
        export_config(GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=4, n_embd=32, **kw))
    assert str(err.value).startswith(option) and "\n" not in str(err.value)


def test_export_never_overwrites_without_force(tmp_path):
    loaded = loaded_weights(recipe_model("classic"))
    write_export(loaded, None, None, tmp_path / "out", force=False)
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    other = loaded_weights(recipe_model("classic"), seed=1)
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        write_export(other, None, None, tmp_path / "out", force=False)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    write_export(other, None, None, tmp_path / "out", force=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left behind


def tokenizers_under_test(tmp_path):
    from dist_gpt.data.prepare import PrepareOptions, prepare

    data = prepare(PrepareOptions(out=str(tmp_path / "bpe"), inputs=[str(Path(__file__).parent / "assets" /
                                                                         "licenses.txt")],
                                  tokenizer="bpe:300", progress=False, workers=1))
    chars = "".join(sorted(set("".join(TEXTS))))
    return {"byte": ByteTokenizer(), "char": CharTokenizer(chars),
            "bpe": HFTokenizer(data / "tokenizer.json", "bpe:300")}


def test_tokenizers_export_as_hf_tokenizers_that_encode_and_decode_alike(tmp_path):
    from transformers import AutoTokenizer

    for name, tok in tokenizers_under_test(tmp_path).items():
        loaded = loaded_weights(recipe_model("modern", vocab_size=max(256, tok.vocab_size)), tokenizer=tok)
        out = tmp_path / f"export-{name}"
        write_export(loaded, loaded.tokenizer_spec, loaded.tokenizer_json, out, force=False)
        theirs = AutoTokenizer.from_pretrained(out)
        # lm-eval's hf model needs a bos or eos id; byte and char declare a bos whose text already encodes
        # to its id (byte "~", char the last character), so declaring it changes no encoding
        assert theirs.bos_token_id is not None, name
        expected_bos = {"byte": "~", "char": tok.chars[-1] if name == "char" else None}.get(name, "<|endoftext|>")
        assert theirs.bos_token == expected_bos and theirs.eos_token_id == tok.eot_id, name
        for text in [*TEXTS, "~ a~b 😀x😀"] if name != "char" else TEXTS:
            ids = tok.encode(text)
            assert theirs.encode(text, add_special_tokens=False) == ids, (name, text)
            assert theirs(text).input_ids == ids, (name, text)  # no BOS/EOS added by default
            assert theirs.decode(ids) == tok.decode(ids), (name, text)
        if tok.eot_id is not None:
            assert theirs.eos_token_id == tok.eot_id
        assert load_weights(out).tokenizer.fingerprint == tok.fingerprint  # read back as the same tokenizer


def test_tiktoken_encoding_converts_to_gpt2_style_hf_tokenizer(tmp_path):
    """tiktoken's gpt2 files cannot be downloaded here, so an encoding of the same kind (GPT-2's split
    pattern, byte-level ranks) is made from a BPE trained on the license texts, converted, and the
    HF tokenizer must encode every text as tiktoken does."""
    tiktoken = require("tiktoken")
    from tokenizers import Tokenizer

    from dist_gpt.convert.hf.tokenizer import GPT2_PATTERN_TIKTOKEN, bytes_to_unicode

    bpe = tokenizers_under_test(tmp_path)["bpe"]
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    vocab = Tokenizer.from_str(bpe.path.read_text()).get_vocab(with_added_tokens=False)
    ranks = {bytes(to_byte[c] for c in t): i for t, i in sorted(vocab.items(), key=lambda kv: kv[1])
             if t != "<|endoftext|>"}
    ranks = {t: r for r, t in enumerate(sorted(ranks, key=ranks.get))}  # dense ranks 0..n-1
    enc = tiktoken.Encoding("test", pat_str=GPT2_PATTERN_TIKTOKEN, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": len(ranks)})
    hf = Tokenizer.from_str(tiktoken_tokenizer_json(enc))
    text = (Path(__file__).parent / "assets" / "licenses.txt").read_text()[:20000]
    for sample in TEXTS + [text]:
        assert hf.encode(sample, add_special_tokens=False).ids == enc.encode_ordinary(sample)
        assert hf.decode(enc.encode_ordinary(sample)) == sample
    assert hf.token_to_id("<|endoftext|>") == len(ranks)


def test_gpt2_tiktoken_tokenizer_missing_offline_is_one_line(tmp_path, monkeypatch):
    tiktoken = require("tiktoken")

    def offline_get_encoding(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline_get_encoding)
    loaded = loaded_weights(recipe_model("classic"))
    loaded.tokenizer_spec = {"kind": "tiktoken", "encoding": "gpt2"}
    with pytest.raises(ConfigError) as err:
        write_export(loaded, loaded.tokenizer_spec, None, tmp_path / "out", force=False)
    assert "gpt2 tokenizer's files are not on this machine" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, UserError)
    return message


def test_import_refusals_are_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_model("llama", num_key_value_heads=2).save_pretrained(tmp_path / "llama")

    def variant(name: str, edit_config=None, edit_tensors=None) -> Path:
        d = shutil.copytree(tmp_path / "llama", tmp_path / name)
        if edit_config:
            cfg = json.loads((d / "config.json").read_text())
            edit_config(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        if edit_tensors:
            tensors = load_file(d / "model.safetensors")
            edit_tensors(tensors)
            save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        return d

    bert = variant("bert", lambda c: c.update(model_type="bert"))
    with pytest.raises(CheckpointError) as err:
        load_weights(bert)
    assert "model_type 'bert' is not supported: dist_gpt imports gpt2, llama, qwen2, qwen3" in one_line(err)

    pickled = variant("pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        load_weights(pickled)
    assert "pytorch_model.bin is a pickle" in one_line(err) and "save_pretrained" in str(err.value)

    missing = variant("missing", edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError) as err:
        load_weights(missing)
    assert "tensor model.layers.1.mlp.up_proj.weight is missing" in one_line(err)

    shape = variant("shape", lambda c: c.update(intermediate_size=48))
    with pytest.raises(CheckpointError) as err:
        load_weights(shape)
    assert "has shape (40, 32) but config.json describes (48, 32)" in one_line(err)

    scaled = variant("scaled", lambda c: c.update(rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}))
    with pytest.raises(CheckpointError) as err:
        load_weights(scaled)
    assert "rope scaling 'llama3' is not supported" in one_line(err)

    extra = variant("extra", edit_tensors=lambda t: t.update({"model.layers.0.extra_norm.weight": torch.ones(32)}))
    with pytest.raises(CheckpointError) as err:
        load_weights(extra)
    assert "model.layers.0.extra_norm.weight" in one_line(err)


def test_an_edited_export_is_refused(tmp_path):
    """dist_gpt's own settings in config.json must describe the network the HF keys do, and the
    tensors must be what they say (gate = up for ReLU², zero where dist_gpt has no bias)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "modern"
    write_export(loaded_weights(recipe_model("modern")), None, None, out, force=False)
    cfg = json.loads((out / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_weights(out)
    assert "model.norm_eps=1e-05 but its dist_gpt settings say 1e-06" in one_line(err)

    out = tmp_path / "relu2"
    write_export(loaded_weights(recipe_model("modern")), None, None, out, force=False)
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] += 1
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    reseal(out)  # an edit made on purpose, not damage: the checksum alone would refuse it first
    with pytest.raises(CheckpointError) as err:
        load_weights(out)
    assert "up_proj.weight differs from model.layers.0.mlp.gate_proj.weight" in one_line(err)


def reseal(out: Path) -> None:
    """Record the CRC32 of an export's edited model.safetensors in its config.json, as export does."""
    from dist_gpt.convert.hf.files import file_crc32

    cfg = json.loads((out / "config.json").read_text())
    cfg["dist_gpt"]["weights_crc32"] = {"model.safetensors": file_crc32(out / "model.safetensors")}
    (out / "config.json").write_text(json.dumps(cfg))


def header_end(file: Path) -> int:
    """Offset of a .safetensors file's first tensor byte (8-byte length, then the JSON header)."""
    return 8 + int.from_bytes(file.read_bytes()[:8], "little")


def test_export_checksum_catches_a_zeroed_block_and_a_header_bit_flip(tmp_path):
    """The export records model.safetensors' CRC32 in config.json (transformers ignores the key and still
    loads it); a zeroed 4 KiB block or one flipped bit of a tensor name is refused in one line naming the
    file, by every reader (load_weights: evaluate, sample, export; init_state_dict: --init-from)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    write_export(loaded_weights(recipe_model("classic", n_embd=64)), None, None, out, force=False)
    weights = out / "model.safetensors"
    assert json.loads((out / "config.json").read_text())["dist_gpt"]["weights_crc32"]["model.safetensors"] > 0
    AutoModelForCausalLM.from_pretrained(out)
    raw = weights.read_bytes()
    at = header_end(weights) + (len(raw) - header_end(weights)) // 2
    assert len(raw) - at > 4096
    weights.write_bytes(raw[:at] + bytes(4096) + raw[at + 4096:])
    for read in (lambda: load_weights(out), lambda: init_state_dict(str(out), recipe_model("classic", n_embd=64))):
        with pytest.raises(CheckpointError) as err:
            read()
        assert f"{weights} is damaged" in one_line(err)

    name = raw.index(b"transformer.h.0.attn.c_attn.weight") + len("transformer.h.0.attn.c_attn.")
    weights.write_bytes(raw[:name] + bytes([raw[name] ^ 0x10]) + raw[name + 1:])  # "weight" -> "geight"
    with pytest.raises(CheckpointError) as err:
        load_weights(out)
    assert f"{weights} is damaged" in one_line(err)

    weights.write_bytes(raw)  # an export of the earlier version (format 1, no checksum) still loads
    cfg = json.loads((out / "config.json").read_text())
    del cfg["dist_gpt"]["weights_crc32"]
    (out / "config.json").write_text(json.dumps(cfg | {"dist_gpt": cfg["dist_gpt"] | {"format": "1"}}))
    assert load_weights(out).step == 7
    (out / "config.json").write_text(json.dumps(cfg))  # format 2 without its checksum: damaged
    with pytest.raises(CheckpointError) as err:
        load_weights(out)
    assert f"{out / 'config.json'} is damaged" in one_line(err)


def test_a_damaged_tensor_name_in_a_foreign_directory_names_the_file(tmp_path):
    """A directory dist_gpt did not write has no checksum; a bit flip in a tensor name is then an unknown
    tensor, reported with the file and the possibility of damage."""
    hf_model("gpt2").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    raw = weights.read_bytes()
    at = raw.index(b"h.0.attn.c_attn.weight") + len("h.0.attn.c_attn.")
    weights.write_bytes(raw[:at] + b"7" + raw[at + 1:])
    with pytest.raises(CheckpointError) as err:
        load_weights(tmp_path)
    assert f"{weights}: tensor 'transformer.h.0.attn.c_attn.7eight'" in one_line(err)
    assert "the file is damaged, or the weights belong to another architecture" in str(err.value)


def test_a_model_directory_without_config_json_names_it(tmp_path):
    """Without config.json the directory used to be taken for a dist_gpt run ("no complete checkpoint",
    or under --init-from "model.vocab_size=256 is smaller than the dataset's vocabulary")."""
    from types import SimpleNamespace

    hf_model("gpt2").save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    data = SimpleNamespace(tokenizer_fingerprint="0" * 64, vocab_size=V, path="d")
    for read in (lambda: load_weights(tmp_path), lambda: init_model_config(GPTConfig(), str(tmp_path), data)):
        with pytest.raises(CheckpointError) as err:
            read()
        assert f"{tmp_path / 'config.json'} is missing" in one_line(err)


def test_a_tokenizer_file_that_is_not_utf8_is_one_line(tmp_path):
    """tokenizer.json of a model directory, and the tokenizer file beside a .safetensors export, with
    bytes that are not UTF-8 (a bit flip is enough): a DataError naming the file, not UnicodeDecodeError."""
    from safetensors.torch import save_file

    from dist_gpt.errors import DataError
    from dist_gpt.convert.weights import (EXPORT_FORMAT, KEY_CONFIG, KEY_CRC32, KEY_FORMAT, KEY_HEADER_CRC32,
                                  KEY_TOKENIZER_FILE, KEY_TOKENIZER_SPEC, header_crc32, tensors_crc32)

    hf_model("gpt2").save_pretrained(tmp_path / "dir")
    (tmp_path / "dir" / "tokenizer.json").write_bytes(b'{"version": "1.0"\xff}')
    with pytest.raises(DataError) as err:
        load_weights(tmp_path / "dir")
    assert f"tokenizer file {tmp_path / 'dir' / 'tokenizer.json'} cannot be read" in one_line(err)

    loaded = loaded_weights(recipe_model("classic"))
    info = {"format": "pt", KEY_FORMAT: EXPORT_FORMAT, KEY_CONFIG: json.dumps(loaded.config.__dict__),
            KEY_TOKENIZER_SPEC: json.dumps({"kind": "hf", "name": "t", "file": "tokenizer.json", "eot_token": None}),
            KEY_TOKENIZER_FILE: "m.tokenizer.json", KEY_CRC32: str(tensors_crc32(loaded.state_dict))}
    info[KEY_HEADER_CRC32] = str(header_crc32(info, loaded.state_dict))
    save_file(loaded.state_dict, tmp_path / "m.safetensors", metadata=info)
    (tmp_path / "m.tokenizer.json").write_bytes(b"\xc3(")
    with pytest.raises(DataError) as err:
        load_weights(tmp_path / "m.safetensors")
    assert f"tokenizer file {tmp_path / 'm.tokenizer.json'} cannot be read" in one_line(err)


def test_init_from_takes_the_model_from_the_directory(tmp_path):
    """The run's model section becomes the directory's, but for the training-only keys; learned
    positions are cropped to a shorter block_size and refused for a longer one."""
    hf_model("gpt2").save_pretrained(tmp_path)
    run = GPTConfig(block_size=16, dropout=0.1, activation_checkpointing=True, zero_init=True)
    cfg = init_model_config(run, str(tmp_path))
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.mlp, cfg.bias, cfg.qkv_bias) == (2, 32, V, "gelu_tanh", True, True)
    assert (cfg.block_size, cfg.dropout, cfg.activation_checkpointing, cfg.zero_init) == (16, 0.1, True, True)
    model = GPT(cfg)
    model.load_state_dict(init_state_dict(str(tmp_path), cfg), strict=True)
    assert model.pos_emb.weight.shape == (16, 32)
    with pytest.raises(ConfigError, match=r"model.block_size=64 is longer than the 24 learned positions"):
        init_model_config(GPTConfig(block_size=64), str(tmp_path))
    assert init_model_config(run, None) is run and init_model_config(run, str(tmp_path / "nothing")) is run


def test_init_from_needs_a_dataset_made_with_the_directory_tokenizer(tmp_path):
    """tools.prepare --tokenizer DIR/tokenizer.json copies the file byte for byte, so the dataset's
    tokenizer fingerprint is the file's SHA-256; another tokenizer, or more token ids, is refused."""
    import hashlib
    from types import SimpleNamespace

    hf_model("gpt2").save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(b"the directory's tokenizer")  # only its SHA-256 matters here
    sha = hashlib.sha256((tmp_path / "tokenizer.json").read_bytes()).hexdigest()
    run = GPTConfig(block_size=16)
    assert init_model_config(run, str(tmp_path), SimpleNamespace(tokenizer_fingerprint=sha, vocab_size=V, path="d"))
    with pytest.raises(ConfigError) as err:
        init_model_config(run, str(tmp_path), SimpleNamespace(tokenizer_fingerprint="0" * 64, vocab_size=V, path="d"))
    assert f"prepare it with --tokenizer {tmp_path / 'tokenizer.json'}" in one_line(err)
    with pytest.raises(ConfigError, match=f"the dataset has {V + 1} token ids but"):
        init_model_config(run, str(tmp_path), SimpleNamespace(tokenizer_fingerprint=sha, vocab_size=V + 1, path="d"))


def test_init_from_a_directory_without_tokenizer_is_refused_unless_unchecked(tmp_path):
    """Without a tokenizer.json (or dist_gpt's recorded fingerprint) the dataset's ids cannot be checked:
    refused in one line, also with GPT-2's vocab.json + merges.txt (dist_gpt reads tokenizer.json only),
    unless train.init_from_unchecked_ids (--init-from-unchecked-ids) says to start anyway."""
    from types import SimpleNamespace

    hf_model("gpt2").save_pretrained(tmp_path)
    data = SimpleNamespace(tokenizer_fingerprint="0" * 64, vocab_size=V, path="d")
    run = GPTConfig(block_size=16)
    with pytest.raises(ConfigError) as err:
        init_model_config(run, str(tmp_path), data)
    assert "has no tokenizer.json, so the dataset's token ids cannot be checked" in one_line(err)
    assert "--init-from-unchecked-ids" in str(err.value)
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ConfigError) as err:
        init_model_config(run, str(tmp_path), data)
    assert "has vocab.json + merges.txt but no tokenizer.json" in one_line(err) and "save_pretrained" in str(err.value)
    assert init_model_config(run, str(tmp_path), data, unchecked_ids=True).vocab_size == V
    cfg = config_mod.parse(["--init-from", str(tmp_path), "--init-from-unchecked-ids"])
    assert cfg.train.init_from_unchecked_ids is True


def test_the_trainer_refuses_or_takes_a_directory_without_tokenizer(tiny_data, tmp_path):
    """The trainer's own path: train.init_from a GPT-2 directory without tokenizer.json on a byte dataset
    is refused before the run directory exists, and starts from its weights with --init-from-unchecked-ids."""
    import contextlib
    import io
    from transformers import GPT2Config, GPT2LMHeadModel

    from dist_gpt.convert.weights import InitFrom
    from dist_gpt.parallel.dist import DistEnv
    from dist_gpt.training.signals import StopSignals
    from dist_gpt.training.trainer import build

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    args = ["--preset", "debug", "--recipe", "classic", "--init-from", str(tmp_path / "gpt2"),
            f"--data.path={tiny_data}", f"--train.run_dir={tmp_path / 'run'}", "--model.block_size=32",
            "--log.tensorboard=false", "--train.steps=1"]
    with pytest.raises(ConfigError) as err:
        build(config_mod.parse(args), DistEnv(), StopSignals(), init=InitFrom(str(tmp_path / "gpt2")))
    assert "so the dataset's token ids cannot be checked" in one_line(err) and not (tmp_path / "run").exists()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        trainer = build(config_mod.parse([*args, "--init-from-unchecked-ids"]), DistEnv(), StopSignals(),
                        init=InitFrom(str(tmp_path / "gpt2"), unchecked_ids=True))
        trainer.log.close()
    assert f"initialised the weights from {tmp_path / 'gpt2'}" in out.getvalue()


def test_import_and_export_need_no_transformers(tmp_path):
    """Runtime interop is safetensors and JSON: with transformers and lm-eval unimportable, a model
    exports, imports back and trains from the directory's config."""
    import subprocess
    import sys

    from conftest import REPO, _env

    script = f"""
import sys
sys.modules["transformers"] = sys.modules["lm_eval"] = None  # any import of them now fails
from pathlib import Path
import torch
from dist_gpt.convert.hf.convert import init_model_config
from dist_gpt.convert.hf.export import write_export
from dist_gpt.model.gpt import GPT, GPTConfig
from dist_gpt.convert.weights import LoadedWeights, load_weights
import dist_gpt.train, dist_gpt.evaluate, dist_gpt.export, dist_gpt.harness, dist_gpt.training.tasks
cfg = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16, positions="rope", norm="rmsnorm",
                qk_norm=True, mlp="relu2", tie_embeddings=False)
state = GPT(cfg).state_dict()
write_export(LoadedWeights(cfg, state, Path("x"), 1, None, {{}}, {{"kind": "byte"}}), {{"kind": "byte"}}, None,
             Path(r"{tmp_path}") / "out", force=False)
back = load_weights(Path(r"{tmp_path}") / "out")
assert back.config == cfg and all(torch.equal(back.state_dict[k], v) for k, v in state.items())
assert init_model_config(GPTConfig(block_size=8), r"{tmp_path / 'out'}") == cfg
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_evaluate_tasks_without_lm_eval_says_how_to_install(monkeypatch):
    import sys

    from dist_gpt.harness import TaskOptions, run_tasks

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ConfigError) as err:
        run_tasks("runs/x", TaskOptions("hellaswag", batch_size=8, device="cpu"))
    assert "pip install 'dist_gpt[eval]'" in one_line(err)
