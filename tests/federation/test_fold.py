"""Folding a round's updates: the mean matches the batch formula whatever the arrival order, the robust
statistics are coordinate-wise, and the screen rejects outliers by norm and by direction, decided on all of
the round's updates at once."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from photon.federation.codec import layout_of
from photon.federation.fold import ReplyBuffer, combine, screen


def _updates(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)} for _ in range(n)]


def _buffer(tmp_path, updates, weights=None, arrival=None):
    buf = ReplyBuffer(tmp_path / "spill", layout_of(updates[0]))
    for i in arrival or range(len(updates)):
        buf.add((i,), i, updates[i], (weights or [1.0] * len(updates))[i])
    return buf


def test_weighted_mean_matches_reference(tmp_path):
    updates, weights = _updates(3), [1.0, 5.0, 2.0]
    delta = combine(_buffer(tmp_path, updates, weights), [0, 1, 2])
    for k in delta:
        ref = sum(u[k].double() * w for u, w in zip(updates, weights)) / sum(weights)
        torch.testing.assert_close(delta[k], ref.float(), rtol=1e-6, atol=1e-6)
        assert delta[k].dtype == torch.float32


def test_every_arrival_order_gives_bitwise_the_same_mean(tmp_path):
    updates, weights = _updates(4, seed=3), [16.0, 16.0, 8.0, 16.0]
    results = []
    for arrival in itertools.permutations(range(4)):
        buf = _buffer(tmp_path, updates, weights, arrival)
        results.append(combine(buf, [2, 0, 3, 1]))
        buf.clear()
    assert not (tmp_path / "spill").exists()
    for r in results[1:]:
        for k in r:
            assert torch.equal(r[k], results[0][k])


def test_only_the_named_clients_are_combined(tmp_path):
    updates = _updates(4, seed=5)
    delta = combine(_buffer(tmp_path, updates), [1, 3])
    for k in delta:
        torch.testing.assert_close(delta[k], (updates[1][k] + updates[3][k]) / 2)


def test_non_finite_updates_are_refused_before_parking(tmp_path):
    buf = ReplyBuffer(tmp_path / "spill", [("w", (2,))])
    with pytest.raises(ValueError, match="non-finite"):
        buf.add((0,), 0, {"w": torch.tensor([1.0, float("inf")])}, 1.0)
    assert buf.parked == {}


@pytest.mark.parametrize("k", [3, 4, 5])
def test_median_is_coordinatewise(tmp_path, k):
    updates = _updates(k)
    out = combine(_buffer(tmp_path, updates, arrival=list(reversed(range(k)))), list(range(k)), "median")
    for name in updates[0]:
        stacked = torch.stack([u[name] for u in updates]).double()
        torch.testing.assert_close(out[name], stacked.quantile(0.5, dim=0).float())


def test_trimmed_mean_drops_the_extremes(tmp_path):
    updates = _updates(4)
    updates[3] = {n: t * 1e6 for n, t in updates[3].items()}  # an outlier everywhere
    out = combine(_buffer(tmp_path, updates), [0, 1, 2, 3], "trimmed-mean", trim_fraction=0.25)
    for name in updates[0]:
        ordered = torch.stack([u[name] for u in updates]).sort(dim=0).values
        torch.testing.assert_close(out[name], ordered[1:3].double().mean(0).float())
        assert out[name].abs().max() < 1e3


def test_clipping_scales_each_update_to_the_bound(tmp_path):
    updates = [{"w": torch.full((10,), 2.0)}, {"w": torch.full((10,), 0.01)}]
    delta = combine(_buffer(tmp_path, updates), [0, 1], clip_norm=1.0)
    clipped = updates[0]["w"] / updates[0]["w"].norm()
    torch.testing.assert_close(delta["w"], (clipped + updates[1]["w"]) / 2)


def _honest_and_attacker(k, scale, seed=0):
    """k − 1 honest updates sharing a direction plus their own noise, and one that reverses its own."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(400, generator=g)
    honest = [{"w": shared + 1.5 * torch.randn(400, generator=g)} for _ in range(k)]
    honest[-1] = {"w": -scale * honest[-1]["w"]}
    return honest


@pytest.mark.parametrize("scale", [1.0, 5.0, 10.0])
@pytest.mark.parametrize("k", [3, 4, 8])
def test_a_reversed_update_is_rejected_at_any_scale_and_honest_ones_are_kept(tmp_path, k, scale):
    buf = _buffer(tmp_path, _honest_and_attacker(k, scale))
    result = screen(buf, max_norm_ratio=10.0, min_cosine=0.0, previous_norms=[])
    assert result.accepted == list(range(k - 1))
    assert list(result.rejected) == [k - 1] and "majority" in result.rejected[k - 1]


