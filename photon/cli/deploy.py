"""`photon certs`, `server`, `node`, `submit`: the deployment runtime across machines (see photon/launch/)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from photon.cli.common import PresetOpt, SetOpt, app, console, err_console, flags_config
from photon.errors import UserError

CertsOpt = Annotated[Optional[Path], typer.Option("--certs", help="Dir from `photon certs` (TLS + node keys).")]
InsecureOpt = Annotated[bool, typer.Option("--insecure", help="No TLS, no node authentication: anyone who can "
                                           "reach the port can join and read the model. Trusted networks only.")]
SuperlinkOpt = Annotated[str, typer.Option("--superlink", help="The server's address, HOST:PORT.")]


@app.command()
def certs(
    out: Annotated[Path, typer.Option("--out", help="Where to write the CA, server certificate, operator token and "
                                      "node keys.")],
    host: Annotated[Optional[list[str]], typer.Option(
        "--host", help="Name or IP nodes use to reach the server (repeatable; 127.0.0.1 and localhost are "
        "always added).")] = None,
    nodes: Annotated[int, typer.Option(min=0, help="Node key pairs to make (node-0.key ...).")] = 2,
    force: Annotated[bool, typer.Option(help="Overwrite existing files.")] = False,
    days: Annotated[int, typer.Option(min=1, max=36500, help="Days the CA and the server certificate stay valid; "
                                      "make new ones with --force before then.")] = 365,
) -> None:
    """Make a CA, a server TLS certificate, the operator token and per-node keys (run on the server)."""
    from cryptography.x509 import load_pem_x509_certificate

    from photon.launch.certs import make_certs

    hosts = tuple(dict.fromkeys([*(host or []), "127.0.0.1", "localhost"]))
    make_certs(out, hosts=hosts, nodes=nodes, force=force, days=days)
    until = load_pem_x509_certificate((out / "server.pem").read_bytes()).not_valid_after_utc.strftime(
        "%Y-%m-%d %H:%M UTC")
    console.print(f"wrote {out}: keep ca.key, server.key and operator.token on the server (operator.token also "
                  f"on machines that submit runs); give node i ca.crt and node-<i>.key (server certificate valid "
                  f"for {', '.join(hosts)}, until {until})", soft_wrap=True)


def _warn_insecure(insecure: bool, carries_token: bool = True) -> None:
    """The warning for --insecure; `carries_token`: this command sends the operator token (a server reads it, a
    submit sends it; a node never holds it)."""
    if insecure:
        token = ", and read the operator token on the wire" if carries_token else ""
        err_console.print("[bold yellow]warning:[/] --insecure: no TLS and no node authentication; anyone who can "
                          f"reach the port can join the federation and read the model{token}", highlight=False,
                          soft_wrap=True)


def _stop_on_sigterm() -> None:
    """SIGTERM (a service manager's stop) ends us like Ctrl-C, so the `finally` that stops our child runs."""
    import signal

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)


def _wait_foreground(proc, what: str, log_file: Path, since: int = 0) -> None:
    """Block until the child ends; Ctrl-C or SIGTERM stops it. A child that ends by itself, even with code 0,
    is a UserError with the reason from its log past byte `since` (it should run until stopped; a service
    manager's Restart=on-failure then restarts it)."""
    from photon.launch.processes import explain_exit, stop

    try:
        code = proc.wait()
    except KeyboardInterrupt:
        stop(proc)
        console.print(f"stopped {what}")
        return
    raise UserError(f"{what} stopped by itself (exit code {code}): {explain_exit(log_file, what, since)} "
                    f"(log: {log_file})")


@app.command()
def server(
    port: Annotated[int, typer.Option(min=1, max=65535, help="The port nodes and `photon submit` connect to (the "
                                      "blob side channel listens on the next one unless --blob-port says "
                                      "otherwise).")] = 9092,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 to accept other machines.")] = "127.0.0.1",
    certs: CertsOpt = None,
    insecure: InsecureOpt = False,
    state: Annotated[Path, typer.Option(help="SuperLink database, Flower home and log.")] = Path(".photon/server"),
    runs: Annotated[Optional[Path], typer.Option(help="Runs root: every submitted run writes into a directory "
                                                 "under it (default STATE/runs).")] = None,
    blob_port: Annotated[Optional[int], typer.Option(min=0, max=65535, help="Port of the blob side channel for "
                                                     "payloads over 1 MB (default --port + 1; 0 turns it off: "
                                                     "everything through Flower).")] = None,
) -> None:
    """Start the SuperLink (and the blob side channel); registers every node-*.key.pub in --certs. Runs until
    Ctrl-C."""
    from photon.launch import processes, submit, superlink
    from photon.launch.certs import read_token

    superlink.check_ports(port, blob_port)
    _warn_insecure(insecure)
    _stop_on_sigterm()
    log_file = state / "superlink.log"
    since = log_file.stat().st_size if log_file.exists() else 0  # the log is appended across starts
    runs = (runs or state / "runs").resolve()
    proc = superlink.start_superlink(port, state, certs=certs, insecure=insecure, host=host, log_file=log_file,
                                     blob_port=blob_port, runs=runs)
    try:
        home = state / "flwr"
        token_file = superlink.operator_token_file(state, certs)
        submit.write_connection(home, f"{processes.local_address(host)}:{port}", certs=certs, insecure=insecure,
                                token=read_token(token_file))
        if certs is not None:
            for pub in sorted(certs.glob("node-*.key.pub")):
                console.print(f"{pub.name}: {submit.register_key(home, pub)}")
        mode = "insecure" if insecure else "TLS, registered nodes only"
        side = superlink.blob_port_of(port, blob_port)
        blobs = f", its blob side channel on {host}:{side} (open it to the nodes too)" if side else ""
        console.print(f"SuperLink on {host}:{port} ({mode}){blobs}; runs under {runs}; log {log_file}. Runs and node "
                      f"registrations need the operator token {token_file}. Nodes: photon node --superlink "
                      f"SERVER:{port} {'--insecure' if insecure else '--certs DIR --key node-<i>.key'}. Ctrl-C stops.",
                      soft_wrap=True)
        _wait_foreground(proc, "flower-superlink", log_file, since)
    finally:
        processes.stop(proc)


