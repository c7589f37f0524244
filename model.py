"""The models, bottom-up: a Llama-family decoder that can run bidirectionally, the report encoder
built on it (pooling), hand-written LoRA, and the ViT + dual-tower CLIP of stage 2. Torch only:
reading weight files lives in weights.py, saved encoders in encoders.py.

Read in this order: configuration -> building blocks -> LLM -> pooling and TextEncoder -> LoRA ->
ViT -> CLIPModel.

References
- Llama: Touvron et al. 2023 (arXiv 2302.13971); Llama-3 RoPE scaling: Dubey et al. 2024
  (arXiv 2407.21783, sec. 3.2). Qwen2 and Mistral differ only in q/k/v biases and the sliding
  window; SmolLM2 is a small Llama.
- LLM2Vec (BehnamGhader et al. 2024, arXiv 2404.05961, sec. 2): drop the causal mask, train with
  MNTP, then contrastively.
- LLM2VEC4CXR (Ko et al. 2025, arXiv 2509.15234, sec. 2): latent-attention pooling over the report
  tokens only.
- NV-Embed (Lee et al. 2024, arXiv 2405.17428, sec. 3.2): the latent-attention pooler.
- LoRA (Hu et al. 2021, arXiv 2106.09685, eq. 3).
- ViT (Dosovitskiy et al. 2021, arXiv 2010.11929); CLIP (Radford et al. 2021, arXiv 2103.00020);
  LLM2CLIP (Huang et al. 2024, arXiv 2411.04997).

Parameter names follow Hugging Face (`model.layers.0.self_attn.q_proj.weight`, ...) so checkpoints
map one to one:

    llm = LLM(LlamaConfig(...))                        # or weights.load_llm("smollm2")
    h = llm(input_ids, attention_mask, causal=False)   # (B, T, d) last hidden states
"""
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

