"""Folding a round's client updates into one pseudo-gradient, after screening them together.

Every accepted reply's update Δ_k = θ − θ_k waits on disk (raw fp32 in the model's name order) as soon as it
is decoded, so the server's RAM holds the global model and one reply, whatever K is. Once the round's
replies are in, the server decides on all of them at once (`screen`): an update whose norm is far above the
round's median, or that points away from most of the others (pairwise cosines), is rejected. Then the
accepted updates are combined (`combine`) a chunk of coordinates at a time, in a canonical order, into one
fp32 Δ (the weighted mean, or a coordinate-wise median / trimmed mean). The
decision and the sum never depend on the order replies arrived in, so a killed and resumed run lands on
exactly the parameters of an uninterrupted one. Files are read with plain reads, not memory maps, so pages of
K parked replies never count against the server's resident memory.
"""

from __future__ import annotations

import math
import shutil
import statistics
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from photon.federation.codec import Layout

Tensors = dict[str, torch.Tensor]
CHUNK = 1 << 20  # coordinates per step: K chunks of this many fp32/fp64 values are the only temporaries


@dataclass
class Parked:
    """One accepted-so-far update waiting on disk, with what the screen and the sum need."""

    key: tuple          # canonical order (sync: position in the sampled list; async: version, client)
    client: int
    weight: float
    norm: float
    path: Path


class ReplyBuffer:
    """The round's decoded updates, parked on disk as raw fp32 in `layout` order."""

    def __init__(self, spill_dir: Path, layout: Layout):
        self.dir = Path(spill_dir)
        self.layout = list(layout)
        self.parked: dict[int, Parked] = {}  # by client
        self._offsets: list[tuple[str, tuple[int, ...], int, int]] = []  # name, shape, first element, numel
        offset = 0
        for name, shape in self.layout:
            n = int(np.prod(shape, dtype=np.int64))
            self._offsets.append((name, tuple(shape), offset, n))
            offset += n

    def add(self, key: tuple, client: int, update: Mapping[str, torch.Tensor], weight: float) -> float:
        """Check `update` is finite, park it, return its L2 norm. ValueError if it has non-finite values."""
        total = 0.0
        for name, _ in self.layout:
            for chunk in update[name].reshape(-1).split(CHUNK):
                if not torch.isfinite(chunk).all():
                    raise ValueError(f"update {name} has non-finite values")
                total += float(chunk.double().square().sum())
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"client_{client:06d}.f32"
        with open(path, "wb") as f:
            for name, _ in self.layout:
                f.write(update[name].detach().to(torch.float32).contiguous().numpy().data)
        norm = math.sqrt(total)
        self.parked[client] = Parked(key, client, weight, norm, path)
        return norm

    def drop(self, client: int) -> None:
        parked = self.parked.pop(client, None)
        if parked is not None:
            parked.path.unlink(missing_ok=True)

    def ordered(self, clients: list[int] | None = None) -> list[Parked]:
        chosen = self.parked.values() if clients is None else [self.parked[c] for c in clients]
        return sorted(chosen, key=lambda p: p.key)

    def chunks(self, parked: list[Parked]) -> Iterator[tuple[str, int, torch.Tensor]]:
        """(tensor name, first element within the tensor, [k, n] fp32 block of the k parked updates)."""
        files = [open(p.path, "rb") for p in parked]
        try:
            for name, _, first, numel in self._offsets:
                for start in range(0, numel, CHUNK):
                    n = min(CHUNK, numel - start)
                    block = np.empty((len(files), n), dtype=np.float32)
                    for row, f in enumerate(files):
                        f.seek(4 * (first + start))
                        got = f.readinto(memoryview(block[row]).cast("B"))
                        if got != 4 * n:
                            raise OSError(f"spilled update {f.name} is truncated")
                    yield name, start, torch.from_numpy(block)
        finally:
            for f in files:
                f.close()

    def clear(self) -> None:
        self.parked.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# The screen: decided once, on all of the round's updates


