"""The robust benchmark's adversary: each attack is the formula it claims, computed from the round's honest
updates, and the wrapper rewrites only the attackers' update payloads, identically for colluders."""

import json

import pytest
import torch

from photon.bench.adversary import ATTACKS, Adversary, craft
from photon.federation import codec
from photon.federation.protocol import UPDATE, Wire
from tests.helpers import assert_close_by_norm


def _updates(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)} for _ in range(n)]


def test_each_attack_is_its_formula_of_the_honest_updates():
    honest = _updates(3)
    stack = {n: torch.stack([u[n] for u in honest]).double() for n in ("a", "b")}
    flip = craft("flip", honest, 5.0, None, 1)
    alie = craft("alie", honest, 1.5, None, 1)
    absent = craft("absent", honest, 1.0, None, 1)
    for n in ("a", "b"):
        assert_close_by_norm(absent[n], stack[n].mean(0).float(), 1e-6)
        assert_close_by_norm(flip[n], (-5.0 * stack[n].mean(0)).float(), 1e-6)
        want = stack[n].mean(0) - 1.5 * stack[n].std(0, unbiased=False)
        assert_close_by_norm(alie[n], want.float(), 1e-6)
        assert torch.equal(craft("zero", honest, 1.0, None, 1)[n], torch.zeros_like(honest[0][n]))
    previous = _updates(1, seed=9)[0]
    assert all(torch.equal(craft("replay", honest, 1.0, previous, 2)[n], previous[n]) for n in ("a", "b"))
    assert all(not craft("replay", honest, 1.0, None, 1)[n].any() for n in ("a", "b"))  # nothing to replay yet


def test_noise_has_the_honest_norm_and_is_seeded_by_the_round():
    honest = [{"w": torch.randn(20_000) * 3}, {"w": torch.randn(20_000) * 5}]
    noise = craft("noise", honest, 1.0, None, 7)
    honest_norm = (honest[0]["w"].norm() + honest[1]["w"].norm()) / 2
    assert abs(noise["w"].norm() / honest_norm - 1) < 0.03
    assert torch.equal(noise["w"], craft("noise", honest, 1.0, None, 7)["w"])
    assert not torch.equal(noise["w"], craft("noise", honest, 1.0, None, 8)["w"])


def test_an_unknown_attack_is_refused():
    with pytest.raises(ValueError, match="unknown attack 'nudge'"):
        craft("nudge", _updates(2), 1.0, None, 1)
    with pytest.raises(ValueError, match="choose one of " + ", ".join(ATTACKS)):
        Adversary(None, [1], "nudge")


class _Replies:
    """A transport stand-in whose batch is the given replies (one per client), round by round."""

    def __init__(self, rounds: list[list[dict[str, torch.Tensor]]]):
        self.rounds = rounds
        self.n = 0

    def nodes(self):
        return [0]

    def collect(self, timeout):
        updates = self.rounds[self.n]
        self.n += 1
        for cid, update in enumerate(updates):
            header = json.dumps({"client_id": cid, "round": self.n})
            yield f"h{cid}", Wire(header, {UPDATE: codec.encode(update)})
        yield "lost", "the node failed"  # an error reply passes through untouched


def _sent(batch):
    layout = [("a", (3, 4)), ("b", (5,))]
    return {json.loads(m.header)["client_id"]: codec.decode(m.payloads[UPDATE], layout)
            for _, m in batch if isinstance(m, Wire)}


def test_colluders_send_one_update_crafted_from_the_honest_replies_and_headers_stay():
    first, second = _updates(4, seed=1), _updates(4, seed=2)
    adversary = Adversary(_Replies([first, second]), attackers=[2, 3], attack="replay")
    batch = list(adversary.collect(1.0))
    assert batch[-1] == ("lost", "the node failed")
    sent = _sent(batch)
    for cid in (0, 1):
        assert all(torch.equal(sent[cid][n], first[cid][n]) for n in ("a", "b"))
    assert all(not sent[c][n].any() for c in (2, 3) for n in ("a", "b"))  # round 1: nothing to replay
    assert [json.loads(m.header)["client_id"] for _, m in batch[:-1]] == [0, 1, 2, 3]
    sent = _sent(list(adversary.collect(1.0)))
    for cid in (2, 3):  # the lowest honest client's update of the previous round, the same for both
        assert all(torch.equal(sent[cid][n], first[0][n]) for n in ("a", "b"))


def test_the_flip_is_taken_over_the_honest_replies_only():
    updates = _updates(4, seed=3)
    sent = _sent(list(Adversary(_Replies([updates]), attackers=[3], attack="flip", scale=2.0).collect(1.0)))
    for n in ("a", "b"):
        want = -2.0 * torch.stack([updates[c][n] for c in (0, 1, 2)]).double().mean(0)
        assert_close_by_norm(sent[3][n], want.float(), 1e-6)
