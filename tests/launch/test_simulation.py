"""Flower's simulation runtime end to end: the same numbers as the engine-free loop, faults, resume."""

from photon.federation.runner import run_federation
from photon.federation.worker import ClientWorker
from photon.launch.simulation import run_simulated
from photon.runlog import read_metrics
from photon.transport.inprocess import InProcessTransport
from tests.helpers import fed_cfg


def test_simulation_resumed_matches_the_engine_free_run_bitwise(tiny_prep, tmp_path):
    # One thread everywhere: matmul reductions may split differently with another thread count.
    cfg = fed_cfg(tiny_prep, "federation.rounds=3", "federation.num_nodes=2", "train.threads=1")
    reference = run_federation(cfg, tmp_path / "ref", InProcessTransport(ClientWorker(tmp_path / "n"), 1))
    first = run_simulated(cfg, tmp_path / "sim", stop_after=1)
    assert first["rounds"] == 1
    resumed = run_simulated(cfg, tmp_path / "sim", resume=True)
    assert resumed["rounds"] == 3
    assert resumed["params_sha"] == reference["params_sha"]


def test_a_model_over_1mb_takes_the_blob_channel_in_simulation_with_the_same_numbers(tiny_prep, tmp_path,
                                                                                    monkeypatch):
    from photon.model.transformer import count_params
    from photon.transport import blobs

    cfg = fed_cfg(tiny_prep, "model.d_model=96", "federation.rounds=2", "federation.num_nodes=2",
                  "train.threads=1")
    reference = run_federation(cfg, tmp_path / "ref", InProcessTransport(ClientWorker(tmp_path / "n"), 1))
    loaded, load = [], blobs.Channel.load

    def spy(self, payload, slot):  # the ServerApp runs in this process: count the replies read from uploads
        if blobs.BLOB in payload.layout:
            loaded.append(payload.layout[blobs.BLOB]["size"])
        return load(self, payload, slot)

    monkeypatch.setattr(blobs.Channel, "load", spy)
    summary = run_simulated(cfg, tmp_path / "sim")
    assert summary["params_sha"] == reference["params_sha"]
    model_bytes = count_params(cfg.model) * 4  # every reply's fp32 update came as a blob (its kept state too)
    assert loaded.count(model_bytes) == 2 * cfg.federation.clients_per_round and min(loaded) >= 1 << 20
    assert not (tmp_path / "sim" / "blobs").exists()  # the channel's files go with the simulation


def test_simulation_survives_a_client_that_raises_every_other_round(tiny_prep, tmp_path):
    cfg = fed_cfg(tiny_prep, "federation.rounds=3", "federation.clients_per_round=3",
                  "federation.faults.fail_clients=[0]", "federation.faults.fail_every=2")
    summary = run_simulated(cfg, tmp_path)
    assert summary["rounds"] == 3
    rounds = [r for r in read_metrics(tmp_path) if r["kind"] == "round"]
    assert [r["ok"] for r in rounds] == [2, 3, 2]
    assert [r["failed"] for r in rounds] == [2, 0, 2]


def test_simulation_rejects_hostile_and_broken_replies_and_completes(tiny_prep, tmp_path):
    faults = "{1: lie, 2: truncate, 3: flip, 4: wrong-dtype, 5: bad-header, 6: nan}"
    cfg = fed_cfg(tiny_prep, "data.partition.num_clients=8", "federation.clients_per_round=8",
                  "federation.rounds=2", f"federation.faults.reply={faults}", "federation.min_cosine=0")
    summary = run_simulated(cfg, tmp_path)
    assert summary["rounds"] == 2
    rounds = [r for r in read_metrics(tmp_path) if r["kind"] == "round"]
    assert [r["ok"] for r in rounds] == [2, 2]  # clients 0 and 7, the honest ones
    assert [r["dropped"] for r in rounds] == [6, 6]


def test_async_rounds_run_on_flower_with_slow_clients_sleeping_for_real(tiny_prep, tmp_path):
    # Async over the Flower simulation's Grid, the slow clients really sleeping. Which replies come back stale
    # is the machine's timing here (a Ray worker's first task also pays its start, seconds, while the other
    # worker may finish every round), so this test checks what holds whatever the timing; that a stale
    # update is weighted and folded is checked deterministically on the virtual clock (test_async.py) and on
    # real SuperNodes with one slowed node (test_deploy.py).
    cfg = fed_cfg(tiny_prep, "data.partition.num_clients=4", "federation.clients_per_round=2", "federation.rounds=4",
                  "federation.mode=async", "federation.asynchronous.quorum=1", "federation.faults.slow_fraction=0.5",
                  "federation.faults.slow_factor=3", "federation.round_timeout_s=120", "train.threads=1")
    summary = run_simulated(cfg, tmp_path)
    assert summary["rounds"] == 4
    rounds = [r for r in read_metrics(tmp_path) if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(1 <= len(r["folded"]) <= 2 for r in rounds)  # quorum 1: replies that arrive together fold together
    max_staleness = cfg.federation.asynchronous.max_staleness
    assert all(0 <= s <= max_staleness for r in rounds for s in r["folded"].values()), [r["folded"] for r in rounds]


def test_ctrl_c_ends_a_simulation_and_says_how_to_resume(tiny_prep, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) mid-run: the process ends within seconds
    with exit code 130 and the resume command, and leaves no Ray process behind. (Flower stopped its runtime
    but not our server thread, which waited for replies forever; and Flower's own workers could wait forever
    for actors the interrupt had killed, which Python waited for at exit.)"""
    import os
    import signal
    import subprocess
    import sys
    import time

    out, log = tmp_path / "run", tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "photon.cli", "run", "--preset", "tiny", "--out", str(out),
                                 "--set", f"data.prep_dir={tiny_prep}", "--set", "federation.rounds=2000"],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                # as from a terminal, whatever this test runs under (a shell's background job
                                # inherits SIGINT ignored, and Python then keeps ignoring it)
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                                env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoints").is_dir() or len(list((out / "checkpoints").iterdir())) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert f"photon run --resume {out}" in log.read_text()
    for _ in range(20):  # nothing of its session (Ray's workers and agents) left running, after a moment
        left = subprocess.run(["pgrep", "-a", "-s", str(proc.pid)], capture_output=True, text=True).stdout
        if not left:
            break
        time.sleep(0.5)
    assert not left, left
