"""Centered clipping: a robust way to combine a round's parked updates that caps each one's influence.

Centered clipping (Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization",
ICML 2021) starts from a centre v and repeats, `iterations` times,

    v ← v + Σ_k w_k · clip_τ(x_k − v) / Σ_k w_k,    clip_τ(z) = z · min(1, τ / ‖z‖),

so one update can move v by at most τ · w_k / Σ w per iteration, however large it is. The centre is the
caller's previous aggregate (zero without one) or the coordinate-wise median of the updates; τ is fixed or
the median over k of ‖x_k − v‖ times a factor, recomputed every iteration. With bucketing (Karimireddy, He,
Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing", ICLR 2022) the updates are first
shuffled with a seeded RNG and averaged (weighted) in consecutive buckets of `bucket_size`, and the whole
rule, centre included, runs on the bucket means with each bucket weighing its members' total: honest
clients with different data then look alike, so the radius does not have to cut them.

Guarantees, the same as `fold.combine`'s:
  * Memory: the updates are read from the `ReplyBuffer`'s files a chunk of coordinates at a time; the
    server holds the result (one fp32 model, which doubles as the centre between iterations) and a few
    K × CHUNK temporaries, whatever K is. It reads the files `iterations + 1` times.
  * Precision: the centre is kept in fp32 between passes (it is the result); every sum — bucket means,
    the clipped step, the squared distances — is taken in fp64 within a chunk and across chunks.
  * Determinism: the updates are taken in canonical order (their keys) and the bucket shuffle is drawn
    from `seed` over that order, so the result depends only on the set of (key, update, weight) and the
    seed, never on arrival order. All reductions run in a fixed order in numpy (pairwise sums, row by row
    weighted sums), not in threaded kernels, so a resumed run is bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from photon.federation.fold import Parked, ReplyBuffer, Tensors, median_rows


@dataclass(frozen=True)
class ClipRule:
    """How to clip. `radius`: a fixed τ, or "median" for `radius_factor` × the median distance to the centre.
    `centre`: "previous" (the aggregate the caller passes in, zero if none) or "median" (coordinate-wise)."""

    centre: Literal["previous", "median"] = "previous"
    radius: float | Literal["median"] = "median"
    radius_factor: float = 1.0
    iterations: int = 1
    bucket_size: int = 1

    def __post_init__(self) -> None:
        if self.centre not in ("previous", "median"):
            raise ValueError(f"clip centre must be 'previous' or 'median', not {self.centre!r}")
        if isinstance(self.radius, str):
            if self.radius != "median":
                raise ValueError(f"clip radius must be a positive number or 'median', not {self.radius!r}")
        elif not (self.radius > 0 and math.isfinite(self.radius)):
            raise ValueError(f"clip radius must be a positive number, not {self.radius!r}")
        if not (self.radius_factor > 0 and math.isfinite(self.radius_factor)):
            raise ValueError(f"clip radius factor must be positive, not {self.radius_factor!r}")
        if self.iterations < 1:
            raise ValueError(f"clip iterations must be at least 1, not {self.iterations}")
        if self.bucket_size < 1:
            raise ValueError(f"bucket size must be at least 1, not {self.bucket_size}")


def buckets(count: int, bucket_size: int, seed: int | Sequence[int]) -> list[list[int]]:
    """Row indices (into the canonical order) grouped into buckets: consecutive runs of `bucket_size` of a
    permutation drawn from `seed`; the last bucket may be smaller. Size 1 keeps the canonical order."""
    if bucket_size == 1:
        return [[i] for i in range(count)]
    order = np.random.default_rng(seed).permutation(count).tolist()
    return [order[i:i + bucket_size] for i in range(0, count, bucket_size)]


def scale_factor(distance: float, radius: float) -> float:
    """min(1, τ / ‖z‖), written so that a zero distance (or a zero radius) never divides by zero."""
    return 1.0 if distance <= radius else radius / distance


def centered_clip(buffer: ReplyBuffer, clients: list[int], rule: ClipRule,
                  previous: Mapping[str, torch.Tensor] | None = None,
                  seed: int | Sequence[int] = 0) -> tuple[Tensors, dict[int, float]]:
    """Δ from the named parked updates by (bucketed) centered clipping, as fp32 tensors in `buffer.layout`.

    `previous` is the centre for `rule.centre == "previous"` (ignored otherwise); `seed` draws the buckets.
    Also returns each client's scale factor min(1, τ / ‖x − v‖) of the last iteration (a bucketed client gets
    its bucket's): below 0.5, the update counted for less than half of its weight."""
    parked = buffer.ordered(clients)
    assert parked, "centered clipping of no updates"
    groups = buckets(len(parked), rule.bucket_size, seed)
    member_w = np.array([p.weight for p in parked], dtype=np.float64)
    weights = np.array([member_w[g].sum() for g in groups], dtype=np.float64)
    assert (member_w >= 0).all() and all(w > 0 for w in weights), "centered clipping needs positive weights"
    coef = weights / weights.sum()

    out = {name: torch.zeros(shape, dtype=torch.float32) for name, shape in buffer.layout}
    if rule.centre == "previous" and previous is not None:
        for name, shape in buffer.layout:
            assert tuple(previous[name].shape) == tuple(shape), f"previous aggregate {name} has the wrong shape"
            out[name].copy_(previous[name].detach().to(torch.float32))

    # First pass: place the centre (the median needs the points), and measure the distances to it.
    sq = np.zeros(len(groups), dtype=np.float64)
    for name, start, points in _points(buffer, parked, groups, member_w):
        v = out[name].view(-1)[start:start + points.shape[1]]
        if rule.centre == "median":
            v.copy_(median_rows(torch.from_numpy(points)).to(torch.float32))
        sq += _squared_distances(points, v.numpy())

    # One pass per iteration: step the centre a chunk at a time, and (but for the last) measure the
    # distances to the new centre on the way, as each chunk of it is final once stepped.
    for it in range(rule.iterations):
        last = it == rule.iterations - 1
        distances = np.sqrt(sq)
        radius = (rule.radius_factor * statistics.median(distances.tolist()) if rule.radius == "median"
                  else float(rule.radius))
        scales = np.array([scale_factor(d, radius) for d in distances.tolist()], dtype=np.float64)
        step_coef = (coef * scales).tolist()
        sq = np.zeros(len(groups), dtype=np.float64)
        for name, start, points in _points(buffer, parked, groups, member_w):
            v32 = out[name].view(-1)[start:start + points.shape[1]]
            v = v32.numpy().astype(np.float64)
            step = np.zeros_like(v)
            for c, row in zip(step_coef, points):  # row by row: a fixed order of fp64 additions
                step += c * (row.astype(np.float64) - v)
            v32.copy_(torch.from_numpy(v + step))
            if not last:
                sq += _squared_distances(points, v32.numpy())

    per_client = {parked[i].client: float(scales[b]) for b, group in enumerate(groups) for i in group}
    return out, per_client