@app.command()
def node(
    superlink: SuperlinkOpt,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Local port for this node's ClientApps (127.0.0.1; "
                                      "one per node on a host).")] = 9094,
    certs: CertsOpt = None,
    key: Annotated[Optional[Path], typer.Option("--key", help="This node's private key (a path, or a name "
                                                "inside --certs).")] = None,
    insecure: InsecureOpt = False,
    data: Annotated[Optional[Path], typer.Option("--data", help="Prepared data on this node (default: the "
                                                 "run's data.prep_dir).")] = None,
    state: Annotated[Optional[Path], typer.Option(help="Node state and log (default .photon/node-PORT).")] = None,
    warm: Annotated[bool, typer.Option(help="Experimental: one long-lived ClientApp process and shorter polls "
                                       "instead of Flower's process per message (see docs/DEPLOY.md).")] = False,
    procs: Annotated[Optional[int], typer.Option(min=1, help="Processes that train each client together, one per "
                                                 "GPU (or CPU processes); default: the run's "
                                                 "federation.procs_per_node.")] = None,
    lean: Annotated[bool, typer.Option("--lean", help="Train with less memory for more compute: each parameter "
                                       "stepped inside backward, activation checkpointing, no micro-batches "
                                       "(the same updates; see docs/DEPLOY.md).")] = False,
) -> None:
    """Start a SuperNode that trains for the server at --superlink. Runs until Ctrl-C."""
    from photon.launch.processes import stop
    from photon.launch.supernode import start_supernode, wait_connected

    _warn_insecure(insecure, carries_token=False)
    _stop_on_sigterm()
    state = state or Path(f".photon/node-{port}")
    log_file = state / "supernode.log"
    since = log_file.stat().st_size if log_file.exists() else 0
    proc = start_supernode(superlink, port, state, data=data, certs=certs, key=key, insecure=insecure,
                           log_file=log_file, warm=warm, procs=procs, lean=lean)
    try:
        wait_connected(proc, log_file, superlink, certs=certs, insecure=insecure, since=since)
        console.print(f"SuperNode for {superlink} connected; log {log_file}. Ctrl-C stops.", soft_wrap=True)
        _wait_foreground(proc, "flower-supernode", log_file, since)
    finally:
        stop(proc)


@app.command()
def submit(
    superlink: SuperlinkOpt,
    preset: PresetOpt = "small",
    overrides: SetOpt = None,
    out: Annotated[Optional[str], typer.Option(help="Run directory ON THE SERVER, under its runs root (photon "
                                               "server --runs; default NAME-deployed).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint (same "
                                         "--preset/--set).")] = False,
    certs: CertsOpt = None,
    insecure: InsecureOpt = False,
    token: Annotated[Optional[Path], typer.Option(help="The server's operator token (default: operator.token in "
                                                  "--certs; with --insecure, .photon/server/operator.token).")] = None,
    home: Annotated[Path, typer.Option(help="Flower home for this client (its connection).")] = Path(".photon/submit"),
) -> None:
    """Start a federated run on the server's SuperLink, stream its log and wait for it to finish."""
    from photon.launch.certs import OPERATOR_TOKEN, read_token
    from photon.launch.processes import tls_args
    from photon.launch.submit import Detached, check_out, run_to_end

    tls_args(certs, insecure, "photon submit")  # before the token: its default place depends on these
    _warn_insecure(insecure)
    cfg = flags_config(preset, overrides)
    cfg.check_federated_schedule()  # here, not on the server after the run was created
    run_dir = out or f"{cfg.name}-deployed"
    check_out(run_dir)
    token = token or (certs / OPERATOR_TOKEN if certs is not None else Path(".photon/server") / OPERATOR_TOKEN)
    try:
        status = run_to_end(home, superlink, cfg, run_dir, resume=resume, certs=certs, insecure=insecure,
                            token=read_token(token), console=console)
    except Detached as e:  # Ctrl-C: not a failure, the run goes on
        err_console.print(str(e), highlight=False, soft_wrap=True)
        sys.exit(130)
    console.print(f"run {status['run-id']}: {status['status']} after {status['elapsed']:.0f} s; run directory: "
                  f"{run_dir} under the server's runs root", soft_wrap=True)
