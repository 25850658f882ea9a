"""An omniscient, colluding adversary for `photon bench robust`: it sees every honest update of a round before
its own clients reply, and they all send the same crafted update.

It wraps a transport (the in-process one, with a node per sampled client, so a sync round's replies come
back together) and rewrites the update payload of the attacking clients' replies; their headers stay
honest, so the server's checks pass and only the aggregation rule stands between the attack and the model.
This is the threat model of the robust-aggregation literature (the attacker knows the honest updates and
the rule), stronger than a node that only corrupts its own reply (`federation.faults`). Updates are the
pseudo-gradients Δ_k = θ − θ_k the server averages; every attack is a function of the round's honest Δs:

  flip    −s · mean(honest)                     the honest direction reversed and scaled
  noise   N(0, σ²), ‖·‖ ≈ the mean honest norm   a broken site that sends noise of a plausible size
  zero    0                                     a free-rider
  replay  an honest client's update of the previous round (zero in the first)
  alie    mean(honest) − z · std(honest)        "a little is enough" (Baruch et al. 2019), per coordinate
  absent  mean(honest)                          no attack, no data: under the plain mean the same as the
                                                attackers' replies never arriving, the floor a defence
                                                that removes them exactly would reach
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from photon.federation import codec
from photon.federation.protocol import UPDATE, Wire

ATTACKS = ("flip", "noise", "zero", "replay", "alie", "absent")


def _decode(payload: codec.Payload) -> dict[str, torch.Tensor]:
    return codec.decode(payload, [(str(n), tuple(int(d) for d in s)) for n, s in payload.layout["tensors"]])


def craft(attack: str, honest: list[dict[str, torch.Tensor]], scale: float, previous: dict[str, torch.Tensor] | None,
          round_: int) -> dict[str, torch.Tensor]:
    """The attackers' shared update for one round, from the honest updates (at least one)."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}: choose one of {', '.join(ATTACKS)}")
    names = sorted(honest[0])
    stacked = {n: torch.stack([u[n].to(torch.float64) for u in honest]) for n in names}
    mean = {n: s.mean(0) for n, s in stacked.items()}
    if attack == "flip":
        out = {n: -scale * m for n, m in mean.items()}
    elif attack == "zero":
        out = {n: torch.zeros_like(m) for n, m in mean.items()}
    elif attack == "replay":
        out = dict(previous) if previous is not None else {n: torch.zeros_like(m) for n, m in mean.items()}
    elif attack == "absent":
        out = mean
    elif attack == "alie":
        out = {n: mean[n] - scale * (s.std(0, unbiased=False)) for n, s in stacked.items()}
    else:  # noise at the honest norm
        norm = sum(float(sum(u[n].double().square().sum() for n in names)) ** 0.5 for u in honest) / len(honest)
        numel = sum(m.numel() for m in mean.values())
        gen = torch.Generator().manual_seed(round_)
        out = {n: torch.randn(m.shape, generator=gen, dtype=torch.float64) * (norm / numel ** 0.5)
               for n, m in mean.items()}
    return {n: t.to(torch.float32).contiguous() for n, t in out.items()}


class Adversary:
    """A transport wrapper: the clients in `attackers` reply with `craft(attack, ...)` instead of their update.

    `collect` drains the wrapped transport's replies of the batch, then rewrites the attackers' replies from
    the honest ones among them (a batch with no honest reply passes unchanged). The replayed update is the
    lowest-numbered honest client's of the previous batch."""

    def __init__(self, inner: Any, attackers: Iterable[int], attack: str, scale: float = 1.0):
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}: choose one of {', '.join(ATTACKS)}")
        self.inner, self.attackers, self.attack, self.scale = inner, set(attackers), attack, scale
        self._previous: dict[str, torch.Tensor] | None = None

    def nodes(self) -> list[int]:
        return self.inner.nodes()

    def submit(self, node: int, wire: Wire) -> str:
        return self.inner.submit(node, wire)

    def collect(self, timeout: float) -> Iterator[tuple[str, Wire | str]]:
        batch = list(self.inner.collect(timeout))
        clients = {h: json.loads(m.header)["client_id"] for h, m in batch if isinstance(m, Wire)}
        honest = {clients[h]: _decode(m.payloads[UPDATE]) for h, m in batch
                  if h in clients and clients[h] not in self.attackers}
        if honest and any(c in self.attackers for c in clients.values()):
            round_ = json.loads(next(m.header for h, m in batch if h in clients))["round"]
            update = codec.encode(craft(self.attack, [honest[c] for c in sorted(honest)], self.scale,
                                        self._previous, round_))
            batch = [(h, Wire(m.header, {**m.payloads, UPDATE: update}) if clients.get(h) in self.attackers else m)
                     for h, m in batch]
        if honest:
            self._previous = honest[min(honest)]
        yield from batch
