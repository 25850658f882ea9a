"""Outer (server) optimizers over the pseudo-gradient Δ = θ − weighted_mean(θ_k).

FedAvg with lr 1.0 is Photon's recipe (θ ← mean θ_k); Nesterov outer SGD (lr 0.7, momentum 0.9) is
DiLoCo's, and Delayed Nesterov its asynchronous form (momentum updated every N steps); FedMom is heavy-ball
momentum; FedAdam and FedYogi follow Reddi et al. 2021 ("Adaptive Federated Optimization"): no bias
correction, τ as the adaptivity floor. Each is a small class with `step(params, delta, lr)` updating params
in place and `state_dict`/`load_state_dict` of plain tensors; `lr_at` gives a step's outer LR.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from photon.config import OuterConfig
from photon.train.schedule import get_lr

Tensors = dict[str, torch.Tensor]
Delta = Mapping[str, torch.Tensor]  # name -> Δ (fold.combine)


CHUNK = 1 << 20  # elements per step: the outer update never holds more than a chunk of temporaries


class OuterOptimizer:
    """Base: walks every parameter a chunk at a time and calls `_update` on views of θ, Δ and buffers.

    All outer optimizers here are elementwise, so updating flat chunks in place is exact and keeps the
    server's extra memory to a chunk, however large the model. Subclasses keep per-parameter state in
    `self.buffers[kind][name]` (kinds listed in `buffer_names`)."""

    buffer_names: tuple[str, ...] = ()

    def __init__(self, cfg: OuterConfig):
        self.cfg = cfg
        self.lr = cfg.lr  # this step's outer LR (`lr_at` under a schedule)
        self.buffers: dict[str, Tensors] = {name: {} for name in self.buffer_names}

    def step(self, params: Tensors, delta: Delta, lr: float | None = None) -> None:
        """One outer step at `lr` (default: the configured constant LR)."""
        self.lr = self.cfg.lr if lr is None else lr
        for name, p in params.items():
            assert p.is_contiguous(), f"{name}: outer step needs contiguous parameters"
            bufs = [self._buffer(kind, name, p).view(-1) for kind in self.buffer_names]
            flat, whole = p.view(-1), delta[name].reshape(-1)
            for start in range(0, flat.numel(), CHUNK):
                sl = slice(start, start + CHUNK)
                self._update(flat[sl], whole[sl].to(p.dtype), *(b[sl] for b in bufs))

    def _update(self, p: torch.Tensor, d: torch.Tensor, *bufs: torch.Tensor) -> None:
        raise NotImplementedError

    def _buffer(self, kind: str, name: str, like: torch.Tensor) -> torch.Tensor:
        buf = self.buffers[kind].get(name)
        if buf is None:
            buf = self.buffers[kind][name] = torch.zeros_like(like)
        return buf

    def state_dict(self) -> Tensors:
        return {f"{kind}/{name}": t for kind, bufs in self.buffers.items() for name, t in bufs.items()}

    def load_state_dict(self, state: Tensors) -> None:
        self.buffers = {name: {} for name in self.buffer_names}
        for key, t in state.items():
            kind, _, name = key.partition("/")
            if kind not in self.buffers:
                raise ValueError(f"outer optimizer state has unknown buffer {key!r}: saved by another optimizer?")
            self.buffers[kind][name] = t.clone().contiguous()


class FedAvg(OuterOptimizer):
    """θ ← θ − η·Δ. With η = 1 the new model is the weighted mean of the clients' models (to an ulp)."""

    def _update(self, p, d):
        p.sub_(d, alpha=self.lr)


class FedMom(OuterOptimizer):
    """Heavy-ball momentum: m ← μ·m + Δ; θ ← θ − η·m."""

    buffer_names = ("momentum",)

    def _update(self, p, d, m):
        m.mul_(self.cfg.momentum).add_(d)
        p.sub_(m, alpha=self.lr)


