"""Runs submitted to a deployment: the `flwr` connection, node registration, the app bundle, a run's
life from submission to its last log line (`photon submit`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
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
from photon.launch.processes import (
    ANSI,
    _need_files,
    check_address,
    child_env,
    executable,
    spawn,
    stop,
    tls_args,
)
from photon.launch.supernode import probe_superlink

log = logging.getLogger(__name__)
CONNECTION = "photon"  # the [superlink.<name>] table we write into $FLWR_HOME/config.toml
FINAL = ("finished:completed", "finished:failed", "finished:stopped")


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
    from flwr.cli.constant import (
        ACCESS_TOKEN_STORE_KEY,
        AUTHN_TYPE_STORE_KEY,
        REFRESH_TOKEN_STORE_KEY,
    )
    from flwr.common.constant import AuthnType
    from flwr.supercore.credential_store.file_credential_store import (
        FileCredentialStore,
    )

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


