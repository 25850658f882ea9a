"""The deployment runtime on 127.0.0.1: TLS + node auth, a 2-round run on two SuperNodes, refused nodes."""

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import tiny_cfg
from photon.errors import UserError
from photon.federation import deploy
from photon.runlog import read_metrics


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    """A SuperLink with TLS and node auth on a free port; node-0 and node-1 registered, node-2 not."""
    root = tmp_path_factory.mktemp("deploy")
    certs = root / "certs"
    deploy.make_certs(certs, nodes=3)
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


def _node(link, i, key, certs, procs, data=None):
    log = link.root / f"node-{i}.log"
    p = deploy.start_supernode(link.address, deploy.free_port(), link.root / f"node-{i}", data=data, certs=certs,
                               key=key, log_file=log)
    procs.append(p)
    return p, log


def test_certs_refuse_to_overwrite_and_keys_load(tmp_path):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
    from cryptography.x509 import load_pem_x509_certificate

    deploy.make_certs(tmp_path, nodes=1)
    with pytest.raises(UserError, match="--force"):
        deploy.make_certs(tmp_path, nodes=1)
    deploy.make_certs(tmp_path, nodes=1, force=True)
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
    deploy.make_certs(other, nodes=0)
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
