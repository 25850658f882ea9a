"""One federated round, engine-free: sample clients, hand tasks to idle nodes, fold replies, outer step.

Nodes pull work: whenever a node returns a result it is given the next pending client, so K may exceed the
number of nodes. A reply that errors, fails validation or misses the deadline is dropped and its client
re-queued (up to `max_attempts`); the round completes with the survivors if at least `min_replies` came
back, and only clients that succeeded advance in the client table. The engine is a `Transport`: Flower's
Grid in production, a direct call in tests.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from photon.config import RunConfig
import statistics

from photon.federation.aggregate import OrderedFold, RobustFold, StreamingMean, clip_update, update_norm
from photon.federation.outer import make_outer
from photon.federation.server_state import ServerState
from photon.federation.task import ClientReply, ClientTask, Tensors, tensor_bytes

log = logging.getLogger(__name__)


class Transport(Protocol):
    """How tasks reach nodes. `collect` returns (handle, reply) pairs; a str reply is an error message."""

    def nodes(self) -> list[int]: ...

    def submit(self, node: int, task: ClientTask, params: Tensors) -> str: ...

    def collect(self, timeout: float) -> list[tuple[str, ClientReply | str]]: ...


@dataclass
class RoundResult:
    round: int
    ok: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    loss: float = float("nan")
    bytes_down: int = 0
    bytes_up: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    critical_train_seconds: float = 0.0  # the busiest node's time inside local training
    wall_seconds: float = 0.0
    committed: bool = False


def check_reply(reply: ClientReply, reference: Tensors) -> str | None:
    """Why a reply must be rejected (names, shapes, dtypes, finiteness), or None if it is sound."""
    if set(reply.params) != set(reference):
        missing, extra = set(reference) - set(reply.params), set(reply.params) - set(reference)
        return f"parameter names differ (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
    for name, ref in reference.items():
        t = reply.params[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            return f"{name}: got {t.dtype} {tuple(t.shape)}, expected {ref.dtype} {tuple(ref.shape)}"
        if not all(torch.isfinite(c).all() for c in t.reshape(-1).split(1 << 20)):  # a chunk at a time
            return f"{name}: non-finite values"
    if reply.samples <= 0:
        return f"non-positive sample count {reply.samples}"
    return None


class Aggregator:
    """Owns the server state between rounds; `run_round` drives one round over a transport."""

    def __init__(self, cfg: RunConfig, state: ServerState, spans: list[list[dict]], task_config: dict,
                 spill_dir: Path | None = None):
        """`spill_dir` holds replies that arrive ahead of their turn (see `aggregate.OrderedFold`)."""
        self.spill_dir = spill_dir or Path(tempfile.gettempdir()) / f"photon-spill-{os.getpid()}"
        self.cfg = cfg
        self.state = state
        self.spans = spans
        self.task_config = task_config
        self.outer = make_outer(cfg.federation.outer)
        self.outer.load_state_dict(state.outer_state)

    def sample_clients(self) -> list[int]:
        """K of N clients uniformly without replacement, from the checkpointed RNG."""
        rng = self.state.rng()
        n, k = len(self.state.clients), self.cfg.federation.clients_per_round
        picked = sorted(int(i) for i in rng.choice(n, size=k, replace=False))
        self.state.rng_state = rng.bit_generator.state
        return picked

    def task(self, client_id: int, attempt: int) -> ClientTask:
        rec, fed = self.state.clients[client_id], self.cfg.federation
        return ClientTask(client_id=client_id, round=self.state.round, global_step=self.state.global_step,
                          cursor=rec.cursor, local_steps=fed.local_steps, schedule_steps=self.cfg.federated_steps,
                          spans=self.spans[client_id], config=self.task_config,
                          client_optimizer=fed.client_optimizer, attempt=attempt)

    def run_round(self, transport: Transport, timeout_s: float | None = None, max_attempts: int = 2) -> RoundResult:
        fed = self.cfg.federation
        start = time.perf_counter()
        deadline = start + (timeout_s or fed.round_timeout_s)
        result = RoundResult(round=self.state.round)
        sampled = self.sample_clients()
        if fed.aggregation == "mean":
            fold = OrderedFold(sampled, self.spill_dir)
        else:
            fold = RobustFold(sampled, self.spill_dir, fed.aggregation, fed.trim_fraction)
        replies: dict[int, ClientReply] = {}
        norms: list[float] = []
        queue, attempts = deque(sampled), Counter()
        in_flight: dict[str, tuple[int, int]] = {}
        node_train: Counter[int] = Counter()
        model_bytes = tensor_bytes(self.state.params)
        while (queue or in_flight) and time.perf_counter() < deadline:
            busy = {node for node, _ in in_flight.values()}
            for node in [n for n in transport.nodes() if n not in busy]:
                if not queue:
                    break
                cid = queue.popleft()
                attempts[cid] += 1
                handle = transport.submit(node, self.task(cid, attempts[cid]), self.state.params)
                in_flight[handle] = (node, cid)
                result.bytes_down += model_bytes
            if not in_flight:
                time.sleep(0.5)  # no node connected yet: wait for one rather than spin
                continue
            for handle, reply in transport.collect(min(1.0, max(0.0, deadline - time.perf_counter()))):
                node, cid = in_flight.pop(handle)
                reason = reply if isinstance(reply, str) else check_reply(reply, self.state.params)
                if not isinstance(reply, str):
                    result.bytes_up += tensor_bytes(reply.params)
                    node_train[node] += reply.train_seconds
                if reason is None:
                    reason = self._screen(reply, norms)
                if reason is None:
                    fold.add(cid, reply.params, float(reply.samples))  # empties reply.params
                    replies[cid] = reply
                    continue
                log.warning("round %d: client %d attempt %d rejected: %s", self.state.round + 1, cid, attempts[cid],
                            reason)
                result.failed.append(f"client {cid}: {reason}")
                self.state.clients[cid].failures += 1
                if attempts[cid] < max_attempts:
                    queue.append(cid)
                else:
                    fold.give_up(cid)
        for _, cid in in_flight.values():
            result.failed.append(f"client {cid}: missed the round deadline")
            self.state.clients[cid].failures += 1
        mean = fold.finish()
        result.ok = sorted(replies)
        result.critical_train_seconds = max(node_train.values(), default=0.0)
        if len(replies) >= fed.min_replies:
            self._commit(mean, replies, result)
            self.state.last_norms = norms
        result.wall_seconds = time.perf_counter() - start
        return result

    def _screen(self, reply: ClientReply, norms: list[float]) -> str | None:
        """Norm check against the previous round's median (order-independent), then optional clipping.

        In the first round there is no previous median yet: the median of this round's replies so far is used.
        """
        fed = self.cfg.federation
        norm = update_norm(reply.params, self.state.params)
        reference = self.state.last_norms or norms
        if fed.max_norm_ratio is not None and reference:
            limit = fed.max_norm_ratio * statistics.median(reference)
            if norm > limit:
                return f"update norm {norm:.3g} exceeds {fed.max_norm_ratio:g}× the median {limit / fed.max_norm_ratio:.3g}"
        if fed.clip_update_norm is not None:
            clip_update(reply.params, self.state.params, fed.clip_update_norm, norm)
        norms.append(norm)
        return None

    def _commit(self, mean: StreamingMean, replies: dict[int, ClientReply], result: RoundResult) -> None:
        self.outer.step(self.state.params, mean.pseudo_gradient(self.state.params))
        self.state.outer_state = self.outer.state_dict()
        for cid, reply in replies.items():
            rec = self.state.clients[cid]
            rec.cursor, rec.steps, rec.samples = reply.cursor, rec.steps + reply.steps, rec.samples + reply.samples
            rec.rounds += 1
        steps = max(r.steps for r in replies.values())
        result.tokens = sum(r.samples for r in replies.values()) * self.cfg.train.seq_len
        result.loss = sum(r.loss * r.samples for r in replies.values()) / sum(r.samples for r in replies.values())
        result.train_seconds = sum(r.train_seconds for r in replies.values())
        self.state.global_step += steps  # Photon: the largest local step count of the round
        self.state.round += 1
        for key, value in (("bytes_up", result.bytes_up), ("bytes_down", result.bytes_down),
                           ("tokens", result.tokens)):
            self.state.totals[key] = self.state.totals.get(key, 0) + value
        result.committed = True
