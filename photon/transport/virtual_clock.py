"""The in-process engine with a virtual clock: tasks run for real, one at a time, but complete in the order of
a modelled time, so timing, stragglers and asynchronous rounds are deterministic and nothing waits.

A task sent to a node at virtual time t starts when the node is free, takes (message bytes / bandwidth) to
arrive, H × `virtual_clock.step_seconds` × its speed factor to train (`faults.task_timing`: slow clients,
late tasks), and the reply's bytes / bandwidth to come back (its size taken as the task's model payload's);
a lost reply (`faults.drop_probability`) comes back as the node's error report at that time, as the real
engines raise it. `collect` advances the clock to the next completion, and only then runs the task for real
(one at a time, in virtual-time order); a task the server has given up on (`cancel`) or whose reply is lost
is not trained at all, which saves the real compute a virtual straggler would waste. Used by `photon run --engine inprocess`, the
stragglers benchmark and the async tests.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from photon.config import RunConfig, build_config
from photon.federation.faults import task_timing
from photon.federation.protocol import ClientTask, Rejected, Wire, decode_task, lost_reply
from photon.federation.worker import ClientWorker
from photon.transport.inprocess import InProcessTransport


@dataclass
class TaskRecord:
    """What the virtual clock did with one task (for goodput and staleness accounting)."""

    task_id: str
    client: int
    node: int
    start: float
    done: float
    compute: float
    dropped: bool


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
        self._events: list[tuple[float, int, str, int, Wire | str]] = []  # done, seq, handle, node, task or error
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

    def submit(self, node: int, wire: Wire, at: float | None = None) -> str:
        """Send a task; `at` re-sends one at the virtual time it was first sent (resume)."""
        handle = f"m{next(self._ids)}"
        task = decode_task(wire)
        cfg = self.config(task)
        timing = task_timing(task, cfg.federation.faults, cfg.data.partition.num_clients)
        rate = cfg.federation.virtual_clock.bandwidth_mbps * 1e6 / 8  # bytes per virtual second
        start = max(self.now if at is None else at, self.free_at[node])
        compute = task.local_steps * cfg.federation.virtual_clock.step_seconds * timing.speed
        up = wire.payloads["model"].nbytes if "model" in wire.payloads else 0
        done = start + wire.nbytes / rate + compute + up / rate
        self.free_at[node] = done
        self.records[task.task_id] = TaskRecord(task.task_id, task.client_id, node, start, done, compute,
                                                timing.dropped)
        if timing.dropped:  # as on Flower: the node reports the lost reply when it would have replied
            work: Wire | str = lost_reply(task.task_id, "injected fault: federation.faults.drop_probability")
        else:
            work = wire
        heapq.heappush(self._events, (done, next(self._seq), handle, node, work))
        return handle

    def cancel(self, handle: str) -> None:
        """The server gave up on this task: its node still works until it would have finished (it is
        occupied), but nothing is trained and its reply is an error."""
        self._cancelled.add(handle)

    def collect(self, timeout: float) -> Iterator[tuple[str, Wire | Rejected | str]]:
        """The next completion within `timeout` virtual seconds (the clock moves to it), else nothing (the
        clock moves by `timeout`)."""
        limit = self.now + timeout
        if self._events and self._events[0][0] <= limit:
            done, _, handle, node, work = heapq.heappop(self._events)
            self.now = max(self.now, done)
            if handle in self._cancelled:
                self._cancelled.discard(handle)
                yield handle, "the server gave up on this task before it finished"
            else:
                yield handle, self.run(node, work) if isinstance(work, Wire) else work
            return
        self.now = max(self.now, limit)
