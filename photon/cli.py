"""The `photon` command line (typer): parses flags into a config once, then calls the library.

A `UserError` (bad input the user can fix) is printed as one line and exits with code 2; `--debug` shows
the traceback. Every verb has `--help`.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from photon.config import RunConfig, load_config, load_saved_config, preset_names
from photon.errors import UserError

# suggest_commands=False: click itself suggests a close command; typer's own suggestion would say it twice
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, suggest_commands=False,
                  help="Photon: federated pre-training of language models on Flower.")
bench_app = typer.Typer(no_args_is_help=True, suggest_commands=False,
                        help="Benchmarks: ratios against a baseline run in the same call.")
app.add_typer(bench_app, name="bench")
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}

PresetOpt = Annotated[str, typer.Option("--preset", "-p", help=f"Preset name ({', '.join(preset_names())}) "
                                        "or a YAML file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override, e.g. train.lr=3e-4 (repeatable).")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Prepared data dir (default: the preset's "
                                                "data.prep_dir; for a run or checkpoint, the run's).")]


def _print_version(value: bool) -> None:
    if value:
        import torch

        from photon import __version__

        console.print(f"photon {__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})",
                      highlight=False)
        raise typer.Exit()


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
          version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _config(preset: str, overrides: list[str] | None, data: Path | None = None, saved: Path | None = None,
            data_flag: str = "--data", **extra: object) -> RunConfig:
    """The preset (or, with `saved`, that run directory's config.json) plus --set, --data (`data_flag`: the flag
    that gave it) and other flags."""
    sets = list(overrides or [])
    if data is not None:
        if any(s.split("=", 1)[0].strip() == "data.prep_dir" for s in sets):
            raise UserError(f"{data_flag} and --set data.prep_dir both name the prepared data; give one of them")
        sets.append(f"data.prep_dir={data}")
    sets += [f"{k}={v}" for k, v in extra.items() if v is not None]
    return load_saved_config(saved, sets) if saved is not None else load_config(preset, sets)


# ---------------------------------------------------------------------------------------------------------
# Foundation: data, centralized training, evaluation, export


@app.command()
def prepare(
    data: Annotated[Optional[Path], typer.Option("--data", help="Your text: a dir of domain subdirs with .txt/"
                                                  ".jsonl/.parquet. Default: the built-in offline multi-domain "
                                                  "corpus.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Where to write (default: the preset's "
                                                "data.prep_dir).")] = None,
    preset: PresetOpt = "small",
    overrides: SetOpt = None,
    cache: Annotated[Path, typer.Option(help="Where downloaded source archives are kept.")] = Path("data/sources"),
) -> None:
    """Build the tokenizer and token shards (per domain, train/val) once, offline."""
    from photon.data.shards import prepare as do_prepare

    cfg = _config(preset, overrides, out, data_flag="--out")
    path = do_prepare(cfg.data, cfg.model.vocab_size, source=data, cache_dir=cache)
    console.print(f"prepared data in {path}")


@app.command("train-central")
def train_central(
    data: DataOpt = None,
    preset: PresetOpt = "small",
    overrides: SetOpt = None,
    steps: Annotated[Optional[int], typer.Option(help="Schedule length in steps (train.steps).")] = None,
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/central"),
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint, with the config "
                                         "saved there (--set/--steps apply on top; --preset is ignored).")] = False,
) -> None:
    """Train the centralized baseline on the union of all domains; checkpoints under OUT/checkpoints/."""
    from photon.train.centralized import train_central as run

    from photon.config import with_absolute_prep_dir

    from photon.checkpoint import refuse_a_resume_of_no_run, refuse_a_taken_run_dir

    if resume:
        refuse_a_resume_of_no_run(out)  # a mistyped --out must not fall back to the preset
    else:
        refuse_a_taken_run_dir(out)  # before the data is opened: the folder is the likelier mistake
    cfg = with_absolute_prep_dir(_config(preset, overrides, data, saved=out if resume else None,
                                         **{"train.steps": steps}))
    _check_fits(cfg)
    run(cfg, out, resume=resume, console=console)
    console.print(f"run directory: {out}")


@app.command("eval")
def eval_cmd(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint folder or run directory (its newest checkpoint).")],
    data: DataOpt = None,
    batches: Annotated[Optional[int], typer.Option(min=1, help="Validation batches per domain (default: the "
                                                   "run's train.eval_batches).")] = None,
) -> None:
    """Print validation loss and perplexity per domain and overall."""
    from photon.checkpoint import load_model_checkpoint, resolve_checkpoint
    from photon.config import with_overrides
    from photon.report import eval_table
    from photon.train.centralized import check_same_data, open_data
    from photon.train.evaluate import evaluable_domains, evaluate

    ckpt = resolve_checkpoint(ckpt)  # the checkpoint the table names: the newest that verifies
    model, cfg, meta, _ = load_model_checkpoint(ckpt)
    if data is not None:
        cfg = with_overrides(cfg, [f"data.prep_dir={data}"])
    prepared = open_data(cfg)  # refuses data of another vocabulary
    check_same_data(cfg, meta, prepared, ckpt)  # and of another tokenizer
    t = cfg.train
    evaluable_domains(prepared, t.seq_len)
    losses = evaluate(model, prepared, t.seq_len, t.batch_size, batches or t.eval_batches, t.bf16)
    console.print(eval_table(losses, title=f"{ckpt}"))


@app.command()
def export(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint folder or run directory.")],
    hf: Annotated[Path, typer.Option("--hf", help="Output dir loadable by transformers' from_pretrained.")],
) -> None:
    """Write a Hugging Face LlamaForCausalLM + tokenizer directory."""
    from photon.checkpoint import load_model_checkpoint
    from photon.model.hf import export_hf

    model, cfg, _, tokenizer = load_model_checkpoint(ckpt)
    export_hf(model, cfg.model, tokenizer, hf)
    console.print(f"exported to {hf} (load with AutoModelForCausalLM.from_pretrained({str(hf)!r}))")


@app.command()
def generate(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint folder or run directory.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "The",
    tokens: Annotated[int, typer.Option(min=1, help="New tokens to sample.")] = 80,
    temperature: Annotated[float, typer.Option(min=0.01, max=100.0)] = 0.8,
    top_k: Annotated[int, typer.Option(min=1)] = 50,
    seed: Annotated[int, typer.Option(min=0, max=2**63 - 1)] = 0,
) -> None:
    """Sample a continuation of PROMPT."""
    import torch

    if not math.isfinite(temperature):  # click's range check lets nan through
        raise UserError(f"--temperature {temperature}: give a number from 0.01 to 100, e.g. 0.8")

    from photon.checkpoint import load_model_checkpoint
    from photon.data.tokenizer import load_tokenizer

    model, _, _, tok_path = load_model_checkpoint(ckpt)
    tok = load_tokenizer(tok_path)
    ids = tok.encode(prompt).ids or [0]
    gen = torch.Generator().manual_seed(seed)
    out = model.generate(torch.tensor([ids]), tokens, temperature=temperature, top_k=top_k, generator=gen)
    console.print(tok.decode(out[0].tolist()), markup=False, highlight=False, soft_wrap=True)  # as generated


@app.command()
def plot(run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
         out: Annotated[Optional[str], typer.Option(help="Output file: .png, .pdf or .svg (no suffix: .png), or a "
                                                    "folder, existing or ending in / (default RUN_DIR/curves.png).")]
         = None) -> None:
    """Draw the loss / perplexity curves of a run (PNG, PDF or SVG)."""
    from photon.report import plot_run

    console.print(f"wrote {plot_run(run_dir, out)}")


@app.command()
def run(
    preset: PresetOpt = "small",
    overrides: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory (default runs/<preset>-federated).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the federated run in this directory with the "
                                                   "config saved there; --set still applies on top (e.g. "
                                                   "federation.rounds=20 --set federation.schedule_rounds=<the "
                                                   "original rounds> to run longer on the LR floor); --preset is "
                                                   "ignored.")] = None,
    engine: Annotated[str, typer.Option(help="simulation (Flower, default) or inprocess (no Flower: tasks run one "
                                        "at a time, timed by a virtual clock; deterministic, for debugging and "
                                        "straggler/async studies).")]
    = "simulation",
    cache: Annotated[Path, typer.Option(help="Where downloaded source archives are kept.")] = Path("data/sources"),
) -> None:
    """Federated pre-training on this machine: prepares data on first use, then runs Photon's rounds."""
    if engine not in ENGINES:  # before data is prepared (minutes on first use)
        raise UserError(f"--engine {engine!r}: choose {' or '.join(ENGINES)}")
    from photon.config import with_absolute_prep_dir

    if resume is not None:
        if out is not None:
            raise UserError(f"--out does not go with --resume: the run continues in {resume}")
        cfg = with_absolute_prep_dir(_config(preset, overrides, saved=resume))
        run_dir = resume
    else:
        cfg = with_absolute_prep_dir(_config(preset, overrides))
        run_dir = out or Path("runs") / f"{cfg.name}-federated"
        from photon.checkpoint import refuse_a_taken_run_dir

        refuse_a_taken_run_dir(run_dir)  # before data is prepared and Ray started (seconds to minutes)
    cfg.check_federated_schedule()  # so is a warmup longer than the schedule, and a run too big to fit
    _check_fits(cfg, engine)
    ensure_prepared(cfg, cache, built_in=False if resume is not None else None)
    try:
        summary = run_federated(cfg, run_dir, resume=resume is not None, engine=engine)
    except KeyboardInterrupt:
        from photon.federation.launch import exit_after_interrupt

        err_console.print(f"interrupted; the run keeps its last checkpoint: continue it with photon run --resume "
                          f"{run_dir}", highlight=False, soft_wrap=True)
        exit_after_interrupt(130)
    console.print(f"run directory: {summary['run_dir']}")


