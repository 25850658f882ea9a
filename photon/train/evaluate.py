"""Validation loss, perplexity and bits per byte of a model, per domain and overall, on the held-out shards.

The batches are the first `n_batches` contiguous blocks of each domain's validation tokens, so every
evaluation of every run (centralized, federated, any seed) scores exactly the same tokens. Bits per byte is
the summed loss (in bits) over the UTF-8 bytes of the scored tokens' text: unlike perplexity it does not
depend on the tokenizer, so models with different vocabularies compare. The document separator (EOT) has
no bytes but its loss counts, as in a harness's rolling loglikelihood of a document followed by its end.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from photon.data.shards import Prepared, eval_batches, rows_in
from photon.data.tokenizer import load_tokenizer, token_byte_lengths
from photon.errors import UserError
from photon.train.device import autocast, batch_to

log = logging.getLogger(__name__)
OVERALL = "overall"
BPB = "bpb/"  # the prefix of an eval row's bits-per-byte fields


@torch.no_grad()
def evaluate(model: nn.Module, prepared: Prepared, seq_len: int, batch_size: int, n_batches: int,
             bf16: bool = False) -> dict[str, float]:
    """Mean next-token loss per domain and `overall` (weighted by tokens scored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses: dict[str, float] = {}
    total_loss, total_tokens = 0.0, 0
    for domain in prepared.domains:
        dom_loss, dom_tokens = 0.0, 0
        for x, y in eval_batches(prepared.tokens(domain, "val"), seq_len, batch_size, n_batches):
            x, y = batch_to(device, x, y)
            with autocast(device, bf16):
                _, loss = model(x, y)
            dom_loss += loss.item() * y.numel()
            dom_tokens += y.numel()
        if dom_tokens:
            losses[domain] = dom_loss / dom_tokens
            total_loss += dom_loss
            total_tokens += dom_tokens
    losses[OVERALL] = total_loss / max(1, total_tokens)
    model.train(was_training)
    return losses


def evaluable_domains(prepared: Prepared, seq_len: int) -> list[str]:
    """The domains whose validation split holds at least one sequence (`seq_len` + 1 tokens). None is a
    UserError (every validation loss would be a meaningless 0); a domain left out is logged."""
    fits = [d for d in prepared.domains if rows_in(len(prepared.tokens(d, "val")), seq_len)]
    if not fits:
        raise UserError(f"{prepared.path}: no domain's validation split holds one sequence of train.seq_len={seq_len} "
                        "tokens; prepare more text (or a larger data.val_fraction), or use a shorter train.seq_len")
    for d in sorted(set(prepared.domains) - set(fits)):
        log.warning("domain %r: its validation split is shorter than one sequence of %d tokens, so it is left out "
                    "of evaluation (it is still trained on)", d, seq_len)
    return fits


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def scored_bytes(prepared: Prepared, seq_len: int, batch_size: int, n_batches: int) -> dict[str, tuple[int, int]]:
    """(tokens scored, UTF-8 bytes of their text) per domain and `overall`, for exactly the targets `evaluate`
    scores with the same arguments."""
    lengths = token_byte_lengths(load_tokenizer(prepared.tokenizer_path))
    counts: dict[str, tuple[int, int]] = {}
    for domain in prepared.domains:
        pairs = [(y.numel(), int(lengths[y.numpy()].sum()))
                 for _, y in eval_batches(prepared.tokens(domain, "val"), seq_len, batch_size, n_batches)]
        if pairs:
            counts[domain] = (sum(t for t, _ in pairs), sum(b for _, b in pairs))
    counts[OVERALL] = (sum(t for t, _ in counts.values()), sum(b for _, b in counts.values()))
    return counts


def bits_per_byte(losses: dict[str, float], counts: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Each loss (mean nats per scored token) as bits per byte of the scored text."""
    return {d: loss * counts[d][0] / (math.log(2) * counts[d][1]) for d, loss in losses.items()
            if d in counts and counts[d][1] > 0}


def bpb_fields(losses: dict[str, float], counts: dict[str, tuple[int, int]]) -> dict[str, float]:
    """The `bpb/<domain>` fields an eval row logs beside its `loss/<domain>` ones."""
    return {f"{BPB}{d}": v for d, v in bits_per_byte(losses, counts).items()}
