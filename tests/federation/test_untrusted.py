"""A reply is untrusted input: late, duplicate, reordered, malformed, oversized, lying and hostile replies
each end as a logged rejection of that one reply, the run completes, and nothing is lost. Also: kept client
state follows the client across nodes and resumes exactly; a node that keeps failing is excluded; the LR
schedule cannot be bent by a resume."""

import io
import logging

import pytest
from rich.console import Console

from photon.checkpoint import list_checkpoints
from photon.errors import UserError
from photon.federation.protocol import decode_task
from photon.federation.runner import run_federation
from photon.federation.server_state import ServerState
from photon.federation.worker import ClientWorker
from photon.runlog import read_metrics
from photon.transport.inprocess import InProcessTransport
from tests.helpers import ServerCrash, crash_when, fed_cfg, run


def _rounds(run_dir):
    return [r for r in read_metrics(run_dir) if r["kind"] == "round"]


# ---------------------------------------------------------------------------------------------------------
# Faults a client sends, on the engine-free loop (the Flower simulation: test_simulation.py)

FAULT_REASONS = {
    "flip": "majority", "nan": "non-finite", "lie": "header claims", "wrong-round": "round",
    "wrong-client": "client_id", "truncate": "truncated", "oversize": "oversized", "bad-header": "malformed",
    "bad-layout": "shape", "wrong-dtype": "uint8", "no-payload": "no update",
}


@pytest.mark.parametrize("fault", sorted(FAULT_REASONS))
def test_a_faulty_reply_is_rejected_with_its_reason_and_the_run_completes(tiny_prep, tmp_path, fault, caplog):
    cfg = fed_cfg(tiny_prep, "data.partition.num_clients=4", "federation.clients_per_round=4",
                  "federation.rounds=2", f"federation.faults.reply={{3: {fault}}}",
                  *(["federation.min_cosine=0"] if fault == "flip" else []))  # the direction screen, opted in
    with caplog.at_level(logging.WARNING, logger="photon.federation.aggregator"):
        summary = run(cfg, tmp_path)
    assert summary["rounds"] == 2
    rounds = _rounds(tmp_path)
    assert [r["ok"] for r in rounds] == [3, 3] and [r["dropped"] for r in rounds] == [1, 1]
    state, _ = ServerState.load_latest(tmp_path / "checkpoints")
    assert state.clients[3].rounds == 0 and state.clients[3].cursor == 0  # nothing of it was believed
    assert all(state.clients[c].rounds == 2 for c in range(3))
    assert state.global_step == 2 * cfg.federation.local_steps  # a lying header cannot advance the schedule
    rejections = [r.getMessage() for r in caplog.records if "client 3" in r.getMessage()]
    assert rejections and all(FAULT_REASONS[fault] in m for m in rejections), rejections


def test_every_fault_reason_names_what_was_wrong(tiny_prep, tmp_path, caplog):
    faults = "{1: lie, 2: truncate, 3: flip}"
    cfg = fed_cfg(tiny_prep, "data.partition.num_clients=6", "federation.clients_per_round=6",
                  "federation.rounds=1", f"federation.faults.reply={faults}", "federation.min_cosine=0")
    with caplog.at_level(logging.WARNING, logger="photon.federation.aggregator"):
        run(cfg, tmp_path)
    text = caplog.text
    assert "client 1 attempt 1 rejected" in text and "header claims steps=4000" in text
    assert "client 2 attempt 2 rejected" in text and "truncated" in text
    assert "client 3 rejected" in text and "majority" in text
    assert _rounds(tmp_path)[0]["ok"] == 3


# ---------------------------------------------------------------------------------------------------------
# Replies the network delivers late, twice, or out of order

