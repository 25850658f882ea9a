"""The federated round loop, engine-free (in-process transport): sampling, client table, failures, resume."""

import io
import math

import pytest
import torch
from rich.console import Console

from photon.checkpoint import hold_run_dir, list_checkpoints
from photon.errors import UserError
from photon.federation.aggregator import Aggregator
from photon.federation.runner import run_federation
from photon.federation.server_state import ServerState
from photon.federation.worker import ClientWorker
from photon.runlog import read_metrics
from photon.transport.inprocess import InProcessTransport
from tests.helpers import ServerCrash, crash_when, fed_cfg, run


def test_rounds_advance_global_step_clients_and_lower_the_loss(tiny_prep, tmp_path):
    cfg = fed_cfg(tiny_prep, "federation.rounds=4", "federation.clients_per_round=3", "federation.local_steps=8")
    summary = run(cfg, tmp_path, nodes=2)
    assert summary["rounds"] == 4 and summary["global_step"] == 4 * 8
    state, _ = ServerState.load_latest(tmp_path / "checkpoints")
    assert all(c.rounds == 4 and c.steps == 32 and c.cursor == 32 * 8 for c in state.clients)
    evals = [r for r in read_metrics(tmp_path) if r["kind"] == "eval"]
    assert evals[-1]["loss/overall"] < evals[0]["loss/overall"] - 0.3
    # bits per byte beside each loss: the same scored text every time, so the ratio of the two is fixed
    ratios = {round(r["bpb/overall"] / r["loss/overall"], 9) for r in evals}
    assert len(ratios) == 1 and 0 < ratios.pop() < 1 / math.log(2)  # more than one byte per token
    rounds = [r for r in read_metrics(tmp_path) if r["kind"] == "round"]
    assert [r["ok"] for r in rounds] == [3, 3, 3, 3]
    assert rounds[0]["bytes_down"] == rounds[0]["bytes_up"] > 0
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_keep_checkpoints_sets_how_many_round_checkpoints_stay(tiny_prep, tmp_path):
    run(fed_cfg(tiny_prep, "federation.rounds=5", "federation.local_steps=2"), tmp_path / "a")
    run(fed_cfg(tiny_prep, "federation.rounds=5", "federation.local_steps=2", "federation.keep_checkpoints=5"),
        tmp_path / "b")
    assert [p.name for p in list_checkpoints(tmp_path / "a" / "checkpoints")] == [f"round_{r:06d}" for r in (3, 4, 5)]
    assert len(list_checkpoints(tmp_path / "b" / "checkpoints")) == 5
    with pytest.raises(UserError, match="keep_checkpoints"):  # at least 2: a damaged newest needs a fallback
        fed_cfg(tiny_prep, "federation.keep_checkpoints=1")


def test_more_clients_per_round_than_nodes(tiny_prep, tmp_path):
    cfg = fed_cfg(tiny_prep, "federation.clients_per_round=3", "federation.rounds=1")
    assert run(cfg, tmp_path, nodes=1)["rounds"] == 1


def test_sampling_is_seeded_and_replayed_from_the_checkpointed_rng(tiny_prep):
    cfg = fed_cfg(tiny_prep, "data.partition.num_clients=4", "federation.clients_per_round=2")
    params = {"w": torch.zeros(2)}
    a = Aggregator(cfg, ServerState.fresh(params, 4, seed=7), [[]] * 4, {})
    b = Aggregator(cfg, ServerState.fresh(params, 4, seed=7), [[]] * 4, {})
    draws = [a.sample_clients() for _ in range(5)]
    assert draws == [b.sample_clients() for _ in range(5)]
    assert all(len(set(d)) == 2 for d in draws) and len({tuple(d) for d in draws}) > 1
    c = Aggregator(cfg, ServerState.fresh(params, 4, seed=7), [[]] * 4, {})
    c.sample_clients()
    c.sample_clients()
    resumed = Aggregator(cfg, ServerState.fresh(params, 4, seed=0), [[]] * 4, {})
    resumed.state.rng_state = c.state.rng_state
    assert resumed.sample_clients() == draws[2]


