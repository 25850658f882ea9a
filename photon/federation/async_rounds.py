"""Asynchronous rounds (`federation.mode: async`), in the spirit of FedBuff and Decoupled DiLoCo: nodes never
wait for each other, and the server takes an outer step whenever a quorum of replies is in.

Who trains what, and when, lives here; checking, parking, screening, folding and the outer step are the
`Aggregator`'s, exactly as in a synchronous round. The rules:
- Every idle node at once gets a client drawn uniformly (from the checkpointed RNG) among the clients that
  are neither in flight nor waiting to be folded: a client is never trained by two nodes at once, and its
  next task starts from its committed cursor and kept state.
- Each task records the model version (outer steps taken) it started from. A reply s steps stale is folded
  with weight samples × `staleness`(s) (constant, or 1/(1+s)^a); one staler than `max_staleness` is refused
  and its client freed (nothing of it advances). The weights are normalized (Σ n·s·Δ / Σ n·s), or with
  `weighting: summed` summed as FedBuff does (Σ n·s·Δ / Σ n): a step made only of stale replies is damped.
- The server steps when `quorum` replies are parked, or, with a grace window, when the oldest has waited
  `grace_s` and at least `min_replies` are in. The global LR schedule advances H per step. Replies handed over
  together with the one that completes the quorum wait for the next step, or with `fold_arrived_together`
  are folded in this one.
- A task past its deadline (fixed or adaptive, as in sync) is given up and its client freed.
- With `dynamic_local_steps` a node's task has H × (fastest node's seconds per step / its own) local steps
  (at least 1; H until the node has replied once), its rate measured from its last folded task (dispatch to
  reply, transfers included, as the server sees it): a slow machine then returns with fresh work.
- Every outer step is checkpointed with the tasks then in flight (`ServerState.outstanding`). On resume they
  are sent again from the model version they started from (kept by the checkpoints), at the virtual time
  they were first sent when the transport has a virtual clock: the in-process engine then replays exactly
  the same arrivals and the resumed run is bitwise equal to an uninterrupted one. On a real network the
  arrival order after a resume is the network's, so a resumed run is equivalent, not bitwise equal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from photon.checkpoint import load_checkpoint
from photon.federation import codec
from photon.federation.aggregator import (
    SAME_MODEL,
    Aggregator,
    InFlight,
    RoundResult,
    Transport,
    clock_of,
    is_virtual,
    node_failed,
)
from photon.federation.client_state import MISSING
from photon.federation.fold import ReplyBuffer
from photon.federation.protocol import (
    ClientReply,
    ClientTask,
    Rejected,
    Wire,
    encode_task,
    error_text,
    unfit_reason,
)

log = logging.getLogger(__name__)


def staleness_weight(staleness: int, kind: str, exponent: float) -> float:
    return 1.0 if kind == "constant" else (1.0 + staleness) ** -exponent


@dataclass
class _Parked:
    reply: ClientReply
    flight: InFlight
    arrived: float


class AsyncRounds:
    """Drives `federation.mode: async` over a transport, one outer step per `step` call."""

    def __init__(self, agg: Aggregator, spill_dir: Path, ckpt_dir: Path | None = None):
        self.agg = agg
        self.cfg = agg.cfg.federation.asynchronous
        self.buffer = ReplyBuffer(spill_dir, agg.layout)
        self.ckpt_dir = ckpt_dir
        self.in_flight: dict[str, InFlight] = {}
        self.parked: dict[int, _Parked] = {}
        self.attach: set[int] = set()  # clients whose next task carries the server's copy of their state
        self.no_progress = 0           # replies in a row that could not be parked
        self._resend: list[tuple[int, ClientTask]] = []  # (node, task) whose lost reply to ask for again
        self._restored = False

    @property
    def quorum(self) -> int:
        return self.cfg.quorum or self.agg.cfg.federation.clients_per_round

    def busy(self) -> set[int]:
        return ({f.task.client_id for f in self.in_flight.values()} | set(self.parked) |
                {t.client_id for _, t in self._resend})

    def _pick(self) -> int | None:
        free = [c for c in range(len(self.agg.state.clients)) if c not in self.busy()]
        if not free:
            return None
        rng = self.agg.state.rng()
        cid = free[int(rng.integers(len(free)))]
        self.agg.state.rng_state = rng.bit_generator.state
        return cid

    # -----------------------------------------------------------------------------------------------------

    def step(self, transport: Transport) -> RoundResult:
        """Keep every node busy until an outer step commits (or too many replies in a row were refused)."""
        agg, clock = self.agg, clock_of(transport)
        if not self._restored:
            self._restore(transport)
        result = RoundResult(round=agg.state.round)
        start = clock()
        while not result.committed:
            if self._ready(clock()):
                self._commit(result)  # may fall short if the screen rejects too many: then keep collecting
                continue
            self._dispatch(transport, result)
            if not self.in_flight and not agg.occupied:
                if not agg.usable_nodes(transport):
                    agg.wait_for_a_node()  # none connected yet
                continue
            agg.node_came()
            wait = max(0.0, min(self._next_event(), agg.next_release()) - clock())
            for handle, msg in transport.collect(wait if is_virtual(transport) else min(1.0, wait)):
                self._on_reply(handle, msg, result, clock())
                del msg
                if self._ready(clock()) and not self.cfg.fold_arrived_together:
                    break  # a step folds a quorum: replies that came with it are collected for the next step
            self._expire(clock(), result, transport)
            if self.no_progress > 4 * self.quorum + 4:
                self.no_progress = 0
                result.wall_seconds, result.clock = clock() - start, clock()
                return result  # the runner retries, then stops with the last reasons
        result.wall_seconds, result.clock = clock() - start, clock()
        agg.state.clock = clock()
        agg.state.outstanding = [{"task": f.task.to_json(), "node": f.node, "sent": f.sent}
                                 for f in self.in_flight.values()]
        # a lost reply not yet asked for again: asked for on resume (the node keeps it)
        agg.state.outstanding += [{"task": replace(t, resend=t.resend + 1).to_json(), "node": node,
                                   "sent": clock()} for node, t in self._resend]
        return result

    def _ready(self, now: float) -> bool:
        if len(self.parked) >= self.quorum:
            return True
        grace, minimum = self.cfg.grace_s, self.agg.cfg.federation.min_replies
        return bool(grace and len(self.parked) >= minimum and
                    now - min(p.arrived for p in self.parked.values()) >= grace)

    def _next_event(self) -> float:
        """The earliest task deadline or grace expiry: how long `collect` may wait."""
        times = [f.deadline for f in self.in_flight.values()] or [float("inf")]
        if self.cfg.grace_s and self.parked:
            times.append(min(p.arrived for p in self.parked.values()) + self.cfg.grace_s)
        return min(times)

    def _dispatch(self, transport: Transport, result: RoundResult) -> None:
        agg = self.agg
        while self._resend:
            node, lost = self._resend.pop(0)
            agg.ask_again(transport, node, lost, self.in_flight, agg.cfg.federation.round_timeout_s, result)
        for node in agg.free_nodes(transport):
            if self.cfg.concurrency is not None and len(self.in_flight) >= self.cfg.concurrency:
                break  # federation.asynchronous.concurrency: no more clients in flight at once
            cid = self._pick()
            if cid is None:
                break
            task = agg.task(cid, attempt=1)
            if self.cfg.dynamic_local_steps:
                task = replace(task, local_steps=self.local_steps(node))
            self._send(transport, node, task, agg.model_payload(), result)
        agg.release_model_payload()

    def local_steps(self, node: int) -> int:
        """A task's local steps on `node` under dynamic local steps: H scaled by how much slower the node is
        than the fastest one measured."""
        h, rates = self.agg.cfg.federation.local_steps, self.agg.state.node_step_seconds
        own = rates.get(str(node))
        if own is None:
            return h
        return max(1, min(h, round(h * min(rates.values()) / own)))

    def _send(self, transport: Transport, node: int, task: ClientTask, model: codec.Payload, result: RoundResult,
              at: float | None = None) -> None:
        state_payload = None
        if task.client_id in self.attach and task.state_digest:
            self.attach.discard(task.client_id)
            tensors = self.agg.store.get(task.state_digest)
            state_payload = codec.encode(tensors) if tensors is not None else None
        wire = encode_task(task, model, state_payload)
        handle = transport.submit(node, wire, at=at) if at is not None else transport.submit(node, wire)
        sent = at if at is not None else clock_of(transport)()
        # Async keeps a straggler's work (weighted by staleness): its deadline only presumes a task lost.
        self.in_flight[handle] = InFlight(task, node, sent, sent + self.agg.cfg.federation.round_timeout_s)
        self.agg.occupy(node, handle, sent)
        result.bytes_down += model.nbytes
        result.bytes_state_down += state_payload.nbytes if state_payload is not None else 0

    def _on_reply(self, handle: str, msg: Wire | Rejected | str, result: RoundResult, now: float) -> None:
        agg = self.agg
        agg.release(handle)
        flight = self.in_flight.pop(handle, None)
        if flight is None:
            agg._late(handle, result)
            return
        agg._expired[handle] = flight.task
        task, cid, node = flight.task, flight.task.client_id, flight.node
        if isinstance(msg, str) and MISSING in msg:
            agg._state_missing(cid, node, self.attach)
            return  # the client is free again; its next task carries the server's copy (or starts fresh)
        unfit = unfit_reason(msg)
        if unfit is not None:  # the node cannot train anyone: out of the run; the client is free again
            agg._exclude(node, unfit, result)
            return
        if agg.may_resend(msg, task):  # the node kept the reply: ask for it again, train nothing
            self._resend.append((node, task))
            return
        self.no_progress += 1
        if isinstance(msg, (str, Rejected)):
            # a reply lost on the way is not the node's failure
            reason = error_text(str(msg))
            agg._attempt_failed(cid, node, 0, reason, result, node_error=node_failed(msg))
            result.dropped[cid] = reason
            return
        staleness = agg.state.round - task.version
        if staleness > self.cfg.max_staleness:
            reason = f"too stale: computed from the model of {staleness} outer steps ago (max {self.cfg.max_staleness})"
            agg._attempt_failed(cid, node, 0, reason, result)
            result.dropped[cid] = reason
            return
        weight = staleness_weight(staleness, self.cfg.staleness, self.cfg.exponent)
        outcome = agg._receive(task, msg, result, self.buffer, (task.version, cid), weight)
        if isinstance(outcome, str):
            agg._attempt_failed(cid, node, 0, outcome, result)
            result.dropped[cid] = outcome
            return
        self.no_progress = 0
        agg.task_times.append(now - flight.sent)
        agg.state.task_times = list(agg.task_times)
        if not task.resend:  # an ask for a kept reply trained nothing: it says nothing of the node's speed
            agg.state.node_step_seconds[str(node)] = (now - flight.sent) / task.local_steps
        agg._node_ok(node)
        result.node_train[node] = result.node_train.get(node, 0.0) + outcome.train_seconds
        self.parked[cid] = _Parked(outcome, flight, now)

    def _expire(self, now: float, result: RoundResult, transport: Transport | None = None) -> None:
        for handle, flight in list(self.in_flight.items()):
            if now >= flight.deadline:
                del self.in_flight[handle]
                if hasattr(transport, "cancel"):
                    transport.cancel(handle)
                self.agg._expired[handle] = flight.task
                cid = flight.task.client_id
                reason = f"missed its deadline ({flight.deadline - flight.sent:.3g} s)"
                self.agg._attempt_failed(cid, flight.node, 0, reason, result)
                result.dropped[cid] = reason

    def _commit(self, result: RoundResult) -> None:
        agg = self.agg
        replies = {cid: p.reply for cid, p in self.parked.items()}
        node_of = {cid: p.flight.node for cid, p in self.parked.items()}
        agg._finish(self.buffer, replies, node_of, result)
        if not result.committed:  # too few survived the screen: drop the rejected, keep waiting for more
            self.parked = {cid: p for cid, p in self.parked.items() if cid in replies}
            return
        self.buffer.clear()
        self.parked.clear()
        result.critical_train_seconds = max(result.node_train.values(), default=0.0)

    # -----------------------------------------------------------------------------------------------------

    def _restore(self, transport: Transport) -> None:
        """Send again the tasks that were in flight at the checkpoint, from the versions they started from."""
        self._restored = True
        state = self.agg.state
        if not state.outstanding:
            return
        if hasattr(transport, "resume_at"):
            transport.resume_at(state.clock)
        nodes = set(self.agg.usable_nodes(transport))
        dummy = RoundResult(round=state.round)
        for item in sorted(state.outstanding, key=lambda o: o["sent"]):
            task = ClientTask.from_json(item["task"])
            node = item["node"] if item["node"] in nodes else None
            if node is None:
                free = [n for n in sorted(nodes) if n not in self.agg.occupied]
                if not free:
                    continue  # fewer nodes than before: the client is simply free again
                node = free[0]
            model = SAME_MODEL if task.resend else self._model_at(task.version)  # a resend trains nothing
            self._send(transport, node, task, model, dummy, at=item["sent"] if is_virtual(transport) else None)
        state.outstanding = []

    def _model_at(self, version: int) -> codec.Payload:
        if version == self.agg.state.round:
            return self.agg.model_payload()
        if self.ckpt_dir is not None:
            path = Path(self.ckpt_dir) / f"round_{version:06d}"
            try:
                tensors, _ = load_checkpoint(path)
                return codec.encode(tensors["model"])
            except Exception as e:  # pruned or damaged: the reply will be off, say so
                log.warning("resume: the model of version %d is not available (%s); re-sending its in-flight "
                            "task from the current model", version, e)
        return self.agg.model_payload()
