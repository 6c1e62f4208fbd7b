"""Llama, Qwen2 and Qwen3 (`model_type: llama | qwen2 | qwen3`) <-> dist_gpt: the modern architectures.

    HF tensor                                             dist_gpt tensor
    model.embed_tokens.weight (V, C)                      tok_emb.weight
    model.layers.{i}.input_layernorm.weight               blocks.{i}.norm1.weight
    ...self_attn.q_proj (H*D, C), k_proj, v_proj (K*D, C) blocks.{i}.attn.qkv.weight ((H+2K)*D, C) = [q; k; v]
    ...self_attn.{q,k,v}_proj.bias                        blocks.{i}.attn.qkv.bias
    ...self_attn.q_norm.weight, k_norm.weight (D,)        blocks.{i}.attn.q_norm.weight, k_norm.weight  [qwen3]
    ...self_attn.o_proj.weight (C, H*D), .bias            blocks.{i}.attn.proj.weight, .bias
    ...post_attention_layernorm.weight                    blocks.{i}.norm2.weight
    ...mlp.gate_proj (F, C), up_proj (F, C), .bias        blocks.{i}.mlp.fc.weight (2F, C) = [gate; up], .bias
    ...mlp.down_proj (C, F), .bias                        blocks.{i}.mlp.proj.weight, .bias
    model.norm.weight                                     norm_f.weight
    lm_head.weight (untied only)                          head.weight

All three are pre-norm RMSNorm blocks with rotary positions in the half-split layout dist_gpt uses
(HF's checkpoints are already permuted into it), grouped-query attention when K < H, and a SwiGLU
MLP (hidden_act silu: down(silu(gate x) * up x), dist_gpt's fc rows [gate; value]). Qwen3 adds a
per-head RMSNorm of queries and keys before the rotation, as dist_gpt's qk_norm. Biases: Llama's
attention_bias covers q, k, v and o, mlp_bias the MLP; Qwen2 has q, k, v biases only; Qwen3
q, k, v and o with attention_bias. dist_gpt's model.bias (output projection, MLP) and qkv_bias
map onto those, with zeros where one side has a bias the other lacks.

A dist_gpt ReLU² MLP exports exactly as a gated MLP with hidden_act relu and gate = up:
relu(z) * z = relu(z)^2 for every z.
"""

from __future__ import annotations

from dist_gpt.errors import CheckpointError, ConfigError
from dist_gpt.model.gpt import GPTConfig
from .files import config_int
from .links import Link

