"""Flower ServerApp: our own round loop (`runner.run_federation`) over Flower's Grid.

Built-in strategies cut long rounds off with a default timeout and wait forever for lost nodes; a transport
over `Grid.push_messages`/`pull_messages` keeps deadlines, re-queueing and partial rounds in our hands.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from photon.config import ModelConfig, RunConfig, build_config
from photon.errors import UserError
from photon.federation.codec import CodecError
from photon.federation.protocol import ClientTask, Rejected, Wire
from photon.federation.runner import run_federation
from photon.model.transformer import count_params
from photon.transport.blobs import BLOB, BlobError, Channel
from photon.transport.records import content_to_wire, wire_to_content

log = logging.getLogger(__name__)


class GridTransport:
    """`aggregator.Transport` over a Flower Grid: one train message per client task.

    Replies are pulled one message id at a time and handed over as the aggregator asks for them, so the
    server holds one reply's bytes at once whatever K is (Flower's pull inflates every message it is asked
    for). A reply whose records are malformed becomes a `Rejected` for that task, never an exception out of
    `collect`. Unanswered message ids stay pending across rounds, so a straggler's reply is still pulled
    (and dropped by the aggregator as late) instead of piling up on the SuperLink. While nothing arrives the
    poll interval doubles from `poll_s` up to `max_poll_s`."""

    def __init__(self, grid: Grid, poll_s: float = 0.05, max_poll_s: float = 1.0, retries: int = 6,
                 blobs: Channel | None = None, stop: threading.Event | None = None):
        """`blobs`: large payloads travel over the side channel `photon server` runs (blobs.py); the message
        carries references. `stop`: once set, the next Grid call raises KeyboardInterrupt, which ends the round
        loop where it stands (the last checkpoint stays as written): how Ctrl-C reaches a simulation's server
        thread."""
        self.grid, self.stop = grid, stop
        self.poll_s, self.max_poll_s, self.retries = poll_s, max_poll_s, retries
        self.blobs = blobs
        self._live: deque[str] = deque()  # model blobs recent tasks may still fetch
        self._pending: list[str] = []
        self._slots: dict[str, str] = {}  # message id -> the upload slot granted to that task

    def _call(self, what: str, fn, *args):
        """A Grid call, retried with backoff: under load the SuperLink answers some requests with a server
        error (seen: "database is locked" from its SQLite state while large objects stream in); one such
        answer must not end the run."""
        if self.stop is not None and self.stop.is_set():
            raise KeyboardInterrupt
        for attempt in range(self.retries + 1):
            try:
                return fn(*args)
            except Exception as e:  # httpx/transport errors: Flower raises them as is
                if attempt == self.retries:
                    raise RuntimeError(f"the SuperLink kept failing {what} ({type(e).__name__}: {e}); is it "
                                       "overloaded or gone?") from None
                delay = min(8.0, 0.5 * 2**attempt)
                log.warning("%s failed (%s: %s); retrying in %.1f s", what, type(e).__name__, e, delay)
                time.sleep(delay)

    def nodes(self) -> list[int]:
        return sorted(self._call("listing nodes", self.grid.get_node_ids))

    def submit(self, node: int, wire: Wire) -> str:
        grant = None
        if self.blobs is not None:  # big payloads go by the side channel; the node may upload its reply there
            task = ClientTask.from_json(wire.header)
            limit = 16 * count_params(ModelConfig.model_validate(task.config["model"]))  # 4× the fp32 model
            grant = self.blobs.put_grant(limit)
            wire = Wire(wire.header, {k: self.blobs.offload(p) for k, p in wire.payloads.items()},
                        {**wire.meta, "blob-put": json.dumps(grant)})
            for p in wire.payloads.values():
                if BLOB in p.layout and p.layout[BLOB]["digest"] not in self._live:
                    self._live.append(p.layout[BLOB]["digest"])
            while len(self._live) > 3:
                self._live.popleft()
            self.blobs.forget(set(self._live))  # older models: no task will fetch them
        msg = Message(wire_to_content(wire), dst_node_id=node, message_type="train")
        ids = list(self._call("pushing a task", self.grid.push_messages, [msg]))
        del msg
        (msg_id,) = ids
        self._pending.append(msg_id)
        if grant is not None:
            self._slots[msg_id] = grant["slot"]
        return msg_id

    def collect(self, timeout: float) -> Iterator[tuple[str, Wire | Rejected | str]]:
        end = time.monotonic() + timeout
        wait = self.poll_s
        while True:
            got = 0
            for msg_id in list(self._pending):
                pulled = list(self._call("pulling a reply", self.grid.pull_messages, [msg_id]))
                if not pulled:
                    continue
                self._pending.remove(msg_id)
                got += 1
                reply = self._decode(pulled.pop(), self._slots.pop(msg_id, None))
                yield msg_id, reply
                del reply  # before pulling the next one
            if got or time.monotonic() >= end:
                return
            time.sleep(min(wait, max(0.0, end - time.monotonic())))
            wait = min(2 * wait, self.max_poll_s)

    def _decode(self, msg: Message, slot: str | None) -> Wire | Rejected | str:
        if msg.has_error():
            return f"node {msg.metadata.src_node_id}: {short_reason(msg.error.reason)}"
        try:
            wire = content_to_wire(msg.content)
            if self.blobs is not None:
                wire.payloads = {k: self.blobs.load(p, slot) for k, p in wire.payloads.items()}
            return wire
        except CodecError as e:
            return Rejected(f"malformed reply records ({e})")
        except BlobError as e:
            return Rejected(f"reply blob: {e}")


def short_reason(reason: str | None) -> str:
    """One line out of a remote traceback: the exception's own message where Flower/Ray wrapped it."""
    text = reason or "unknown error"
    wrapped = re.fullmatch(r"\s*<class '[\w.]+'>:<'(.*)'>\s*", text, flags=re.DOTALL)  # Flower: type:<'message'>
    if wrapped:
        text = wrapped.group(1)
    found = re.findall(r"Message: (.+?)(?:'>|$)", text, flags=re.MULTILINE)
    line = found[-1] if found else next((ln for ln in reversed(text.splitlines()) if ln.strip()), text)
    return line.strip()[:300]


