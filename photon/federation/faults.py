"""Deliberate faults (`federation.faults`), for drills, tests and benchmarks: a client that raises, sends noise,
sends a hostile or broken reply, trains slowly, runs late or loses its reply. Reply faults are applied on
the node, in the reply it sends, so both engines see exactly what a real broken or Byzantine site would
send. Timing faults are drawn per task from a seed (`task_timing`), so the in-process engine's virtual clock
and a real Flower run (where slow tasks really sleep) make the same draws. Faults of a node (a slow machine,
a lossy link, an outage) are drawn once per node and modelled by the virtual clock. Off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from photon.config import FaultConfig
from photon.federation.codec import Payload
from photon.federation.protocol import UPDATE, ClientReply, ClientTask, Wire


@dataclass(frozen=True)
class TaskTiming:
    speed: float    # compute time multiplier (1 = nominal)
    late: bool
    dropped: bool   # the reply is lost


def slow_clients(faults: FaultConfig, num_clients: int) -> set[int]:
    """The `slow_fraction` of the clients that are `slow_factor`× slower, drawn once from `faults.seed`."""
    k = round(faults.slow_fraction * num_clients)
    if k == 0:
        return set()
    return {int(c) for c in np.random.default_rng([faults.seed, 1]).choice(num_clients, size=k, replace=False)}


def slow_nodes(faults: FaultConfig, num_nodes: int) -> set[int]:
    """The `slow_node_fraction` of the nodes that are `slow_factor`× slower, drawn once from `faults.seed`."""
    k = round(faults.slow_node_fraction * num_nodes)
    if k == 0:
        return set()
    return {int(n) for n in np.random.default_rng([faults.seed, 3]).choice(num_nodes, size=k, replace=False)}


def link_drops(faults: FaultConfig, node: int, arrival: float) -> bool:
    """Whether node `node`'s link loses a reply arriving at virtual time `arrival` (`drop_trace: link`): a fixed
    function of (seed, node, the arrival's microsecond), so the same link is lossy at the same instants in
    every arm, however the arms dispatch."""
    return bool(np.random.default_rng([faults.seed, 4, node, round(arrival * 1e6)]).random() <
                faults.drop_probability)


def down_window(faults: FaultConfig, node: int, start: float, end: float) -> tuple[float, float] | None:
    """The node's outage if it overlaps [start, end), else None."""
    window = faults.outage.get(node)
    return window if window is not None and window[0] < end and start < window[1] else None


def task_timing(task: ClientTask, faults: FaultConfig, num_clients: int) -> TaskTiming:
    """This task's speed, lateness and loss: a pure function of (seed, client, dispatch count, and for a
    re-sent reply the how-many-th ask). Node-level faults (`slow_nodes`, `link_drops`, `outage`) are the
    virtual clock's, which knows the node and the time."""
    key = [faults.seed, 2, task.client_id, task.dispatch] + ([task.resend] if task.resend else [])
    draw = np.random.default_rng(key).random(2)
    late = bool(draw[0] < faults.late_probability)
    dropped = bool(draw[1] < faults.drop_probability) and faults.drop_trace == "task"
    speed = (faults.slow_factor if task.client_id in slow_clients(faults, num_clients) else 1.0) * \
        (faults.late_factor if late else 1.0)
    return TaskTiming(speed, late, dropped)


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
