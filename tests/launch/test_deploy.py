"""The deployment runtime on 127.0.0.1: TLS + node auth, a 2-round run on two SuperNodes, refused nodes, a node
killed mid-round; what a holder of ca.crt alone cannot do (register nodes, submit runs, take the ServerApp's task),
run directories confined to the runs root, and `photon node` stopping with a reason or with its SuperNode."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from photon.errors import UserError
from photon.launch import processes, submit, superlink, supernode
from photon.launch.certs import OPERATOR_TOKEN, make_certs, read_token
from photon.runlog import read_metrics
from tests.helpers import encoded_size, tiny_cfg


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    """A guarded SuperLink with TLS and node auth on a free port; node-0 and node-1 registered, node-2 not;
    `home` is the operator's connection (with the operator token), `rogue` a machine's that has only ca.crt."""
    root = tmp_path_factory.mktemp("deploy")
    certs = root / "certs"
    make_certs(certs, nodes=3)
    port = processes.free_port()
    proc = superlink.start_superlink(port, root / "server", certs=certs, log_file=root / "superlink.log")
    try:
        home, address = root / "client", f"127.0.0.1:{port}"
        submit.write_connection(home, address, certs=certs, token=read_token(certs / OPERATOR_TOKEN))
        ids = [submit.register_node(home, certs / f"node-{i}.key.pub") for i in range(2)]
        only_ca = root / "only-ca"
        only_ca.mkdir()
        shutil.copy(certs / "ca.crt", only_ca)
        rogue = root / "rogue"
        submit.write_connection(rogue, address, certs=only_ca)
        yield SimpleNamespace(root=root, certs=certs, address=address, home=home, ids=ids, rogue=rogue,
                              runs=root / "server" / "runs", only_ca=only_ca)
    finally:
        processes.stop(proc)


@pytest.fixture
def procs():
    """Processes a test starts; all stopped (with their process groups) at teardown."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        processes.stop(p)


def _node(link, i, key, certs, procs, data=None, warm=False):
    log = link.root / f"node-{i}.log"
    p = supernode.start_supernode(link.address, processes.free_port(), link.root / f"node-{i}", data=data, certs=certs,
                                  key=key, log_file=log, warm=warm)
    procs.append(p)
    return p, log


def test_certs_refuse_to_overwrite_and_keys_load(tmp_path):
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )
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
    for secret in ("ca.key", "server.key", "node-0.key", OPERATOR_TOKEN):
        assert (tmp_path / secret).stat().st_mode & 0o077 == 0, secret


def test_photon_certs_days_sets_how_long_the_ca_and_server_certificate_last(tmp_path, photon):
    import datetime

    from cryptography.x509 import load_pem_x509_certificate

    code, out, _ = photon("certs", "--out", tmp_path, "--nodes", "0", "--days", "30")
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=30)
    ends = [load_pem_x509_certificate((tmp_path / name).read_bytes()).not_valid_after_utc
            for name in ("ca.crt", "server.pem")]
    assert all(abs((end - soon).total_seconds()) < 120 for end in ends)
    assert code == 0 and f"until {ends[1].strftime('%Y-%m-%d %H:%M')} UTC" in out.replace("\n", "")


def test_app_bundle_holds_only_code_and_config(tmp_path):
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    app = submit.stage_app(tmp_path)
    fab = build_fab_from_disk(app)
    assert len(fab) < FAB_MAX_SIZE
    import io
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "photon/transport/server_app.py" in names and "photon/presets/tiny.yaml" in names
    assert all(n.startswith(("photon/", ".info/")) or n == "pyproject.toml" for n in names), names


def test_unregistered_or_untrusted_nodes_are_refused(link, procs, tmp_path):
    other = tmp_path / "other-ca"
    make_certs(other, nodes=0)
    unregistered, log_a = _node(link, "a", link.certs / "node-2.key", link.certs, procs)
    wrong_ca, log_b = _node(link, "b", link.certs / "node-0.key", other, procs)
    no_ca = processes.spawn([processes.executable("flower-supernode"), "--superlink", link.address, "--port",
                             str(processes.free_port()), "--auth-supernode-private-key",
                             str(link.certs / "node-1.key")],
                            link.root / "node-c", link.root / "node-c.log")
    procs.append(no_ca)
    for p in (unregistered, wrong_ca, no_ca):
        assert p.wait(timeout=60) != 0
    assert "registered" in processes.explain_exit(log_a)
    assert "CERTIFICATE_VERIFY_FAILED" in processes.explain_exit(log_b)
    assert "CERTIFICATE_VERIFY_FAILED" in processes.explain_exit(link.root / "node-c.log")
    nodes = submit.list_nodes(link.home)
    assert sorted(int(n["node-id"]) for n in nodes) == sorted(link.ids)
    assert all(n["status"] != "online" for n in nodes)  # the registered keys were only used by refused nodes