def median_rows(block: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of the rows (the mean of the two middle values for an even count), fp64."""
    k = block.shape[0]
    ordered = block.sort(dim=0).values.double()
    return (ordered[(k - 1) // 2] + ordered[k // 2]) / 2


def gram(buffer: ReplyBuffer, parked: list[Parked]) -> torch.Tensor:
    """G[i, j] = Δ_i · Δ_j over all coordinates (fp64), one pass over the parked updates a chunk at a time."""
    g = torch.zeros(len(parked), len(parked), dtype=torch.float64)
    for _, _, block in buffer.chunks(parked):
        b = block.double()
        g += b @ b.T
    return g


def pairwise_cosines(g: torch.Tensor) -> torch.Tensor:
    norms = g.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(norms, norms)
    return torch.where(denom > 0, g / denom.clamp_min(1e-300), torch.zeros_like(g))


@dataclass
class Screened:
    accepted: list[int]
    rejected: dict[int, str]
    cosines: dict[int, float]  # each update's median cosine to the others
    norms: dict[int, float]


MIN_FOR_CONSENSUS = 3  # with fewer replies there is no majority to tell an outlier from the rest
DISAGREES = "update disagrees with the round's majority"  # how a direction-screen rejection begins


def screen(buffer: ReplyBuffer, max_norm_ratio: float | None, min_cosine: float | None,
           previous_norms: list[float]) -> Screened:
    """Accept or reject every parked update at once.

    Norm: an update longer than `max_norm_ratio` × the median norm of the round's updates is rejected (with
    fewer than 3 updates, the previous round's median is the reference). Direction: with at least 3 updates,
    one is accepted only if its cosine with at least half of the other updates (rounded up) is at least
    `min_cosine`, i.e. it agrees with a majority. Pairwise cosines, not a cosine to a coordinate-wise median:
    with an even count the median takes the honest values nearest an outlier and leans towards it, so a
    reversed, scaled update can end up *aligned* with it. Both decisions read all of the round's updates,
    so they do not depend on arrival order."""
    parked = buffer.ordered()
    norms = {p.client: p.norm for p in parked}
    rejected: dict[int, str] = {}
    cosines: dict[int, float] = {}
    enough = len(parked) >= MIN_FOR_CONSENSUS
    reference = statistics.median(norms.values()) if enough else (
        statistics.median(previous_norms) if previous_norms else None)
    if max_norm_ratio is not None and reference:
        for p in parked:
            if p.norm > max_norm_ratio * reference:
                rejected[p.client] = (f"update norm {p.norm:.3g} exceeds {max_norm_ratio:g}× the median "
                                      f"{reference:.3g}")
    if min_cosine is not None and enough:
        cos = pairwise_cosines(gram(buffer, parked))
        need = math.ceil((len(parked) - 1) / 2)
        for i, p in enumerate(parked):
            others = torch.cat([cos[i, :i], cos[i, i + 1:]])
            cosines[p.client] = float(others.median())
            agree = int((others >= min_cosine).sum())
            if agree < need and p.client not in rejected:
                rejected[p.client] = (f"{DISAGREES}: cosine >= {min_cosine:g} with "
                                      f"only {agree} of the {len(others)} other updates (median cosine "
                                      f"{cosines[p.client]:.3f})")
    accepted = [p.client for p in parked if p.client not in rejected]
    return Screened(accepted, rejected, cosines, norms)


# ---------------------------------------------------------------------------------------------------------
# Combining accepted updates into Δ


def combine(buffer: ReplyBuffer, clients: list[int], kind: str = "mean", trim_fraction: float | None = None,
            clip_norm: float | None = None) -> Tensors:
    """Δ from the accepted updates, in canonical order: the weighted mean (fp64 sums, rounded once to fp32),
    or the unweighted coordinate-wise median / trimmed mean. `clip_norm` scales each update down to that
    L2 norm first."""
    assert kind in ("mean", "median", "trimmed-mean"), kind
    assert kind != "trimmed-mean" or trim_fraction is not None, "trimmed-mean needs federation.trim_fraction"
    parked = buffer.ordered(clients)
    assert parked, "combine of no updates"
    scale = torch.tensor([min(1.0, clip_norm / p.norm) if clip_norm and p.norm > 0 else 1.0 for p in parked],
                         dtype=torch.float64)
    weights = torch.tensor([p.weight for p in parked], dtype=torch.float64)
    coef = (scale * weights / weights.sum())
    out = {name: torch.empty(shape, dtype=torch.float32) for name, shape in buffer.layout}
    for name, start, block in buffer.chunks(parked):
        if kind == "mean":  # row by row in canonical order: elementwise, so bitwise the same on any thread count
            value = torch.zeros(block.shape[1], dtype=torch.float64)
            for c, row in zip(coef.tolist(), block):
                value.add_(row.double(), alpha=c)
        else:
            value = robust_statistic(block.double() * scale[:, None], kind, trim_fraction)
        out[name].view(-1)[start:start + block.shape[1]] = value.to(torch.float32)
    return out


def contributor_mean(buffer: ReplyBuffer, clients: list[int]) -> Tensors:
    """SparseLoCo's aggregate of sparse updates: each update's tensor is first scaled down to the median norm of
    that tensor over the round's updates (the lower median, as torch.median), then each coordinate is the mean
    over the updates that sent it (non-zero there), not over all K: a coordinate one client kept is not
    divided by K. Unweighted, in canonical order, fp64 sums rounded once to fp32 (bitwise on any threads)."""
    parked = buffer.ordered(clients)
    assert parked, "combine of no updates"
    return contributor_mean_of(buffer.layout, lambda: buffer.chunks(parked))


def in_memory_chunks(layout: Layout, updates: list[Mapping[str, torch.Tensor]]) -> Iterator[tuple[str, int,
                                                                                                   torch.Tensor]]:
    """The chunks `ReplyBuffer.chunks` yields, from fp32 tensors in memory (the same blocks, the same order)."""
    for name, shape in layout:
        numel = math.prod(shape)
        flats = [u[name].reshape(-1) for u in updates]
        for start in range(0, numel, CHUNK):
            yield name, start, torch.stack([f[start:start + CHUNK] for f in flats]).to(torch.float32)


def contributor_mean_of(layout: Layout, chunks) -> Tensors:
    """`contributor_mean` over `chunks()` (called twice: norms, then the sum), whatever holds the rows."""
    squares: dict[str, torch.Tensor] = {}
    for name, _, block in chunks():
        b = block.double()
        squares[name] = squares[name] + (b * b).sum(1) if name in squares else (b * b).sum(1)
    scales = {}
    for name, sq in squares.items():
        norms = sq.sqrt()
        median = norms.sort().values[(len(norms) - 1) // 2]
        scales[name] = torch.where(norms > median, median / norms.clamp_min(1e-300), torch.ones_like(norms))
    out = {name: torch.empty(shape, dtype=torch.float32) for name, shape in layout}
    for name, start, block in chunks():
        value = torch.zeros(block.shape[1], dtype=torch.float64)
        for c, row in zip(scales[name].tolist(), block):
            value.add_(row.double(), alpha=c)
        count = (block != 0).sum(0).clamp_min(1)
        out[name].view(-1)[start:start + block.shape[1]] = (value / count).to(torch.float32)
    return out


def robust_statistic(block: torch.Tensor, kind: str, trim_fraction: float) -> torch.Tensor:
    """Coordinate-wise median, or mean after cutting `trim_fraction` of the rows from each end."""
    k = block.shape[0]
    if kind == "median":
        return median_rows(block)
    cut = min(int(k * trim_fraction), (k - 1) // 2)
    return block.sort(dim=0).values[cut:k - cut].mean(dim=0)
