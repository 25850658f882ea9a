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


def test_noise_damages_the_plain_mean_but_not_the_median_the_norm_check_or_the_default(tiny_prep, tmp_path):
    run(_noisy(tiny_prep, "federation.aggregation=mean", "federation.max_norm_ratio=null"), tmp_path / "mean")
    run(_noisy(tiny_prep, "federation.max_norm_ratio=null", "federation.aggregation=median"), tmp_path / "median")
    run(_noisy(tiny_prep, "federation.aggregation=mean", "federation.max_norm_ratio=10"), tmp_path / "check")
    run(_noisy(tiny_prep), tmp_path / "default")
    assert _ppl_drop(tmp_path / "mean") < 0  # worse than the untrained model
    assert _ppl_drop(tmp_path / "median") > 0.3
    assert _ppl_drop(tmp_path / "check") > 0.3
    rounds = [r for r in read_metrics(tmp_path / "check") if r["kind"] == "round"]
    assert sum(r["failed"] for r in rounds[1:]) >= 2  # the noisy client is rejected from round 2 on
    assert _ppl_drop(tmp_path / "default") > 0.3  # centered clipping, and the ×100 norm check behind it
    rounds = [r for r in read_metrics(tmp_path / "default") if r["kind"] == "round"]
    assert all(set(r["accepted"]) >= {0, 1, 2} for r in rounds)  # no honest client turned away


def test_centered_clipping_bounds_a_noisy_client_and_turns_nobody_away(tiny_prep, tmp_path):
    """The noisy client's update is clipped to a sliver of its weight, every honest one keeps most of its own,
    nobody is rejected, and the model learns where the plain mean is ruined."""
    run(_noisy(tiny_prep, "federation.max_norm_ratio=null", "federation.min_cosine=null",
               "federation.aggregation=centered-clip"), tmp_path / "clip")
    assert _ppl_drop(tmp_path / "clip") > 0.3
    rounds = [r for r in read_metrics(tmp_path / "clip") if r["kind"] == "round"]
    assert all(r["failed"] == 0 and r["ok"] == 4 for r in rounds)
    assert all(r["clip_scales"]["3"] < 0.1 for r in rounds)  # the noisy client: a sliver of its pull
    assert all(min(v for k, v in r["clip_scales"].items() if k != "3") > 0.5 for r in rounds)


def test_centered_clipping_from_the_previous_aggregate_resumes_bitwise(tiny_prep, tmp_path):
    """With the previous round's aggregate as the centre, that aggregate is server state: checkpointed, and a
    killed and resumed run lands on the uninterrupted run's parameters bitwise."""
    import pytest

    from photon.federation.server_state import ServerState
    from tests.helpers import ServerCrash, crash_when

    cfg = _noisy(tiny_prep, "federation.rounds=4", "federation.aggregation=centered-clip",
                 "federation.clipping.centre=previous", "federation.clipping.iterations=2",
                 "federation.clipping.bucket_size=2", "federation.min_cosine=null")
    straight = run(cfg, tmp_path / "a")
    with pytest.raises(ServerCrash):
        run(cfg, tmp_path / "b", fail=crash_when(lambda task: task.round == 2))
    state, _ = ServerState.load_latest(tmp_path / "b" / "checkpoints")
    assert state.round == 2 and state.clip_centre  # the centre is in the checkpoint
    resumed = run(cfg, tmp_path / "b", resume=True)
    assert resumed["params_sha"] == straight["params_sha"]