@dataclass
class LlamaConfig:
    """Mirrors the fields of a Hugging Face `config.json` for Llama / Mistral / Qwen2."""
    model_type: str = "llama"
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3      # < num_attention_heads: grouped-query attention
    head_dim: int = 0                 # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = None         # {"rope_type": "llama3", "factor": .., ...} for Llama-3.x
    rope_factors: list = None         # per-frequency divisors, as llama.cpp stores Llama-3 scaling
    max_position_embeddings: int = 8192
    attention_bias: bool = False      # q/k/v biases: True for Qwen2
    mlp_bias: bool = False
    sliding_window: int = 0           # Mistral: attend only to the last `sliding_window` keys (causal)
    tie_word_embeddings: bool = True
    bos_token_id: int = None
    eos_token_id: int = None
    pad_token_id: int = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """Read a Hugging Face config dict (old and new RoPE spellings both accepted)."""
        hf = dict(hf)
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        hf.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        hf["rope_scaling"] = rope if rope_type != "default" else None
        if model_type == "qwen2":
            hf["attention_bias"] = True
            hf["sliding_window"] = hf.get("sliding_window") if hf.get("use_sliding_window") else 0
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):  # some configs list several
            if isinstance(hf.get(key), list):
                hf[key] = hf[key][0]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in known and v is not None})


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # computed in fp32 like the reference: bf16 squares lose too much precision
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), with Llama-3 scaling if the config asks for it."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if cfg.rope_factors is not None:
        inv_freq = inv_freq / torch.tensor(cfg.rope_factors, dtype=torch.float64)
    scaling = cfg.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "llama3":
        # Llama 3.1: wavelengths beyond the original context are stretched by `factor`, short ones
        # are kept, and a linear ramp in between (the clamp covers all three cases)
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((scaling["original_max_position_embeddings"] / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    elif rope_type is not None:
        raise ValueError(f"unsupported rope scaling {rope_type!r}; supported: llama3")
    return inv_freq.float()


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}) by the position angle; x: (B, nh, T, hd), cos/sin: (B, 1, T, hd),
    sin with its first half negated: roll(x) * sin = (-x2, x1) * sin, one kernel instead of three."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Attention(nn.Module):
    """Grouped-query self-attention through SDPA. Causality is an argument of every call (a mask
    or `is_causal`), never a model attribute that a fused kernel could silently ignore."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.attention_bias and cfg.model_type == "llama")

    def forward(self, x, cos, sin, mask, is_causal):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)   # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.nkv != self.nh)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, is_causal):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embeddings, the blocks, the final norm: Hugging Face's `model.` prefix."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def attention_mask_4d(attention_mask, causal, sliding_window=0):
    """Boolean mask, True = may attend: (B, 1, 1, T) padding only when bidirectional, (B, 1, T, T)
    when causal. None when no mask is needed (no padding: SDPA's own `is_causal` is faster)."""
    no_padding = attention_mask is None or bool(attention_mask.all())
    if no_padding and not sliding_window:
        return None
    if not causal:
        return attention_mask[:, None, None, :].bool()
    T = attention_mask.shape[1]
    i = torch.arange(T, device=attention_mask.device)
    allowed = i[None, :] <= i[:, None]                                # (T, T) lower triangle
    if sliding_window:
        allowed = allowed & (i[:, None] - i[None, :] < sliding_window)
    keys = attention_mask[:, None, None, :].bool()
    # a padded query with no visible key would give NaN; let it see itself (its output is unused)
    return (keys & allowed) | torch.eye(T, dtype=torch.bool, device=attention_mask.device)


class LLM(nn.Module):
    """A Llama-family decoder. `forward` returns the last hidden states (B, T, d); the LM head is
    `self.lm_head`, applied by the caller only where logits are needed (MNTP: masked positions)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False  # recompute each block in backward: less memory, ~30% slower

    def init_weights(self, std=0.02):
        """Random initialisation as in Hugging Face (normal, std 0.02), for models trained from scratch."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        return self

    def first_trainable_layer(self):
        """Index of the lowest block with a parameter that trains (0 if the embeddings train, the
        number of blocks if none does). Blocks below it run under no_grad: with LoRA on the top k
        layers they keep no activations, and backward stops where the adapters start."""
        if self.model.embed_tokens.weight.requires_grad:
            return 0
        trains = [any(p.requires_grad for p in block.parameters()) for block in self.model.layers]
        return trains.index(True) if True in trains else len(trains)

    def forward(self, input_ids, attention_mask=None, causal=True):
        cfg = self.config
        first = self.first_trainable_layer() if torch.is_grad_enabled() else 0
        with torch.no_grad() if first > 0 else nullcontext():
            x = self.model.embed_tokens(input_ids)                        # (B, T, d)
        if attention_mask is None:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        else:  # positions count real tokens only, so left- and right-padded batches agree
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        # cos/sin once per forward, shared by all blocks
        angles = pos[:, None, :, None].float() * self.inv_freq            # (B, 1, T, hd/2)
        cos = torch.cat((angles.cos(), angles.cos()), dim=-1).to(x.dtype)  # (B, 1, T, hd)
        sin = torch.cat((-angles.sin(), angles.sin()), dim=-1).to(x.dtype)  # signed for apply_rope
        T = input_ids.shape[1]
        window = cfg.sliding_window if causal and 0 < cfg.sliding_window < T else 0
        if window and attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask_4d(attention_mask, causal, window)
        is_causal = causal and mask is None
        for i, block in enumerate(self.model.layers):
            if i < first:      # frozen prefix: same values, no graph (see first_trainable_layer)
                with torch.no_grad():
                    x = block(x, cos, sin, mask, is_causal)
            elif self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask, is_causal, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, is_causal)
        return self.model.norm(x)

    def logits(self, input_ids, attention_mask=None, causal=True):
        return self.lm_head(self(input_ids, attention_mask, causal))


# ---------------------------------------------------------------------------------------------
# The report encoder: bidirectional LLM + pooling over the report tokens (arXiv 2509.15234, sec. 2)
# ---------------------------------------------------------------------------------------------

