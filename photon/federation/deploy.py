"""The deployment runtime across machines: certificates, a SuperLink, SuperNodes and runs submitted to them.

Flower's own executables (`flower-superlink`, `flower-supernode`, `flwr`) do all the networking; this module
writes their inputs (certificates, the connection in `$FLWR_HOME/config.toml`, the app bundle), starts them
with Flower's environment, watches them and stops what it started. No training logic lives here.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import tomli
import tomli_w

from photon.config import RunConfig, config_to_dict
from photon.errors import UserError
from photon.federation.launch import flower_env

log = logging.getLogger(__name__)

SERVER_FILES = ("ca.crt", "server.pem", "server.key")
CONNECTION = "photon"  # the [superlink.<name>] table we write into $FLWR_HOME/config.toml
FINAL = ("finished:completed", "finished:failed", "finished:stopped")

# ---------------------------------------------------------------------------------------------------------
# Certificates: a CA, a server certificate it signs, and one ECDSA P-384 key pair per node (OpenSSH format,
# what `flower-supernode --auth-supernode-private-key` and `flwr supernode register` read).


def make_certs(out_dir: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), nodes: int = 2,
               force: bool = False, days: int = 365) -> list[Path]:
    """Write ca.crt, ca.key, server.pem, server.key and node-<i>.key(.pub) for i < nodes; returns the paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out_dir = Path(out_dir)
    names = ["ca.crt", "ca.key", "server.pem", "server.key"]
    names += [f"node-{i}.key{ext}" for i in range(nodes) for ext in ("", ".pub")]
    paths = [out_dir / n for n in names]
    existing = [p.name for p in paths if p.exists()]
    if existing and not force:
        raise UserError(f"{out_dir} already holds {', '.join(existing)}; pass --force to overwrite "
                        "(nodes holding the old keys and CA will then be refused)")
    if not hosts:
        raise UserError("no --host for the server certificate: name the address nodes use to reach the server")
    out_dir.mkdir(parents=True, exist_ok=True)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "photon CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
              .add_extension(x509.SubjectAlternativeName(sans), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA384()))
    files = {"ca.crt": ca.public_bytes(serialization.Encoding.PEM), "ca.key": pem_key(ca_key),
             "server.pem": server.public_bytes(serialization.Encoding.PEM), "server.key": pem_key(server_key)}
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        files[f"node-{i}.key"] = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                    serialization.NoEncryption())
        files[f"node-{i}.key.pub"] = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                   serialization.PublicFormat.OpenSSH)
    for name, data in files.items():
        path = out_dir / name
        path.write_bytes(data)
        if name.endswith(".key"):
            path.chmod(0o600)  # private keys: owner only
    return paths


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


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"port {port} on {host} is in use ({e.strerror}); stop what holds it or pick "
                            "another with --port") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def spawn(args: list[str], home: Path, log_file: Path | None = None) -> subprocess.Popen:
    """Start a Flower process in its own session; output goes to `log_file` (appended) or our terminal."""
    out: IO | None = None
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        out = open(log_file, "ab")
    log.info("starting %s", " ".join(args))
    try:
        return subprocess.Popen(args, env=child_env(home), stdout=out, stderr=subprocess.STDOUT if out else None,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        if out is not None:
            out.close()  # the child holds its own descriptor


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


def _tls_args(certs: Path | None, insecure: bool, what: str) -> tuple[Path | None, bool]:
    if insecure == (certs is not None):
        raise UserError(f"{what}: pass exactly one of --certs DIR (TLS, the default) or --insecure")
    return (Path(certs).resolve() if certs else None), insecure


def start_superlink(port: int, state: Path, certs: Path | None = None, insecure: bool = False,
                    host: str = "127.0.0.1", log_file: Path | None = None) -> subprocess.Popen:
    """Start `flower-superlink` (TLS + node auth, or --insecure) with its database and FLWR_HOME under
    `state`; returns once the port accepts connections. One port serves nodes, `flwr` and ServerApps."""
    certs, insecure = _tls_args(certs, insecure, "photon server")
    state = Path(state).resolve()
    args = [executable("flower-superlink"), "--host", host, "--port", str(port),
            "--database", str(state / "superlink.db"), "--disable-runtime-dependency-installation"]
    if insecure:
        args.append("--insecure")
    else:
        ca, cert, key = _need_files(certs, SERVER_FILES, "photon server")
        args += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                 "--enable-supernode-auth"]
    check_port_free(host, port)
    state.mkdir(parents=True, exist_ok=True)
    proc = spawn(args, state / "flwr", log_file)
    wait_listening(proc, "127.0.0.1" if host in ("0.0.0.0", "") else host, port, "flower-superlink",
                   log_file=log_file)
    return proc


