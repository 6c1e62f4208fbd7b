"""Import the original notebook's model: its `pickle.dump(model)` file, read without running any of it.

    python -m tools.import_notebook model-01.pkl --vocab vocab.txt --out runs/notebook-import
    python -m dist_gpt.sample --run runs/notebook-import
    torchrun --standalone --nproc_per_node=8 -m dist_gpt.train --preset seed --data.path data/notebook \
        --init-from runs/notebook-import

The notebook saves the whole module object. A plain `pickle.load` of such a file imports and calls
whatever globals the file names, so it could run any code; this reader admits a short list instead:

- the notebook's own class names (`GPTLanguageModel`, `Block`, `MultiHeadAttention`, `Head`,
  `FeedForward`, recorded as `__main__.X`) and the `torch.nn` layers they hold become
  `InertModule`s: plain attribute holders; their classes are never imported, their code never runs;
- tensors and parameters are rebuilt by functions of this file (never torch's `_rebuild_*`);
- `collections.OrderedDict`.

Every other global is refused with a `CheckpointError` naming the file and the global. Each tensor
storage in such a pickle is a nested stream that `torch.storage._load_from_bytes` would hand to
`torch.load(weights_only=False)`; here it goes to `_read_storage_stream`, which parses torch's legacy
format itself (five small pickles, of which only one may name a global, a storage type; then the
raw bytes) and puts every storage on the CPU whatever device it was saved from.

`map_to_dist_gpt` then turns the notebook's per-head key/query/value matrices into dist_gpt's fused
`qkv` layout; `import_notebook` writes a dist_gpt checkpoint (weights only) and a `.safetensors`.
"""

from __future__ import annotations

import io
import math
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dist_gpt import config as config_mod
from dist_gpt.checkpoint.config import CheckpointConfig
from dist_gpt.checkpoint.manager import Checkpointer
from dist_gpt.checkpoint.state import JsonState, ModelOptimizerState
from dist_gpt.data.tokenizers import read_char_vocab
from dist_gpt.errors import CheckpointError, DataError
from dist_gpt.model.gpt import GPT
from dist_gpt.parallel.dist import DistEnv

from .export import export
from .weights import load_weights

# The notebook's classes (any module name: `__main__` from a script or Jupyter, or the user's own
# file if they imported them) and the torch.nn layers they are made of. All become inert holders.
NOTEBOOK_CLASSES = ("GPTLanguageModel", "Block", "MultiHeadAttention", "Head", "FeedForward")
TORCH_LAYERS = {
    "torch.nn.modules.sparse": ("Embedding",),
    "torch.nn.modules.linear": ("Linear",),
    "torch.nn.modules.normalization": ("LayerNorm",),
    "torch.nn.modules.activation": ("ReLU",),
    "torch.nn.modules.dropout": ("Dropout",),
    "torch.nn.modules.container": ("Sequential", "ModuleList"),
}

# Storage classes a legacy stream may name, by the dtype of their elements.
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001                  # torch.serialization.PROTOCOL_VERSION


class InertModule:
    """What a pickled `nn.Module` becomes: its attribute dict (`_parameters`, `_buffers`, `_modules`,
    `eps`, `p`, ...) and the name of its class. No method of the original class exists here."""

    kind = "?"

    def __repr__(self) -> str:
        return f"<inert {self.kind}>"


def _inert_class(name: str) -> type:
    return type(name, (InertModule,), {"kind": name, "__module__": __name__})


_INERT = {name: _inert_class(name) for names in (NOTEBOOK_CLASSES, *TORCH_LAYERS.values()) for name in names}


