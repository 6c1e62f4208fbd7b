"""The GPT model: causality, KV-cache generation equal to plain generation, initial loss, overfitting,
the notebook's exact architecture, parameter layout, and clear errors for bad configurations.

    python -m pytest tests/test_model.py -x -q
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from dist_gpt.errors import ConfigError
from dist_gpt.model.gpt import GPT, GPTConfig, KVCache

V, T = 32, 16


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=V, block_size=T, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**base, **kw})


# A representative set of option combinations (every combination is checked at a smaller size below).
CONFIGS = {
    "classic": dict(),
    "notebook": dict(block="postnorm", mlp="relu", n_head=20, head_dim=19, bias=True, head_bias=True,
                     tie_embeddings=False, dropout=0.2),
    "modern": dict(positions="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", zero_init=True,
                   logit_softcap=15.0, tie_embeddings=False),
    "swiglu": dict(mlp="swiglu", positions="rope", bias=True, qkv_bias=True, head_bias=True),
    "postnorm-qknorm-learned": dict(block="postnorm", norm="rmsnorm", qk_norm=True, logit_softcap=5.0,
                                    head_dim=6, mlp_hidden=40),
    "checkpointed": dict(activation_checkpointing=True, positions="rope", dropout=0.1),
    "gqa": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, qk_norm=True, norm_eps=1e-5),
    "gpt2": dict(mlp="gelu_tanh", bias=True, qkv_bias=True, n_kv_head=1),
}


def noisy(model: GPT, seed: int = 0) -> GPT:
    """Perturb every parameter so zero-initialised projections and unit norms do real work."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def build(kw: dict, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return noisy(GPT(tiny(**kw)), seed)


def check_causal(model: GPT, vocab: int, t: int):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab, (2, t), generator=g)
    changed = idx.clone()
    cut = t // 2
    changed[:, cut:] = (idx[:, cut:] + 1 + torch.randint(0, vocab - 1, (2, t - cut), generator=g)) % vocab
    a, b = model(idx), model(changed)
    assert torch.equal(a[:, :cut], b[:, :cut]), "a future token changed earlier logits"
    assert not torch.allclose(a[:, cut], b[:, cut]), "the test is blind: the changed token had no effect"


def check_cache(model: GPT, vocab: int, t: int):
    """Feed a sequence through the KV cache in pieces (a prefill, a multi-token chunk over the cache,
    then one token at a time) and compare every position's logits with one full forward pass."""
    idx = torch.randint(0, vocab, (2, t), generator=torch.Generator().manual_seed(2))
    full = model(idx)
    cache = KVCache(model.cfg.n_layer, t)
    pieces = [(0, t // 3), (t // 3, t // 3 + 3)] + [(i, i + 1) for i in range(t // 3 + 3, t)]
    with torch.no_grad():
        got = torch.cat([model._logits(model._trunk(idx[:, s:e], cache)) for s, e in pieces], dim=1)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    assert cache.pos == t


@pytest.mark.parametrize("name", CONFIGS)
def test_causality(name):
    check_causal(build(CONFIGS[name]), V, T)


@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_logits_equal_full_forward(name):
    check_cache(build(CONFIGS[name]), V, T)


@pytest.mark.parametrize("name", CONFIGS)
def test_generate_with_cache_equals_without(name):
    model = build(CONFIGS[name])
    prompt = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(3))
    n = T - 4  # up to the context length the two are promised equal
    greedy = model.generate(prompt, n, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, n, temperature=0, use_cache=False))
    sampled = [model.generate(prompt, n, temperature=1.0, top_k=10, top_p=0.9, use_cache=c,
                              generator=torch.Generator().manual_seed(4)) for c in (True, False)]
    assert torch.equal(*sampled)
    assert greedy.shape == (3, T)


