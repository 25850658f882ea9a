"""Asynchronous rounds and the virtual clock: staleness weights, quorum and grace, bounded staleness, a client
never in flight twice, deterministic timing, and an async run killed and resumed bitwise equal."""

import logging
from types import SimpleNamespace

import pytest
import torch

from photon.federation.async_rounds import AsyncRounds, staleness_weight
from photon.federation.runner import run_federation
from photon.federation.server_state import ServerState
from photon.federation.worker import ClientWorker
from photon.runlog import read_metrics
from photon.transport.virtual_clock import VirtualClockTransport
from tests.helpers import ServerCrash, crash_when, fed_cfg


def _cfg(prep, *extra):
    # Every task H steps and a step that folds exactly its quorum, so the tests below can count folds and weigh
    # them by hand; dynamic local steps and folding what arrived together (the defaults) have tests of their own.
    return fed_cfg(prep, "data.partition.num_clients=6", "federation.clients_per_round=3", "federation.rounds=5",
                   "federation.mode=async", "federation.faults.slow_fraction=0.34", "federation.round_timeout_s=200",
                   "federation.asynchronous.dynamic_local_steps=false",
                   "federation.asynchronous.fold_arrived_together=false", *extra)


def _run(cfg, run_dir, nodes=3, **kw):
    transport = VirtualClockTransport(ClientWorker(run_dir / "node"), nodes, fail=kw.pop("fail", None))
    return run_federation(cfg, run_dir, transport, **kw), transport


def _rounds(run_dir):
    return [r for r in read_metrics(run_dir) if r["kind"] == "round"]


@pytest.mark.parametrize("s,kind,a,expected", [(0, "polynomial", 0.5, 1.0), (3, "polynomial", 0.5, 0.5),
                                                (8, "polynomial", 1.0, 1 / 9), (5, "constant", 0.5, 1.0)])
def test_staleness_weight_by_hand(s, kind, a, expected):
    assert staleness_weight(s, kind, a) == pytest.approx(expected)


def test_quorum_and_grace_decide_when_to_step(tiny_prep, tmp_path):
    cfg = _cfg(tiny_prep, "federation.asynchronous.quorum=3", "federation.asynchronous.grace_s=10",
               "federation.min_replies=2")
    agg = SimpleNamespace(cfg=cfg, layout=[("w", (1,))])
    rounds = AsyncRounds(agg, tmp_path)
    park = lambda cid, t: rounds.parked.__setitem__(cid, SimpleNamespace(arrived=t))  # noqa: E731
    assert not rounds._ready(100.0)
    park(0, 100.0)
    assert not rounds._ready(200.0)  # one reply: below min_replies, however long it waits
    park(1, 105.0)
    assert not rounds._ready(109.9) and rounds._ready(110.0)  # grace from the oldest arrival
    park(2, 106.0)
    assert rounds._ready(106.0)  # quorum


def test_async_run_keeps_nodes_busy_and_never_trains_a_client_twice_at_once(tiny_prep, tmp_path):
    summary, transport = _run(_cfg(tiny_prep), tmp_path)
    assert summary["rounds"] == 5
    by_client = {}
    for rec in transport.records.values():
        by_client.setdefault(rec.client, []).append((rec.start, rec.done))
    for intervals in by_client.values():
        intervals.sort()
        assert all(nxt[0] >= prev[1] for prev, nxt in zip(intervals, intervals[1:]))
    rounds = _rounds(tmp_path)
    assert all(len(r["folded"]) == 3 for r in rounds)
    assert max(s for r in rounds for s in r["folded"].values()) >= 1  # slow clients' updates arrive stale
    state, _ = ServerState.load_latest(tmp_path / "checkpoints")
    assert state.global_step == 5 * 4 and sum(c.rounds for c in state.clients) == 15


def test_the_virtual_clock_is_deterministic(tiny_prep, tmp_path):
    a, ta = _run(_cfg(tiny_prep), tmp_path / "a")
    b, tb = _run(_cfg(tiny_prep), tmp_path / "b")
    assert a["params_sha"] == b["params_sha"] and ta.now == tb.now
    assert [r["clock"] for r in _rounds(tmp_path / "a")] == [r["clock"] for r in _rounds(tmp_path / "b")]


def test_a_reply_staler_than_the_bound_is_refused(tiny_prep, tmp_path, caplog):
    cfg = _cfg(tiny_prep, "federation.asynchronous.max_staleness=0", "federation.faults.slow_factor=4")
    with caplog.at_level(logging.WARNING, logger="photon.federation.aggregator"):
        summary, _ = _run(cfg, tmp_path)
    assert summary["rounds"] == 5
    assert "too stale" in caplog.text
    assert all(s == 0 for r in _rounds(tmp_path) for s in r["folded"].values())


