"""Centered clipping over parked updates: it matches a plain dense numpy implementation of the papers' rule
whatever the chunking, depends only on the set of updates (not their arrival order), reduces to the weighted
mean when nothing is clipped, bounds how far one scaled attacker moves the result, and leaves honest but
dissimilar updates most of their weight."""

import math

import numpy as np
import pytest
import torch

from photon.federation import fold
from photon.federation.clipping import ClipRule, centered_clip
from photon.federation.codec import layout_of
from photon.federation.fold import ReplyBuffer, combine

SHAPES = {"a": (7, 9), "b": (50,), "c": (3,)}  # 116 coordinates: several chunks of 16, some partial


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(fold, "CHUNK", 16)


def _random(gen, scale=1.0):
    return {k: torch.randn(*s, generator=gen) * scale for k, s in SHAPES.items()}


def _park(tmp_path, updates, weights, arrival=None, name="spill"):
    """Client i gets key (i,) and updates[i]; `arrival` is the order they are parked in."""
    buf = ReplyBuffer(tmp_path / name, layout_of(updates[0]))
    for i in arrival or range(len(updates)):
        buf.add((i,), i, updates[i], weights[i])
    return buf


def _flat(tensors):
    return np.concatenate([tensors[k].double().numpy().ravel() for k in sorted(tensors)])


def _unflat(vector):
    sizes = [math.prod(SHAPES[k]) for k in sorted(SHAPES)]
    parts = np.split(vector, np.cumsum(sizes)[:-1])
    return {k: torch.from_numpy(p.reshape(SHAPES[k])).float() for k, p in zip(sorted(SHAPES), parts)}


def reference(updates, weights, rule, previous=None, seed=0):
    """The rule written plainly on dense fp64 arrays: centre, then `iterations` clipped steps."""
    x = np.stack([_flat(u) for u in updates])
    w = np.asarray(weights, dtype=np.float64)
    k = len(updates)
    if rule.bucket_size > 1:
        perm = np.random.default_rng(seed).permutation(k)
        groups = [perm[i:i + rule.bucket_size] for i in range(0, k, rule.bucket_size)]
    else:
        groups = [np.array([i]) for i in range(k)]
    points = np.stack([(w[g, None] * x[g]).sum(axis=0) / w[g].sum() for g in groups])
    pw = np.array([w[g].sum() for g in groups])
    if rule.centre == "median":
        v = np.median(points, axis=0)
    elif previous is not None:
        v = _flat(previous)
    else:
        v = np.zeros(x.shape[1])
    for _ in range(rule.iterations):
        d = np.linalg.norm(points - v, axis=1)
        tau = rule.radius_factor * np.median(d) if rule.radius == "median" else rule.radius
        s = np.where(d <= tau, 1.0, tau / np.maximum(d, 1e-300))
        v = v + (pw[:, None] * s[:, None] * (points - v)).sum(axis=0) / pw.sum()
    scales = {int(i): float(s[b]) for b, g in enumerate(groups) for i in g}
    return v, scales


