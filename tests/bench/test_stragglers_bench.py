"""`photon bench stragglers`: each arm's config is the arm it names, with the same node faults in every faulty
arm; where node-time went adds up to the nodes' up-time; the target and the time to it are the trailing means';
the rendering reads the record."""

import math

import pytest

from photon.bench import stragglers as s
from photon.config import with_overrides
from photon.federation.faults import slow_nodes
from photon.federation.runner import run_federation
from photon.federation.worker import ClientWorker
from photon.runlog import read_metrics
from photon.transport.virtual_clock import VirtualClockTransport
from tests.helpers import fed_cfg, tiny_cfg


def test_each_arm_is_configured_as_its_label_says(tmp_path):
    base = with_overrides(tiny_cfg(tmp_path), [*s.SETTING, *s.DEFAULTS])
    clean = with_overrides(base, s.arm_overrides(s.CLEAN, base, seed=2))
    assert clean.federation.faults == type(clean.federation.faults)()  # no faults at all
    assert clean.train.eval_batches >= 32 and clean.federation.eval_every == s.EVAL_EVERY
    faults = set()
    for arm in s.ARMS[1:]:
        cfg = with_overrides(base, s.arm_overrides(arm, base, seed=2, clean_clock=900.0))
        fed = cfg.federation
        f = fed.faults
        faults.add(f.model_dump_json())
        drawn = (f.slow_node_fraction, f.slow_factor, f.drop_probability, f.drop_trace, f.seed)
        assert drawn == (0.25, 3, 0.1, "link", 2)
        (node, window), = f.outage.items()
        assert window == (300.0, 600.0) and node not in slow_nodes(f, 4)
        assert fed.aggregation == "mean" and fed.min_cosine is None and fed.resend_lost > 0
        assert fed.schedule_rounds == base.federation.rounds and cfg.train.seed == 2
        assert fed.mode == ("async" if arm.startswith("async") else "sync")
        if arm.startswith("async"):
            assert fed.asynchronous.weighting == ("summed" if "FedBuff" in arm else "normalized")
        nominal = fed.local_steps * fed.virtual_clock.step_seconds
        if arm == s.FIXED:
            assert fed.deadline == "fixed" and fed.round_timeout_s == 2 * nominal  # less than a slow task (3×)
        if arm == s.ADAPTIVE:
            assert fed.deadline == "adaptive"
        if arm == s.WAIT_ALL:
            assert fed.deadline == "fixed" and fed.round_timeout_s >= 10 * nominal
    assert len(faults) == 1  # every faulty arm faces the same machines
    with pytest.raises(ValueError, match="virtual duration"):
        s.arm_overrides(s.WAIT_ALL, base, seed=0)


def test_each_fault_arm_is_the_default_async_arm_with_only_its_fault(tmp_path):
    base = with_overrides(tiny_cfg(tmp_path), [*s.SETTING, *s.DEFAULTS])
    every = with_overrides(base, s.arm_overrides(s.DEFAULT_ASYNC, base, seed=2, clean_clock=900.0)).federation
    assert len(s.FAULT_ARMS) == 4
    for arm, kinds in s.FAULT_ARMS.items():
        fed = with_overrides(base, s.arm_overrides(arm, base, seed=2, clean_clock=900.0)).federation
        assert fed.model_dump(exclude={"faults"}) == every.model_dump(exclude={"faults"})  # the default async arm
        f, all3 = fed.faults, every.faults
        assert slow_nodes(f, 4) == (slow_nodes(all3, 4) if "slow" in kinds else set())
        assert f.drop_probability == (0.1 if "loss" in kinds else 0.0)
        assert f.outage == (all3.outage if "outage" in kinds else {})  # the same node, down at the same time
    assert with_overrides(base, s.arm_overrides(s.ASYNC_NO_FAULTS, base, 2, 900.0)).federation.faults.outage == {}


