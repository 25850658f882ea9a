"""What travels between the server and a node, engine-free: a client task out, a client reply back.

A message is a `Wire`: one JSON header plus named byte payloads (`codec.Payload`). A task carries
everything a node needs to train *any* client (its data spans and cursor, the schedule position, the run
config, which kept client state to start from), so nodes hold nothing per client that the server cannot
name. A reply is untrusted: `decode_reply` checks it against the task it answers and derives what the
server can know by itself (samples, steps, the new data cursor) from that task, never from the reply.
The Flower adapter (`records.py`) only wraps a `Wire` into Flower records; the in-process engine passes it
as is, so both engines run the same checks on the same bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from pydantic import ConfigDict, TypeAdapter, ValidationError

from photon.federation import codec
from photon.federation.codec import CodecError, Layout, Payload

Tensors = dict[str, torch.Tensor]
MODEL, UPDATE, STATE = "model", "update", "state"  # payload names


class Rejected(ValueError):
    """A reply the server cannot use; the message is the logged reason."""


UNFIT = "photon:node-unfit"  # marks a node's error reply: "this node cannot train any client" (not the client's fault)


class NodeUnfit(RuntimeError):
    """The node cannot run any task as set up (its data is missing, or was prepared otherwise than the
    server's): the server excludes it at once and gives its client to another node."""

    def __init__(self, reason: str):
        super().__init__(f"{UNFIT} {reason}")


def unfit_reason(reply: object) -> str | None:
    """The reason of a `NodeUnfit` error reply (a str), or None for any other reply or error."""
    return reply.split(UNFIT, 1)[1].strip() if isinstance(reply, str) and UNFIT in reply else None


@dataclass
class Wire:
    """A message as it travels: a JSON header and named payloads."""

    header: str
    payloads: dict[str, Payload] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)  # transport extras (e.g. a blob upload grant), not the task

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.payloads.values())


@dataclass
class ClientTask:
    task_id: str            # unique per dispatch ("c<client>-d<dispatch>"); the reply must name it
    run_id: str             # the run's uid: node caches of client state are keyed by it
    client_id: int
    round: int              # the round (sync) or outer step (async) it was sent in
    global_step: int        # schedule position of the first local step
    cursor: int             # the client's data position (rows consumed)
    local_steps: int
    schedule_steps: int
    batch_size: int
    spans: list[dict[str, Any]]
    config: dict[str, Any]
    client_optimizer: str = "reset"
    state_digest: str | None = None  # the client's committed kept state to start from (None: fresh)
    upload_state: bool = False       # send the new kept state back (server backup)
    attempt: int = 1
    version: int = 0                 # the global model version (outer steps taken) it starts from
    dispatch: int = 0                # the client's dispatch count: seeds per-task fault draws
    model_digest: str | None = None  # digest of the global model the task starts from (compressed down-link)
    base_digest: str | None = None   # set: the model payload is a compressed update to apply to this model
    resend: int = 0                  # > 0: send again the reply kept for task_id (the n-th ask); train nothing
    keep_replies_from: int = 0       # the node may delete its kept replies of earlier rounds

    @property
    def samples(self) -> int:
        """Sequences the client trains on: the only averaging weight the server uses."""
        return self.local_steps * self.batch_size

    @property
    def next_cursor(self) -> int:
        return self.cursor + self.samples

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ClientTask:
        return cls(**json.loads(text))


LOST = "photon:reply-lost"  # marks a reply lost on the way back: neither the node's nor the client's fault


def lost_reply(task_id: str, why: str) -> str:
    """The error text of a reply lost in transit (the node did the work; the message did not arrive)."""
    return f"{LOST} the reply of task {task_id} was lost ({why})"


def is_lost(reply: object) -> bool:
    return isinstance(reply, str) and LOST in reply


def error_text(reply: str) -> str:
    """An error reply as logged: without the marker a lost reply carries."""
    return reply.replace(f"{LOST} ", "")


@dataclass
class ReplyHeader:
    """What a reply says about itself (JSON); the server parses it with exact types and no extra keys."""

    __pydantic_config__ = ConfigDict(extra="forbid", strict=True)

    task_id: str
    client_id: int
    round: int
    samples: int
    steps: int
    cursor: int
    loss: float
    train_seconds: float
    state_digest: str | None = None


