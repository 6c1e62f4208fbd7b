"""GPT-2 (`model_type: gpt2`, GPT2LMHeadModel) <-> dist_gpt: the classic recipe's architecture.

    HF tensor (Conv1D weights are stored (in, out))      dist_gpt tensor
    wte.weight (V, C)                                     tok_emb.weight
    wpe.weight (n_positions, C)                           pos_emb.weight
    h.{i}.ln_1.weight, .bias                              blocks.{i}.norm1.weight, .bias
    h.{i}.attn.c_attn.weight (C, 3C), .bias (3C,)         blocks.{i}.attn.qkv.weight (3C, C) transposed, .bias
    h.{i}.attn.c_proj.weight (C, C), .bias                blocks.{i}.attn.proj.weight transposed, .bias
    h.{i}.ln_2.weight, .bias                              blocks.{i}.norm2.weight, .bias
    h.{i}.mlp.c_fc.weight (C, 4C), .bias                  blocks.{i}.mlp.fc.weight transposed, .bias
    h.{i}.mlp.c_proj.weight (4C, C), .bias                blocks.{i}.mlp.proj.weight transposed, .bias
    ln_f.weight, .bias                                    norm_f.weight, .bias
    lm_head.weight (untied only)                          head.weight

Names may carry a `transformer.` prefix (GPT2LMHeadModel) or not (the original files, saved from
GPT2Model). GPT-2 has every bias; a dist_gpt model without them exports zeros. c_attn's output
columns are [q | k | v], each split into heads like dist_gpt's qkv rows.
"""

from __future__ import annotations

from dist_gpt.errors import CheckpointError, ConfigError
from dist_gpt.model.gpt import GPTConfig
from .files import config_int
from .links import Link

MODEL_TYPES = ("gpt2",)
# HF activation_function -> model.mlp. gelu_new, gelu_fast and gelu_pytorch_tanh are the same tanh
# formula (different rounding); gelu and gelu_python the exact erf GELU.
ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "relu2": "relu2"}
# model.mlp -> activation_function: the one transformers computes with the same torch call.
EXPORTED_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "relu2": "relu2"}
# Tensors GPT-2 files may hold that are not weights: the causal-mask buffers of old files.
BUFFERS = (".attn.bias", ".attn.masked_bias")


def config_from_hf(hf: dict, where: str, relu2_ok: bool = False) -> GPTConfig:
    """The GPTConfig of a GPT-2 config.json (refusing the variants dist_gpt does not compute)."""
    for key, plain in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("add_cross_attention", False)):
        if hf.get(key, plain) != plain:
            raise CheckpointError(f"{where}: {key}={hf[key]} is not supported (dist_gpt computes GPT-2 with "
                                  f"{key}={plain})")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{where}: activation_function={act!r} is not supported: dist_gpt imports "
                              f"{', '.join(ACTIVATIONS)}")
    return GPTConfig(vocab_size=config_int(hf, "vocab_size", where), block_size=config_int(hf, "n_positions", where),
                     n_layer=config_int(hf, "n_layer", where), n_head=config_int(hf, "n_head", where),
                     n_embd=config_int(hf, "n_embd", where), mlp_hidden=hf.get("n_inner"), mlp=ACTIVATIONS[act],
                     norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), positions="learned",
                     bias=True, qkv_bias=True, head_bias=False, tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def expressible(cfg: GPTConfig) -> str | None:
    """Why GPT-2 cannot compute this model (the option named), or None when it can."""
    if cfg.norm != "layernorm":
        return f"model.norm={cfg.norm} with learned positions (GPT-2 has LayerNorm)"
    if cfg.qk_norm:
        return "model.qk_norm=true with learned positions (GPT-2 has no query/key norm)"
    if cfg.mlp not in EXPORTED_ACTIVATIONS:
        return f"model.mlp={cfg.mlp} with learned positions (GPT-2's MLP is not gated)"
    if cfg.head_size * cfg.n_head != cfg.n_embd:
        return f"model.head_dim={cfg.head_dim} (GPT-2's heads are n_embd / n_head = {cfg.n_embd / cfg.n_head:g} wide)"
    if cfg.kv_heads != cfg.n_head:
        return f"model.n_kv_head={cfg.n_kv_head} (GPT-2 has no grouped-query attention)"
    if cfg.head_bias:
        return "model.head_bias=true (GPT-2's head has no bias)"
    return None


def config_to_hf(cfg: GPTConfig) -> dict:
    why = expressible(cfg)
    if why:
        raise ConfigError(f"{why}: no Hugging Face architecture computes this model exactly")
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.hidden_size,
        "activation_function": EXPORTED_ACTIVATIONS[cfg.mlp], "layer_norm_epsilon": cfg.eps,
        "tie_word_embeddings": cfg.tie_embeddings, "scale_attn_weights": True,
        # dist_gpt drops out attention weights and each residual branch, never the embeddings
        "attn_pdrop": cfg.dropout, "resid_pdrop": cfg.dropout, "embd_pdrop": 0.0,
        "initializer_range": cfg.init_std,
    }


def links(cfg: GPTConfig, hf: dict, names) -> list[Link]:
    """The GPT-2 <-> dist_gpt tensor links; `names` holds the file's tensor names (None: exporting)."""
    p = "transformer." if names is None or "transformer.wte.weight" in names else ""
    C, hidden = cfg.n_embd, cfg.hidden_size

    def bias(ours: str, theirs: str, size: int, present: bool) -> Link:
        return Link(ours, (theirs,)) if present else Link(None, (theirs,), shape=(size,))

    out = [Link("tok_emb.weight", (f"{p}wte.weight",)), Link("pos_emb.weight", (f"{p}wpe.weight",))]
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"{p}h.{i}."
        out += [
            Link(b + "norm1.weight", (h + "ln_1.weight",)), bias(b + "norm1.bias", h + "ln_1.bias", C, cfg.bias),
            Link(b + "attn.qkv.weight", (h + "attn.c_attn.weight",), transpose=True),
            bias(b + "attn.qkv.bias", h + "attn.c_attn.bias", 3 * C, cfg.qkv_bias),
            Link(b + "attn.proj.weight", (h + "attn.c_proj.weight",), transpose=True),
            bias(b + "attn.proj.bias", h + "attn.c_proj.bias", C, cfg.bias),
            Link(b + "norm2.weight", (h + "ln_2.weight",)), bias(b + "norm2.bias", h + "ln_2.bias", C, cfg.bias),
            Link(b + "mlp.fc.weight", (h + "mlp.c_fc.weight",), transpose=True),
            bias(b + "mlp.fc.bias", h + "mlp.c_fc.bias", hidden, cfg.bias),
            Link(b + "mlp.proj.weight", (h + "mlp.c_proj.weight",), transpose=True),
            bias(b + "mlp.proj.bias", h + "mlp.c_proj.bias", C, cfg.bias),
        ]
    out += [Link("norm_f.weight", (f"{p}ln_f.weight",)), bias("norm_f.bias", f"{p}ln_f.bias", C, cfg.bias)]
    if not cfg.tie_embeddings:
        out.append(Link("head.weight", ("lm_head.weight",)))
    return out

