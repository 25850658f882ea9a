"""What travels between aggregator and nodes, engine-free: a client task out, a client reply back.

A task carries everything a node needs to train *any* client (the client's data spans and cursor, the
schedule position, the run config), so nodes hold no per-client state of their own. The Flower adapter
(`messages.py`) turns these into records; tensors travel beside them, never pickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

Tensors = dict[str, torch.Tensor]


@dataclass
class ClientTask:
    client_id: int
    round: int
    global_step: int
    cursor: int
    local_steps: int
    schedule_steps: int
    spans: list[dict[str, Any]]
    config: dict[str, Any]
    client_optimizer: str = "reset"
    attempt: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ClientTask:
        return cls(**json.loads(text))


@dataclass
class ClientReply:
    client_id: int
    round: int
    samples: int
    steps: int
    cursor: int
    loss: float
    train_seconds: float
    params: Tensors = field(default_factory=dict, repr=False)

    def header_json(self) -> str:
        """Everything but the tensors."""
        d = asdict(self)
        d.pop("params")
        return json.dumps(d)

    @classmethod
    def from_header(cls, text: str, params: Tensors) -> ClientReply:
        return cls(**json.loads(text), params=params)


def tensor_bytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
