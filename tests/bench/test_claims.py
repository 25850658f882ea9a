"""The claims harness end to end on tiny budgets (sweeps, arms, resume, the stored record, the report as a pure
function of it) and the network model's arithmetic on known numbers."""

import dataclasses
import json
import math

import pytest
from tests.helpers import tiny_cfg

from photon.bench.claims.plan import ClaimsPlan, Recipes, base_lrs, next_grid
from photon.bench.claims.record import dp_times, to_target
from photon.bench.claims.render import render, render_findings, verdicts
from photon.bench.claims.run import run_claims, run_peer
from photon.bench.federation import data_parallel_bytes_per_token
from photon.bench.network import (
    Network,
    crossovers,
    data_parallel_step_seconds,
    photon_round_seconds,
    ring_allreduce_bytes,
    ring_allreduce_seconds,
)
from photon.bench.results import load_results

# 2 rounds × 2 local steps, K=2: every arm is a few seconds; one seed, a 3-step DDP calibration, no torchft.
PLAN = ClaimsPlan("tiny", clients=2, rounds=2, local_steps=2, ks=(1, 2), hs=(1, 4), seeds=1, sweep_seeds=1,
                  paper_seeds=1, short_horizon=0.5, lr_extend=0, ddp_steps=3, torchft=False, jobs=1,
                  throughput_seconds=0.2)
ARMS = {"central", "photon", "diloco", "photon-reset", "paper", "iid", "diloco-reset", "bigbatch", "central-short",
        "photon-short", "paper-short", "k1", "h1", "h4"}


@pytest.fixture(scope="module")
def claims_run(tiny_prep, tmp_path_factory):
    out = tmp_path_factory.mktemp("claims")
    base = tiny_cfg(tiny_prep, "train.threads=1")
    data = run_claims(base, out / "run", PLAN, command="pytest", results_dir=out / "results", img_dir=out / "img")
    return base, out, data


def test_every_arm_runs_and_the_record_plots_and_claims_md_are_written(claims_run):
    base, out, data = claims_run
    assert set(data["arms"]) == ARMS
    for name, arm in data["arms"].items():
        assert set(arm["runs"]) == {"0"}, name
        assert arm["client_optimizer"] == ("-" if arm["kind"] == "centralized" else
                                           "reset" if name.endswith("-reset") else "persist")
    assert {m: len(s["grid"]) for m, s in data["sweeps"].items()} == {"central": 3, "photon": 3, "diloco": 3}
    record = load_results(out / "results")["claims-tiny"]
    assert record["command"] == "pytest" and record["data"] == json.loads(json.dumps(data))
    for png in ("curves", "sweeps", "bandwidth"):
        assert (out / "img" / f"claims-tiny-{png}.png").stat().st_size > 1000
    text = (out / "run" / "claims.md").read_text()
    assert "not run" not in text and "arms missing" not in text and "Crossover" in text
    for heading in ("Verdicts", "1. Federated vs centralized", "Learning-rate sweeps", "2. Scaling", "3. Communication",
                    "3. Wall time", "4. Heterogeneity", "5. Photon vs DiLoCo", "6. Why it works", "Arms: exact"):
        assert f"#### {heading}" in text, heading


def test_report_is_a_pure_function_of_the_stored_record(claims_run):
    _, out, data = claims_run
    stored = json.loads(json.dumps(data))
    first = render(stored)
    assert render(json.loads(json.dumps(stored))) == first == render(data)
    assert "torchft peer:** not in this plan" in first
    table = render_findings(out / "results")
    assert table == render_findings(out / "results")
    assert "`tiny`: `pytest` on" in table and "`medium`: not measured yet" in table
    for verdict, _ in verdicts(stored).values():
        assert verdict in ("agrees", "contradicts", "inconclusive")


def test_final_bits_per_byte_are_what_each_arm_logged_and_can_be_added_to_an_older_record(claims_run, tmp_path):
    from photon.bench.claims.record import View
    from photon.bench.claims.run import add_eval_bytes
    from photon.runlog import read_metrics

    base, out, data = claims_run
    v = View(json.loads(json.dumps(data)))
    for name in ("central", "photon"):
        arm = data["arms"][name]
        run_dir = out / "run" / "arms" / name / f"lr{arm['lr']:g}" / "seed0"
        logged = [r for r in read_metrics(run_dir) if r["kind"] == "eval"][-1]
        for domain in (*v.domains(), "overall"):
            assert v.final_bpb(name, "0", domain) == pytest.approx(logged[f"bpb/{domain}"], rel=1e-9)
    older = json.loads((out / "results" / "claims-tiny.json").read_text())
    counts = older["data"].pop("eval_bytes")
    (tmp_path / "claims-tiny.json").write_text(json.dumps(older))
    assert View(older["data"]).final_bpb("photon", "0") is None and "n/a" in render_findings(tmp_path)
    assert add_eval_bytes(base, PLAN, tmp_path / "claims-tiny.json") == counts
    assert json.loads((tmp_path / "claims-tiny.json").read_text())["data"] == json.loads(json.dumps(data))


def test_best_lrs_are_used_and_seed_0_of_a_swept_arm_is_its_best_grid_point(claims_run):
    base, out, data = claims_run
    for method, sweep in data["sweeps"].items():
        ppl = {lr: p for lr, p in zip(sweep["grid"], sweep["ppl"])}
        assert sweep["best_lr"] == min(ppl, key=ppl.get)
        assert data["arms"][method]["lr"] == sweep["best_lr"]
    arms = data["arms"]
    assert arms["photon-reset"]["lr"] == arms["paper"]["lr"] == arms["iid"]["lr"] == arms["photon"]["lr"]
    assert arms["bigbatch"]["lr"] == arms["central"]["lr"] and arms["diloco-reset"]["lr"] == arms["diloco"]["lr"]
    best = (out / "run" / "arms" / "photon" / f"lr{arms['photon']['lr']:g}" / "seed0" / "done.json")
    assert best.exists()


