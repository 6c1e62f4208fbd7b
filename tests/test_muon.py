"""dist_gpt.optim.muon in one process: torch.optim.Muon's update bit for bit, batched == one by one,
torch.optim.Muon checkpoints resume, the work assignment and the slices of the layouts."""

import copy

import pytest
import torch

from checkpoint_worker import make_checkpointer
from dist_gpt.checkpoint import CheckpointConfig, ModelOptimizerState
from dist_gpt.model.gpt import GPT, GPTConfig
from dist_gpt.optim.muon import BATCH_MIN_SIDE, Muon, newton_schulz
from dist_gpt.optim.muon_layout import Layout, assign_workers, ns_cost
from dist_gpt.optim.optimizers import OptimConfig, build_optimizers

needs_torch_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch>=2.9")

# tall, wide, square, repeated shapes (batched), one row off square, skinny ones (too small to batch)
SHAPES = [(48, 32), (32, 48), (48, 32), (32, 32), (48, 32), (17, 16), (4, 40), (4, 40)]
COEFFICIENTS = (3.4445, -4.775, 2.0315)


def fp32_newton_schulz(grad, ns_coefficients, ns_steps, eps):
    """What dist_gpt's ExactMuon swapped into torch.optim.Muon for fp32 runs (until this module):
    torch's iteration in fp32."""
    a, b, c = ns_coefficients
    x = grad.float()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x


@pytest.fixture
def torch_muon_in(monkeypatch):
    """torch.optim.Muon, orthogonalising in bf16 (its own) or in fp32 (today's fp32 runs)."""
    import torch.optim._muon as muon_impl

    def use(dtype):
        if dtype == torch.float32:
            monkeypatch.setattr(muon_impl, "_zeropower_via_newtonschulz", fp32_newton_schulz)
        return torch.optim.Muon
    return use


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _groups(params):
    """Two groups with different settings (every option torch's Muon has): batches never mix them."""
    return [{"params": params[:4], "lr": 0.02, "weight_decay": 0.01},
            {"params": params[4:], "lr": 0.05, "weight_decay": 0.0, "ns_steps": 3, "nesterov": False,
             "adjust_lr_fn": "match_rms_adamw"}]


def _run(opt, params, steps, start=0):
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@needs_torch_muon
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_single_process_is_torch_muon_bit_for_bit(torch_muon_in, dtype, batched):
    """One by one the operations are torch's own; batched, torch's CPU bmm runs the same gemm per matrix."""
    ours, theirs = _params(), _params()
    mine = Muon(_groups(ours), ns_dtype=dtype, batched=batched)
    reference = torch_muon_in(dtype)(_groups(theirs))
    for step in range(5):
        _run(mine, ours, 1, step)
        _run(reference, theirs, 1, step)
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), f"step {step}: {(a - b).abs().max():.3e}"
    assert mine.state_dict()["param_groups"] == reference.state_dict()["param_groups"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batched_newton_schulz_is_each_matrix_alone(dtype):
    g = torch.Generator().manual_seed(1)
    for shape in [(48, 32), (32, 48), (32, 32), (16, 20), (24, 9), (3, 5)]:
        stack = torch.randn((5, *shape), generator=g)
        batched = newton_schulz(stack, COEFFICIENTS, 5, 1e-7, dtype)
        alone = torch.stack([newton_schulz(m, COEFFICIENTS, 5, 1e-7, dtype) for m in stack])
        assert batched.dtype == dtype and batched.shape == stack.shape
        if min(shape) >= BATCH_MIN_SIDE:  # the sizes Muon batches: bit for bit
            assert torch.equal(batched, alone), shape
        else:  # tiny ones: torch's CPU bmm may round differently from mm
            torch.testing.assert_close(batched, alone, rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_newton_schulz_orthogonalises():
    """5 quintic steps push every singular value into roughly [0.5, 1.5] (Muon's design), in fp32."""
    g = torch.randn(64, 24, generator=torch.Generator().manual_seed(2)) * 10
    singular = torch.linalg.svdvals(newton_schulz(g, COEFFICIENTS, 5, 1e-7, torch.float32))
    assert singular.min() > 0.5 and singular.max() < 1.5
    assert torch.equal(newton_schulz(torch.zeros(4, 6), COEFFICIENTS, 5, 1e-7, torch.float32), torch.zeros(4, 6))


def _tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, norm="rmsnorm",
                         positions="rope", qk_norm=True, mlp="relu2", tie_embeddings=False))