_HEADER = TypeAdapter(ReplyHeader)


@dataclass
class ClientReply(ReplyHeader):
    """A decoded reply; `update` is the client's pseudo-gradient Δ_k = θ − θ_k (fp32)."""

    update: Tensors = field(default_factory=dict, repr=False)
    state: Tensors | None = field(default=None, repr=False)
    payload: Payload | None = field(default=None, repr=False)  # the update already encoded (compressed up-link)

    def header_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(ReplyHeader)})


# ---------------------------------------------------------------------------------------------------------
# Node side


def encode_task(task: ClientTask, model: Payload, state: Payload | None = None) -> Wire:
    payloads = {MODEL: model}
    if state is not None:
        payloads[STATE] = state
    return Wire(task.to_json(), payloads)


def decode_task(wire: Wire) -> ClientTask:
    """The task header (the server is trusted by the node: it chose to join this server)."""
    return ClientTask.from_json(wire.header)


def encode_reply(reply: ClientReply) -> Wire:
    payloads = {UPDATE: reply.payload if reply.payload is not None else codec.encode(reply.update)}
    if reply.state is not None:
        payloads[STATE] = codec.encode(reply.state)
    return Wire(reply.header_json(), payloads)


# ---------------------------------------------------------------------------------------------------------
# Server side: nothing in a reply is believed until checked against the task it answers


def verify_header(header: ReplyHeader, task: ClientTask) -> None:
    """Every field the server can derive from the task must equal what the reply claims."""
    expected = {"task_id": task.task_id, "client_id": task.client_id, "round": task.round,
                "steps": task.local_steps, "samples": task.samples, "cursor": task.next_cursor}
    for key, want in expected.items():
        got = getattr(header, key)
        if got != want:
            raise Rejected(f"header claims {key}={got!r}, but the task asked for {want!r}")
    if not math.isfinite(header.loss) or not math.isfinite(header.train_seconds) or header.train_seconds < 0:
        raise Rejected(f"header has a non-finite loss or time ({header.loss}, {header.train_seconds})")


def decode_reply(wire: Wire, task: ClientTask, model_layout: Layout, state_layout: Layout | None,
                 spec: codec.CodecSpec | None = None) -> ClientReply:
    """Parse, check and decode a reply to `task`; `Rejected` with the reason if anything is off.

    `samples`, `steps` and `cursor` of the result are the task's (derived), not the reply's; the update must
    have exactly the model's names and shapes and be finite; a kept state, when the task asked for it back,
    must match `state_layout` and the digest the header names."""
    try:
        header = _HEADER.validate_json(wire.header)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "header"
        raise Rejected(f"reply header is malformed ({where}: {first['msg']})") from None
    verify_header(header, task)
    if UPDATE not in wire.payloads:
        raise Rejected("reply has no update payload")
    extra = set(wire.payloads) - {UPDATE, STATE}
    if extra:
        raise Rejected(f"reply has unexpected payloads {sorted(extra)}")
    try:
        sent = codec.CodecSpec.from_layout(wire.payloads[UPDATE].layout)
        if spec is not None and (sent.name, sent.params()) != (spec.name, spec.params()):
            raise Rejected(f"update encoded as {wire.payloads[UPDATE].layout.get('codec')!r} with other settings "
                           f"than the task asked for ({spec.name})")
        update = codec.decode(wire.payloads[UPDATE], model_layout)
    except CodecError as e:
        raise Rejected(f"update: {e}") from None
    state = None
    if task.upload_state:
        if STATE not in wire.payloads or state_layout is None or header.state_digest is None:
            raise Rejected("reply lacks the kept client state the task asked for")
        try:
            state = codec.decode(wire.payloads[STATE], state_layout)
        except CodecError as e:
            raise Rejected(f"client state: {e}") from None
        from photon.digest import tensors_digest

        if tensors_digest(state) != header.state_digest:
            raise Rejected("client state does not match the digest its header names")
    elif STATE in wire.payloads:
        raise Rejected("reply carries a client state the task did not ask for")
    return ClientReply(task_id=task.task_id, client_id=task.client_id, round=task.round, samples=task.samples,
                       steps=task.local_steps, cursor=task.next_cursor, loss=header.loss,
                       train_seconds=header.train_seconds, state_digest=header.state_digest, update=update,
                       state=state)


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