def test_arms_share_budget_and_evaluation_and_the_paper_regime_trains_k_times_the_tokens(claims_run):
    base, out, data = claims_run
    arms = data["arms"]
    final = {n: a["runs"]["0"]["evals"][-1][0] for n, a in arms.items()}
    equal = ["photon", "central", "photon-reset", "iid", "diloco", "diloco-reset", "bigbatch", "h1", "h4"]
    assert len({final[n] for n in equal}) == 1, final
    assert final["paper"] == PLAN.clients * final["photon"] and final["k1"] * 2 == final["photon"]
    assert final["central-short"] * 2 == final["central"] == final["photon-short"] * 2
    assert final["paper-short"] == PLAN.clients * final["photon-short"]
    for n in ("photon", "paper", "diloco"):
        cfg = json.loads((out / "run" / "arms" / n / f"lr{arms[n]['lr']:g}" / "seed0" / "config.json").read_text())
        assert cfg["federation"]["state_backup"] is False and cfg["federation"]["client_optimizer"] == "persist"
        assert cfg["train"]["eval_batches"] * cfg["train"]["batch_size"] == data["eval_rows"]
    assert all(r["bytes_state_up"] == 0 for r in arms["photon"]["runs"]["0"]["rounds"])
    diloco = json.loads((out / "run" / "arms" / "diloco" / f"lr{arms['diloco']['lr']:g}" / "seed0" /
                         "config.json").read_text())
    assert diloco["federation"]["outer"] == {**diloco["federation"]["outer"], "name": "nesterov", "lr": 0.7,
                                             "momentum": 0.9}


def test_rerun_skips_finished_arms_and_reruns_an_unfinished_one_in_a_subprocess(claims_run, tmp_path):
    base, out, data = claims_run
    run = out / "run"
    logs = sorted((run / "arms").glob("*/*/seed0/metrics.jsonl"))
    arm = run / "arms" / "k1" / f"lr{data['arms']['k1']['lr']:g}" / "seed0"
    (arm / "done.json").unlink()
    (arm / "stale-file").write_text("left by a killed run")
    before = {p: p.stat().st_mtime_ns for p in logs if arm not in p.parents}
    again = run_claims(base, run, dataclasses.replace(PLAN, jobs=2), command="pytest", results_dir=tmp_path,
                       img_dir=tmp_path)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert (arm / "done.json").exists() and not (arm / "stale-file").exists()
    assert list((run / "logs").glob("k1-lr*-seed0.log"))
    assert again["arms"]["photon"] == data["arms"]["photon"]


def test_dry_run_estimates_without_training(tiny_prep, tmp_path):
    base = tiny_cfg(tiny_prep, "train.threads=1")
    est = run_claims(base, tmp_path / "run", PLAN, command="pytest", results_dir=tmp_path, dry_run=True)
    assert est["estimate"]["seconds"] > 0 and est["estimate"]["jobs"] == 9 + len(ARMS) - 3
    assert not (tmp_path / "run" / "arms").exists() and not list(tmp_path.glob("*.json"))


def test_lr_grid_grows_only_past_an_edge_that_holds_the_best():
    assert next_grid([1.0, 2.0, 4.0], {1.0: 5.0, 2.0: 4.0, 4.0: 3.0}) == 8.0
    assert next_grid([1.0, 2.0, 4.0], {1.0: 3.0, 2.0: 4.0, 4.0: 5.0}) == 0.5
    assert next_grid([1.0, 2.0, 4.0], {1.0: 5.0, 2.0: 3.0, 4.0: 4.0}) is None


def test_recipes_state_the_client_optimizer_and_keep_the_medium_plan_honest(tiny_prep):
    from photon.bench.claims.plan import PLANS
    from photon.config import load_config
    from photon.model.transformer import count_params, embedding_params

    cfg = load_config("medium")
    plan = PLANS["medium"]
    non_emb = count_params(cfg.model) - embedding_params(cfg.model)
    assert non_emb / count_params(cfg.model) > 0.7  # the blocks, not the embeddings, hold the parameters
    rec = Recipes(cfg, plan)
    assert rec.S * rec.big * cfg.train.seq_len >= 5 * non_emb  # ≥ 5 tokens per non-embedding parameter
    arms = {a.name: a for a in rec.arms(base_lrs(cfg, plan))}
    assert arms["paper"].seeds >= 1 and arms["photon"].seeds >= 2 and arms["central"].seeds >= 2
    assert arms["photon-reset"].client_optimizer == "reset" and arms["diloco"].client_optimizer == "persist"


def test_the_peer_says_why_it_did_not_run(monkeypatch, tiny_prep, tmp_path):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert run_peer(tiny_cfg(tiny_prep), tmp_path, 0)["status"].startswith("not run: torchft is not installed")


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


def test_data_parallel_time_counts_steps_of_the_centralized_batch():
    # 4 workers of batch 8×128: a step trains 4096 tokens; 10 steps of 0.5 s compute + a 1.2 s all-reduce.
    net = Network("1 Gbps", 1e9, latency_s=0.0)
    central = {"evals": [[0, 0, {}], [5 * 4096, 5, {}], [10 * 4096, 10, {}]]}
    times, compute, comm = dp_times(central, 0.5, 100e6, 4, 4 * 8 * 128, net)
    assert times == pytest.approx([0.0, 5 * 1.7, 10 * 1.7]) and compute == 5.0 and comm == pytest.approx(12.0)


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
