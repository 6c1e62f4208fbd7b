"""How exactly dist_gpt computes Hugging Face models, at real model shapes (numbers for docs/INTEROP.md).

    python -m bench.hf_parity                  # GPT-2 small, Qwen3-0.6B and Llama-GQA shapes, both ways
    python -m bench.hf_parity --tokens 128     # shorter sequences (faster)

Import: a transformers model of each shape, with transformers' own random initialisation plus
noise of std 0.02 on every parameter (so norms and biases are not trivial), saved with
save_pretrained, read by dist_gpt.convert.hf and compared with transformers in fp32 on 2 random sequences:
the largest |logit difference|, the largest logit (for scale) and whether greedy generation of 32
tokens through dist_gpt's KV cache equals transformers' generate. Export: the same for
dist_gpt's gpt2-124m preset in both recipes (GPT-2 and Qwen3), initialised with noise likewise,
plus whether export -> import gives back every tensor bit for bit. Needs transformers; no network.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dist_gpt import config as config_mod
from dist_gpt.convert.hf.export import write_export
from dist_gpt.model.gpt import GPT
from dist_gpt.convert.weights import LoadedWeights, load_weights


def noisy(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.float().eval()


def hf_shapes():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    yield "GPT-2 small (12 x 768, 124M)", lambda: GPT2LMHeadModel(GPT2Config())
    yield "Qwen3-0.6B shape (28 x 1024, 16 q / 8 kv heads of 128)", lambda: Qwen3ForCausalLM(Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=True))
    yield "Llama GQA (16 x 1024, 16 q / 4 kv heads)", lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=4096, rope_theta=5e5, rms_norm_eps=1e-5))


def compare(ours: GPT, theirs, tokens: int) -> str:
    idx = torch.randint(0, ours.cfg.vocab_size, (2, tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(idx), theirs(idx).logits
    theirs.generation_config.eos_token_id = None
    prompt = idx[:, :8]
    same = torch.equal(ours.generate(prompt, 32, temperature=0),
                       theirs.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0))
    return (f"max |Δlogit| {(a - b).abs().max().item():.2e} (max |logit| {b.abs().max().item():.1f}), "
            f"greedy 32 tokens equal: {same}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=256, help="sequence length compared (default 256)")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, 2 x {args.tokens} tokens")
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in hf_shapes():
            t = time.perf_counter()
            theirs = noisy(build())
            theirs.save_pretrained(Path(tmp) / "in")
            loaded = load_weights(Path(tmp) / "in")
            ours = GPT(loaded.config)
            ours.load_state_dict(loaded.state_dict)
            del loaded
            print(f"import {name}: {compare(ours.eval(), theirs, args.tokens)} [{time.perf_counter() - t:.0f} s]")
            del theirs, ours
        for recipe in ("classic", "modern"):
            t = time.perf_counter()
            cfg = config_mod.build("gpt2-124m", overrides={"train.recipe": recipe}).model
            ours = noisy(GPT(cfg))
            loaded = LoadedWeights(cfg, ours.state_dict(), Path("bench"), None, None, {})
            out = Path(tmp) / f"out-{recipe}"
            write_export(loaded, None, None, out, force=False)
            theirs = AutoModelForCausalLM.from_pretrained(out).eval()
            back = load_weights(out).state_dict
            exact = back.keys() == loaded.state_dict.keys() and all(torch.equal(back[k], v)
                                                                     for k, v in loaded.state_dict.items())
            print(f"export gpt2-124m {recipe} as {type(theirs).__name__}: {compare(ours, theirs, args.tokens)}, "
                  f"round trip bit-exact: {exact} [{time.perf_counter() - t:.0f} s]")
            del theirs, ours, loaded, back


if __name__ == "__main__":
    main()