def _points(buffer: ReplyBuffer, parked: list[Parked], groups: list[list[int]],
            member_w: np.ndarray) -> Iterator[tuple[str, int, np.ndarray]]:
    """(tensor name, first element, [buckets, n] block of the bucket means), a chunk at a time: fp64 means,
    or without bucketing the fp32 updates themselves (the callers widen a row at a time)."""
    for name, start, block in buffer.chunks(parked):
        rows = block.numpy()
        if all(group == [i] for i, group in enumerate(groups)):
            yield name, start, rows
            continue
        points = np.empty((len(groups), rows.shape[1]), dtype=np.float64)
        for b, group in enumerate(groups):
            if len(group) == 1:
                points[b] = rows[group[0]]
                continue
            acc = np.zeros(rows.shape[1], dtype=np.float64)
            for i in group:  # in the drawn order, so the fp64 sum is fixed by the seed
                acc += member_w[i] * rows[i].astype(np.float64)
            points[b] = acc / member_w[group].sum()
        yield name, start, points


def _squared_distances(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """‖p − v‖² of each row over this chunk, in fp64, a row at a time (numpy's pairwise sum, not BLAS: the
    same on any thread count)."""
    v = centre.astype(np.float64)
    return np.array([np.square(row.astype(np.float64) - v).sum() for row in points], dtype=np.float64)
