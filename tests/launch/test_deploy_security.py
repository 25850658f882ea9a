"""The deployment's guards without a SuperLink: run directories confined to the runs root, the operator token
(made private, checked in constant time, stored where the `flwr` CLI sends it), a node's mismatch named from a
probe of the server, children that die with their parent, no colour codes in piped output, certs/ kept out of git.
The same guards on a live SuperLink: tests/test_deploy.py."""

import io
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from photon.errors import UserError
from photon.launch import processes, submit, superlink, supernode
from photon.launch.certs import OPERATOR_TOKEN, make_certs, read_token

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------------
# Run directories


def test_run_dirs_stay_under_the_runs_root(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    assert superlink.confine_run_dir(root, "small-deployed") == root.resolve() / "small-deployed"
    assert superlink.confine_run_dir(root, "a/../b") == root.resolve() / "b"
    assert superlink.confine_run_dir(root, str(root / "x" / "y")) == root.resolve() / "x" / "y"
    (root / "link").symlink_to(tmp_path)  # a symlink inside the root that leads out of it
    for out in ("../x", "a/../../x", str(tmp_path / "x"), "/etc/cron.d/x", "", ".", "link/x"):
        with pytest.raises(UserError, match="outside this server's runs root"):
            superlink.confine_run_dir(root, out)


def test_submit_refuses_an_out_that_leaves_the_runs_root_before_sending_anything():
    for out in ("..", "../x", "a/../../x", "", "."):
        with pytest.raises(UserError, match="inside the server's runs root"):
            submit.check_out(out)
    submit.check_out("small-deployed")
    submit.check_out("/an/absolute/path")  # only the server knows its root: it decides


# ---------------------------------------------------------------------------------------------------------
# The operator token


def test_the_operator_token_is_private_random_and_checked(tmp_path):
    make_certs(tmp_path / "a", nodes=0)
    make_certs(tmp_path / "b", nodes=0)
    token = read_token(tmp_path / "a" / OPERATOR_TOKEN)
    assert len(token) == 64 and token != read_token(tmp_path / "b" / OPERATOR_TOKEN)
    assert (tmp_path / "a" / OPERATOR_TOKEN).stat().st_mode & 0o077 == 0
    with pytest.raises(UserError, match="not an operator token"):
        read_token(tmp_path / "a" / "ca.crt")
    with pytest.raises(UserError, match="cannot read the operator token"):
        read_token(tmp_path / "missing.token")
    made = superlink.operator_token_file(tmp_path / "state", None)  # --insecure: made in the state dir on first start
    assert made == tmp_path / "state" / OPERATOR_TOKEN and read_token(made)
    assert superlink.operator_token_file(tmp_path / "state", None) == made and read_token(made) == read_token(made)


def test_the_superlink_admits_only_the_operator_token():
    from flwr.common.constant import ACCESS_TOKEN_KEY

    authn = superlink.operator_authn("a" * 64)
    ok, account = authn.validate_tokens_in_metadata([(ACCESS_TOKEN_KEY, "a" * 64)])
    assert ok and account is not None
    for metadata in ([], [(ACCESS_TOKEN_KEY, "b" * 64)], [(ACCESS_TOKEN_KEY, "a" * 63)], [("other", "a" * 64)]):
        assert authn.validate_tokens_in_metadata(metadata) == (False, None)
    assert authn.refresh_tokens([])[1] is None


def test_the_token_is_stored_where_the_flwr_cli_sends_it_from(tmp_path):
    from flwr.cli.constant import ACCESS_TOKEN_STORE_KEY, AUTHN_TYPE_STORE_KEY
    from flwr.supercore.credential_store.file_credential_store import (
        FileCredentialStore,
    )

    make_certs(tmp_path / "certs", nodes=0)
    submit.write_connection(tmp_path / "home", "10.0.0.5:9092", certs=tmp_path / "certs", token="t0ken")
    store = FileCredentialStore(tmp_path / "home" / "credentials.yaml")
    assert store.get(AUTHN_TYPE_STORE_KEY % "10.0.0.5:9092") == b"oidc"
    assert store.get(ACCESS_TOKEN_STORE_KEY % "10.0.0.5:9092") == b"t0ken"
    assert (tmp_path / "home" / "credentials.yaml").stat().st_mode & 0o077 == 0


def test_certs_and_tokens_are_ignored_by_git():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("certs/ca.key", "certs/operator.token", "deploy/certs/node-0.key", ".photon/server/superlink.db"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path


# ---------------------------------------------------------------------------------------------------------
# A node's connection: what a probe of the server tells


def _serve(tls: ssl.SSLContext | None) -> tuple[str, threading.Event]:
    """A listener on a free port that accepts connections (and TLS handshakes with `tls`), until the event."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    done = threading.Event()

    def loop():
        with srv:
            while not done.is_set():
                try:
                    conn, _ = srv.accept()
                except socket.timeout:
                    continue
                try:
                    if tls is not None:
                        conn.settimeout(2)
                        conn = tls.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    pass
                conn.close()

    threading.Thread(target=loop, daemon=True).start()
    return f"127.0.0.1:{srv.getsockname()[1]}", done


def test_a_probe_names_the_mismatch(tmp_path):
    certs, other = tmp_path / "certs", tmp_path / "other"
    make_certs(certs, nodes=0)
    make_certs(other, nodes=0)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(certs / "server.pem", certs / "server.key")
    tls_address, tls_done = _serve(tls)
    plain_address, plain_done = _serve(None)
    try:
        assert supernode.probe_superlink(tls_address, None, insecure=True)[0]
        assert "speaks TLS" in supernode.probe_superlink(tls_address, None, insecure=True)[1]
        sure, reason = supernode.probe_superlink(tls_address, other / "ca.crt", insecure=False)
        assert sure and "certificate" in reason
        sure, reason = supernode.probe_superlink(plain_address, certs / "ca.crt", insecure=False)
        assert sure and "does not speak TLS" in reason
        assert not supernode.probe_superlink(tls_address, certs / "ca.crt", insecure=False)[0]  # all is well
    finally:
        tls_done.set()
        plain_done.set()
    sure, reason = supernode.probe_superlink(f"127.0.0.1:{processes.free_port()}", None, insecure=True)
    assert not sure and "nothing answers" in reason  # the server may still be starting: not sure, wait


def test_a_tls_node_against_an_insecure_server_is_explained(tmp_path):
    log = tmp_path / "supernode.log"
    log.write_text("\x1b[91mERROR \x1b[0m:     Exit Code: 305\nFailed to initialize the connection to the "
                   "SuperLink.\n[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)\n")
    assert "does not speak TLS" in processes.explain_exit(log)
    log.write_text("ERROR :     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
                   "[code: 2004] Failed to activate SuperNode.\n")
    reason = processes.explain_exit(log)
    assert "registered" in reason and "same key" in reason


# ---------------------------------------------------------------------------------------------------------
# Processes and output


def test_a_child_dies_with_its_parent_even_on_sigkill(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from photon.launch import processes\n"
        f"child = processes.spawn(['sleep', '60'], {str(tmp_path)!r})\n"
        "print(child.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert parent.wait(timeout=30) == -signal.SIGKILL
    end = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and not processes._zombie(child):
        assert time.monotonic() < end, "the child outlived its SIGKILLed parent"
        time.sleep(0.1)


def test_piped_output_has_no_colour_codes():
    src = io.BytesIO(b"\x1b[92mINFO \x1b[0m:      round 1\nplain\n")
    out = io.StringIO()
    submit.copy_lines(src, out, plain=True)
    assert out.getvalue() == "INFO :      round 1\nplain\n"
    src.seek(0)
    out = io.StringIO()
    submit.copy_lines(src, out, plain=False)  # a terminal keeps its colours
    assert "\x1b[92m" in out.getvalue()


def test_the_serverapps_own_error_line_is_kept_for_the_submits_last_line():
    log = (b"\x1b[91mERROR \x1b[0m:     Exit Code: 300\nerror: runs/x already holds a run; pass --resume\n"
           b"Exit due to an exception ...\nINFO : grpc error: not ours\n")
    errors: list[str] = []
    submit.copy_lines(io.BytesIO(log), io.StringIO(), plain=True, errors=errors)
    assert errors == ["runs/x already holds a run; pass --resume"]


def test_our_processes_take_no_secret_on_their_command_line(tmp_path, monkeypatch):
    """The operator token, the SuperExec secret and the blob secret reach the SuperLink as file paths; the files
    are private."""
    make_certs(tmp_path / "certs", nodes=0)
    seen = {}

    def fake_spawn(args, home, log_file=None, pipe=False, env=None):
        seen["args"], seen["env"] = args, env or {}
        raise UserError("stop here")

    token = read_token(tmp_path / "certs" / OPERATOR_TOKEN)
    monkeypatch.setattr(superlink, "spawn", fake_spawn)
    with pytest.raises(UserError, match="stop here"):
        superlink.start_superlink(processes.free_port(), tmp_path / "state", certs=tmp_path / "certs")
    secret = (tmp_path / "state" / "superexec.secret").read_bytes()
    blob_secret = (tmp_path / "state" / "blobs.secret").read_bytes().decode()
    exposed = " ".join(seen["args"]) + " ".join(seen["env"].values())
    assert token not in exposed and secret.hex() not in exposed and blob_secret not in exposed
    for name in ("superexec.secret", "blobs.secret"):
        assert (tmp_path / "state" / name).stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("host", ["server.example.org:9092", "https://server.example.org", "bad host!"])
def test_a_certificate_host_must_be_a_name_or_an_address(tmp_path, host):
    from photon.launch.certs import make_certs

    with pytest.raises(UserError, match="not a host name or IP address"):
        make_certs(tmp_path / "certs", hosts=(host, "127.0.0.1"))
    assert not (tmp_path / "certs").exists()


def test_a_probe_of_the_blob_side_channel_port_says_so(tmp_path):
    """`--superlink` given the blob side channel's port (photon server's --port + 1): the probe recognises it,
    over TLS and plain, whichever TLS choice the node made, and says which port to use."""
    import threading

    from photon.transport.blobs import BlobServer

    certs = tmp_path / "certs"
    make_certs(certs, nodes=0)
    for tls in (True, False):
        port = processes.free_port()
        srv = BlobServer(tmp_path / f"blobs{tls}", b"s" * 32, "127.0.0.1", port,
                         certs / "server.pem" if tls else None, certs / "server.key" if tls else None)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            for insecure in (False, True):  # the node's TLS choice right for the server, or not
                sure, reason = supernode.probe_superlink(f"127.0.0.1:{port}", certs / "ca.crt", insecure=insecure)
                assert sure and "blob side channel, not its SuperLink" in reason, (tls, insecure, reason)
            sure, reason = supernode.probe_superlink(f"127.0.0.1:{port}", certs / "ca.crt", insecure=not tls,
                                                     identify=False)  # asked once by a caller that probes again
            assert "blob side channel" not in reason
        finally:
            srv.shutdown()
            srv.server_close()


def test_a_probe_of_a_silent_listener_keeps_to_its_timeout(tmp_path):
    """A listener that accepts and never speaks: the probe (handshake, then the side channel's question)
    ends within about its timeout, not one timeout per step."""
    make_certs(tmp_path, nodes=0)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        for insecure in (True, False):
            started = time.monotonic()
            sure, reason = supernode.probe_superlink(address, tmp_path / "ca.crt", insecure=insecure, timeout=1.0)
            assert not sure and "not as a photon server does" in reason
            assert time.monotonic() - started < 2.0
    finally:
        listener.close()
