"""Attention that stays inside documents (`model.doc_mask`): masks made from per-token document ids.

`doc_ids` (B, T) int64: tokens of a row with equal ids belong to one document (the data loader
numbers a row's documents from 0 at its first token, from the dataset's document index;
generation starts a new number at every end-of-text token, `eot_documents`). A query attends to a
key when the key is not later (causal) and belongs to the same document, so nothing before a
document's first token reaches it.

How, by device:
- CUDA without dropout: FlexAttention with a block mask (`torch.nn.attention.flex_attention`),
  compiled once; tiles of the score matrix that are masked whole are skipped, so a row of short
  documents costs less than the plain causal mask.
- Otherwise (CPU, dropout, generation with a KV cache): `scaled_dot_product_attention` with a
  boolean (B, 1, T_query, T_key) mask; a CPU batch without any document boundary takes the plain
  causal path (docs/PERFORMANCE.md, "Document masking", has its cost).
"""

from __future__ import annotations

import contextlib
import functools

import torch

_compiled_flex = None


def document_mask(q_doc: torch.Tensor, k_doc: torch.Tensor) -> torch.Tensor:
    """q_doc (B, Tq), k_doc (B, Tk) with Tk >= Tq, the queries being the last Tq keys ->
    bool (B, 1, Tq, Tk): key j is visible to query i when j <= i + (Tk - Tq) and their documents agree."""
    Tq, Tk = q_doc.size(1), k_doc.size(1)
    causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q_doc.device).tril(diagonal=Tk - Tq)
    return (q_doc[:, :, None] == k_doc[:, None, :]).unsqueeze(1) & causal


def one_document_per_row(doc: torch.Tensor) -> bool:
    """True when no row has a document boundary (then the plain causal mask is the same mask).
    Reads a value back to the host: CPU only."""
    return bool((doc == doc[:, :1]).all())


def flex_usable(device: torch.device, dropout: float, head_dim: int) -> bool:
    """FlexAttention where it is fast and supported: CUDA, no attention dropout (flex has none),
    a power-of-two head width of at least 16. Also on a CPU inside `flex_on_cpu()` when no gradient
    is taken (evaluation, sampling without a cache)."""
    here = device.type == "cuda" or (_cpu_forward_flex and device.type == "cpu" and not torch.is_grad_enabled())
    return here and dropout == 0.0 and head_dim >= 16 and head_dim & (head_dim - 1) == 0 and _has_flex()


_cpu_forward_flex = False


@contextlib.contextmanager
def flex_on_cpu():
    """Inside, forward passes without gradients on a CPU take the CUDA path: the same block mask,
    mask function and compiled FlexAttention. Torch 2.13 runs FlexAttention's compiled forward on a
    CPU but not its backward (NotImplementedError), so training never does; this lets that path be
    checked against the boolean-mask SDPA path on a machine without a GPU (tests/test_compile.py)."""
    global _cpu_forward_flex
    before, _cpu_forward_flex = _cpu_forward_flex, True
    try:
        yield
    finally:
        _cpu_forward_flex = before


@functools.cache
def _has_flex() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401  (optional: torch >= 2.5 has it)
    except ImportError:
        return False
    return True


@torch.compiler.disable  # built eagerly, outside a compiled model's graph, then handed to it
def block_mask(doc: torch.Tensor):
    """The FlexAttention BlockMask of causal attention inside documents, for doc (B, T)."""
    from torch.nn.attention.flex_attention import create_block_mask  # optional: torch >= 2.5

    B, T = doc.shape

    def same_document(b, h, q, kv):
        return (q >= kv) & (doc[b, q] == doc[b, kv])

    return create_block_mask(same_document, B, None, T, T, device=doc.device)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """FlexAttention, compiled: inside a compiled model by the model's compilation, otherwise by
    its own, made on first use (uncompiled it would materialise the whole score matrix)."""
    from torch.nn.attention.flex_attention import flex_attention  # optional: torch >= 2.5

    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=mask)
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=mask)


def eot_documents(idx: torch.Tensor, eot_id: int, before: torch.Tensor | None = None) -> torch.Tensor:
    """Document ids of idx (B, T) at generation: every end-of-text token starts a new document (it
    is a document's first token, as prepare places it). `before` (B,) is the id of the token before
    idx[:, 0] (default 0)."""
    ids = torch.cumsum((idx == eot_id).long(), dim=1)
    return ids if before is None else ids + before[:, None]
