"""Robust aggregation and update screening: the statistics themselves, and a run with a noisy client."""

import pytest
import torch

from photon.federation.aggregate import RobustFold, clip_update, update_norm
from photon.runlog import read_metrics
from test_federation import fed_cfg, run


def _replies(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(7, 3, generator=g), "b": torch.randn(4, generator=g)} for _ in range(k)]


@pytest.mark.parametrize("k", [3, 4, 5])
def test_median_is_coordinatewise(tmp_path, k):
    replies = _replies(k)
    fold = RobustFold(list(range(k)), tmp_path, "median")
    for i in reversed(range(k)):
        fold.add(i, dict(replies[i]), 1.0)
    out = fold.finish()
    for name in replies[0]:
        stacked = torch.stack([r[name] for r in replies]).double()
        torch.testing.assert_close(out.sum[name], stacked.quantile(0.5, dim=0).float())
    assert out.weight == 1.0 and out.count == k


def test_trimmed_mean_drops_the_extremes(tmp_path):
    replies = _replies(4)
    replies[3] = {n: t * 1e6 for n, t in replies[3].items()}  # an outlier everywhere
    fold = RobustFold([0, 1, 2, 3], tmp_path, "trimmed-mean", trim_fraction=0.25)
    for i in range(4):
        fold.add(i, dict(replies[i]), 1.0)
    out = fold.finish()
    for name in replies[0]:
        ordered = torch.stack([r[name] for r in replies]).sort(dim=0).values
        torch.testing.assert_close(out.sum[name], ordered[1:3].double().mean(0).float())
        assert out.sum[name].abs().max() < 1e3


def test_clip_update_scales_to_the_bound():
    ref = {"w": torch.zeros(10)}
    params = {"w": torch.full((10,), 2.0)}
    norm = update_norm(params, ref)
    clip_update(params, ref, 1.0, norm)
    assert update_norm(params, ref) == pytest.approx(1.0, rel=1e-6)


def _noisy(prep, *extra):
    return fed_cfg(prep, "data.partition.num_clients=4", "federation.clients_per_round=4", "federation.rounds=3",
                   "federation.local_steps=8", "federation.faults.noise_clients=[3]",
                   "federation.faults.noise_scale=0.5", *extra)


def _ppl_drop(run_dir):
    evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
    return evals[0]["loss/overall"] - evals[-1]["loss/overall"]


def test_noise_damages_the_plain_mean_but_not_the_median_or_the_norm_check(tiny_prep, tmp_path):
    run(_noisy(tiny_prep, "federation.max_norm_ratio=null"), tmp_path / "mean")
    run(_noisy(tiny_prep, "federation.max_norm_ratio=null", "federation.aggregation=median"), tmp_path / "median")
    run(_noisy(tiny_prep), tmp_path / "check")
    assert _ppl_drop(tmp_path / "mean") < 0  # worse than the untrained model
    assert _ppl_drop(tmp_path / "median") > 0.3
    assert _ppl_drop(tmp_path / "check") > 0.3
    rounds = [r for r in read_metrics(tmp_path / "check") if r["kind"] == "round"]
    assert sum(r["failed"] for r in rounds[1:]) >= 2  # the noisy client is rejected from round 2 on