class ChaosTransport(InProcessTransport):
    """Delivers replies reordered (newest first), duplicated, and holds back chosen (client, round)
    replies until a later `collect`, after their round has ended."""

    def __init__(self, worker, nodes=2, duplicate=False, hold=()):
        super().__init__(worker, nodes)
        self.duplicate, self.hold, self.held = duplicate, set(hold), []

    def collect(self, timeout):
        out, pending = [], self._pending
        self._pending = {}
        rounds = set()
        for handle, (node, wire) in pending.items():
            task = decode_task(wire)
            rounds.add(task.round)
            reply = self.run(node, wire)
            if (task.client_id, task.round) in self.hold:
                self.held.append((task.round, handle, reply))
                continue
            out.append((handle, reply))
            if self.duplicate:
                out.append((handle, reply))
        late = [(h, r) for rnd, h, r in self.held if rounds and rnd < min(rounds)]  # a later round is running
        self.held = [x for x in self.held if not (rounds and x[0] < min(rounds))]
        yield from reversed(late + out)


def test_reordered_and_duplicated_replies_change_nothing(tiny_prep, tmp_path):
    cfg = fed_cfg(tiny_prep, "federation.clients_per_round=3", "federation.rounds=2")
    reference = run(cfg, tmp_path / "ref", nodes=3)
    chaos = ChaosTransport(ClientWorker(tmp_path / "n"), nodes=3, duplicate=True)
    got = run_federation(cfg, tmp_path / "chaos", chaos)
    assert got["params_sha"] == reference["params_sha"]
    assert [r["late"] for r in _rounds(tmp_path / "chaos")] == [3, 3]  # each duplicate dropped and counted


def test_a_late_reply_is_dropped_in_the_next_round_not_a_crash(tiny_prep, tmp_path, caplog):
    cfg = fed_cfg(tiny_prep, "federation.clients_per_round=3", "federation.rounds=3",
                  "federation.round_timeout_s=2")
    chaos = ChaosTransport(ClientWorker(tmp_path / "n"), nodes=3, hold=[(1, 0)])
    with caplog.at_level(logging.WARNING, logger="photon.federation.aggregator"):
        summary = run_federation(cfg, tmp_path / "run", chaos)
    assert summary["rounds"] == 3
    rounds = _rounds(tmp_path / "run")
    assert rounds[0]["ok"] == 2 and rounds[0]["dropped"] == 1  # client 1 missed round 1's deadline
    assert sum(r["late"] for r in rounds) == 1
    assert "late or duplicate reply from client 1 (round 1" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# Kept client state (client_optimizer: persist) follows the client


class SwappingTransport(InProcessTransport):
    """Two nodes whose caches swap every round: node i's task in round r runs on worker (i + r) % 2, so a
    client's kept state is never where it was last written."""

    def run(self, node, wire):
        return super().run((node + decode_task(wire).round) % 2, wire)


def _persist_cfg(prep, *extra):  # backed up every round: exact wherever a client goes
    return fed_cfg(prep, "federation.client_optimizer=persist", "federation.clients_per_round=3",
                   "federation.rounds=4", "federation.state_backup_every=1", *extra)


def test_kept_state_is_exact_across_nodes_that_swap_clients(tiny_prep, tmp_path):
    cfg = _persist_cfg(tiny_prep)
    reference = run(cfg, tmp_path / "ref")
    swapped = SwappingTransport([ClientWorker(tmp_path / "a"), ClientWorker(tmp_path / "b")])
    got = run_federation(cfg, tmp_path / "swap", swapped)
    assert got["params_sha"] == reference["params_sha"]
    assert sum(r["bytes_state_down"] for r in _rounds(tmp_path / "swap")) > 0  # the server's copy was sent
    reset = run(fed_cfg(tiny_prep, "federation.clients_per_round=3", "federation.rounds=4",
                        "federation.client_optimizer=reset"), tmp_path / "reset")
    assert reset["params_sha"] != reference["params_sha"]  # the kept state does matter


def test_kept_state_resumes_exactly_after_a_server_kill_on_swapped_nodes(tiny_prep, tmp_path):
    cfg = _persist_cfg(tiny_prep)
    reference = run(cfg, tmp_path / "ref")

    workers = [ClientWorker(tmp_path / "a"), ClientWorker(tmp_path / "b")]
    with pytest.raises(ServerCrash):
        run_federation(cfg, tmp_path / "b", InProcessTransport(workers, fail=crash_when(lambda task: task.round == 2)))
    assert list_checkpoints(tmp_path / "b" / "checkpoints")[-1].name == "round_000002"
    resumed = run_federation(cfg, tmp_path / "b", SwappingTransport(workers), resume=True)
    assert resumed["params_sha"] == reference["params_sha"]


