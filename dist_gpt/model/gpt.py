"""A decoder-only GPT: the network only. It knows nothing of torch.distributed, data or optimizers.

    from dist_gpt.model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=256, block_size=256))
    logits = model(idx)               # idx (B, T) int64 -> (B, T, V) float32
    loss = model(idx, targets)        # scalar mean cross-entropy in fp32, ignore_index=-1
    loss = model(idx, targets, doc)   # doc (B, T): attention stays inside each document (doc_mask.py)
    out = model.generate(idx, 100, temperature=0.8, top_k=50)   # (B, T + <=100)
    for tok in model.stream(idx, 100): print(decode(tok[0].tolist()), end="")

The defaults are the classic GPT-2 / nanoGPT recipe (pre-norm, LayerNorm, learned positions, GELU,
tied embeddings). Options cover the modern small-model recipe (rotary positions, RMSNorm, QK-norm,
ReLU^2, zero-initialised output projections, logit soft-capping), the original notebook's exact
model (post-norm, ReLU, biases on the attention output, MLP, norms and head, 20 heads of 19 = 380
wide projected back to 384, untied embeddings), and what imported Hugging Face models need
(grouped-query attention, tanh GELU, SwiGLU, the file's norm epsilon; see dist_gpt/convert/hf/).

Parameter names are a contract (the notebook importer, the Muon grouping and checkpoints use them):
    tok_emb.weight (V, C)                     pos_emb.weight (block_size, C)  [learned positions only]
    blocks.{i}.norm1.weight [+ .bias]         blocks.{i}.norm2.weight [+ .bias]
    blocks.{i}.attn.qkv.weight ((H+2*K)*D, C) rows [q heads | k heads | v heads], K = n_kv_head (default
                                              H); head h of q is rows h*D:(h+1)*D, of k H*D + h*D..., of v
                                              (H+K)*D + h*D...; query head h reads key/value head h // (H/K)
    blocks.{i}.attn.q_norm.weight (D,), k_norm.weight (D,)  [qk_norm only]
    blocks.{i}.attn.proj.weight (C, H*D)      blocks.{i}.mlp.fc.weight (hidden, C)  (swiglu: 2*hidden)
    blocks.{i}.mlp.proj.weight (C, hidden)    norm_f.weight [+ .bias]   head.weight (V, C) [+ .bias]
Tied embeddings: `head.weight` IS `tok_emb.weight` (one Parameter, listed once by `parameters()`).
`state_dict()` holds it once, as `tok_emb.weight`, so safetensors and DCP see no shared tensors;
`load_state_dict()` accepts a state dict with or without a `head.weight` key.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dist_gpt.model import doc_mask
from dist_gpt.model.fused_ops import norm_rotary, relu_squared, rms_norm, rotary, rotary_tables
from dist_gpt.errors import ConfigError

NORMS = ("layernorm", "rmsnorm")
BLOCKS = ("prenorm", "postnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "gelu_tanh", "relu", "relu2", "swiglu")
# The norms' epsilon when model.norm_eps is unset: what each kind always used (old runs load unchanged).
DEFAULT_EPS = {"layernorm": 1e-5, "rmsnorm": 1e-6}


@dataclass
class GPTConfig:
    """The `model` config section."""

    vocab_size: int = field(default=256, metadata={"help": "number of token ids; 0 = the dataset's vocabulary size"})
    block_size: int = field(default=256, metadata={"help": "context length in tokens"})
    n_layer: int = field(default=4, metadata={"help": "number of transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads per block"})
    n_kv_head: int | None = field(default=None, metadata={
        "help": "key/value heads, shared by groups of n_head / n_kv_head query heads (grouped-query "
                "attention); default n_head"})
    n_embd: int = field(default=128, metadata={"help": "residual stream width C"})
    head_dim: int | None = field(default=None, metadata={
        "help": "width of one head D (default n_embd // n_head); n_head*head_dim may differ from n_embd"})
    mlp_hidden: int | None = field(default=None, metadata={
        "help": "MLP hidden width (default 4*n_embd; swiglu: 8*n_embd/3 rounded up to a multiple of 64)"})
    dropout: float = field(default=0.0, metadata={
        "help": "dropout on attention weights, after the attention projection and after the MLP"})
    bias: bool = field(default=False, metadata={
        "help": "biases in the attention output projection, the MLP linears and the LayerNorms"})
    qkv_bias: bool = field(default=False, metadata={"help": "bias in the fused query/key/value linear"})
    head_bias: bool = field(default=False, metadata={"help": "bias in the output head"})
    norm: str = field(default="layernorm", metadata={"help": "layernorm | rmsnorm"})
    norm_eps: float | None = field(default=None, metadata={
        "help": "epsilon of every norm (default 1e-5 for layernorm, 1e-6 for rmsnorm)"})
    block: str = field(default="prenorm", metadata={
        "help": "prenorm (x + f(norm(x))) | postnorm (norm(x + f(x)), the original notebook's)"})
    positions: str = field(default="learned", metadata={"help": "learned (absolute embedding) | rope"})
    rope_base: float = field(default=10000.0, metadata={"help": "rotary base frequency (positions=rope)"})
    mlp: str = field(default="gelu", metadata={
        "help": "gelu (exact, erf) | gelu_tanh (tanh approximation, GPT-2's) | relu | relu2 (ReLU squared) | swiglu"})
    tie_embeddings: bool = field(default=True, metadata={"help": "share the token embedding with the head"})
    qk_norm: bool = field(default=False, metadata={"help": "normalise queries and keys per head"})
    zero_init: bool = field(default=False, metadata={
        "help": "zero-init the attention and MLP output projections (and the head when untied)"})
    logit_softcap: float | None = field(default=None, metadata={
        "help": "cap logits smoothly to (-c, c) with c*tanh(logits/c); none = off"})
    init_std: float = field(default=0.02, metadata={"help": "std of the normal init of weights"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each block in backward to save memory (about 1/3 more compute)"})
    doc_mask: bool = field(default=False, metadata={
        "help": "attention never crosses a document boundary: training and validation batches carry each "
                "token's document (from the dataset's document index); at generation an end-of-text token "
                "starts a new document"})

    def __post_init__(self):
        if self.vocab_size < 0:
            raise ConfigError(f"model.vocab_size: must be at least 1 (or 0 = the dataset's), got {self.vocab_size}")
        for key in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}: must be at least 1, got {getattr(self, key)}")
        for key, choices in (("norm", NORMS), ("block", BLOCKS), ("positions", POSITIONS), ("mlp", MLPS)):
            if getattr(self, key) not in choices:
                raise ConfigError(f"model.{key}: must be one of {' | '.join(choices)}, got {getattr(self, key)!r}")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ConfigError(f"model.n_kv_head: must divide model.n_head={self.n_head} (or be none), "
                              f"got {self.n_kv_head}")
        if self.norm_eps is not None and not self.norm_eps > 0:
            raise ConfigError(f"model.norm_eps: must be positive (or none), got {self.norm_eps}")
        if self.head_dim is not None and self.head_dim < 1:
            raise ConfigError(f"model.head_dim: must be at least 1 (or none), got {self.head_dim}")
        if self.head_dim is None and self.n_embd < self.n_head:
            raise ConfigError(f"model.head_dim: n_embd={self.n_embd} is narrower than n_head={self.n_head}; "
                              "set model.head_dim or fewer heads")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ConfigError(f"model.mlp_hidden: must be at least 1 (or none), got {self.mlp_hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if self.positions == "rope" and self.head_size % 2:
            raise ConfigError(f"model.head_dim: rotary positions (model.positions=rope) rotate pairs of channels "
                              f"and need an even head_dim, got {self.head_size}"
                              f"{'' if self.head_dim else f' (= n_embd // n_head = {self.n_embd} // {self.n_head})'}"
                              "; set model.head_dim to an even number or use model.positions=learned")
        if self.rope_base <= 0:
            raise ConfigError(f"model.rope_base: must be positive, got {self.rope_base}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ConfigError(f"model.logit_softcap: must be positive (or none), got {self.logit_softcap}")
        if self.init_std <= 0:
            raise ConfigError(f"model.init_std: must be positive, got {self.init_std}")

    @property
    def head_size(self) -> int:
        """D, the resolved head width (head_dim, or n_embd // n_head)."""
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """K, the resolved number of key/value heads (n_kv_head, or n_head)."""
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def eps(self) -> float:
        """The resolved epsilon of the norms."""
        return self.norm_eps if self.norm_eps is not None else DEFAULT_EPS[self.norm]

    @property
    def hidden_size(self) -> int:
        """The resolved MLP hidden width. SwiGLU has three matrices instead of two, so its default
        width is 2/3 of 4*C (same parameter count), rounded up to a multiple of 64 for fast matmuls."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd


class Norm(nn.Module):
    """LayerNorm (weight, optional bias) or RMSNorm (weight only) over the last dimension."""

    def __init__(self, dim: int, kind: str, bias: bool, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias and kind == "layernorm" else None

    def forward(self, x):
        # in fp32 and back to x's dtype: under bf16 autocast q and k arrive in bf16 (qk_norm) and
        # must leave in bf16 for the flash kernels; the residual stream stays fp32 anyway
        if self.kind == "layernorm":
            y = F.layer_norm(x.float(), self.weight.shape, self.weight, self.bias, eps=self.eps)
            return y.type_as(x)
        return rms_norm(x, self.weight, self.eps)  # fused_ops: F.rms_norm's function, fewer kernels


def rope_tables(pos: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (T, D/2) in fp32, of the rotation angles pos * base^(-2i/D) (for apply_rope;
    the model itself takes fused_ops.rotary_tables' full-width ones)."""
    cos, sin = rotary_tables(pos, head_dim, base)  # (T, 1, D) each: [cos | cos], [-sin | sin]
    return cos[:, 0, : head_dim // 2], sin[:, 0, head_dim // 2:]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (B, nh, T, D) by the angles of its positions
    (the "half-split" GPT-NeoX / LLaMA layout), in fp32: x1*cos - x2*sin, x2*cos + x1*sin."""
    return rotary(x, torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1))


class KVCache:
    """Keys and values of the tokens already seen, for every layer: (n_layer, B, K, max_len, hd), with K
    the key/value heads (fewer than the query heads under grouped-query attention), and their
    document ids (B, max_len) under document masking.

    Allocated on first use with the keys' dtype (bf16 under autocast; fp32 keys on CPU with RMSNorm
    QK-norm and rotary positions, which hand attention fp32 queries and keys there). `pos` counts the cached
    tokens; the model advances it after a forward pass through all layers."""

    def __init__(self, n_layer: int, max_len: int):
        self.n_layer, self.max_len = n_layer, max_len
        self.pos = 0
        self.k = self.v = self.doc = None

    def documents(self, doc: torch.Tensor) -> torch.Tensor:
        """Store the document ids (B, T) of the new tokens; return those of every token so far (B, pos+T)."""
        if self.doc is None:
            self.doc = doc.new_zeros(doc.size(0), self.max_len)
        end = self.pos + doc.size(1)
        self.doc[:, self.pos:end] = doc
        return self.doc[:, :end]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, K, T, hd) of the new tokens; return all keys and values so far (B, K, pos+T, hd)."""
        B, nh, T, hd = k.shape
        if self.k is None:
            self.k = k.new_zeros(self.n_layer, B, nh, self.max_len, hd)
            self.v = v.new_zeros(self.n_layer, B, nh, self.max_len, hd)
        end = self.pos + T
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def attention(q, k, v, **kwargs):
    """scaled_dot_product_attention; (B, nh, T, hd) in and out. On CPU, bf16 inputs are attended
    in fp32: torch's CPU flash-attention forward + backward is up to 4x slower in bf16 at small
    training shapes (12 x 4 heads x 64 x 32, one core: 7.0 ms vs 1.8 ms per layer) and no faster at
    16 x 6 x 256 x 64 (88 vs 84 ms); only from context 1024 does bf16 win (188 vs 227 ms). The inputs
    are bf16 values already, so fp32 only computes with them more exactly. (With RMSNorm QK-norm and
    rotary positions, the modern recipe's, queries and keys arrive in fp32 already and only the values
    are bf16.)"""
    if q.device.type == "cpu" and torch.bfloat16 in (q.dtype, v.dtype):
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
        return y.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_size
        width = cfg.n_head * cfg.head_size  # may differ from n_embd (the notebook: 20 * 19 = 380 vs 384)
        self.qkv = nn.Linear(cfg.n_embd, width + 2 * cfg.kv_heads * cfg.head_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(width, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = Norm(cfg.head_size, cfg.norm, cfg.bias, cfg.eps)
            self.k_norm = Norm(cfg.head_size, cfg.norm, cfg.bias, cfg.eps)
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache: KVCache | None = None, mask=None):
        """mask: None (causal), a boolean (B, 1, T, past+T) mask or a FlexAttention BlockMask (GPT._mask)."""
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        qk, v = self.qkv(x).split([(H + K) * D, K * D], dim=2)  # (B, T, (H+K)*D), (B, T, K*D)
        qk = self._norm_and_rotate(qk.view(B, T, H + K, D), rope)  # every query and key head at once
        q, k = qk.split([H, K], dim=2)
        q = q.transpose(1, 2)  # (B, H, T, D)
        k = k.transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, K, past+T, D)
        if K != H:  # grouped-query attention: each key/value head serves H/K consecutive query heads
            k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # (B, H, *, D)
        dropout_p = self.dropout if self.training else 0.0
        if mask is not None and not isinstance(mask, torch.Tensor):
            y = doc_mask.flex(q, k, v, mask)  # documents, on CUDA
        elif mask is not None:
            y = attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # documents
        elif past == 0:
            # queries and keys cover the same positions: the plain causal mask (flash kernels on GPU)
            y = attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:
            # one new token attends to everything cached: no mask needed
            y = attention(q, k, v, dropout_p=dropout_p)
        else:
            # T new tokens over `past` cached ones: query i (position past+i) sees keys 0..past+i.
            # is_causal would align the triangle top-left (query i sees keys 0..i), so build it.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        return self.resid_dropout(self.proj(y))  # (B, T, C)

    def _norm_and_rotate(self, qk: torch.Tensor, rope) -> torch.Tensor:
        """QK-norm and rotary positions of qk (B, T, H+K, D): the H query heads, then the K key heads.

        RMSNorm takes one call for both, its weights stacked per head ((H+K, D): q_norm's H times, then
        k_norm's K times, whose gradients autograd sums back into the two (D,) parameters), fused with
        the rotation when there is one; a LayerNorm, with its bias, keeps one call each. On CPU a bf16
        result of the fused norm and rotation stays fp32 (`attention` computes bf16 in fp32 there
        anyway); the other paths return qk's dtype."""
        H, K = self.n_head, self.n_kv_head
        if self.qk_norm and self.q_norm.kind == "rmsnorm":
            D = self.head_dim
            weight = torch.cat((self.q_norm.weight.expand(H, D), self.k_norm.weight.expand(K, D)))
            if rope is None:
                return rms_norm(qk, weight, self.q_norm.eps)
            out_dtype = torch.float32 if qk.device.type == "cpu" and qk.dtype == torch.bfloat16 else qk.dtype
            return norm_rotary(qk, weight, self.q_norm.eps, rope, out_dtype)
        if self.qk_norm:
            q, k = qk.split([H, K], dim=2)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=2)
        if rope is not None:
            qk = rotary(qk, *rope)  # (T, 1, D) tables broadcast over batch and heads
        return qk