class LatentAttentionPooler(nn.Module):
    """NV-Embed's latent attention: token states query a trainable latent array (keys = values),
    then an MLP, both residual; the result is mean-pooled over the report tokens."""

    def __init__(self, dim, num_latents=512, num_heads=8):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * dim ** -0.5)
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h):                                               # h: (B, T, d)
        kv = self.norm_kv(self.latents).expand(h.shape[0], -1, -1)     # (B, L, d)
        h = h + self.attn(self.norm_q(h), kv, kv, need_weights=False)[0]
        return h + self.mlp(self.norm_mlp(h))


POOLINGS = ("mean", "weighted_mean", "last_token", "latent_attention")


def pool(h, embed_mask, mode):
    """(B, T, d) token states -> (B, d), over the tokens where embed_mask is 1 (the report, not the
    instruction or padding). Written so that left and right padding give the same result."""
    m = embed_mask.to(h.dtype).unsqueeze(-1)                            # (B, T, 1)
    if mode in ("mean", "latent_attention"):
        return (h * m).sum(1) / m.sum(1).clamp(min=1)
    if mode == "weighted_mean":  # LLM2Vec: weight grows with the position inside the report
        w = embed_mask.cumsum(1).to(h.dtype).unsqueeze(-1) * m
        return (h * w).sum(1) / w.sum(1).clamp(min=1)
    if mode == "last_token":     # the last report token, wherever padding put it
        last = (embed_mask * torch.arange(1, embed_mask.shape[1] + 1, device=h.device)).argmax(1)
        return h[torch.arange(h.shape[0], device=h.device), last]
    raise ValueError(f"unknown pooling {mode!r}; choose from {POOLINGS}")


class TextEncoder(nn.Module):
    """LLM2Vec-style encoder: the LLM run bidirectionally, pooled over the report tokens."""

    def __init__(self, llm: LLM, pooling="mean", num_latents=512, causal=False):
        super().__init__()
        self.llm, self.pooling, self.causal = llm, pooling, causal
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {POOLINGS}")
        d = llm.config.hidden_size
        self.pooler = LatentAttentionPooler(d, num_latents) if pooling == "latent_attention" else None

    def forward(self, input_ids, attention_mask, embed_mask=None):
        h = self.llm(input_ids, attention_mask, causal=self.causal)    # (B, T, d)
        if self.pooler is not None:  # the pooler keeps fp32 weights even over a bf16 LLM
            h = self.pooler(h.to(self.pooler.latents.dtype))
        return pool(h, attention_mask if embed_mask is None else embed_mask, self.pooling)  # (B, d)


def length_buckets(batch: dict, buckets: int, keys=("input_ids", "attention_mask", "embed_mask")):
    """Split a padded batch (a dict of (N, T) tensors with an attention_mask) into `buckets` groups of rows
    of similar length, each cut to its own longest row; yields (rows, [batch[k][rows], cut, for k in keys]).
    A contrastive batch mixes whole reports with short impressions, and one forward pass would pad every
    impression to the longest report. Padding is contiguous (left or right), so removing the columns no
    row of the group uses keeps every row's tokens in order; the model masks padding and counts
    positions over real tokens only (LLM.forward), so a row's output does not depend on its neighbours."""
    mask = batch["attention_mask"]
    if buckets == 1:  # the one padded pass, as it is
        yield torch.arange(len(mask)), [batch[k] for k in keys]
        return
    order = mask.sum(1).argsort(stable=True)                            # shortest first
    for rows in order.chunk(buckets):
        cols = mask[rows].any(0)
        yield rows, [batch[k][rows][:, cols] for k in keys]


def embed_in_buckets(encoder: TextEncoder, batch: dict, buckets: int) -> torch.Tensor:
    """encoder(input_ids, attention_mask, embed_mask) of a batch -> (N, d), computed in length_buckets."""
    parts = [(rows, encoder(*x)) for rows, x in length_buckets(batch, buckets)]
    rows = torch.cat([r for r, _ in parts])
    return torch.cat([e for _, e in parts])[rows.argsort()]                # back to the batch's order


