"""Streaming weighted mean of client models: replies are folded in one at a time and then dropped.

The server holds the global model, one fp32 accumulator and the reply being folded (3× the model),
whatever K is. Replies are folded in a canonical order (sampled client order), not arrival order, so the
result is bitwise reproducible however the network reorders replies, which is what makes a killed and
resumed run land on exactly the parameters of an uninterrupted one. A reply that arrives ahead of its
turn waits on disk as raw arrays (dtype and shape from the global model) and is read back one tensor at a
time, so waiting replies cost no RAM.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]


class StreamingMean:
    """Σ w_k·θ_k and Σ w_k, accumulated in the parameters' dtype."""

    def __init__(self) -> None:
        self.sum: Tensors = {}
        self.weight = 0.0
        self.count = 0

    def add(self, params: Tensors, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"aggregation weight must be positive, got {weight}")
        for name, t in params.items():
            acc = self.sum.get(name)
            if acc is None:
                self.sum[name] = t.detach().clone().mul_(weight)
            else:
                acc.add_(t, alpha=weight)
        self.weight += weight
        self.count += 1

    def mean(self, like: Tensors) -> Tensors:
        """The weighted mean (computed in float64, rounded once to each reference tensor's dtype)."""
        assert self.count > 0, "mean of no replies"
        return {name: (self.sum[name].double() / self.weight).to(ref.dtype) for name, ref in like.items()}

    def pseudo_gradient(self, params: Tensors) -> PseudoGradient:
        """Δ = θ − mean(θ_k), computed one tensor at a time as the outer optimizer asks."""
        assert self.count > 0, "pseudo-gradient of no replies"
        return PseudoGradient(params, self)


CHUNK = 1 << 20  # elements per float64 step: keeps temporaries small even for a 7B model's embedding


class PseudoGradient(Mapping[str, torch.Tensor]):
    """A read-only mapping name -> Δ tensor that never materialises the whole Δ at once.

    The outer optimizers ask for it a chunk at a time (`chunk`), computed in float64 and rounded once to θ's
    dtype; indexing by name gives a whole tensor (for inspection and tests).
    """

    def __init__(self, params: Tensors, mean: StreamingMean):
        self._params, self._mean = params, mean

    def chunk(self, name: str, sl: slice) -> torch.Tensor:
        p, acc = self._params[name].view(-1)[sl], self._mean.sum[name].reshape(-1)[sl]
        return (p.double() - acc.double() / self._mean.weight).to(p.dtype)

    def __getitem__(self, name: str) -> torch.Tensor:
        p = self._params[name]
        return torch.cat([self.chunk(name, slice(s, s + CHUNK)) for s in range(0, p.numel(), CHUNK)]
                         ).view(p.shape) if p.numel() else torch.empty_like(p)

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)


def update_norm(params: Mapping[str, torch.Tensor], reference: Tensors) -> float:
    """‖θ_k − θ‖₂ over all tensors, a chunk at a time."""
    total = 0.0
    for name, ref in reference.items():
        for pc, rc in zip(params[name].reshape(-1).split(CHUNK), ref.reshape(-1).split(CHUNK)):
            total += float((pc.double() - rc.double()).square().sum())
    return total ** 0.5


def clip_update(params: Tensors, reference: Tensors, max_norm: float, norm: float) -> None:
    """Scale θ_k − θ down to `max_norm` in place (per-update norm clipping); no-op if already within."""
    if norm <= max_norm:
        return
    scale = max_norm / norm
    for name, ref in reference.items():
        params[name].sub_(ref).mul_(scale).add_(ref)