def test_a_client_backed_up_every_few_rounds_is_exact_where_it_stays_and_continues_from_its_backup_when_it_moves(
        tiny_prep, tmp_path, caplog):
    """`state_backup_every=2`: the state goes up after every 2nd round of a client (rounds 2 and 4 here, every
    client trains every round). Nodes that keep their clients never use the backup: the same parameters as
    backing up every round. Nodes that swap clients every round continue from the last backup (and say so)."""
    cfg = _persist_cfg(tiny_prep, "federation.state_backup_every=2")
    exact = run(_persist_cfg(tiny_prep), tmp_path / "every")
    kept = run(cfg, tmp_path / "kept", nodes=2)
    assert kept["params_sha"] == exact["params_sha"]
    assert [r["bytes_state_up"] > 0 for r in _rounds(tmp_path / "kept")] == [False, True, False, True]
    swapped = SwappingTransport([ClientWorker(tmp_path / "a"), ClientWorker(tmp_path / "b")])
    with caplog.at_level(logging.WARNING, logger="photon.federation.aggregator"):
        moved = run_federation(cfg, tmp_path / "moved", swapped)
    assert "continues from its last backup" in caplog.text  # round 3 and 4: from the round-2 backup
    assert "starts from a fresh state" in caplog.text        # round 2: nothing backed up yet
    assert moved["rounds"] == 4 and moved["params_sha"] != exact["params_sha"]


def test_a_new_run_never_loads_an_old_runs_state(tiny_prep, tmp_path):
    cfg = _persist_cfg(tiny_prep, "federation.rounds=2")
    shared = ClientWorker(tmp_path / "node")
    first = run_federation(cfg, tmp_path / "one", InProcessTransport(shared))
    second = run_federation(cfg, tmp_path / "two", InProcessTransport(shared))
    assert first["params_sha"] == second["params_sha"]  # same seed, fresh state both times
    assert len(list((tmp_path / "node").iterdir())) == 2  # one cache folder per run


def test_without_a_backup_a_lost_state_restarts_fresh_and_says_so(tiny_prep, tmp_path, caplog):
    cfg = _persist_cfg(tiny_prep, "federation.state_backup=false")
    swapped = SwappingTransport([ClientWorker(tmp_path / "a"), ClientWorker(tmp_path / "b")])
    with caplog.at_level(logging.WARNING, logger="photon.federation.aggregator"):
        summary = run_federation(cfg, tmp_path / "run", swapped)
    assert summary["rounds"] == 4
    assert "starts from a fresh state" in caplog.text
    assert all(r["bytes_state_up"] == 0 for r in _rounds(tmp_path / "run"))


def test_a_rejected_round_does_not_commit_the_state_it_wrote(tiny_prep, tmp_path):
    cfg = _persist_cfg(tiny_prep, "federation.rounds=2", "federation.clients_per_round=2")
    flaky = lambda t: "boom" if (t.round, t.attempt) == (1, 1) else None  # noqa: E731
    run(cfg, tmp_path / "flaky", fail=flaky)
    straight = run(cfg, tmp_path / "ref")
    flaky_state, _ = ServerState.load_latest(tmp_path / "flaky" / "checkpoints")
    assert straight["params_sha"] == run(cfg, tmp_path / "again")["params_sha"]
    ref_state, _ = ServerState.load_latest(tmp_path / "ref" / "checkpoints")
    assert [c.state_digest for c in flaky_state.clients] == [c.state_digest for c in ref_state.clients]


# ---------------------------------------------------------------------------------------------------------
# Nodes that keep failing


