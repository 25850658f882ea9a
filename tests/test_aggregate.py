"""The streaming weighted mean: matches the batch formula, ignores arrival order, holds one accumulator."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from photon.federation.aggregate import OrderedFold, StreamingMean


def _models(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)} for _ in range(n)]


def test_weighted_mean_matches_reference():
    models, weights = _models(3), [1.0, 5.0, 2.0]
    agg = StreamingMean()
    for m, w in zip(models, weights):
        agg.add(m, w)
    mean = agg.mean(models[0])
    for k in mean:
        ref = sum(m[k].double() * w for m, w in zip(models, weights)) / sum(weights)
        torch.testing.assert_close(mean[k], ref.float(), rtol=1e-6, atol=1e-6)
        assert mean[k].dtype == torch.float32


def test_every_arrival_order_gives_bitwise_the_same_mean(tmp_path):
    models, weights = _models(4, seed=3), [16.0, 16.0, 8.0, 16.0]
    results = []
    for arrival in itertools.permutations(range(4)):
        fold = OrderedFold([0, 1, 2, 3], tmp_path / "spill")
        for i in arrival:
            fold.add(i, dict(models[i]), weights[i])
        results.append(fold.finish().mean(models[0]))
    assert not (tmp_path / "spill").exists()
    for r in results[1:]:
        for k in r:
            assert torch.equal(r[k], results[0][k])


def test_ordered_fold_skips_clients_given_up_and_never_heard_from(tmp_path):
    models = _models(4, seed=5)
    fold = OrderedFold([0, 1, 2, 3], tmp_path)
    fold.add(3, dict(models[3]), 1.0)  # early: waits on disk
    fold.add(2, dict(models[2]), 1.0)
    fold.give_up(0)
    assert fold.mean.count == 0  # still waiting for client 1
    mean = fold.finish()  # client 1 never replied
    assert mean.count == 2
    ref = StreamingMean()
    ref.add(models[2], 1.0)
    ref.add(models[3], 1.0)
    for k, v in ref.mean(models[0]).items():
        assert torch.equal(mean.mean(models[0])[k], v)


def test_pseudo_gradient_is_theta_minus_mean():
    theta = _models(1, seed=9)[0]
    models = _models(2)
    agg = StreamingMean()
    for m in models:
        agg.add(m, 1.0)
    delta = agg.pseudo_gradient(theta)
    assert set(delta) == set(theta) and len(delta) == 2
    for k in theta:
        ref = theta[k].double() - (models[0][k].double() + models[1][k].double()) / 2
        torch.testing.assert_close(delta[k], ref.float())


def test_rejects_non_positive_weight():
    with pytest.raises(ValueError, match="positive"):
        StreamingMean().add(_models(1)[0], 0.0)


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.integers(1, 10_000), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_mean_lies_within_the_range_of_the_inputs(weights, seed):
    models = _models(len(weights), seed)
    agg = StreamingMean()
    for m, w in zip(models, weights):
        agg.add(m, float(w))
    mean = agg.mean(models[0])
    for k in mean:
        stacked = torch.stack([m[k] for m in models])
        assert torch.all(mean[k] >= stacked.min(0).values - 1e-6)
        assert torch.all(mean[k] <= stacked.max(0).values + 1e-6)
    assert agg.count == len(weights) and agg.weight == float(sum(weights))