def test_the_screen_does_not_depend_on_arrival_order(tmp_path):
    updates = _honest_and_attacker(5, 3.0)
    updates[1] = {"w": updates[1]["w"] * 20}  # too long
    decisions = set()
    for arrival in itertools.permutations(range(5)):
        buf = _buffer(tmp_path, updates, arrival=arrival)
        r = screen(buf, max_norm_ratio=10.0, min_cosine=0.0, previous_norms=[])
        decisions.add((tuple(r.accepted), tuple(sorted(r.rejected))))
        buf.clear()
    assert decisions == {((0, 2, 3), (1, 4))}


def test_with_two_replies_only_the_previous_rounds_norm_applies(tmp_path):
    updates = [{"w": torch.ones(4)}, {"w": -30 * torch.ones(4)}]
    r = screen(_buffer(tmp_path, updates), max_norm_ratio=10.0, min_cosine=0.0, previous_norms=[2.0, 2.0])
    assert r.accepted == [0] and "exceeds" in r.rejected[1]
    r = screen(_buffer(tmp_path, updates), max_norm_ratio=10.0, min_cosine=0.0, previous_norms=[])
    assert r.accepted == [0, 1]  # no majority, no previous round: nothing to judge by


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.integers(1, 10_000), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_mean_lies_within_the_range_of_the_inputs(tmp_path_factory, weights, seed):
    updates = _updates(len(weights), seed)
    buf = _buffer(tmp_path_factory.mktemp("h"), updates, [float(w) for w in weights])
    mean = combine(buf, list(range(len(weights))))
    for k in mean:
        stacked = torch.stack([u[k] for u in updates])
        assert torch.all(mean[k] >= stacked.min(0).values - 1e-6)
        assert torch.all(mean[k] <= stacked.max(0).values + 1e-6)


def _np_contributor_mean(updates):
    """SparseLoCo's aggregate in numpy, straight from its description: per tensor, each update scaled down to
    the (lower) median norm of that tensor over the updates, then per coordinate the mean over the updates that
    are non-zero there."""
    import numpy as np

    out = {}
    for name in updates[0]:
        rows = np.stack([u[name].numpy().astype(np.float64).reshape(-1) for u in updates])
        norms = np.sqrt((rows ** 2).sum(1))
        median = np.sort(norms)[(len(norms) - 1) // 2]
        scaled = rows * np.where(norms > median, median / norms, 1.0)[:, None]
        count = np.maximum((rows != 0).sum(0), 1)
        out[name] = (scaled.sum(0) / count).reshape(updates[0][name].shape)
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_contributor_mean_matches_a_numpy_reference_on_sparse_updates(tmp_path, k):
    from photon.federation.fold import contributor_mean

    updates = _updates(k, seed=11)
    g = torch.Generator().manual_seed(12)
    for i, u in enumerate(updates):  # sparse, overlapping supports, norms apart
        for name in u:
            u[name] = u[name] * (torch.rand(u[name].shape, generator=g) < 0.4) * (1 + 3 * i)
    delta = contributor_mean(_buffer(tmp_path, updates, weights=[1.0, 9.0, 2.0, 5.0][:k]), list(range(k)))
    ref = _np_contributor_mean(updates)
    for name in delta:
        torch.testing.assert_close(delta[name], torch.from_numpy(ref[name]).float(), rtol=1e-6, atol=1e-7)
    # a coordinate only one update sent keeps that update's (clipped) value, not 1/K of it
    if k > 1:
        others = torch.stack([u["w"] != 0 for u in updates[1:]]).any(0)
        only = (updates[0]["w"] != 0) & ~others
        assert only.any()
        scale = float(delta["w"][only][0] / updates[0]["w"][only][0])
        torch.testing.assert_close(delta["w"][only], updates[0]["w"][only] * scale)
        assert 0.3 < scale <= 1.0 + 1e-6  # clipped at most to the median norm, never divided by K


def test_contributor_mean_is_bitwise_the_same_in_any_arrival_order(tmp_path):
    from photon.federation.fold import contributor_mean

    updates = _updates(4, seed=13)
    results = []
    for arrival in itertools.permutations(range(4)):
        buf = _buffer(tmp_path, updates, arrival=arrival)
        results.append(contributor_mean(buf, [0, 1, 2, 3]))
        buf.clear()
    for r in results[1:]:
        assert all(torch.equal(r[k], results[0][k]) for k in r)
