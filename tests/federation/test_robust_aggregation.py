"""Robust aggregation and update screening in a run with a noisy client (the statistics: test_fold.py)."""

from photon.runlog import read_metrics
from tests.helpers import fed_cfg, run


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
