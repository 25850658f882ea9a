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

import logging
import os
import statistics
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from photon.config import RunConfig
from photon.digest import tensors_digest
from photon.errors import UserError
from photon.federation import codec, compressed_updates
from photon.federation.client_state import (
    MISSING,
    MISSING_BASE,
    StateFiles,
    client_state_layout,
)
from photon.federation.clipping import ClipRule, centered_clip
from photon.federation.fold import ReplyBuffer, combine, contributor_mean, screen
from photon.federation.kept_replies import NOT_KEPT
from photon.federation.outer import lr_at, make_outer
from photon.federation.protocol import (
    MODEL,
    STATE,
    UPDATE,
    ClientReply,
    ClientTask,
    Rejected,
    Wire,
    decode_reply,
    encode_task,
    error_text,
    is_lost,
    unfit_reason,
)
from photon.federation.server_state import ServerState

log = logging.getLogger(__name__)
SAME_MODEL = codec.Payload({"codec": "fp32", "tensors": []}, np.zeros(0, np.uint8))  # "use the model you hold"
PRESUMED_DEAD = 3  # round timeouts without a reply after which a node is presumed gone
MAX_BACKOFF_ROUNDS = 16  # the longest an excluded node waits before it is tried again
MAX_REMEMBERED = 4096  # expired tasks remembered, to name the client of a late reply in the log
IDLE_WARNING_S = 30.0  # how often a run with no node connected says it is waiting


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
    sent: float       # transport clock at dispatch
    deadline: float   # transport clock after which the task is given up


@dataclass
class RoundResult:
    round: int
    ok: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)           # every failed attempt, with its reason
    retried: set[int] = field(default_factory=set)            # clients that failed once and were re-queued
    dropped: dict[int, str] = field(default_factory=dict)     # clients left out of the round, final reason
    late: list[str] = field(default_factory=list)             # replies for tasks no longer in flight
    resent: int = 0                                           # lost replies asked for again (and sent again)
    excluded: dict[int, str] = field(default_factory=dict)    # nodes excluded during this round
    norms: dict[int, float] = field(default_factory=dict)
    cosines: dict[int, float] = field(default_factory=dict)
    clip_scales: dict[int, float] = field(default_factory=dict)  # centered clipping: the share of each update kept
    damping: float = 1.0  # async, summed staleness weights: the factor Δ was scaled by (mean staleness weight)
    folded: dict[str, int] = field(default_factory=dict)      # task id -> staleness (outer steps) of folded replies
    node_train: dict[int, float] = field(default_factory=dict)  # seconds inside local training per node
    loss: float = float("nan")
    bytes_down: int = 0
    bytes_up: int = 0
    bytes_state_down: int = 0
    bytes_state_up: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    critical_train_seconds: float = 0.0  # the busiest node's time inside local training
    wall_seconds: float = 0.0
    clock: float = 0.0  # the transport's clock at the end (virtual seconds in the in-process engine)
    committed: bool = False


def node_failed(msg: object) -> bool:
    """Whether an unusable reply is the node's own failure: an error it reported, not a reply lost on the way
    nor a re-sent reply it no longer kept."""
    return isinstance(msg, str) and not is_lost(msg) and NOT_KEPT not in msg


def staleness_damping(buffer: ReplyBuffer, accepted: list[int], replies: dict[int, ClientReply]) -> float:
    """FedBuff's summed staleness weights as a factor on the normalized Δ: Σ n·s / Σ n over the accepted
    replies (each parked with weight n·s, n its samples), so Σ n·s·Δ / Σ n = factor × Σ n·s·Δ / Σ n·s. In
    fp64, in canonical order; 1 when every reply is fresh."""
    weights = sum(p.weight for p in buffer.ordered(accepted))
    return float(weights / sum(float(replies[c].samples) for c in sorted(accepted)))