def test_a_failing_client_is_dropped_requeued_and_not_advanced(tiny_prep, tmp_path):
    cfg = fed_cfg(tiny_prep, "federation.clients_per_round=3", "federation.rounds=2",
                  "federation.state_backup_every=1")  # kept state backed up every round: counted in the table
    calls = []

    def fail(task):
        calls.append((task.client_id, task.round, task.attempt))
        return "boom" if task.client_id == 1 and task.round == 0 else None

    out = io.StringIO()
    run(cfg, tmp_path, fail=fail, console=Console(file=out, width=200))
    assert (1, 0, 1) in calls and (1, 0, 2) in calls  # re-queued once within the round
    state, _ = ServerState.load_latest(tmp_path / "checkpoints")
    assert state.clients[1].rounds == 1 and state.clients[1].failures == 2
    assert state.clients[0].rounds == 2 and state.clients[1].cursor == 4 * 8
    rounds = [r for r in read_metrics(tmp_path) if r["kind"] == "round"]
    assert [(r["ok"], r["failed"]) for r in rounds] == [(2, 2), (3, 0)]
    assert len(rounds[0]["failures"]) == 2 and all("boom" in why for why in rounds[0]["failures"])
    assert rounds[1]["failures"] == []
    # the printed table's MB down/up are everything the round moved: the kept AdamW state (backed up) too
    table = {int(cells[0]): cells for line in out.getvalue().splitlines() if (cells := line.split())
             and cells[0].isdigit()}
    for r in rounds:
        assert r["bytes_state_up"] > 0
        assert table[r["round"]][6:8] == [f"{(r['bytes_down'] + r['bytes_state_down']) / 1e6:.1f}",
                                          f"{(r['bytes_up'] + r['bytes_state_up']) / 1e6:.1f}"]


def test_a_retry_that_succeeds_counts_the_client(tiny_prep, tmp_path):
    cfg = fed_cfg(tiny_prep, "federation.rounds=1")
    summary = run(cfg, tmp_path, fail=lambda t: "flaky" if t.attempt == 1 and t.client_id == 0 else None)
    state, _ = ServerState.load_latest(tmp_path / "checkpoints")
    assert summary["rounds"] == 1 and sum(c.rounds for c in state.clients) == 2


def test_a_round_with_too_few_replies_is_retried_then_given_up(tiny_prep, tmp_path):
    cfg = fed_cfg(tiny_prep, "federation.min_replies=2", "federation.max_round_retries=1",
                  "federation.node_max_failures=100")  # every task fails: keep the one node in the run
    with pytest.raises(UserError, match="failed 2 times"):
        run(cfg, tmp_path, fail=lambda t: "down")
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_injected_faults_from_config_fail_every_other_round(tiny_prep, tmp_path):
    cfg = fed_cfg(tiny_prep, "federation.clients_per_round=3", "federation.rounds=4",
                  "federation.faults.fail_clients=[2]", "federation.faults.fail_every=2")
    summary = run(cfg, tmp_path)
    assert summary["rounds"] == 4
    rounds = [r for r in read_metrics(tmp_path) if r["kind"] == "round"]
    assert [r["failed"] for r in rounds] == [2, 0, 2, 0]
    evals = [r for r in read_metrics(tmp_path) if r["kind"] == "eval"]
    assert evals[-1]["loss/overall"] < evals[0]["loss/overall"]