def start_supernode(superlink: str, port: int, state: Path, data: Path | None = None,
                    certs: Path | None = None, key: Path | None = None, insecure: bool = False,
                    log_file: Path | None = None, warm: bool = False) -> subprocess.Popen:
    """Start a SuperNode connected to `superlink` (HOST:PORT). `port` is its local Runtime API for ClientApps
    (127.0.0.1 only), distinct per node on one host. The ClientApp reads `data-dir` and `state-dir`.

    Default: plain `flower-supernode`, a new ClientApp process per message. `warm` (opt-in, experimental):
    `--isolation process` with photon's long-lived ClientApp runtime beside it (see "A warm node" below)."""
    certs, insecure = _tls_args(certs, insecure, "photon node")
    check_address(superlink)
    state = Path(state).resolve()
    node_config = f'state-dir="{state / "worker"}"'
    if data is not None:
        if not (Path(data) / "manifest.json").exists():
            raise UserError(f"--data {data} is not prepared data (no manifest.json); run `photon prepare --out "
                            f"{data}` with the run's preset first")
        node_config += f' data-dir="{Path(data).resolve()}"'
    args = ([sys.executable, "-m", "photon.federation.deploy", "supernode", "--isolation", "process"] if warm
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
        args += ["--root-certificates", str(ca), "--auth-supernode-private-key", str(key.resolve())]
    check_port_free("127.0.0.1", port)
    return spawn(args, state / "flwr", log_file)


# ---------------------------------------------------------------------------------------------------------
# The `flwr` side: a connection in $FLWR_HOME/config.toml, node registration, runs


def write_connection(home: Path, superlink: str, certs: Path | None = None, insecure: bool = False,
                     name: str = CONNECTION) -> Path:
    """Add (or replace) `[superlink.<name>]` in `$FLWR_HOME/config.toml` and make it the default."""
    certs, insecure = _tls_args(certs, insecure, "the SuperLink connection")
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
    return path


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
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
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


def submit_run(home: Path, cfg: RunConfig, run_dir: str, resume: bool = False, name: str = CONNECTION) -> int:
    """Start a run of photon's ServerApp on the SuperLink; returns the run id. `run_dir` is a path on the
    server machine, where the ServerApp runs."""
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


def stream_logs(home: Path, run_id: int, name: str = CONNECTION, log_file: Path | None = None) -> subprocess.Popen:
    """`flwr log --stream` in the background: the ServerApp's output, until the run ends."""
    return spawn([executable("flwr"), "log", str(run_id), name, "--stream"], home, log_file)


def explain_exit(log_file: Path) -> str:
    """Why a Flower process stopped, from its log: the lines after its last ERROR, else the last line."""
    text = Path(log_file).read_text(errors="replace") if Path(log_file).exists() else ""
    lines = [l.strip() for l in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()]
    errors = [i for i, l in enumerate(lines) if l.startswith("ERROR")]
    if not errors:
        return lines[-1] if lines else "no log"
    reason = " ".join(l for l in lines[errors[-1] + 1:errors[-1] + 4] if l and not l.startswith("For more"))
    reason = reason.replace("[", "(").replace("]", ")")  # the CLI prints errors as rich markup
    if "CERTIFICATE_VERIFY_FAILED" in reason:
        reason += " Is --certs/ca.crt the server's CA, and the server certificate made for this --superlink host?"
    elif "Failed to activate SuperNode" in reason:
        reason += " Is this node's public key registered? `photon server --certs` registers node-*.key.pub."
    return reason


def run_to_end(home: Path, superlink: str, cfg: RunConfig, run_dir: str, resume: bool = False,
               certs: Path | None = None, insecure: bool = False, console=None, poll_s: float = 2.0) -> dict:
    """`photon submit`: write the connection, start the run, stream the ServerApp's log, wait for the end."""
    certs, insecure = _tls_args(certs, insecure, "photon submit")
    write_connection(home, superlink, certs=certs, insecure=insecure)
    run_id = submit_run(home, cfg, run_dir, resume=resume)
    say = console.print if console is not None else print
    say(f"started run {run_id} on {superlink}; its log follows (Ctrl-C detaches, the run goes on)")
    streamer = stream_logs(home, run_id) if console is not None else None
    try:
        status = wait_run(home, run_id, poll_s=poll_s)
        if streamer is not None:
            streamer.wait(timeout=15)  # the stream ends with the run; let it print the tail
    except KeyboardInterrupt:
        raise UserError(f"detached from run {run_id}; it goes on: watch it with `FLWR_HOME={home} flwr log {run_id} "
                        f"{CONNECTION}`, stop it with `flwr stop {run_id} {CONNECTION}`") from None
    except subprocess.TimeoutExpired:
        pass
    finally:
        if streamer is not None:
            stop(streamer)
    if status["status"] != "finished:completed":
        raise UserError(f"run {run_id} ended {status['status']} ({status.get('status-details')}); the server's "
                        f"log: `FLWR_HOME={home} flwr log {run_id} {CONNECTION} --show`")
    return status


# ---------------------------------------------------------------------------------------------------------
# A warm node. Flower 1.41's SuperNode runs every message in a new `flwr-clientapp` process (importing torch and
# Flower, installing the app bundle, building the model and optimizer: seconds per message) and polls the
# SuperLink every 3 s when idle. `photon node` instead runs the SuperNode with `--isolation process` (Flower's
# mode for an executor started independently) from `python -m photon.federation.deploy supernode`, which
#   - shortens the SuperNode's idle polling of the SuperLink (and its 0.5 s waits for a reply) to IDLE_POLL_S,
#     its retries for message parts not yet uploaded (1, 2, 4 s ...) to 20..200 ms, and its heartbeat interval to
#     HEARTBEAT_S; these patch Flower 1.41's module globals (pyproject pins flwr 1.41),
#   - starts one long-lived ClientApp runtime beside it and restarts it if it dies.
# The runtime takes the node's tasks from the SuperNode's Runtime API one at a time and runs each exactly as
# `flwr-clientapp` would (same Runtime API calls, heartbeats, error replies), but in one Python process: the app
# bundle's ClientApp is loaded once per bundle, so photon's worker (`client_app._workers`: model, memmapped
# data, per-client optimizer state) stays warm across messages and rounds. Both children share the SuperNode's
# process group: stopping (or killing) the node stops them.

IDLE_POLL_S = 0.2  # SuperNode idle poll of the SuperLink, and the runtime's poll of the SuperNode (Flower: 3 s, 1 s)
HEARTBEAT_S = 10  # the node's heartbeat interval: the SuperLink's minimum (Flower: 30). Heartbeats go every ~4 s and
                  # a node that stops sending is declared dead after 2 intervals: 20 s instead of 60 s.


class _ShortSleeps:
    """Stands in for the `time` module inside flwr.supernode.start_client_internal: sleeps are capped."""

    def __init__(self, cap: float):
        self._cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._cap))

    def __getattr__(self, name: str):
        return getattr(time, name)


