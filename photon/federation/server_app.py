"""Flower ServerApp: our own round loop (`runner.run_federation`) over Flower's Grid.

Built-in strategies cut long rounds off with a default timeout and wait forever for lost nodes; a transport
over `Grid.push_messages`/`pull_messages` keeps deadlines, re-queueing and partial rounds in our hands.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from photon.config import RunConfig, build_config
from photon.federation.messages import content_reply, params_layout, params_record, task_content
from photon.federation.runner import run_federation
from photon.federation.task import ClientReply, ClientTask, Tensors


class GridTransport:
    """`aggregator.Transport` over a Flower Grid: one train message per client task."""

    def __init__(self, grid: Grid, poll_s: float = 0.05):
        self.grid = grid
        self.poll_s = poll_s
        self._pending: set[str] = set()
        self._record: tuple[int, object] | None = None  # (id of params dict version, ArrayRecord)

    def nodes(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def submit(self, node: int, task: ClientTask, params: Tensors) -> str:
        key = (task.round, task.global_step)
        if self._record is None or self._record[0] != key:  # encode the global model once per round
            self._record = (key, (params_record(params), params_layout(params)))
        msg = Message(task_content(task, *self._record[1]), dst_node_id=node, message_type="train",
                      group_id=str(task.round))
        (msg_id,) = self.grid.push_messages([msg])
        self._pending.add(msg_id)
        return msg_id

    def collect(self, timeout: float) -> list[tuple[str, ClientReply | str]]:
        end = time.monotonic() + timeout
        while True:
            out = []
            for msg in self.grid.pull_messages(list(self._pending)):
                handle = msg.metadata.reply_to_message_id
                self._pending.discard(handle)
                if msg.has_error():
                    out.append((handle, f"node {msg.metadata.src_node_id}: {short_reason(msg.error.reason)}"))
                else:
                    out.append((handle, content_reply(msg.content)))
            if out or time.monotonic() >= end:
                return out
            time.sleep(self.poll_s)


def short_reason(reason: str | None) -> str:
    """One line out of a remote traceback: the exception's own message where Flower/Ray wrapped it."""
    text = reason or "unknown error"
    found = re.findall(r"Message: (.+?)(?:'>|$)", text, flags=re.MULTILINE)
    line = found[-1] if found else next((ln for ln in reversed(text.splitlines()) if ln.strip()), text)
    return line.strip()[:300]


def make_server_app(cfg: RunConfig, run_dir: Path, resume: bool, result: dict, **kwargs) -> ServerApp:
    """A ServerApp bound to an already-built config (simulation, where we launch in-process)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            result.update(run_federation(cfg, run_dir, GridTransport(grid), resume=resume, **kwargs))
        except BaseException as e:  # Flower would log and swallow it: hand it back to the caller
            result["error"] = e

    return app


# Deployment runtime (`flwr run`): the run config carries the config as JSON, written by `photon submit`.
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    import json

    rc = context.run_config
    cfg = build_config(json.loads(str(rc["config-json"])))
    run_federation(cfg, Path(str(rc["run-dir"])), GridTransport(grid), resume=bool(rc.get("resume", False)))
