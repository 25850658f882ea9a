"""An engine-free transport: tasks run in this process, one at a time, on a `ClientWorker`.

For tests of the round logic and for debugging without Flower (`photon run --engine inprocess`). A
`fail` hook lets tests inject errors for chosen (client, round, attempt) triples.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from photon.federation.task import ClientReply, ClientTask, Tensors
from photon.federation.worker import ClientWorker


class InProcessTransport:
    def __init__(self, worker: ClientWorker, num_nodes: int = 1,
                 fail: Callable[[ClientTask], str | None] | None = None):
        self.worker = worker
        self.num_nodes = num_nodes
        self.fail = fail
        self._ids = itertools.count()
        self._pending: dict[str, tuple[ClientTask, Tensors]] = {}

    def nodes(self) -> list[int]:
        return list(range(self.num_nodes))

    def submit(self, node: int, task: ClientTask, params: Tensors) -> str:
        handle = f"m{next(self._ids)}"
        self._pending[handle] = (task, params)
        return handle

    def collect(self, timeout: float) -> list[tuple[str, ClientReply | str]]:
        out: list[tuple[str, ClientReply | str]] = []
        for handle, (task, params) in sorted(self._pending.items()):
            error = self.fail(task) if self.fail else None
            if error is None:
                try:
                    out.append((handle, self.worker.run(task, params)))
                except Exception as e:  # as Flower does: a ClientApp exception becomes an error reply
                    out.append((handle, f"{type(e).__name__}: {e}"))
                continue
            out.append((handle, error))
        self._pending.clear()
        return out
