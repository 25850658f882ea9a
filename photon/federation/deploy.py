"""The deployment runtime across machines: certificates, a SuperLink, SuperNodes and runs submitted to them.

Flower's own executables (`flower-superlink`, `flower-supernode`, `flwr`) do all the networking; this module
writes their inputs (certificates, the connection in `$FLWR_HOME/config.toml`, the app bundle), starts them
with Flower's environment, watches them and stops what it started. No training logic lives here.
"""

from __future__ import annotations

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