def _check_fits(cfg: RunConfig, engine: str | None = None) -> None:
    """Refuse a run that cannot fit this machine (`sizing.check_fits`): a centralized one (`engine` None), or a
    federation with its server, whose simulation trains as many clients at once as it has workers."""
    from photon.bench.sizing import check_fits
    from photon.train.device import resolve_device

    device = resolve_device(cfg.train.device).type
    if engine is None:
        check_fits(cfg, device)
        return
    at_once = 1
    if engine == "simulation" and device == "cpu":  # workers train side by side, as many as have a client
        from photon.federation.launch import simulation_resources

        fed = cfg.federation
        in_flight = fed.clients_per_round if fed.mode == "sync" else (fed.asynchronous.concurrency or fed.num_nodes)
        at_once = min(simulation_resources(cfg, os.cpu_count() or 1, 0)[0], in_flight)
    check_fits(cfg, device, clients_at_once=at_once, server=True)


def is_built_in_folder(prep_dir: Path) -> bool:
    """`prep_dir` is where a shipped preset keeps the built-in corpus (data/prepared-v<vocab>, from here)."""
    return Path(prep_dir).absolute() in {load_config(name).data.prep_dir.absolute() for name in preset_names()}


def ensure_prepared(cfg: RunConfig, cache: Path = Path("data/sources"), built_in: bool | None = None) -> None:
    """First use: prepare the built-in offline corpus; afterwards whatever is in data.prep_dir is used.
    `built_in` False (a resume), or None and a folder other than a shipped preset's (a mistyped `--data`):
    missing data is an error, never silently replaced by the built-in corpus."""
    from photon.data.shards import prepare as do_prepare

    prep_dir = cfg.data.prep_dir
    if (prep_dir / "manifest.json").exists():
        return
    if built_in if built_in is not None else is_built_in_folder(prep_dir):
        do_prepare(cfg.data, cfg.model.vocab_size, source=None, cache_dir=cache)
        return
    raise UserError(f"data.prep_dir={prep_dir} holds no prepared data (no manifest.json); point at the run's data "
                    f"with --set data.prep_dir=PATH, or prepare it there first (photon prepare --out {prep_dir}, "
                    "with the run's preset, plus --data YOUR_TEXT unless it is the built-in corpus)")


