"""Loss, perplexity and bits per byte of a model on any held-out text (`photon eval CKPT --text PATH`).

PATH is a .txt, .jsonl or .parquet file (one domain, named after the file) or a folder laid out as `photon
prepare` reads one (a subfolder per domain, or the folder itself as one). Documents are tokenised with the
run's tokenizer, each followed by the end-of-text token as in the prepared shards, and streamed: the token
stream is cut into windows of `seq_len` + 1 tokens that overlap by one, so every token after the first is
scored exactly once, with up to `seq_len` tokens of context. Nothing but a batch of windows is held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from photon.data.corpora import USER_SUFFIXES, Domain, file_documents, user_domains
from photon.data.tokenizer import token_byte_lengths
from photon.errors import UserError
from photon.train.device import autocast, batch_to
from photon.train.evaluate import OVERALL

DOCS_PER_ENCODE = 64  # documents tokenised together (the tokenizer batches them on its own threads)


def text_domains(path: Path) -> list[Domain]:
    """The domains of `path`: one file, or a folder as `photon prepare` reads it."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in USER_SUFFIXES:
            raise UserError(f"{path}: evaluate .txt, .jsonl or .parquet files (or a folder of them)")
        return [Domain(path.stem, (path,), lambda: file_documents(path))]
    return user_domains(path)


def _windows(docs: Iterator[str], tok: Tokenizer, seq_len: int) -> Iterator[np.ndarray]:
    """Windows of up to `seq_len` + 1 token ids over the documents' stream (each document ends with EOT),
    consecutive windows sharing one token; the last may be shorter (but has at least one target)."""
    buf: list[int] = []
    batch: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        nonlocal buf
        for enc in tok.encode_batch_fast(batch):
            buf += enc.ids
            buf.append(0)  # EOT
        batch.clear()
        while len(buf) >= seq_len + 1:
            yield np.asarray(buf[: seq_len + 1], dtype=np.int64)
            buf = buf[seq_len:]

    for doc in docs:
        batch.append(doc)
        if len(batch) == DOCS_PER_ENCODE:
            yield from flush()
    yield from flush()
    if len(buf) >= 2:
        yield np.asarray(buf, dtype=np.int64)


@torch.no_grad()
def evaluate_text(model: nn.Module, tok: Tokenizer, domains: list[Domain], seq_len: int, batch_size: int,
                  bf16: bool = False, progress: Callable[[str, int], None] | None = None
                  ) -> tuple[dict[str, float], dict[str, tuple[int, int]]]:
    """(mean loss per token, (tokens scored, UTF-8 bytes of their text)) per domain and `overall`."""
    model.eval()
    device = next(model.parameters()).device
    lengths = torch.from_numpy(token_byte_lengths(tok))
    losses: dict[str, float] = {}
    counts: dict[str, tuple[int, int]] = {}
    for domain in domains:
        total, tokens, nbytes = 0.0, 0, 0
        pending: list[np.ndarray] = []

        def score(windows: list[np.ndarray]) -> None:
            nonlocal total, tokens, nbytes
            by_length: dict[int, list[np.ndarray]] = {}
            for w in windows:  # the last window may be shorter: batched apart
                by_length.setdefault(len(w), []).append(w)
            for group in by_length.values():
                block = torch.from_numpy(np.stack(group))
                x, y = batch_to(device, block[:, :-1], block[:, 1:])
                with autocast(device, bf16):
                    _, loss = model(x, y)
                total += loss.item() * y.numel()
                tokens += y.numel()
                nbytes += int(lengths[block[:, 1:]].sum())

        for window in _windows(domain.docs(), tok, seq_len):
            pending.append(window)
            if len(pending) == batch_size:
                score(pending)
                pending = []
                if progress:
                    progress(domain.name, tokens)
        if pending:
            score(pending)
        if tokens == 0:
            raise UserError(f"{domain.name}: its text is under two tokens long; nothing to score")
        losses[domain.name] = total / tokens
        counts[domain.name] = (tokens, nbytes)
    all_tokens = sum(t for t, _ in counts.values())
    losses[OVERALL] = sum(losses[d] * counts[d][0] for d in counts) / all_tokens
    counts[OVERALL] = (all_tokens, sum(b for _, b in counts.values()))
    return losses, counts
