"""A tiny model made by the original notebook's own code, pickled whole the way the notebook does.

The notebook (`pickle.dump(model, f)` in a script or Jupyter) records its classes as
`__main__.GPTLanguageModel`, `__main__.Block`, ... and every tensor storage as a nested
`torch.storage._load_from_bytes` stream. To produce exactly that, the notebook's classes run in a
child Python whose `__main__` defines them (`SCRIPT` below); the same child, given the pickle back,
is the reference forward pass that dist_gpt's imported model must match.

    build_notebook_model(tmp_path / "model-01.pkl", vocab_txt)             # the notebook's pickle
    build_notebook_model(path, vocab_txt, location="cuda:0")               # as if saved on a GPU
    build_notebook_model(path, vocab_txt, payload={"at": "module", "marker": m})   # a tampered one
    notebook_forward(path, [(idx, targets), (idx2, None)]) -> [(logits, loss), ...]
"""

from __future__ import annotations

import inspect
import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

# Tiny sizes with the notebook's quirk kept: head_size = n_embd // n_head = 6, so attention is
# 4 x 6 = 24 wide and `proj` maps 24 -> 26, as the notebook's 20 x 19 = 380 -> 384.
SIZES = {"n_embd": 26, "n_head": 4, "n_layer": 2, "block_size": 16, "dropout": 0.2}

# The notebook's model classes, verbatim in names, attributes and arithmetic (the two lines its
# page swallowed into comments, `B,T,C = x.shape` and `wei = ...`, restored).
NOTEBOOK_CLASSES = '''
import torch
import torch.nn as nn
from torch.nn import functional as F

class FeedForward(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.ReLU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class Head(nn.Module):
    def __init__(self, head_size):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer('tril', torch.tril(torch.ones(block_size, block_size)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        B,T,C = x.shape
        k = self.key(x)
        q = self.query(x)
        wei = q @ k.transpose(-2,-1) * k.shape[-1]**-0.5
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float('-inf'))
        wei = F.softmax(wei, dim=-1)
        wei = self.dropout(wei)
        v = self.value(x)
        out = wei @ v
        return out


class MultiHeadAttention(nn.Module):
    def __init__(self, num_heads, head_size):
        super().__init__()
        self.heads = nn.ModuleList([Head(head_size) for _ in range(num_heads)])
        self.proj = nn.Linear(head_size * num_heads, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        out = torch.cat([h(x) for h in self.heads], dim=-1)
        out = self.dropout(self.proj(out))
        return out

class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        head_size = n_embd // n_head
        self.sa = MultiHeadAttention(n_head, head_size)
        self.ffwd = FeedForward(n_embd)
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
    def forward(self, x):
        y = self.sa(x)
        x = self.ln1(x+y)
        y = self.ffwd(x)
        x = self.ln2(x+y)
        return x

class GPTLanguageModel(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, n_embd)
        self.position_embedding_table = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head = n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0, std=0.02)

    def forward(self, index, targets=None):
        B, T = index.shape
        tok_emb = self.token_embedding_table(index)
        pos_emb = self.position_embedding_table(torch.arange(T, device=device))
        x = tok_emb + pos_emb
        x = self.blocks(x)
        x = self.ln_f(x)
        logits = self.lm_head(x)
        if targets is None:
            loss = None
        else:
            B, T, C = logits.shape
            logits = logits.view(B*T, C)
            targets = targets.view(B*T)
            loss = F.cross_entropy(logits, targets)
        return logits, loss
'''

def storage_stream(main: object) -> bytes:
    """A nested storage stream in torch's legacy layout (magic number, protocol version, system
    info, main pickle, storage keys) whose main pickle is `main` and which holds no storage."""
    f = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                                  "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, f, protocol=2)
    pickle.dump(main, f, protocol=2)
    pickle.dump([], f, protocol=2)
    return f.getvalue()


class Call:
    """Pickles as the call `fn(*args)`: the shape of every malicious pickle."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


# The child process. `build`: the notebook's vocabulary and model, weights moved away from their
# near-uniform init (as days of training would), then `pickle.dump(model, f)`. `forward`: the
# notebook's `pickle.load` and forward pass in eval mode (dropout off), for the reference numbers.
SCRIPT = NOTEBOOK_CLASSES + "\nimport io, pickle\n" + inspect.getsource(storage_stream) + inspect.getsource(Call) + """
import json, os, sys
from collections import OrderedDict
import numpy as np
device = "cpu"