def _mixed(k=7, seed=0):
    """A shared direction plus client noise of varied size, one update far out, and uneven weights."""
    g = torch.Generator().manual_seed(seed)
    common = _random(g)
    updates = []
    for i in range(k):
        noise = _random(g, scale=0.3 + 0.4 * i)
        updates.append({n: common[n] + noise[n] for n in SHAPES})
    updates[k // 2] = {n: -8.0 * t for n, t in updates[k // 2].items()}
    weights = [float(w) for w in (3, 1, 4, 1, 5, 9, 2)[:k]]
    return updates, weights, _random(g, 0.5)


def _assert_close_rel(got, want, rel=5e-7):  # a few fp32 roundings of the result
    err = np.linalg.norm(got - want)
    assert err <= rel * np.linalg.norm(want) + 1e-12, f"relative error {err / np.linalg.norm(want):.3g}"


@pytest.mark.parametrize("bucket_size", [1, 2, 3])
@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("radius", [4.0, "median"])
@pytest.mark.parametrize("centre", ["previous", "median"])
def test_matches_the_dense_reference(tmp_path, centre, radius, iterations, bucket_size):
    updates, weights, previous = _mixed()
    rule = ClipRule(centre=centre, radius=radius, radius_factor=1.0 if radius == 4.0 else 0.8,
                    iterations=iterations, bucket_size=bucket_size)
    delta, scales = centered_clip(_park(tmp_path, updates, weights), list(range(7)), rule, previous, seed=11)
    want, want_scales = reference(updates, weights, rule, previous, seed=11)
    assert {k: (tuple(t.shape), t.dtype) for k, t in delta.items()} == \
        {k: (s, torch.float32) for k, s in SHAPES.items()}
    _assert_close_rel(_flat(delta), want)
    assert scales.keys() == want_scales.keys()
    for c in scales:
        assert scales[c] == pytest.approx(want_scales[c], rel=1e-5)
    assert min(scales.values()) < 1.0  # the case exercises clipping, not just the mean


def test_reference_differs_between_rules(tmp_path):
    """The parametrised comparison means something: the variants give visibly different results."""
    updates, weights, previous = _mixed()
    results = [reference(updates, weights, ClipRule(centre=c, radius=r, iterations=i, bucket_size=b),
                         previous, seed=11)[0]
               for c in ("previous", "median") for r in (4.0, "median") for i in (1, 3) for b in (1, 2)]
    for i in range(len(results)):
        for j in range(i):
            assert np.linalg.norm(results[i] - results[j]) > 1e-4 * np.linalg.norm(results[i])


def test_arrival_order_does_not_change_a_bit(tmp_path):
    updates, weights, previous = _mixed()
    rule = ClipRule(centre="median", radius="median", iterations=3, bucket_size=2)
    arrivals = [None, [6, 5, 4, 3, 2, 1, 0], [3, 0, 6, 1, 5, 2, 4]]
    results = []
    for n, arrival in enumerate(arrivals):
        buf = _park(tmp_path, updates, weights, arrival, name=f"spill{n}")
        results.append(centered_clip(buf, list(arrival or range(7)), rule, previous, seed=5))
    for delta, scales in results[1:]:
        assert scales == results[0][1]
        for k in delta:
            assert torch.equal(delta[k], results[0][0][k])
    # ...while the seed does choose the buckets
    other, _ = centered_clip(_park(tmp_path, updates, weights, name="spill_seed"), list(range(7)), rule,
                             previous, seed=6)
    assert not all(torch.equal(other[k], results[0][0][k]) for k in other)


def test_only_the_named_clients_are_used(tmp_path):
    updates, weights, previous = _mixed()
    rule = ClipRule(centre="median", radius="median", iterations=2)
    delta, scales = centered_clip(_park(tmp_path, updates, weights), [0, 2, 5], rule)
    want, _ = reference([updates[i] for i in (0, 2, 5)], [weights[i] for i in (0, 2, 5)], rule)
    _assert_close_rel(_flat(delta), want)
    assert sorted(scales) == [0, 2, 5]


@pytest.mark.parametrize("centre", ["previous", "median"])
@pytest.mark.parametrize("iterations", [1, 3])
def test_a_huge_radius_is_the_weighted_mean(tmp_path, centre, iterations):
    updates, weights, _ = _mixed()
    buf = _park(tmp_path, updates, weights)
    rule = ClipRule(centre=centre, radius=1e9, iterations=iterations)
    delta, scales = centered_clip(buf, list(range(7)), rule)
    mean = combine(buf, list(range(7)))
    assert set(scales.values()) == {1.0}
    for k in delta:
        torch.testing.assert_close(delta[k], mean[k], rtol=1e-6, atol=1e-6)
    want = sum(w * _flat(u) for u, w in zip(updates, weights)) / sum(weights)
    _assert_close_rel(_flat(delta), want)


@pytest.mark.parametrize("bucket_size", [1, 2])
def test_sums_are_taken_in_fp64(tmp_path, bucket_size):
    """Two huge, nearly opposite updates and a small one: in fp32 the cancellation would lose the result."""
    g = torch.Generator().manual_seed(4)
    big, small = _random(g, 1e6), [_random(g) for _ in range(3)]
    updates = [{n: big[n] + small[0][n] for n in SHAPES}, {n: small[1][n] for n in SHAPES},
               {n: small[2][n] - big[n] for n in SHAPES}]
    updates = [{n: t.float() for n, t in u.items()} for u in updates]
    weights = [3.0, 1.0, 3.0]  # not powers of two: w·x rounds in fp32
    perm = np.random.default_rng(0).permutation(3)
    assert bucket_size == 1 or sorted(perm[:2].tolist()) == [0, 2]  # the opposite pair shares a bucket
    delta, _ = centered_clip(_park(tmp_path, updates, weights), [0, 1, 2],
                             ClipRule(centre="previous", radius=1e12, bucket_size=bucket_size), seed=0)
    want = sum(w * _flat(u) for u, w in zip(updates, weights)) / sum(weights)
    assert np.linalg.norm(want) < 1e-5 * np.linalg.norm(_flat(big))
    _assert_close_rel(_flat(delta), want)


def _honest_and_attacker(k=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    common = _random(g, 2.0)
    honest = [{n: common[n] + 0.5 * t for n, t in _random(g).items()} for _ in range(k)]
    attacker = {n: -100.0 * t for n, t in honest[0].items()}
    return honest + [attacker], [2.0, 1.0, 3.0, 1.0, 2.0, 1.0, 2.0]


def test_a_scaled_attacker_moves_the_result_by_at_most_its_share_of_the_radius(tmp_path):
    updates, weights = _honest_and_attacker()
    x = np.stack([_flat(u) for u in updates])
    w = np.asarray(weights)
    honest_mean = (w[:6, None] * x[:6]).sum(axis=0) / w[:6].sum()
    tau = 1.5 * np.linalg.norm(x[:6] - honest_mean, axis=1).max()  # no honest update is clipped
    share = weights[6] / sum(weights)
    previous = _unflat(honest_mean)

    buf = _park(tmp_path, updates, weights)
    delta, scales = centered_clip(buf, list(range(7)), ClipRule(centre="previous", radius=float(tau)), previous)
    moved = np.linalg.norm(_flat(delta) - honest_mean)
    assert moved <= tau * share * (1 + 1e-5)
    assert moved >= tau * share * 0.99  # the attacker is clipped to τ, not dropped
    assert all(scales[c] == 1.0 for c in range(6)) and scales[6] < 0.01
    plain = np.linalg.norm(_flat(combine(buf, list(range(7)))) - honest_mean)
    assert plain > 20 * tau * share  # without clipping the same attacker moves it far more

    # From the coordinate-wise median, each iteration shrinks the error: e ← share · (e + τ).
    iterations = 3
    delta, scales = centered_clip(buf, list(range(7)),
                                  ClipRule(centre="median", radius=float(tau), iterations=iterations))
    bound = np.linalg.norm(np.median(x, axis=0) - honest_mean)
    for _ in range(iterations):
        bound = share * (bound + tau)
    assert all(scales[c] == 1.0 for c in range(6)) and scales[6] < 0.01
    assert np.linalg.norm(_flat(delta) - honest_mean) <= bound * (1 + 1e-5)


@pytest.mark.parametrize("bucket_size", [1, 2])
@pytest.mark.parametrize("centre", ["previous", "median"])
def test_dissimilar_honest_updates_keep_most_of_their_weight(tmp_path, centre, bucket_size):
    """Nearly orthogonal updates of similar norm (clients with different data): the median radius clips
    some of them a little, none below half, and an update 100× too long almost entirely."""
    g = torch.Generator().manual_seed(2)
    k = 7  # with the attacker, 8: every bucket is full
    updates = []
    for i in range(k):
        u = _random(g)
        norm = math.sqrt(sum(float(t.square().sum()) for t in u.values()))
        updates.append({n: t * (10.0 * (0.8 + 0.05 * i) / norm) for n, t in u.items()})
    flat = np.stack([_flat(u) for u in updates])
    cos = flat @ flat.T / np.outer(np.linalg.norm(flat, axis=1), np.linalg.norm(flat, axis=1))
    assert np.abs(cos - np.eye(k)).max() < 0.4  # dissimilar indeed
    weights = [1.0 + i % 3 for i in range(k)]
    rule = ClipRule(centre=centre, radius="median", iterations=3, bucket_size=bucket_size)

    _, scales = centered_clip(_park(tmp_path, updates, weights), list(range(k)), rule, seed=3)
    assert min(scales.values()) >= 0.5
    assert min(scales.values()) < 1.0

    attacker = {n: 100.0 * t for n, t in updates[0].items()}
    _, scales = centered_clip(_park(tmp_path, updates + [attacker], weights + [2.0], name="spill_attack"),
                              list(range(k + 1)), rule, seed=3)
    assert scales[k] < 0.05
    bucket_mates = [c for c in range(k) if scales[c] == scales[k]]  # share the attacker's bucket
    assert len(bucket_mates) == bucket_size - 1
    assert all(scales[c] >= 0.5 for c in range(k) if c not in bucket_mates)


def test_rule_checks_its_settings():
    for bad in (dict(radius=0.0), dict(radius="mean"), dict(iterations=0), dict(bucket_size=0),
                dict(centre="mean"), dict(radius_factor=0.0), dict(radius=float("inf"))):
        with pytest.raises(ValueError):
            ClipRule(**bad)
