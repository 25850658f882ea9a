"""`photon bench async`: each run's config is the arm it names (outer optimizer, LR, weighting, the stragglers
faults), and the rendering reads the record's numbers into the table and the verdicts."""

from photon.bench.async_outer import ARMS, CLEAN, arm_runs, render, run_config
from tests.helpers import tiny_cfg


def test_each_run_is_configured_as_its_label_says(tmp_path):
    base = tiny_cfg(tmp_path, "data.partition.num_clients=8", "federation.clients_per_round=4")
    labels = [label for label, _, _ in arm_runs()]
    assert labels[0] == CLEAN and len(labels) == 1 + sum(len(lrs) for _, _, lrs in ARMS.values())
    clean = run_config(base, CLEAN, None, seed=1)
    assert clean.federation.mode == "sync" and clean.federation.faults.drop_probability == 0
    for label, arm, lr in arm_runs()[1:]:
        cfg = run_config(base, arm, lr, seed=1)
        outer, weighting, _ = ARMS[arm]
        fed = cfg.federation
        assert (fed.mode, fed.outer.name, fed.outer.lr, fed.asynchronous.weighting) == ("async", outer, lr, weighting)
        assert (fed.faults.slow_fraction, fed.faults.drop_probability, fed.faults.seed) == (0.25, 0.1, 1)
        assert fed.aggregation == "mean" and cfg.train.seed == 1


def test_the_render_reads_the_record():
    runs = {}
    for i, (label, _, _) in enumerate(arm_runs()):
        runs[label] = [{"final_ppl": 100.0 + i, "final_bpb": 3.0, "clock": 700.0, "damping": 0.8},
                       {"final_ppl": 102.0 + i, "final_bpb": 3.1, "clock": 800.0, "damping": 0.9}]
    data = {"preset": "tiny", "clients": 8, "k": 4, "nodes": 4, "local_steps": 16, "rounds": 32, "batch": 8,
            "seq_len": 64, "budget_tokens": 1 << 20, "seeds": 2, "delay": 4, "runs": runs}
    text = render(data)
    assert "| clean sync | 101.0 | 3.050 | - | 750 s | 0.850 |" in text
    normalized, summed = 101.0 + 3, 101.0 + 6  # each FedAvg arm's lr-1 run (the last of its three LRs)
    assert f"summed weights {summed:,.1f} against normalized {normalized:,.1f}" in text
    assert ("summed 105.0 (lr 0.6) against normalized 102.0 (lr 0.6) (+2.9%) (FedAvg, normalized weights: best at "
            "the lowest LR tried; FedAvg, summed weights (FedBuff): best at the lowest LR tried: the optimum may lie "
            "beyond)") in text
    assert "Delayed Nesterov 110.0 (lr 0.35) against Nesterov 108.0 (lr 0.35)" in text
