"""Everything the aggregator must remember, checkpointed atomically after every round and restored exactly.

The server owns each client's progress (a client is a data partition, not a machine): its data cursor and
counters live here, so any node can train any client and a crashed node loses nothing. The sampling RNG
is saved too, so a resumed run samples the same clients as an uninterrupted one.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from photon.checkpoint import (
    load_latest,
    prune_checkpoints,
    require_kind,
    save_checkpoint,
)

Tensors = dict[str, torch.Tensor]


@dataclass
class ClientRecord:
    """A logical client's progress, advanced only when one of its rounds succeeds."""

    id: int
    cursor: int = 0
    steps: int = 0
    samples: int = 0
    rounds: int = 0
    failures: int = 0
    dispatches: int = 0  # tasks ever sent for this client (names tasks; seeds their fault draws)
    state_digest: str | None = None  # committed kept state (client_state.py); None = fresh
    state_node: int | None = None    # the node that produced it (it has it cached)
    backup_digest: str | None = None  # the newest state the server holds a copy of (federation.state_backup)


@dataclass
class ServerState:
    round: int
    global_step: int
    params: Tensors
    outer_state: Tensors
    clients: list[ClientRecord]
    rng_state: dict[str, Any]
    totals: dict[str, float] = field(default_factory=lambda: {"bytes_up": 0, "bytes_down": 0, "tokens": 0})
    last_norms: list[float] = field(default_factory=list)  # accepted update norms of the last round
    run_uid: str = field(default_factory=lambda: uuid.uuid4().hex)  # keys node caches of client state
    task_times: list[float] = field(default_factory=list)  # recent dispatch->reply times (adaptive deadline)
    node_step_seconds: dict[str, float] = field(default_factory=dict)  # async: each node's last seconds per step
    clock: float = 0.0  # the transport's clock at the checkpoint (virtual seconds in the in-process engine)
    outstanding: list[dict[str, Any]] = field(default_factory=list)  # async: tasks in flight at the checkpoint
    down_residual: Tensors = field(default_factory=dict)  # error feedback of the compressed down-link
    clip_centre: Tensors = field(default_factory=dict)  # centered clipping from the previous aggregate: that aggregate

    @classmethod
    def fresh(cls, params: Tensors, num_clients: int, seed: int) -> ServerState:
        rng = np.random.default_rng(seed)
        return cls(round=0, global_step=0, params=params, outer_state={},
                   clients=[ClientRecord(i) for i in range(num_clients)], rng_state=rng.bit_generator.state)

    def state_digests(self) -> set[str]:
        return {d for c in self.clients for d in (c.state_digest, c.backup_digest) if d}

    def rng(self) -> np.random.Generator:
        rng = np.random.default_rng()
        rng.bit_generator.state = self.rng_state
        return rng

    def save(self, ckpt_dir: Path, config: dict[str, Any], extra_files: tuple[Path, ...] = (), keep: int = 3) -> Path:
        meta = {"kind": "federated", "round": self.round, "global_step": self.global_step,
                "clients": [asdict(c) for c in self.clients], "rng_state": self.rng_state,
                "totals": self.totals, "last_norms": self.last_norms, "run_uid": self.run_uid,
                "task_times": self.task_times, "node_step_seconds": self.node_step_seconds, "clock": self.clock,
                "outstanding": self.outstanding, "config": config}
        groups = {"model": self.params, "outer": self.outer_state}
        if self.down_residual:
            groups["down"] = self.down_residual
        if self.clip_centre:
            groups["clip"] = self.clip_centre
        path = save_checkpoint(Path(ckpt_dir) / f"round_{self.round:06d}", groups, meta, extra_files)
        prune_checkpoints(ckpt_dir, keep)
        return path

    @classmethod
    def load_latest(cls, ckpt_dir: Path) -> tuple[ServerState, dict[str, Any]] | None:
        found = load_latest(ckpt_dir)
        if found is None:
            return None
        path, tensors, meta = found
        require_kind(meta, "federated", path)
        state = cls(round=meta["round"], global_step=meta["global_step"], params=tensors["model"],
                    outer_state=tensors.get("outer", {}),
                    clients=[ClientRecord(**c) for c in meta["clients"]], rng_state=meta["rng_state"],
                    totals=meta.get("totals", {}), last_norms=meta.get("last_norms", []),
                    run_uid=meta.get("run_uid") or uuid.uuid4().hex, task_times=meta.get("task_times", []),
                    node_step_seconds=meta.get("node_step_seconds", {}),
                    clock=meta.get("clock", 0.0), outstanding=meta.get("outstanding", []),
                    down_residual=tensors.get("down", {}), clip_centre=tensors.get("clip", {}))
        return state, meta


def referenced_state_digests(ckpt_dir: Path) -> set[str]:
    """Client-state digests named by any checkpoint still on disk (the server's state store keeps these)."""
    from photon.checkpoint import list_checkpoints

    out: set[str] = set()
    for path in list_checkpoints(ckpt_dir):
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        out |= {c.get(k) for c in meta.get("clients", []) for k in ("state_digest", "backup_digest") if c.get(k)}
    return out
