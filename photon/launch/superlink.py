"""The server's side of a deployment: the SuperLink that `photon server` starts, guarded.

Flower 1.41 serves nodes, the Control API (`flwr run`, `flwr supernode register`) and the Runtime API (its
own ServerApps) on one port, and leaves the last two open to anyone who trusts the server's certificate.
`photon server` therefore runs the SuperLink through `python -m photon.launch.superlink superlink`, which
admits Control API calls only with the operator token and ServerApp tasks only to the SuperExec holding
the SuperLink's secret, and confines run directories to the server's runs root ("The guarded SuperLink"
below; docs/DEPLOY.md, "Who can do what"). Flower's own programs do all the networking.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from photon.errors import UserError
from photon.launch.certs import OPERATOR_TOKEN, make_token, read_token, write_private
from photon.launch.processes import (
    _need_files,
    check_port_free,
    die_with_parent,
    local_address,
    spawn,
    tls_args,
    wait_listening,
)

log = logging.getLogger(__name__)
SERVER_FILES = ("ca.crt", "server.pem", "server.key")


# ---------------------------------------------------------------------------------------------------------
# Starting the SuperLink


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


def check_ports(port: int, blob_port: int | None) -> None:
    """The SuperLink's port and its blob side channel's (`blob_port`; None: `port` + 1) must differ and exist."""
    if blob_port is not None and blob_port == port:
        raise UserError(f"--blob-port {blob_port} is --port too: the blob side channel needs a port of its own "
                        f"(leave --blob-port out for --port + 1)")
    if blob_port is None and port == 65535:
        raise UserError("--port 65535 leaves no --port + 1 for the blob side channel; pick a lower --port or pass "
                        "--blob-port")


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
    args = [sys.executable, "-m", "photon.launch.superlink", "superlink", "--photon-operator-token-file", str(token),
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


# ---------------------------------------------------------------------------------------------------------
# The guarded SuperLink: `python -m photon.launch.superlink superlink --photon-operator-token-file F
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

    from photon.transport.blobs import serve_command

    fsl = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the package exports a function by that name

    token_file, argv = _flag(argv, "--photon-operator-token-file")
    runs, argv = _flag(argv, "--photon-runs")
    if token_file is None or runs is None:
        sys.exit("photon superlink: --photon-operator-token-file and --photon-runs are required")
    fsl.load_control_authn_plugin = lambda: operator_authn(read_token(Path(token_file)))
    control_handlers.start_run = confined_start_run(control_handlers.start_run, Path(runs))
    host, port = _flag(argv, "--host")[0] or "0.0.0.0", _flag(argv, "--port")[0]
    ca, secret = _flag(argv, "--ssl-ca-certfile")[0], _flag(argv, "--superexec-auth-secret-file")[0]
    superexec = [sys.executable, "-m", "photon.launch.superlink", "superexec", "--runtime-api-address",
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
    from flwr.supercore.constant import (
        TASK_TYPE_TO_APPIO_API_ADDRESS_ARG,
        TASK_TYPE_TO_COMMAND,
    )
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


def confine_run_dir(root: Path, run_dir: str) -> Path:
    """The absolute run directory for `run_dir` (relative to `root`, or absolute inside it), symlinks resolved;
    a path outside `root` (or `root` itself) is a UserError. The guarded SuperLink applies it to every run."""
    root = Path(os.path.realpath(root))
    full = Path(os.path.realpath(root / str(run_dir))) if str(run_dir).strip() else root
    if full == root or root not in full.parents:
        raise UserError(f"run-dir {run_dir!r} is outside this server's runs root {root}: submit with --out NAME "
                        "(a directory under it)")
    return full


if __name__ == "__main__":
    if sys.argv[1:2] == ["superlink"]:
        superlink_main(sys.argv[2:])
    elif sys.argv[1:2] == ["superexec"]:
        superexec_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m photon.launch.superlink superlink|superexec ARGS...")
