"""Layouts (parallel.data = ddp | fsdp | hsdp) on gloo: the same losses as one process, checkpoints
that resume under any other layout, a meta-device build with the unsharded weights, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import EXACT, REPO, _env, final, losses, run_train

STEPS = 10


def _args(data, run, *extra):
    return [*EXACT, f"--data.path={data}", f"--train.run_dir={run}", f"--train.steps={STEPS}",
            "--eval.interval=0", "--eval.at_start=false", *extra]


def _worst(got: dict, ref: dict, steps) -> float:
    return max(abs(got[s] - ref[s]) / abs(ref[s]) for s in steps)


@pytest.fixture(scope="module")
def classic_ref(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    run_train(_args(tiny_data, run, "--recipe", "classic"))
    return losses(run)


@pytest.mark.parametrize("nproc, layout", [(2, ["--parallel.data=fsdp"]),
                                           (4, ["--parallel.data=hsdp", "--parallel.shard_size=2"])])
def test_sharded_layouts_match_one_process(tiny_data, tmp_path, classic_ref, nproc, layout):
    run = tmp_path / "run"
    out = run_train(_args(tiny_data, run, "--recipe", "classic", *layout), nproc=nproc)
    worst = _worst(losses(run), classic_ref, range(1, STEPS + 1))
    print(f"{' '.join(layout)} on {nproc} ranks vs one process over {STEPS} steps: {worst:.2e}")
    assert worst < 1e-5
    assert "layout fsdp over 2 ranks" in out.stdout or "layout hsdp 2 × 2" in out.stdout


# ddp-2 -> fsdp-4 -> ddp-1 -> fsdp-2 -> hsdp-2x2: every hand-over of the matrix
# (ddp-2 -> fsdp-4, fsdp-4 -> ddp-1, fsdp-2 -> hsdp-2x2) in one run, two steps per layout.
CHAIN = [(2, "ddp"), (4, "fsdp"), (1, "ddp"), (2, "fsdp"), (4, "hsdp")]


@pytest.mark.slow
def test_a_modern_run_handed_across_every_layout_continues_the_uninterrupted_one(tiny_data, tmp_path):
    """The modern recipe (Muon for the block matrices, AdamW for the rest): each layout resumes the
    checkpoint the previous one saved when a SIGTERM stopped it, Muon's momentum and the data
    stream included, and the losses stay within 1e-5 of a run that never stopped."""
    modern = ("--recipe", "modern", "--train.micro_batch=2")  # divides the global batch of 8 on 1, 2, 4 ranks
    ref = tmp_path / "ref"
    run_train(_args(tiny_data, ref, *modern))
    run = tmp_path / "run"
    for i, (nproc, layout) in enumerate(CHAIN):
        extra = [f"--parallel.data={layout}", *(["--parallel.shard_size=2"] if layout == "hsdp" else [])]
        env = {} if i == len(CHAIN) - 1 else {"DIST_GPT_FAULT_SIGNAL_AT": f"{2 * i + 1}:SIGTERM"}  # saved after step 2i+2
        out = run_train(_args(tiny_data, run, *modern, *extra), nproc=nproc, env=env)
        if i < len(CHAIN) - 1:
            marker = json.loads((run / "requeue.json").read_text())
            assert marker["step"] == 2 * i + 2, (marker, out.stdout[-2000:])
        if i > 0:
            assert f"resumed from {run / 'checkpoints' / f'step_{2 * i:07d}'}" in out.stdout, out.stdout[-2000:]
    got, want = losses(run), losses(ref)
    worst = _worst(got, want, range(1, STEPS + 1))
    print(f"modern run across {' -> '.join(f'{l}-{n}' for n, l in CHAIN)} (hsdp 2 x 2): largest relative loss difference {worst:.2e}")
    assert worst < 1e-5


@pytest.mark.parametrize("layout", ["fsdp", "hsdp"])
def test_meta_device_build_gives_each_rank_its_share_of_the_unsharded_weights(tmp_path, layout):
    nproc = 2 if layout == "fsdp" else 4
    # the second model's rows do not all divide by the shard size (n_embd 33: the projections have 33 rows)
    for extra in (["tie_embeddings=true"], ["tie_embeddings=false", "zero_init=true", "bias=true", "qkv_bias=true",
                                         "n_embd=33", 'positions="learned"']):
        for f in tmp_path.glob("rank*.json"):
            f.unlink()
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={nproc}", str(REPO / "tests" / "parallel_worker.py"),
                               str(tmp_path), layout, *extra], capture_output=True, text=True, env=_env(),
                              cwd=REPO, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for rank in range(nproc):
            got = json.loads((tmp_path / f"rank{rank}.json").read_text())
            assert got["checked"] > 10 and got["mismatched"] == [], (extra, rank, got)
            assert got["tied"] == (extra[0] == "tie_embeddings=true")


def test_a_layout_that_cannot_work_is_one_line(tiny_data, tmp_path):
    out = run_train(_args(tiny_data, tmp_path / "run", "--parallel.data=hsdp", "--parallel.shard_size=3"),
                    nproc=2, check=False)
    ranks = out.stderr.split("Traceback (most recent call last):")[0]
    errors = [ln for ln in ranks.splitlines() if "error:" in ln]
    assert out.returncode != 0 and len(errors) == 1, out.stderr[-2000:]
    assert "parallel.shard_size=3 does not divide the world size 2" in errors[0]
    out = run_train(_args(tiny_data, tmp_path / "run", "--parallel.data=zero3"), check=False)
    assert out.returncode == 2 and "parallel.data must be one of ddp | fsdp | hsdp" in out.stderr


def test_an_fsdp_run_is_evaluated_sampled_and_exported_in_one_process(tiny_data, tmp_path):
    run = tmp_path / "run"
    run_train(_args(tiny_data, run, "--parallel.data=fsdp", "--recipe", "classic", "--train.steps=3"), nproc=2)
    one = run_train(["--run", str(run)], module="dist_gpt.evaluate")
    assert "val loss" in one.stdout
    out = run_train(["--run", str(run), "--prompt", "The ", "--max-new-tokens", "10", "--temperature", "0"],
                    module="dist_gpt.sample")
    assert out.stdout.startswith("The ")
    exported = tmp_path / "model.safetensors"
    run_train(["--checkpoint", final(run)["checkpoint"], "--out", str(exported)], module="dist_gpt.export")
    again = run_train(["--model", str(exported), "--prompt", "The ", "--max-new-tokens", "10", "--temperature", "0"],
                      module="dist_gpt.sample")
    assert again.stdout == out.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_fsdp_on_a_gpu_gathers_bf16_parameters_and_keeps_fp32_gradients(tmp_path):
    """The GPU mixed-precision policy (never run on this project's CPU machines): under fsdp with
    precision bf16, blocks compute with bf16 parameters while the shards and their gradients stay fp32."""
    import torch
    import torch.distributed as tdist

    from dist_gpt import config
    from dist_gpt.parallel import dist
    from dist_gpt.model.gpt import GPT

    tdist.init_process_group("nccl", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        env = dist.DistEnv(device=torch.device("cuda", 0), backend="nccl")
        cfg = config.build("debug", overrides={"parallel.data": "fsdp"})
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("shard",))
        with torch.device("meta"):
            model = GPT(cfg.model)
        dist.parallelize(model, env, cfg.parallel, mesh, dist.Transforms(precision="bf16"))
        dist.materialize(model, env.device)
        seen = []
        model.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
        idx = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.block_size), device="cuda")
        model(idx, idx).backward()
        assert seen == [torch.bfloat16]
        for p in model.parameters():
            assert p.to_local().dtype == torch.float32 and p.grad.to_local().dtype == torch.float32
    finally:
        tdist.destroy_process_group()