@dataclass(frozen=True, slots=True)
class _Storage:
    """A storage read from a nested stream: a flat CPU tensor of its elements."""

    data: torch.Tensor


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stands for `torch.FloatStorage` & co. in a nested stream; not callable, carries the dtype."""

    dtype: torch.dtype


class _Refused(Exception):
    def __init__(self, where: str, name: str):
        super().__init__(name)
        self.where, self.name = where, name


# ---------------------------------------------------------------------------------------------
# Rebuild functions: what the admitted torch globals map to. They check their arguments, because a
# crafted file controls them.


def _is_int_tuple(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in x)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    ok = (isinstance(storage, _Storage) and isinstance(storage.data, torch.Tensor) and isinstance(offset, int)
          and _is_int_tuple(size) and _is_int_tuple(stride) and len(size) == len(stride))
    # A saved weight never holds more elements than its storage (no stride-0 broadcasting); this
    # also keeps a crafted record from asking `clone` for terabytes.
    if not ok or math.prod(size) > storage.data.numel():
        raise pickle.UnpicklingError("malformed tensor record")
    # as_strided checks that (offset, size, stride) stays inside the storage; clone owns the result.
    return storage.data.as_strided(size, stride, offset).clone()


def _rebuild_parameter(data: Any, requires_grad: Any = True, backward_hooks: Any = None,
                       state: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("malformed parameter record")
    return data


# ---------------------------------------------------------------------------------------------
# The nested storage stream: torch's legacy format, parsed here.


class _StreamUnpickler(pickle.Unpickler):
    """One pickle of a nested storage stream. Admits only `torch.<X>Storage` (as a dtype marker)
    and the `('storage', type, key, location, numel, view)` persistent ids of torch's format."""

    def __init__(self, f: io.BytesIO, records: list[tuple[str, torch.dtype, int]]):
        super().__init__(f)
        self.records = records

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise _Refused("inside a tensor storage stream", f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        ok = (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
              and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[3], str)
              and isinstance(pid[4], int) and pid[4] >= 0)
        if not ok:
            raise pickle.UnpicklingError("malformed storage record")
        if pid[5] is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        # pid[3] is where the storage lived ("cpu", "cuda:0", ...); the bytes are the same, and
        # everything is read onto the CPU.
        self.records.append((pid[2], pid[1].dtype, pid[4]))
        return self.records[-1]


def _read_storage_stream(blob: Any) -> _Storage:
    """What `torch.storage._load_from_bytes(blob)` maps to: a magic number, a protocol version, a
    system-info dict, the storage's persistent id, the list of keys, then each storage as an int64
    element count and its raw little-endian bytes (`torch.serialization._legacy_save`)."""
    if not isinstance(blob, bytes):
        raise pickle.UnpicklingError("malformed storage stream")
    if blob[:4] == b"PK\x03\x04":
        raise pickle.UnpicklingError("zip-format storage streams are not supported")
    f = io.BytesIO(blob)
    records: list[tuple[str, torch.dtype, int]] = []

    def load() -> Any:
        return _StreamUnpickler(f, records).load()

    if load() != _LEGACY_MAGIC or load() != _LEGACY_PROTOCOL:
        raise pickle.UnpicklingError("not a torch storage stream")
    sys_info = load()
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise pickle.UnpicklingError("big-endian storage streams are not supported")
    record = load()
    keys = load()
    if len(records) != 1 or record is not records[0] or keys != [record[0]]:
        raise pickle.UnpicklingError("a storage stream must hold exactly one storage")
    _, dtype, numel = record
    itemsize = torch.empty((), dtype=dtype).element_size()
    if int.from_bytes(f.read(8), "little", signed=True) != numel:
        raise pickle.UnpicklingError("storage size does not match its record")
    raw = f.read(numel * itemsize)
    if len(raw) != numel * itemsize or f.read(1):
        raise pickle.UnpicklingError("storage stream is truncated or has trailing bytes")
    data = torch.frombuffer(bytearray(raw), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
    return _Storage(data)


# ---------------------------------------------------------------------------------------------
# The outer pickle: the whole module.


class _ModuleUnpickler(pickle.Unpickler):
    ADMITTED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _read_storage_stream,
        ("collections", "OrderedDict"): OrderedDict,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ADMITTED:
            return self.ADMITTED[(module, name)]
        if name in NOTEBOOK_CLASSES or name in TORCH_LAYERS.get(module, ()):
            return _INERT[name]
        raise _Refused("", f"{module}.{name}")


@dataclass
class NotebookState:
    """The pickled model, flattened: `tensors` as `nn.Module.state_dict()` would name them (CPU, in
    their saved dtype) and `modules` by dotted path ("" is the root) for attributes like `eps`, `p`."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: dict[str, InertModule] = field(default_factory=dict)


def load_notebook_state(path: str | Path) -> NotebookState:
    """Read a notebook `pickle.dump(model)` file without executing anything from it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                raise CheckpointError(f"{path} is a torch.save archive, not the notebook's pickle.dump(model, f) "
                                      "file: give the model-01.pkl the notebook wrote")
            f.seek(0)
            root = _ModuleUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: give the path of the notebook's model-01.pkl") from None
    except CheckpointError:
        raise
    except _Refused as e:
        where = f" {e.where}" if e.where else ""
        raise CheckpointError(
            f"{path}: refused to load the global {e.name}{where}: a notebook model pickle names only "
            "its own classes, torch.nn layers and tensors, so this file is not one (nothing in it was run)"
        ) from None
    except Exception as e:  # any malformed pickle: UnpicklingError, EOFError, TypeError, torch's RuntimeError
        reason = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path} is not a readable notebook model pickle ({type(e).__name__}: {reason}); "
            "give the file the notebook wrote with pickle.dump(model, f)") from None
    if not isinstance(root, InertModule):
        raise CheckpointError(f"{path} holds a {type(root).__name__}, not a pickled notebook model "
                              "(expected the GPTLanguageModel written by pickle.dump(model, f))")
    state = NotebookState()
    _flatten(root, "", state, path)
    return state


