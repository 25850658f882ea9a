"""Flower ClientApp: a train message in, the worker's reply out. Nothing else lives here.

The worker is cached per process and run, so where the process outlives a message, model and data stay warm
across rounds: in simulation (long-lived Ray actors) and on a `photon node` (its long-lived ClientApp runtime,
see `deploy.py`). Flower's own deployment executor starts a new process per message, which starts cold. Node
options come from Flower's node config: `data-dir` (prepared data on this node, default: the run's
`data.prep_dir`) and `state-dir` (where `persist` mode keeps per-client optimizer state).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from photon.federation.messages import content_task, reply_content
from photon.federation.worker import ClientWorker

app = ClientApp()
_workers: dict[tuple[int, str, str], ClientWorker] = {}


def _worker(context: Context) -> ClientWorker:
    state_dir = str(context.node_config.get("state-dir", "") or "")
    data_dir = str(context.node_config.get("data-dir", "") or "")
    key = (context.run_id, state_dir, data_dir)
    if key not in _workers:
        _workers.clear()  # another run (or node): let the last one's model and memmapped data go
        _workers[key] = ClientWorker(Path(state_dir) if state_dir else Path(".photon-node"),
                                     Path(data_dir) if data_dir else None)
    return _workers[key]


@app.train()
def train(msg: Message, context: Context) -> Message:
    task, params = content_task(msg.content)
    reply = _worker(context).run(task, params)
    return Message(reply_content(reply), reply_to=msg)