def test_where_node_time_went_adds_up_to_the_nodes_up_time(tiny_prep, tmp_path):
    """An async run with a slow node, lossy links and an outage: every category is a real share of the up-time,
    they add up to it, and the folded share is the training time of the folded tasks."""
    cfg = fed_cfg(tiny_prep, "data.partition.num_clients=6", "federation.clients_per_round=3", "federation.rounds=6",
                  "federation.mode=async", "federation.round_timeout_s=40", *s.node_faults(1, (0, 10.0, 30.0)),
                  "federation.faults.drop_probability=0.3", "federation.resend_lost=0")
    transport = VirtualClockTransport(ClientWorker(tmp_path / "node"), 3)
    run_federation(cfg, tmp_path / "run", transport)
    folded = {t for r in read_metrics(tmp_path / "run") if r["kind"] == "round" for t in r["folded"]}
    times = s.node_time(transport, folded, cfg)
    assert times["up"] == pytest.approx(3 * transport.now - 20.0)  # node 0 was down for 20 s
    parts = sum(times[k] for k in ("folded", "tail", *s.WASTE))
    assert parts == pytest.approx(times["up"], rel=1e-9)
    assert all(v >= -1e-9 for v in times.values())
    assert times["died"] > 0 and times["lost"] > 0
    want = sum(r.compute for r in transport.records.values() if r.task_id in folded and r.done <= transport.now)
    assert times["folded"] == pytest.approx(want)


def test_a_finished_arm_is_not_trained_again_unless_its_target_changed(tiny_prep, tmp_path, monkeypatch):
    cfg = fed_cfg(tiny_prep, "federation.rounds=2", "federation.eval_every=1")
    first = s.run_arm(cfg, tmp_path / "arm", budget=10**9, target_loss=100.0)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr(s, "run_federation", no_training)
    assert s.run_arm(cfg, tmp_path / "arm", budget=10**9, target_loss=100.0) == first
    with pytest.raises(AssertionError, match="trained again"):
        s.run_arm(cfg, tmp_path / "arm", budget=10**9, target_loss=99.0)


def test_the_target_and_the_time_to_it_are_the_trailing_means():
    evals = [[0, 0, 7.0], [10, 1, 6.0], [20, 2, 5.0], [30, 3, 4.0], [40, 4, 4.5], [50, 5, 3.5]]
    assert [p[2] for p in s.trailing(evals)] == [6.0, 5.0, 4.5, 4.0]
    clean = {"evals": evals}
    assert s.target_of(clean) == 4.0
    assert s.time_to({"evals": evals}, 4.6) == 40 and s.time_to({"evals": evals}, 3.9) is None
    assert s.loss_at_tokens({"evals": evals}, 4) == (4.5, True)
    assert s.loss_at_tokens({"evals": evals}, 9) == (4.0, False)


def test_the_capacity_bound_is_when_the_faulty_machines_can_have_done_clean_s_training():
    evals = [[0, 0, 7.0], [250, 1, 6.0], [500, 2, 5.0], [750, 3, 4.0], [1000, 4, 4.0]]
    clean = {"clock": 1000.0, "node_time": {"folded": 4000.0}, "evals": evals}  # its target, 4.0, at the end
    # two full-speed nodes, one at a third, one down from 333 to 667 s: (2 + 1/3 + 1) t - 333.3 = 4000
    assert s.capacity_bound(clean, 4) == pytest.approx(1300.0)
    # trailing means 5, 4, 4.17: its target (4.17) first reached at 750 s, after 3000 node-seconds of work
    early = {**clean, "evals": [[0, 0, 7.0], [250, 1, 4.0], [500, 2, 4.0], [750, 3, 4.0], [1000, 4, 4.5]]}
    assert s.capacity_bound(early, 4) == pytest.approx(1000.0)


def _record(times_by_arm):
    runs = {}
    for arm in [a for a in (*s.ARMS, *s.FAULT_ARMS) if a in times_by_arm]:
        runs[arm] = []
        for seed, t in enumerate(times_by_arm[arm]):
            loss = 4.0 if arm == s.CLEAN else 4.01  # clean's target: 4.0; the others 1% worse at its tokens
            reach = [[t, 150, 3.9]] if t is not None and arm != s.CLEAN else []  # a trailing mean of 3.97
            evals = [[0, 0, loss], [10, 50, loss], [20, 100, loss], *reach]
            node = {"up": 1000.0, "folded": 900.0, "tail": 0.0, "lost": 20.0, "cancelled": 10.0, "refused": 5.0,
                    "died": 5.0, "idle": 55.0, "transfer": 5.0}
            runs[arm].append({"evals": evals, "node_time": node, "loss_rate": 0.1, "dropped": 0.0, "tokens": 100,
                              "staleness": {"0": 3}, "clock": 30.0})
    data = {"preset": "tiny", "clients": 8, "k": 4, "nodes": 4, "local_steps": 32, "rounds": 32, "batch": 8,
            "seq_len": 64, "budget_tokens": 100, "seeds": 2, "step_seconds": 1.0, "tokens_cap": 3,
            "eval_batches": 32, "eval_every": 2, "runs": runs}
    data["summary"] = s.summarize(data)
    return data


