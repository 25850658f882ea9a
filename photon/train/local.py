"""The local trainer: H AdamW steps on one client's token stream, from a cursor, on the global schedule.

The same function serves a federated client (one call per round) and the centralized baseline (one call per
chunk between evaluations), so both recipes share every line of the inner loop. It knows nothing about
Flower, files or the network: parameters come in as a model, data as a `TokenStream` and a cursor, and the
optimizer state can be reset (stateless Photon clients) or exported/imported as plain tensors.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from photon.config import RunConfig, TrainConfig, with_overrides
from photon.data.shards import TokenStream
from photon.errors import UserError
from photon.train.device import autocast as device_autocast
from photon.train.device import batch_to
from photon.train.schedule import get_lr

log = logging.getLogger(__name__)


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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW as in the paper (β = 0.9/0.95, ε = 1e-8); weight decay only on matrices, never norms. The fused
    kernel on CUDA and CPU (on CPU it ran ≈4× faster than the multi-tensor one here and allocates no
    model-sized temporaries), the multi-tensor one elsewhere. `train.optimizer: muon`: the blocks' hidden
    matrices on Muon (train/muon.py), the rest on this AdamW."""
    from photon.train.muon import MuonAdamW, is_muon_param

    named = list(getattr(model, "_orig_mod", model).named_parameters())
    muon = [p for n, p in named if cfg.optimizer == "muon" and is_muon_param(n, p.shape)]
    on_muon = {id(p) for p in muon}
    rest = [p for _, p in named if id(p) not in on_muon]
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kernel = adamw_kernel(next(model.parameters()).device)
    if muon:
        return MuonAdamW(muon, groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                         betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, adamw_kernel=kernel)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kernel)


def adamw_kernel(device: torch.device) -> dict[str, bool]:
    """The AdamW implementation for parameters on `device`: fused where torch has it (CUDA, CPU)."""
    return {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}