def _train(model, optimizers, steps, start):
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        x, y = (torch.randint(0, 32, (4, 8), generator=g) for _ in range(2))
        model(x, y).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)


@needs_torch_muon
@pytest.mark.parametrize("exact", [False, True])
def test_torch_muon_checkpoint_resumes_identically(tmp_path, torch_muon_in, exact):
    """A checkpoint written by today's trainer (AdamW + torch.optim.Muon, state saved by parameter name
    through DCP) resumes into build_optimizers' Muon and continues exactly as torch's would."""
    cfg = OptimConfig(name="muon", muon_weight_decay=0.01, warmup_steps=0)
    model = _tiny_gpt()
    adamw, ours = build_optimizers(model, cfg, "cpu", exact=exact)
    theirs = torch_muon_in(torch.float32 if exact else torch.bfloat16)([dict(g) for g in ours.param_groups])
    _train(model, [adamw, theirs], 3, 0)
    ckpt, _ = make_checkpointer(tmp_path, CheckpointConfig(), {"model_optim": ModelOptimizerState(model, [adamw, theirs])})
    path = ckpt.save(3)
    _train(model, [adamw, theirs], 3, 3)

    resumed = _tiny_gpt()
    optimizers = build_optimizers(resumed, cfg, "cpu", exact=exact)
    assert type(optimizers[1]) is Muon
    make_checkpointer(tmp_path, CheckpointConfig(), {"model_optim": ModelOptimizerState(resumed, optimizers)})[0].load(path)
    state = optimizers[1].state
    assert len(state) == 8 and all(set(s) == {"momentum_buffer"} and s["momentum_buffer"].abs().sum() > 0
                                   for s in state.values())
    _train(resumed, optimizers, 3, 3)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


@needs_torch_muon
def test_torch_muon_state_dict_loads():
    """The plain Optimizer.state_dict of torch.optim.Muon loads as it is (same groups, same state keys)."""
    ours, theirs = _params(), _params()
    reference = torch.optim.Muon(_groups(theirs))
    _run(reference, theirs, 2)
    mine = Muon(_groups(ours))
    for a, b in zip(ours, theirs):
        a.data.copy_(b)
    mine.load_state_dict(copy.deepcopy(reference.state_dict()))  # as from a file: no tensors shared
    _run(mine, ours, 2, 2)
    _run(reference, theirs, 2, 2)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_assign_workers_balances_cost_and_spreads_shapes():
    shapes = [(384, 128), (128, 128), (512, 128), (128, 512)] * 4  # the cpu preset's 4 blocks
    for workers in (1, 2, 3, 4, 16, 20):
        owner = assign_workers(shapes, workers)
        assert owner == assign_workers(shapes, workers) and set(owner) <= set(range(workers))
        load = [sum(ns_cost(s) for s, w in zip(shapes, owner) if w == k) for k in range(workers)]
        assert max(load) - min(load) <= max(ns_cost(s) for s in shapes)  # greedy: within one matrix
    owner = assign_workers(shapes, 4)
    for shape in set(shapes):  # 4 of each shape: one per worker, so each batches its share
        assert sorted(w for s, w in zip(shapes, owner) if s == shape) == [0, 1, 2, 3]


@pytest.mark.parametrize("rows,shards", [(9, 2), (9, 4), (3, 4), (8, 4), (1, 3)])
def test_slices_are_torch_chunks(rows, shards):
    """The slice each shard rank holds: torch.chunk's split (what FSDP2 and DTensor's Shard(0) use)."""
    layout = Layout(shards=shards)
    chunks = torch.arange(rows * 5).view(rows, 5).chunk(shards)
    starts = [sum(c.shape[0] for c in chunks[:r]) for r in range(len(chunks))]
    for r in range(shards):
        expected = (starts[r], chunks[r].shape[0]) if r < len(chunks) else (rows, 0)
        assert layout.slice_range((rows, 5), r) == expected


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="2D parameters"):
        Muon([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="ns_steps"):
        Muon(_params(), ns_steps=100)
    with pytest.raises(ValueError, match="Adjust learning rate"):
        Muon(_params(), adjust_lr_fn="other")
