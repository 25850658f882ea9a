"""Flower ServerApp: our own round loop (`runner.run_federation`) over Flower's Grid.

Built-in strategies cut long rounds off with a default timeout and wait forever for lost nodes; a transport
over `Grid.push_messages`/`pull_messages` keeps deadlines, re-queueing and partial rounds in our hands.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from photon.config import RunConfig, build_config
from photon.errors import UserError
from photon.federation.codec import CodecError
from photon.federation.protocol import Rejected, Wire
from photon.federation.records import content_to_wire, wire_to_content
from photon.federation.runner import run_federation

log = logging.getLogger(__name__)


class GridTransport:
    """`aggregator.Transport` over a Flower Grid: one train message per client task.

    Replies are turned into `Wire`s one at a time as the aggregator asks for them, and a reply whose records
    are malformed becomes an error string for that task, never an exception out of `collect`. Unanswered
    message ids stay pending across rounds, so a straggler's reply is still pulled (and dropped by the
    aggregator as late) instead of piling up on the SuperLink."""

    def __init__(self, grid: Grid, poll_s: float = 0.05):
        self.grid = grid
        self.poll_s = poll_s
        self._pending: set[str] = set()

    def nodes(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def submit(self, node: int, wire: Wire) -> str:
        msg = Message(wire_to_content(wire), dst_node_id=node, message_type="train")
        (msg_id,) = self.grid.push_messages([msg])
        self._pending.add(msg_id)
        return msg_id

    def collect(self, timeout: float) -> Iterator[tuple[str, Wire | Rejected | str]]:
        end = time.monotonic() + timeout
        while True:
            messages = list(self.grid.pull_messages(list(self._pending))) if self._pending else []
            for i, msg in enumerate(messages):
                handle = msg.metadata.reply_to_message_id
                self._pending.discard(handle)
                messages[i] = None  # type: ignore[call-overload]  # drop our reference before decoding the next
                yield handle, self._decode(msg)
            if messages or time.monotonic() >= end:
                return
            time.sleep(self.poll_s)

    @staticmethod
    def _decode(msg: Message) -> Wire | Rejected | str:
        if msg.has_error():
            return f"node {msg.metadata.src_node_id}: {short_reason(msg.error.reason)}"
        try:
            return content_to_wire(msg.content)
        except CodecError as e:
            return Rejected(f"malformed reply records ({e})")


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
    try:
        cfg = build_config(json.loads(str(rc["config-json"])))
        run_federation(cfg, Path(str(rc["run-dir"])), GridTransport(grid), resume=bool(rc.get("resume", False)))
    except UserError as e:  # a mistake the user can fix: one line in the run's log, not a traceback
        log.error("error: %s", e)
        print(f"error: {e}", flush=True)
        raise SystemExit(2) from None