class Nesterov(OuterOptimizer):
    """Nesterov outer SGD as in DiLoCo (torch.optim.SGD's form): m ← μ·m + Δ; θ ← θ − η·(Δ + μ·m)."""

    buffer_names = ("momentum",)

    def _update(self, p, d, m):
        mu = self.cfg.momentum
        m.mul_(mu).add_(d)
        p.sub_(d + mu * m, alpha=self.lr)


class DelayedNesterov(OuterOptimizer):
    """Delayed Nesterov (Liu et al. 2024, "Asynchronous Local-SGD Training for Language Modeling", its DN
    update), for asynchronous rounds, where one outer step may be made of stale replies. Each step moves θ by
    −η·Δ/N without momentum; every N-th step (N = `delay`) also folds the mean Δ of its last N steps into the
    momentum and adds the Nesterov term: m ← μ·m + mean(Δ); θ ← θ − η·μ·m. Over N steps θ moves by
    −η·(mean Δ + μ·m): Nesterov on the mean of N steps, so no single stale step drives the momentum. N = 1 is
    `Nesterov` exactly."""

    buffer_names = ("momentum", "pending")
    COUNT = "steps/count"  # the steps taken, checkpointed with the buffers (where in the N-step cycle we are)

    def __init__(self, cfg: OuterConfig):
        super().__init__(cfg)
        self.steps = 0
        self._milestone = False

    def step(self, params: Tensors, delta: Delta, lr: float | None = None) -> None:
        self.steps += 1
        self._milestone = self.steps % self.cfg.delay == 0
        super().step(params, delta, lr)

    def _update(self, p, d, m, pending):
        n, mu = self.cfg.delay, self.cfg.momentum
        pending.add_(d)
        if self._milestone:
            m.mul_(mu).add_(pending, alpha=1 / n)
            p.sub_(d / n + mu * m, alpha=self.lr)
            pending.zero_()
        else:
            p.sub_(d / n, alpha=self.lr)

    def state_dict(self) -> Tensors:
        return {**super().state_dict(), self.COUNT: torch.tensor([self.steps], dtype=torch.int64)}

    def load_state_dict(self, state: Tensors) -> None:
        state = dict(state)
        count = state.pop(self.COUNT, None)
        super().load_state_dict(state)
        self.steps = int(count.item()) if count is not None else 0


class FedAdam(OuterOptimizer):
    """m ← β1·m + (1−β1)·Δ; v ← β2·v + (1−β2)·Δ²; θ ← θ − η·m / (√v + τ)."""

    buffer_names = ("m", "v")

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.mul_(self.cfg.beta2).add_(d2, alpha=1 - self.cfg.beta2)

    def _update(self, p, d, m, v):
        m.mul_(self.cfg.beta1).add_(d, alpha=1 - self.cfg.beta1)
        self._second_moment(v, d * d)
        p.sub_(self.lr * m / (v.sqrt() + self.cfg.tau))


class FedYogi(FedAdam):
    """As FedAdam, but v ← v − (1−β2)·Δ²·sign(v − Δ²): v grows only as fast as Δ² demands."""

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.sub_((1 - self.cfg.beta2) * d2 * torch.sign(v - d2))


OUTER_OPTIMIZERS: dict[str, type[OuterOptimizer]] = {
    "fedavg": FedAvg, "fedmom": FedMom, "nesterov": Nesterov, "delayed-nesterov": DelayedNesterov,
    "fedadam": FedAdam, "fedyogi": FedYogi,
}


def lr_at(cfg: OuterConfig, step: int, steps: int) -> float:
    """The outer LR of outer step `step` (0-based) of `steps`: constant, or a cosine from `lr` at the first step
    to `lr × min_lr_ratio` at the last (held there past it, as when a run is extended): the inner schedule's
    curve, without warmup, reaching its floor at the last step."""
    if cfg.schedule == "constant":
        return cfg.lr
    return get_lr(step, cfg.lr, 0, max(1, steps - 1), cfg.min_lr_ratio)


def make_outer(cfg: OuterConfig) -> OuterOptimizer:
    return OUTER_OPTIMIZERS[cfg.name](cfg)