def _serverapp_argv() -> list[list[str]]:
    """The command lines of the flwr-serverapp processes running now."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a.endswith("flwr-serverapp") for a in argv[:2]):
            found.append(argv)
    return found


def test_deployed_run_completes_two_rounds_on_two_nodes(link, procs, tiny_prep):
    """...in the runs root, with the ServerApp's task token in a file, not on its command line (any local user can
    read a command line; the token lets its holder act as the ServerApp)."""
    for i in range(2):
        _node(link, i, link.certs / f"node-{i}.key", link.certs, procs, data=tiny_prep)
    cfg = tiny_cfg(tiny_prep, "federation.rounds=2", "data.partition.num_clients=3", "train.threads=1",
                   "train.warmup_steps=4")  # within the 2 x 8 steps of the schedule
    run_id = submit.submit_run(link.home, cfg, "run")
    run_dir = link.runs / "run"
    seen: list[list[str]] = []
    end = time.monotonic() + 60
    while not seen and time.monotonic() < end and submit.run_status(link.home, run_id)["status"] not in submit.FINAL:
        seen = _serverapp_argv()
        time.sleep(0.2)
    assert seen, "no flwr-serverapp process seen"
    assert all("--token" not in argv and "--token-file" in argv for argv in seen), seen
    status = submit.wait_run(link.home, run_id, poll_s=1.0, timeout_s=300)
    assert status["status"] == "finished:completed", (link.root / "superlink.log").read_text()[-3000:]
    assert (run_dir / "checkpoints" / "round_000002").is_dir()
    rounds = [r for r in read_metrics(run_dir) if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert json.loads((run_dir / "config.json").read_text())["federation"]["rounds"] == 2
    online = [n for n in submit.list_nodes(link.home) if n["status"] == "online"]
    assert sorted(int(n["node-id"]) for n in online) == sorted(link.ids)
    for r in rounds:
        print(f"round {r['round']}: wall {r['wall_seconds']:.1f} s, train {r['train_seconds']:.1f} s")
    print(f"run elapsed {status['elapsed']:.1f} s")


# ---------------------------------------------------------------------------------------------------------
# Who can do what: ca.crt lets a machine check the server, nothing more (docs/DEPLOY.md, "Who can do what")


def test_a_holder_of_ca_crt_alone_cannot_register_a_node(link, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pub = tmp_path / "rogue.key.pub"
    pub.write_bytes(ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(UserError, match="refused this machine's operator token"):
        submit.register_node(link.rogue, pub)
    wrong = tmp_path / "guess"
    submit.write_connection(wrong, link.address, certs=link.only_ca, token="0" * 64)
    with pytest.raises(UserError, match="refused this machine's operator token"):
        submit.register_node(wrong, pub)
    with pytest.raises(UserError, match="operator token"):
        submit.list_nodes(link.rogue)
    assert sorted(int(n["node-id"]) for n in submit.list_nodes(link.home)) == sorted(link.ids)


def test_a_holder_of_ca_crt_alone_cannot_submit_a_run_or_take_the_serverapps_task(link, tiny_prep):
    """No run starts (`flwr run` would run the submitted app's code on the server), and the Runtime API's task
    queue, where ServerApp runs are handed out, refuses anyone but the SuperLink's own SuperExec."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    before = submit.flwr(link.home, "list", submit.CONNECTION, "--format", "json").stdout
    with pytest.raises(UserError, match="operator token"):
        submit.submit_run(link.rogue, tiny_cfg(tiny_prep), "rogue-run")
    assert submit.flwr(link.home, "list", submit.CONNECTION, "--format", "json").stdout.count('"run-id"') == \
        before.count('"run-id"')
    client = RuntimeHttpClient.from_server_address(
        server_address=link.address, insecure=False, root_certificates=(link.only_ca / "ca.crt").read_bytes(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")], retry_invoker=None)
    with pytest.raises(Exception, match="401"):
        client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))
    client.close()


def test_a_failed_submit_says_why_and_keeps_the_connection_that_works(link, tiny_prep, tmp_path):
    """`flwr run` says only "Connection to the SuperLink is unavailable"; a probe of our own names the cause.
    The operator's working connection (which `flwr log` of a running run reads) is left as it was."""
    home = tmp_path / "home"
    shutil.copytree(link.home, home)
    files = lambda: {p.relative_to(home): p.read_bytes() for p in home.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    other = tmp_path / "other-certs"
    make_certs(other, nodes=1)
    cfg = tiny_cfg(tiny_prep)
    with pytest.raises(UserError, match="unavailable.*certificate fails the check against .*other-certs"):
        submit.run_to_end(home, link.address, cfg, "never", certs=other, token=read_token(other / OPERATOR_TOKEN))
    with pytest.raises(UserError, match="unavailable.*nothing answers there"):
        submit.run_to_end(home, f"127.0.0.1:{processes.free_port()}", cfg, "never", certs=link.certs,
                          token=read_token(link.certs / OPERATOR_TOKEN))
    assert files() == before
    assert sorted(int(n["node-id"]) for n in submit.list_nodes(home)) == sorted(link.ids)  # it still works


def test_a_run_dir_outside_the_runs_root_is_refused_by_the_server(link, tiny_prep):
    """`photon submit` refuses '..' itself, but a raw `flwr run` skips that: the SuperLink checks every run."""
    cfg = tiny_cfg(tiny_prep)
    for out in (str(link.root / "elsewhere"), "../escape"):
        with pytest.raises(UserError, match="outside this server's runs root"):
            submit.submit_run(link.home, cfg, out)
    assert not (link.root / "elsewhere").exists() and not (link.root / "server" / "escape").exists()


# ---------------------------------------------------------------------------------------------------------
# `photon node`: a mismatch stops it with the reason; killing it kills its SuperNode


def _photon(*args: str) -> list[str]:
    return [sys.executable, "-m", "photon.cli", *args]


def test_an_insecure_node_against_a_tls_server_stops_with_the_reason(link, tmp_path):
    res = subprocess.run(_photon("node", "--superlink", link.address, "--insecure", "--port",
                                 str(processes.free_port()), "--state", str(tmp_path / "node")),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    error = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "speaks TLS" in error[0] and "--insecure" in error[0], res.stderr
    assert "Traceback" not in res.stderr


def test_killing_photon_node_kills_its_supernode_and_frees_the_key(link, procs, tmp_path):
    """SIGKILL leaves `photon node` no chance to stop its child: Linux's parent-death signal does. The SuperNode
    then leaves the SuperLink cleanly, so the same key connects again at once; while it ran, a second node with
    its key was refused with the real reason instead of the SuperLink's "is the key registered?"."""
    key = link.certs / "node-1.key"
    log = tmp_path / "node" / "supernode.log"
    wrapper = subprocess.Popen(_photon("node", "--superlink", link.address, "--certs", str(link.certs), "--key",
                                       str(key), "--port", str(processes.free_port()),
                                       "--state", str(tmp_path / "node")),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    procs.append(wrapper)
    end = time.monotonic() + 60
    while "SuperNode ID:" not in (log.read_text(errors="replace") if log.exists() else ""):
        assert wrapper.poll() is None and time.monotonic() < end, log.read_text() if log.exists() else "no log"
        time.sleep(0.2)
    below = processes.descendants(wrapper.pid)
    assert below
    with pytest.raises(UserError, match=rf"a running `photon node` \(pid {wrapper.pid}\) uses the key .*one node per "
                                        "key"):
        supernode.start_supernode(link.address, processes.free_port(), tmp_path / "second", certs=link.certs, key=key)
    wrapper.kill()
    wrapper.wait()
    end = time.monotonic() + 15
    while any(Path(f"/proc/{pid}").exists() and not processes._zombie(pid) for pid in below):
        assert time.monotonic() < end, "the SuperNode outlived photon node"
        time.sleep(0.2)
    again, again_log = _node(link, "again", key, link.certs, procs)
    supernode.wait_connected(again, again_log, link.address, certs=link.certs)


def _wait_online(link, n, timeout=60.0):
    end = time.monotonic() + timeout
    while sum(node["status"] == "online" for node in submit.list_nodes(link.home)) < n:
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
    group = [victim.pid, *processes.descendants(victim.pid)]
    assert len(group) >= 2  # the SuperNode and its ClientApp runtime
    # long enough that the kill lands mid-task; round 2 runs both clients on one node
    cfg = tiny_cfg(tiny_prep, "federation.rounds=2", "data.partition.num_clients=2", "federation.clients_per_round=2",
                   "federation.local_steps=100", "train.threads=1")
    run_dir = link.runs / "run-kill"
    start = time.monotonic()
    run_id = submit.submit_run(link.home, cfg, "run-kill")
    while "Received successfully" not in victim_log.read_text(errors="replace"):
        assert victim.poll() is None and time.monotonic() - start < 60, victim_log.read_text()[-2000:]
        time.sleep(0.1)
    time.sleep(0.5)  # the runtime has the task: it is pulling or training
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    killed = time.monotonic()
    status = submit.wait_run(link.home, run_id, poll_s=1.0, timeout_s=240)
    assert status["status"] == "finished:completed", (link.root / "superlink.log").read_text()[-3000:]
    rounds = [r for r in read_metrics(run_dir) if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["failed"] >= 1 and rounds[0]["ok"] == 2, rounds[0]
    assert rounds[1]["ok"] == 2, rounds[1]
    assert (run_dir / "checkpoints" / "round_000002").is_dir()
    assert all(not Path(f"/proc/{pid}").exists() or processes._zombie(pid) for pid in group)  # the runtime died too
    print(f"kill at {killed - start:.1f} s; round 1 wall {rounds[0]['wall_seconds']:.1f} s; run elapsed "
          f"{status['elapsed']:.1f} s")


def test_async_rounds_on_the_deployed_runtime_with_one_slowed_node(link, procs, tiny_prep):
    """federation.mode=async on real SuperNodes: node 0 takes 4× as long per task; the fast node keeps
    training while the slow one works, so the slow node's updates come back stale and are still folded."""
    from photon.launch import processes, supernode

    for i, slow in ((0, 4.0), (1, 1.0)):
        p = supernode.start_supernode(link.address, processes.free_port(), link.root / f"anode-{i}", data=tiny_prep,
                                      certs=link.certs, key=link.certs / f"node-{i}.key",
                                      log_file=link.root / f"anode-{i}.log", warm=True, slowdown=slow)
        procs.append(p)
    _wait_online(link, 2)
    cfg = tiny_cfg(tiny_prep, "federation.rounds=4", "data.partition.num_clients=3", "federation.clients_per_round=2",
                   "federation.mode=async", "federation.asynchronous.quorum=1", "federation.local_steps=30",
                   "train.threads=1", "train.warmup_steps=4")
    run_id = submit.submit_run(link.home, cfg, "run-async")
    status = submit.wait_run(link.home, run_id, poll_s=1.0, timeout_s=300)
    assert status["status"] == "finished:completed", (link.root / "superlink.log").read_text()[-3000:]
    rounds = [r for r in read_metrics(link.runs / "run-async") if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert max(s for r in rounds for s in r["folded"].values()) >= 1, [r["folded"] for r in rounds]


def test_a_user_mistake_in_the_deployed_serverapp_is_one_line(link, tiny_prep, tmp_path):
    cfg = tiny_cfg(tmp_path / "no-such-data", "federation.rounds=1", "train.warmup_steps=4")
    run_id = submit.submit_run(link.home, cfg, "run-mistake")
    status = submit.wait_run(link.home, run_id, poll_s=1.0, timeout_s=120)
    assert status["status"] != "finished:completed"
    text = submit.flwr(link.home, "log", str(run_id), submit.CONNECTION, "--show").stdout
    assert "error:" in text and "no prepared data" in text, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    errors: list[str] = []  # what photon submit's last line then says
    submit.copy_lines(io.BytesIO(text.encode()), io.StringIO(), plain=True, errors=errors)
    assert errors and "no prepared data" in errors[-1], text[-2000:]


def test_compressed_updates_shrink_the_bytes_on_the_wire(link, procs, tiny_prep):
    """The same run with fp32 and with int8 up-link updates; the SuperLink counts the bytes each run moved
    (Flower's own `network-traffic`): replies shrink by the codec's ratio, plus a per-message record overhead
    that is measured here, not assumed."""
    from photon.federation.codec import CodecSpec, layout_of
    from photon.model.transformer import Transformer, unique_state_dict

    for i in range(2):
        _node(link, f"w{i}", link.certs / f"node-{i}.key", link.certs, procs, data=tiny_prep, warm=True)
    _wait_online(link, 2)
    inbound, payload = {}, {}
    for codec in ("fp32", "int8"):
        cfg = tiny_cfg(tiny_prep, "federation.rounds=2", "data.partition.num_clients=2", "train.threads=1",
                       "train.warmup_steps=4", "federation.state_backup=false",
                       f"federation.compression.up.codec={codec}")
        run_id = submit.submit_run(link.home, cfg, f"run-wire-{codec}")
        status = submit.wait_run(link.home, run_id, poll_s=1.0, timeout_s=300)
        assert status["status"] == "finished:completed"
        inbound[codec] = status["network-traffic"]["inbound-bytes"]
        rounds = [r for r in read_metrics(link.runs / f"run-wire-{codec}") if r["kind"] == "round"]
        payload[codec] = sum(r["bytes_up"] for r in rounds)
    layout = layout_of(unique_state_dict(Transformer(tiny_cfg(tiny_prep).model)))
    ratio = encoded_size(layout, CodecSpec("fp32")) / encoded_size(layout, CodecSpec("int8"))
    assert payload["fp32"] / payload["int8"] == pytest.approx(ratio)  # what photon counts is what it encoded
    overhead = {c: inbound[c] - payload[c] for c in inbound}  # records, headers, HTTP framing, heartbeats
    print(f"inbound bytes fp32 {inbound['fp32']}, int8 {inbound['int8']}; update payloads {payload}; overhead "
          f"{overhead}; wire ratio {inbound['fp32'] / inbound['int8']:.2f} vs codec ratio {ratio:.2f}")
    assert abs(overhead["fp32"] - overhead["int8"]) < 0.05 * payload["fp32"]  # the overhead does not scale
    assert inbound["fp32"] / inbound["int8"] == pytest.approx(ratio, rel=0.1)  # the wire shrinks as the codec


def test_large_payloads_travel_by_the_blob_side_channel(link, procs, tiny_prep):
    """A model over the blob threshold goes down, and its updates come up, over `photon server`'s blob channel
    (TLS, capabilities in the message); Flower's own traffic stays at the size of the references."""
    for i in range(2):
        _node(link, f"b{i}", link.certs / f"node-{i}.key", link.certs, procs, data=tiny_prep, warm=True)
    _wait_online(link, 2)
    cfg = tiny_cfg(tiny_prep, "federation.rounds=2", "data.partition.num_clients=2", "train.threads=1",
                   "train.warmup_steps=4", "model.d_model=160", "model.n_head=4")  # ≈2 MB of fp32 parameters
    run_id = submit.submit_run(link.home, cfg, "run-blobs")
    status = submit.wait_run(link.home, run_id, poll_s=1.0, timeout_s=300)
    assert status["status"] == "finished:completed", (link.root / "superlink.log").read_text()[-3000:]
    rounds = [r for r in read_metrics(link.runs / "run-blobs") if r["kind"] == "round"]
    moved = sum(r["bytes_up"] + r["bytes_down"] for r in rounds)
    assert moved > 8e6 and status["network-traffic"]["total-bytes"] < 0.1 * moved, (moved, status["network-traffic"])
    logs = "".join((link.root / f"node-b{i}.log").read_text(errors="replace") for i in range(2))
    assert "fetched model blob" in logs and "uploaded reply blob" in logs


def test_a_port_that_cannot_be_listened_on_says_why(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is in use.*with --blob-port"):
            processes.check_port_free("127.0.0.1", port, "--blob-port")
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is in use"):  # before --state is made
            superlink.start_superlink(port, tmp_path / "state", insecure=True, log_file=tmp_path / "superlink.log")
        assert not (tmp_path / "state").exists()
    with pytest.raises(UserError, match="not an address or a name"):
        processes.check_port_free("not a host", port)
    with pytest.raises(UserError, match="not an address of this machine"):
        processes.check_port_free("192.0.2.1", port)  # TEST-NET-1: never this machine's


def test_a_server_with_a_mistyped_certs_folder_writes_nothing_into_it(tmp_path):
    with pytest.raises(UserError, match="lacks ca.crt"):
        superlink.start_superlink(processes.free_port(), tmp_path / "state", certs=tmp_path / "certz")
    assert not (tmp_path / "certz").exists()


def test_a_node_or_server_that_stops_by_itself_is_an_error_with_the_reason(tmp_path):
    """Even with exit code 0 (Flower's SuperNode ends so when the SuperLink has forgotten it): it should run
    until stopped, and a service manager restarts only a failure."""
    from photon.cli.deploy import _wait_foreground

    log = tmp_path / "supernode.log"
    log.write_text("INFO :      SuperNode ID: 7\nTraceback (most recent call last):\n  ...\n"
                   "httpx.HTTPStatusError: Client error '401 Unauthorized' for url "
                   "'https://127.0.0.1:9092/v1/fleet/send-node-heartbeat'\n")
    with pytest.raises(UserError, match=r"stopped by itself \(exit code 0\): .*401 Unauthorized.*does not know "
                                        r"this node any more"):
        _wait_foreground(subprocess.Popen(["true"]), "flower-supernode", log)
    with pytest.raises(UserError, match=r"flower-superlink stopped by itself") as e:  # a node's 401 is not its
        _wait_foreground(subprocess.Popen(["true"]), "flower-superlink", log)
    assert "does not know this node" not in str(e.value)

    # the log is appended across starts: an earlier start's error is not this one's reason, and the 401 is
    # followed by the SuperNode's own exit lines
    log.write_text("ERROR :     An unhandled exception occurred in a task process.\n")
    since = log.stat().st_size
    with log.open("a") as f:
        f.write("INFO :      Starting Flower SuperNode\nhttpx.HTTPStatusError: Client error '401 Unauthorized' for "
                "url 'https://127.0.0.1:9092/v1/fleet/send-node-heartbeat'\nINFO :      SuperExec terminated "
                "gracefully.\n")
    with pytest.raises(UserError, match=r"401 Unauthorized.*does not know this node any more") as e:
        _wait_foreground(subprocess.Popen(["true"]), "flower-supernode", log, since)
    assert "task process" not in str(e.value)
    log.write_text(log.read_text().replace("'401 Unauthorized'", "'500'"))
    with pytest.raises(UserError) as e:  # nothing of this start's: its last line, not the earlier start's ERROR
        _wait_foreground(subprocess.Popen(["true"]), "flower-supernode", log, since)
    assert "task process" not in str(e.value) and "terminated gracefully" in str(e.value)


def test_a_key_in_use_names_the_photon_node_using_it_or_the_orphan(tmp_path):
    key = tmp_path / "node-0.key"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", "--auth-supernode-private-key", str(key)]
    starter = ("import json, os, subprocess, time; p = subprocess.Popen(json.loads(os.environ['CHILD'])); "
               "print(p.pid, flush=True); time.sleep(60)")
    node = subprocess.Popen([sys.executable, "-c", starter, "photon", "node"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "CHILD": json.dumps(sleeper)})  # `photon node`, its SuperNode a child
    child = int(node.stdout.readline())
    # Popen returns once the child has begun its exec, but the kernel sets up its command line a moment later
    # (on a busy machine, visibly later): wait until /proc shows the key, as a real SuperNode's would by then
    end = time.monotonic() + 30
    while str(key).encode() not in Path(f"/proc/{child}/cmdline").read_bytes():
        assert time.monotonic() < end, "the child's command line never showed the key"
        time.sleep(0.05)
    try:
        with pytest.raises(UserError, match=rf"a running `photon node` \(pid {node.pid}\) uses the key"):
            supernode.check_key_unused(key)
    finally:
        node.kill()
        node.wait()
    try:  # its SuperNode outlived it (a SIGKILLed `photon node` before the parent-death signal): an orphan
        with pytest.raises(UserError, match=rf"pid {child}, perhaps left by a killed `photon node`"):
            supernode.check_key_unused(key)
    finally:
        os.kill(child, signal.SIGKILL)