class Spill:
    """Replies parked on disk as raw arrays, in sorted-name order; read back lazily (memory-mapped)."""

    def __init__(self, spill_dir: Path):
        self.dir = Path(spill_dir)
        self.layout: list[tuple[str, torch.dtype, tuple[int, ...]]] = []

    def path(self, client: int) -> Path:
        return self.dir / f"client_{client:06d}.bin"

    def write(self, client: int, params: Tensors) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.layout = [(name, t.dtype, tuple(t.shape)) for name, t in sorted(params.items())]
        with open(self.path(client), "wb") as f:
            for name, _, _ in self.layout:
                f.write(params[name].contiguous().numpy().data)

    def read(self, client: int) -> Mapping[str, torch.Tensor]:
        return _SpilledReply(self.path(client), self.layout)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class OrderedFold:
    """Folds replies into a `StreamingMean` in `order`, whatever order they arrive in.

    `add` a reply when it arrives; `give_up` on a client that will not reply this round. A reply whose
    predecessors are still pending is spilled to `spill_dir` and folded as soon as they resolve.
    """

    def __init__(self, order: list[int], spill_dir: Path):
        self.mean = StreamingMean()
        self._order = list(order)
        self._next = 0
        self._ready: dict[int, float | None] = {}  # client -> weight of its spilled reply, None = gave up
        self._spill = Spill(spill_dir)

    def add(self, client: int, params: Tensors, weight: float) -> None:
        """Fold (or park) a reply. Takes ownership: `params` is emptied, so its tensors are freed before any
        parked reply is read back."""
        if self._next < len(self._order) and self._order[self._next] == client:
            self.mean.add(params, weight)
            params.clear()
            self._next += 1
            self._drain()
        else:
            self._spill.write(client, params)
            params.clear()
            self._ready[client] = weight

    def give_up(self, client: int) -> None:
        self._ready[client] = None
        self._drain()

    def finish(self) -> StreamingMean:
        """Fold everything still waiting (clients that never replied are skipped)."""
        for client in self._order[self._next:]:
            self._ready.setdefault(client, None)
        self._drain()
        self._spill.clear()
        return self.mean

    def _drain(self) -> None:
        while self._next < len(self._order) and self._order[self._next] in self._ready:
            client = self._order[self._next]
            weight = self._ready.pop(client)
            if weight is not None:
                self.mean.add(self._spill.read(client), weight)
                self._spill.path(client).unlink()
            self._next += 1


class RobustFold:
    """Coordinate-wise median or trimmed mean of the replies (unweighted), computed at the end of the round.

    Not streaming by nature: every reply waits on disk and the statistic is taken a chunk of coordinates
    at a time, so RAM still holds only the global model, the result and K small chunks.
    """

    def __init__(self, order: list[int], spill_dir: Path, kind: str, trim_fraction: float = 0.2):
        assert kind in ("median", "trimmed-mean"), kind
        self.kind, self.trim = kind, trim_fraction
        self._order = list(order)
        self._spill = Spill(spill_dir)
        self._have: list[int] = []

    def add(self, client: int, params: Tensors, weight: float) -> None:
        self._spill.write(client, params)
        params.clear()
        self._have.append(client)

    def give_up(self, client: int) -> None:
        pass

    def finish(self) -> StreamingMean:
        out = StreamingMean()
        clients = [c for c in self._order if c in self._have]
        if clients:
            replies = [self._spill.read(c) for c in clients]
            for name, dtype, shape in self._spill.layout:
                result = torch.empty(shape, dtype=dtype)
                views = [r[name].reshape(-1) for r in replies]
                for start in range(0, result.numel(), CHUNK):
                    stacked = torch.stack([v[start:start + CHUNK] for v in views])
                    result.view(-1)[start:start + CHUNK] = self._statistic(stacked)
                out.sum[name] = result
            out.weight, out.count = 1.0, len(clients)
        self._spill.clear()
        return out

    def _statistic(self, stacked: torch.Tensor) -> torch.Tensor:
        k = stacked.shape[0]
        if self.kind == "median":
            # The mean of the two middle values for even K (torch.median would take the lower one).
            ordered = stacked.sort(dim=0).values
            return (ordered[(k - 1) // 2].double() + ordered[k // 2].double()).div(2).to(stacked.dtype)
        cut = min(int(k * self.trim), (k - 1) // 2)
        ordered = stacked.sort(dim=0).values
        return ordered[cut:k - cut].double().mean(dim=0).to(stacked.dtype)


class _SpilledReply(Mapping[str, torch.Tensor]):
    """A spilled reply read back lazily: each tensor is a memory-mapped view of its bytes in the file."""

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self._path, self._offsets = path, {}
        offset = 0
        for name, dtype, shape in layout:
            self._offsets[name] = (offset, dtype, shape)
            offset += torch.empty((), dtype=dtype).element_size() * int(np.prod(shape, dtype=np.int64))

    def __getitem__(self, name: str) -> torch.Tensor:
        offset, dtype, shape = self._offsets[name]
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        if int(np.prod(shape, dtype=np.int64)) == 0:
            return torch.empty(shape, dtype=dtype)
        array = np.memmap(self._path, dtype=np_dtype, mode="c", offset=offset, shape=shape)
        return torch.from_numpy(array)

    def __iter__(self) -> Iterator[str]:
        return iter(self._offsets)

    def __len__(self) -> int:
        return len(self._offsets)