def _flatten(module: InertModule, prefix: str, state: NotebookState, path: Path) -> None:
    """Walk `_parameters`, `_buffers` and `_modules` as `nn.Module.state_dict` does."""
    # The notebook's modules form a tree; a crafted file could make a cycle or a lattice that a
    # walk would follow forever, so a module met twice is refused.
    if any(m is module for m in state.modules.values()):
        raise CheckpointError(f"{path}: module {prefix.rstrip('.') or '(root)'} appears twice; not a notebook model")
    state.modules[prefix.rstrip(".")] = module
    attrs = vars(module)
    for group in ("_parameters", "_buffers"):
        for name, tensor in _dict_attr(attrs, group, path).items():
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{path}: {prefix}{name} is a {type(tensor).__name__}, not a tensor")
            state.tensors[prefix + name] = tensor
    for name, child in _dict_attr(attrs, "_modules", path).items():
        if not isinstance(child, InertModule):
            raise CheckpointError(f"{path}: submodule {prefix}{name} is a {type(child).__name__}, not a module")
        _flatten(child, f"{prefix}{name}.", state, path)


def _dict_attr(attrs: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    value = attrs.get(name, {})
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise CheckpointError(f"{path}: a module's {name} is not a dict of names; not a notebook model")
    return value


# ---------------------------------------------------------------------------------------------
# The notebook's layout -> dist_gpt's layout.


@dataclass(frozen=True)
class Sizes:
    """The notebook model's sizes, read from its tensors: vocabulary V, context T, width C, L blocks of
    H heads of width D, MLP hidden width F."""

    V: int
    T: int
    C: int
    L: int
    H: int
    D: int
    F: int


@dataclass(frozen=True)
class Rename:
    """One tensor: its name in dist_gpt's GPT, in the notebook, and its shape given the sizes."""

    ours: str
    theirs: str
    shape: Callable[[Sizes], tuple[int, ...]]


# Model-level tensors before and after the blocks (the order of GPT's own state dict).
EMBEDDINGS = (Rename("tok_emb.weight", "token_embedding_table.weight", lambda s: (s.V, s.C)),
              Rename("pos_emb.weight", "position_embedding_table.weight", lambda s: (s.T, s.C)))
FINAL = (Rename("norm_f.weight", "ln_f.weight", lambda s: (s.C,)),
         Rename("norm_f.bias", "ln_f.bias", lambda s: (s.C,)),
         Rename("head.weight", "lm_head.weight", lambda s: (s.V, s.C)),
         Rename("head.bias", "lm_head.bias", lambda s: (s.V,)))
# Per block, under the prefix blocks.{i}. in both layouts (attn.qkv.weight is fused from the heads).
BLOCK = (Rename("attn.proj.weight", "sa.proj.weight", lambda s: (s.C, s.H * s.D)),
         Rename("attn.proj.bias", "sa.proj.bias", lambda s: (s.C,)),
         Rename("norm1.weight", "ln1.weight", lambda s: (s.C,)),
         Rename("norm1.bias", "ln1.bias", lambda s: (s.C,)),
         Rename("norm2.weight", "ln2.weight", lambda s: (s.C,)),
         Rename("norm2.bias", "ln2.bias", lambda s: (s.C,)),
         Rename("mlp.fc.weight", "ffwd.net.0.weight", lambda s: (s.F, s.C)),
         Rename("mlp.fc.bias", "ffwd.net.0.bias", lambda s: (s.F,)),
         Rename("mlp.proj.weight", "ffwd.net.2.weight", lambda s: (s.C, s.F)),
         Rename("mlp.proj.bias", "ffwd.net.2.bias", lambda s: (s.C,)))
# Per head, under blocks.{i}.sa.heads.{h}.: q, k and v are fused in this order; tril is the causal mask.
HEAD = ("query.weight", "key.weight", "value.weight")
HEAD_MASK = "tril"


def map_to_dist_gpt(state: NotebookState, source: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(model config keys, fp32 state dict) of dist_gpt's GPT holding the notebook's weights, by the
    tables above. Sizes come from the tensors (`_sizes`)."""
    t, src = state.tensors, str(source)
    root = state.modules.get("")
    if getattr(root, "kind", None) != "GPTLanguageModel":
        raise CheckpointError(f"{src} holds a {getattr(root, 'kind', '?')}, not the notebook's GPTLanguageModel")
    s = _sizes(t, src)

    def get(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in t:
            raise CheckpointError(f"{src} has no {key}: not the notebook's GPTLanguageModel layout")
        if tuple(t[key].shape) != shape:
            raise CheckpointError(f"{src}: {key} has shape {tuple(t[key].shape)}, expected {shape} "
                                  "from the notebook's layout")
        return t[key].to(torch.float32)

    out = {r.ours: get(r.theirs, r.shape(s)) for r in EMBEDDINGS}
    for i in range(s.L):
        b = f"blocks.{i}."  # the same prefix in both layouts
        out[b + "attn.qkv.weight"] = _fused_qkv(get, b, s, src)
        out |= {b + r.ours: get(b + r.theirs, r.shape(s)) for r in BLOCK}
    out |= {r.ours: get(r.theirs, r.shape(s)) for r in FINAL}

    extra = sorted(set(t) - _notebook_keys(s.L, s.H))
    if extra:
        raise CheckpointError(f"{src} has tensors the notebook's model does not ({extra[0]}, ...): "
                              "not the notebook's GPTLanguageModel layout")
    _check_layer_settings(state, src)
    model = {
        "vocab_size": s.V, "block_size": s.T, "n_layer": s.L, "n_head": s.H, "n_embd": s.C, "head_dim": s.D,
        "mlp_hidden": None if s.F == 4 * s.C else s.F, "dropout": _dropout(state), **NOTEBOOK_ARCHITECTURE,
    }
    return model, out


def _sizes(t: dict[str, torch.Tensor], src: str) -> Sizes:
    """Token table (V, C), position table (T, C), `L` blocks of `H` heads, each head's key (D, C)."""
    def count(fmt: str) -> int:
        n = 0
        while fmt.format(n) in t:
            n += 1
        return n

    if "token_embedding_table.weight" not in t or "position_embedding_table.weight" not in t:
        raise CheckpointError(f"{src} has no embedding tables: not the notebook's GPTLanguageModel layout")
    V, C = t["token_embedding_table.weight"].shape
    T = t["position_embedding_table.weight"].shape[0]
    L = count("blocks.{}.ln1.weight")
    H = count("blocks.0.sa.heads.{}.key.weight")
    if L == 0 or H == 0:
        raise CheckpointError(f"{src} has no attention blocks: not the notebook's GPTLanguageModel layout")
    D = t["blocks.0.sa.heads.0.key.weight"].shape[0]
    F = t["blocks.0.ffwd.net.0.weight"].shape[0] if "blocks.0.ffwd.net.0.weight" in t else 4 * C  # 4*C in the notebook
    return Sizes(V, T, C, L, H, D, F)


def _fused_qkv(get, b: str, s: Sizes, src: str) -> torch.Tensor:
    """Block `b`'s heads fused into one `qkv.weight` of shape (3*H*D, C): rows [q of head 0..H-1 |
    k of head 0..H-1 | v of head 0..H-1], head h of q at rows h*D:(h+1)*D, which is the order
    `torch.cat([h(x) for h in heads])` gives."""
    heads = [f"{b}sa.heads.{h}." for h in range(s.H)]
    for h in heads:
        # The notebook's causal mask is a buffer; dist_gpt's attention is causal by construction.
        if not torch.equal(get(h + HEAD_MASK, (s.T, s.T)), torch.tril(torch.ones(s.T, s.T))):
            raise CheckpointError(f"{src}: {h}{HEAD_MASK} is not the causal lower-triangular mask")
    return torch.cat([get(h + name, (s.D, s.C)) for name in HEAD for h in heads], dim=0)  # (3*H*D, C)


# The notebook's architecture as dist_gpt model options (the `seed` preset's model keys).
NOTEBOOK_ARCHITECTURE: dict[str, Any] = {
    "block": "postnorm", "norm": "layernorm", "positions": "learned", "mlp": "relu",
    "bias": True, "qkv_bias": False, "head_bias": True, "tie_embeddings": False,
    "qk_norm": False, "zero_init": False, "logit_softcap": None,
}


def _notebook_keys(L: int, H: int) -> set[str]:
    """Every tensor name of the notebook's model with L blocks of H heads, from the tables above."""
    keys = {r.theirs for r in EMBEDDINGS + FINAL}
    for i in range(L):
        b = f"blocks.{i}."
        keys |= {b + r.theirs for r in BLOCK}
        keys |= {f"{b}sa.heads.{h}.{n}" for h in range(H) for n in HEAD + (HEAD_MASK,)}
    return keys


def _check_layer_settings(state: NotebookState, src: str) -> None:
    """LayerNorms with torch's default eps and affine terms, as dist_gpt's layernorm option has."""
    for name, module in state.modules.items():
        if module.kind == "LayerNorm":
            eps = getattr(module, "eps", None)
            if eps != LAYERNORM_EPS or getattr(module, "elementwise_affine", True) is not True:
                raise CheckpointError(f"{src}: {name} has LayerNorm eps={eps}; dist_gpt's layernorm uses "
                                      f"eps={LAYERNORM_EPS} with affine terms, as the notebook does")


LAYERNORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the notebook uses


def _dropout(state: NotebookState) -> float:
    """The notebook's `dropout` global, as recorded by its Dropout layers (0.2 in the notebook)."""
    ps = {float(getattr(m, "p", 0.0)) for m in state.modules.values() if m.kind == "Dropout"}
    return ps.pop() if len(ps) == 1 else 0.0


# ---------------------------------------------------------------------------------------------
# Writing the import: a weights-only dist_gpt checkpoint and a .safetensors export.


@dataclass
class ImportResult:
    run_dir: Path            # holds checkpoints/step_0000000 (read by sample, evaluate, --init-from)
    checkpoint: Path
    safetensors: Path
    model: dict[str, Any]    # the model section of the checkpoint's config
    params: int
    train_overrides: list[str]  # options that make `--preset seed` this model


def import_notebook(pkl: str | Path, vocab: str | Path, out: str | Path) -> ImportResult:
    """Read the notebook's `model-01.pkl` safely and write it as the dist_gpt run directory `out`:
    `out/checkpoints/step_0000000/` (weights only, step 0) and `out/model.safetensors`."""
    pkl, out = Path(pkl), Path(out)
    ckpt_root, st_file = out / "checkpoints", out / "model.safetensors"
    for existing in (ckpt_root, st_file):
        if existing.exists():
            raise CheckpointError(f"{existing} already exists: choose another --out (nothing was overwritten)")
    model_keys, state_dict = map_to_dist_gpt(load_notebook_state(pkl), pkl)
    tok = read_char_vocab(vocab)
    if tok.vocab_size != model_keys["vocab_size"]:
        raise DataError(f"--vocab {vocab} has {tok.vocab_size} distinct characters but {pkl} embeds "
                        f"{model_keys['vocab_size']}: pass the vocab.txt this model was trained with")

    # The `seed` preset with the sizes read from the tensors: the config `--preset seed` plus the
    # printed overrides gives, so `--init-from` accepts the checkpoint.
    cfg = config_mod.build("seed", overrides={f"model.{k}": v for k, v in model_keys.items()}
                           | {"train.run_dir": str(out), "train.name": out.name})
    model = GPT(cfg.model)
    model.load_state_dict(state_dict, strict=True)
    meta = {
        "config": JsonState(cfg.to_dict()),
        "dataset": JsonState({"path": None, "fingerprint": None, "tokenizer": tok.name, "tokenizer_spec": tok.spec,
                              "tokenizer_fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "eot_id": None}),
        "imported_from": JsonState({"notebook_pickle": str(pkl.resolve()), "vocab": str(Path(vocab).resolve())}),
    }
    ckpt = Checkpointer(ckpt_root, CheckpointConfig(), DistEnv(), {"model_optim": ModelOptimizerState(model)},
                        meta).save(0)
    export(out, st_file)
    _check_written(out, st_file, state_dict)
    seed_model = config_mod.build("seed").model
    # vocab_size: the seed preset takes the dataset's (0), which is this vocab.txt's.
    overrides = [f"--model.{k}={_cli(v)}" for k, v in model_keys.items()
                 if getattr(seed_model, k) != v and k != "vocab_size"]
    return ImportResult(out, ckpt, st_file, model_keys, model.num_params(non_embedding=False), overrides)


def _check_written(out: Path, st_file: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Read both outputs back the way sample and --init-from will, and compare every tensor bit for bit."""
    for where in (out, st_file):
        loaded = load_weights(where).state_dict
        if loaded.keys() != state_dict.keys() or any(not torch.equal(loaded[k], v) for k, v in state_dict.items()):
            raise CheckpointError(f"{where} does not read back as written: check the disk and run the import again")


def _cli(value: Any) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
