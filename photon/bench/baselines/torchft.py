"""A peer run side by side with our DiLoCo arm: torchft's DiLoCo on our model, data, seeds and hyperparameters.

One process per client (a torchft replica group of one rank: Manager + gloo process group), a torchft
lighthouse, all on 127.0.0.1; each replica trains its data partition with our inner loop (`train_local`) and
torchft's `DiLoCo` syncs every H steps (pseudo-gradients averaged by all-reduce, outer Nesterov SGD). It is a
reference to measure ourselves against, not a backend: a config it cannot reproduce is refused before anything
starts, and nothing from torchft is copied here (torchft is the optional extra `peers`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from photon.checkpoint import atomic_write_text
from photon.config import (
    FaultConfig,
    RunConfig,
    build_config,
    config_to_dict,
    with_overrides,
)
from photon.errors import UserError

RECORD = "torchft.json"  # in OUT: the run's record
START_TIMEOUT_S = 120.0  # the lighthouse must be up by then
QUORUM_TIMEOUT_S = 3600  # a sync waits this long for the slowest replica (torchft suggests ~1 h for DiLoCo)
COLLECTIVE_TIMEOUT_S = 600  # all-reduce, should_commit


# ---------------------------------------------------------------------------------------------------------
# What can be matched


def check_matchable(cfg: RunConfig) -> None:
    """Refuse, in one line naming the key, a config whose recipe torchft's DiLoCo cannot reproduce here."""
    fed, t = cfg.federation, cfg.train
    refusals = [
        (fed.outer.name != "nesterov", f"federation.outer.name={fed.outer.name}: torchft's DiLoCo is matched only "
         "for DiLoCo's outer Nesterov SGD; set federation.outer.name=nesterov"),
        (fed.mode != "sync", f"federation.mode={fed.mode}: torchft's DiLoCo syncs every replica each round; "
         "set federation.mode=sync"),
        (fed.clients_per_round != cfg.data.partition.num_clients,
         f"federation.clients_per_round={fed.clients_per_round} < data.partition.num_clients="
         f"{cfg.data.partition.num_clients}: every torchft replica joins every sync; sample all clients (K = N)"),
        (fed.compression.up.codec != "fp32" or fed.compression.down.codec != "fp32",
         "federation.compression: torchft's DiLoCo all-reduces fp32 here (its quantisation needs CUDA + Triton); "
         "set federation.compression.up.codec=fp32 and federation.compression.down.codec=fp32"),
        (fed.aggregation != "mean", f"federation.aggregation={fed.aggregation}: torchft averages; set "
         "federation.aggregation=mean"),
        (fed.clip_update_norm is not None, f"federation.clip_update_norm={fed.clip_update_norm}: torchft does not "
         "clip updates; unset it"),
        (fed.faults != FaultConfig(), "federation.faults: the torchft peer runs without injected faults; "
         "remove the federation.faults settings"),
        (fed.procs_per_node != 1, f"federation.procs_per_node={fed.procs_per_node}: the torchft peer runs one "
         "process per client; set federation.procs_per_node=1"),
        (t.device in ("cuda", "mps"), f"train.device={t.device}: the torchft peer runs on CPU with gloo; set "
         "train.device=cpu"),
        (t.compile, "train.compile=true: the torchft peer trains the eager model; set train.compile=false"),
    ]
    for refused, why in refusals:
        if refused:
            raise UserError(f"cannot run this config on torchft: {why}")


def torchft_version() -> str:
    if importlib.util.find_spec("torchft") is None:
        raise UserError("torchft is not installed: run `.venv/bin/pip install -e '.[peers]'` (torchft==0.2.0)")
    return importlib.metadata.version("torchft")


# ---------------------------------------------------------------------------------------------------------
# The launcher


def _replica_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo on loopback, not the host's first interface
    return env


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate, then kill, the processes we started that are still running."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait_lighthouse(proc: subprocess.Popen, addr_file: Path, log_path: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not addr_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"torchft lighthouse exited with code {proc.returncode}; see {log_path}:\n"
                               f"{log_path.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"torchft lighthouse not up after {START_TIMEOUT_S:.0f} s; see {log_path}")
        time.sleep(0.1)
    return addr_file.read_text().strip()