ENGINES = ("simulation", "inprocess")


def run_federated(cfg: RunConfig, run_dir: Path, resume: bool, engine: str) -> dict:
    """The run on `engine`, one of ENGINES (`run` checks it before any data is prepared)."""
    if engine == "simulation":
        from photon.federation.launch import run_simulated

        return run_simulated(cfg, run_dir, resume=resume, console=console)
    from photon.federation.runner import run_federation  # inprocess
    from photon.federation.virtual_clock import VirtualClockTransport
    from photon.federation.worker import ClientWorker

    transport = VirtualClockTransport(ClientWorker(run_dir / "node-cache"), cfg.federation.num_nodes)
    return run_federation(cfg, run_dir, transport, resume=resume, console=console)


@app.command()
def presets() -> None:
    """List the presets with their model sizes."""
    from photon.model.transformer import describe

    for name in preset_names():
        cfg = load_config(name)
        console.print(f"[bold]{name:12s}[/] {describe(cfg.model)}")


# ---------------------------------------------------------------------------------------------------------
# Deployment runtime (many machines): certs, server, node, submit — see photon/federation/deploy.py

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

    from photon.federation.certs import make_certs

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
    from photon.federation.deploy import explain_exit, stop

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
    from photon.federation import deploy
    from photon.federation.certs import read_token

    if blob_port is not None and blob_port == port:
        raise UserError(f"--blob-port {blob_port} is --port too: the blob side channel needs a port of its own "
                        f"(leave --blob-port out for --port + 1)")
    if blob_port is None and port == 65535:
        raise UserError("--port 65535 leaves no --port + 1 for the blob side channel; pick a lower --port or pass "
                        "--blob-port")
    _warn_insecure(insecure)
    _stop_on_sigterm()
    log_file = state / "superlink.log"
    since = log_file.stat().st_size if log_file.exists() else 0  # the log is appended across starts
    runs = (runs or state / "runs").resolve()
    proc = deploy.start_superlink(port, state, certs=certs, insecure=insecure, host=host, log_file=log_file,
                                  blob_port=blob_port,
                                  runs=runs)
    try:
        home = state / "flwr"
        token_file = deploy.operator_token_file(state, certs)
        deploy.write_connection(home, f"{deploy.local_address(host)}:{port}", certs=certs, insecure=insecure,
                                token=read_token(token_file))
        if certs is not None:
            for pub in sorted(certs.glob("node-*.key.pub")):
                console.print(f"{pub.name}: {deploy.register_key(home, pub)}")
        mode = "insecure" if insecure else "TLS, registered nodes only"
        side = deploy.blob_port_of(port, blob_port)
        blobs = f", its blob side channel on {host}:{side} (open it to the nodes too)" if side else ""
        console.print(f"SuperLink on {host}:{port} ({mode}){blobs}; runs under {runs}; log {log_file}. Runs and node "
                      f"registrations need the operator token {token_file}. Nodes: photon node --superlink "
                      f"SERVER:{port} {'--insecure' if insecure else '--certs DIR --key node-<i>.key'}. Ctrl-C stops.",
                      soft_wrap=True)
        _wait_foreground(proc, "flower-superlink", log_file, since)
    finally:
        deploy.stop(proc)


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
    from photon.federation import deploy

    _warn_insecure(insecure, carries_token=False)
    _stop_on_sigterm()
    state = state or Path(f".photon/node-{port}")
    log_file = state / "supernode.log"
    since = log_file.stat().st_size if log_file.exists() else 0
    proc = deploy.start_supernode(superlink, port, state, data=data, certs=certs, key=key, insecure=insecure,
                                  log_file=log_file, warm=warm, procs=procs, lean=lean)
    try:
        deploy.wait_connected(proc, log_file, superlink, certs=certs, insecure=insecure, since=since)
        console.print(f"SuperNode for {superlink} connected; log {log_file}. Ctrl-C stops.", soft_wrap=True)
        _wait_foreground(proc, "flower-supernode", log_file, since)
    finally:
        deploy.stop(proc)


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
    from photon.federation import deploy
    from photon.federation.certs import OPERATOR_TOKEN, read_token

    deploy.tls_args(certs, insecure, "photon submit")  # before the token: its default place depends on these
    _warn_insecure(insecure)
    cfg = _config(preset, overrides)
    cfg.check_federated_schedule()  # here, not on the server after the run was created
    run_dir = out or f"{cfg.name}-deployed"
    deploy.check_out(run_dir)
    token = token or (certs / OPERATOR_TOKEN if certs is not None else Path(".photon/server") / OPERATOR_TOKEN)
    try:
        status = deploy.run_to_end(home, superlink, cfg, run_dir, resume=resume, certs=certs, insecure=insecure,
                                   token=read_token(token), console=console)
    except deploy.Detached as e:  # Ctrl-C: not a failure, the run goes on
        err_console.print(str(e), highlight=False, soft_wrap=True)
        sys.exit(130)
    console.print(f"run {status['run-id']}: {status['status']} after {status['elapsed']:.0f} s; run directory: "
                  f"{run_dir} under the server's runs root", soft_wrap=True)


