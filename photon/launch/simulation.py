"""Starting a federation: Flower's simulation runtime on this machine (the default), or the deployment
runtime across machines (`superlink.py`, `supernode.py`, `submit.py`). Flower's environment variables are set
here, at the edge.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

from photon.checkpoint import hold_run_dir, refuse_a_resume_of_no_run
from photon.config import RunConfig, with_overrides
from photon.launch.processes import flower_env

log = logging.getLogger(__name__)
SERVER_STOP_S = 60  # how long an interrupted simulation waits for its server thread to stop




def with_threads(cfg: RunConfig, workers: int) -> RunConfig:
    """Give each concurrent worker its share of the cores unless the user chose a thread count."""
    if cfg.train.threads:
        return cfg
    return with_overrides(cfg, [f"train.threads={max(1, (os.cpu_count() or 1) // workers)}"])


def visible_gpus(cfg: RunConfig) -> int:
    """GPUs the simulation may hand to its nodes: none when training is pinned to the CPU."""
    if cfg.train.device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def simulation_resources(cfg: RunConfig, cpus: int, gpus: int) -> tuple[int, dict[str, float]]:
    """How many simulated nodes run at once, and the Ray resources each asks for. Without GPUs: one worker per
    core (at most one per node), each its share of the cores. With GPUs: each running node gets
    `federation.procs_per_node` GPUs (one per rank of a multi-process client), so as many nodes run at once
    as the GPUs allow."""
    nodes, procs = cfg.federation.num_nodes, cfg.federation.procs_per_node
    if gpus:
        workers = max(1, min(nodes, gpus // procs or 1))
        return workers, {"num_cpus": max(1.0, cpus / workers), "num_gpus": float(min(procs, gpus))}
    workers = max(1, min(nodes, cpus))
    return workers, {"num_cpus": cpus / workers, "num_gpus": 0.0}


@contextlib.contextmanager
def loopback_blobs(cfg: RunConfig, run_dir: Path) -> Iterator[Any]:
    """The blob side channel (blobs.py) for a simulation whose model is large enough to use it: a blob server
    on 127.0.0.1 in its own process, as `photon server` runs one, and the `Channel` the ServerApp mints its
    capabilities with. Flower's simulation keeps every message in the driver's memory until it is pulled; with
    the channel, messages carry references and the payloads move as deployed. None for smaller models (every
    payload would stay in the message anyway). The blobs folder is removed when the simulation ends."""
    from photon.launch.certs import write_private
    from photon.launch.processes import die_with_parent, free_port, stop, wait_listening
    from photon.model.transformer import count_params
    from photon.transport.blobs import Channel, serve_command
    from photon.transport.client_app import BLOB_THRESHOLD

    if count_params(cfg.model) * 4 < BLOB_THRESHOLD:
        yield None
        return
    root = Path(run_dir).resolve() / "blobs"
    root.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32).encode()
    write_private(root / "secret", secret)
    port = free_port()
    proc = subprocess.Popen(serve_command(root / "store", "127.0.0.1", port, root / "secret"),
                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
    try:
        wait_listening(proc, "127.0.0.1", port, "the simulation's blob server")
        yield Channel(root / "store", secret, port)
    finally:
        stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def run_simulated(cfg: RunConfig, run_dir: Path, resume: bool = False, console: Console | None = None,
                  **kwargs: Any) -> dict[str, Any]:
    """Run the federation with Flower's simulation runtime: `federation.num_nodes` virtual SuperNodes,
    as many Ray workers as there are cores (at most one per node), each with its share of threads. Payloads
    over 1 MB take the blob side channel on loopback (`loopback_blobs`), as they do deployed."""
    os.environ.update(flower_env(Path(run_dir).resolve().parent / ".flwr"))
    from photon.transport.client_app import make_client_app
    from photon.transport.server_app import make_server_app

    nodes = cfg.federation.num_nodes
    workers, resources = simulation_resources(cfg, os.cpu_count() or 1, visible_gpus(cfg))
    cfg = with_threads(cfg, workers)
    result: dict[str, Any] = {}
    stop, started, done = threading.Event(), threading.Event(), threading.Event()
    if resume:
        refuse_a_resume_of_no_run(run_dir)
    # one writer per run folder, held from before the blob server's folder is made (a second run on a live
    # folder would replace its blob store) until the simulation has ended
    with hold_run_dir(Path(run_dir), say=(console or Console()).print), loopback_blobs(cfg, Path(run_dir)) as blobs:
        server_app = make_server_app(cfg, Path(run_dir), resume, result, blobs=blobs, stop=stop, started=started,
                                     done=done, console=console, lock_held=True, **kwargs)
        client_app = make_client_app(str(Path(run_dir).resolve() / "node-cache"))
        try:
            _simulate(cfg, server_app, client_app, nodes, resources)
        except KeyboardInterrupt:
            _stop_after_interrupt(stop, done if started.is_set() else None)
            raise
    if "error" in result:
        raise result["error"]
    if "rounds" not in result:
        raise RuntimeError(f"the simulation ended without a result; see the log above and {run_dir}")
    return result


def _stop_after_interrupt(stop: threading.Event, done: threading.Event | None) -> None:
    """Ctrl-C: Flower stops its runtime but not our server thread, which would wait for replies that never come
    (and keep the process alive). Tell it to stop and wait until it has: it stops at its next Grid call, after
    any checkpoint it is writing. Flower's threads log as they wind down: kept quiet. Ray is left to the exit
    (`exit_after_interrupt`): stopping it here, while Flower's threads still call it, can end the process."""
    if logging.getLogger().level > logging.INFO:
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
    stop.set()
    if done is not None and not done.wait(SERVER_STOP_S):  # None: the server thread had not started
        log.warning("the server thread did not stop within %d s of the interrupt", SERVER_STOP_S)


def exit_after_interrupt(code: int = 130) -> NoReturn:
    """Leave after an interrupt once our own work is closed. Flower's simulation workers can still be waiting
    in `ray.get` for actors the interrupt killed, and Python joins such threads at exit: forever. So when
    threads other than daemons are left, flush what we printed and logged, and exit without joining them (Ray's
    own processes end with ours: Ray starts them to die with their parent)."""
    left = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not left:
        sys.exit(code)
    log.debug("exiting past %d thread(s) still running: %s", len(left), ", ".join(t.name for t in left))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _simulate(cfg: RunConfig, server_app: Any, client_app: Any, nodes: int, resources: dict[str, float]) -> None:
    """Flower's `run_simulation`, quiet, with Ray given the cores and GPUs."""
    from flwr.simulation import run_simulation

    debug = logging.getLogger().level <= logging.INFO
    backend = {"client_resources": resources,
               "init_args": {"num_cpus": os.cpu_count() or 1, "num_gpus": visible_gpus(cfg),
                             "include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": debug}}
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    # Quiet: run_simulation warns that it is deprecated, and Flower logs each ClientApp traceback that our
    # transport already reports as one line. `photon --debug` keeps them.
    flwr_log.setLevel(logging.INFO if debug else logging.CRITICAL)
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=nodes, backend_config=backend)
    finally:
        flwr_log.setLevel(level)