def _wait_replicas(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Until every replica exits 0; the first failure stops the others (they would wait for it forever)."""
    while True:
        codes = [p.poll() for p in procs]
        bad = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
        if bad is not None:
            raise RuntimeError(f"torchft replica {bad} exited with code {codes[bad]}; see {logs[bad]}:\n"
                               f"{logs[bad].read_text()[-3000:]}")
        if all(c == 0 for c in codes):
            return
        time.sleep(0.5)


def run_torchft_diloco(cfg: RunConfig, out: Path, seed: int) -> dict[str, Any]:
    """Train `cfg` at `seed` with torchft's DiLoCo (K = N replicas on loopback); write and return the record.

    The record holds the final per-domain and overall validation loss and perplexity (the rows our arms
    score), each round's compute and synchronisation seconds per replica, the torchft version and the
    commands that ran."""
    cfg = with_overrides(cfg, [f"train.seed={seed}"])
    check_matchable(cfg)
    cfg.check_federated_schedule()
    version = torchft_version()
    from photon.data.partition import client_seed, client_stream, make_partition
    from photon.train.centralized import open_data

    prepared = open_data(cfg)
    part = make_partition(prepared.manifest, cfg.data.partition)
    for c in part["clients"]:  # every client can fill a batch: say so now, not from inside a replica
        client_stream(prepared, part, c["id"], cfg.train.seq_len, cfg.train.batch_size, client_seed(cfg, c["id"]))
    out = Path(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("replica*.json"), out / "lighthouse.addr", out / RECORD]:
        old.unlink(missing_ok=True)
    cfg_path = out / "config.json"
    atomic_write_text(cfg_path, json.dumps(config_to_dict(cfg), indent=1))
    k = cfg.data.partition.num_clients
    me = [sys.executable, "-m", "photon.bench.baselines.torchft"]
    pid = str(os.getpid())  # children exit when this process is gone (_exit_with_parent)
    lighthouse_cmd = [*me, "--lighthouse", pid, str(out), str(k)]
    replica_cmds = [[*me, "--replica", pid, str(out), str(cid)] for cid in range(k)]
    procs: list[subprocess.Popen] = []
    start = time.perf_counter()
    try:
        lh_log = out / "logs" / "lighthouse.log"
        with open(lh_log, "w") as f:
            procs.append(subprocess.Popen(lighthouse_cmd, stdout=f, stderr=subprocess.STDOUT))
        address = _wait_lighthouse(procs[0], out / "lighthouse.addr", lh_log)
        logs = [out / "logs" / f"replica{cid}.log" for cid in range(k)]
        for cmd, path in zip(replica_cmds, logs):
            with open(path, "w") as f:
                procs.append(subprocess.Popen([*cmd, address], stdout=f, stderr=subprocess.STDOUT,
                                              env=_replica_env()))
        _wait_replicas(procs[1:], logs)
    finally:
        _stop(procs)
    reports = [json.loads((out / f"replica{cid}.json").read_text()) for cid in range(k)]
    record = _record(cfg, reports, version, seconds=time.perf_counter() - start)
    record["command"] = shlex.join([*me, str(cfg_path), str(out), str(seed)])
    record["lighthouse_command"] = shlex.join(lighthouse_cmd)
    record["replica_command"] = shlex.join([*replica_cmds[0], address]) + "  (client 0; one per client)"
    atomic_write_text(out / RECORD, json.dumps(record, indent=1))
    return record


def _record(cfg: RunConfig, reports: list[dict[str, Any]], version: str, seconds: float) -> dict[str, Any]:
    from photon.train.evaluate import perplexity

    fed = cfg.federation
    rounds = []
    for r in range(fed.rounds):
        per = [rep["rounds"][r] for rep in reports]
        rounds.append({"round": r + 1, "wall_s": max(p["wall_s"] for p in per),
                       "compute_s": [p["compute_s"] for p in per], "sync_s": [p["sync_s"] for p in per],
                       "quorum_s": [p["quorum_s"] for p in per],
                       "train_loss": statistics.mean(p["loss"] for p in per)})
    # The replica that reaches the sync last waits for nobody: its sync time is what the protocol costs
    # (quorum + all-reduce + outer step). The others also wait for it (straggler wait).
    last = [min(r["sync_s"]) for r in rounds]
    losses = reports[0]["eval"]
    digests = {rep["params_sha256"] for rep in reports}
    return {
        "peer": "torchft DiLoCo", "torchft_version": version, "torch_version": torch.__version__,
        "seed": cfg.train.seed, "clients": cfg.data.partition.num_clients, "rounds": fed.rounds,
        "local_steps": fed.local_steps, "outer": fed.outer.model_dump(), "client_optimizer": fed.client_optimizer,
        "threads_per_replica": reports[0]["threads"],
        "losses": losses, "perplexity": {d: perplexity(v) for d, v in losses.items()},
        "rounds_detail": rounds,
        "sync_s_per_round": statistics.mean(last),
        "sync_s_first_round": last[0],
        "sync_s_steady": statistics.mean(last[1:]) if len(last) > 1 else last[0],
        "sync_wait_s_per_round": statistics.mean(statistics.mean(r["sync_s"]) for r in rounds),
        "compute_s_per_round": statistics.mean(max(r["compute_s"]) for r in rounds),
        "wall_s_per_round": statistics.mean(r["wall_s"] for r in rounds),
        "params_sha256": reports[0]["params_sha256"], "replicas_agree": len(digests) == 1,
        "differences": [
            *(["no update screening: our arm screens replies (federation.max_norm_ratio, federation.min_cosine) "
               "before folding; torchft averages every replica (identical when our screen rejects nothing)"]
              if fed.max_norm_ratio is not None or fed.min_cosine is not None else []),
            "average: torchft all-reduces sum(θ − θ_k) then divides by K; ours folds a running mean weighted by "
            "samples (equal here): the same Δ up to fp32 rounding",
            "replicas train concurrently (one process each, sharing the cores); our in-process arm trains the "
            "clients one after another",
            *(["client_optimizer=reset: torchft keeps the inner AdamW state; the replicas clear it after every "
               "sync, as our reset clients start each round with a fresh AdamW"] if fed.client_optimizer == "reset"
              else []),
        ],
        "seconds": seconds, "config": config_to_dict(cfg),
    }


# ---------------------------------------------------------------------------------------------------------
# Child processes: the lighthouse and one replica per client


def _exit_with_parent(launcher: int) -> None:
    """A daemon thread that ends this process once the launcher `launcher` (a pid) is gone, so a killed
    launcher leaves no orphans. Given the pid, not read from getppid() here: the launcher may die first."""

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _lighthouse_main(launcher: int, out: Path, k: int) -> None:
    """torchft's lighthouse on 127.0.0.1 (a free port); its address goes to OUT/lighthouse.addr."""
    from torchft.coordination import LighthouseServer

    _exit_with_parent(launcher)
    server = LighthouseServer(bind="127.0.0.1:0", min_replicas=k)
    port = server.address().rsplit(":", 1)[1]  # address() names the host; the replicas dial loopback
    atomic_write_text(out / "lighthouse.addr", f"http://127.0.0.1:{port}\n")
    print(f"lighthouse up at 127.0.0.1:{port}, min_replicas={k}", flush=True)
    while True:  # until the launcher terminates us (or dies: _exit_with_parent)
        time.sleep(3600)


class SyncTimer:
    """Seconds inside DiLoCo's optimizer step hook (the sync) and inside the manager's quorum, this round.

    `before` is registered ahead of DiLoCo's hook and `after` behind it, so their difference is the hook."""

    def __init__(self) -> None:
        self.sync = self.quorum = 0.0
        self._t = 0.0

    def before(self, *_: Any) -> None:
        self._t = time.perf_counter()

    def after(self, *_: Any) -> None:
        self.sync += time.perf_counter() - self._t

    def timed(self, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.quorum += time.perf_counter() - t
        return wrapper


def _replica_main(launcher: int, out: Path, cid: int, lighthouse: str) -> None:
    from datetime import timedelta

    from torch.distributed import TCPStore
    from torchft import Manager, ProcessGroupGloo
    from torchft.local_sgd import DiLoCo

    from photon.data.partition import client_seed, client_stream, make_partition
    from photon.digest import tensors_digest
    from photon.model.transformer import unique_state_dict
    from photon.train.centralized import build_model, open_data
    from photon.train.evaluate import evaluate
    from photon.train.local import make_optimizer, train_local

    _exit_with_parent(launcher)
    cfg = build_config(json.loads((out / "config.json").read_text()))
    fed, t = cfg.federation, cfg.train
    torch.set_num_threads(t.threads or 1)  # K replicas share the cores
    prepared = open_data(cfg)
    part = make_partition(prepared.manifest, cfg.data.partition)
    stream = client_stream(prepared, part, cid, t.seq_len, t.batch_size, client_seed(cfg, cid))
    model = build_model(cfg)  # seeded: every replica starts from the same θ, as our server's first model
    inner = make_optimizer(model, t)
    outer = torch.optim.SGD(model.parameters(), lr=fed.outer.lr, momentum=fed.outer.momentum, nesterov=True)
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # this replica group's store

    def state_dict() -> dict[str, Any]:
        return {"model": model.state_dict(), "inner": inner.state_dict()}

    def load_state_dict(sd: dict[str, Any]) -> None:
        model.load_state_dict(sd["model"])
        inner.load_state_dict(sd["inner"])

    # torchft binds its manager and checkpoint servers on every interface (hard-coded in 0.2.0); the
    # lighthouse, this store and gloo are on loopback.
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)), load_state_dict=load_state_dict,
        state_dict=state_dict, min_replica_size=cfg.data.partition.num_clients, use_async_quorum=False,
        init_sync=False,  # identical seeded init everywhere: no step-0 weight transfer
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S), quorum_timeout=timedelta(seconds=QUORUM_TIMEOUT_S),
        connect_timeout=timedelta(seconds=60), rank=0, world_size=1, store_addr="127.0.0.1",
        store_port=store.port, lighthouse_addr=lighthouse, replica_id=f"client{cid}", hostname="127.0.0.1")
    timer = SyncTimer()
    manager.start_quorum = timer.timed(manager.start_quorum)  # instance attribute: DiLoCo's calls go through it
    inner.register_step_post_hook(timer.before)
    rounds, cursor = [], 0
    try:
        with DiLoCo(manager, [model], inner, outer, sync_every=fed.local_steps, pin_memory=False):
            inner.register_step_post_hook(timer.after)  # behind DiLoCo's hook
            for r in range(fed.rounds):
                timer.sync = timer.quorum = 0.0
                start = time.perf_counter()
                res = train_local(model, inner, stream, cursor, r * fed.local_steps, fed.local_steps, t,
                                  cfg.federated_steps)
                wall = time.perf_counter() - start
                if manager.current_step() != r + 1:
                    raise RuntimeError(f"round {r + 1}: torchft did not commit the sync (manager step "
                                       f"{manager.current_step()}); the run no longer matches ours")
                if fed.client_optimizer == "reset":
                    inner.state.clear()  # our `reset` clients start each round with a fresh AdamW
                cursor = res.cursor
                rounds.append({"wall_s": wall, "compute_s": wall - timer.sync, "sync_s": timer.sync,
                               "quorum_s": timer.quorum, "loss": res.loss})
                print(f"round {r + 1}: loss {res.loss:.4f}, compute {wall - timer.sync:.2f} s, sync "
                      f"{timer.sync:.3f} s (quorum {timer.quorum:.3f} s)", flush=True)
    finally:
        manager.shutdown(wait=False)
    report = {"client": cid, "threads": torch.get_num_threads(), "rounds": rounds,
              "params_sha256": tensors_digest(unique_state_dict(model))}
    if cid == 0:  # every replica holds the same global model after the last sync
        report["eval"] = evaluate(model, prepared, t.seq_len, t.batch_size, t.eval_batches, t.bf16)
    atomic_write_text(out / f"replica{cid}.json", json.dumps(report, indent=1))