def test_every_combination_is_causal_and_cache_exact():
    """norm x block x positions x mlp x qk_norm x zero_init x softcap (256 models, 1 layer, 8 wide),
    half of them with grouped-query attention (gelu_tanh is in CONFIGS["gpt2"])."""
    options = itertools.product(("layernorm", "rmsnorm"), ("prenorm", "postnorm"), ("learned", "rope"),
                                ("gelu", "relu", "relu2", "swiglu"), (False, True), (False, True), (None, 3.0))
    for i, (norm, block, positions, mlp, qk_norm, zero_init, cap) in enumerate(options):
        cfg = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8, norm=norm, block=block,
                        positions=positions, mlp=mlp, qk_norm=qk_norm, zero_init=zero_init,
                        logit_softcap=cap, tie_embeddings=bool(i % 2), bias=bool(i % 3),
                        n_kv_head=1 if i % 4 < 2 else None)
        torch.manual_seed(i)
        model = noisy(GPT(cfg), i)
        check_causal(model, 16, 8)
        check_cache(model, 16, 8)


@pytest.mark.parametrize("name", ["classic", "modern", "notebook"])
def test_initial_loss_is_ln_vocab(name):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=64, **CONFIGS[name])).eval()
    g = torch.Generator().manual_seed(5)
    idx, targets = (torch.randint(0, 256, (8, 64), generator=g) for _ in range(2))
    loss = model(idx, targets)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - math.log(256)) < 0.05


@pytest.mark.parametrize("name", ["classic", "modern", "notebook", "swiglu"])
def test_tiny_model_overfits_one_batch(name):
    torch.manual_seed(0)
    model = GPT(tiny(**{**CONFIGS[name], "dropout": 0.0}))
    idx = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(6))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(150):
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert model(x, y).item() < 0.05


def test_loss_ignores_minus_one_targets():
    model = build(CONFIGS["classic"])
    idx = torch.randint(0, V, (2, T))
    targets = idx.clone()
    targets[:, ::2] = -1
    logits = model(idx)
    keep = targets != -1
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(model(idx, targets), expected)


def notebook_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The original notebook's forward pass, written out head by head as the notebook computes it
    (per-head key/query/value, masked softmax, concat, proj; x = ln1(x + sa(x)); x = ln2(x + ffwd(x))),
    reading dist_gpt's parameters through the documented layout."""
    cfg, p = model.cfg, dict(model.named_parameters())
    H, D, B, t = cfg.n_head, cfg.head_size, *idx.shape
    x = p["tok_emb.weight"][idx] + p["pos_emb.weight"][:t]
    tril = torch.tril(torch.ones(t, t))
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        w = p[b + "attn.qkv.weight"]
        heads = []
        for h in range(H):
            q = x @ w[h * D:(h + 1) * D].T
            k = x @ w[H * D + h * D:H * D + (h + 1) * D].T
            v = x @ w[2 * H * D + h * D:2 * H * D + (h + 1) * D].T
            wei = (q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5).masked_fill(tril == 0, float("-inf"))
            heads.append(F.softmax(wei, dim=-1) @ v)
        sa = torch.cat(heads, dim=-1) @ p[b + "attn.proj.weight"].T + p[b + "attn.proj.bias"]
        x = F.layer_norm(x + sa, (cfg.n_embd,), p[b + "norm1.weight"], p[b + "norm1.bias"])
        ff = F.relu(x @ p[b + "mlp.fc.weight"].T + p[b + "mlp.fc.bias"]) @ p[b + "mlp.proj.weight"].T
        x = F.layer_norm(x + ff + p[b + "mlp.proj.bias"], (cfg.n_embd,), p[b + "norm2.weight"], p[b + "norm2.bias"])
    x = F.layer_norm(x, (cfg.n_embd,), p["norm_f.weight"], p["norm_f.bias"])
    return x @ p["head.weight"].T + p["head.bias"]


def test_notebook_architecture_is_exact():
    model = build(CONFIGS["notebook"])
    idx = torch.randint(0, V, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), notebook_forward(model, idx), atol=1e-5, rtol=1e-5)


