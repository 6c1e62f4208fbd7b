"""Optimizer groups (AdamW / Muon split), LR schedule shapes, exact state round-trips, clipping."""

import copy

import pytest
import torch

from dist_gpt.errors import ConfigError
from dist_gpt.model.gpt import GPT, GPTConfig
from dist_gpt.optim.muon import Muon
from dist_gpt.optim.optimizers import LRSchedule, OptimConfig, build_optimizers, clip_grad_norm, param_group_name


def tiny_gpt(tied=True, **overrides):
    """A tiny real GPT; the names that decide the groups are tok_emb, pos_emb, blocks.{i}.*, norm_f, head."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, bias=True, tie_embeddings=tied)
    return GPT(GPTConfig(**(cfg | overrides)))


MODERN = dict(norm="rmsnorm", positions="rope", qk_norm=True, mlp="relu2", zero_init=True, bias=False)


def _groups(optimizers):
    return {g["name"]: g for opt in optimizers for g in opt.param_groups}


@pytest.mark.parametrize("arch", [{}, MODERN, {"mlp": "swiglu"}])
@pytest.mark.parametrize("tied", [True, False])
def test_muon_gets_exactly_the_hidden_matrices(tied, arch):
    model = tiny_gpt(tied=tied, **arch)
    adamw, muon = build_optimizers(model, OptimConfig(name="muon"), "cpu")
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    named = dict(model.named_parameters())  # a tied head appears once, as tok_emb.weight
    hidden = {id(p) for n, p in named.items() if n.startswith("blocks.") and p.ndim == 2}
    assert len(hidden) == 2 * 4  # per block: qkv, attn.proj, mlp.fc, mlp.proj
    muon_ids = [id(p) for g in muon.param_groups for p in g["params"]]
    adamw_ids = [id(p) for g in adamw.param_groups for p in g["params"]]
    assert set(muon_ids) == hidden
    assert set(adamw_ids) == {id(p) for p in named.values()} - hidden
    assert len(muon_ids) + len(adamw_ids) == len(named) == len(set(muon_ids + adamw_ids))

    groups = _groups([adamw, muon])
    embeddings = {id(model.tok_emb.weight)} | ({id(model.pos_emb.weight)} if hasattr(model, "pos_emb") else set())
    assert {id(p) for p in groups["embed"]["params"]} == embeddings
    assert ("head" in groups) == (not tied)
    assert "decay" not in groups  # every matrix outside the blocks is an embedding or the head
    assert all(p.ndim == 1 for p in groups["no_decay"]["params"]) and groups["no_decay"]["weight_decay"] == 0


def test_adamw_decays_matrices_only():
    model = tiny_gpt()
    (adamw,) = build_optimizers(model, OptimConfig(name="adamw", weight_decay=0.1), "cpu")
    groups = _groups([adamw])
    assert set(groups) == {"embed", "decay", "no_decay"}
    assert {id(p) for p in groups["decay"]["params"]} == {
        id(p) for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2}
    assert groups["decay"]["weight_decay"] == groups["embed"]["weight_decay"] == 0.1
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in adamw.param_groups) == len(list(model.parameters()))


def test_group_learning_rates_and_wrapper_prefixes():
    cfg = OptimConfig(name="muon", lr=1e-3, embed_lr=5e-3, head_lr=2e-3, muon_lr=0.05, warmup_steps=0)
    groups = _groups(build_optimizers(tiny_gpt(tied=False), cfg, "cpu"))
    assert {n: g["base_lr"] for n, g in groups.items()} == {"embed": 5e-3, "head": 2e-3, "no_decay": 1e-3, "muon": 0.05}
    weight = torch.zeros(4, 4)
    assert param_group_name("module._orig_mod.blocks.3.mlp.fc.weight", weight, use_muon=True) == "muon"
    assert param_group_name("_orig_mod.head.weight", weight, use_muon=True) == "head"


def test_lr_schedule_apply_scales_every_group():
    cfg = OptimConfig(name="muon", lr=1e-3, embed_lr=4e-3, warmup_steps=10)
    optimizers = build_optimizers(tiny_gpt(), cfg, "cpu")
    mult = LRSchedule(cfg, total_steps=100).apply(optimizers, step=4)
    assert mult == pytest.approx(0.5)
    for group in _groups(optimizers).values():
        assert group["lr"] == group["base_lr"] * 0.5


def test_warmup_then_cosine_ends_at_min_ratio():
    sched = LRSchedule(OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    m = [sched.multiplier(s) for s in range(130)]
    assert m[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear ramp reaching 1
    assert m[10] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(m[10:109], m[11:110]))  # strictly decreasing through the decay
    assert m[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 50 / 99)).item()))
    assert m[109] == pytest.approx(0.1) and m[129] == pytest.approx(0.1)  # last step at min, stays there


def test_constant_schedule():
    sched = LRSchedule(OptimConfig(schedule="constant", warmup_steps=5), total_steps=50)
    assert [sched.multiplier(s) for s in range(4, 60, 5)] == [1.0] * 12
    assert sched.multiplier(0) == pytest.approx(0.2)


def test_wsd_is_flat_then_linear_to_min():
    sched = LRSchedule(OptimConfig(schedule="wsd", warmup_steps=10, cooldown_fraction=0.2, min_lr_ratio=0.0),
                       total_steps=100)
    m = [sched.multiplier(s) for s in range(100)]
    assert m[9:80] == [1.0] * 71  # stable phase
    steps = [b - a for a, b in zip(m[79:99], m[80:100])]
    assert steps == pytest.approx([-1 / 20] * 20)  # straight line over the last 20% ...
    assert m[99] == 0.0  # ... reaching min_lr_ratio at the last step


def test_warmup_longer_than_a_short_run_just_ramps():
    """A smoke-test run shorter than the warmup is allowed: the LR ramps for the whole run."""
    sched = LRSchedule(OptimConfig(schedule="constant", warmup_steps=100), total_steps=3)
    assert [sched.multiplier(s) for s in range(3)] == [0.01, 0.02, 0.03]


def _train(model, optimizers, sched, batches, start):
    losses = []
    for step, (x, y) in enumerate(batches, start=start):
        sched.apply(optimizers, step)
        loss = model(x, y)
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_optimizer_state_round_trip_is_bitwise(name):
    torch.manual_seed(0)
    cfg = OptimConfig(name=name, warmup_steps=2, weight_decay=0.1, muon_weight_decay=0.01)
    data = [(torch.randint(0, 32, (4, 8)), torch.randint(0, 32, (4, 8))) for _ in range(8)]
    model = tiny_gpt()
    optimizers = build_optimizers(model, cfg, "cpu")
    sched = LRSchedule(cfg, total_steps=8)
    _train(model, optimizers, sched, data[:4], start=0)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opts = copy.deepcopy([opt.state_dict() for opt in optimizers])
    uninterrupted = _train(model, optimizers, sched, data[4:], start=4)

    resumed_model = tiny_gpt()
    resumed_model.load_state_dict(saved_model)
    resumed_opts = build_optimizers(resumed_model, cfg, "cpu")
    for opt, state in zip(resumed_opts, saved_opts):
        opt.load_state_dict(state)
    resumed = _train(resumed_model, resumed_opts, LRSchedule(cfg, total_steps=8), data[4:], start=4)
    assert torch.equal(uninterrupted, resumed)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_muon_needs_no_torch_muon(monkeypatch):
    """dist_gpt's Muon is its own: a torch without torch.optim.Muon (< 2.9) still runs the modern recipe."""
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    assert isinstance(build_optimizers(tiny_gpt(), OptimConfig(name="muon"), "cpu")[1], Muon)


