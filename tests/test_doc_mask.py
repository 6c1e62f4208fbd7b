"""Document masking (model.doc_mask): a token's logits depend on nothing before its document's
start, in training forwards (boolean masks on CPU, FlexAttention on CUDA) and in generation (an
end-of-text token starts a document; the KV cache keeps the documents)."""

from __future__ import annotations

import warnings

import pytest
import torch

from dist_gpt.model import doc_mask
from dist_gpt.model.gpt import GPT, GPTConfig

EOT = 0


def _model(positions: str = "rope", **kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=16, block_size=32, n_layer=2, n_head=2, n_embd=32, positions=positions,
                    doc_mask=True, **kw)
    return GPT(cfg).eval()


def _batch():
    """Two rows of 32 tokens; row 0 holds documents starting at 0, 9 and 20, row 1 one document."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(1, 16, (2, 32), generator=g)
    doc = torch.zeros(2, 32, dtype=torch.long)
    doc[0, 9:], doc[0, 20:] = 1, 2
    return idx, doc


@pytest.mark.parametrize("positions, block", [("rope", "prenorm"), ("learned", "prenorm"), ("learned", "postnorm")])
def test_logits_do_not_depend_on_anything_before_the_document(positions, block):
    model = _model(positions, block=block)
    idx, doc = _batch()
    changed = idx.clone()
    changed[0, :20] = torch.randint(1, 16, (20,), generator=torch.Generator().manual_seed(2))  # documents 0 and 1
    with torch.no_grad():
        a, b = model(idx, doc_ids=doc), model(changed, doc_ids=doc)
        assert torch.equal(a[0, 20:], b[0, 20:])  # document 2 sees none of it
        assert not torch.allclose(a[0, 9:20], b[0, 9:20])  # document 1's own tokens changed
        assert torch.equal(a[1], b[1])
        plain_a, plain_b = model(idx), model(changed)  # without document ids: one document per row
        assert not torch.allclose(plain_a[0, 20:], plain_b[0, 20:])
        # a row that is one document is attended exactly as without ids (the plain causal path)
        assert torch.equal(model(idx[1:], doc_ids=doc[1:]), plain_a[1:])


def test_masked_loss_trains_and_matches_the_masked_logits():
    model = _model().train()
    idx, doc = _batch()
    y = torch.roll(idx, -1, dims=1)
    loss = model(idx, y, doc)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        logits = model(idx, doc_ids=doc)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits.view(-1, 16), y.view(-1)), atol=1e-6)


def test_flex_block_mask_is_the_boolean_mask():
    """The CUDA path's BlockMask allows exactly what the CPU path's boolean mask allows (checked with
    FlexAttention's eager reference implementation, which runs anywhere)."""
    from torch.nn.attention.flex_attention import flex_attention

    idx, doc = _batch()
    q, k, v = torch.randn(3, 2, 2, 32, 8, generator=torch.Generator().manual_seed(3)).unbind(0)
    with warnings.catch_warnings():  # "without torch.compile" (once per process, so not asserted)
        warnings.simplefilter("ignore", UserWarning)
        flexed = flex_attention(q, k, v, block_mask=doc_mask.block_mask(doc))
    masked = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=doc_mask.document_mask(doc, doc))
    assert torch.allclose(flexed, masked, atol=1e-6)
    # which path a device takes (decided without touching the device)
    cuda = torch.device("cuda")
    assert doc_mask.flex_usable(cuda, 0.0, 64) and doc_mask.flex_usable(cuda, 0.0, 16)
    assert not doc_mask.flex_usable(cuda, 0.1, 64)  # flex has no attention dropout
    assert not doc_mask.flex_usable(cuda, 0.0, 19) and not doc_mask.flex_usable(torch.device("cpu"), 0.0, 64)


def _greedy(model: GPT, prompt: torch.Tensor, n: int, use_cache: bool) -> list[int]:
    out = model.generate(prompt, n, temperature=0, eot_id=EOT, use_cache=use_cache)
    return out[0, prompt.size(1):].tolist()


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_generation_starts_a_document_at_each_end_of_text(positions):
    model = _model(positions)
    g = torch.Generator().manual_seed(5)
    tail = torch.tensor([[EOT, 3, 7, 5, 9]])
    one = torch.cat([torch.randint(1, 16, (1, 7), generator=g), tail], dim=1)
    other = torch.cat([torch.randint(1, 16, (1, 7), generator=g), tail], dim=1)  # another text before the eot
    got = _greedy(model, one, 8, use_cache=True)
    assert got == _greedy(model, other, 8, use_cache=True) == _greedy(model, one, 8, use_cache=False)
    # and it is the training forward's answer: document ids counted at the end-of-text tokens
    seq = one
    for token in got:
        with torch.no_grad():
            logits = model(seq, doc_ids=doc_mask.eot_documents(seq, EOT))[:, -1]
        assert int(logits.argmax()) == token
        if token == EOT:
            break
        seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    # a model without doc_mask reads across the end-of-text token
    model.cfg.doc_mask = False
    with torch.no_grad():
        logits = [model(p)[:, -1] for p in (one, other)]
    assert not torch.allclose(logits[0], logits[1])


def test_generation_past_the_context_keeps_documents():
    """Past block_size the cache is rebuilt from the last half of the context; documents stay apart
    before and after."""
    model = _model()
    g = torch.Generator().manual_seed(6)
    tail = torch.tensor([[EOT, 4, 4, 2]])
    prompts = [torch.cat([torch.randint(1, 16, (1, 20), generator=g), tail], dim=1) for _ in range(2)]
    outs = [model.generate(p, 16, temperature=0, eot_id=EOT)[0, 24:].tolist() for p in prompts]
    assert outs[0] == outs[1] and len(outs[0]) > 32 - 24  # past the context (unless it ended early)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_flex_document_masking():
    model = _model().cuda()
    idx, doc = (t.cuda() for t in _batch())
    assert doc_mask.flex_usable(idx.device, 0.0, model.cfg.head_size)
    changed = idx.clone()
    changed[0, :20] = 1
    with torch.no_grad():
        a, b = model(idx, doc_ids=doc), model(changed, doc_ids=doc)
        cpu = _model()(idx.cpu(), doc_ids=doc.cpu())
    assert torch.allclose(a[0, 20:], b[0, 20:], atol=1e-5)
    assert torch.allclose(a.cpu(), cpu, atol=1e-4)
    y = torch.roll(idx, -1, dims=1)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(idx, y, doc)
    loss.backward()
    assert torch.isfinite(loss)
