"""The in-process engine with a virtual clock: tasks run for real, one at a time, but complete in the order of
a modelled time, so timing, stragglers and asynchronous rounds are deterministic and nothing waits.

A task sent to a node at virtual time t starts when the node is free, takes (message bytes / bandwidth) to
arrive, H × `virtual_clock.step_seconds` × its speed factor to train (`faults.task_timing`: slow clients,
late tasks), and the reply's bytes / bandwidth to come back (an fp32 update of the model, `reply_bytes`);
a lost reply (`faults.drop_probability`) comes back as the node's error report at that time, as the real
engines raise it. Faults of a node are the clock's own: a slow machine (`slow_node_fraction`), a lossy link
(`drop_trace: link`), and an outage (`faults.outage`: the node is not connected, a task it held dies, it
returns at the window's end). `collect` advances the clock to the next completion, and only then runs the task for real
(one at a time, in virtual-time order); a task the server has given up on (`cancel`) is not trained at all,
which saves the real compute a virtual straggler would waste, and neither is one whose reply is lost when
nodes keep no replies (`federation.resend_lost: 0`); otherwise the node trains it and keeps the reply it
will send again when asked (a re-sent reply takes only its transfer time). Used by
`photon run --engine inprocess`, the stragglers benchmark and the async tests.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from photon.config import RunConfig, build_config
from photon.federation.faults import down_window, link_drops, slow_nodes, task_timing
from photon.federation.protocol import ClientTask, Rejected, Wire, decode_task, lost_reply
from photon.federation.worker import ClientWorker
from photon.model.transformer import count_params
from photon.transport.inprocess import InProcessTransport


@dataclass
class TaskRecord:
    """What the virtual clock did with one task (for goodput and staleness accounting)."""

    task_id: str
    client: int
    node: int
    start: float
    done: float
    compute: float   # virtual seconds it trained (until it died, for a task its node's outage ended)
    dropped: bool
    fate: str = "pending"  # delivered, lost (the reply), cancelled (the server gave up), died (node outage)


class VirtualClockTransport(InProcessTransport):
    virtual = True

    def __init__(self, worker: ClientWorker | Sequence[ClientWorker], num_nodes: int = 1,
                 fail: Callable[[ClientTask], str | None] | None = None):
        super().__init__(worker, num_nodes, fail)
        for w in self.workers:
            w.real_time_faults = False  # the clock models slow, late and lost tasks itself
        self.now = 0.0
        self.free_at = [0.0] * len(self.workers)
        self.records: dict[str, TaskRecord] = {}
        # done, seq, handle, node, (task, fate, record key)
        self._events: list[tuple[float, int, str, int, tuple[Wire, str, str]]] = []
        self._cancelled: set[str] = set()
        self._seq = itertools.count()
        self._cfg: tuple[str, RunConfig] | None = None

    def clock(self) -> float:
        return self.now

    def resume_at(self, clock: float) -> None:
        """Continue from a checkpoint taken at virtual time `clock` (nodes idle until re-sent their tasks)."""
        self.now = clock

    def config(self, task: ClientTask) -> RunConfig:
        if self._cfg is None or self._cfg[0] != task.run_id:
            self._cfg = (task.run_id, build_config({k: v for k, v in task.config.items() if k != "tokenizer_sha256"}))
        return self._cfg[1]

    def nodes(self) -> list[int]:
        """The nodes up now (a node in its `faults.outage` window is not connected)."""
        faults = self._cfg[1].federation.faults if self._cfg is not None else None
        return [n for n in super().nodes()
                if faults is None or not (w := faults.outage.get(n)) or not w[0] <= self.now < w[1]]

    @staticmethod
    def reply_bytes(cfg: RunConfig) -> int:
        """The size every reply is modelled with: an fp32 update of the whole model (a re-sent reply too, though
        its task no longer carries the model; a compressed up-link's replies are smaller on a real network)."""
        return 4 * count_params(cfg.model)

    def submit(self, node: int, wire: Wire, at: float | None = None) -> str:
        """Send a task; `at` re-sends one at the virtual time it was first sent (resume)."""
        handle = f"m{next(self._ids)}"
        task = decode_task(wire)
        cfg = self.config(task)
        faults = cfg.federation.faults
        timing = task_timing(task, faults, cfg.data.partition.num_clients)
        speed = timing.speed * (faults.slow_factor if node in slow_nodes(faults, len(self.workers)) else 1.0)
        rate = cfg.federation.virtual_clock.bandwidth_mbps * 1e6 / 8  # bytes per virtual second
        start = max(self.now if at is None else at, self.free_at[node])
        step_s = cfg.federation.virtual_clock.step_seconds
        compute = 0.0 if task.resend else task.local_steps * step_s * speed  # a re-sent reply: no work
        up = self.reply_bytes(cfg)
        arrived = start + wire.nbytes / rate
        done = arrived + compute + up / rate
        fate = "lost" if timing.dropped or (faults.drop_trace == "link" and link_drops(faults, node, done)) else "ok"
        outage = down_window(faults, node, start, done)
        if outage is not None:  # the node goes down with the task: its error comes when it does
            done, fate = max(start, outage[0]), "died"
            compute = min(compute, max(0.0, done - arrived))
            self.free_at[node] = outage[1]
        else:
            self.free_at[node] = done
        key = f"{task.task_id}~{task.resend}" if task.resend else task.task_id  # the training keeps its record
        self.records[key] = TaskRecord(task.task_id, task.client_id, node, start, done, compute, fate == "lost")
        heapq.heappush(self._events, (done, next(self._seq), handle, node, (wire, fate, key)))
        return handle

    def cancel(self, handle: str) -> None:
        """The server gave up on this task: its node still works until it would have finished (it is
        occupied), but nothing is trained and its reply is an error."""
        self._cancelled.add(handle)

    def collect(self, timeout: float) -> Iterator[tuple[str, Wire | Rejected | str]]:
        """The completions at the next completion time within `timeout` virtual seconds (the clock moves to it):
        every reply that arrived at that instant, as Flower's pull hands the server every reply waiting, so the
        server sees them together before it sends anyone new work. Else nothing (the clock moves by `timeout`,
        or to the moment a node comes back from an outage, so it can be sent work)."""
        limit = self.now + timeout
        if self._cfg is not None:
            limit = min([limit, *(end for _, end in self._cfg[1].federation.faults.outage.values()
                                  if self.now < end <= limit)])
        if not self._events or self._events[0][0] > limit:
            self.now = max(self.now, limit)
            return
        self.now = max(self.now, self._events[0][0])
        while self._events and self._events[0][0] <= self.now:
            _, _, handle, node, (wire, fate, key) = heapq.heappop(self._events)
            yield handle, self._complete(handle, node, wire, fate, self.records[key])

    def _complete(self, handle: str, node: int, wire: Wire, fate: str, record: TaskRecord) -> Wire | Rejected | str:
        """What the server receives for one task: its reply, or the error that stands for it."""
        task = decode_task(wire)
        if handle in self._cancelled:
            self._cancelled.discard(handle)
            record.fate = "cancelled"
            return "the server gave up on this task before it finished"
        if fate == "died":
            record.fate = "died"
            return f"node {node} went down (injected fault: federation.faults.outage)"
        dropped = fate == "lost"
        record.fate = "lost" if dropped else "delivered"
        if dropped:  # as on Flower: a lost reply reaches the server as the node's report, when it would have arrived
            if self.config(task).federation.resend_lost:
                self.run(node, wire)  # the node did the work and keeps its reply, to send it again when asked
            return lost_reply(task.task_id, "injected fault: federation.faults.drop_probability")
        return self.run(node, wire)
