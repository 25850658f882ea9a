"""The deployment runtime across machines: certificates, a SuperLink, SuperNodes and runs submitted to them.

Flower's own programs (`flower-superlink`, `flower-supernode`, `flwr`) do all the networking; this module
writes their inputs (certificates, the connection in `$FLWR_HOME/config.toml`, the app bundle), starts them
with Flower's environment, watches them and stops what it started. No training logic lives here.

Flower 1.41 serves nodes, the Control API (`flwr run`, `flwr supernode register`) and the Runtime API (its
own ServerApps) on one port, and leaves the last two open to anyone who trusts the server's certificate.
`photon server` therefore runs the SuperLink through `python -m photon.federation.deploy superlink`, which
admits Control API calls only with the operator token and ServerApp tasks only to the SuperExec holding
the SuperLink's secret, and confines run directories to the server's runs root ("The guarded SuperLink"
below; docs/DEPLOY.md, "Who can do what").
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

import tomli
import tomli_w

from photon.config import RunConfig, config_to_dict
from photon.errors import UserError
from photon.federation.certs import OPERATOR_TOKEN, make_token, read_token, write_private
from photon.federation.launch import flower_env

log = logging.getLogger(__name__)

SERVER_FILES = ("ca.crt", "server.pem", "server.key")
CONNECTION = "photon"  # the [superlink.<name>] table we write into $FLWR_HOME/config.toml
FINAL = ("finished:completed", "finished:failed", "finished:stopped")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colour codes Flower's loggers write whether or not to a terminal

def _need_files(certs: Path | None, names: tuple[str, ...], what: str) -> list[Path]:
    paths = [Path(certs) / n for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{certs} lacks {', '.join(missing)} needed by {what}; make them with "
                        f"`photon certs --out {certs}` (on the server) and copy them here")
    return paths


# ---------------------------------------------------------------------------------------------------------
# Processes: every child gets Flower's environment and its own process group, so stopping it stops the
# ServerApp/ClientApp processes it spawned too.


def executable(name: str) -> str:
    """Flower's executables, preferring the ones beside this Python (the same virtualenv)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise UserError(f"`{name}` not found beside {sys.executable} or on PATH; install photon's dependencies "
                        "(pip install -e .) in this environment")
    return found


