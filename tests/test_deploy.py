"""The deployment runtime on 127.0.0.1: TLS + node auth, a 2-round run on two SuperNodes, refused nodes, a node
killed mid-round."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import tiny_cfg
from photon.errors import UserError
from photon.federation import deploy
from photon.federation.certs import make_certs
from photon.runlog import read_metrics


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    """A SuperLink with TLS and node auth on a free port; node-0 and node-1 registered, node-2 not."""
    root = tmp_path_factory.mktemp("deploy")
    certs = root / "certs"
    make_certs(certs, nodes=3)
    port = deploy.free_port()
    proc = deploy.start_superlink(port, root / "server", certs=certs, log_file=root / "superlink.log")
    try:
        home = root / "client"
        deploy.write_connection(home, f"127.0.0.1:{port}", certs=certs)
        ids = [deploy.register_node(home, certs / f"node-{i}.key.pub") for i in range(2)]
        yield SimpleNamespace(root=root, certs=certs, address=f"127.0.0.1:{port}", home=home, ids=ids)
    finally:
        deploy.stop(proc)


@pytest.fixture
def procs():
    """Processes a test starts; all stopped (with their process groups) at teardown."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        deploy.stop(p)


def _node(link, i, key, certs, procs, data=None, warm=False):
    log = link.root / f"node-{i}.log"
    p = deploy.start_supernode(link.address, deploy.free_port(), link.root / f"node-{i}", data=data, certs=certs,
                               key=key, log_file=log, warm=warm)
    procs.append(p)
    return p, log


def test_certs_refuse_to_overwrite_and_keys_load(tmp_path):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
    from cryptography.x509 import load_pem_x509_certificate

    make_certs(tmp_path, nodes=1)
    with pytest.raises(UserError, match="--force"):
        make_certs(tmp_path, nodes=1)
    make_certs(tmp_path, nodes=1, force=True)
    key = load_ssh_private_key((tmp_path / "node-0.key").read_bytes(), password=None)
    assert key.curve.name == "secp384r1"
    assert load_ssh_public_key((tmp_path / "node-0.key.pub").read_bytes()).public_numbers() == \
        key.public_key().public_numbers()
    ca = load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0


def test_app_bundle_holds_only_code_and_config(tmp_path):
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    app = deploy.stage_app(tmp_path)
    fab = build_fab_from_disk(app)
    assert len(fab) < FAB_MAX_SIZE
    import io
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "photon/federation/server_app.py" in names and "photon/presets/tiny.yaml" in names
    assert all(n.startswith(("photon/", ".info/")) or n == "pyproject.toml" for n in names), names


def test_unregistered_or_untrusted_nodes_are_refused(link, procs, tmp_path):
    other = tmp_path / "other-ca"
    make_certs(other, nodes=0)
    unregistered, log_a = _node(link, "a", link.certs / "node-2.key", link.certs, procs)
    wrong_ca, log_b = _node(link, "b", link.certs / "node-0.key", other, procs)
    no_ca = deploy.spawn([deploy.executable("flower-supernode"), "--superlink", link.address, "--port",
                          str(deploy.free_port()), "--auth-supernode-private-key", str(link.certs / "node-1.key")],
                         link.root / "node-c", link.root / "node-c.log")
    procs.append(no_ca)
    for p in (unregistered, wrong_ca, no_ca):
        assert p.wait(timeout=60) != 0
    assert "registered" in deploy.explain_exit(log_a)
    assert "CERTIFICATE_VERIFY_FAILED" in deploy.explain_exit(log_b)
    assert "CERTIFICATE_VERIFY_FAILED" in deploy.explain_exit(link.root / "node-c.log")
    nodes = deploy.list_nodes(link.home)
    assert sorted(int(n["node-id"]) for n in nodes) == sorted(link.ids)
    assert all(n["status"] != "online" for n in nodes)  # the registered keys were only used by refused nodes


