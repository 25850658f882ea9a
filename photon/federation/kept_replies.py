"""A node keeps every reply it sends (on disk, by task id) until the server can no longer need it, so a reply
lost on the way is sent again when the server asks (a task with `resend` > 0) instead of being trained again.

A kept reply is the encoded message itself: its header (JSON text) and, per payload, its layout (JSON) and
bytes, under `<state_dir>/<run uid>/replies/r<round>-<task id>/`. Nothing is pickled. The server says in every
task which rounds it may still ask about (`keep_replies_from`: a synchronous round settles every earlier
round's tasks; an asynchronous one may still fold replies up to `max_staleness` outer steps old); older
replies are deleted when the next task arrives.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from photon.checkpoint import atomic_write_text
from photon.federation.client_state import NodeStateCache
from photon.federation.codec import Payload
from photon.federation.protocol import ClientTask, Wire

NOT_KEPT = "photon:reply-not-kept"  # marks a node's error reply: "I no longer hold the reply you asked for"


class KeptReplies:
    """The replies one node sent, by run and task."""

    def __init__(self, cache: NodeStateCache):
        self.cache = cache

    def _run_dir(self, run_id: str) -> Path:
        return self.cache.run_dir(run_id) / "replies"

    def _dir(self, task: ClientTask) -> Path:
        if not task.task_id.replace("-", "").isalnum():
            raise ValueError(f"bad task id {task.task_id!r}")
        return self._run_dir(task.run_id) / f"r{task.round:08d}-{task.task_id}"

    def keep(self, task: ClientTask, wire: Wire) -> None:
        """Write the reply to `task` (complete or not at all: a folder renamed into place)."""
        final = self._dir(task)
        part = final.with_name(final.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        names = sorted(wire.payloads)
        atomic_write_text(part / "header.json", json.dumps({"header": wire.header, "payloads": names}))
        for i, name in enumerate(names):
            payload = wire.payloads[name]
            atomic_write_text(part / f"{i}.layout.json", payload.layout_json())
            (part / f"{i}.bin").write_bytes(payload.as_bytes())
        shutil.rmtree(final, ignore_errors=True)
        part.rename(final)

    def load(self, task: ClientTask) -> Wire | None:
        """The reply this node kept for `task`, or None."""
        folder = self._dir(task)
        if not (folder / "header.json").exists():
            return None
        index = json.loads((folder / "header.json").read_text())
        payloads = {}
        for i, name in enumerate(index["payloads"]):
            data = np.frombuffer((folder / f"{i}.bin").read_bytes(), dtype=np.uint8)
            payloads[name] = Payload.from_parts((folder / f"{i}.layout.json").read_text(), data)
        return Wire(index["header"], payloads)

    def forget_before(self, run_id: str, round_: int) -> None:
        """Delete the kept replies of rounds before `round_` (the server will not ask for them)."""
        folder = self._run_dir(run_id)
        if not folder.is_dir():
            return
        for kept in folder.iterdir():
            try:
                kept_round = int(kept.name[1:9])
            except ValueError:
                continue
            if kept_round < round_:
                shutil.rmtree(kept, ignore_errors=True)
