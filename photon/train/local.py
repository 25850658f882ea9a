"""The local trainer: H AdamW steps on one client's token stream, from a cursor, on the global schedule.

The same function serves a federated client (one call per round) and the centralized baseline (one call per
chunk between evaluations), so both recipes share every line of the inner loop. It knows nothing about
Flower, files or the network: parameters come in as a model, data as a `TokenStream` and a cursor, and the
optimizer state can be reset (stateless Photon clients) or exported/imported as plain tensors.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from photon.config import TrainConfig
from photon.data.shards import TokenStream
from photon.train.schedule import get_lr


@dataclass
class LocalResult:
    """What a run of local steps produced, besides the updated model in place."""

    cursor: int
    steps: int
    samples: int
    tokens: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return sum(self.losses) / max(1, len(self.losses))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW as in the paper (β = 0.9/0.95, ε = 1e-8); weight decay only on matrices, never norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


def autocast(cfg: TrainConfig) -> contextlib.AbstractContextManager:
    if cfg.bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_local(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    stream: TokenStream,
    cursor: int,
    global_step: int,
    steps: int,
    cfg: TrainConfig,
    schedule_steps: int,
    on_step: Callable[[int, float, float], None] | None = None,
) -> LocalResult:
    """Run `steps` optimizer steps starting at data `cursor` and schedule position `global_step`.

    `schedule_steps` is the length of the global cosine (centralized steps, or rounds × H when federated).
    `on_step(global_step, loss, lr)` is called after each step (progress bars, logging).
    """
    model.train()
    start = time.perf_counter()
    losses = []
    for i in range(steps):
        step = global_step + i
        lr = get_lr(step, cfg.lr, cfg.warmup_steps, schedule_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y, cursor = stream.next_batch(cursor)
        with autocast(cfg):
            _, loss = model(x, y)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1], lr)
    tokens = steps * stream.batch_size * stream.seq_len
    return LocalResult(cursor=cursor, steps=steps, samples=steps * stream.batch_size, tokens=tokens,
                       losses=losses, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------
# Optimizer state as named tensors, so it can rest in safetensors (Photon's "persist" client mode, resume).


def optimizer_state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state keyed `<param name>.<exp_avg|exp_avg_sq|step>`; empty before the first step."""
    out = {}
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            out[f"{name}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer,
                                 tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `optimizer_state_tensors`; parameters absent from `tensors` start fresh."""
    for name, p in model.named_parameters():
        state = {key: tensors[f"{name}.{key}"].clone() for key in ("step", "exp_avg", "exp_avg_sq")
                 if f"{name}.{key}" in tensors}
        if state:
            optimizer.state[p] = state