@pytest.mark.parametrize("outer", ["fedavg", "nesterov"])
def test_killed_and_resumed_run_is_bitwise_equal_to_an_uninterrupted_one(tiny_prep, tmp_path, outer):
    cfg = fed_cfg(tiny_prep, "federation.rounds=4", f"federation.outer.name={outer}",
                  "federation.outer.lr=0.7" if outer == "nesterov" else "federation.outer.lr=1.0",
                  "data.partition.num_clients=3")
    straight = run(cfg, tmp_path / "a")

    with pytest.raises(ServerCrash):  # the server dies mid-round: nothing of round 2 was committed
        run(cfg, tmp_path / "b", fail=crash_when(lambda task: task.round == 2))
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")][-1] == "round_000002"
    resumed = run(cfg, tmp_path / "b", resume=True)
    assert resumed["params_sha"] == straight["params_sha"]
    assert resumed["rounds"] == 4
    rows = [r["round"] for r in read_metrics(tmp_path / "b") if r["kind"] == "round"]
    assert rows == [1, 2, 3, 4]


def test_resume_refuses_a_different_model(tiny_prep, tmp_path):
    run(fed_cfg(tiny_prep, "federation.rounds=1"), tmp_path)
    with pytest.raises(UserError, match="different model shape"):
        run(fed_cfg(tiny_prep, "federation.rounds=2", "model.n_layer=3"), tmp_path, resume=True)
    with pytest.raises(UserError, match="already holds a run"):
        run(fed_cfg(tiny_prep), tmp_path)


def test_too_many_clients_is_refused_before_any_round_with_the_fix(tiny_prep, tmp_path):
    cfg = fed_cfg(tiny_prep, "data.partition.kind=iid", "data.partition.num_clients=500", "train.seq_len=128")
    with pytest.raises(UserError, match=r"use at most \d+ clients"):
        run(cfg, tmp_path)
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_a_run_with_no_node_says_every_30_s_that_it_waits(tiny_prep, monkeypatch, caplog):
    from photon.federation import aggregator

    cfg = fed_cfg(tiny_prep)
    agg = Aggregator(cfg, ServerState.fresh({"w": torch.zeros(2)}, cfg.data.partition.num_clients, 0),
                     [[]] * cfg.data.partition.num_clients, {})
    now = [1000.0]
    monkeypatch.setattr(aggregator.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(aggregator.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    with caplog.at_level("WARNING", logger="photon.federation.aggregator"):
        for _ in range(130):  # 65 s of waiting, half a second each
            agg.wait_for_a_node()
        said = [r.getMessage() for r in caplog.records if "no node connected" in r.getMessage()]
        assert len(said) == 2 and "for 30 s" in said[0] and "for 60 s" in said[1] and "photon node" in said[0]
        agg.node_came()  # a node came and went: a new wait starts counting from zero
        for _ in range(59):
            agg.wait_for_a_node()
        assert len([r for r in caplog.records if "no node connected" in r.getMessage()]) == 2


def test_resuming_a_finished_run_says_so_and_shows_its_last_evaluation(tiny_prep, tmp_path):
    cfg = fed_cfg(tiny_prep, "federation.rounds=2")
    done = run(cfg, tmp_path)
    out = io.StringIO()
    again = run(cfg, tmp_path, resume=True, console=Console(file=out, width=200))
    text = out.getvalue()
    assert "already ran its 2 rounds" in text and "federation.schedule_rounds=2" in text
    assert again["rounds"] == 2 and again["params_sha"] == done["params_sha"]
    assert "overall" in text.split("validation after 2 rounds")[1]  # the table has rows, not an empty frame


def test_resume_refuses_another_partition_or_tokenizer_and_leaves_the_run_as_it_was(tiny_prep, tmp_path):
    """The clients' cursors and kept state belong to the partition and the tokens they trained on."""
    import json
    import shutil

    from photon.digest import sha256_file

    run_dir = tmp_path / "run"
    cfg = fed_cfg(tiny_prep, "federation.rounds=1")
    run(cfg, run_dir)
    partition = (run_dir / "partition.json").read_text()
    with pytest.raises(UserError, match=r"data.partition.kind='by-domain' \(not 'iid'\)"):
        run(fed_cfg(tiny_prep, "federation.rounds=1", "data.partition.kind=iid"), run_dir, resume=True)
    assert (run_dir / "partition.json").read_text() == partition  # refused before anything is rewritten
    other = tmp_path / "retokenized"  # the same vocabulary size, another tokenizer: prepared again
    shutil.copytree(tiny_prep, other)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text() + "\n")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer_sha256"] = sha256_file(other / "tokenizer.json")
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="tokenized by another tokenizer"):
        run(fed_cfg(other, "federation.rounds=1"), run_dir, resume=True)


