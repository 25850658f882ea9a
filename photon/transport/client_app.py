"""Flower ClientApp: a train message in, the worker's reply out. Nothing else lives here.

The worker is cached per process and run, so where the process outlives a message, model and data stay warm
across rounds: in simulation (long-lived Ray actors) and on a `photon node --warm` (its long-lived ClientApp
runtime, see `warm_node.py`). A plain `photon node` runs Flower's own executor, a new process per message,
which starts cold. Node
options come from Flower's node config: `data-dir` (prepared data on this node, default: the run's
`data.prep_dir`), `state-dir` (where this node caches kept client state, see `client_state.py`) and
`slowdown` (a drill knob: the node takes that many times as long per task) and `procs` (processes that train
each client together, `photon node --procs`; absent: the run's `federation.procs_per_node`) and `lean` (1: train
with less memory for more compute, `photon node --lean`).
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from photon.federation.worker import ClientWorker
from photon.transport import blobs
from photon.transport.records import content_to_wire, wire_to_content

_workers: dict[tuple[int, str, str], ClientWorker] = {}
BLOB_THRESHOLD = 1 << 20  # replies smaller than this stay in the Flower message


def _worker(context: Context, default_state_dir: str) -> ClientWorker:
    state_dir = str(context.node_config.get("state-dir", "") or default_state_dir)
    data_dir = str(context.node_config.get("data-dir", "") or "")
    slowdown = float(context.node_config.get("slowdown", 1.0))
    procs = int(context.node_config.get("procs", 0)) or None
    lean = bool(int(context.node_config.get("lean", 0)))
    key = (context.run_id, state_dir, data_dir)
    if key not in _workers:
        _workers.clear()  # another run (or node): let the last one's model and memmapped data go
        # the reply leaves with this message (copied into Flower's records, or uploaded) before the next task
        _workers[key] = ClientWorker(Path(state_dir), Path(data_dir) if data_dir else None, slowdown=slowdown,
                                     procs=procs, reply_in_model=True, lean=lean)
    return _workers[key]


def make_client_app(default_state_dir: str = ".photon/node-cache") -> ClientApp:
    """The ClientApp; in simulation the launcher points every virtual node at one cache under the run dir
    (nodes on one machine share a file system), a deployed node sets `state-dir` in its node config."""
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        wire = content_to_wire(msg.content)
        host = str(context.node_config.get("superlink-host", "") or "127.0.0.1")
        ca = str(context.node_config.get("blob-ca", "") or "") or None
        # Large payloads may come by the blob side channel (blobs.py): the worker fetches them (the model straight
        # into its own parameters), the reply goes back that way
        reply = _worker(context, default_state_dir).handle(
            wire, lambda name, payload, into: blobs.materialize(payload, host, ca, name, into))
        if "blob-put" in wire.meta:
            grant = json.loads(wire.meta["blob-put"])
            reply.payloads = {k: blobs.upload(p, grant, host, ca, k) if p.nbytes >= BLOB_THRESHOLD else p
                              for k, p in reply.payloads.items()}
        return Message(wire_to_content(reply), reply_to=msg)

    return client_app


app = make_client_app()
