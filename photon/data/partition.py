"""Split the prepared training tokens into N logical clients (iid, by-domain, dirichlet).

A partition is a small JSON-able manifest of contiguous token spans per client; every training token
belongs to exactly one client. It never copies tokens: ``client_stream`` reads the spans from the memmaps.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np

from photon.config import PartitionConfig, RunConfig
from photon.data.shards import Prepared, TokenStream, rows_in
from photon.errors import UserError

Span = tuple[str, int, int]  # (domain, start, end) in the domain's train tokens


def _slices(n: int, weights: np.ndarray) -> np.ndarray:
    """Boundaries cutting ``n`` tokens into contiguous slices proportional to ``weights`` (sum to n exactly)."""
    total = weights.sum()
    w = weights / total if total > 0 else np.full(len(weights), 1 / len(weights))
    bounds = np.rint(np.concatenate([[0.0], np.cumsum(w)]) * n).astype(np.int64)
    bounds[-1] = n  # rounding must not lose or invent a token
    return np.maximum.accumulate(bounds)


def _iid(sizes: dict[str, int], n: int) -> list[list[Span]]:
    clients: list[list[Span]] = [[] for _ in range(n)]
    for d, size in sizes.items():
        b = _slices(size, np.ones(n))
        for i in range(n):
            clients[i].append((d, int(b[i]), int(b[i + 1])))
    return clients


def _by_domain(sizes: dict[str, int], n: int) -> list[list[Span]]:
    """Each client holds one or more whole domains, or, when N exceeds the domains, a slice of exactly one.

    N <= domains: domains, largest first, each go to the client with the fewest tokens so far (ties to the
    lowest id), which balances client sizes while keeping domains whole.
    N > domains: every domain gets one client, then each further client goes to the domain with the most
    tokens per client (D'Hondt), and a domain is cut into equal contiguous slices among its clients. Client
    ids run through the domains largest first.
    """
    order = sorted(sizes, key=lambda d: (-sizes[d], d))
    clients: list[list[Span]] = [[] for _ in range(n)]
    if n <= len(order):
        heap = [(0, i) for i in range(n)]
        for d in order:
            tokens, i = heapq.heappop(heap)
            clients[i].append((d, 0, sizes[d]))
            heapq.heappush(heap, (tokens + sizes[d], i))
        return clients
    share = {d: 1 for d in order}
    for _ in range(n - len(order)):
        d = max(order, key=lambda d: sizes[d] / share[d])  # max() keeps the first (largest) domain on ties
        share[d] += 1
    i = 0
    for d in order:
        b = _slices(sizes[d], np.ones(share[d]))
        for k in range(share[d]):
            clients[i].append((d, int(b[k]), int(b[k + 1])))
            i += 1
    return clients


def _dirichlet(sizes: dict[str, int], n: int, alpha: float, seed: int) -> list[list[Span]]:
    """Client i draws domain weights w_i ~ Dir(alpha); domain d is cut among clients in proportion to w_{·d}."""
    domains = sorted(sizes)
    w = np.random.default_rng(seed).dirichlet(np.full(len(domains), alpha), size=n)  # (clients, domains)
    clients: list[list[Span]] = [[] for _ in range(n)]
    for j, d in enumerate(domains):
        b = _slices(sizes[d], w[:, j])
        for i in range(n):
            clients[i].append((d, int(b[i]), int(b[i + 1])))
    return clients


def make_partition(prepared_manifest: dict[str, Any], cfg: PartitionConfig) -> dict[str, Any]:
    """The partition manifest: ``{kind, num_clients, alpha, seed, clients: [{id, spans, tokens}]}``."""
    sizes = {d: int(e["train"]["tokens"]) for d, e in sorted(prepared_manifest["domains"].items())}
    n = cfg.num_clients
    if cfg.kind == "iid":
        clients = _iid(sizes, n)
    elif cfg.kind == "by-domain":
        clients = _by_domain(sizes, n)
    else:
        clients = _dirichlet(sizes, n, cfg.alpha, cfg.seed)
    return {
        "kind": cfg.kind,
        "num_clients": n,
        "alpha": cfg.alpha,
        "seed": cfg.seed,
        "clients": [
            {"id": i,
             "spans": [{"domain": d, "start": s, "end": e} for d, s, e in spans if e > s],
             "tokens": sum(e - s for _, s, e in spans)}
            for i, spans in enumerate(clients)
        ],
    }








def _span_rows(spans: list[dict[str, Any]], seq_len: int) -> int:
    return sum(rows_in(s["end"] - s["start"], seq_len) for s in spans)


def _max_clients(manifest: dict[str, Any], part: dict[str, Any], seq_len: int) -> int:
    """The largest N <= part's N at which every client would still have one row of seq_len + 1 tokens."""
    for n in range(part["num_clients"] - 1, 0, -1):
        cfg = PartitionConfig(kind=part["kind"], num_clients=n, alpha=part["alpha"], seed=part["seed"])
        if all(_span_rows(c["spans"], seq_len) >= 1 for c in make_partition(manifest, cfg)["clients"]):
            return n
    return 0


def client_seed(cfg: RunConfig, client_id: int) -> int:
    """Each client's data order has its own seed, derived from the run's."""
    return cfg.train.seed + client_id


def spans_stream(prepared: Prepared, spans: list[dict[str, Any]], seq_len: int, batch_size: int,
                 seed: int) -> TokenStream:
    """The TokenStream over `spans` of the prepared training memmaps, checked against the manifest.

    What a node calls with the spans a task names; `client_stream` adds the partition-level advice."""
    for s in spans:
        if s["domain"] not in prepared.manifest["domains"] or \
                s["end"] > prepared.manifest["domains"][s["domain"]]["train"]["tokens"]:
            raise UserError(f"the partition does not match the prepared data in {prepared.path} (span {s}); "
                            "delete the partition file and create it again")
    arrays = [prepared.tokens(s["domain"], "train")[s["start"]:s["end"]] for s in spans]
    return TokenStream(arrays, seq_len, batch_size, seed)


def client_stream(prepared: Prepared, part: dict[str, Any], client_id: int, seq_len: int, batch_size: int,
                  seed: int) -> TokenStream:
    """The TokenStream over one client's spans; too few tokens for a row says how many clients would fit."""
    clients = {c["id"]: c for c in part["clients"]}
    if client_id not in clients:
        raise UserError(f"client {client_id} is not in the partition (ids 0..{len(clients) - 1})")
    spans = clients[client_id]["spans"]
    if all(s["domain"] in prepared.manifest["domains"] for s in spans) and _span_rows(spans, seq_len) < 1:
        at_most = _max_clients(prepared.manifest, part, seq_len)
        fix = (f"use at most {at_most} clients (data.partition.num_clients) or lower train.seq_len" if at_most
               else "lower train.seq_len or prepare more data")
        raise UserError(f"client {client_id} of {part['num_clients']} ({part['kind']}) has "
                        f"{clients[client_id]['tokens']} tokens, no span of seq_len+1={seq_len + 1}; {fix}")
    return spans_stream(prepared, spans, seq_len, batch_size, seed)
