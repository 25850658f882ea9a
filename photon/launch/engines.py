"""Which engine runs a federation on this machine (Flower's simulation, or in-process on a virtual clock), and
whether its clients and server fit the machine's memory before anything is set up."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

from photon.config import RunConfig

ENGINES = ("simulation", "inprocess")


def run_federated(cfg: RunConfig, run_dir: Path, resume: bool, engine: str, console: Console | None = None) -> dict:
    """The run on `engine`, one of ENGINES (`photon run` checks it before any data is prepared)."""
    if engine == "simulation":
        from photon.launch.simulation import run_simulated

        return run_simulated(cfg, run_dir, resume=resume, console=console)
    from photon.federation.runner import run_federation  # inprocess
    from photon.federation.worker import ClientWorker
    from photon.transport.virtual_clock import VirtualClockTransport

    transport = VirtualClockTransport(ClientWorker(run_dir / "node-cache"), cfg.federation.num_nodes)
    return run_federation(cfg, run_dir, transport, resume=resume, console=console)




def check_run_fits(cfg: RunConfig, engine: str | None = None) -> None:
    """Refuse a run that cannot fit this machine (`memory.check_fits`): a centralized one (`engine` None), or a
    federation with its server, whose simulation trains as many clients at once as it has workers."""
    from photon.train.device import resolve_device
    from photon.train.memory import check_fits

    device = resolve_device(cfg.train.device).type
    if engine is None:
        check_fits(cfg, device)
        return
    at_once = 1
    if engine == "simulation" and device == "cpu":  # workers train side by side, as many as have a client
        from photon.launch.simulation import simulation_resources

        fed = cfg.federation
        in_flight = fed.clients_per_round if fed.mode == "sync" else (fed.asynchronous.concurrency or fed.num_nodes)
        at_once = min(simulation_resources(cfg, os.cpu_count() or 1, 0)[0], in_flight)
    check_fits(cfg, device, clients_at_once=at_once, server=True)
