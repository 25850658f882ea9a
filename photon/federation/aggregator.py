"""One federated round, engine-free: sample clients, hand tasks to idle nodes, check and park replies, then
screen them together, fold the accepted ones and take the outer step.

Nodes pull work: whenever a node returns a result it is given the next pending client, so K may exceed the
number of nodes. Every reply is untrusted (protocol.decode_reply): one that errors, cannot be decoded, or
claims something its task did not ask for is rejected with a logged reason and its client re-queued (up to
`max_attempts`); a reply for a task no longer in flight (late, duplicate) is dropped and logged. Once the
round's replies are in, the screen (fold.screen) rejects outliers by norm and direction, the rest are
folded in a canonical order, and the round commits if at least `min_replies` survived: only those clients
advance in the client table, with the progress derived from their tasks. A node whose tasks keep failing
for different clients is excluded from the run. The engine is a `Transport`: Flower's Grid in production,
a direct call in tests.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from photon.config import RunConfig
from photon.errors import UserError
from photon.federation import codec
from photon.federation.client_state import MISSING, StateFiles
from photon.federation.fold import ReplyBuffer, combine, screen
from photon.federation.outer import make_outer
from photon.federation.protocol import STATE, UPDATE, ClientReply, ClientTask, Rejected, Wire, decode_reply, \
    encode_task
from photon.federation.server_state import ServerState
from photon.federation.worker import optimizer_state_layout

log = logging.getLogger(__name__)
MAX_REMEMBERED = 4096  # expired tasks remembered, to name the client of a late reply in the log


class Transport(Protocol):
    """How task messages reach nodes. `collect` yields (handle, reply) pairs one at a time (so the server
    decodes and parks one reply before the next): a `Wire`, a `Rejected` for a reply the transport could not
    even unwrap (malformed records), or a str, the node's error message (it could not run the task)."""

    def nodes(self) -> list[int]: ...

    def submit(self, node: int, wire: Wire) -> str: ...

    def collect(self, timeout: float) -> Iterable[tuple[str, Wire | Rejected | str]]: ...


@dataclass
class InFlight:
    task: ClientTask
    node: int
    sent: float


@dataclass
class RoundResult:
    round: int
    ok: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)           # every failed attempt, with its reason
    retried: set[int] = field(default_factory=set)            # clients that failed once and were re-queued
    dropped: dict[int, str] = field(default_factory=dict)     # clients left out of the round, final reason
    late: list[str] = field(default_factory=list)             # replies for tasks no longer in flight
    excluded: dict[int, str] = field(default_factory=dict)    # nodes excluded during this round
    norms: dict[int, float] = field(default_factory=dict)
    cosines: dict[int, float] = field(default_factory=dict)
    loss: float = float("nan")
    bytes_down: int = 0
    bytes_up: int = 0
    bytes_state_down: int = 0
    bytes_state_up: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    critical_train_seconds: float = 0.0  # the busiest node's time inside local training
    wall_seconds: float = 0.0
    committed: bool = False


