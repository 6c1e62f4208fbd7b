"""Run under torchrun by tests/test_parallel.py: a GPT built on the meta device, sharded with FSDP2 and
initialised one parameter at a time must hold, on every rank, exactly its share of the weights an
unsharded build with the same seed has.

    torchrun --standalone --nproc_per_node=2 tests/parallel_worker.py OUT_DIR fsdp|hsdp [model.key=value ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_gpt import config  # noqa: E402
from dist_gpt.parallel import dist  # noqa: E402
from dist_gpt.model.gpt import GPT  # noqa: E402
from dist_gpt.training.trainer import build_model  # noqa: E402


def main() -> None:
    out, layout, extra = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    env = dist.init("cpu", threads=1)
    overrides = {"parallel.data": layout, "parallel.shard_size": 2 if layout == "hsdp" else None}
    overrides |= {f"model.{k}": json.loads(v) for k, v in (kv.split("=", 1) for kv in extra)}
    cfg = config.build("debug", overrides=overrides)
    torch.manual_seed(cfg.train.seed)
    torch.randn(3)  # whatever drew before the model draws the same on both builds
    model, _, _ = build_model(cfg, env, "fp32")
    torch.manual_seed(cfg.train.seed)
    torch.randn(3)
    whole = GPT(cfg.model)
    reference = dict(whole.named_parameters())
    mismatched, checked = [], 0
    for name, param in model.named_parameters():
        local = param.to_local()
        # this rank's rows: FSDP2 shards dim 0 like torch.chunk over the shard dimension of the mesh
        mesh = param.device_mesh
        shard = mesh.size(mesh.ndim - 1)
        coord = mesh.get_local_rank(mesh.ndim - 1)
        expect = reference[name].detach().chunk(shard, dim=0)
        expect = expect[coord] if coord < len(expect) else reference[name][:0]
        checked += 1
        if local.shape != expect.shape or not torch.equal(local, expect):
            mismatched.append(name)
        if local.numel() == reference[name].numel() and shard > 1 and reference[name].size(0) > 1:
            mismatched.append(f"{name} (whole on one rank)")
    (out / f"rank{env.rank}.json").write_text(json.dumps({"checked": checked, "mismatched": mismatched,
                                                          "tied": model.head.weight is model.tok_emb.weight}))
    dist.shutdown(0)


if __name__ == "__main__":
    main()