def build(job):
    torch.manual_seed(job["seed"])
    with open(job["vocab"], "r", encoding="utf-8") as f:
        chars = sorted(list(set(f.read())))
    model = GPTLanguageModel(len(chars))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    payload = job.get("payload")
    if payload:
        # A tampered notebook file: running `touch marker` on load, either as an attribute of a
        # module, or inside the nested storage stream of a parameter's tensor.
        touch = Call(os.system, f"touch {payload['marker']}")
        key = model.blocks[0].sa.heads[0].key
        if payload["at"] == "module":
            model.blocks[0].sa.note = touch
        else:
            storage = Call(torch.storage._load_from_bytes, storage_stream(touch))
            tensor = Call(torch._utils._rebuild_tensor_v2, storage, 0, tuple(key.weight.shape),
                          key.weight.stride(), False, OrderedDict())
            key._parameters["weight"] = Call(torch._utils._rebuild_parameter, tensor, True, OrderedDict())
    # What a GPU run records: each nested storage stream says `cuda:0`. This machine has no GPU,
    # so the tag is written the way torch writes it for a CUDA tensor, over CPU data.
    torch.serialization.location_tag = lambda storage, tag=job.get("location"): tag or real_location_tag(storage)
    with open(job["out"], "wb") as f:
        pickle.dump(model, f)


def forward(job):
    with open(job["pkl"], "rb") as f:
        model = pickle.load(f)
    model.eval()
    inputs = np.load(job["inputs"])
    out, losses = {}, []
    for i in range(len(inputs.files) // 2):
        idx = torch.from_numpy(inputs[f"idx{i}"])
        targets = torch.from_numpy(inputs[f"targets{i}"]) if inputs[f"targets{i}"].size else None
        with torch.no_grad():
            logits, loss = model(idx, targets)
        out[f"logits{i}"] = logits.reshape(*idx.shape, -1).numpy()
        losses.append(None if loss is None else loss.item())
    np.savez(job["logits"], **out)
    return losses


import torch.serialization
real_location_tag = torch.serialization.location_tag
results = []
for job in json.loads(sys.argv[1]):
    globals().update(job["sizes"])
    results.append(build(job) if job["mode"] == "build" else forward(job))
print(json.dumps(results))
"""


def _run(jobs: list[dict]) -> list:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(jobs)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"notebook child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_notebook_models(vocab: Path, models: dict[Path, dict], *, seed: int = 0,
                          sizes: dict | None = None) -> list[Path]:
    """Write, in one child process, the notebook's `pickle.dump(model)` of a tiny model over `vocab`'s
    characters to each path, all with the same weights. Options per path: `location` fakes the device
    the storages record ("cuda:0"); `payload` = {"at": "module" | "storage", "marker": path} makes a
    tampered file that runs `touch marker` when pickle (or torch) loads it."""
    jobs = [{"mode": "build", "out": str(out), "vocab": str(vocab), "seed": seed, "sizes": sizes or SIZES,
             "location": opts.get("location"), "payload": opts.get("payload")} for out, opts in models.items()]
    _run(jobs)
    return list(models)


def build_notebook_model(out: Path, vocab: Path, **options) -> Path:
    return build_notebook_models(vocab, {out: options})[0]


def notebook_forward(pkl: Path, inputs: list[tuple[torch.Tensor, torch.Tensor | None]], *,
                     sizes: dict | None = None) -> list[tuple[torch.Tensor, float | None]]:
    """The notebook's own `pickle.load` and forward (eval mode) on each (idx (B, T), targets or None):
    [(logits (B, T, V) fp32, mean loss or None)]."""
    work = Path(pkl).parent
    arrays = {}
    for i, (idx, targets) in enumerate(inputs):
        arrays[f"idx{i}"] = idx.numpy()
        arrays[f"targets{i}"] = np.zeros(0, np.int64) if targets is None else targets.numpy()
    np.savez(work / "_inputs.npz", **arrays)
    losses = _run([{"mode": "forward", "pkl": str(pkl), "inputs": str(work / "_inputs.npz"),
                    "logits": str(work / "_logits.npz"), "sizes": sizes or SIZES}])[0]
    logits = np.load(work / "_logits.npz")
    return [(torch.from_numpy(logits[f"logits{i}"]), loss) for i, loss in enumerate(losses)]


def write_notebook_files(root: Path) -> dict[str, Path]:
    """The notebook's three text files: `vocab.txt` (every character used) and the two splits."""
    root.mkdir(parents=True, exist_ok=True)
    train = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200))
    val = "".join(f"def g{i}(y):\n    return y - {i}\n" for i in range(60))
    vocab = "".join(sorted(set(train + val)))
    files = {"vocab": root / "vocab.txt", "train": root / "train_split.txt", "val": root / "val_split.txt"}
    for key, text in (("vocab", vocab), ("train", train), ("val", val)):
        files[key].write_text(text, encoding="utf-8")
    return files