class Aggregator:
    """Owns the server state between rounds; `run_round` drives one round over a transport."""

    def __init__(self, cfg: RunConfig, state: ServerState, spans: list[list[dict]], task_config: dict,
                 spill_dir: Path | None = None, state_dir: Path | None = None):
        """`spill_dir` parks the round's decoded updates; `state_dir` is the server's store of kept client
        state (a backup of each client's committed state, `federation.state_backup`)."""
        tmp = Path(tempfile.gettempdir()) / f"photon-server-{os.getpid()}"
        self.spill_dir = Path(spill_dir or tmp / "spill")
        self.store = StateFiles(state_dir or tmp / "client_state")
        self.cfg = cfg
        self.state = state
        self.spans = spans
        self.task_config = task_config
        self.outer = make_outer(cfg.federation.outer)
        self.outer.load_state_dict(state.outer_state)
        self.layout = codec.layout_of(state.params)
        self.state_layout = optimizer_state_layout(state.params)
        self.node_failures: dict[int, list[int]] = {}  # consecutive failed tasks per node: their clients
        self.excluded: dict[int, str] = {}
        self._expired: dict[str, ClientTask] = {}
        self._serial = itertools.count()
        self._model_payload: tuple[tuple[int, int], codec.Payload] | None = None

    # -----------------------------------------------------------------------------------------------------
    # What goes out

    def sample_clients(self) -> list[int]:
        """K of N clients uniformly without replacement, from the checkpointed RNG."""
        rng = self.state.rng()
        n, k = len(self.state.clients), self.cfg.federation.clients_per_round
        picked = sorted(int(i) for i in rng.choice(n, size=k, replace=False))
        self.state.rng_state = rng.bit_generator.state
        return picked

    def model_payload(self) -> codec.Payload:
        """The global model, encoded once per version."""
        key = (self.state.round, self.state.global_step)
        if self._model_payload is None or self._model_payload[0] != key:
            self._model_payload = None  # let the old bytes go first
            self._model_payload = (key, codec.encode(self.state.params))
        return self._model_payload[1]

    def task(self, client_id: int, attempt: int) -> ClientTask:
        rec, fed = self.state.clients[client_id], self.cfg.federation
        persist = fed.client_optimizer == "persist"
        return ClientTask(task_id=f"r{self.state.round}-c{client_id}-a{attempt}-{next(self._serial)}",
                          run_id=self.state.run_uid, client_id=client_id, round=self.state.round,
                          global_step=self.state.global_step, cursor=rec.cursor, local_steps=fed.local_steps,
                          schedule_steps=self.cfg.federated_steps, batch_size=self.cfg.train.batch_size,
                          spans=self.spans[client_id], config=self.task_config,
                          client_optimizer=fed.client_optimizer,
                          state_digest=rec.state_digest if persist else None,
                          upload_state=persist and fed.state_backup, attempt=attempt)

    def _pick(self, queue: deque[int], node: int) -> int:
        """The next queued client for `node`: one whose kept state it already holds, else the first."""
        for i, cid in enumerate(queue):
            if self.state.clients[cid].state_node == node:
                del queue[i]
                return cid
        return queue.popleft()

    def usable_nodes(self, transport: Transport) -> list[int]:
        nodes = transport.nodes()
        usable = [n for n in nodes if n not in self.excluded]
        if nodes and not usable:
            raise UserError(f"every node was excluded after repeated failures; last: "
                            f"{'; '.join(f'node {n}: {r}' for n, r in list(self.excluded.items())[-2:])}")
        return usable

    # -----------------------------------------------------------------------------------------------------
    # The round

    def run_round(self, transport: Transport, timeout_s: float | None = None, max_attempts: int = 2) -> RoundResult:
        fed = self.cfg.federation
        start = time.perf_counter()
        deadline = start + (timeout_s or fed.round_timeout_s)
        result = RoundResult(round=self.state.round)
        sampled = self.sample_clients()
        order = {cid: i for i, cid in enumerate(sampled)}
        buffer = ReplyBuffer(self.spill_dir, self.layout)
        replies: dict[int, ClientReply] = {}
        node_of: dict[int, int] = {}
        queue, attempts, attach, state_retried = deque(sampled), Counter(), set(), set()
        in_flight: dict[str, InFlight] = {}
        node_train: Counter[int] = Counter()
        try:
            while (queue or in_flight) and time.perf_counter() < deadline:
                busy = {f.node for f in in_flight.values()}
                for node in [n for n in self.usable_nodes(transport) if n not in busy]:
                    if not queue:
                        break
                    cid = self._pick(queue, node)
                    attempts[cid] += 1
                    task = self.task(cid, attempts[cid])
                    state_payload = None
                    if cid in attach and task.state_digest is not None:
                        tensors = self.store.get(task.state_digest)
                        state_payload = codec.encode(tensors) if tensors is not None else None
                    wire = encode_task(task, self.model_payload(), state_payload)
                    handle = transport.submit(node, wire)
                    in_flight[handle] = InFlight(task, node, time.perf_counter())
                    result.bytes_down += wire.payloads["model"].nbytes
                    result.bytes_state_down += state_payload.nbytes if state_payload is not None else 0
                if not in_flight:
                    time.sleep(0.5)  # no node connected yet: wait for one rather than spin
                    continue
                for handle, msg in transport.collect(min(1.0, max(0.0, deadline - time.perf_counter()))):
                    flight = in_flight.pop(handle, None)
                    if flight is None:
                        self._late(handle, result)
                        continue
                    self._expired[handle] = flight.task
                    task, cid, node = flight.task, flight.task.client_id, flight.node
                    if isinstance(msg, str) and MISSING in msg and cid not in state_retried:
                        state_retried.add(cid)
                        attempts[cid] -= 1  # the node lacked the state: not the client's failure
                        self._state_missing(cid, node, attach)
                        queue.appendleft(cid)
                        continue
                    if isinstance(msg, (str, Rejected)):
                        outcome = str(msg)
                    else:
                        outcome = self._receive(task, msg, buffer, result, order[cid])
                    if isinstance(outcome, ClientReply):
                        self._node_ok(node)
                        replies[cid], node_of[cid] = outcome, node
                        node_train[node] += outcome.train_seconds
                        continue
                    reason = outcome
                    self._attempt_failed(cid, node, attempts[cid], reason, result,
                                         node_error=isinstance(msg, str) and not isinstance(msg, Rejected))
                    if attempts[cid] < max_attempts:
                        result.retried.add(cid)
                        queue.append(cid)
                    else:
                        result.dropped[cid] = reason
            for handle, flight in in_flight.items():
                cid = flight.task.client_id
                self._expired[handle] = flight.task
                self._attempt_failed(cid, flight.node, attempts[cid], "missed the round deadline", result)
                result.dropped[cid] = "missed the round deadline"
            for cid in queue:
                result.dropped.setdefault(cid, "no node took it before the round deadline")
            self._finish(buffer, replies, node_of, result)
        finally:
            buffer.clear()
            self._forget_expired()
        result.critical_train_seconds = max(node_train.values(), default=0.0)
        result.wall_seconds = time.perf_counter() - start
        return result

    def _receive(self, task: ClientTask, wire: Wire, buffer: ReplyBuffer, result: RoundResult,
                 position: int) -> ClientReply | str:
        """Decode, check and park one reply: the reply (its tensors parked and dropped), or why it was rejected."""
        result.bytes_up += wire.payloads[UPDATE].nbytes if UPDATE in wire.payloads else 0
        result.bytes_state_up += wire.payloads[STATE].nbytes if STATE in wire.payloads else 0
        try:
            reply = decode_reply(wire, task, self.layout, self.state_layout if task.upload_state else None)
        except Rejected as e:
            return str(e)
        try:
            buffer.add((position,), task.client_id, reply.update, float(reply.samples))
        except ValueError as e:
            return str(e)
        if reply.state is not None:
            self.store.put(reply.state, reply.state_digest)
        reply.update, reply.state = {}, None  # parked: free the tensors before the next reply is decoded
        return reply

    def _finish(self, buffer: ReplyBuffer, replies: dict[int, ClientReply], node_of: dict[int, int],
                result: RoundResult) -> None:
        fed = self.cfg.federation
        screened = screen(buffer, fed.max_norm_ratio, fed.min_cosine, self.state.last_norms)
        result.norms, result.cosines = screened.norms, screened.cosines
        for cid, reason in screened.rejected.items():
            self._attempt_failed(cid, node_of[cid], 0, reason, result)
            result.dropped[cid] = reason
            buffer.drop(cid)
            replies.pop(cid)
        result.ok = sorted(replies)
        if len(replies) < fed.min_replies:
            return
        self._model_payload = None  # the old model's bytes are not needed past this round
        delta = combine(buffer, screened.accepted, fed.aggregation, fed.trim_fraction, fed.clip_update_norm)
        self._commit(delta, replies, node_of, result)
        self.state.last_norms = [screened.norms[c] for c in screened.accepted]

    def _commit(self, delta: dict[str, torch.Tensor], replies: dict[int, ClientReply], node_of: dict[int, int],
                result: RoundResult) -> None:
        self.outer.step(self.state.params, delta)
        del delta
        self.state.outer_state = self.outer.state_dict()
        persist = self.cfg.federation.client_optimizer == "persist"
        for cid, reply in replies.items():
            rec = self.state.clients[cid]
            rec.cursor, rec.steps, rec.samples = reply.cursor, rec.steps + reply.steps, rec.samples + reply.samples
            rec.rounds += 1
            if persist:
                rec.state_digest, rec.state_node = reply.state_digest, node_of[cid]
        steps = max(r.steps for r in replies.values())
        samples = sum(r.samples for r in replies.values())
        result.tokens = samples * self.cfg.train.seq_len
        result.loss = sum(r.loss * r.samples for r in replies.values()) / samples
        result.train_seconds = sum(r.train_seconds for r in replies.values())
        self.state.global_step += steps  # Photon: the largest local step count of the round
        self.state.round += 1
        for key in ("bytes_up", "bytes_down", "bytes_state_up", "bytes_state_down", "tokens"):
            self.state.totals[key] = self.state.totals.get(key, 0) + getattr(result, key)
        result.committed = True

    # -----------------------------------------------------------------------------------------------------
    # Bookkeeping: failures, nodes, kept state, late replies

    def _attempt_failed(self, cid: int, node: int, attempt: int, reason: str, result: RoundResult,
                        node_error: bool = False) -> None:
        """Count a failed attempt. `node_error`: the node could not run the task at all (an error reply), which
        counts towards excluding the node; a reply that came back but was rejected is the client's."""
        label = f"client {cid}" + (f" attempt {attempt}" if attempt else "")
        log.warning("round %d: %s rejected (node %d): %s", self.state.round + 1, label, node, reason)
        result.failed.append(f"{label}: {reason}")
        self.state.clients[cid].failures += 1
        if node_error:
            self._node_failed(node, cid, reason, result)

    def _node_ok(self, node: int) -> None:
        self.node_failures.pop(node, None)

    def _node_failed(self, node: int, cid: int, reason: str, result: RoundResult) -> None:
        """A node whose last `node_max_failures` tasks all errored, for at least two different clients, is
        excluded: a node without data (or with a broken install) fails every client, while one client's
        fault fails on every node and must not take a node out."""
        history = self.node_failures.setdefault(node, [])
        history.append(cid)
        limit = self.cfg.federation.node_max_failures
        if node not in self.excluded and len(history) >= limit and len(set(history)) >= 2:
            self.excluded[node] = reason
            result.excluded[node] = reason
            log.warning("excluding node %d from this run: its last %d tasks failed for %d different clients "
                        "(last: %s)", node, len(history), len(set(history)), reason)

    def _state_missing(self, cid: int, node: int, attach: set[int]) -> None:
        rec = self.state.clients[cid]
        if rec.state_digest and self.store.path(rec.state_digest).exists():
            attach.add(cid)  # the retry carries the server's copy
            return
        log.warning("round %d: client %d's kept state %s is not on node %d and the server has no copy "
                    "(federation.state_backup=false?): the client starts from a fresh state",
                    self.state.round + 1, cid, (rec.state_digest or "")[:12], node)
        rec.state_digest, rec.state_node = None, None

    def _late(self, handle: str, result: RoundResult) -> None:
        task = self._expired.get(handle)
        what = (f"client {task.client_id} (round {task.round + 1}, task {task.task_id})" if task
                else f"an unknown task (handle {handle})")
        log.warning("round %d: dropped a late or duplicate reply from %s", self.state.round + 1, what)
        result.late.append(what)

    def _forget_expired(self) -> None:
        while len(self._expired) > MAX_REMEMBERED:
            self._expired.pop(next(iter(self._expired)))
