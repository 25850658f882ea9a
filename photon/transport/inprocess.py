"""An engine-free transport: tasks run in this process, one at a time, on a `ClientWorker` per node.

For tests of the round logic and for debugging without Flower (`photon run --engine inprocess`). Messages
are the same `Wire` bytes the Flower adapter carries, so the server's checks are exercised exactly as in
deployment. A `fail` hook lets tests inject errors for chosen tasks.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

from photon.federation.protocol import ClientTask, Wire, decode_task
from photon.federation.worker import ClientWorker


class InProcessTransport:
    def __init__(self, worker: ClientWorker | Sequence[ClientWorker], num_nodes: int = 1,
                 fail: Callable[[ClientTask], str | None] | None = None):
        """One worker shared by `num_nodes` nodes (one cache: like nodes on a shared file system), or a
        worker per node (each with its own cache)."""
        self.workers = list(worker) if isinstance(worker, Sequence) else [worker] * num_nodes
        self.fail = fail
        self._ids = itertools.count()
        self._pending: dict[str, tuple[int, Wire]] = {}

    def nodes(self) -> list[int]:
        return list(range(len(self.workers)))

    def submit(self, node: int, wire: Wire) -> str:
        handle = f"m{next(self._ids)}"
        self._pending[handle] = (node, wire)
        return handle

    def collect(self, timeout: float) -> Iterator[tuple[str, Wire | str]]:
        pending, self._pending = self._pending, {}
        for handle, (node, wire) in sorted(pending.items(), key=lambda kv: int(kv[0][1:])):
            yield handle, self.run(node, wire)

    def run(self, node: int, wire: Wire) -> Wire | str:
        error = self.fail(decode_task(wire)) if self.fail else None
        if error is not None:
            return error
        try:
            return self.workers[node].handle(wire)
        except Exception as e:  # as Flower does: a ClientApp exception becomes an error reply
            return f"{type(e).__name__}: {e}"