# ---------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021); weights.save_adapter / load_adapter read and write PEFT's format
# ---------------------------------------------------------------------------------------------
#
#        x ──► W (frozen) ─────────────┐
#        │                             (+) ──► y = W x + (alpha / r) · B A dropout(x)
#        └──► dropout ─► A (r×in) ─► B (out×r) ─► · alpha/r ─┘
#
# A starts Kaiming-uniform and B at zero, so a fresh adapter changes nothing. Subclassing
# nn.Linear keeps the base weight's name (`q_proj.weight`), and the adapter's names match PEFT's
# (`q_proj.lora_A.weight`), so both checkpoints map one to one.

STAGE1_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STAGE2_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias                # frozen, shared with the base
        # fp32 adapters even over a bf16 base: the low-rank update is small and needs the precision
        device = base.weight.device if base.weight.device.type != "meta" else None
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # p=0 costs nothing
        self.scaling = alpha / r

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not torch.is_autocast_enabled(x.device.type):  # autocast casts for us; else bf16 x meets fp32 A
            x = x.to(self.lora_A.weight.dtype)
        # scaling on the rank-r activations (B, T, r): r/out of the cost of scaling the update
        return y + self.lora_B(self.lora_A(self.dropout(x)) * self.scaling).to(y.dtype)


def layer_index(name):
    """The decoder-layer number in a module name (`model.layers.7.mlp.up_proj` -> 7), else None;
    the same rule as PEFT's `layers_to_transform` (the last `<name>.<number>.` in the path)."""
    m = re.match(r"(?:.*\.)?[^.]+\.(\d+)\.", name + ".")
    return int(m.group(1)) if m else None


def add_lora(model: nn.Module, targets=STAGE1_TARGETS, r=16, alpha=32, dropout=0.05, layers=None):
    """Wrap every nn.Linear whose name ends in a target with LoRA; freeze everything else.
    layers=k: only in the top k decoder layers (None or 0: all), recorded as PEFT's
    `layers_to_transform`. The frozen layers below then run without grad (LLM.forward)."""
    for p in model.parameters():
        p.requires_grad_(False)
    depth = 1 + max((i for n, _ in model.named_modules() if (i := layer_index(n)) is not None), default=-1)
    if layers and not 0 < layers <= depth:
        raise ValueError(f"LoRA on the top {layers} layers, but the model has {depth}")
    keep = list(range(depth - layers, depth)) if layers else None
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if child_name in targets and type(child) is nn.Linear and (keep is None or layer_index(full) in keep):
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
                wrapped.append(full)
    if not wrapped:
        raise ValueError(f"no nn.Linear named any of {list(targets)} found for LoRA")
    model.lora_config = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(set(targets)),
                             layers_to_transform=keep)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight, W <- W + (alpha/r) B A, and put plain nn.Linears back."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    delta = child.lora_B.weight @ child.lora_A.weight * child.scaling
                    linear.weight.copy_(child.weight.float() + delta)
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(module, child_name, linear)
    return model


