"""`photon bench trainer`: tokens/s of the local trainer against a bare PyTorch loop.

Both arms train the same freshly initialised model on the same in-memory tokens with the same batch, LR,
autocast and thread count; the arms alternate so machine noise hits both, and the best of each is kept.
The goal is a ratio ≥ 0.97: the trainer's bookkeeping (schedule, cursor, clipping, logging) must be free.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from photon.config import RunConfig
from photon.data.shards import TokenStream
from photon.model.transformer import Transformer
from photon.train.local import autocast, make_optimizer, train_local


def _bare_loop(model: torch.nn.Module, tokens: torch.Tensor, cfg: RunConfig, steps: int) -> float:
    """The plainest correct loop: slice, forward, backward, clip, AdamW step."""
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                            weight_decay=t.weight_decay)
    n = t.batch_size * t.seq_len
    start = time.perf_counter()
    for i in range(steps):
        off = (i * n) % (tokens.numel() - n - 1)
        x = tokens[off:off + n].view(t.batch_size, t.seq_len)
        y = tokens[off + 1:off + n + 1].view(t.batch_size, t.seq_len)
        with autocast(t):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    return steps * n / (time.perf_counter() - start)


def _photon_loop(model: torch.nn.Module, stream: TokenStream, cfg: RunConfig, steps: int) -> float:
    opt = make_optimizer(model, cfg.train)
    result = train_local(model, opt, stream, 0, 0, steps, cfg.train, cfg.train.steps)
    return result.tokens / result.seconds


def run_trainer_bench(cfg: RunConfig, steps: int = 20, repeats: int = 3, warmup: int = 3,
                      console: Console | None = None) -> dict[str, float]:
    console = console or Console()
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    rng = np.random.default_rng(0)
    n_tok = (steps + warmup + 1) * t.batch_size * (t.seq_len + 1) * 2
    array = rng.integers(0, cfg.model.vocab_size, n_tok, dtype=np.int64)
    tokens = torch.from_numpy(array)
    stream = TokenStream([array.astype(np.uint16 if cfg.model.vocab_size <= 65536 else np.uint32)],
                         t.seq_len, t.batch_size, seed=0)
    best = {"photon": 0.0, "bare": 0.0}
    for rep in range(repeats):
        for arm in ("bare", "photon"):
            torch.manual_seed(0)
            model = Transformer(cfg.model)
            if arm == "bare":
                _bare_loop(model, tokens, cfg, warmup)
                tps = _bare_loop(model, tokens, cfg, steps)
            else:
                _photon_loop(model, stream, cfg, warmup)
                tps = _photon_loop(model, stream, cfg, steps)
            best[arm] = max(best[arm], tps)
            console.print(f"repeat {rep + 1}/{repeats} {arm:7s} {tps:10.0f} tok/s")
    ratio = best["photon"] / best["bare"]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    table = Table(title=f"trainer benchmark: {cfg.name}, batch {t.batch_size}×{t.seq_len}, "
                        f"bf16={t.bf16}, threads={torch.get_num_threads()}")
    for col in ("bare tok/s", "photon tok/s", "ratio", "peak RSS MB"):
        table.add_column(col, justify="right")
    table.add_row(f"{best['bare']:.0f}", f"{best['photon']:.0f}", f"{ratio:.3f}", f"{rss_mb:.0f}")
    console.print(table)
    return {"bare_tok_s": best["bare"], "photon_tok_s": best["photon"], "ratio": ratio, "peak_rss_mb": rss_mb}