# ---------------------------------------------------------------------------------------------------------
# Benchmarks


def _numbers(text: str, kind: type, flag: str, example: str) -> tuple:
    """A comma-separated list of positive, finite numbers from a flag, or a one-line error naming it."""
    try:
        values = tuple(kind(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated {kind.__name__}s, e.g. {example}") from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise UserError(f"{flag} {text!r}: each must be a positive number, e.g. {example}")
    return values


@bench_app.callback()
def _bench(results: Annotated[Optional[Path], typer.Option(
        "--results", help="Where the benchmarks store their records (default docs/results, which `photon bench "
        "report` renders into the docs): another folder for a trial run, e.g. `photon bench --results "
        "/tmp/trial trainer --steps 2`; the plots of compression, stragglers and claims then go to DIR/img, not "
        "docs/img.")]
        = None
        ) -> None:
    if results is not None:
        from photon.bench.results import store_results_in

        store_results_in(results)


@bench_app.command("trainer")
def bench_trainer(
    preset: PresetOpt = "small",
    overrides: SetOpt = None,
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per arm.")] = 20,
    repeats: Annotated[int, typer.Option(min=1, help="Alternating repeats per arm (best is kept).")] = 5,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or mps (train.device).")] = None,
    settings: Annotated[str, typer.Option(help="Comma-separated settings: fp32, bf16, fp32+compile, "
                                          "bf16+compile.")] = "fp32,bf16,fp32+compile,bf16+compile",
) -> None:
    """Tokens/s of photon's local trainer vs a bare PyTorch loop (same model, batch, threads, device), and
    model FLOP/s against the machine's measured matmul peak; stores docs/results/trainer-DEVICE.json."""
    from photon.bench.trainer import run_trainer_bench

    chosen = tuple(s.strip() for s in settings.split(",") if s.strip())
    bad = [s for s in chosen if s not in ("fp32", "bf16", "fp32+compile", "bf16+compile")]
    if bad or not chosen:
        raise UserError(f"--settings {','.join(bad) or settings!r}: choose from fp32, bf16, fp32+compile, "
                        "bf16+compile")
    cfg = _config(preset, overrides, **{"train.device": device})
    run_trainer_bench(cfg, steps=steps, repeats=repeats, settings=chosen, console=console)


@bench_app.command("federation")
def bench_federation(
    preset: PresetOpt = "small",
    overrides: SetOpt = None,
    local_steps: Annotated[int, typer.Option(min=1, help="H for the overhead run.")] = 64,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds of the overhead run (the first includes start-up).")] = 3,
    memory_preset: Annotated[str, typer.Option(help="Model shape for the aggregator-memory probe.")] = "paper-125m",
    out: Annotated[Path, typer.Option(help="Where runs and results go.")] = Path("runs/bench-federation"),
    deployed: Annotated[bool, typer.Option("--deployed", help="Also measure the overhead on Flower's deployment "
                                           "runtime: a loopback SuperLink and 2 `photon node`s (insecure, "
                                           "127.0.0.1 only).")] = False,
) -> None:
    """Federation overhead in simulation, aggregator peak RAM for K=2,4,8, bytes per token vs data-parallel."""
    from photon.bench.federation import run_federation_bench
    from photon.bench.outdir import fresh_out_dir

    k = 2
    cfg = _config(preset, list(overrides or []) + [
        f"federation.local_steps={local_steps}", f"federation.rounds={rounds}", f"federation.clients_per_round={k}",
        f"federation.num_nodes={k}", f"federation.eval_every={rounds}"])
    memory_cfg = load_config(memory_preset)
    fresh_out_dir(out)  # once every option is known to be good
    ensure_prepared(cfg)
    run_federation_bench(cfg, memory_cfg, out, console, deployed=deployed)


@bench_app.command("robust")
def bench_robust(
    preset: PresetOpt = "tiny",
    overrides: SetOpt = None,
    attack: Annotated[str, typer.Option(help="flip: the attacker reverses and scales its honest update; noise: "
                                        "it sends θ + N(0, s²).")] = "flip",
    scales: Annotated[str, typer.Option(help="Comma-separated attack scales s.")] = "1,2,5,10",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per arm.")] = 1,
    out: Annotated[Path, typer.Option(help="Where the arms' runs go.")] = Path("runs/bench-robust"),
) -> None:
    """One of four clients attacks every round: the default screen vs no defence, median and trimmed mean;
    stores docs/results/robust-ATTACK.json."""
    from photon.bench.robust import run_robust_bench

    if attack not in ("flip", "noise"):
        raise UserError(f"--attack {attack!r}: choose flip or noise")
    values = _numbers(scales, float, "--scales", "1,2,5,10")
    cfg = _config(preset, list(overrides or []) + ["data.partition.num_clients=4",
                                                     "federation.clients_per_round=4"])
    ensure_prepared(cfg)
    run_robust_bench(cfg, out, attack, values, seeds, console)


@bench_app.command("stragglers")
def bench_stragglers(
    preset: PresetOpt = "small",
    overrides: SetOpt = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per arm.")] = 2,
    out: Annotated[Path, typer.Option(help="Where the arms' runs go (rerunning skips finished arms).")]
    = Path("runs/bench-stragglers"),
) -> None:
    """Clean sync vs sync with a fixed or adaptive deadline vs async under slow clients and lost replies, on
    the in-process engine's virtual clock; stores docs/results/stragglers.json and docs/img/stragglers.png (with
    --results DIR: DIR and DIR/img)."""
    from photon.bench.stragglers import run_stragglers_bench

    cfg = _config(preset, overrides)
    ensure_prepared(cfg)
    run_stragglers_bench(cfg, out, seeds, console)


@bench_app.command("wire")
def bench_wire(
    preset: PresetOpt = "paper-350m",
    overrides: SetOpt = None,
    out: Annotated[Path, typer.Option(help="Where the runs and logs go.")] = Path("runs/bench-wire"),
) -> None:
    """A large model through the real Flower path on loopback (deployed and simulated): peak RSS of server and
    node over the model size, seconds per transfer, against a plain socket copy; stores docs/results/wire.json."""
    from photon.bench.outdir import fresh_out_dir
    from photon.bench.wire import run_wire_bench

    cfg = _config(preset, overrides)
    fresh_out_dir(out)  # before the data is prepared (minutes)
    ensure_prepared(cfg)
    run_wire_bench(cfg, out, console)


@bench_app.command("prepare")
def bench_prepare(
    preset: PresetOpt = "small",
    overrides: SetOpt = None,
    sizes: Annotated[str, typer.Option(help="Comma-separated input sizes in GB (the built-in corpus repeated).")]
    = "0.1,1",
    out: Annotated[Path, typer.Option(help="Where inputs (deleted after each size) and logs go.")]
    = Path("runs/bench-prepare"),
    cache: Annotated[Path, typer.Option(help="Where downloaded source archives are kept.")] = Path("data/sources"),
) -> None:
    """Streaming `photon prepare` on growing inputs: MB/s against one `encode_batch` call on the same text, and
    peak RSS per size (it must stay flat); stores docs/results/prepare.json."""
    from photon.bench.prepare import builtin_corpus, run_prepare_bench

    values = _numbers(sizes, float, "--sizes", "0.1,1")
    run_prepare_bench(_config(preset, overrides), values, out, builtin_corpus(cache), console)


@bench_app.command("compression")
def bench_compression(
    preset: PresetOpt = "small",
    overrides: SetOpt = None,
    hs: Annotated[str, typer.Option("--hs", help="Comma-separated local steps H.")] = "16,64",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds of the headline arms (fp32, int8, top-k 1%).")] = 2,
    jobs: Annotated[int, typer.Option(min=1, help="Arms trained at once, one process and one thread each.")] = 2,
    out: Annotated[Path, typer.Option(help="Where the arms' runs go (rerunning skips finished arms).")]
    = Path("runs/bench-compression"),
) -> None:
    """Every codec up-link only and both ways at equal tokens: bytes per token against data-parallel, perplexity
    cost against fp32 Photon, codec time; stores docs/results/compression.json and docs/img/compression.png
    (with --results DIR: DIR and DIR/img)."""
    from photon.bench.compression import run_compression_bench

    values = _numbers(hs, int, "--hs", "16,64")
    cfg = _config(preset, overrides)
    ensure_prepared(cfg)
    run_compression_bench(cfg, out, values, seeds, jobs, console)


@bench_app.command("demo")
def bench_demo(
    preset: PresetOpt = "small",
    overrides: SetOpt = None,
    out: Annotated[Path, typer.Option(help="Run directory (replaced by each run).")] = Path("runs/bench-demo"),
) -> None:
    """The main job (`make run`) timed and scored: per-domain perplexity before/after and wall time; stores
    docs/results/demo.json (the README's and RESULTS.md's description of `make run` come from it)."""
    from photon.bench.demo import run_demo_bench

    cfg = _config(preset, overrides)
    ensure_prepared(cfg)
    run_demo_bench(cfg, out, console)


@bench_app.command("report")
def bench_report(
    results: Annotated[Optional[Path], typer.Option(help="Stored benchmark outputs (default: `photon bench "
                                                    "--results`, docs/results).")] = None,
    target: Annotated[Optional[list[Path]], typer.Option(help="Markdown files whose results blocks are rewritten "
                                                         "(default: docs/RESULTS.md, README.md, docs/DEPLOY.md).")]
    = None,
) -> None:
    """Rewrite the measured blocks of docs/RESULTS.md (and the computed tables of README.md and docs/DEPLOY.md)
    from the stored benchmark outputs (docs/results/*.json) and the presets."""
    from photon.bench.report import TARGETS, write_report
    from photon.bench.results import chosen_results_dir, plots_dir

    targets = tuple(target) if target else TARGETS
    for t in targets:
        if not t.is_file():
            raise UserError(f"{t} does not exist; run from the repository root or pass --target")
    chosen = results or chosen_results_dir()
    names = write_report(chosen, targets)
    console.print(f"rewrote {len(names)} block(s) in {', '.join(map(str, targets))}: {', '.join(names) or 'none'}")
    drawn, shown = plots_dir(chosen), [t.parent / "img" for t in targets if t.name == "RESULTS.md"]
    if shown and drawn.is_dir() and drawn.resolve() != shown[0].resolve():  # a trial's plots, beside its numbers
        plots = sorted(drawn.glob("*.png"))
        shown[0].mkdir(exist_ok=True)
        for png in plots:
            shutil.copyfile(png, shown[0] / png.name)
        console.print(f"copied {len(plots)} plot(s) from {drawn} into {shown[0]}")


@bench_app.command("claims")
def bench_claims(
    scale: Annotated[str, typer.Option(help="tiny (≈30 min), small or medium (< 2 h on 2 free cores); "
                                       "--dry-run prints the plan and its estimated duration.")] = "tiny",
    out: Annotated[Optional[Path], typer.Option(help="Where arms and claims.md go (default runs/claims-SCALE). "
                                                "Rerunning skips finished arms.")] = None,
    seeds: Annotated[Optional[int], typer.Option(min=1, help="Seeds of the headline arms (default: the "
                                                 "scale's).")] = None,
    sweep_seeds: Annotated[Optional[int], typer.Option(min=1, help="Seeds of the secondary arms (iid, bigbatch, "
                                                       "diloco-reset, K and H sweeps; default: the scale's).")] = None,
    jobs: Annotated[Optional[int], typer.Option(min=1, help="Arms trained at once, one process and one thread "
                                                "each (default: the scale's, 2).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the plan and its cost estimate (from a throughput "
                                          "measured now), train nothing.")] = False,
    results: Annotated[Optional[Path], typer.Option(help="Where the record claims-SCALE.json is stored (default: "
                                                    "`photon bench --results`, docs/results).")] = None,
    overrides: SetOpt = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Prepared data every arm trains and is evaluated "
                                                 "on (default: the scale's preset's data.prep_dir).")] = None,
) -> None:
    """The paper's claims as experiments (federated vs centralized in both regimes, LR sweeps, K, H, network,
    heterogeneity, DiLoCo, torchft, ablation), stored in RESULTS/claims-SCALE.json with plots in docs/img
    (RESULTS/img with --results); `photon bench report` renders them into docs/RESULTS.md and the README."""
    import dataclasses
    import shlex

    from photon.bench.claims import PLANS, run_claims

    if scale not in PLANS:
        raise UserError(f"--scale {scale!r}: choose one of {', '.join(PLANS)}")
    plan = PLANS[scale]
    plan = dataclasses.replace(plan, seeds=seeds or plan.seeds, sweep_seeds=sweep_seeds or plan.sweep_seeds,
                               jobs=jobs or plan.jobs)
    cfg = _config(plan.preset, overrides, data)
    ensure_prepared(cfg)
    out = out or Path("runs") / f"claims-{scale}"
    run_claims(cfg, out, plan, console=console, command=shlex.join(["photon", *sys.argv[1:]]), scale=scale,
               results_dir=results, dry_run=dry_run)