def test_a_run_that_cannot_be_evaluated_is_refused_before_any_round(tiny_prep, tmp_path, caplog):
    from photon.data.shards import open_prepared

    prepared = open_prepared(tiny_prep)
    val = sorted(len(prepared.tokens(d, "val")) for d in prepared.domains)
    with pytest.raises(UserError, match="no domain's validation split holds one sequence"):
        run(fed_cfg(tiny_prep, f"train.seq_len={val[-1]}", f"model.max_seq_len={val[-1]}"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    short = val[0]  # the shortest domain cannot hold one sequence of this length; the others can
    assert short < val[-1] - 1
    from photon.train.evaluate import evaluable_domains

    with caplog.at_level("WARNING"):
        fits = evaluable_domains(prepared, short)
    assert len(fits) == len(prepared.domains) - 1 and "left out of evaluation" in caplog.text


class _BrokenNode(ClientWorker):
    """A node whose every task errors (a full disk, a broken install): not one client's fault."""

    def handle(self, wire, *args, **kwargs):
        raise RuntimeError("disk full")


def test_a_failed_client_is_retried_on_another_node(tiny_prep, tmp_path):
    cfg = fed_cfg(tiny_prep, "federation.clients_per_round=3", "federation.rounds=2",
                  "federation.node_max_failures=100")  # keep the broken node in: its failures are the point
    transport = InProcessTransport([ClientWorker(tmp_path / "n0"), _BrokenNode(tmp_path / "n1")])
    run_federation(cfg, tmp_path / "run", transport)
    rounds = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "round"]
    assert [r["ok"] for r in rounds] == [3, 3] and all(r["failed"] >= 1 for r in rounds)
    assert all("disk full" in why for r in rounds for why in r["failures"])


def test_a_node_without_the_runs_data_is_excluded_at_once_and_its_client_trained_elsewhere(tiny_prep, tmp_path,
                                                                                          caplog):
    cfg = fed_cfg(tiny_prep, "federation.clients_per_round=3", "federation.rounds=2")
    empty = tmp_path / "no-data"
    empty.mkdir()
    transport = InProcessTransport([ClientWorker(tmp_path / "n0"), ClientWorker(tmp_path / "n1", data_dir=empty)])
    with caplog.at_level("WARNING"):
        run_federation(cfg, tmp_path / "run", transport)
    rounds = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "round"]
    assert [(r["ok"], r["failed"]) for r in rounds] == [(3, 0), (3, 0)]  # not the clients' failures
    excluded = [r for r in caplog.records if "excluding node 1" in r.getMessage()]
    assert len(excluded) == 1 and "cannot train any client" in excluded[0].getMessage()
    assert "no prepared data" in excluded[0].getMessage() and "photon:" not in excluded[0].getMessage()
    with pytest.raises(UserError, match="every node was excluded from the run; last: node 0: .*no prepared data"):
        run_federation(cfg, tmp_path / "alone", InProcessTransport([ClientWorker(tmp_path / "n2", data_dir=empty)]))


def test_a_run_killed_in_its_first_round_and_resumed_logs_its_first_evaluation_once(tiny_prep, tmp_path):
    cfg = fed_cfg(tiny_prep, "federation.rounds=2")
    with pytest.raises(ServerCrash):
        run(cfg, tmp_path, fail=crash_when(lambda t: t.round == 0))
    assert [r["round"] for r in read_metrics(tmp_path) if r["kind"] == "eval"] == [0]
    run(cfg, tmp_path, resume=True)  # no checkpoint yet: it starts from round 0 again
    assert [r["round"] for r in read_metrics(tmp_path) if r["kind"] == "eval"] == [0, 1, 2]


