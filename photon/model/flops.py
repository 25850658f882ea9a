"""FLOP counts of the model, the numerator of every throughput and MFU figure."""

from __future__ import annotations

from photon.config import RunConfig


def flops_per_token(cfg: RunConfig) -> float:
    """Training FLOPs per token: 6 × the parameters of every matmul (the output layer included, the embedding
    lookup not) + 12 × layers × d_model × seq_len for attention scores and values (PaLM's accounting)."""
    m = cfg.model
    d, hd = m.d_model, m.head_dim
    per_layer = d * m.n_head * hd * 2 + d * m.kv_heads * hd * 2 + 3 * d * m.hidden
    matmul = m.n_layer * per_layer + m.vocab_size * d
    return 6 * matmul + 12 * m.n_layer * d * cfg.train.seq_len