class MLP(nn.Module):
    """Two linears around an activation. SwiGLU: fc.weight rows [0, hidden) are the gate (through
    SiLU), rows [hidden, 2*hidden) the value; out = proj(silu(gate) * value)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind, hidden = cfg.mlp, cfg.hidden_size
        self.fc = nn.Linear(cfg.n_embd, 2 * hidden if cfg.mlp == "swiglu" else hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.fc(x)  # (B, T, hidden) or (B, T, 2*hidden)
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu":
            h = F.relu(h)
        elif self.kind == "relu2":
            h = relu_squared(h)
        else:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        return self.dropout(self.proj(h))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.postnorm = cfg.block == "postnorm"
        self.norm1 = Norm(cfg.n_embd, cfg.norm, cfg.bias, cfg.eps)
        self.attn = CausalSelfAttention(cfg, layer)
        self.norm2 = Norm(cfg.n_embd, cfg.norm, cfg.bias, cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, cache: KVCache | None = None, mask=None):
        if self.postnorm:  # the original notebook: normalise after each residual add
            x = self.norm1(x + self.attn(x, rope, cache, mask))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x), rope, cache, mask)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.positions == "learned":
            self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = Norm(cfg.n_embd, cfg.norm, cfg.bias, cfg.eps)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.head_bias)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
            self.register_state_dict_post_hook(_drop_tied_head)
            self.register_load_state_dict_pre_hook(_fill_tied_head)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Normal(0, init_std) weights, zero biases, unit norms. The residual projections get
        std / sqrt(2 * n_layer), as GPT-2: each block adds two of them to the residual stream, so its
        variance stays O(1) with depth. With zero_init they start at zero instead (each block then
        starts as the identity), and so does the head when it is not tied to the embedding."""
        params = dict(self.named_parameters(remove_duplicate=False))
        for name, init in self.init_steps():
            init(params[name])

    def init_steps(self) -> list[tuple[str, Callable[[torch.Tensor], object]]]:
        """The initialisation as (parameter name, in-place init) in the order it draws random numbers.

        `reset_parameters` applies them to this model's tensors; a model whose parameters are spread
        over several devices can apply the same steps, in the same order, to one full-size tensor at
        a time and keep its share, and so start from exactly the weights of an unsplit build.
        """
        std = self.cfg.init_std
        steps: list[tuple[str, Callable[[torch.Tensor], object]]] = []
        for prefix, module in self.named_modules(remove_duplicate=False):
            if isinstance(module, Norm):
                steps.append((f"{prefix}.weight", lambda t: t.fill_(1.0)))
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                steps.append((f"{prefix}.weight", lambda t: t.normal_(0.0, std)))
            if getattr(module, "bias", None) is not None:
                steps.append((f"{prefix}.bias", torch.Tensor.zero_))
        proj_std = std / math.sqrt(2 * self.cfg.n_layer)
        for i in range(self.cfg.n_layer):
            for proj in (f"blocks.{i}.attn.proj.weight", f"blocks.{i}.mlp.proj.weight"):
                steps.append((proj, torch.Tensor.zero_ if self.cfg.zero_init else lambda t: t.normal_(0.0, proj_std)))
        if self.cfg.zero_init and not self.cfg.tie_embeddings:
            steps.append(("head.weight", torch.Tensor.zero_))
        return steps

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) int64 -> logits (B, T, V) float32; with targets (B, T): the mean cross-entropy
        (fp32) over targets != -1. With doc_ids (B, T) int64, a token attends only to earlier tokens
        of its own document (equal ids); without, to every earlier token."""
        logits = self._logits(self._trunk(idx, doc_ids=doc_ids))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def _trunk(self, idx: torch.Tensor, cache: KVCache | None = None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings and blocks: idx (B, T) -> final-normed hidden states (B, T, C). With a cache,
        idx are the tokens after the cached ones, at positions cache.pos .. cache.pos + T - 1.
        doc_ids (B, T): the documents of idx (attention stays inside them)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ConfigError(f"model.block_size: a sequence of {start + T} tokens is longer than the "
                              f"context model.block_size={self.cfg.block_size}; crop it")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.tok_emb(idx)  # (B, T, C)
        if self.cfg.positions == "learned":
            x = x + self.pos_emb(pos)  # (T, C) broadcast over B
        rope = rotary_tables(pos, self.cfg.head_size, self.cfg.rope_base) if self.cfg.positions == "rope" else None
        mask = None if doc_ids is None else self._mask(doc_ids, cache)
        recompute = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, rope, None, mask, use_reentrant=False)
            else:
                x = block(x, rope, cache, mask)
        if cache is not None:
            cache.pos += T
        return self.norm_f(x)

    def _mask(self, doc_ids: torch.Tensor, cache: KVCache | None):
        """The attention mask of documents doc_ids (B, T): a FlexAttention BlockMask on CUDA, a boolean
        (B, 1, T, past + T) mask otherwise, or None where the plain causal mask is the same."""
        dropout = self.cfg.dropout if self.training else 0.0
        if cache is not None:
            return doc_mask.document_mask(doc_ids, cache.documents(doc_ids))
        if doc_mask.flex_usable(doc_ids.device, dropout, self.cfg.head_size):
            return doc_mask.block_mask(doc_ids)
        # The shortcut reads the ids back to the host: under torch.compile that would break the graph
        # (twice per forward), so a compiled model always takes the boolean mask.
        if (doc_ids.device.type == "cpu" and not torch.compiler.is_compiling()
                and doc_mask.one_document_per_row(doc_ids)):
            return None
        return doc_mask.document_mask(doc_ids, doc_ids)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, C) -> logits (B, T, V), in fp32 (and soft-capped if configured)."""
        logits = self.head(x).float()
        if self.cfg.logit_softcap is not None:
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, each shared one counted once. non_embedding leaves out the lookup tables
        (positions, and the token embedding unless it doubles as the head), which do no matmul work."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.cfg.positions == "learned":
                n -= self.pos_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per token, the PaLM / nanoGPT convention:
        6N for the matmuls of the N non-embedding parameters (2 forward, 4 backward) plus
        12 * n_layer * n_head * head_dim * block_size for attention scores and values over a full
        context (the causal half is not subtracted, as in nanoGPT's MFU). Multiply by tokens/s and
        divide by peak FLOP/s for MFU."""
        cfg = self.cfg
        attn = 12 * cfg.n_layer * cfg.n_head * cfg.head_size * cfg.block_size
        return float(6 * self.num_params(non_embedding=True) + attn)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eot_id: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue idx (B, T) by up to max_new_tokens tokens -> (B, T + n). See `stream`."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, eot_id, use_cache, generator))
        return torch.cat([idx, *new], dim=1)

    @torch.no_grad()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, eot_id: int | None = None,
               use_cache: bool = True, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, (B, 1) int64, one step at a time (for printing as they come).

        temperature 0 is greedy (top_k and top_p then do nothing); top_k keeps the k likeliest
        tokens; top_p keeps the smallest set whose probability reaches p. With eot_id, a row that
        produced it keeps producing it, and the stream ends when every row has (after yielding it).
        The model runs in eval mode (no dropout) while streaming.

        Documents (cfg.doc_mask with an eot_id): every end-of-text token in the prompt starts a new
        document, as in training, so the new tokens attend only to the prompt's last document (from
        its end-of-text token on); what comes before it changes nothing. Without an eot_id (byte and
        char vocabularies have none) the whole context is one document.

        Context: each token sees at most the last block_size tokens. Without a cache the window
        slides by one every step (every step recomputes up to block_size tokens). With the cache
        each new token costs one position (O(T) attention); when the cache is full it is rebuilt
        from the last block_size // 2 tokens (positions cannot shift inside a cache), so past
        block_size a token sees between block_size // 2 and block_size earlier tokens, and the
        result may then differ from generating without a cache. Up to block_size they are equal.
        """
        _check_sampling(temperature, top_k, top_p, max_new_tokens, idx)
        L = self.cfg.block_size
        was_training = self.training
        self.eval()
        try:
            seq = idx
            pending = idx[:, -L:]  # tokens the model has not yet seen
            # the cache holds at most the (cropped) prompt and the new tokens: a model with a long
            # context (an imported Qwen3: 40,960) must not allocate all of it for a short sample
            cache = KVCache(self.cfg.n_layer, min(L, pending.size(1) + max_new_tokens)) if use_cache else None
            done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
            documents = self.cfg.doc_mask and eot_id is not None
            for _ in range(max_new_tokens):
                if use_cache and cache.pos + pending.size(1) > L:
                    cache, pending = KVCache(self.cfg.n_layer, L), seq[:, -max(1, L // 2):]
                if not use_cache:
                    pending = seq[:, -L:]
                doc = None
                if documents:  # continue the numbering of the cached tokens' documents
                    before = cache.doc[:, cache.pos - 1] if use_cache and cache.pos else None
                    doc = doc_mask.eot_documents(pending, eot_id, before)
                logits = self._logits(self._trunk(pending, cache, doc)[:, -1:])[:, -1]  # (B, V)
                nxt = _sample(logits, temperature, top_k, top_p, generator)  # (B, 1)
                if eot_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eot_id), nxt)
                    done |= nxt == eot_id
                yield nxt
                seq, pending = torch.cat([seq, nxt], dim=1), nxt
                if eot_id is not None and bool(done.all()):
                    return
        finally:
            self.train(was_training)


def _check_sampling(temperature, top_k, top_p, max_new_tokens, idx):
    if temperature < 0:
        raise ConfigError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k: must be at least 1 (or none), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p: must be in (0, 1] (or none), got {top_p}")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    if idx.dim() != 2 or idx.size(1) < 1:
        raise ConfigError(f"prompt: need at least one token per row (shape (B, T)), got shape {tuple(idx.shape)}")


def _sample(logits: torch.Tensor, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    """logits (B, V) fp32 -> next token ids (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the likelier ones alone already reach top_p (the top one always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def _drop_tied_head(module, state_dict, prefix, local_metadata):
    """state_dict hook: a tied head is the token embedding, so keep the tensor once."""
    state_dict.pop(prefix + "head.weight", None)


def _fill_tied_head(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict hook: a tied head loads from tok_emb.weight, whether or not head.weight is there."""
    if prefix + "tok_emb.weight" in state_dict:
        state_dict[prefix + "head.weight"] = state_dict[prefix + "tok_emb.weight"]
