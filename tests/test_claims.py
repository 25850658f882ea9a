"""The claims harness end to end on tiny budgets (runs, resumes, writes claims.md and plots) and the network
model's arithmetic on known numbers."""

import dataclasses
import json
import math

import pytest
from conftest import tiny_cfg

from photon.bench.claims import ClaimsPlan, make_arms, run_claims
from photon.bench.claims_report import to_target
from photon.bench.federation import data_parallel_bytes_per_token
from photon.bench.network import (Network, crossovers, data_parallel_step_seconds, photon_round_seconds,
                                  ring_allreduce_bytes, ring_allreduce_seconds)

# 2 rounds × 2 local steps, K=2: every arm is a few seconds; one seed, a 3-step DDP calibration.
PLAN = ClaimsPlan("tiny", clients=2, rounds=2, local_steps=2, ks=(1, 2), hs=(1, 4), seeds=1, sweep_seeds=1,
                  ddp_steps=3, jobs=1)


@pytest.fixture(scope="module")
def claims_run(tiny_prep, tmp_path_factory):
    out = tmp_path_factory.mktemp("claims")
    base = tiny_cfg(tiny_prep, "train.threads=1")
    path = run_claims(base, out, PLAN, command="pytest")
    return base, out, path


def test_every_arm_runs_and_claims_md_and_plots_are_written(claims_run):
    base, out, path = claims_run
    text = path.read_text()
    for n in range(1, 8):
        assert f"## {n}. " in text
    assert "not run" not in text and "arms missing" not in text
    assert "iso-token" in text and "Crossover" in text and "Real data-parallel baseline" in text
    for png in ("claims_ppl_vs_tokens", "claims_ppl_vs_rounds", "claims_ppl_vs_walltime", "claims_time_vs_bandwidth"):
        assert (out / f"{png}.png").stat().st_size > 1000
        assert f"({png}.png)" in text
    names = {a.name for a in make_arms(base, PLAN)}
    assert names == {"photon", "central", "central-hilr", "iid", "diloco", "bigbatch", "k1", "h1", "h4"}
    for name in names:
        assert (out / "arms" / name / "seed0" / "done.json").exists()


def test_rerun_skips_finished_arms(claims_run, capsys):
    base, out, path = claims_run
    logs = sorted((out / "arms").glob("*/seed0/metrics.jsonl"))
    before = {p: p.stat().st_mtime_ns for p in logs}
    (out / "claims.md").unlink()
    run_claims(base, out, PLAN, command="pytest")
    assert {p: p.stat().st_mtime_ns for p in logs} == before
    assert (out / "claims.md").exists()


def test_an_unfinished_arm_is_rerun_from_scratch_in_a_subprocess(claims_run):
    base, out, _ = claims_run
    arm = out / "arms" / "k1" / "seed0"
    before = json.loads((arm / "done.json").read_text())
    (arm / "done.json").unlink()
    (arm / "stale-file").write_text("left by a killed run")
    outdated = out / "arms" / "h4" / "seed0" / "done.json"  # finished, but with another config: trained again
    record = json.loads(outdated.read_text())
    record["config"]["train"]["lr"] = 0.5
    outdated.write_text(json.dumps(record))
    run_claims(base, out, dataclasses.replace(PLAN, jobs=2), command="pytest")  # jobs > 1: one process per arm
    assert (arm / "done.json").exists() and not (arm / "stale-file").exists()
    assert json.loads(outdated.read_text())["config"]["train"]["lr"] != 0.5
    assert (out / "logs" / "k1-seed0.log").exists()
    assert json.loads((arm / "done.json").read_text())["overrides"] == before["overrides"]


def test_arms_share_budget_and_evaluation(claims_run):
    base, out, _ = claims_run
    from photon.bench.claims_report import Results

    res = Results(base, PLAN, make_arms(base, PLAN), out)
    iso = ["photon", "central", "central-hilr", "iid", "diloco", "bigbatch", "h1", "h4"]
    tokens = {n: res.runs[n][0].evals[-1]["tokens"] for n in iso}
    assert len(set(tokens.values())) == 1, tokens
    rows = {n: res.runs[n][0].cfg.train.eval_batches * res.runs[n][0].cfg.train.batch_size for n in iso}
    assert len(set(rows.values())) == 1, rows
    assert res.runs["k1"][0].evals[-1]["tokens"] * 2 == tokens["photon"]  # K=1 sees half the tokens of K=2


# ---------------------------------------------------------------------------------------------------------
# The network model


def test_transfer_and_round_time_on_known_numbers():
    net = Network("8 Mbps", 8e6, latency_s=0.0, round_overhead_s=0.5)
    assert net.transfer_seconds(1e6) == pytest.approx(1.0)
    assert Network("x", 8e6, latency_s=0.25).transfer_seconds(1e6) == pytest.approx(1.25)
    assert photon_round_seconds(10.0, 1e6, 2e6, net, server_s=0.1) == pytest.approx(10 + 1 + 2 + 0.5 + 0.1)


def test_ring_allreduce_on_known_numbers():
    net = Network("1 Gbps", 1e9, latency_s=0.0)
    # 4 workers, 100 MB: 6 phases of 25 MB at 1 Gbps = 6 × 0.2 s.
    assert ring_allreduce_seconds(100e6, 4, net) == pytest.approx(1.2)
    assert ring_allreduce_seconds(100e6, 4, Network("l", 1e9, latency_s=1e-3)) == pytest.approx(1.2 + 6e-3)
    assert ring_allreduce_seconds(100e6, 1, net) == 0.0
    assert ring_allreduce_bytes(100e6, 4) == pytest.approx(150e6)
    assert data_parallel_step_seconds(0.3, 100e6, 4, net) == pytest.approx(1.5)
    # The same count as the federation benchmark's bytes-per-token formula.
    assert 4 * ring_allreduce_bytes(8e6, 4) / (4 * 8 * 256) == pytest.approx(
        data_parallel_bytes_per_token(8_000_000, 4, 8, 256))


def test_crossover_exists_and_is_where_the_times_meet():
    # Photon: fixed 100 s; data-parallel: 50 s of compute + 1e9 bit-seconds of traffic -> equal at 20 Mbps.
    found = crossovers(lambda bw: 100.0, lambda bw: 50.0 + 1e9 / bw)
    assert len(found) == 1 and found[0] == pytest.approx(2e7, rel=1e-6)
    assert crossovers(lambda bw: 1.0, lambda bw: 2.0) == []


def test_to_target_interpolates_log_perplexity():
    curve = [(0, 100.0), (10, 10.0), (20, 5.0)]
    assert to_target(curve, 100.0) == 0
    assert to_target(curve, math.sqrt(1000)) == pytest.approx(5.0)
    assert to_target(curve, 4.0) is None