@dataclass
class _Round:
    """What one round tracks while it runs."""

    result: RoundResult
    buffer: ReplyBuffer
    order: dict[int, int]                   # client -> position in the sampled (canonical) order
    queue: deque[int]
    max_attempts: int
    attempts: Counter[int] = field(default_factory=Counter)
    attach: set[int] = field(default_factory=set)          # retry these with the server's copy of their state
    full_model: set[int] = field(default_factory=set)      # retry these with the full model (node lacked the base)
    state_retried: set[int] = field(default_factory=set)
    failed_on: dict[int, set[int]] = field(default_factory=dict)  # client -> nodes it failed on this round
    resend: deque[tuple[int, ClientTask]] = field(default_factory=deque)  # (node, task) whose lost reply to ask for
    in_flight: dict[str, InFlight] = field(default_factory=dict)
    replies: dict[int, ClientReply] = field(default_factory=dict)
    node_of: dict[int, int] = field(default_factory=dict)
    node_train: Counter[int] = field(default_factory=Counter)
    clock: Callable[[], float] = time.perf_counter


def clock_of(transport: object) -> Callable[[], float]:
    """The transport's clock (virtual seconds in the in-process engine), else wall time."""
    return getattr(transport, "clock", time.perf_counter)


def is_virtual(transport: object) -> bool:
    return bool(getattr(transport, "virtual", False))


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
        self.state_layout = client_state_layout(cfg, self.layout)
        self.up_spec = codec.CodecSpec.of(cfg.federation.compression.up)
        c = cfg.federation.clipping
        self.clip_rule = ClipRule(c.centre, c.radius, c.radius_factor, c.iterations, c.bucket_size)
        self.node_failures: dict[int, list[int]] = {}  # consecutive failed tasks per node: their clients
        self.excluded: dict[int, str] = {}
        self.rejoin_at: dict[int, int] = {}  # excluded for failures: the round (outer step) it is tried again
        self.exclusions: Counter[int] = Counter()  # times each node was excluded for failures (its backoff)
        self.known_nodes: set[int] = set()  # the transport's nodes when last asked
        self._expired: dict[str, ClientTask] = {}
        # A node stays occupied by a task until its reply comes, even late or as the error of a task the server
        # gave up on: a node works on until it answers, so a task sent sooner would only queue behind the
        # straggler and miss its own deadline. Only after PRESUMED_DEAD × `round_timeout_s` without a word is
        # the node presumed gone and freed (Flower itself answers for a node that died).
        self._idle_since: float | None = None  # when the run began to wait for a node (wall clock)
        self._idle_warnings = 0
        self.occupied: dict[int, tuple[str, float]] = {}  # node -> (handle, release at, transport clock)
        self.task_times: deque[float] = deque(state.task_times, maxlen=cfg.federation.adaptive.window)
        self._model_payload: tuple[tuple[int, int], codec.Payload] | None = None
        # Compressed down-link (federation.compression.down): the digest of θ, the last outer update as every
        # node holding the previous model applies it, and which model each node holds.
        self.down = cfg.federation.compression.down
        self._digest: tuple[tuple[int, int], str] | None = None
        self._down_payload: tuple[str, str, codec.Payload] | None = None  # (base digest, new digest, payload)
        self.node_model: dict[int, str] = {}

    # -----------------------------------------------------------------------------------------------------
    # What goes out

    def sample_clients(self) -> list[int]:
        """K of N clients uniformly without replacement, from the checkpointed RNG."""
        rng = self.state.rng()
        n, k = len(self.state.clients), self.cfg.federation.clients_per_round
        picked = sorted(int(i) for i in rng.choice(n, size=k, replace=False))
        self.state.rng_state = rng.bit_generator.state
        return picked

    def release_model_payload(self) -> None:
        """Drop the encoded model between dispatches: a deployed server then holds θ and one reply at a time
        (a message already pushed lives on in the SuperLink, not here)."""
        self._model_payload = None

    def model_payload(self) -> codec.Payload:
        """The global model, encoded once per version while tasks are being handed out."""
        key = (self.state.round, self.state.global_step)
        if self._model_payload is None or self._model_payload[0] != key:
            self._model_payload = None  # let the old bytes go first
            self._model_payload = (key, codec.encode(self.state.params))
        return self._model_payload[1]

    def model_digest(self) -> str | None:
        """Digest of the current global model, when the down-link is compressed (nodes check their rebuild)."""
        if compressed_updates.is_identity(self.down):
            return None
        key = (self.state.round, self.state.global_step)
        if self._digest is None or self._digest[0] != key:
            self._digest = (key, tensors_digest(self.state.params))
        return self._digest[1]

    def model_for(self, node: int, full: bool = False) -> tuple[codec.Payload, str | None]:
        """What to send `node` as its model: the compressed outer update when it holds the previous model,
        else the full model. Returns (payload, base digest or None)."""
        current = self.model_digest()
        if not full and current is not None and self.node_model.get(node) == current:
            return SAME_MODEL, current  # it already holds this model (a second task in the same round)
        if not full and self._down_payload is not None and self.node_model.get(node) == self._down_payload[0] \
                and self._down_payload[1] == current:
            return self._down_payload[2], self._down_payload[0]
        return self.model_payload(), None

    def task(self, client_id: int, attempt: int) -> ClientTask:
        rec, fed = self.state.clients[client_id], self.cfg.federation
        kept = self.keeps_state
        rec.dispatches += 1
        return ClientTask(task_id=f"c{client_id}-d{rec.dispatches}", version=self.state.round,
                          dispatch=rec.dispatches,
                          run_id=self.state.run_uid, client_id=client_id, round=self.state.round,
                          global_step=self.state.global_step, cursor=rec.cursor, local_steps=fed.local_steps,
                          schedule_steps=self.cfg.federated_steps, batch_size=self.cfg.train.batch_size,
                          spans=self.spans[client_id], config=self.task_config,
                          client_optimizer=fed.client_optimizer,
                          state_digest=rec.state_digest if kept else None,
                          upload_state=kept and fed.state_backup and (rec.rounds + 1) % fed.state_backup_every == 0,
                          attempt=attempt,
                          keep_replies_from=self.state.round - (fed.asynchronous.max_staleness
                                                                if fed.mode == "async" else 0))

    def ask_again(self, transport: Transport, node: int, lost: ClientTask, in_flight: dict[str, InFlight],
                  timeout: float, result: RoundResult) -> None:
        """Ask the node that sent `lost`'s reply for it again (it kept it): nothing is trained. The ask is in
        flight like a task, for `timeout` seconds."""
        again = replace(lost, resend=lost.resend + 1)
        log.info("round %d: asking for the reply of task %s again (lost on the way; ask %d of %d)",
                 self.state.round + 1, lost.task_id, again.resend, self.cfg.federation.resend_lost)
        handle = transport.submit(node, encode_task(again, SAME_MODEL))
        now = clock_of(transport)()
        in_flight[handle] = InFlight(again, node, now, now + timeout)
        self.occupy(node, handle, now)
        result.resent += 1

    def may_resend(self, msg: object, task: ClientTask) -> bool:
        """Whether a lost reply is asked for again instead of training its client again."""
        return is_lost(msg) and task.resend < self.cfg.federation.resend_lost

    @property
    def keeps_state(self) -> bool:
        """Whether clients carry state across rounds: AdamW moments (persist) or error-feedback residuals."""
        fed = self.cfg.federation
        return fed.client_optimizer == "persist" or fed.compression.up.error_feedback

    def _assign(self, queue: deque[int], free: list[int], failed_on: dict[int, set[int]]) -> list[tuple[int, int]]:
        """(node, client) pairs for the free nodes, taken off `queue`. First every free node gets a client
        that has not failed on it this round (so a retry goes to another node when one is free now); then the
        nodes still free get what is left, failed there or not: a retry never waits for a busy node."""
        plan, left = [], list(free)
        for strict in (True, False):
            for node in list(left):
                if not queue:
                    return plan
                cid = self._pick(queue, node, failed_on if strict else {})
                if cid is not None:
                    plan.append((node, cid))
                    left.remove(node)
        return plan

    def _pick(self, queue: deque[int], node: int, failed_on: dict[int, set[int]]) -> int | None:
        """The queued client for `node` (taken off `queue`), leaving out those that failed on it (`failed_on`):
        one whose kept state it already holds, else one that failed on another node (it has fewer places to
        go), else the first; None if every queued client failed here."""
        candidates = [c for c in queue if node not in failed_on.get(c, ())]
        if not candidates:
            return None
        cid = min(candidates, key=lambda c: (self.state.clients[c].state_node != node, not failed_on.get(c)))
        queue.remove(cid)
        return cid

    def usable_nodes(self, transport: Transport) -> list[int]:
        nodes = transport.nodes()
        self.known_nodes = set(nodes)
        for node, at in sorted(self.rejoin_at.items()):
            if self.state.round >= at or not [n for n in nodes if n not in self.excluded]:
                self._rejoin(node)
        usable = [n for n in nodes if n not in self.excluded]
        if nodes and not usable:
            raise UserError(f"every node was excluded from the run; last: "
                            f"{'; '.join(f'node {n}: {r}' for n, r in list(self.excluded.items())[-2:])}")
        return usable

    def free_nodes(self, transport: Transport) -> list[int]:
        """Usable nodes not occupied by a task (one whose reply has not come and is not presumed lost)."""
        now = clock_of(transport)()
        for node, (_, until) in list(self.occupied.items()):
            if now >= until:
                del self.occupied[node]
        return [n for n in self.usable_nodes(transport) if n not in self.occupied]

    def wait_for_a_node(self) -> None:
        """Nothing can be sent until a node connects: wait a moment, and say so every IDLE_WARNING_S, so a run
        whose nodes never come does not look hung."""
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
        if now - self._idle_since >= IDLE_WARNING_S * (self._idle_warnings + 1):
            self._idle_warnings += 1
            log.warning("no node connected for %.0f s: the run waits for one (start `photon node --superlink "
                        "SERVER:PORT` on a machine with the data; docs/DEPLOY.md)", now - self._idle_since)
        time.sleep(0.5)

    def node_came(self) -> None:
        """Work was sent: the wait (if any) is over."""
        self._idle_since, self._idle_warnings = None, 0

    def occupy(self, node: int, handle: str, sent: float) -> None:
        self.occupied[node] = (handle, sent + PRESUMED_DEAD * self.cfg.federation.round_timeout_s)

    def release(self, handle: str) -> None:
        """A reply (or error) for `handle` came: its node is free."""
        for node, (h, _) in list(self.occupied.items()):
            if h == handle:
                del self.occupied[node]

    def next_release(self) -> float:
        return min((until for _, until in self.occupied.values()), default=float("inf"))

    # -----------------------------------------------------------------------------------------------------
    # The round

    def run_round(self, transport: Transport, timeout_s: float | None = None, max_attempts: int = 2) -> RoundResult:
        """One synchronous round: sample K clients, train them, screen, fold, step. Deadlines: the round's
        (`round_timeout_s` from its start) and, with `deadline: adaptive`, each task's own (`task_deadline`)."""
        fed = self.cfg.federation
        clock = clock_of(transport)
        start = clock()
        deadline = start + (timeout_s or fed.round_timeout_s)
        sampled = self.sample_clients()
        rnd = _Round(RoundResult(round=self.state.round), ReplyBuffer(self.spill_dir, self.layout),
                     {cid: i for i, cid in enumerate(sampled)}, deque(sampled), max_attempts, clock=clock)
        try:
            while (rnd.queue or rnd.in_flight or rnd.resend) and clock() < deadline:
                self._dispatch(transport, rnd)
                if not rnd.in_flight and not self.occupied:
                    self.wait_for_a_node()  # none connected yet: wait for one rather than spin
                    continue
                self.node_came()
                until = min(deadline, self.next_release(), *(f.deadline for f in rnd.in_flight.values()))
                wait = max(0.0, until - clock())
                for handle, msg in transport.collect(wait if is_virtual(transport) else min(1.0, wait)):
                    self._on_reply(handle, msg, rnd)
                    del msg  # before the transport fetches the next reply
                self._expire(rnd, clock(), transport)
            self._expire(rnd, float("inf"), transport)
            for cid in [*rnd.queue, *(t.client_id for _, t in rnd.resend)]:
                rnd.result.dropped.setdefault(cid, "no node took it before the round deadline")
            self._finish(rnd.buffer, rnd.replies, rnd.node_of, rnd.result)
        finally:
            rnd.buffer.clear()
            self._forget_expired()
        rnd.result.critical_train_seconds = max(rnd.node_train.values(), default=0.0)
        rnd.result.wall_seconds = clock() - start
        rnd.result.clock = clock()
        return rnd.result

    def task_deadline(self) -> float:
        """How long a task may take from dispatch to reply: `round_timeout_s` (fixed), or the median of the
        recent task times plus k·MAD, at least `margin` × the median and `floor_s` (adaptive); no history yet:
        `round_timeout_s`."""
        fed = self.cfg.federation
        if fed.deadline == "fixed" or len(self.task_times) < 3:
            return fed.round_timeout_s
        a = fed.adaptive
        times = list(self.task_times)
        med = statistics.median(times)
        mad = statistics.median(abs(t - med) for t in times)
        return min(fed.round_timeout_s, max(a.floor_s, a.margin * med, med + a.k_mad * mad))

    def _expire(self, rnd: _Round, now: float, transport: Transport | None = None) -> None:
        """Give up on tasks past their deadline (the whole round's when `now` is inf): their clients are
        dropped for this round, and their replies, if they ever come, are dropped as late. A transport that
        can (the virtual clock) is told, so it need not train them."""
        for handle, flight in list(rnd.in_flight.items()):
            if now == float("inf") or now >= flight.deadline:
                del rnd.in_flight[handle]
                if hasattr(transport, "cancel"):
                    transport.cancel(handle)
                cid = flight.task.client_id
                self._expired[handle] = flight.task
                reason = ("missed the round deadline" if now == float("inf") else
                          f"missed its deadline ({flight.deadline - flight.sent:.3g} s, {self.cfg.federation.deadline})")
                self._attempt_failed(cid, flight.node, rnd.attempts[cid], reason, rnd.result)
                rnd.result.dropped[cid] = reason

    def _dispatch(self, transport: Transport, rnd: _Round) -> None:
        """Ask for lost replies again, then give every idle node the next queued client; keep the encoded model
        only while clients wait."""
        while rnd.resend:
            node, lost = rnd.resend.popleft()
            self.ask_again(transport, node, lost, rnd.in_flight, self.task_deadline(), rnd.result)
        for node, cid in self._assign(rnd.queue, self.free_nodes(transport), rnd.failed_on):
            rnd.attempts[cid] += 1
            task = self.task(cid, rnd.attempts[cid])
            state_payload = None
            if cid in rnd.attach and task.state_digest is not None:
                tensors = self.store.get(task.state_digest)
                state_payload = codec.encode(tensors) if tensors is not None else None
            model, task.base_digest = self.model_for(node, full=cid in rnd.full_model)
            task.model_digest = self.model_digest()
            wire = encode_task(task, model, state_payload)
            handle = transport.submit(node, wire)
            now = clock_of(transport)()
            rnd.in_flight[handle] = InFlight(task, node, now, now + self.task_deadline())
            self.occupy(node, handle, now)
            rnd.result.bytes_down += wire.payloads[MODEL].nbytes
            rnd.result.bytes_state_down += state_payload.nbytes if state_payload is not None else 0
            del wire
        if not rnd.queue:
            self.release_model_payload()

    def _on_reply(self, handle: str, msg: Wire | Rejected | str, rnd: _Round) -> None:
        """One reply: late ones are dropped, a node lacking a client's state gets a retry, the rest are decoded,
        checked and parked, or rejected (and their client re-queued while attempts are left)."""
        self.release(handle)
        flight = rnd.in_flight.pop(handle, None)
        if flight is None:
            self._late(handle, rnd.result)
            return
        self._expired[handle] = flight.task
        task, cid, node = flight.task, flight.task.client_id, flight.node
        if isinstance(msg, str) and MISSING in msg and cid not in rnd.state_retried:
            rnd.state_retried.add(cid)
            rnd.attempts[cid] -= 1  # the node lacked the state: not the client's failure
            self._state_missing(cid, node, rnd.attach)
            rnd.queue.appendleft(cid)
            return
        unfit = unfit_reason(msg)
        if unfit is not None:  # the node cannot train anyone: out of the run, and the client goes elsewhere
            self._exclude(node, unfit, rnd.result)
            rnd.queue.appendleft(cid)
            rnd.attempts[cid] -= 1
            return
        if isinstance(msg, str) and MISSING_BASE in msg and cid not in rnd.full_model:
            rnd.full_model.add(cid)  # the node lacked the model the update applies to: send it whole
            rnd.attempts[cid] -= 1
            self.node_model.pop(node, None)
            rnd.queue.appendleft(cid)
            return
        if self.may_resend(msg, task):  # the node did the work and kept the reply: ask for it, train nothing
            rnd.resend.append((node, task))
            return
        outcome = error_text(str(msg)) if isinstance(msg, (str, Rejected)) else \
            self._receive(task, msg, rnd.result, rnd.buffer, (rnd.order[cid],))
        if isinstance(outcome, ClientReply):
            self.task_times.append(rnd.clock() - flight.sent)
            self.state.task_times = list(self.task_times)
            self._node_ok(node)
            if task.model_digest is not None:
                self.node_model[node] = task.model_digest  # it now holds this model
            rnd.replies[cid], rnd.node_of[cid] = outcome, node
            rnd.node_train[node] += outcome.train_seconds
            return
        # The node could not run it (vs a reply we rejected, or one lost on the way: not the node's failure)
        node_error = node_failed(msg)
        self._attempt_failed(cid, node, rnd.attempts[cid], outcome, rnd.result, node_error=node_error)
        rnd.failed_on.setdefault(cid, set()).add(node)  # its retry goes to another node while there is one
        if rnd.attempts[cid] < rnd.max_attempts:
            rnd.result.retried.add(cid)
            rnd.queue.append(cid)
        else:
            rnd.result.dropped[cid] = outcome

    def _receive(self, task: ClientTask, wire: Wire, result: RoundResult, buffer: ReplyBuffer, key: tuple,
                 weight_scale: float = 1.0) -> ClientReply | str:
        """Decode, check and park one reply under `key` (its place in the canonical order), weighted by its
        samples × `weight_scale`: the reply (its tensors parked and dropped), or why it was rejected."""
        result.bytes_up += wire.payloads[UPDATE].nbytes if UPDATE in wire.payloads else 0
        result.bytes_state_up += wire.payloads[STATE].nbytes if STATE in wire.payloads else 0
        try:
            reply = decode_reply(wire, task, self.layout, self.state_layout if task.upload_state else None,
                                 self.up_spec)
        except Rejected as e:
            return str(e)
        try:
            buffer.add(key, task.client_id, reply.update, float(reply.samples) * weight_scale)
        except ValueError as e:
            return str(e)
        if reply.state is not None:
            self.store.put(reply.state, reply.state_digest)
        reply.update, reply.state = {}, None  # parked: free the tensors before the next reply is decoded
        if self.down.codec == compressed_updates.REPLIES:  # the down-link forwards the message as it came
            reply.payload = wire.payloads[UPDATE]
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
        if fed.aggregation == "centered-clip":
            delta, result.clip_scales = centered_clip(buffer, screened.accepted, self.clip_rule,
                                                      self.state.clip_centre or None,
                                                      seed=[self.cfg.train.seed, self.state.round])
            if self.clip_rule.centre == "previous":  # the next round starts from this aggregate (checkpointed);
                self.state.clip_centre = delta  # no copy: Δ is a fresh tensor the outer step only reads
        elif self.down.codec == compressed_updates.REPLIES:
            delta = None  # the new model is rebuilt from the replies themselves (`_commit`)
        elif fed.aggregation == "contributor-mean":
            delta = contributor_mean(buffer, screened.accepted)
        else:
            delta = combine(buffer, screened.accepted, fed.aggregation, fed.trim_fraction, fed.clip_update_norm)
        if fed.mode == "async" and fed.asynchronous.weighting == "summed":
            result.damping = staleness_damping(buffer, screened.accepted, replies)
            if result.damping != 1.0:  # a new dict: the clipping centre may hold the undamped Δ
                delta = {k: v * result.damping for k, v in delta.items()}
        order = [p.client for p in buffer.ordered(screened.accepted)]
        self._commit(delta, replies, node_of, result, order)
        self.state.last_norms = [screened.norms[c] for c in screened.accepted]

    def _commit(self, delta: dict[str, torch.Tensor] | None, replies: dict[int, ClientReply],
                node_of: dict[int, int], result: RoundResult, order: list[int]) -> None:
        base = self.model_digest()
        fed = self.cfg.federation
        lr = lr_at(fed.outer, self.state.round, fed.schedule_rounds or fed.rounds)
        if self.down.codec == compressed_updates.REPLIES:  # the bytes nodes get define the new model
            payload = compressed_updates.replies_payload([replies[c].payload for c in order], lr)
            new = compressed_updates.rebuild_from_replies(self.state.params, payload, self.layout)
            for k, p in self.state.params.items():
                p.copy_(new[k])
            del new
            for c in order:
                replies[c].payload = None
            self._down_payload = (base, None, payload)
            old = None
        else:
            old = None if compressed_updates.is_identity(self.down) else \
                {k: v.clone() for k, v in self.state.params.items()}
            self.outer.step(self.state.params, delta, lr)
        del delta
        if old is not None:  # the new model is what nodes rebuild from the compressed outer update
            payload, residual = compressed_updates.server_broadcast(
                self.state.params, old, self.state.down_residual or None, self.down, seed=self.state.round)
            self.state.down_residual = residual or {}
            del old
            self._down_payload = (base, None, payload)
        self.state.outer_state = self.outer.state_dict()
        for cid, reply in replies.items():
            rec = self.state.clients[cid]
            rec.cursor, rec.steps, rec.samples = reply.cursor, rec.steps + reply.steps, rec.samples + reply.samples
            rec.rounds += 1
            result.folded[reply.task_id] = self.state.round - reply.round
            if self.keeps_state:
                rec.state_digest, rec.state_node = reply.state_digest, node_of[cid]
                if reply.state_digest and self.store.path(reply.state_digest).exists():  # it came with the reply
                    rec.backup_digest = reply.state_digest
        steps = max(r.steps for r in replies.values())
        samples = sum(r.samples for r in replies.values())
        result.tokens = samples * self.cfg.train.seq_len
        result.loss = sum(r.loss * r.samples for r in replies.values()) / samples
        result.train_seconds = sum(r.train_seconds for r in replies.values())
        self.state.global_step += steps  # Photon: the largest local step count of the round
        self.state.round += 1
        if self._down_payload is not None and self._down_payload[1] is None:
            self._down_payload = (self._down_payload[0], self.model_digest(), self._down_payload[2])
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
        excluded for a backoff: a node without data (or with a broken install) fails every client, while one
        client's fault fails on every node and must not take a node out. The last usable node is kept: with
        none the run could only stop, while a node that recovers lets it go on."""
        history = self.node_failures.setdefault(node, [])
        history.append(cid)
        limit = self.cfg.federation.node_max_failures
        if node not in self.excluded and len(history) >= limit and len(set(history)) >= 2:
            if not any(n != node and n not in self.excluded for n in self.known_nodes):
                log.warning("node %d: its last %d tasks failed, but it is the only usable node: kept in the run",
                            node, len(history))
                return
            self.exclusions[node] += 1
            backoff = min(MAX_BACKOFF_ROUNDS, 2 ** (self.exclusions[node] - 1))
            self.rejoin_at[node] = self.state.round + backoff
            self._exclude(node, reason, result, f"its last {len(history)} tasks failed for {len(set(history))} "
                                                f"different clients; it is tried again in {backoff} round(s)")

    def _exclude(self, node: int, reason: str, result: RoundResult, why: str = "it cannot train any client") -> None:
        """Take `node` out of this run (it is sent nothing more; for failures, until its backoff ends); said
        once, with `why` and the last `reason`."""
        if node in self.excluded:
            return
        self.excluded[node] = reason
        result.excluded[node] = reason
        log.warning("excluding node %d from this run: %s (last: %s)", node, why, reason)

    def _rejoin(self, node: int) -> None:
        """An excluded node's backoff is over (or no other node is left): it is sent tasks again, with a clean
        failure record; a further exclusion doubles its backoff."""
        del self.rejoin_at[node]
        self.excluded.pop(node, None)
        self.node_failures.pop(node, None)
        log.warning("node %d rejoins the run after its backoff (excluded %d time(s) so far)", node,
                    self.exclusions[node])

    def _state_missing(self, cid: int, node: int, attach: set[int]) -> None:
        rec = self.state.clients[cid]
        if rec.state_digest and self.store.path(rec.state_digest).exists():
            attach.add(cid)  # the retry carries the server's copy
            return
        if rec.backup_digest and self.store.path(rec.backup_digest).exists():
            log.warning("round %d: client %d's kept state %s is not on node %d: it continues from its last backup "
                        "%s (backed up every %d of its rounds, federation.state_backup_every)", self.state.round + 1,
                        cid, (rec.state_digest or "")[:12], node, rec.backup_digest[:12],
                        self.cfg.federation.state_backup_every)
            rec.state_digest, rec.state_node = rec.backup_digest, None
            attach.add(cid)
            return
        log.warning("round %d: client %d's kept state %s is not on node %d and the server has no copy "
                    "(none backed up yet, or federation.state_backup=false): the client starts from a fresh state",
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