def test_notebook_parameter_layout():
    """The seed preset's shapes: 384 wide, 20 heads of 19 = 380, biases exactly where the notebook has them."""
    cfg = GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=20, n_embd=384, block="postnorm", mlp="relu",
                    bias=True, head_bias=True, tie_embeddings=False)
    shapes = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    assert shapes == {
        "tok_emb.weight": (V, 384), "pos_emb.weight": (T, 384),
        "blocks.0.norm1.weight": (384,), "blocks.0.norm1.bias": (384,),
        "blocks.0.attn.qkv.weight": (3 * 380, 384),
        "blocks.0.attn.proj.weight": (384, 380), "blocks.0.attn.proj.bias": (384,),
        "blocks.0.norm2.weight": (384,), "blocks.0.norm2.bias": (384,),
        "blocks.0.mlp.fc.weight": (1536, 384), "blocks.0.mlp.fc.bias": (1536,),
        "blocks.0.mlp.proj.weight": (384, 1536), "blocks.0.mlp.proj.bias": (384,),
        "norm_f.weight": (384,), "norm_f.bias": (384,),
        "head.weight": (V, 384), "head.bias": (V,),
    }


def test_modern_parameter_layout():
    cfg = tiny(n_layer=1, positions="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", mlp_hidden=48)
    shapes = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    assert shapes == {
        "tok_emb.weight": (V, 32), "blocks.0.norm1.weight": (32,),
        "blocks.0.attn.qkv.weight": (96, 32), "blocks.0.attn.q_norm.weight": (8,),
        "blocks.0.attn.k_norm.weight": (8,), "blocks.0.attn.proj.weight": (32, 32),
        "blocks.0.norm2.weight": (32,), "blocks.0.mlp.fc.weight": (96, 32),
        "blocks.0.mlp.proj.weight": (32, 48), "norm_f.weight": (32,),
    }
    assert GPTConfig(n_embd=768, mlp="swiglu").hidden_size == 2048


def test_grouped_query_attention_layout_and_function():
    """n_kv_head=K < n_head=H: qkv holds H query heads then K key and K value heads, and query head h
    attends with key/value head h // (H/K) -- the same as plain attention with those heads repeated."""
    gqa = build(dict(n_head=4, n_kv_head=2, positions="rope"))
    assert gqa.blocks[0].attn.qkv.weight.shape == ((4 + 2 * 2) * 8, 32)
    full = GPT(tiny(n_head=4, positions="rope"))
    sd = gqa.state_dict()
    for i in range(gqa.cfg.n_layer):
        q, k, v = sd[f"blocks.{i}.attn.qkv.weight"].split([32, 16, 16])
        repeat = [t.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32) for t in (k, v)]
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, *repeat])
    full.load_state_dict(sd)
    idx = torch.randint(0, V, (2, T))
    torch.testing.assert_close(gqa(idx), full.eval()(idx), atol=1e-5, rtol=1e-5)


def test_new_options_default_to_the_old_model():
    """Configs saved before n_kv_head, norm_eps and gelu_tanh existed lack those keys; their defaults
    build the same parameters and the same function (LayerNorm eps 1e-5, RMSNorm 1e-6)."""
    for norm, eps in (("layernorm", 1e-5), ("rmsnorm", 1e-6)):
        cfg = tiny(norm=norm)
        assert cfg.kv_heads == cfg.n_head and cfg.eps == eps
        model = build(dict(norm=norm))
        assert model.blocks[0].attn.qkv.weight.shape == (3 * 32, 32)
        explicit = GPT(tiny(norm=norm, n_kv_head=4, norm_eps=eps))
        explicit.load_state_dict(model.state_dict())
        idx = torch.randint(0, V, (2, T))
        assert torch.equal(explicit.eval()(idx), model(idx))


def test_tanh_gelu_is_the_tanh_approximation():
    model = build(dict(mlp="gelu_tanh"))
    x = torch.randn(2, T, 32)
    mlp = model.blocks[0].mlp
    h = mlp.fc(x)
    expected = mlp.proj(0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3))))
    torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=1e-5)