def _arg(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def supernode_main(argv: list[str]) -> None:
    """`flower-supernode ARGV` with short idle polls and, with `--isolation process`, a supervised ClientApp
    runtime on the Runtime API at 127.0.0.1:--port."""
    import threading

    import flwr.supernode.start_client_internal as sci
    from flwr.supernode.cli.flower_supernode import flower_supernode

    import flwr.supercore.heartbeat as hb
    import flwr.supernode.fleet_http_connection as fleet

    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True, colored=False)  # a log file: when each message came and went
    sci.time = _ShortSleeps(IDLE_POLL_S)  # type: ignore[attr-defined]
    # A message is pullable as soon as its header is on the SuperLink, while the ServerApp still uploads its
    # objects: retry missing ones after 20 ms..0.2 s, not Flower's 1, 2, 4 s.
    sci.pull_objects = functools.partial(sci.pull_objects, initial_backoff=0.02,  # type: ignore[attr-defined]
                                         backoff_cap=0.2)
    fleet.HEARTBEAT_DEFAULT_INTERVAL = hb.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_S  # type: ignore[attr-defined]
    if _arg(argv, "--isolation") == "process":
        port = int(_arg(argv, "--port") or 9094)
        threading.Thread(target=_supervise_runtime, args=(port,), name="photon-clientapp-runtime",
                         daemon=True).start()
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


def _supervise_runtime(port: int) -> None:
    """Start the ClientApp runtime once the Runtime API listens; restart it whenever it exits."""
    address = f"127.0.0.1:{port}"
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    while True:
        proc = subprocess.Popen([sys.executable, "-m", "photon.federation.deploy", "clientapp-runtime", address,
                                 str(os.getpid())], stdin=subprocess.DEVNULL)
        code = proc.wait()
        if code == -signal.SIGTERM:
            return  # stopped with the node
        print(f"photon: the ClientApp runtime exited with code {code}; restarting it", file=sys.stderr, flush=True)
        time.sleep(1.0)


