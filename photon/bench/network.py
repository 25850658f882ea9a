"""A small, documented network model: measured compute seconds and measured bytes in, modelled wall time out.

Assumptions (kept simple on purpose, and stated in claims.md):
- Every worker (a Photon client, or a data-parallel rank) sits behind its own link of `bandwidth_bps` in each
  direction, with one-way `latency_s` per message; the Photon server's link is not the bottleneck (it can be
  sharded or replicated), so the K clients download and upload in parallel.
- Photon round = the slowest client's local training + download θ + upload θ_k + `round_overhead_s`
  (scheduling, (de)serialization) + the measured set-up/aggregation time. No overlap of compute and transfer.
- Data-parallel step = compute + a ring all-reduce of the gradients: 2(n−1) sequential phases, each sending
  model_bytes/n over every link (Patarasuk & Yuan 2009), without overlapping backward (an upper bound on
  DDP's cost; perfect overlap would hide up to one backward pass of it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Network:
    name: str
    bandwidth_bps: float  # bits per second, each direction, per worker link
    latency_s: float  # one-way, per message
    round_overhead_s: float = 0.5  # per Photon round, on top of the measured aggregation time

    def transfer_seconds(self, nbytes: float) -> float:
        """Time to send one message of `nbytes` over one link."""
        return self.latency_s + 8.0 * nbytes / self.bandwidth_bps

    def with_bandwidth(self, bandwidth_bps: float) -> Network:
        return Network(self.name, bandwidth_bps, self.latency_s, self.round_overhead_s)


# The three links of the comparison; latencies are typical round-trip/2 for a WAN, a LAN and a datacenter.
NETWORKS = (
    Network("100 Mbps", 100e6, latency_s=10e-3),
    Network("1 Gbps", 1e9, latency_s=1e-3),
    Network("10 Gbps", 10e9, latency_s=0.1e-3),
)


def ring_allreduce_seconds(model_bytes: float, workers: int, net: Network) -> float:
    """Ring all-reduce of `model_bytes` among `workers`: 2(n−1) phases of model_bytes/n each."""
    if workers <= 1:
        return 0.0
    return 2 * (workers - 1) * net.transfer_seconds(model_bytes / workers)


def ring_allreduce_bytes(model_bytes: float, workers: int) -> float:
    """Bytes each worker sends per all-reduce: 2(n−1)/n × model bytes."""
    return 2 * (workers - 1) / workers * model_bytes if workers > 1 else 0.0


def photon_round_seconds(compute_s: float, bytes_down: float, bytes_up: float, net: Network,
                         server_s: float = 0.0) -> float:
    """One Photon round for one client (all clients in parallel): train, then θ down and θ_k up."""
    return compute_s + net.transfer_seconds(bytes_down) + net.transfer_seconds(bytes_up) + net.round_overhead_s \
        + server_s


def data_parallel_step_seconds(compute_s: float, model_bytes: float, workers: int, net: Network) -> float:
    return compute_s + ring_allreduce_seconds(model_bytes, workers, net)


def crossovers(photon_s: Callable[[float], float], dp_s: Callable[[float], float], lo_bps: float = 1e6,
               hi_bps: float = 1e12, points: int = 241) -> list[float]:
    """Bandwidths in [lo, hi] where photon_s(bw) − dp_s(bw) changes sign (log-spaced scan, then bisection)."""
    def diff(log_bw: float) -> float:
        bw = 10 ** log_bw
        return photon_s(bw) - dp_s(bw)

    grid = [math.log10(lo_bps) + i * (math.log10(hi_bps) - math.log10(lo_bps)) / (points - 1) for i in range(points)]
    found = []
    for a, b in zip(grid, grid[1:]):
        da, db = diff(a), diff(b)
        if da == 0:
            found.append(10 ** a)
        elif da * db < 0:
            for _ in range(60):
                mid = (a + b) / 2
                if diff(a) * diff(mid) <= 0:
                    b = mid
                else:
                    a = mid
            found.append(10 ** ((a + b) / 2))
    return found