def test_tied_embeddings_appear_once_and_load_both_ways(tmp_path):
    from safetensors.torch import load_file, save_file

    model = build(CONFIGS["classic"])
    assert model.head.weight is model.tok_emb.weight
    sd = model.state_dict()
    assert "head.weight" not in sd and "tok_emb.weight" in sd
    save_file(sd, tmp_path / "m.safetensors")  # refuses shared tensors, so this proves they are not
    fresh = GPT(tiny())
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    assert fresh.head.weight is fresh.tok_emb.weight
    idx = torch.randint(0, V, (2, T))
    assert torch.equal(fresh.eval()(idx), model(idx))
    fresh.load_state_dict({**sd, "head.weight": sd["tok_emb.weight"]})  # a state dict that lists it too
    untied = build(CONFIGS["notebook"])
    assert "head.weight" in untied.state_dict()


def test_zero_init_starts_blocks_as_identity():
    model = GPT(tiny(zero_init=True, tie_embeddings=False))
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()
    idx, targets = torch.randint(0, V, (2, T)), torch.randint(0, V, (2, T))
    assert model(idx, targets).item() == pytest.approx(math.log(V), abs=1e-6)


def test_scaled_init_of_residual_projections():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_embd=256, n_head=4))
    std = model.blocks[0].attn.proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_activation_checkpointing_gives_the_same_gradients():
    """Recomputation in backward replays dropout with the same random numbers, so nothing changes."""
    idx, targets = torch.randint(0, V, (4, T)), torch.randint(0, V, (4, T))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = GPT(tiny(dropout=0.1, activation_checkpointing=ckpt)).train()
        torch.manual_seed(1)
        model(idx, targets).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-7, rtol=1e-6, msg=name)


def test_num_params_and_flops_per_token():
    cfg = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=8)
    model = GPT(cfg)
    per_block = 8 + 3 * 8 * 8 + 8 * 8 + 8 + 8 * 32 + 32 * 8  # norm1, qkv, proj, norm2, fc, proj
    non_emb = 2 * per_block + 8 + 100 * 8  # + norm_f + the tied head
    assert model.num_params() == non_emb
    assert model.num_params(non_embedding=False) == non_emb + 16 * 8
    assert model.flops_per_token() == 6 * non_emb + 12 * 2 * 2 * 4 * 16
    untied = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=8, tie_embeddings=False))
    assert untied.num_params() == non_emb and untied.num_params(False) == non_emb + 16 * 8 + 100 * 8