def child_env(home: Path) -> dict[str, str]:
    """Flower's variables, and our virtualenv first on PATH: the SuperLink and SuperNode start
    `flower-superexec`, `flwr-serverapp` and `flwr-clientapp` by name."""
    Path(home).mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, **flower_env(Path(home).resolve()), "PATH": path}


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Refuse, in one line, a `host:port` this machine cannot listen on, saying why: the port is taken (pick
    another with `flag`), the host is not one of this machine's addresses, or it is no address at all."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not an address or a name this machine can resolve ({e.strerror}); "
                        "pass one of its addresses, or 0.0.0.0 to listen on all") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is in use; stop what holds it or pick another with "
                                f"{flag}") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"--host {host} is not an address of this machine; pass one of its addresses, "
                                "or 0.0.0.0 to listen on all") from None
            if e.errno == errno.EACCES:
                raise UserError(f"port {port} needs privileges to listen on; pick one above 1023 with "
                                f"{flag}") from None
            raise UserError(f"cannot listen on {host} port {port} ({e.strerror}); check --host and "
                            f"{flag}") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """In a child between fork and exec: ask Linux to SIGTERM it when its parent dies, however the parent dies
    (SIGKILL included), so a killed `photon node` cannot orphan its SuperNode. Survives exec; a no-op where
    prctl is missing. Linux means the parent *thread*: spawn from a thread that lives as long as the child
    (our CLI and tests spawn from the main thread)."""
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def spawn(args: list[str], home: Path, log_file: Path | None = None, pipe: bool = False,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a Flower process in its own session (so Ctrl-C in our terminal reaches us, and we stop it), tied to
    our life by `die_with_parent`; output goes to `log_file` (appended), a pipe, or our terminal."""
    out: IO | int | None = subprocess.PIPE if pipe else None
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        out = open(log_file, "ab")
    log.info("starting %s", " ".join(args))
    try:
        return subprocess.Popen(args, env={**child_env(home), **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT if out else None,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
    finally:
        if log_file is not None:
            out.close()  # type: ignore[union-attr] - the child holds its own descriptor


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), including those in sessions of their own: the SuperLink
    starts `flower-superexec` detached, and that one starts the ServerApp."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group (a SuperLink or SuperNode shuts its apps down), SIGKILL it after `timeout`,
    then SIGKILL any descendant still alive after a grace period (a detached ServerApp would otherwise
    outlive its SuperLink and keep writing to the run directory)."""
    below = descendants(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    end = time.monotonic() + 5.0
    for pid in below:
        while time.monotonic() < end and Path(f"/proc/{pid}").exists() and not _zombie(pid):
            time.sleep(0.1)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _tail(log_file: Path | None, n: int = 15) -> str:
    if log_file is None or not Path(log_file).exists():
        return ""
    lines = Path(log_file).read_text(errors="replace").splitlines()[-n:]
    return "\n" + "\n".join(lines)


def wait_listening(proc: subprocess.Popen, host: str, port: int, what: str, timeout: float = 60.0,
                   log_file: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise UserError(f"{what} exited with code {proc.returncode} before listening on {host}:{port}; "
                            f"see its log{_tail(log_file)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    stop(proc)
    raise UserError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s{_tail(log_file)}")


# ---------------------------------------------------------------------------------------------------------
# SuperLink (server) and SuperNodes (nodes)


def check_address(superlink: str) -> None:
    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--superlink {superlink!r}: expected HOST:PORT, e.g. 10.0.0.5:9092")


def tls_args(certs: Path | None, insecure: bool, what: str) -> tuple[Path | None, bool]:
    if insecure == (certs is not None):
        raise UserError(f"{what}: pass exactly one of --certs DIR (TLS; make it with photon certs) or --insecure "
                        "(no TLS, loopback and tests)")
    return (Path(certs).resolve() if certs else None), insecure


def operator_token_file(state: Path, certs: Path | None) -> Path:
    """Where `photon server` keeps the operator token: beside ca.crt with --certs (`photon certs` made it),
    in --state with --insecure. Made here if missing (a certs dir from before tokens, a first insecure start)."""
    path = (Path(certs) if certs is not None else Path(state)) / OPERATOR_TOKEN
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            make_token(path)
        except OSError as e:
            raise UserError(f"cannot write the operator token {path} ({e.strerror}); make it with `photon certs "
                            f"--out {path.parent}` or give photon server a writable --certs/--state") from None
    return path


def blob_port_of(port: int, blob_port: int | None) -> int:
    """The blob side channel's port for a server on `port`: `--blob-port` if given (0: none), else port + 1."""
    return port + 1 if blob_port is None else blob_port


def start_superlink(port: int, state: Path, certs: Path | None = None, insecure: bool = False,
                    host: str = "127.0.0.1", log_file: Path | None = None,
                    runs: Path | None = None, blob_port: int | None = None) -> subprocess.Popen:
    """Start the guarded SuperLink (TLS + node auth, or --insecure) with its database and FLWR_HOME under
    `state`, and its SuperExec; returns once the port accepts connections. One port serves nodes, the Control
    API and the Runtime API: the Control API admits only the operator token (`operator_token_file`), the
    Runtime API's task queue only our SuperExec (a fresh secret per start), and runs write only under `runs`
    (default `state/runs`). Beside it, on `blob_port` (default port + 1; 0 turns it off), the blob side channel
    (`blobs.py`) that moves large payloads: its capabilities are minted by the ServerApp with a secret that never
    leaves this machine (`state/blobs.secret`); TLS with the server certificate unless --insecure."""
    certs, insecure = tls_args(certs, insecure, "photon server")
    if not insecure:  # before anything is written into --certs (a mistyped one would be made)
        ca, cert, key = _need_files(certs, SERVER_FILES, "photon server")
    blob_port = blob_port_of(port, blob_port)
    check_port_free(host, port, "--port")  # before anything is written into --state
    if blob_port:
        check_port_free(host, blob_port, "--blob-port")
    state = Path(state).resolve()
    runs = Path(runs).resolve() if runs is not None else state / "runs"
    token = operator_token_file(state, certs)
    state.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    secret = state / "superexec.secret"
    write_private(secret, secrets.token_bytes(32))
    args = [sys.executable, "-m", "photon.federation.deploy", "superlink", "--photon-operator-token-file", str(token),
            "--photon-runs", str(runs), "--host", host, "--port", str(port), "--database", str(state / "superlink.db"),
            "--disable-runtime-dependency-installation", "--isolation", "process",
            "--superexec-auth-secret-file", str(secret)]
    if insecure:
        args.append("--insecure")
    else:
        args += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                 "--enable-supernode-auth"]
    env = {}
    if blob_port:
        blob_secret = state / "blobs.secret"
        write_private(blob_secret, secrets.token_hex(32).encode())
        blobs = {"root": str(state / "blobs"), "host": host, "port": blob_port, "secret_file": str(blob_secret)}
        if not insecure:
            blobs.update(cert=str(cert), key=str(key))
        args += ["--photon-blobs", json.dumps(blobs)]
        env["PHOTON_BLOBS"] = json.dumps(blobs)  # the ServerApps (started below it) mint the capabilities
    proc = spawn(args, state / "flwr", log_file, env=env)
    wait_listening(proc, local_address(host), port, "flower-superlink", log_file=log_file)
    if blob_port:
        wait_listening(proc, local_address(host), blob_port, "the blob server", log_file=log_file)
    return proc


def local_address(host: str) -> str:
    """The address this machine reaches a server listening on `host` at."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


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
    args = ([sys.executable, "-m", "photon.federation.warm_node", "supernode", "--isolation", "process"] if warm
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


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


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


# ---------------------------------------------------------------------------------------------------------
# The `flwr` side: a connection in $FLWR_HOME/config.toml, node registration, runs


def write_connection(home: Path, superlink: str, certs: Path | None = None, insecure: bool = False,
                     token: str | None = None, name: str = CONNECTION) -> Path:
    """Add (or replace) `[superlink.<name>]` in `$FLWR_HOME/config.toml` and make it the default; with `token`
    (the operator token), store it where the `flwr` CLI sends it from (`store_token`)."""
    certs, insecure = tls_args(certs, insecure, "the SuperLink connection")
    check_address(superlink)
    path = Path(home) / "config.toml"
    doc = tomli.loads(path.read_text()) if path.exists() else {}
    links = doc.setdefault("superlink", {})
    links["default"] = name
    table: dict[str, object] = {"address": superlink}
    if insecure:
        table["insecure"] = True
    else:
        (ca,) = _need_files(certs, ("ca.crt",), "the SuperLink connection")
        table["root-certificates"] = str(ca)
    links[name] = table
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(doc))
    if token is not None:
        store_token(home, superlink, token)
    return path


def store_token(home: Path, superlink: str, token: str) -> None:
    """Put the operator token in `$FLWR_HOME/credentials.yaml` (mode 600) as the access token of an account
    login to `superlink`: Flower 1.41's `flwr` CLI then sends it as `Authorization: Bearer ...` with every
    Control API call, which is what the guarded SuperLink checks. The refresh token is a placeholder: the
    SuperLink never renews the operator token."""
    from flwr.cli.constant import ACCESS_TOKEN_STORE_KEY, AUTHN_TYPE_STORE_KEY, REFRESH_TOKEN_STORE_KEY
    from flwr.common.constant import AuthnType
    from flwr.supercore.credential_store.file_credential_store import FileCredentialStore

    store = FileCredentialStore(Path(home) / "credentials.yaml")  # written via a mode-600 temporary file
    store.set(AUTHN_TYPE_STORE_KEY % superlink, AuthnType.OIDC.encode())
    store.set(ACCESS_TOKEN_STORE_KEY % superlink, token.encode())
    store.set(REFRESH_TOKEN_STORE_KEY % superlink, b"none")


def flwr(home: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run the `flwr` CLI with our FLWR_HOME; raises UserError with its output when it fails."""
    cmd = [executable("flwr"), *args]
    res = subprocess.run(cmd, env=child_env(home), capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise UserError(f"`flwr {args[0]}` failed: {_flwr_reason(res.stdout + res.stderr) or res.returncode}")
    return res


def _flwr_reason(text: str) -> str:
    """The message inside the `flwr` CLI's error box, on one line."""
    text = ANSI.sub("", text)
    if "Authentication failed" in text:
        return ("the SuperLink refused this machine's operator token (or it has none): use the operator.token "
                "of this server (beside its ca.crt, or in its --state with --insecure), e.g. photon submit "
                "--token FILE")
    lines = [l.strip(" │╭╮╰╯─") for l in text.splitlines()]
    keep = [l for l in lines if l and not l.startswith(("Using SuperLink", "INFO", "Error"))]
    return " ".join(keep[-6:]).replace("[", "(").replace("]", ")")


def _json_out(res: subprocess.CompletedProcess) -> dict:
    """The JSON object `flwr ... --format json` prints; its failures (exit code 0, success false) raise."""
    text = res.stdout
    start = text.find("{")
    try:
        out = json.JSONDecoder().raw_decode(text[start:])[0] if start >= 0 else {}
    except json.JSONDecodeError:
        raise UserError(f"unexpected output from flwr: {text[-300:]!r}") from None
    if out.get("success") is False:
        reason = _flwr_reason(str(out.get("error-message", out)))
        raise UserError(f"`flwr {res.args[1]}` failed: {reason}")
    return out


def register_node(home: Path, public_key: Path, name: str = CONNECTION) -> int:
    """Register a node's public key with the SuperLink (needs `--enable-supernode-auth`); returns its id."""
    res = flwr(home, "supernode", "register", str(public_key), name, "--format", "json")
    return int(_json_out(res)["node-id"])


def register_key(home: Path, public_key: Path, name: str = CONNECTION) -> str:
    """`register_node`, where a key the SuperLink's database already holds is fine (a restarted server)."""
    try:
        return f"registered as node {register_node(home, public_key, name)}"
    except UserError as e:
        if "already in use" in str(e):
            return "already registered"
        raise


def list_nodes(home: Path, name: str = CONNECTION) -> list[dict]:
    res = flwr(home, "supernode", "list", name, "--format", "json")
    return _json_out(res).get("nodes", [])


# ---------------------------------------------------------------------------------------------------------
# Runs: the app bundle is staged from photon's source so data, runs and virtualenvs never enter it (the FAB is
# capped at 10 MB), and the config travels as JSON in the run config.


def stage_app(dest: Path) -> Path:
    """Copy pyproject.toml (less the simulation's federations) and photon's .py/.yaml files into `dest/photon`
    (the dir name is the app name)."""
    import photon

    pkg = Path(photon.__file__).resolve().parent
    pyproject = pkg.parent / "pyproject.toml"
    if not pyproject.exists() or "[tool.flwr.app]" not in pyproject.read_text():
        raise UserError(f"no pyproject.toml with [tool.flwr.app] beside {pkg}; submit runs from a source "
                        "checkout of photon (git clone, then pip install -e .)")
    app = Path(dest) / "photon"
    (app / "photon").mkdir(parents=True)
    project = tomli.loads(pyproject.read_text())
    # `flwr run` migrates [tool.flwr.federations] (the simulation's) into config.toml, replacing our default
    project["tool"]["flwr"].pop("federations", None)
    (app / "pyproject.toml").write_text(tomli_w.dumps(project))
    for src in pkg.rglob("*"):
        if src.suffix in (".py", ".yaml") and "__pycache__" not in src.parts:
            dst = app / "photon" / src.relative_to(pkg)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return app


def check_out(run_dir: str) -> None:
    """`photon submit --out`, checked before anything is sent: a relative path must stay inside the server's runs
    root. The server checks again (`confine_run_dir`): a raw `flwr run` skips this side."""
    norm = os.path.normpath(str(run_dir))
    if not str(run_dir).strip() or norm == "." or norm == ".." or norm.startswith("../"):
        raise UserError(f"--out {run_dir!r}: name a directory inside the server's runs root (photon server --runs, "
                        "default <state>/runs), e.g. --out small-deployed; '..' may not leave it")


def confine_run_dir(root: Path, run_dir: str) -> Path:
    """The absolute run directory for `run_dir` (relative to `root`, or absolute inside it), symlinks resolved;
    a path outside `root` (or `root` itself) is a UserError. The guarded SuperLink applies it to every run."""
    root = Path(os.path.realpath(root))
    full = Path(os.path.realpath(root / str(run_dir))) if str(run_dir).strip() else root
    if full == root or root not in full.parents:
        raise UserError(f"run-dir {run_dir!r} is outside this server's runs root {root}: submit with --out NAME "
                        "(a directory under it)")
    return full


def submit_run(home: Path, cfg: RunConfig, run_dir: str, resume: bool = False, name: str = CONNECTION) -> int:
    """Start a run of photon's ServerApp on the SuperLink; returns the run id. `run_dir` is a directory on the
    server machine, where the ServerApp runs: relative to the server's runs root, or absolute inside it."""
    overrides = {"config-json": json.dumps(config_to_dict(cfg)), "run-dir": str(run_dir), "resume": resume}
    with tempfile.TemporaryDirectory(prefix="photon-fab-") as tmp:
        app = stage_app(Path(tmp))
        run_config = Path(tmp) / "run-config.toml"  # a file, so the JSON needs no shell or TOML quoting
        run_config.write_text(tomli_w.dumps(overrides))
        res = flwr(home, "run", str(app), name, "--run-config", str(run_config), "--format", "json")
    out = _json_out(res)
    if not out.get("success") or out.get("run-id") is None:
        raise UserError(f"the SuperLink did not start the run: {out}")
    return int(out["run-id"])


def run_status(home: Path, run_id: int, name: str = CONNECTION) -> dict:
    res = flwr(home, "list", name, "--run-id", str(run_id), "--format", "json")
    runs = _json_out(res).get("runs", [])
    if not runs:
        raise UserError(f"the SuperLink knows no run {run_id}")
    return runs[0]


def wait_run(home: Path, run_id: int, name: str = CONNECTION, poll_s: float = 2.0,
             timeout_s: float | None = None) -> dict:
    """Poll the run's status until it is finished (completed, failed or stopped); returns the last status."""
    end = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = run_status(home, run_id, name)
        last = status["status"]
        if last in FINAL:
            return status
        if end is not None and time.monotonic() > end:
            raise TimeoutError(f"run {run_id} still {last} after {timeout_s} s")
        time.sleep(poll_s)


def stream_logs(home: Path, run_id: int, name: str = CONNECTION, out: IO[str] | None = None,
                errors: list[str] | None = None) -> tuple[subprocess.Popen, threading.Thread]:
    """`flwr log --stream` in the background: the ServerApp's output, until the run ends, copied to `out`
    (default stdout) by a thread, without colour codes unless `out` is a terminal; the ServerApp's own error
    lines are collected in `errors` (see `copy_lines`)."""
    proc = spawn([executable("flwr"), "log", str(run_id), name, "--stream"], home, pipe=True)
    out = out or sys.stdout
    relay = threading.Thread(target=copy_lines, args=(proc.stdout, out, not out.isatty(), errors), daemon=True)
    relay.start()
    return proc, relay


_SERVERAPP_ERROR = re.compile(r"^error: (.+)")  # server_app.main's one line for a UserError


def copy_lines(src: IO[bytes], out: IO[str], plain: bool, errors: list[str] | None = None) -> None:
    """Copy `src` to `out` line by line; `plain` drops ANSI colour codes (output piped to a file or a program).
    The reason of each `error: ...` line (the ServerApp refusing the run, say) is appended to `errors`, so
    the submit's last line can say why the run failed."""
    for raw in iter(src.readline, b""):
        line = raw.decode(errors="replace")
        clean = ANSI.sub("", line)
        out.write(clean if plain else line)
        out.flush()
        if errors is not None and (found := _SERVERAPP_ERROR.search(clean)):
            errors.append(found.group(1).strip())


def explain_exit(log_file: Path, what: str = "flower-supernode", since: int = 0) -> str:
    """Why a Flower process (`what`) stopped, from its log past byte `since` (where this start of it began
    writing: the log is appended across starts): the lines after its last ERROR, else the last line."""
    lines = [l.strip() for l in ANSI.sub("", _read_from(Path(log_file), since)).splitlines()]
    errors = [i for i, l in enumerate(lines) if l.startswith("ERROR")]
    last = next((l for l in reversed(lines) if l), "no log")
    unknown = next((l for l in reversed(lines) if "401 Unauthorized" in l), None)
    if what == "flower-supernode" and unknown is not None:  # its heartbeat refused; the last line is its exit
        return (f"{unknown}. The server does not know this node any more: it was restarted with another --state, "
                "or its state was lost. Start the node again: a server started with --certs registers the "
                "node-*.key.pub there anew (or register this node's key by hand, docs/DEPLOY.md)")
    if not errors:
        return last
    reason = " ".join(l for l in lines[errors[-1] + 1:errors[-1] + 4] if l and not l.startswith("For more"))
    reason = reason.replace("[", "(").replace("]", ")")  # the CLI prints errors as rich markup
    if "CERTIFICATE_VERIFY_FAILED" in reason:
        reason += " Is --certs/ca.crt the server's CA, and the server certificate made for this --superlink host?"
    elif "WRONG_VERSION_NUMBER" in reason or "record layer failure" in reason:
        reason += (" The server does not speak TLS: it runs with --insecure (start the node with --insecure too), or "
                   "--superlink names a port that is not photon server's.")
    elif "Failed to activate SuperNode" in reason:
        reason += (" Is this node's public key registered (`photon server --certs` registers node-*.key.pub)? Or is "
                   "another node connected with the same key: one on another machine, or one killed without "
                   "stopping, which the server holds until its heartbeat lapses (about a minute)?")
    return reason


class Detached(Exception):
    """`photon submit` was left with Ctrl-C; the run goes on (the message says how to watch or stop it)."""


def _why_unreachable(superlink: str, certs: Path | None, insecure: bool, error: str) -> str:
    """For a `flwr` error that says the SuperLink is unreachable: why, from a probe of our own ('' otherwise)."""
    if "unavailable" not in error.lower():
        return ""
    ca = Path(certs) / "ca.crt" if certs is not None else None
    return f"; {probe_superlink(superlink, ca, insecure, node=False)[1]}"


def run_to_end(home: Path, superlink: str, cfg: RunConfig, run_dir: str, resume: bool = False,
               certs: Path | None = None, insecure: bool = False, token: str | None = None, console=None,
               poll_s: float = 2.0) -> dict:
    """`photon submit`: write the connection (with the operator `token`), start the run, stream the ServerApp's
    log, wait for the end."""
    certs, insecure = tls_args(certs, insecure, "photon submit")
    check_out(run_dir)
    kept = {p: p.read_bytes() if p.exists() else None for p in (Path(home) / "config.toml",
                                                                 Path(home) / "credentials.yaml")}
    write_connection(home, superlink, certs=certs, insecure=insecure, token=token)
    try:
        run_id = submit_run(home, cfg, run_dir, resume=resume)
    except UserError as e:  # keep the connection that works (`flwr log` of a running run reads it)
        for path, data in kept.items():
            path.unlink(missing_ok=True) if data is None else path.write_bytes(data)
        raise UserError(f"{e}{_why_unreachable(superlink, certs, insecure, str(e))}") from None
    say = (lambda text: console.print(text, soft_wrap=True)) if console is not None else print
    say(f"started run {run_id} on {superlink}; its log follows (Ctrl-C detaches, the run goes on)")
    errors: list[str] = []
    streamer, relay = stream_logs(home, run_id, errors=errors) if console is not None else (None, None)
    watch = f"FLWR_HOME={home} flwr log {run_id} {CONNECTION}"
    try:
        status = wait_run(home, run_id, poll_s=poll_s)
        if streamer is not None:
            streamer.wait(timeout=15)  # the stream ends with the run; let it print the tail
            relay.join(timeout=5)
    except KeyboardInterrupt:
        raise Detached(f"detached from run {run_id}; it goes on: watch it with `{watch}`, stop it with "
                       f"`FLWR_HOME={home} flwr stop {run_id} {CONNECTION}`") from None
    except UserError as e:
        raise UserError(f"lost the server while run {run_id} was going ({e}). If the server stopped, the run "
                        f"stopped with it: once it is back, continue it with photon submit --resume --out {run_dir} "
                        f"(the same --preset/--set); if only the connection broke, watch it with `{watch}`") from None
    except subprocess.TimeoutExpired:
        pass
    finally:
        if streamer is not None:
            stop(streamer)
    if status["status"] != "finished:completed":
        why = f": {errors[-1]}" if errors else f" ({status.get('status-details')})"
        raise UserError(f"run {run_id} ended {status['status']}{why}; the server's log: "
                        f"`FLWR_HOME={home} flwr log {run_id} {CONNECTION} --show`")
    return status


# ---------------------------------------------------------------------------------------------------------
# The guarded SuperLink: `python -m photon.federation.deploy superlink --photon-operator-token-file F
# --photon-runs DIR FLOWER-SUPERLINK-ARGS...`, started by `start_superlink` with `--isolation process` and a
# SuperExec secret. It is `flower-superlink` with three changes, all through Flower 1.41's own hooks (pyproject
# pins flwr==1.41.0):
#   - Control API (/v1/control/*: flwr run, stop, log, ls, supernode register/unregister/list): Flower's account
#     authentication middleware asks its ControlAuthnPlugin, a no-op that admits everyone unless the enterprise
#     OIDC plugin is installed. Ours admits a request only if its bearer token is the operator token.
#   - Runtime API (/v1/runtime/*, where ServerApps are handed out): every call but AcquireTask needs a task
#     token; AcquireTask is signed with the SuperExec secret, which Flower checks only with --isolation process.
#     So the SuperLink runs that way and starts its SuperExec itself (`superexec_main`) with the secret.
#   - StartRun: the run's `run-dir` is made absolute under the runs root, and refused outside it.
# Fleet API (nodes) is Flower's as shipped: TLS plus a signature by a registered key on every call.


def _flag(argv: list[str], name: str) -> tuple[str | None, list[str]]:
    """The value of `--name VALUE` in argv, and argv without it."""
    if name in argv[:-1]:
        i = argv.index(name)
        return argv[i + 1], argv[:i] + argv[i + 2:]
    return None, argv


def operator_authn(token: str):
    """A Flower ControlAuthnPlugin that admits only Control API calls carrying `token` (as the `flwr` CLI sends
    it after `store_token`), as Flower's no-op account; refused calls get Flower's 401."""
    import hmac

    from flwr.common.constant import ACCESS_TOKEN_KEY
    from flwr.superlink.auth_plugin.noop_auth_plugin import NoOpControlAuthnPlugin

    expected = token.encode()

    class OperatorToken(NoOpControlAuthnPlugin):
        def validate_tokens_in_metadata(self, metadata):
            sent = dict(metadata).get(ACCESS_TOKEN_KEY, "")
            sent = sent.encode() if isinstance(sent, str) else sent
            if hmac.compare_digest(sent, expected):
                return super().validate_tokens_in_metadata(metadata)
            return False, None

        def refresh_tokens(self, metadata):
            return [], None  # nothing to renew: Flower answers "authentication failed"

    return OperatorToken()


def confined_start_run(start_run, runs: Path):
    """Flower's StartRun handler, with the run's `run-dir` override confined to `runs` (`confine_run_dir`)."""
    from flwr.proto.transport_pb2 import Scalar
    from flwr.supercore.error import ApiErrorCode, FlowerError

    def guarded(request, *args, **kwargs):
        given = request.override_config["run-dir"].string if "run-dir" in request.override_config else ""
        try:
            path = confine_run_dir(runs, given)
        except UserError as e:
            raise FlowerError(ApiErrorCode.INVALID_RUN_CONFIG, str(e), public_details=str(e)) from None
        request.override_config["run-dir"].CopyFrom(Scalar(string=str(path)))
        return start_run(request, *args, **kwargs)

    return guarded


def superlink_main(argv: list[str]) -> None:
    """`flower-superlink ARGV`, guarded (see above); starts our SuperExec beside it."""
    import importlib

    from flwr.superlink.servicer.control import control_handlers

    from photon.federation.blobs import serve_command

    fsl = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the package exports a function by that name

    token_file, argv = _flag(argv, "--photon-operator-token-file")
    runs, argv = _flag(argv, "--photon-runs")
    if token_file is None or runs is None:
        sys.exit("photon superlink: --photon-operator-token-file and --photon-runs are required")
    fsl.load_control_authn_plugin = lambda: operator_authn(read_token(Path(token_file)))
    control_handlers.start_run = confined_start_run(control_handlers.start_run, Path(runs))
    host, port = _flag(argv, "--host")[0] or "0.0.0.0", _flag(argv, "--port")[0]
    ca, secret = _flag(argv, "--ssl-ca-certfile")[0], _flag(argv, "--superexec-auth-secret-file")[0]
    superexec = [sys.executable, "-m", "photon.federation.deploy", "superexec", "--runtime-api-address",
                 f"{local_address(host)}:{port}", "--superexec-auth-secret-file", str(secret),
                 "--parent-pid", str(os.getpid())]
    superexec += ["--insecure"] if "--insecure" in argv else ["--root-certificates", str(ca)]
    subprocess.Popen(superexec, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)  # it retries until we listen
    blobs, argv = _flag(argv, "--photon-blobs")
    if blobs is not None:  # the blob side channel, in its own process, dying with us
        b = json.loads(blobs)
        serve = serve_command(b["root"], b["host"], b["port"], b["secret_file"], b.get("cert"), b.get("key"))
        subprocess.Popen(serve, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    sys.argv = ["flower-superlink", *argv]
    fsl.flower_superlink()


def superexec_main(argv: list[str]) -> None:
    """`flower-superexec ARGV`, but the ServerApp processes it starts get their task token in a file (mode 600,
    deleted when the process ends) instead of on their command line, where any local user could read it."""
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND
    from flwr.supercore.superexec.executor import subprocess_executor
    from flwr.supercore.superexec.executor.types import LaunchResult

    tokens = Path(tempfile.mkdtemp(prefix="photon-tokens-"))  # mode 700

    def launch(self, spec):  # Flower 1.41's SubprocessExecutor.launch, with --token-file for --token
        fd, token_file = tempfile.mkstemp(dir=tokens)
        with os.fdopen(fd, "w") as f:
            f.write(spec.token)
        args = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
                spec.runtime_api_address, "--token-file", token_file]
        if spec.insecure:
            args.append("--insecure")
        elif spec.root_certificates_path is not None:
            args += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            args += ["--parent-pid", str(spec.parent_pid)]
        if spec.runtime_dependency_install:
            args.append("--allow-runtime-dependency-installation")
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} if spec.suppress_output else {}
        proc = subprocess.Popen(args, **quiet)
        threading.Thread(target=lambda: (proc.wait(), os.unlink(token_file)), daemon=True).start()
        return LaunchResult.accepted()

    subprocess_executor.SubprocessExecutor.launch = launch  # type: ignore[method-assign]
    sys.argv = ["flower-superexec", *argv]
    try:
        flower_superexec()
    finally:
        shutil.rmtree(tokens, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["superlink"]:
        superlink_main(sys.argv[2:])
    elif sys.argv[1:2] == ["superexec"]:
        superexec_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m photon.federation.deploy superlink|superexec ARGS...")
