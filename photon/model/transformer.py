"""The decoder-only, Llama-style language model that every client trains: one device, one file.

Parameter names equal Hugging Face ``LlamaForCausalLM`` state-dict keys, so export is a save, not a
rename. No data, I/O or distributed code lives here; federation sees the model only as its state dict.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from photon.config import ModelConfig
from photon.errors import UserError

HEAD_KEY = "lm_head.weight"
EMBED_KEY = "model.embed_tokens.weight"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, exactly as HF Llama does, so that exported
        # models give the same logits and bf16 autocast keeps a stable variance.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cache(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim] for rotary embeddings, frequencies theta^(-2i/d), fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # HF convention: the two halves, not interleaved pairs
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.kv_heads, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # keep bf16 activations bf16 under autocast
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_heads != self.n_head:
            # Query head h reads kv head h // group, the layout HF's repeat_kv assumes.
            group = self.n_head // self.kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.down_proj = nn.Linear(cfg.hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # `model` is registered before `lm_head` so that, when tied, named_parameters() names the shared
        # weight model.embed_tokens.weight (the key HF keeps).
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.d_model),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            norm=RMSNorm(cfg.d_model, cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Non-persistent: derived from the config, so they stay out of checkpoints and HF exports.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.checkpoint_blocks = False  # activation checkpointing (set by train.device.place)
        self.loss_chunk: int | None = 4096 if cfg.vocab_size >= 32768 else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # One pass in registration order over unique parameters, so init depends only on the seed.
        # Residual output projections are scaled by 1/sqrt(2·n_layer) (GPT-2) to keep the stream's variance
        # from growing with depth.
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                p.normal_(0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        T = idx.shape[1]
        if T > self.cfg.max_seq_len:
            raise UserError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}; "
                            "use shorter sequences or a model with a longer context")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.model.embed_tokens(idx)
        for block in self.model.layers:
            if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        h = self.model.norm(x)
        if targets is not None and self.loss_chunk is not None and h.shape[0] * T > self.loss_chunk:
            return None, chunked_cross_entropy(h, self.lm_head.weight, targets, self.loss_chunk)
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters; embeddings are the vocab×d_model tables (the head too when untied)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= embedding_params(self.cfg)
        return n

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx [B, T]; temperature 0 means greedy."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.cfg.max_seq_len:])
            logits = logits[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
        return idx


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, weight)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean next-token cross-entropy of `h @ weight.T`, `chunk` tokens at a time. Each chunk's logits are
    recomputed in backward (checkpointed), so at most one chunk of fp32 logits exists at once: for a 50k
    vocabulary and 64k tokens a batch, 64 MB a chunk of 4096 instead of 13 GB."""
    h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    total = h2.new_zeros((), dtype=torch.float32)
    for start in range(0, h2.shape[0], chunk):
        sl = slice(start, start + chunk)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h2[sl], weight, t2[sl], use_reentrant=False)
        else:
            total = total + _chunk_loss(h2[sl], weight, t2[sl])
    return total / t2.numel()


# ---------------------------------------------------------------------------------------------------------
# Parameter counts without building the model (the paper presets reach 7B)


def embedding_params(cfg: ModelConfig) -> int:
    return cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)


def count_params(cfg: ModelConfig) -> int:
    """Exactly Transformer(cfg).num_params(), by arithmetic."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_head * hd * 2 + d * cfg.kv_heads * hd * 2  # q, o + k, v
    mlp = 3 * d * cfg.hidden
    per_layer = attn + mlp + 2 * d  # + two RMSNorm weights
    return embedding_params(cfg) + cfg.n_layer * per_layer + d


def _human(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def describe(cfg: ModelConfig) -> str:
    heads = f"{cfg.n_head} heads" + (f" ({cfg.kv_heads} kv)" if cfg.kv_heads != cfg.n_head else "")
    tied = "" if cfg.tie_embeddings else ", untied"
    return (f"{cfg.n_layer} layers, d_model {cfg.d_model}, {heads}, vocab {cfg.vocab_size}{tied}: "
            f"{_human(count_params(cfg))} parameters ({_human(embedding_params(cfg))} in embeddings)")


# ---------------------------------------------------------------------------------------------------------
# State dicts without the tied duplicate (safetensors refuses tensors that share storage)


def _unwrap(model: nn.Module) -> Transformer:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module and prefixes its keys


def _is_tied(model: Transformer) -> bool:
    return model.lm_head.weight is model.model.embed_tokens.weight


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict() without lm_head.weight when it is the embedding; keys are HF Llama keys."""
    model = _unwrap(model)
    sd = model.state_dict()
    if _is_tied(model):
        del sd[HEAD_KEY]
    return sd


def load_unique_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], share: bool = False) -> None:
    """Inverse of unique_state_dict; strict, and a mismatch is a UserError naming the keys. `share`: the model's
    parameters become the given tensors (no copy; for a model that only reads them, e.g. evaluation on the
    device they are on), else they are copied in."""
    model = _unwrap(model)
    expected = unique_state_dict(model)
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        hint = ""
        if missing == [HEAD_KEY] or unexpected == [HEAD_KEY]:
            hint = " (tied vs untied embeddings: set model.tie_embeddings to match the checkpoint)"
        raise UserError(f"checkpoint does not match the model: {'; '.join(parts)}{hint}")
    for k, ref in expected.items():
        if tuple(sd[k].shape) != tuple(ref.shape):
            raise UserError(f"checkpoint is for a different model shape: {k} has shape {tuple(sd[k].shape)} "
                            f"but the model expects {tuple(ref.shape)}; use the checkpoint's model config")
    tied = _is_tied(model)
    full = dict(sd)
    if tied:
        full[HEAD_KEY] = sd[EMBED_KEY]
    model.load_state_dict(full, strict=True, assign=share)
    if share and tied:  # assign wraps each key in its own Parameter: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