def test_sampling_options():
    model = build(CONFIGS["classic"])
    prompt = torch.randint(0, V, (2, 3))
    greedy = model.generate(prompt, 8, temperature=0)
    assert torch.equal(model.generate(prompt, 8, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 8, top_p=1e-6), greedy)
    seeded = [model.generate(prompt, 8, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*seeded)
    steps = list(model.stream(prompt, 5))
    assert len(steps) == 5 and all(s.shape == (2, 1) and s.dtype == torch.int64 for s in steps)
    assert model.generate(prompt, 0).shape == (2, 3)


def test_generation_stops_at_end_of_text_and_restores_training_mode():
    model = build(CONFIGS["classic"]).train()
    prompt = torch.randint(0, V, (1, 3))
    first = model.generate(prompt, 1, temperature=0)[0, -1].item()
    out = model.generate(prompt, 10, temperature=0, eot_id=first)
    assert out.shape == (1, 4) and out[0, -1].item() == first
    assert model.training
    rows = model.generate(torch.randint(0, V, (4, 3)), 12, eot_id=0, generator=torch.Generator().manual_seed(8))
    for row in rows[:, 3:]:  # once a row has ended it only pads with the end token
        hits = (row == 0).nonzero()
        if len(hits):
            assert (row[hits[0, 0]:] == 0).all()


@pytest.mark.parametrize("name", ["classic", "modern"])
def test_generation_past_the_context(name):
    """The cache is rebuilt from the last block_size // 2 tokens when full; up to block_size the
    output equals plain generation, after it every token still follows greedily from its window."""
    model = build(CONFIGS[name])
    prompt = torch.randint(0, V, (2, 5))
    out = model.generate(prompt, 3 * T, temperature=0)
    assert out.shape == (2, 5 + 3 * T)
    assert torch.equal(out[:, :T + 1], model.generate(prompt, T + 1 - 5, temperature=0, use_cache=False))
    long_prompt = torch.randint(0, V, (1, 2 * T))  # a prompt longer than the context is cropped
    assert model.generate(long_prompt, 4, temperature=0).shape == (1, 2 * T + 4)


def test_cache_holds_only_the_tokens_it_will_see(monkeypatch):
    """A model with a long context (an imported Qwen3: 40,960) allocates its KV cache for the prompt
    and the new tokens, not the whole context, when they fit; past the context it needs all of it."""
    import dist_gpt.model.gpt as model_mod

    sizes = []

    class Recording(KVCache):
        def __init__(self, n_layer, max_len):
            sizes.append(max_len)
            super().__init__(n_layer, max_len)

    monkeypatch.setattr(model_mod, "KVCache", Recording)
    model = noisy(GPT(tiny(block_size=4096, positions="rope")))
    prompt = torch.randint(0, V, (1, 5))
    out = model.generate(prompt, 6, temperature=0)
    assert sizes == [11]
    assert torch.equal(out, model.generate(prompt, 6, temperature=0, use_cache=False))
    sizes.clear()
    build(CONFIGS["classic"]).generate(prompt, 3 * T, temperature=0)
    assert set(sizes) == {T}


def test_cache_makes_each_new_token_cost_one_position():
    """Count the positions each forward pass computes: with the cache a new token costs one (plus a
    rebuild of block_size // 2 every block_size // 2 tokens past the context), without it up to block_size."""
    model = build(CONFIGS["classic"])
    trunk, seen = model._trunk, []

    def counting(idx, cache=None, doc_ids=None):
        seen.append(idx.size(1))
        return trunk(idx, cache, doc_ids)

    model._trunk = counting  # observes the real forward passes; the instance attribute shadows the method
    prompt, n = torch.randint(0, V, (1, 5)), 3 * T
    model.generate(prompt, n, temperature=0)
    cached, seen[:] = sum(seen), []
    model.generate(prompt, n, temperature=0, use_cache=False)
    assert cached <= 2 * (5 + n) < sum(seen) / 4


def test_bf16_autocast_gives_fp32_logits_and_loss():
    model = build(CONFIGS["modern"])
    idx = torch.randint(0, V, (2, T))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx), model(idx, idx)
        out = model.generate(idx[:, :4], 4)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32 and out.shape == (2, 8)


def test_cpu_bf16_attention_is_fp32_attention_of_the_bf16_inputs():
    """On CPU, bf16 queries/keys/values are attended in fp32 (torch's bf16 CPU flash-attention
    backward is several times slower): the result is fp32 attention rounded once to bf16, with
    gradients, under autocast as well as without it."""
    from dist_gpt.model.gpt import attention
    q, k, v = (torch.randn(2, 4, 16, 8).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attention(q, k, v, is_causal=True)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert y.dtype == torch.bfloat16 and torch.equal(y, exact.bfloat16())
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))


@pytest.mark.parametrize("kw, key", [
    (dict(positions="rope", n_head=20, n_embd=384), "model.head_dim"),
    (dict(positions="rope", head_dim=7), "model.head_dim"),
    (dict(norm="batchnorm"), "model.norm"),
    (dict(block="sandwich"), "model.block"),
    (dict(positions="alibi"), "model.positions"),
    (dict(mlp="geglu"), "model.mlp"),
    (dict(dropout=1.0), "model.dropout"),
    (dict(n_layer=0), "model.n_layer"),
    (dict(n_head=8, n_embd=4), "model.head_dim"),
    (dict(head_dim=0), "model.head_dim"),
    (dict(mlp_hidden=0), "model.mlp_hidden"),
    (dict(logit_softcap=0.0), "model.logit_softcap"),
    (dict(init_std=-1.0), "model.init_std"),
    (dict(rope_base=0.0), "model.rope_base"),
    (dict(n_head=4, n_kv_head=3), "model.n_kv_head"),
    (dict(n_kv_head=0), "model.n_kv_head"),
    (dict(norm_eps=0.0), "model.norm_eps"),
])
def test_bad_configurations_are_refused_clearly(kw, key):
    with pytest.raises(ConfigError) as err:
        GPTConfig(**kw)
    message = str(err.value)
    assert message.startswith(key + ":") and "\n" not in message