class ClientAppRuntime:
    """Runs the SuperNode's ClientApp tasks in this process, one at a time, like `flwr-clientapp` runs one.

    The ClientApp is loaded from the run's app bundle (FAB), as Flower does, and kept while tasks come from the
    same bundle; a task from another bundle drops the previous bundle's modules and loads the new one."""

    def __init__(self, address: str):
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        self.address = address
        self._acquirer = RuntimeHttpClient.from_server_address(
            server_address=address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker())
        self._app: tuple[str, object, str] | None = None  # (fab hash, ClientApp, app dir on sys.path)

    def serve(self, poll_s: float = IDLE_POLL_S) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        while True:
            res = self._acquirer.AcquireTask(request)
            if res.HasField("task") and res.token:
                self.run_task(res.token)
            else:
                time.sleep(poll_s)

    def client_app(self, run, fab):
        """The bundle's ClientApp, loaded once per bundle."""
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.config import get_project_config, get_project_dir
        from flwr.supercore.object_ref import load_app

        if self._app is not None and self._app[0] == fab.hash_str:
            return self._app[1]
        app_dir = get_project_dir(run.fab_id, run.fab_version, fab.hash_str)
        if not (app_dir / "pyproject.toml").exists():
            install_from_fab(fab.content, skip_prompt=True)
        ref = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]["clientapp"]
        top = ref.partition(":")[0].split(".")[0]
        if self._app is not None and self._app[2] in sys.path:
            sys.path.remove(self._app[2])
        self._app = None
        for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
            del sys.modules[name]  # this process started from a checkout of photon: the bundle's code must win
        import importlib

        importlib.invalidate_caches()
        if str(app_dir) in sys.path:
            sys.path.remove(str(app_dir))
        sys.path.insert(0, str(app_dir))
        app = load_app(ref, LoadClientAppError, app_dir)
        self._app = (fab.hash_str, app, str(app_dir))
        return app

    def run_task(self, token: str) -> None:
        """`flwr.supernode.runtime.run_clientapp`, less the process: pull the task, run the app, push the reply
        (an error reply if the app raised) and the task's final status."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        retry = make_simple_http_retry_invoker()
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)], retry_invoker=retry)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = reply = context = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        t0 = time.perf_counter()
        t1 = t2 = t0
        try:
            message, context, run, fab = pull_task_input(client)
            t1 = time.perf_counter()
            reply = self.client_app(run, fab)(message=message, context=context)
            t2 = time.perf_counter()
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # as flwr-clientapp: an error reply, and the runtime goes on
            code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(type(ex)) + ":<'" + str(ex) + "'>"
            if isinstance(ex, LoadClientAppError):
                code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                reason = "An exception was raised when attempting to load `ClientApp`"
            log.exception("ClientApp raised an exception")
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception:  # noqa: BLE001 - the SuperNode times the task out
                log.exception("failed to push the reply")
            retry.max_tries = 1
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            heartbeat.stop()
            client.close()
            log.info("task %s: pulled in %.2f s, ran in %.2f s, pushed in %.2f s", sub_status, t1 - t0, t2 - t1,
                     time.perf_counter() - t2)


def pull_task_input(client):
    """`flwr.supernode.runtime.run_clientapp.pull_task_input` with short retries. A task is claimable as soon as
    the SuperNode has the message's header, before it has pulled the message's objects from the SuperLink:
    Flower's default backoff (1, 2, 4 s ...) is hidden by a new process's start-up, not by a warm runtime."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (make_confirm_message_received_fn_protobuf,
                                                                     make_pull_object_fn_protobuf)
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=0.02, backoff_cap=0.2)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower: the deflated message lacks its id
    return message, context, run, fab


def clientapp_runtime_main(address: str, parent_pid: int) -> None:
    from flwr.supercore.app_utils import start_parent_process_monitor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s photon-clientapp-runtime: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    start_parent_process_monitor(parent_pid)  # the SuperNode went away: so do we
    import torch  # noqa: F401 - the first task need not pay for it

    ClientAppRuntime(address).serve()


if __name__ == "__main__":
    if sys.argv[1:2] == ["supernode"]:
        supernode_main(sys.argv[2:])
    elif sys.argv[1:2] == ["clientapp-runtime"]:
        clientapp_runtime_main(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: python -m photon.federation.deploy supernode FLOWER-SUPERNODE-ARGS... | "
                 "clientapp-runtime HOST:PORT PARENT_PID")