def _load_config(text: str) -> RunConfig:
    path = Path(text)
    tree = json.loads(path.read_text() if path.suffix == ".json" and path.is_file() else text)
    return build_config(tree)


if __name__ == "__main__":
    # python -m photon.bench.baselines.torchft CONFIG_JSON OUT SEED   (CONFIG_JSON: JSON text or a .json file)
    # The launcher starts itself as --lighthouse PID OUT K and --replica PID OUT CLIENT_ID LIGHTHOUSE_ADDR.
    logging.basicConfig(level=logging.WARNING)
    args = sys.argv[1:]
    if args[:1] == ["--lighthouse"]:
        _lighthouse_main(int(args[1]), Path(args[2]), int(args[3]))
    elif args[:1] == ["--replica"]:
        _replica_main(int(args[1]), Path(args[2]), int(args[3]), args[4])
    else:
        if len(args) != 3:
            sys.exit("usage: python -m photon.bench.baselines.torchft CONFIG_JSON OUT SEED")
        try:
            rec = run_torchft_diloco(_load_config(args[0]), Path(args[1]), int(args[2]))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"torchft {rec['torchft_version']}: overall perplexity {rec['perplexity']['overall']:.2f}, sync "
              f"{rec['sync_s_per_round']:.3f} s/round; record in {Path(args[1]) / RECORD}")