def count_parameters(model: nn.Module):
    """(trainable, total), each tensor counted once even when tied."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------
# Stage 2: the ViT image tower and the dual-tower CLIP (arXiv 2509.15234, sec. 2; LLM2CLIP)
# ---------------------------------------------------------------------------------------------
#
# The image tower is a plain ViT (Dosovitskiy et al. 2021) laid out like Hugging Face's
# CLIPVisionModel, so `weights.load_clip_vision` is a prefix strip: embeddings.{patch,class,position}_embedding,
# pre_layrnorm (sic), encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
# mlp.fc1, mlp.fc2}, post_layernorm. The CLIP model then puts the stage-1 text encoder next to it
# (CLIP: Radford et al. 2021; LLM2CLIP: Huang et al. 2024), either with LoRA or, in the cheap
# variant, as cached embeddings read by an adapter MLP.
#
#     model = CLIPModel(ViT(VisionConfig.preset("vit-b/16")), 512, TextEncoder(llm), text_mode="lora")
#     image_features, text_features, scale = model(images, input_ids, attention_mask, embed_mask)
#     loss = losses.clip_loss(image_features, text_features, scale); ...; model.clamp_logit_scale()

VISION_PRESETS = {  # architecture only; image_size and channels are set per run
    "tiny": dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
    "vit-s/16": dict(patch_size=16, hidden_size=384, num_layers=12, num_heads=6, intermediate_size=1536),
    "vit-b/16": dict(patch_size=16, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "vit-l/14": dict(patch_size=14, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
}
# transformers' CLIPVisionConfig defaults, for config.json files that leave a field out
HF_VISION_DEFAULTS = dict(image_size=224, patch_size=32, num_channels=3, hidden_size=768, num_hidden_layers=12,
                          num_attention_heads=12, intermediate_size=3072, layer_norm_eps=1e-5, hidden_act="quick_gelu")


@dataclass
class VisionConfig:
    image_size: int = 224        # the size the position embeddings are learned for; others interpolate
    patch_size: int = 16
    channels: int = 3            # 1: grayscale X-rays as they are; 3: replicated, as RGB checkpoints expect
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"  # quick_gelu: openai CLIP checkpoints; gelu (exact): most others
    pre_layernorm: bool = True      # CLIP's LayerNorm between the embeddings and the blocks

    def __post_init__(self):
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"unsupported activation {self.activation!r}; supported: quick_gelu, gelu")

    @classmethod
    def preset(cls, name, **overrides) -> "VisionConfig":
        if name not in VISION_PRESETS:
            raise ValueError(f"unknown ViT preset {name!r}; choose from {list(VISION_PRESETS)}")
        return cls(**{**VISION_PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, hf: dict) -> "VisionConfig":
        """From a CLIPVisionConfig dict (a full CLIPConfig's `vision_config`)."""
        hf = {**HF_VISION_DEFAULTS, **hf}
        return cls(image_size=hf["image_size"], patch_size=hf["patch_size"], channels=hf["num_channels"],
                   hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                   num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
                   layer_norm_eps=hf["layer_norm_eps"], activation=hf["hidden_act"])


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d, self.grid = cfg.hidden_size, cfg.image_size // cfg.patch_size
        self.patch_embedding = nn.Conv2d(cfg.channels, d, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(d) * d ** -0.5)   # open_clip's init scale
        self.position_embedding = nn.Embedding(1 + self.grid ** 2, d)    # an Embedding only for HF's key name
        nn.init.normal_(self.position_embedding.weight, std=d ** -0.5)

    def positions(self, gh, gw):
        """(1 + gh*gw, d): the learned table, its patch part resized bicubically to a gh x gw grid
        (as transformers' `interpolate_pos_encoding`); the class position is kept as it is."""
        pos = self.position_embedding.weight                             # (1 + g*g, d)
        if (gh, gw) == (self.grid, self.grid):
            return pos
        patch = pos[1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2).float()  # (1, d, g, g)
        patch = F.interpolate(patch, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat((pos[:1], patch.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pos.dtype)))

    def forward(self, images):                                           # (B, C, H, W)
        x = self.patch_embedding(images.to(self.patch_embedding.weight.dtype))  # (B, d, H/p, W/p)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                                 # (B, gh*gw, d)
        x = torch.cat((self.class_embedding.expand(x.shape[0], 1, -1), x), dim=1)  # (B, 1 + gh*gw, d)
        return x + self.positions(gh, gw)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d, self.nh = cfg.hidden_size, cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = (p(x).view(B, T, self.nh, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)                      # (B, nh, T, hd), no mask: all see all
        return self.out_proj(y.transpose(1, 2).reshape(B, T, d))


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # the GELU approximation openai CLIP was trained with


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.hidden_size, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = quick_gelu if cfg.activation == "quick_gelu" else F.gelu  # the other is off by ~1e-2 on a tiny model

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.layer_norm1, self.self_attn = nn.LayerNorm(d, eps), VisionAttention(cfg)
        self.layer_norm2, self.mlp = nn.LayerNorm(d, eps), VisionMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ViT(nn.Module):
    """forward(images (B, C, H, W)) -> (B, hidden): the final-normed class token, CLIP's pooled output.
    Any H, W (cut to whole patches, as the stride-p conv does); the position table is resized to the grid."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(d, cfg.layer_norm_eps) if cfg.pre_layernorm else nn.Identity()
        self.encoder = nn.Module()  # only a container, for HF's `encoder.layers.N` names
        self.encoder.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.post_layernorm = nn.LayerNorm(d, cfg.layer_norm_eps)
        self.gradient_checkpointing = False  # as in LLM: recompute each block in backward

    def forward(self, images):
        x = self.pre_layrnorm(self.embeddings(images))                   # (B, 1 + N, d)
        for block in self.encoder.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.post_layernorm(x[:, 0])                              # (B, d)


TEXT_MODES = ("lora", "frozen")


class CLIPModel(nn.Module):
    """Image tower + text tower into one joint space of `embed_dim` (names as transformers' CLIPModel).

    text_mode "lora": text = TextEncoder (frozen) with LoRA on q/k/v/o, then LayerNorm -> Linear.
    text_mode "frozen" (LLM2CLIP's cheap variant): text = a precomputed (B, text_dim) embedding of the
    frozen encoder (see `encoders.embedding_cache`), mapped by an adapter LayerNorm -> Linear -> GELU -> Linear
    (hidden width text_dim). No residual: text_dim and embed_dim differ in general, and the LLM's
    space is not the joint one, so there is no identity worth keeping."""

    def __init__(self, vit: ViT, embed_dim=512, text_encoder: TextEncoder = None, text_mode="lora", text_dim=None,
                 lora_r=16, lora_alpha=32, lora_dropout=0.1, train_pooler=False):
        super().__init__()
        if text_mode not in TEXT_MODES:
            raise ValueError(f"unknown text_mode {text_mode!r}; choose from {TEXT_MODES}")
        self.text_mode = text_mode
        self.vision_model = vit
        self.visual_projection = nn.Linear(vit.config.hidden_size, embed_dim, bias=False)
        if text_mode == "lora":
            if text_encoder is None:
                raise ValueError('text_mode "lora" needs a text_encoder')
            self.text_encoder = text_encoder
            # stage-1 adapters, if still separate, are folded in so that the new LoRA wraps plain Linears;
            # add_lora freezes all of the LLM, the pooler stays frozen unless asked
            add_lora(merge_lora(text_encoder.llm), STAGE2_TARGETS, lora_r, lora_alpha, lora_dropout)
            if text_encoder.pooler is not None:
                text_encoder.pooler.requires_grad_(train_pooler)
            d = text_encoder.llm.config.hidden_size
            self.text_projection = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, embed_dim, bias=False))
        else:
            if text_dim is None and text_encoder is None:
                raise ValueError('text_mode "frozen" needs text_dim (the cached embeddings\' width) or a text_encoder')
            d = text_dim or text_encoder.llm.config.hidden_size  # the encoder is only asked for its width
            self.text_projection = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # temperature 0.07, as CLIP

    def encode_image(self, images):                                      # (B, C, H, W) -> (B, e)
        return F.normalize(self.visual_projection(self.vision_model(images)), dim=-1)

    def encode_text(self, text, attention_mask=None, embed_mask=None):
        """text: token ids (B, T) in "lora" mode, cached embeddings (B, text_dim) in "frozen" mode."""
        if self.text_mode == "lora":
            text = self.text_encoder(text, attention_mask, embed_mask)      # (B, d)
        h = text.to(self.text_projection[0].weight.dtype)                  # a bf16 LLM under fp32 heads
        return F.normalize(self.text_projection(h), dim=-1)                # (B, e)

    def forward(self, images, text, attention_mask=None, embed_mask=None):
        """-> (image_features, text_features, logit_scale.exp()): clip_loss's three arguments."""
        return self.encode_image(images), self.encode_text(text, attention_mask, embed_mask), self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self):
        """Call after each optimizer step (open_clip): a scale above 100 makes the softmax too sharp."""
        self.logit_scale.clamp_(0, math.log(100))
