"""A site's side of a deployment: the SuperNode that `photon node` starts, and its first connection.

Flower's `flower-supernode` does the networking; this module writes its inputs, starts it with Flower's
environment and, since Flower retries a wrong server forever without a reason, finds and says the reason.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from photon.errors import UserError
from photon.launch.processes import (
    _need_files,
    _read_from,
    check_address,
    check_port_free,
    executable,
    explain_exit,
    spawn,
    stop,
    tls_args,
)

log = logging.getLogger(__name__)




def start_supernode(superlink: str, port: int, state: Path, data: Path | None = None,
                    certs: Path | None = None, key: Path | None = None, insecure: bool = False,
                    log_file: Path | None = None, warm: bool = False, slowdown: float = 1.0,
                    procs: int | None = None, lean: bool = False) -> subprocess.Popen:
    """Start a SuperNode connected to `superlink` (HOST:PORT). `port` is its local Runtime API for ClientApps
    (127.0.0.1 only), distinct per node on one host. The ClientApp reads `data-dir` and `state-dir`, and
    `slowdown` (a drill knob: this node takes `slowdown`× as long per task, like older hardware), and `procs`
    (processes, one per GPU, that train each client together, see `train/distributed.py`; None: the run's
    `federation.procs_per_node`), and `lean` (train with less memory for more compute, `local.lean_config`).

    Default: plain `flower-supernode`, a new ClientApp process per message. `warm` (opt-in, experimental):
    `--isolation process` with photon's long-lived ClientApp runtime beside it (see "A warm node" below)."""
    certs, insecure = tls_args(certs, insecure, "photon node")
    check_address(superlink)
    state = Path(state).resolve()
    node_config = f'state-dir="{state / "worker"}"'
    if data is not None:
        if not (Path(data) / "manifest.json").exists():
            raise UserError(f"--data {data} is not prepared data (no manifest.json); run `photon prepare --out "
                            f"{data}` with the run's preset first")
        node_config += f' data-dir="{Path(data).resolve()}"'
    if slowdown != 1.0:
        node_config += f" slowdown={float(slowdown)}"
    if procs is not None:
        node_config += f" procs={int(procs)}"
    if lean:
        if procs is not None and procs > 1:
            raise UserError("--lean steps each parameter inside backward, in one process per client, not "
                            f"--procs {procs}: use one of the two")
        node_config += " lean=1"
    # The blob side channel: reached at the SuperLink's host; its TLS is checked against our CA.
    node_config += f' superlink-host="{superlink.rpartition(":")[0]}"'
    if not insecure:
        node_config += f' blob-ca="{(Path(certs) / "ca.crt").resolve()}"'
    args = ([sys.executable, "-m", "photon.launch.warm_node", "supernode", "--isolation", "process"] if warm
            else [executable("flower-supernode")])
    args += ["--superlink", superlink, "--host", "127.0.0.1", "--port", str(port), "--node-config", node_config]
    if insecure:
        args.append("--insecure")
    else:
        (ca,) = _need_files(certs, ("ca.crt",), "photon node")
        if key is None:
            raise UserError("photon node: --key NODE.key is required with --certs (the node's private key, "
                            "registered with the server)")
        key = Path(key) if Path(key).is_absolute() or Path(key).exists() else certs / key
        if not key.is_file():
            raise UserError(f"--key {key}: no such file; copy node-<i>.key from the server's certs dir")
        key = key.resolve()
        check_key_unused(key)
        args += ["--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]
    check_port_free("127.0.0.1", port, "--port")
    return spawn(args, state / "flwr", log_file)


def check_key_unused(key: Path) -> None:
    """Refuse to start a second node with a key a running SuperNode on this machine uses: the SuperLink admits
    one connection per key, and would refuse the new one as if the key were not registered."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a == "--auth-supernode-private-key" and b == str(key) for a, b in zip(argv, argv[1:])):
            pid, owner = cmdline.parent.name, _photon_node_parent(cmdline.parent)
            if owner is not None:
                raise UserError(f"a running `photon node` (pid {owner}) uses the key {key}; the server admits one "
                                "node per key: give this node another --key, or stop that one first")
            raise UserError(f"a node with the key {key} still runs on this machine (pid {pid}, perhaps left by a "
                            f"killed `photon node`); the server admits one node per key: stop it (kill {pid}) "
                            "and start this one again")


def _photon_node_parent(proc_dir: Path) -> str | None:
    """The pid of the `photon node` that started the SuperNode in /proc/PID, if its parent is one."""
    try:
        ppid = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1]
        argv = (Path("/proc") / ppid / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except (OSError, IndexError):
        return None
    is_photon = any(Path(a).name == "photon" or a == "photon.cli" for a in argv)
    return ppid if is_photon and "node" in argv else None


# ---------------------------------------------------------------------------------------------------------
# A node's first connection: Flower's SuperNode retries an unreachable or mismatched server forever with
# "Connection attempt failed" and no reason. `photon node` watches its log until it has a node id, probes the
# server itself when attempts fail, and stops the node with the reason.

CONNECTED = "SuperNode ID:"  # Flower's line once the SuperLink has activated the node
FAILED_ATTEMPT = "Connection attempt failed"


def wait_connected(proc: subprocess.Popen, log_file: Path, superlink: str, certs: Path | None = None,
                   insecure: bool = False, since: int = 0, timeout: float = 20.0) -> None:
    """Return once the node in `proc` is connected (its log past byte `since` shows its node id). A node that
    exits is explained from its log; one whose attempts fail is stopped at once when a probe of `superlink`
    shows a mismatch (TLS vs --insecure, an untrusted certificate), else after `timeout` s. Raises UserError."""
    start = time.monotonic()
    ca = None if certs is None else Path(certs) / "ca.crt"
    probes = 0
    while True:
        if proc.poll() is not None:
            why = explain_exit(log_file, since=since)
            raise UserError(f"flower-supernode exited with code {proc.returncode}: {why} "
                            f"(log: {log_file})")
        text = _read_from(log_file, since)
        if CONNECTED in text:
            return
        if FAILED_ATTEMPT in text:
            mismatch, reason = probe_superlink(superlink, ca, insecure, identify=probes == 0)
            probes += 1
            if mismatch or time.monotonic() - start > timeout:
                stop(proc)
                raise UserError(f"the node cannot connect to {superlink}: {reason} (log: {log_file})")
            time.sleep(1.0)
        time.sleep(0.25)




def probe_superlink(superlink: str, ca: Path | None, insecure: bool, timeout: float = 3.0,
                    node: bool = True, identify: bool = True) -> tuple[bool, str]:
    """Why a node's (or, `node=False`, `photon submit`'s) connections to `superlink` fail, from a TCP connect
    and a TLS handshake of our own: (True, reason) for a sure mismatch, (False, best guess) otherwise. With
    `identify`, one line is also sent to recognise photon server's blob side channel (a SuperLink logs it as an
    invalid request: a caller that probes again and again asks once). All of it within about `timeout` s."""
    who = "this node" if node else "photon submit"
    host, _, port = superlink.rpartition(":")
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(0.05, deadline - time.monotonic())

    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as e:
        return False, (f"nothing answers there ({e.strerror or e}): is `photon server` running on that machine, "
                       "with this --port, and does the firewall let the port through?")
    unlike = "it answers, but not as a photon server does: is this the port of `photon server`?"
    with sock:
        ctx = ssl.create_default_context(cafile=None if insecure else str(ca))
        if insecure:
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            sock.settimeout(left())
            tls = ctx.wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as e:
            return True, (f"the server's certificate fails the check against {ca} ({e.verify_message}): copy the "
                          "server's ca.crt, and use an address that `photon certs --host` named")
        except TimeoutError:  # silent: a blob side channel or a SuperLink answers a handshake at once
            return False, unlike
        except (ssl.SSLError, OSError):  # no TLS there: an --insecure server, its blob side channel, or else
            if identify and _blob_channel_at(host, int(port), left()):
                return True, BLOB_PORT_GIVEN
            if insecure:
                return False, unlike
            return True, (f"the server does not speak TLS: it was started with --insecure (start {who} with "
                          "--insecure too), or this is not the port of `photon server`")
        with tls:
            tls.settimeout(left())
            if identify and _answers_as_blob_channel(tls):
                return True, BLOB_PORT_GIVEN
    if insecure:
        return True, (f"the server speaks TLS but {who} was started with --insecure; pass --certs DIR"
                      + (" --key node-<i>.key" if node else " (the folder with the server's ca.crt)") + " instead")
    return False, "TLS works, but Flower's connection keeps failing" + (": see the node's log" if node else "")


BLOB_PORT_GIVEN = ("this is photon server's blob side channel, not its SuperLink: give --superlink the port "
                   "`photon server` printed for the SuperLink (its --port; the side channel is --port + 1 unless "
                   "the server was given --blob-port)")


def _answers_as_blob_channel(sock: socket.socket) -> bool:
    """`sock` reaches photon server's blob side channel, which answers a line of JSON with one (a SuperLink's
    HTTP server answers it with `400 Bad Request`)."""
    try:
        sock.sendall(b'{"op": "probe", "from": "photon node or submit"}\n')
        return json.loads(sock.recv(512).decode()).get("ok") is False
    except (OSError, ValueError, AttributeError):
        return False


def _blob_channel_at(host: str, port: int, timeout: float) -> bool:
    """A plain-TCP blob side channel listens at host:port (an --insecure server's)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            return _answers_as_blob_channel(sock)
    except OSError:
        return False