def test_deployed_run_completes_two_rounds_on_two_nodes(link, procs, tiny_prep):
    for i in range(2):
        _node(link, i, link.certs / f"node-{i}.key", link.certs, procs, data=tiny_prep)
    cfg = tiny_cfg(tiny_prep, "federation.rounds=2", "data.partition.num_clients=3", "train.threads=1")
    run_dir = link.root / "run"
    run_id = deploy.submit_run(link.home, cfg, str(run_dir))
    status = deploy.wait_run(link.home, run_id, poll_s=1.0, timeout_s=300)
    assert status["status"] == "finished:completed", (link.root / "superlink.log").read_text()[-3000:]
    assert (run_dir / "checkpoints" / "round_000002").is_dir()
    rounds = [r for r in read_metrics(run_dir) if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert json.loads((run_dir / "config.json").read_text())["federation"]["rounds"] == 2
    online = [n for n in deploy.list_nodes(link.home) if n["status"] == "online"]
    assert sorted(int(n["node-id"]) for n in online) == sorted(link.ids)
    for r in rounds:
        print(f"round {r['round']}: wall {r['wall_seconds']:.1f} s, train {r['train_seconds']:.1f} s")
    print(f"run elapsed {status['elapsed']:.1f} s")


def _wait_online(link, n, timeout=60.0):
    end = time.monotonic() + timeout
    while sum(node["status"] == "online" for node in deploy.list_nodes(link.home)) < n:
        assert time.monotonic() < end, f"fewer than {n} nodes online after {timeout} s"
        time.sleep(0.5)


def test_node_killed_mid_round_is_replaced_and_the_run_finishes(link, procs, tiny_prep):
    """kill -9 a SuperNode's process group (the SuperNode and its ClientApp runtime) while it trains in round 1:
    Flower reports the node unavailable once its heartbeat lapses (≤ 20 s with photon's 10 s interval), the
    aggregator re-queues the client on the other node, round 1 completes with a failed reply on record and
    round 2 runs on the survivor. Warm nodes: their 10 s heartbeat keeps the test short (a plain Flower node is
    declared dead after ≤ 60 s; the aggregator's handling is the same)."""
    victim, victim_log = _node(link, 0, link.certs / "node-0.key", link.certs, procs, data=tiny_prep, warm=True)
    _node(link, 1, link.certs / "node-1.key", link.certs, procs, data=tiny_prep, warm=True)
    _wait_online(link, 2)
    group = [victim.pid, *deploy.descendants(victim.pid)]
    assert len(group) >= 2  # the SuperNode and its ClientApp runtime
    # long enough that the kill lands mid-task; round 2 runs both clients on one node
    cfg = tiny_cfg(tiny_prep, "federation.rounds=2", "data.partition.num_clients=2", "federation.clients_per_round=2",
                   "federation.local_steps=100", "train.threads=1")
    run_dir = link.root / "run-kill"
    start = time.monotonic()
    run_id = deploy.submit_run(link.home, cfg, str(run_dir))
    while "Received successfully" not in victim_log.read_text(errors="replace"):
        assert victim.poll() is None and time.monotonic() - start < 60, victim_log.read_text()[-2000:]
        time.sleep(0.1)
    time.sleep(0.5)  # the runtime has the task: it is pulling or training
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    killed = time.monotonic()
    status = deploy.wait_run(link.home, run_id, poll_s=1.0, timeout_s=240)
    assert status["status"] == "finished:completed", (link.root / "superlink.log").read_text()[-3000:]
    rounds = [r for r in read_metrics(run_dir) if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["failed"] >= 1 and rounds[0]["ok"] == 2, rounds[0]
    assert rounds[1]["ok"] == 2, rounds[1]
    assert (run_dir / "checkpoints" / "round_000002").is_dir()
    assert all(not Path(f"/proc/{pid}").exists() or deploy._zombie(pid) for pid in group)  # the runtime died too
    print(f"kill at {killed - start:.1f} s; round 1 wall {rounds[0]['wall_seconds']:.1f} s; run elapsed "
          f"{status['elapsed']:.1f} s")