def test_a_node_without_data_is_excluded_and_its_clients_trained_elsewhere(tiny_prep, tmp_path, caplog):
    cfg = fed_cfg(tiny_prep, "federation.clients_per_round=3", "federation.rounds=3")
    good, broken = ClientWorker(tmp_path / "a"), ClientWorker(tmp_path / "b", data_dir=tmp_path / "nothing")
    with caplog.at_level(logging.WARNING, logger="photon.federation.aggregator"):
        summary = run_federation(cfg, tmp_path / "run", InProcessTransport([broken, good]))
    assert summary["rounds"] == 3
    assert "excluding node 0" in caplog.text
    assert [r["ok"] for r in _rounds(tmp_path / "run")][-1] == 3


def test_when_every_node_is_excluded_the_run_stops_with_the_reason(tiny_prep, tmp_path):
    cfg = fed_cfg(tiny_prep, "federation.clients_per_round=3")
    broken = ClientWorker(tmp_path / "b", data_dir=tmp_path / "nothing")
    with pytest.raises(UserError, match="every node was excluded.*no prepared data"):
        run_federation(cfg, tmp_path / "run", InProcessTransport(broken))


def test_a_run_that_lost_clients_says_so_at_the_end(tiny_prep, tmp_path, capsys):
    from rich.console import Console

    cfg = fed_cfg(tiny_prep, "data.partition.num_clients=4", "federation.clients_per_round=4",
                  "federation.rounds=2", "federation.faults.reply={2: truncate}")
    run_federation(cfg, tmp_path, InProcessTransport(ClientWorker(tmp_path / "n")), console=Console(width=200))
    out = capsys.readouterr().out
    assert "2 of the rounds run here committed without some of their sampled clients" in out
    assert "direction screen" not in out  # truncated replies: nothing to say about the screen

    cfg = fed_cfg(tiny_prep, "data.partition.num_clients=4", "federation.clients_per_round=4",
                  "federation.rounds=1", "federation.faults.reply={2: flip}", "federation.min_cosine=0")
    run_federation(cfg, tmp_path / "flip", InProcessTransport(ClientWorker(tmp_path / "m")), console=Console(width=300))
    out = capsys.readouterr().out
    assert "An update the direction screen turned away can be an honest client's" in out


# ---------------------------------------------------------------------------------------------------------
# The schedule


def test_warmup_is_checked_against_the_federated_schedule(tiny_prep, tmp_path):
    with pytest.raises(UserError, match="exceeds the federated schedule of 12"):
        run(fed_cfg(tiny_prep, "train.warmup_steps=13"), tmp_path)
    run(fed_cfg(tiny_prep, "train.warmup_steps=12", "train.steps=5", "federation.rounds=3"), tmp_path / "ok")


def test_resume_refuses_to_restretch_the_schedule_and_can_extend_on_the_floor(tiny_prep, tmp_path):
    run(fed_cfg(tiny_prep, "federation.rounds=2"), tmp_path)
    with pytest.raises(UserError, match="federation.schedule_rounds=2"):
        run(fed_cfg(tiny_prep, "federation.rounds=4"), tmp_path, resume=True)
    with pytest.raises(UserError, match="trained 2 rounds already, so federation.rounds=1 asks for no more: to train "
                                        "on, set federation.rounds above 2 and add --set federation.schedule_rounds=2"):
        run(fed_cfg(tiny_prep, "federation.rounds=1"), tmp_path, resume=True)
    with pytest.raises(UserError, match="Resume with its H: --set federation.local_steps=4"):
        run(fed_cfg(tiny_prep, "federation.rounds=4", "federation.schedule_rounds=2", "federation.local_steps=8"),
            tmp_path, resume=True)
    longer = run(fed_cfg(tiny_prep, "federation.rounds=4", "federation.schedule_rounds=2"), tmp_path, resume=True)
    assert longer["rounds"] == 4
    out = io.StringIO()  # a shorter --set rounds on an extended run: it says how many it ran, not the setting
    run(fed_cfg(tiny_prep, "federation.rounds=1", "federation.schedule_rounds=2"), tmp_path, resume=True,
        console=Console(file=out, width=300))
    assert "already ran 4 rounds, past federation.rounds=1" in out.getvalue()
    assert "federation.rounds=<more than 4>" in out.getvalue()
    lrs = [r for r in read_metrics(tmp_path) if r["kind"] == "round"]
    assert len(lrs) == 4