def autocast(cfg: TrainConfig, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    return device_autocast(device, cfg.bf16, keep_casts=not cfg.activation_checkpointing)


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
    shard: tuple[int, int] = (0, 1),
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    reduce_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> LocalResult:
    """Run `steps` optimizer steps starting at data `cursor` and schedule position `global_step`.

    `schedule_steps` is the length of the global cosine (centralized steps, or rounds × H when federated).
    `on_step(global_step, loss, lr)` is called after each step (progress bars, logging). Each step takes the
    stream's next batch; with `train.micro_batch_size` it is split into micro-batches whose gradients add up
    to the full batch's (each loss weighted by its share of the rows). Multi-process clients
    (`train/distributed.py`) pass `shard=(rank, world)`: this process trains its contiguous slice of every
    batch, `no_sync` skips gradient sync on all micro-batches but the last, and `reduce_loss` averages the
    reported loss over ranks. The model's device decides where batches go.
    """
    model.train()
    device = next(model.parameters()).device
    rank, world = shard
    micro = cfg.micro_batch_size or cfg.batch_size
    start = time.perf_counter()
    step_losses = []  # on the device, read once at the end: a read per step would wait for the GPU every step
    optimizer.zero_grad(set_to_none=True)
    if cfg.step_in_backward and (world > 1 or isinstance(model, nn.parallel.DistributedDataParallel)):
        raise UserError("train.step_in_backward trains a client in one process: its gradients cannot be averaged "
                        "over processes first; unset it for a multi-process run")
    in_backward = StepInBackward(model, optimizer, cfg.grad_clip) if cfg.step_in_backward else None
    try:
        for i in range(steps):
            step = global_step + i
            lr = get_lr(step, cfg.lr, cfg.warmup_steps, schedule_steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y, cursor = stream.next_batch(cursor)
            rows = x.shape[0] // world
            x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
            step_loss = torch.zeros((), device=device)
            if in_backward is not None and cfg.grad_clip > 0:
                # one forward, two backwards through its graph: the first only measures the gradients' norm,
                # the second steps each parameter with its gradient clipped (one pass: no micro-batches here)
                loss = _forward(model, cfg, device, x, y, rows)
                with in_backward.measuring_norm():
                    loss.backward(retain_graph=True)
                loss.backward()
                step_loss += loss.detach()
            else:
                starts = range(0, rows, micro)
                for j, s in enumerate(starts):
                    last = j == len(starts) - 1
                    with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()):
                        loss = _forward(model, cfg, device, x[s:s + micro], y[s:s + micro], rows)
                        loss.backward()
                    step_loss += loss.detach()
            if in_backward is None:
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if reduce_loss is not None:
                step_loss = reduce_loss(step_loss)
            step_losses.append(step_loss)
            if on_step is not None:  # wants each step's loss now: read it
                on_step(step, step_loss.item(), lr)
    finally:
        if in_backward is not None:
            in_backward.remove()
    losses = torch.stack(step_losses).tolist() if step_losses else []
    tokens = steps * stream.batch_size * stream.seq_len
    return LocalResult(cursor=cursor, steps=steps, samples=steps * stream.batch_size, tokens=tokens,
                       losses=losses, seconds=time.perf_counter() - start)


LEAN = ("train.step_in_backward=true", "train.activation_checkpointing=true", "train.micro_batch_size=null",
        "train.compile=false")


def lean_config(cfg: RunConfig, procs: int = 1) -> RunConfig:
    """The run's config as a node short of memory trains it (`photon node --lean`): each parameter stepped in
    backward, activation checkpointing, and the whole batch in one pass (micro-batches cannot be stepped in
    backward; with checkpointing the whole batch's block inputs are what it keeps), uncompiled. The same
    recipe: bitwise the same update on the CPU without micro-batches or compile, within fp32 rounding when the
    run accumulates micro-batches or compiles. A client of several processes (`procs` > 1) only gets the
    checkpointing."""
    if procs > 1:
        return with_overrides(cfg, ["train.activation_checkpointing=true"])
    return with_overrides(cfg, [*LEAN, "federation.procs_per_node=1"])  # this node trains in one process


def _forward(model: nn.Module, cfg: TrainConfig, device: torch.device, x: torch.Tensor, y: torch.Tensor,
             rows: int) -> torch.Tensor:
    """The loss of one micro-batch, weighted by its share of the step's `rows`, ready for backward."""
    x, y = batch_to(device, x, y)
    with autocast(cfg, device):
        _, loss = model(x, y)
    return loss * (x.shape[0] / rows)


class StepInBackward:
    """`train.step_in_backward`: AdamW steps each parameter from a hook the moment its gradient is complete, and
    frees that gradient, so the gradients never all exist at once.

    The hook calls the optimizer's own `step()`, which skips every parameter without a gradient: at that moment
    only this one has one (each earlier hook freed its own, the rest are not computed yet; a tied weight's hook
    runs once, after all of its uses). The result is the usual step's: the fused AdamW kernel is elementwise
    per tensor. Global-norm clipping needs every gradient's norm before any step: `measuring_norm()` turns the
    hooks into a norm pass (each gradient's norm kept, the gradient freed), and the next backward steps with
    each gradient scaled as `clip_grad_norm_` scales it (the same norms, combined in the parameters' order).
    `train_local` runs both backwards through one forward's graph (kept by the first): the same gradients
    twice, with no forward replayed. (Replaying the forward instead cost one more forward, and in one probe, in
    bf16 with checkpointed blocks of width 512, ended a few steps away from the usual step; why was not found.)"""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, clip: float):
        self.optimizer, self.clip = optimizer, clip
        self.order = {p: i for i, p in enumerate(getattr(model, "_orig_mod", model).parameters())}
        self.norms: dict[int, torch.Tensor] = {}
        self.scale: torch.Tensor | None = None
        self.counting = False
        self.handles = [p.register_post_accumulate_grad_hook(self._on_gradient)
                        for group in optimizer.param_groups for p in group["params"] if p.requires_grad]

    def _on_gradient(self, p: torch.Tensor) -> None:
        if self.counting:
            self.norms[self.order[p]] = torch.linalg.vector_norm(p.grad, 2.0)
        else:
            if self.scale is not None:
                p.grad.mul_(self.scale)
            self.optimizer.step()
        p.grad = None

    @contextlib.contextmanager
    def measuring_norm(self):
        """Within: backward only measures gradient norms. After: the next backward steps with the gradients
        clipped to the global norm measured (`clip_grad_norm_`'s coefficient)."""
        self.counting, self.norms = True, {}
        try:
            yield
        finally:
            self.counting = False
        total = torch.linalg.vector_norm(torch.stack([self.norms[i] for i in sorted(self.norms)]), 2.0)
        self.scale = torch.clamp(self.clip / (total + 1e-6), max=1.0)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------------------
# Optimizer state as named tensors, so it can rest in safetensors (Photon's "persist" client mode, resume).


def optimizer_state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state keyed `<param name>.<exp_avg|exp_avg_sq|step>`, as CPU tensors; empty before the first
    step."""
    out = {}
    for name, p in getattr(model, "_orig_mod", model).named_parameters():  # compiled: the module's own names
        for key, value in optimizer.state.get(p, {}).items():
            out[f"{name}.{key}"] = (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu()
    return out


def load_optimizer_state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer,
                                 tensors: dict[str, torch.Tensor], adopt: bool = False) -> None:
    """Inverse of `optimizer_state_tensors`, onto the parameters' device (the step counter stays on the CPU
    unless the optimizer is fused); parameters absent from `tensors` start fresh. `adopt`: the tensors are
    the caller's to give away (fresh from disk, writable): where they already sit on the right device the
    optimizer trains them in place instead of a copy (a model's worth of AdamW state less at the peak)."""
    fused = bool(optimizer.defaults.get("fused"))
    for name, p in getattr(model, "_orig_mod", model).named_parameters():
        state = {}
        for key in ("step", "exp_avg", "exp_avg_sq", "momentum_buffer"):
            if f"{name}.{key}" in tensors:
                t = tensors[f"{name}.{key}"]
                state[key] = t.to(p.device if key != "step" or fused else "cpu", copy=not adopt)
        if state:
            optimizer.state[p] = state