def test_a_retry_goes_to_a_free_node_it_has_not_failed_on_and_never_waits_for_a_busy_one(tiny_prep):
    from collections import deque

    cfg = fed_cfg(tiny_prep, "data.partition.num_clients=4")
    agg = Aggregator(cfg, ServerState.fresh({"w": torch.zeros(2)}, 4, seed=7), [[]] * 4, {})
    # client 1 failed on node 1: with nodes 0 and 1 free, node 0 takes it and node 1 the other client
    assert agg._assign(deque([2, 1]), [0, 1], {1: {1}}) == [(0, 1), (1, 2)]
    # client 1 failed on node 0 and only node 0 is free (node 1 is busy, maybe straggling): it runs there now
    queue = deque([1])
    assert agg._assign(queue, [0], {1: {0}}) == [(0, 1)] and not queue
    # a node keeps the client whose kept state it holds
    agg.state.clients[3].state_node = 1
    assert agg._assign(deque([2, 3]), [0, 1], {}) == [(0, 2), (1, 3)]


def test_a_run_folder_another_process_trains_into_is_refused_before_anything_is_written(tiny_prep, tmp_path):
    cfg = fed_cfg(tiny_prep, "federation.rounds=1")
    with hold_run_dir(tmp_path / "run"):
        with pytest.raises(UserError, match="in use by process"):
            run(cfg, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
    assert run(cfg, tmp_path / "run")["rounds"] == 1
    with pytest.raises(UserError, match="typo holds no run to resume"):  # deployed: no stray folder made
        run(cfg, tmp_path / "typo", resume=True)
    assert not (tmp_path / "typo").exists()


def test_a_simulation_on_a_live_run_folder_is_refused_before_it_touches_the_blob_store(tiny_prep, tmp_path):
    from photon.launch.simulation import run_simulated

    live = tmp_path / "live"
    (live / "blobs").mkdir(parents=True)
    (live / "blobs" / "secret").write_text("the live run's")
    with hold_run_dir(live):
        with pytest.raises(UserError, match="in use by process"):
            run_simulated(fed_cfg(tiny_prep, "federation.rounds=1"), live)
    assert (live / "blobs" / "secret").read_text() == "the live run's"


class _BrokenAtFirst(ClientWorker):
    """A node that fails every task of the first round (a full disk, since cleared), then works."""

    def handle(self, wire, *args, **kwargs):
        from photon.federation.protocol import decode_task

        if decode_task(wire).round == 0:
            raise RuntimeError("disk full")
        return super().handle(wire, *args, **kwargs)


def test_an_excluded_node_rejoins_after_its_backoff(tiny_prep, tmp_path, caplog):
    cfg = fed_cfg(tiny_prep, "data.partition.num_clients=4", "federation.clients_per_round=4", "federation.rounds=3",
                  "federation.node_max_failures=2")
    transport = InProcessTransport([ClientWorker(tmp_path / "n0"), _BrokenAtFirst(tmp_path / "n1")])
    with caplog.at_level("WARNING"):
        run_federation(cfg, tmp_path / "run", transport)
    log = caplog.text
    assert "excluding node 1" in log and "tried again in 1 round(s)" in log
    assert "node 1 rejoins the run after its backoff" in log
    rounds = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "round"]
    assert [r["ok"] for r in rounds] == [4, 4, 4]
    assert rounds[-1]["failed"] == 0  # back in, it trains again


def test_the_last_usable_node_is_never_excluded_for_failures(tiny_prep, tmp_path, caplog):
    cfg = fed_cfg(tiny_prep, "federation.min_replies=2", "federation.max_round_retries=1",
                  "federation.node_max_failures=2")
    with caplog.at_level("WARNING"), pytest.raises(UserError, match="failed 2 times"):
        run(cfg, tmp_path, fail=lambda t: "down")  # the round's own limit ends the run, not the node's
    assert "it is the only usable node: kept in the run" in caplog.text and "excluding node" not in caplog.text