def act_as_a_serverapp_process(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> None:
    """Give this process the task identity Flower gives a ServerApp process, so that Grid calls made outside
    Flower's runtime (a benchmark's memory probe of a round) pass Flower's checks as they would deployed."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id


def make_server_app(cfg: RunConfig, run_dir: Path, resume: bool, result: dict, blobs: Channel | None = None,
                    stop: threading.Event | None = None, started: threading.Event | None = None,
                    done: threading.Event | None = None, **kwargs) -> ServerApp:
    """A ServerApp bound to an already-built config (simulation, where we launch in-process); `blobs`: the side
    channel large payloads take (`launch.loopback_blobs`); `stop`: see `GridTransport`; `started` and `done`:
    set when the round loop begins and once it has ended, however it ended."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if started is not None:  # an interrupt before this has no server thread to wait for
            started.set()
        try:
            result.update(run_federation(cfg, run_dir, GridTransport(grid, blobs=blobs, stop=stop), resume=resume,
                                         **kwargs))
        except BaseException as e:  # Flower would log and swallow it: hand it back to the caller
            result["error"] = e
        finally:
            if done is not None:
                done.set()

    return app


# Deployment runtime (`flwr run`): the run config carries the config as JSON, written by `photon submit`.
app = ServerApp()
RUN_LOCK_WAIT_S = 60.0  # a SIGKILLed `photon server` left the old ServerApp alive for up to ~25 s here


@app.main()
def main(grid: Grid, context: Context) -> None:
    import json

    rc = context.run_config
    try:
        cfg = build_config(json.loads(str(rc["config-json"])))
        # `photon server` runs a blob side channel beside the SuperLink and describes it here (read at the edge)
        blobs = Channel.from_env(os.environ["PHOTON_BLOBS"]) if os.environ.get("PHOTON_BLOBS") else None
        # a server restarted after a kill can start this run while the old run's ServerApp, which Flower ends,
        # still holds the run folder for a few seconds: wait for it rather than refuse
        run_federation(cfg, Path(str(rc["run-dir"])), GridTransport(grid, blobs=blobs),
                       resume=bool(rc.get("resume", False)), lock_wait_s=RUN_LOCK_WAIT_S)
    except UserError as e:  # a mistake the user can fix: one line in the run's log, not a traceback
        from flwr.supercore.exit import ExitCode, flwr_exit

        # Flower logs an exception's traceback; its own exit path logs our line, marks the run failed and
        # flushes the run's log before the process ends.
        flwr_exit(ExitCode.SERVERAPP_EXCEPTION, f"error: {e}")