@pytest.mark.parametrize("outer", [(), ("federation.outer.name=delayed-nesterov", "federation.outer.lr=0.7",
                                          "federation.outer.delay=2", "federation.outer.schedule=cosine"),
                                   ("federation.faults.slow_node_fraction=0.34",
                                    "federation.asynchronous.dynamic_local_steps=true",
                                    "federation.asynchronous.fold_arrived_together=true")])
def test_an_async_run_killed_and_resumed_is_bitwise_equal(tiny_prep, tmp_path, outer):
    # Also with an outer optimizer whose state is more than buffers (Delayed Nesterov's place in its cycle, killed
    # mid-cycle) on a scheduled outer LR.
    cfg = _cfg(tiny_prep, "federation.faults.drop_probability=0.2", *outer)
    reference, _ = _run(cfg, tmp_path / "ref")

    with pytest.raises(ServerCrash):  # the server dies while handing out work for step 4
        _run(cfg, tmp_path / "b", fail=crash_when(lambda task: task.version == 3))
    state, _ = ServerState.load_latest(tmp_path / "b" / "checkpoints")
    assert state.round == 3 and state.outstanding  # tasks were in flight at the checkpoint
    resumed, _ = _run(cfg, tmp_path / "b", resume=True)
    assert resumed["params_sha"] == reference["params_sha"]
    assert [r["clock"] for r in _rounds(tmp_path / "b")] == [r["clock"] for r in _rounds(tmp_path / "ref")]


def test_the_adaptive_deadline_follows_recent_task_times(tiny_prep, tmp_path):
    from photon.federation.aggregator import Aggregator

    cfg = fed_cfg(tiny_prep, "federation.deadline=adaptive", "federation.round_timeout_s=100",
                  "federation.adaptive.k_mad=3", "federation.adaptive.floor_s=2", "federation.adaptive.margin=1.2")
    agg = Aggregator(cfg, ServerState.fresh({"w": __import__("torch").zeros(1)}, 3, 0), [[]] * 3, {})
    assert agg.task_deadline() == 100  # no history yet
    agg.task_times.extend([10, 11, 12, 10, 30])  # median 11, MAD 1
    assert agg.task_deadline() == pytest.approx(14)
    agg.task_times.clear()
    agg.task_times.extend([1, 1, 1])
    assert agg.task_deadline() == 2  # the floor
    agg.task_times.extend([90, 95, 99, 100, 98])
    assert agg.task_deadline() == 100  # capped by round_timeout_s


def test_sync_with_an_adaptive_deadline_drops_stragglers_and_goes_on(tiny_prep, tmp_path):
    cfg = fed_cfg(tiny_prep, "data.partition.num_clients=6", "federation.clients_per_round=3",
                  "federation.rounds=5", "federation.faults.slow_fraction=0.34", "federation.faults.slow_factor=4",
                  "federation.deadline=adaptive", "federation.round_timeout_s=200")
    summary, transport = _run(cfg, tmp_path)
    assert summary["rounds"] == 5
    rounds = _rounds(tmp_path)
    assert any("missed its deadline" in str(r) or r["dropped"] for r in rounds[3:])
    fixed, t2 = _run(fed_cfg(tiny_prep, "data.partition.num_clients=6", "federation.clients_per_round=3",
                             "federation.rounds=5", "federation.faults.slow_fraction=0.34",
                             "federation.faults.slow_factor=4", "federation.round_timeout_s=200"), tmp_path / "f")
    assert transport.now < t2.now  # waiting for every straggler takes longer