def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        app()
    except UserError as e:
        if _state["debug"]:
            raise
        # soft_wrap: one line at any terminal width; escape: a path like data/[v2] is printed as typed.
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as e:  # the machine's limits (disk, memory) and a path the user gave: one line too
        line = None if _state["debug"] else _environment_error(e)
        if line is None:
            raise
        err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        from photon.federation.launch import exit_after_interrupt

        err_console.print("interrupted")
        exit_after_interrupt(130)


_PATH_HINTS = {PermissionError: "choose a path you can write (or read), or fix its permissions",
               FileExistsError: "a file is in the way of a folder (or the reverse); choose another path",
               NotADirectoryError: "a part of the path is a file, not a folder; choose another path",
               IsADirectoryError: "a folder is where a file should be; choose another path",
               FileNotFoundError: "check the path (relative paths start from the current folder)"}
_DISK_HINTS = {errno.ENOSPC: "the disk is full: free space there or choose another place",
               errno.EDQUOT: "the disk quota is used up: free space there or choose another place",
               errno.EROFS: "that file system is read-only: choose a writable place"}
_WHERE = " (photon --debug COMMAND shows where)"
_OUT_OF_MEMORY = ("out of memory: the model or the batch is too large for this machine; lower train.batch_size (or "
                  "set train.micro_batch_size), or use a smaller preset (README's presets table gives the memory a "
                  "client needs)")


def _environment_error(e: Exception) -> str | None:
    """An error from the machine's limits or a path the user gave, as one line (what, and what to do); None for
    anything else (a bug: its traceback is shown)."""
    if isinstance(e, OSError) and e.errno in _DISK_HINTS:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}; {_DISK_HINTS[e.errno]}{_WHERE}"
    if type(e) in _PATH_HINTS and e.filename is not None:  # one with no path is not a path the user gave: a bug
        path = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
        return f"{path}: {e.strerror or e}; {_PATH_HINTS[type(e)]}{_WHERE}"
    text = str(e)
    if type(e).__name__ == "SafetensorError":  # safetensors' writer reports the OS error in its message
        code = next((c for c in _DISK_HINTS if f"os error {c})" in text), None)
        if code is not None:
            return f"writing a checkpoint: {os.strerror(code)}; {_DISK_HINTS[code]}{_WHERE}"
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
            isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)):
        return f"{_OUT_OF_MEMORY}{_WHERE}"
    return None


if __name__ == "__main__":
    main()