MODEL_TYPES = ("llama", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Tensors older files hold that are not weights: the rotary tables.
BUFFERS = (".rotary_emb.inv_freq",)


def rope_base(hf: dict, where: str) -> float:
    """The rotary base of a config.json written by transformers 4 (rope_theta, rope_scaling) or 5
    (rope_parameters). Scaled variants (linear, dynamic, yarn, llama3, ...) are refused by name."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise CheckpointError(f"{where}: rope scaling {kind!r} is not supported: dist_gpt computes plain rotary "
                              "positions (rope_type default) only")
    if float(hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))) != 1.0:
        raise CheckpointError(f"{where}: partial_rotary_factor={hf.get('partial_rotary_factor')} is not supported: "
                              "dist_gpt rotates every channel of a head")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def biases(model_type: str, hf: dict) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o_proj bias, MLP bias) of an HF config."""
    attention = bool(hf.get("attention_bias", False))
    if model_type == "qwen2":
        return True, False, False
    return attention, attention, model_type == "llama" and bool(hf.get("mlp_bias", False))


def config_from_hf(hf: dict, where: str, relu2_ok: bool = False) -> GPTConfig:
    """The GPTConfig of a Llama/Qwen2/Qwen3 config.json (refusing what dist_gpt does not compute)."""
    model_type = hf["model_type"]
    if hf.get("use_sliding_window") or (model_type == "llama" and hf.get("sliding_window")):
        raise CheckpointError(f"{where}: sliding-window attention (use_sliding_window) is not supported: "
                              "dist_gpt attends to the whole context")
    act = hf.get("hidden_act", "silu")
    if act == "relu" and relu2_ok:
        mlp = "relu2"
    elif act == "silu":
        mlp = "swiglu"
    else:
        raise CheckpointError(f"{where}: hidden_act={act!r} is not supported: dist_gpt's gated MLP is SwiGLU "
                              "(hidden_act silu)")
    n_embd, n_head = config_int(hf, "hidden_size", where), config_int(hf, "num_attention_heads", where)
    qkv_bias, o_bias, mlp_bias = biases(model_type, hf)
    return GPTConfig(vocab_size=config_int(hf, "vocab_size", where), block_size=config_int(hf, "max_position_embeddings", where),
                     n_layer=config_int(hf, "num_hidden_layers", where), n_head=n_head, n_embd=n_embd,
                     n_kv_head=hf.get("num_key_value_heads") or n_head, head_dim=hf.get("head_dim") or n_embd // n_head,
                     mlp_hidden=config_int(hf, "intermediate_size", where), mlp=mlp, norm="rmsnorm",
                     norm_eps=float(hf.get("rms_norm_eps", 1e-6)), positions="rope", rope_base=rope_base(hf, where),
                     qk_norm=model_type == "qwen3", bias=o_bias or mlp_bias, qkv_bias=qkv_bias, head_bias=False,
                     tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def expressible(cfg: GPTConfig) -> str | None:
    """Why neither Llama nor Qwen3 computes this model (the option named), or None."""
    if cfg.norm != "rmsnorm":
        return f"model.norm={cfg.norm} with rotary positions (Llama and Qwen3 have RMSNorm)"
    if cfg.mlp not in ("swiglu", "relu2"):
        return f"model.mlp={cfg.mlp} with rotary positions (Llama's and Qwen3's MLP is gated: swiglu or relu2 only)"
    if cfg.head_bias:
        return "model.head_bias=true (Llama's and Qwen3's head has no bias)"
    if cfg.qk_norm and cfg.bias:
        return "model.bias=true with model.qk_norm=true (Qwen3's MLP has no bias)"
    if not cfg.qk_norm and cfg.n_embd % cfg.n_head:
        return f"model.n_head={cfg.n_head} (Llama needs n_embd={cfg.n_embd} to be a multiple of it)"
    return None


def config_to_hf(cfg: GPTConfig) -> dict:
    why = expressible(cfg)
    if why:
        raise ConfigError(f"{why}: no Hugging Face architecture computes this model exactly")
    model_type = "qwen3" if cfg.qk_norm else "llama"
    hf = {
        "model_type": model_type, "architectures": [ARCHITECTURES[model_type]],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden_size,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
        "hidden_act": "silu" if cfg.mlp == "swiglu" else "relu",
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.eps,
        # transformers 5 reads rope_parameters; transformers 4 and vLLM read rope_theta
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base}, "rope_theta": cfg.rope_base,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": cfg.dropout,
        "initializer_range": cfg.init_std,
    }
    if model_type == "llama":
        hf |= {"attention_bias": cfg.qkv_bias or cfg.bias, "mlp_bias": cfg.bias}
    else:
        hf |= {"attention_bias": cfg.qkv_bias, "use_sliding_window": False, "sliding_window": None,
               "max_window_layers": cfg.n_layer, "layer_types": ["full_attention"] * cfg.n_layer}
    return hf


def links(cfg: GPTConfig, hf: dict, names) -> list[Link]:
    """The Llama/Qwen <-> dist_gpt tensor links for `cfg` and the HF config `hf`."""
    H, K, D, C, F = cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.n_embd, cfg.hidden_size
    has_qkv_bias, has_o_bias, has_mlp_bias = biases(hf["model_type"], hf)

    def bias(ours: str, theirs: tuple[str, ...], sizes: tuple[int, ...], ours_has: bool, theirs_has: bool) -> list[Link]:
        if ours_has and theirs_has:
            return [Link(ours, theirs, rows=sizes)]
        if ours_has:
            return [Link(ours, ())]
        if theirs_has:
            return [Link(None, (name,), shape=(size,)) for name, size in zip(theirs, sizes)]
        return []

    out = [Link("tok_emb.weight", ("model.embed_tokens.weight",))]
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        qkv = tuple(h + f"self_attn.{x}_proj" for x in "qkv")
        out += [Link(b + "norm1.weight", (h + "input_layernorm.weight",)),
                Link(b + "attn.qkv.weight", tuple(n + ".weight" for n in qkv), rows=(H * D, K * D, K * D))]
        out += bias(b + "attn.qkv.bias", tuple(n + ".bias" for n in qkv), (H * D, K * D, K * D),
                    cfg.qkv_bias, has_qkv_bias)
        if cfg.qk_norm:
            out += [Link(b + "attn.q_norm.weight", (h + "self_attn.q_norm.weight",)),
                    Link(b + "attn.k_norm.weight", (h + "self_attn.k_norm.weight",))]
        out.append(Link(b + "attn.proj.weight", (h + "self_attn.o_proj.weight",)))
        out += bias(b + "attn.proj.bias", (h + "self_attn.o_proj.bias",), (C,), cfg.bias, has_o_bias)
        out.append(Link(b + "norm2.weight", (h + "post_attention_layernorm.weight",)))
        gate_up = (h + "mlp.gate_proj", h + "mlp.up_proj")
        relu2 = cfg.mlp == "relu2"
        out.append(Link(b + "mlp.fc.weight", tuple(n + ".weight" for n in gate_up), same=relu2))
        if relu2 and cfg.bias and has_mlp_bias:
            out.append(Link(b + "mlp.fc.bias", tuple(n + ".bias" for n in gate_up), same=True))
        else:
            out += bias(b + "mlp.fc.bias", tuple(n + ".bias" for n in gate_up), (F, F), cfg.bias, has_mlp_bias)
        out.append(Link(b + "mlp.proj.weight", (h + "mlp.down_proj.weight",)))
        out += bias(b + "mlp.proj.bias", (h + "mlp.down_proj.bias",), (C,), cfg.bias, has_mlp_bias)
    out.append(Link("norm_f.weight", ("model.norm.weight",)))
    if not cfg.tie_embeddings:
        out.append(Link("head.weight", ("lm_head.weight",)))
    return out