def _most_in_flight(transport) -> int:
    events = sorted([(r.start, 1) for r in transport.records.values()] +
                    [(r.done, -1) for r in transport.records.values()], key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


@pytest.mark.parametrize("concurrency,expected", [(None, 3), (2, 2), (1, 1)])
def test_concurrency_caps_the_clients_in_flight(tiny_prep, tmp_path, concurrency, expected):
    extra = [f"federation.asynchronous.concurrency={concurrency}"] if concurrency else []
    summary, transport = _run(_cfg(tiny_prep, "federation.rounds=2", *extra), tmp_path)
    assert summary["rounds"] == 2 and _most_in_flight(transport) == expected


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_lost_replies_never_take_a_node_out(tiny_prep, tmp_path, caplog, mode):
    """30% of the replies are lost on the way back: each costs its task, never the node that did the work (with
    3 nodes and these seeds, runs of 2 losses for different clients on one node happen in both modes)."""
    cfg = _cfg(tiny_prep, f"federation.mode={mode}", "federation.faults.drop_probability=0.3",
               "federation.rounds=8", "federation.min_replies=1", "federation.faults.seed=3",
               "federation.node_max_failures=2", "federation.resend_lost=0")  # nothing kept: each loss costs a task
    with caplog.at_level(logging.WARNING, logger="photon.federation.aggregator"):
        _, transport = _run(cfg, tmp_path)
    lost = [r for r in transport.records.values() if r.dropped]
    assert len(lost) >= 5
    assert "excluding node" not in caplog.text
    assert "the reply of task" in caplog.text and "photon:" not in caplog.text  # logged, without the marker
    assert {r.node for r in transport.records.values() if r.start > 0.8 * transport.now} == {0, 1, 2}


def test_no_task_queues_behind_a_straggler_the_server_gave_up_on(tiny_prep, tmp_path):
    """A fixed deadline shorter than a slow client's task: the server drops the straggler, but its node works
    on until it answers, so the server sends that node nothing until then: every task starts on a free node
    the moment it is sent, and none misses its deadline for having queued."""
    cfg = fed_cfg(tiny_prep, "data.partition.num_clients=4", "federation.clients_per_round=2", "federation.rounds=4",
                  "federation.faults.slow_fraction=0.25", "federation.faults.slow_factor=4",
                  "federation.round_timeout_s=10", "federation.min_replies=1")  # a task: 4 s, slow: 16 s
    transport = VirtualClockTransport(ClientWorker(tmp_path / "node"), 2)
    sent_at = {}
    submit = transport.submit

    def record(node, wire, *args, **kw):
        handle = submit(node, wire, *args, **kw)
        sent_at[handle] = transport.now
        return handle

    transport.submit = record
    run_federation(cfg, tmp_path / "run", transport)
    starts = {h: r for h, r in zip(sent_at, transport.records.values())}
    assert any(r.done - r.start > 10 for r in starts.values())  # a straggler the deadline cut off
    assert all(r.start == sent_at[h] for h, r in starts.items())  # nothing waited behind it
    rounds = _rounds(tmp_path / "run")
    dropped = [why for r in rounds for why in r["failures"]]
    assert dropped and all("deadline" in why for why in dropped)


def test_summed_staleness_weights_damp_a_stale_step_by_the_mean_weight_as_fedbuff_does(tiny_prep, tmp_path):
    # The two weightings agree until the first step that folds a stale reply; there the summed step (FedBuff:
    # Σ n·s·Δ / Σ n) is the normalized one (Σ n·s·Δ / Σ n·s) times Σ n·s / Σ n. FedAvg at lr 1 makes the
    # model's move the step itself.
    from photon.checkpoint import load_checkpoint
    from tests.helpers import assert_close_by_norm

    over = ("federation.aggregation=mean", "federation.outer.name=fedavg", "federation.outer.lr=1",
            "federation.keep_checkpoints=8", "federation.rounds=6")
    _run(_cfg(tiny_prep, *over, "federation.asynchronous.weighting=normalized"), tmp_path / "normalized")
    _run(_cfg(tiny_prep, *over, "federation.asynchronous.weighting=summed"), tmp_path / "summed")
    norm_rows, summed_rows = _rounds(tmp_path / "normalized"), _rounds(tmp_path / "summed")
    assert all(r["damping"] == 1.0 for r in norm_rows)
    stale = next(i for i, r in enumerate(summed_rows) if any(summed_rows[i]["folded"].values()))
    row = summed_rows[stale]
    assert row["folded"] == norm_rows[stale]["folded"]  # the same arrivals up to here
    weights = [staleness_weight(s, "polynomial", 0.5) for s in row["folded"].values()]
    assert row["damping"] == pytest.approx(sum(weights) / len(weights), rel=1e-12)  # equal samples per task
    assert row["damping"] < 1
    assert all(r["damping"] == 1.0 for r in summed_rows[:stale])

    def params(run, rnd):
        return load_checkpoint(tmp_path / run / "checkpoints" / f"round_{rnd:06d}")[0]["model"]

    before, after = params("summed", row["round"] - 1), params("summed", row["round"])
    assert all(before[k].equal(params("normalized", row["round"] - 1)[k]) for k in before)
    normalized = params("normalized", row["round"])
    for k in before:  # within fp32 rounding of the parameters (a missing damping is off by ~1e-4 of them)
        want = before[k] + row["damping"] * (normalized[k] - before[k])
        assert_close_by_norm(after[k], want, rel=1e-6, what=k)
        assert not torch.equal(after[k], normalized[k])


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_lost_reply_is_sent_again_not_trained_again(tiny_prep, tmp_path, mode):
    """30% of the replies are lost on the way back; the node kept each and sends it again when asked. In sync
    mode the run folds exactly the replies of a run without losses: the same parameters, bitwise, and no task is
    trained twice. In async mode every loss is recovered without training again, and a server killed and
    resumed lands on the same parameters (re-sent replies included)."""
    lossy = _cfg(tiny_prep, f"federation.mode={mode}", "federation.faults.drop_probability=0.3",
                 "federation.faults.seed=3", "federation.resend_lost=6")
    summary, transport = _run(lossy, tmp_path / "lossy")
    resends = [k for k in transport.records if "~" in k]
    assert sum(r["resent"] for r in _rounds(tmp_path / "lossy")) == len(resends) >= 3
    transfer = transport.reply_bytes(lossy) * 8 / (lossy.federation.virtual_clock.bandwidth_mbps * 1e6)
    assert all(transport.records[k].done - transport.records[k].start >= 0.999 * transfer for k in resends)
    trained = [r for k, r in transport.records.items() if "~" not in k]
    assert len({r.task_id for r in trained}) == len(trained)  # each task trained once
    lost = {r.task_id: r.done for r in trained if r.dropped}
    asked = {transport.records[k].task_id for k in resends}
    # every lost reply is asked for again, but an async run ends on its last outer step without waiting for one
    last_but_one = _rounds(tmp_path / "lossy")[-2]["clock"] if mode == "async" else float("inf")
    assert lost and {t for t, done in lost.items() if done <= last_but_one} <= asked
    if mode == "sync":
        clean, _ = _run(_cfg(tiny_prep, "federation.mode=sync", "federation.faults.seed=3"), tmp_path / "clean")
        assert summary["params_sha"] == clean["params_sha"]
    else:
        with pytest.raises(ServerCrash):
            _run(lossy, tmp_path / "b", fail=crash_when(lambda task: task.version == 3))
        resumed, _ = _run(lossy, tmp_path / "b", resume=True)
        assert resumed["params_sha"] == summary["params_sha"]



def test_a_slow_node_is_slow_whichever_client_it_trains(tiny_prep, tmp_path):
    """`slow_node_fraction`: the machine is slow, not the data: every task on the slow node takes slow_factor× a
    nominal task, every task elsewhere takes one, whatever the client; the slow node is drawn from the seed."""
    from photon.federation.faults import slow_nodes

    cfg = _cfg(tiny_prep, "federation.faults.slow_fraction=0", "federation.faults.slow_node_fraction=0.34",
               "federation.faults.slow_factor=4", "federation.rounds=4")
    _, transport = _run(cfg, tmp_path)
    slow = slow_nodes(cfg.federation.faults, 3)
    assert len(slow) == 1 and slow == slow_nodes(cfg.federation.faults, 3)
    nominal = cfg.federation.local_steps * cfg.federation.virtual_clock.step_seconds
    by_node: dict = {}
    for r in transport.records.values():
        assert r.compute == (4 * nominal if r.node in slow else nominal)
        by_node.setdefault(r.node in slow, set()).add(r.client)
    assert len(by_node[True]) >= 2  # the slow node trained different clients, all of them slowly


@pytest.mark.parametrize("quorum,together,folded,stale", [(3, False, {3}, False), (2, False, {2}, True),
                                                         (2, True, {3}, False)])
def test_replies_that_arrive_together_are_handed_over_together(tiny_prep, tmp_path, quorum, together, folded,
                                                                stale):
    """Three equal nodes, no faults: their replies arrive at one instant and the server sees them together, so
    with a quorum of three every update is fresh. With a quorum of two the third waits for the next step, a step
    staler, unless `fold_arrived_together` folds it with the quorum."""
    cfg = _cfg(tiny_prep, "federation.faults.slow_fraction=0", f"federation.asynchronous.quorum={quorum}",
               f"federation.asynchronous.fold_arrived_together={str(together).lower()}", "federation.rounds=4")
    _run(cfg, tmp_path)
    rounds = _rounds(tmp_path)
    assert {len(r["folded"]) for r in rounds[1:]} == folded
    assert any(s > 0 for r in rounds for s in r["folded"].values()) == stale


def test_dynamic_local_steps_shorten_a_slow_nodes_tasks_to_its_speed(tiny_prep, tmp_path):
    """Async Local-SGD's dynamic local updates: once each node has replied, the slow node's tasks have H × (fast
    seconds per step / slow), so they take about as long as a fast node's; fast nodes keep H."""
    from photon.federation.faults import slow_nodes

    cfg = _cfg(tiny_prep, "federation.faults.slow_fraction=0", "federation.faults.slow_node_fraction=0.34",
               "federation.faults.slow_factor=4", "federation.rounds=6", "federation.local_steps=8",
               "federation.asynchronous.dynamic_local_steps=true")
    _, transport = _run(cfg, tmp_path)
    slow, step_s = slow_nodes(cfg.federation.faults, 3), cfg.federation.virtual_clock.step_seconds
    steps = {}
    for r in sorted(transport.records.values(), key=lambda r: r.start):
        speed = 4 if r.node in slow else 1
        steps.setdefault(r.node, []).append(round(r.compute / (step_s * speed)))
    (slow_node,) = slow
    assert steps[slow_node][0] == 8 and set(steps[slow_node][1:]) == {2}  # 8 × ~1/4 (transfers add a little)
    assert all(set(s) == {8} for node, s in steps.items() if node != slow_node)
    state, _ = ServerState.load_latest(tmp_path / "checkpoints")
    assert set(state.node_step_seconds) == {"0", "1", "2"}  # checkpointed: a resumed run sizes tasks alike


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_node_that_goes_down_loses_its_task_and_comes_back(tiny_prep, tmp_path, caplog, mode):
    """Node 1 is down from 10 s to 30 s of virtual time: the task it holds then dies (an error at 10 s, its
    client trained again elsewhere), it is sent nothing while down, and it trains again once it is back; the
    run ends with every round committed and no node excluded."""
    cfg = _cfg(tiny_prep, f"federation.mode={mode}", "federation.faults.slow_fraction=0",
               "federation.faults.outage={1: [10, 30]}", "federation.rounds=8", "federation.min_replies=1")
    with caplog.at_level(logging.WARNING, logger="photon.federation.aggregator"):
        summary, transport = _run(cfg, tmp_path)
    assert summary["rounds"] == 8
    on1 = [r for r in transport.records.values() if r.node == 1]
    died = [r for r in on1 if r.fate == "died"]
    assert len(died) == 1 and died[0].done == 10.0 and died[0].start < 10
    assert not [r for r in on1 if 10 <= r.start < 30]  # nothing sent while it was down
    assert [r for r in on1 if r.start >= 30]            # and work again once back
    if mode == "async":  # sent work the moment it came back (a sync round in progress has its nodes)
        assert min(r.start for r in on1 if r.start >= 30) == 30.0
    assert "went down" in caplog.text and "excluding node" not in caplog.text
    folded = {t for row in _rounds(tmp_path) for t in row["folded"]}
    assert died[0].task_id not in folded


def test_a_lossy_link_is_a_fixed_trace_of_the_node_and_the_instant():
    """`drop_trace: link`: whether a reply is lost depends only on (seed, node, its arrival instant), so arms
    that dispatch differently face the same links; over many instants the loss rate is the configured one."""
    from photon.config import FaultConfig
    from photon.federation.faults import link_drops

    faults = FaultConfig(drop_probability=0.1, drop_trace="link", seed=7)
    instants = [i * 0.37 for i in range(4000)]
    trace = [link_drops(faults, 2, t) for t in instants]
    assert trace == [link_drops(faults, 2, t) for t in instants]
    assert abs(sum(trace) / len(trace) - 0.1) < 0.02  # 4.2 standard deviations of a binomial rate
    assert trace != [link_drops(faults, 3, t) for t in instants]  # each node its own link
    assert trace != [link_drops(FaultConfig(drop_probability=0.1, drop_trace="link", seed=8), 2, t)
                     for t in instants]


@pytest.mark.parametrize("target,rounds", [(float("inf"), 2), (float("-inf"), 5)])
def test_a_run_stops_when_its_last_evaluations_reach_a_target(tiny_prep, tmp_path, target, rounds):
    """`target_loss`: the run stops once the mean loss of its last three evaluations reaches the target (an
    unreachable one: it trains all its rounds)."""
    cfg = _cfg(tiny_prep, "federation.mode=sync", "federation.eval_every=1")
    summary = run_federation(cfg, tmp_path, VirtualClockTransport(ClientWorker(tmp_path / "node"), 3),
                             target_loss=target)
    assert summary["rounds"] == rounds
