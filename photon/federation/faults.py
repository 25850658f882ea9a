"""Deliberate faults (`federation.faults`), for drills and tests: a client that raises, sends noise, or sends a
hostile or broken reply. Applied on the node, in the reply it sends, so both engines (Flower and in-process)
see exactly what a real broken or Byzantine site would send: the server must reject each with a reason and
carry on. Off by default; nothing here runs unless the config names a client.
"""

from __future__ import annotations

import numpy as np
import torch

from photon.config import FaultConfig
from photon.federation.codec import Payload
from photon.federation.protocol import UPDATE, ClientReply, ClientTask, Wire


def maybe_fail(task: ClientTask, faults: FaultConfig) -> None:
    if task.client_id in faults.fail_clients and task.round % faults.fail_every == 0:
        raise RuntimeError(f"injected fault: client {task.client_id} in round {task.round} (federation.faults)")


def corrupt_reply(task: ClientTask, reply: ClientReply, faults: FaultConfig) -> None:
    """Replace an honest reply's content by a faulty one, in place (update-level and header-level faults)."""
    if task.client_id in faults.noise_clients:  # a broken site: noise instead of its update
        gen = torch.Generator().manual_seed(task.round * 1000 + task.client_id)
        reply.update = {k: -faults.noise_scale * torch.randn(v.shape, generator=gen) for k, v in reply.update.items()}
    kind = faults.reply.get(task.client_id)
    if kind == "flip":  # θ − s·(θ_k − θ): the honest update reversed and scaled
        reply.update = {k: v * -faults.flip_scale for k, v in reply.update.items()}
    elif kind == "nan":
        first = sorted(reply.update)[0]
        reply.update[first].view(-1)[0] = float("nan")
    elif kind == "lie":  # claims a huge weight and schedule advance
        reply.samples *= 10**6
        reply.steps *= 1000
    elif kind == "wrong-round":
        reply.round += 1
    elif kind == "wrong-client":
        reply.client_id += 1


def corrupt_wire(task: ClientTask, wire: Wire, faults: FaultConfig) -> Wire:
    """Byte-level faults on the encoded reply."""
    kind = faults.reply.get(task.client_id)
    update = wire.payloads.get(UPDATE)
    if kind == "truncate":
        update.data = update.data[: update.nbytes // 2]
    elif kind == "oversize":
        update.data = np.concatenate([update.data, np.zeros(update.nbytes, np.uint8)])
    elif kind == "bad-header":
        wire.header = wire.header[: len(wire.header) // 2]
    elif kind == "bad-layout":
        update.layout["tensors"][0][1] = [int(d) + 1 for d in update.layout["tensors"][0][1]] or [1]
    elif kind == "wrong-dtype":
        wire.payloads[UPDATE] = Payload(update.layout, update.data.view(np.float32) if update.nbytes % 4 == 0
                                        else update.data.astype(np.float32))
    elif kind == "no-payload":
        wire.payloads.pop(UPDATE)
    return wire
