"""Every compiled path, proven on a CPU: `--train.compile=true` trains, resumes and matches eager.

* The model's forward compiles without graph breaks: both recipes, documents (model.doc_mask's CPU
  path), activation checkpointing and FP8 (emulated).
* The CUDA path of model.doc_mask (FlexAttention with a block mask) runs on a CPU for forward passes
  (torch 2.13 has no CPU backward for it): evaluation and sampling through it equal the boolean-mask
  SDPA path.
* Training through the real entry point, fp32, 20 steps: compiled equals eager within 1e-4 relative,
  and a compiled run resumed from its checkpoint stays compiled and continues the same losses. The
  single-process run carries the modern recipe, documents, activation checkpointing, eval.tasks and
  sampling at once; the slow ones are ddp and fsdp on 2 ranks and hsdp on 4 (2 x 2).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import EXACT, final, losses, run_train
from dist_gpt import config
from dist_gpt.model import doc_mask
from dist_gpt.model.gpt import GPT
from tests.test_train_documents import paragraphs  # noqa: F401  (a module fixture: ~700 short documents)

LONG = 1800  # seconds: a bound on a hang only (a shared machine stretches compile by minutes)
RTOL = 1e-4  # compiled vs eager, fp32: inductor fuses and reorders sums (observed ~1e-6 over 20 steps)


def _debug_model(recipe: str, **model_keys) -> GPT:
    cfg = config.build("debug", overrides={"train.recipe": recipe, "model.vocab_size": 256,
                                           **{f"model.{k}": v for k, v in model_keys.items()}})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():  # the modern recipe zero-initialises projections and head: give them weights
        for p in model.parameters():
            if p.ndim == 2 and not p.abs().sum():
                p.normal_(0.0, 0.02)
    return model


def _documents(B: int, T: int) -> torch.Tensor:
    """doc (B, T): rows cut into documents of 1 to 12 tokens (every row has boundaries)."""
    gen = torch.Generator().manual_seed(1)
    starts = torch.rand(B, T, generator=gen) < 0.2
    starts[:, 0] = True
    return torch.cumsum(starts.long(), dim=1) - 1


@pytest.mark.parametrize("recipe,keys", [("classic", {}), ("modern", {}), ("modern", {"doc_mask": True}),
                                         ("classic", {"activation_checkpointing": True}), ("modern", "fp8")],
                         ids=["classic", "modern", "doc_mask", "activation_checkpointing", "fp8"])
def test_forward_compiles_without_graph_breaks(recipe, keys, monkeypatch):
    model = _debug_model(recipe, **(keys if isinstance(keys, dict) else {}))
    if keys == "fp8":
        from dist_gpt.parallel import fp8

        monkeypatch.setenv(fp8.EMULATE_ENV, "1")
        assert fp8.convert(model) == 4 * model.cfg.n_layer  # qkv, proj, fc, proj of every block
    x = torch.randint(0, 256, (2, model.cfg.block_size))
    args = (x, x, _documents(2, model.cfg.block_size)) if model.cfg.doc_mask else (x, x)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*args)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_flex_path_equals_sdpa_in_evaluation_and_sampling_on_cpu(paragraphs):  # noqa: F811
    """The block mask and mask function the CUDA path builds, run by FlexAttention's compiled forward,
    against the boolean (B, 1, T, T) mask of SDPA: validation loss over real document batches, the
    logits, and greedy sampling without a KV cache (each step a fresh forward through the mask), with
    FlexAttention compiled on its own (doc_mask.flex). Inside a whole compiled model, inductor's CPU
    (C++) FlexAttention template fails to build this mask function under torch 2.13 (an undeclared
    `cur_qSplitSize` in the generated code); on CUDA that template is Triton's, so the CPU cannot
    prove that combination."""
    from dist_gpt.data import Dataset, ValBlocks
    from dist_gpt.training.evaluator import validation_loss

    model = _debug_model("classic", doc_mask=True).eval()
    val = ValBlocks(Dataset.open(paragraphs), block_size=model.cfg.block_size, batch_size=8, max_blocks=16,
                    documents=True)
    x = torch.randint(0, 256, (4, model.cfg.block_size))
    doc = _documents(4, model.cfg.block_size)
    prompt = torch.tensor([[10, 65, 66, 10, 67, 68, 69, 10, 70]])  # three documents, "\n" (10) starting each

    def run(m):
        with torch.no_grad():
            loss, blocks = validation_loss(m, val, torch.autocast("cpu", enabled=False))
            logits = m(x, None, doc)
        tokens = model.generate(prompt, 12, temperature=0.0, eot_id=10, use_cache=False)
        return loss, blocks, logits, tokens

    sdpa = run(model)
    assert not doc_mask.flex_usable(torch.device("cpu"), 0.0, model.cfg.head_size)
    with doc_mask.flex_on_cpu(), torch.no_grad():
        assert doc_mask.flex_usable(torch.device("cpu"), 0.0, model.cfg.head_size)
        assert not isinstance(model._mask(doc, None), torch.Tensor)  # a BlockMask: the CUDA path
        flex = run(model)
    assert sdpa[1] == flex[1] == 16
    assert math.isclose(flex[0], sdpa[0], rel_tol=1e-5)
    torch.testing.assert_close(flex[2], sdpa[2], rtol=1e-5, atol=1e-5)
    assert torch.equal(flex[3], sdpa[3])


def _close(got: dict[int, float], want: dict[int, float], steps: int) -> None:
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for s in want:
        assert math.isclose(got[s], want[s], rel_tol=RTOL), (s, got[s], want[s])


def test_compiled_training_matches_eager_and_resumes_compiled(paragraphs, tmp_path):  # noqa: F811
    """One process, the modern recipe with documents (the CPU path's boolean mask), activation
    checkpointing, eval.tasks and sampling: 20 compiled steps, stopped at 10 and resumed compiled,
    equal the eager run's losses within 1e-4; so do the validation loss and the task scores."""
    tasks = tmp_path / "mc.jsonl"  # short enough for the debug preset's context of 32 bytes
    tasks.write_text("".join(json.dumps({"context": c, "endings": e, "label": 0}) + "\n" for c, e in [
        ("the software is provided ", ["as is", "for free", "by us"]),
        ("permission is hereby ", ["granted", "refused", "taken"]),
        ("all rights ", ["reserved", "lost", "given"]),
        ("licensed under the ", ["apache license", "green sky", "old tree"])]))
    args = [*EXACT, "--recipe", "modern", "--model.doc_mask=true", "--model.activation_checkpointing=true",
            f"--data.path={paragraphs}", f"--eval.tasks={tasks}", "--eval.sample_tokens=16",
            "--checkpoint.interval=10", "--train.threads=1"]  # one thread: two stall on a busy machine
    eager = tmp_path / "eager"
    run_train([*args, "--train.steps=20", f"--train.run_dir={eager}"], timeout=LONG)
    run = tmp_path / "compiled"
    # stopped by a signal after step 10 (the same 20-step LR schedule), then the requeued run resumes
    first = run_train([*args, "--train.steps=20", "--train.compile=true", f"--train.run_dir={run}"], timeout=LONG,
                      env={"DIST_GPT_FAULT_SIGNAL_AT": "9:SIGUSR1"})
    assert json.loads((run / "requeue.json").read_text())["step"] == 10
    second = run_train([*args, "--train.steps=20", "--train.compile=true", f"--train.run_dir={run}"], timeout=LONG)
    assert "compile on" in first.stdout and "compile on" in second.stdout and "compile off" not in second.stdout
    assert "resumed from" in second.stdout and "at step 10" in second.stdout
    assert json.loads((run / "run.json").read_text())["compile"] is True  # the resumed process's record
    _close(losses(run), losses(eager), 20)
    assert math.isclose(final(run)["val_loss"], final(eager)["val_loss"], rel_tol=RTOL)
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the task scores come from the same model at every evaluation (a text sample is drawn there too;
    # TensorBoard is off in EXACT, so it is only drawn, through the compiled run's raw model)
    scores = {r["step"]: r["val/mc/acc_norm"] for r in evals if "val/mc/acc_norm" in r}
    want = {r["step"]: r["val/mc/acc_norm"]
            for r in map(json.loads, (eager / "metrics.jsonl").read_text().splitlines()) if "val/mc/acc_norm" in r}
    assert {0, 20} <= set(scores) <= set(want) and scores == {s: want[s] for s in scores}


@pytest.mark.slow
@pytest.mark.parametrize("layout,nproc", [("ddp", 2), ("fsdp", 2), ("hsdp", 4)])
def test_compiled_layouts_match_eager(layout, nproc, tiny_data, tmp_path):
    """ddp and fsdp on 2 ranks, hsdp on 4 (2 shard groups of 2), classic recipe, compiled, with
    sampling: 20 steps within 1e-4 of one eager process on the same global batch (1, 2 and 4 ranks
    sum gradients in different orders: ~1e-7 apart, docs/SCALING.md)."""
    args = [*EXACT, "--recipe", "classic", f"--data.path={tiny_data}", "--eval.sample_tokens=8",
            "--checkpoint.interval=0"]
    eager = tmp_path / "eager"
    run_train([*args, f"--train.run_dir={eager}"], timeout=LONG)
    run = tmp_path / layout
    extra = ["--parallel.shard_size=2"] if layout == "hsdp" else []
    out = run_train([*args, "--train.compile=true", f"--parallel.data={layout}", *extra, f"--train.run_dir={run}"],
                    nproc=nproc, timeout=LONG)
    assert "compile on" in out.stdout
    _close(losses(run), losses(eager), 20)
    assert math.isclose(final(run)["val_loss"], final(eager)["val_loss"], rel_tol=RTOL)