@pytest.mark.parametrize("key,value", [("name", "sgd"), ("schedule", "linear"), ("lr", 0.0), ("beta2", 1.0),
                                       ("min_lr_ratio", 1.5), ("cooldown_fraction", 0.0), ("embed_lr", -1.0),
                                       ("muon_ns_steps", 0), ("muon_ns_steps", 100)])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"optim.{key}="):
        OptimConfig(**{key: value})


def test_clip_grad_norm():
    model = tiny_gpt()
    model(torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8))).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))

    norm = clip_grad_norm(model.parameters(), 0.0)  # off: measure only
    assert torch.allclose(norm, expected) and all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))

    max_norm = expected.item() / 4
    norm = clip_grad_norm(model.parameters(), max_norm)
    assert isinstance(norm, torch.Tensor) and torch.allclose(norm, expected)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert clipped.item() == pytest.approx(max_norm, rel=1e-5)


def test_muon_orthogonalises_in_fp32_for_fp32_runs_only():
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))
    cfg = OptimConfig(name="muon")
    assert build_optimizers(model, cfg, "cpu", exact=True)[1].ns_dtype == torch.float32
    assert build_optimizers(model, cfg, "cpu", exact=False)[1].ns_dtype == torch.bfloat16  # torch's own
    three = OptimConfig(name="muon", muon_ns_steps=3)
    assert [build_optimizers(model, c, "cpu")[1].defaults["ns_steps"] for c in (cfg, three)] == [5, 3]