def test_the_render_reads_the_record():
    data = _record({s.CLEAN: [30, 30], s.WAIT_ALL: [300, 400], s.FIXED: [None, None], s.ADAPTIVE: [500, None],
                    s.ASYNC_NORMALIZED: [200, 220], s.ASYNC_SUMMED: [170, 270], s.ASYNC_DYNAMIC: [180, 260],
                    s.ASYNC_TOGETHER: [150, 250]})
    text = s.render(data)
    assert "| async, FedBuff weights | 220 s (170, 270; reached 2/2) |" in text
    assert f"| {s.ASYNC_TOGETHER} | 200 s (150, 250; reached 2/2) |" in text  # the default: the goals are its
    assert "| sync, fixed deadline | not reached (–, –; reached 0/2) |" in text
    assert "- ≥ 1.5× less virtual time to target than sync waiting for all: 1.75×, met" in text
    # the adaptive arm's median counts its unreached seed as the slowest: no median of two with one unreached
    assert "than the best deadline arm (sync, fixed deadline): not measurable" in text
    assert "| async, FedBuff weights | 90.0% | 2.0% | 1.0% | 0.5% | 0.5% | 5.5% | 0.5% | 0.0% |" in text
    assert "- goodput ≥ 93%: 90.0%, NOT met" in text
    bound = s.capacity_bound(data["runs"][s.CLEAN][0], 4)
    assert f"no arm can reach the target before {bound:,.0f} s" in text
    assert f"1.75×, met (at most {350 / bound:.2f}× is possible" in text  # wait-all: 350 s
    assert "| async, FedBuff weights, dynamic local steps | 220 s (180, 260; reached 2/2) |" in text
    for arm in (s.ASYNC_DYNAMIC, s.ASYNC_TOGETHER):  # a record from before these arms were added still renders
        del data["runs"][arm]
    data["summary"] = s.summarize(data)
    assert "| async, FedBuff weights, dynamic" not in s.render(data) and "dynamic" not in s.render_brief(data)
    assert f"{math.exp(0.01) - 1:+.2%}, met" in text
    assert "What each fault costs" not in text  # a record without the fault arms


def test_the_render_says_what_each_fault_costs():
    times = {arm: [150, 250] for arm in s.ARMS} | {arm: [100, 120] for arm in s.FAULT_ARMS}
    data = _record(times | {"async (default), the slow node only": [140, None]})
    text = s.render(data)
    assert "What each fault costs" in text
    assert "| no faults | 110 s (100, 120) |" in text and "| lost replies only | 110 s (100, 120) |" in text
    assert "| the slow node only | not reached (140, –) |" in text
    assert "| all three | 200 s (150, 250) |" in text
    assert "| async (default), no faults |" not in text and "no faults" not in s.render_brief(data)


def test_the_brief_names_the_first_arm_to_the_target_and_the_busiest():
    data = _record({s.CLEAN: [30, 30], s.WAIT_ALL: [300, 400], s.FIXED: [None, None], s.ADAPTIVE: [500, 100],
                    s.ASYNC_NORMALIZED: [200, 220], s.ASYNC_SUMMED: [150, 250], s.ASYNC_DYNAMIC: [180, 260],
                    s.ASYNC_TOGETHER: [170, 270]})
    data["runs"][s.ASYNC_SUMMED][0]["node_time"] = {**data["runs"][s.ASYNC_SUMMED][0]["node_time"],
                                                     "folded": 990.0, "idle": 0.0, "lost": 0.0, "cancelled": 0.0}
    data["summary"] = s.summarize(data)
    text = s.render_brief(data)
    assert "| sync, fixed deadline | not reached | +1.0% | 90.0% |" in text
    assert "First to clean's loss: async, FedBuff weights; most node-time productive: async, FedBuff weights" in text
