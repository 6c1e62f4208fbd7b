"""The notebook importer: exact logits, and pickles with any other global refused without running.

Every notebook pickle here is made by the notebook's own classes in a child process
(`tests/notebook_fixture.py`), and the reference logits come from the notebook's own forward pass.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from dist_gpt.errors import CheckpointError
from dist_gpt.model.gpt import GPT, GPTConfig
from dist_gpt.convert.notebook import load_notebook_state, map_to_dist_gpt
from notebook_fixture import (SIZES, Call, build_notebook_models, notebook_forward, storage_stream,
                              write_notebook_files)


@pytest.fixture(scope="module")
def notebook(tmp_path_factory) -> dict[str, Path]:
    """The notebook's files, its model, the same model as if saved on a GPU, and two tampered copies
    that run `touch <marker>` when loaded (all made in one child process: it costs seconds)."""
    root = tmp_path_factory.mktemp("notebook")
    files = write_notebook_files(root)
    files |= {"pkl": root / "model-01.pkl", "cuda": root / "model-cuda.pkl",
              "evil_module": root / "evil-module.pkl", "evil_storage": root / "evil-storage.pkl",
              "marker_module": root / "pwned-module", "marker_storage": root / "pwned-storage"}
    build_notebook_models(files["vocab"], {
        files["pkl"]: {},
        files["cuda"]: {"location": "cuda:0"},
        files["evil_module"]: {"payload": {"at": "module", "marker": str(files["marker_module"])}},
        files["evil_storage"]: {"payload": {"at": "storage", "marker": str(files["marker_storage"])}},
    })
    return files


def imported_model(pkl: Path) -> GPT:
    model_keys, state_dict = map_to_dist_gpt(load_notebook_state(pkl), pkl)
    model = GPT(GPTConfig(**model_keys))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def test_logits_equal_the_notebooks(notebook):
    model = imported_model(notebook["pkl"])
    V, T = model.cfg.vocab_size, model.cfg.block_size
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, V, (3, T), generator=g)
    targets = torch.randint(0, V, (3, T), generator=g)
    (ref_logits, ref_loss), (short_ref, _) = notebook_forward(notebook["pkl"], [(idx, targets), (idx[:, :5], None)])
    with torch.no_grad():
        logits, loss = model(idx), model(idx, targets).item()
    assert logits.dtype == torch.float32 and logits.shape == ref_logits.shape == (3, T, V)
    assert ref_logits.std() > 0.5  # the fixture's weights are far from the near-uniform init
    assert (logits - ref_logits).abs().max().item() < 1e-5
    assert abs(loss - ref_loss) < 1e-5
    # A shorter context uses the first T' positions, as the notebook's arange(T) does.
    with torch.no_grad():
        assert (model(idx[:, :5]) - short_ref).abs().max().item() < 1e-5


def test_sizes_and_architecture_are_read_from_the_tensors(notebook):
    model_keys, sd = map_to_dist_gpt(load_notebook_state(notebook["pkl"]), notebook["pkl"])
    C, H = SIZES["n_embd"], SIZES["n_head"]
    D = C // H
    vocab = len(notebook["vocab"].read_text(encoding="utf-8"))
    assert (model_keys["n_embd"], model_keys["n_head"], model_keys["head_dim"]) == (C, H, D)
    assert (model_keys["n_layer"], model_keys["block_size"], model_keys["vocab_size"]) == (
        SIZES["n_layer"], SIZES["block_size"], vocab)
    assert model_keys["dropout"] == SIZES["dropout"] and model_keys["mlp_hidden"] is None
    assert model_keys["block"] == "postnorm" and model_keys["mlp"] == "relu"
    assert (model_keys["qkv_bias"], model_keys["bias"], model_keys["head_bias"]) == (False, True, True)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * H * D, C)
    assert sd["blocks.0.attn.proj.weight"].shape == (C, H * D) and H * D != C  # the 380 -> 384 quirk


def test_qkv_rows_are_query_heads_then_key_heads_then_value_heads(notebook):
    state = load_notebook_state(notebook["pkl"])
    _, sd = map_to_dist_gpt(state, notebook["pkl"])
    H, D = SIZES["n_head"], SIZES["n_embd"] // SIZES["n_head"]
    qkv = sd["blocks.1.attn.qkv.weight"]
    for h in range(H):
        head = f"blocks.1.sa.heads.{h}."
        for part, name in enumerate(("query", "key", "value")):
            rows = qkv[part * H * D + h * D: part * H * D + (h + 1) * D]
            assert torch.equal(rows, state.tensors[head + name + ".weight"])


def test_storages_saved_on_a_gpu_import_on_the_cpu(notebook):
    cuda_pkl = notebook["cuda"]
    assert cuda_pkl.read_bytes().count(b"cuda:0") > 10  # every nested storage stream says cuda:0
    assert b"cuda:0" not in notebook["pkl"].read_bytes()
    gpu_state, cpu_state = load_notebook_state(cuda_pkl), load_notebook_state(notebook["pkl"])
    assert gpu_state.tensors.keys() == cpu_state.tensors.keys()
    for key, tensor in gpu_state.tensors.items():
        assert tensor.device.type == "cpu" and torch.equal(tensor, cpu_state.tensors[key])


# ---------------------------------------------------------------------------------------------
# Refusal: a global outside the admitted list stops the load before anything is called.


def _touch(marker: Path) -> Call:
    return Call(os.system, f"touch {marker}")


def _refused(path: Path, global_name: str, where: str = "") -> None:
    with pytest.raises(CheckpointError) as err:
        load_notebook_state(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and global_name in message and where in message


def test_a_global_at_the_top_level_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model-01.pkl"
    evil.write_bytes(pickle.dumps({"state": _touch(marker)}))
    _refused(evil, "posix.system" if os.name == "posix" else "nt.system")
    assert not marker.exists()
    pickle.loads(evil.read_bytes())  # the control: a plain pickle.load runs it
    assert marker.exists()


def test_a_global_inside_a_notebook_model_is_refused_and_not_run(notebook):
    evil, marker = notebook["evil_module"], notebook["marker_module"]
    _refused(evil, "system")
    assert not marker.exists()
    notebook_forward(evil, [(torch.zeros(1, 4, dtype=torch.long), None)])  # the notebook's pickle.load runs it
    assert marker.exists()


def test_a_global_inside_a_nested_storage_stream_is_refused_and_not_run(notebook, tmp_path):
    marker = tmp_path / "pwned"
    stream = storage_stream(_touch(marker))
    evil = tmp_path / "model-01.pkl"
    evil.write_bytes(pickle.dumps(Call(torch.storage._load_from_bytes, stream)))
    _refused(evil, "system", "inside a tensor storage stream")
    assert not marker.exists()
    # Inside a real notebook model, in place of a parameter's storage:
    _refused(notebook["evil_storage"], "system", "inside a tensor storage stream")
    assert not notebook["marker_storage"].exists()
    torch.storage._load_from_bytes(stream)  # the control: torch's loader runs it (weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("module,name", [
    ("builtins", "eval"), ("builtins", "getattr"), ("__main__", "Evil"), ("torch", "load"),
    ("torch.nn.modules.linear", "Identity"), ("torch._utils", "_rebuild_tensor"), ("subprocess", "Popen"),
])
def test_every_other_global_is_refused(tmp_path, module, name):
    evil = tmp_path / "model-01.pkl"
    evil.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R.")  # GLOBAL, (), REDUCE
    _refused(evil, f"{module}.{name}")


def test_a_storage_type_is_the_only_global_a_storage_stream_may_name(tmp_path):
    evil = tmp_path / "model-01.pkl"
    evil.write_bytes(pickle.dumps(Call(torch.storage._load_from_bytes, storage_stream(Call(print, "x")))))
    _refused(evil, "print", "inside a tensor storage stream")


@pytest.mark.parametrize("content,expect", [
    (b"", "not a readable notebook model pickle"),
    (b"not a pickle at all", "not a readable notebook model pickle"),
    (pickle.dumps([1, 2, 3]), "holds a list"),
    (b"PK\x03\x04 a torch.save zip archive", "is a torch.save archive"),
])
def test_other_files_give_one_clear_line(tmp_path, content, expect):
    bad = tmp_path / "model-01.pkl"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match=expect) as err:
        load_notebook_state(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_a_truncated_notebook_pickle_is_refused(notebook, tmp_path):
    cut = tmp_path / "model-01.pkl"
    cut.write_bytes(notebook["pkl"].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a readable notebook model pickle"):
        load_notebook_state(cut)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_notebook_state(tmp_path / "nope.pkl")


def test_a_module_cycle_is_refused(tmp_path):
    # GPTLanguageModel whose _modules holds itself: a walk would never end.
    cyclic = tmp_path / "model-01.pkl"
    cyclic.write_bytes(b"\x80\x02c__main__\nGPTLanguageModel\n)\x81q\x00}q\x01U\x08_modules}q\x02U\x04selfh\x00ssb.")
    with pytest.raises(CheckpointError, match="appears twice"):
        load_notebook_state(cyclic)
