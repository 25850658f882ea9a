"""Child processes of the launchers: Flower's environment, spawning, watching, stopping.

Every child gets Flower's environment and its own process group, so stopping it stops the ServerApp and
ClientApp processes it spawned too.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from photon.errors import UserError

log = logging.getLogger(__name__)


def flower_env(home: Path) -> dict[str, str]:
    """Variables every Flower process of ours needs on an offline machine: no telemetry, no update check, no
    runtime installs."""
    return {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_DEDUP_LOGS": "0",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "TOKENIZERS_PARALLELISM": "false"}


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colour codes Flower's loggers write whether or not to a terminal


def _need_files(certs: Path | None, names: tuple[str, ...], what: str) -> list[Path]:
    paths = [Path(certs) / n for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{certs} lacks {', '.join(missing)} needed by {what}; make them with "
                        f"`photon certs --out {certs}` (on the server) and copy them here")
    return paths


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


def local_address(host: str) -> str:
    """The address this machine reaches a server listening on `host` at."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


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


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def check_address(superlink: str) -> None:
    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--superlink {superlink!r}: expected HOST:PORT, e.g. 10.0.0.5:9092")


def tls_args(certs: Path | None, insecure: bool, what: str) -> tuple[Path | None, bool]:
    if insecure == (certs is not None):
        raise UserError(f"{what}: pass exactly one of --certs DIR (TLS; make it with photon certs) or --insecure "
                        "(no TLS, loopback and tests)")
    return (Path(certs).resolve() if certs else None), insecure