def test_rope_with_odd_head_dim_says_how_to_fix():
    with pytest.raises(ConfigError, match="even head_dim, got 19 .*n_embd // n_head = 384 // 20.*positions=learned"):
        GPTConfig(positions="rope", n_head=20, n_embd=384)
    assert GPTConfig(positions="rope", n_head=20, n_embd=384, head_dim=20).head_size == 20


def test_too_long_input_and_bad_sampling_arguments_are_refused():
    model = build(CONFIGS["classic"])
    with pytest.raises(ConfigError, match="model.block_size"):
        model(torch.zeros(1, T + 1, dtype=torch.long))
    prompt = torch.zeros(1, 2, dtype=torch.long)
    for kw, msg in [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p")]:
        with pytest.raises(ConfigError, match=msg):
            model.generate(prompt, 2, **kw)


def test_fused_modern_ops_are_their_composite_definitions():
    """dist_gpt.model.fused_ops (RMSNorm, rotary positions, both at once, ReLU²) against the plain torch
    definitions, forward and the hand-written backwards against autograd's, in fp32; a bf16 input
    comes back in bf16 (or in the dtype asked for)."""
    from dist_gpt.model.fused_ops import norm_rotary, relu_squared, rms_norm, rotary, rotary_tables

    torch.manual_seed(0)
    B, L, H, D = 3, 5, 6, 8
    x = torch.randn(B, L, H, D, requires_grad=True)  # (B, T, heads, D)
    per_head, shared = torch.randn(H, D, requires_grad=True), torch.randn(D, requires_grad=True)
    cos, sin = rotary_tables(torch.arange(L), D, 10000.0)  # (T, 1, D): [cos | cos], [-sin | sin]

    def norm(t, w):
        return F.rms_norm(t, (D,), None, eps=1e-6) * w

    def rope(t):  # the half-split rotation, written out
        t1, t2, c, s = *t.chunk(2, -1), cos[..., : D // 2], sin[..., D // 2:]
        return torch.cat((t1 * c - t2 * s, t2 * c + t1 * s), -1)

    cases = [(rms_norm(x, per_head, 1e-6), norm(x, per_head)), (rms_norm(x, shared, 1e-6), norm(x, shared)),
             (rotary(x, cos, sin), rope(x)), (relu_squared(x), F.relu(x) ** 2),
             (norm_rotary(x, per_head, 1e-6, (cos, sin), torch.float32), rope(norm(x, per_head)))]
    grad_out = torch.randn(B, L, H, D)
    for got, want in cases:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        inputs = (x, per_head, shared)
        for a, b in zip(torch.autograd.grad(got, inputs, grad_out, allow_unused=True),
                        torch.autograd.grad(want, inputs, grad_out, allow_unused=True)):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # bf16 weights (FSDP's mixed precision on CUDA gathers parameters in bf16), fp32 or bf16 input:
    # the backward computes in fp32 and returns each gradient in its input's dtype
    for inp in (x.detach(), x.detach().bfloat16()):
        for w in (shared, per_head):
            xi, wi = inp.clone().requires_grad_(), w.detach().bfloat16().requires_grad_()
            got_x, got_w = torch.autograd.grad(rms_norm(xi, wi, 1e-6), (xi, wi), grad_out.to(inp.dtype))
            xf, wf = inp.float().requires_grad_(), wi.detach().float().requires_grad_()
            want_x, want_w = torch.autograd.grad(norm(xf, wf), (xf, wf), grad_out)
            assert got_x.dtype == inp.dtype and got_w.dtype == torch.bfloat16
            torch.testing.assert_close(got_x.float(), want_x, atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(got_w.float(), want_w, atol=5e-2, rtol=2e-2)
    low = x.detach().bfloat16()
    assert rms_norm(low, shared, 1e-6).dtype == rotary(low, cos, sin).dtype == torch.bfloat16
    assert norm_rotary(low, per_head, 1e-6, (cos, sin), torch.float32).dtype == torch.float32
