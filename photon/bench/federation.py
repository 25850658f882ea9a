"""`photon bench federation`: what the federation costs beyond local training, in time, memory and bytes.

- Overhead: (round wall time − the busiest node's time inside local training) / round wall time, from a
  real Flower simulation run (goal ≤ 3%).
- Aggregator peak RAM as a multiple of the model's size for K = 2, 4, 8 (goal ≤ 3×), each K measured in a
  fresh subprocess around the real `Aggregator.run_round` with replies arriving in reverse order.
- Bytes sent per training token, measured, next to per-step data-parallel training's ring all-reduce.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from photon.config import RunConfig, build_config, config_to_dict, with_overrides
from photon.runlog import read_metrics


def overhead(cfg: RunConfig, run_dir: Path, console: Console) -> dict[str, Any]:
    from photon.launch.simulation import run_simulated

    run_simulated(cfg, run_dir, console=console)
    rounds = [r for r in read_metrics(run_dir) if r["kind"] == "round"]
    per_round = [(r["wall_seconds"] - r["critical_train_seconds"]) / r["wall_seconds"] for r in rounds]
    steady = per_round[1:] or per_round
    tokens = sum(r["tokens"] for r in rounds)
    sent = sum(r["bytes_up"] + r["bytes_down"] for r in rounds)
    return {"overhead_first_round": per_round[0], "overhead_steady": statistics.mean(steady),
            "round_seconds": statistics.mean(r["wall_seconds"] for r in rounds[1:] or rounds),
            "train_seconds": statistics.mean(r["critical_train_seconds"] for r in rounds[1:] or rounds),
            "bytes_per_token": sent / tokens, "tokens": tokens, "bytes": sent}


def data_parallel_bytes_per_token(model_bytes: int, workers: int, batch: int, seq: int) -> float:
    """Ring all-reduce: each of n workers sends 2(n−1)/n × model bytes per step, for n·batch·seq tokens."""
    return workers * 2 * (workers - 1) / workers * model_bytes / (workers * batch * seq)


class LoopbackGrid:
    """Stands in for Flower's Grid in the memory probe: every pushed train message is answered by `nodes`
    nodes at once, and a reply's Flower message is built only when it is pulled (as Flower's HTTP grid
    inflates a message when it is pulled), with the records a real node sends: the reply header and an fp32
    update of exactly `update_bytes` (its own copy each time, so every reply costs its real size). The
    server side is the real `GridTransport` decode path: records -> wire -> checked, decoded, parked."""

    def __init__(self, nodes: int, update_bytes: bytes):
        self._nodes, self._bytes = nodes, update_bytes
        self._pushed: dict[str, str] = {}  # message id -> task header

    def get_node_ids(self):
        return list(range(1, self._nodes + 1))

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            ids.append(f"m{len(self._pushed)}")
            self._pushed[ids[-1]] = str(msg.content["header"]["json"])
        return ids

    def pull_messages(self, message_ids):
        from types import SimpleNamespace

        from photon.federation.codec import Payload
        from photon.federation.protocol import (
            ClientReply,
            ClientTask,
            Wire,
            encode_reply,
        )
        from photon.transport.records import wire_to_content

        out = []
        for msg_id in message_ids:
            task = ClientTask.from_json(self._pushed.pop(msg_id))
            header = ClientReply(task.task_id, task.client_id, task.round, task.samples, task.local_steps,
                                 task.next_cursor, loss=1.0, train_seconds=0.0).header_json()
            layout = encode_reply(ClientReply(task.task_id, 0, 0, 0, 0, 0, 0.0, 0.0)).payloads["update"].layout
            wire = Wire(header, {"update": Payload.over(dict(layout, tensors=self._layout), bytes(self._bytes))})
            out.append(SimpleNamespace(content=wire_to_content(wire), has_error=lambda: False,
                                       metadata=SimpleNamespace(reply_to_message_id=msg_id, src_node_id=1)))
        return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_probe(config_json: str, k: int, spill: str) -> None:
    """Run in a fresh process: one real round of `Aggregator.run_round` over `GridTransport` (the decode path
    of a deployed server) with K replies of the config's model shape; print {"multiple": peak RAM over the
    baseline / model bytes} as JSON. K nodes reply at once, so every reply is pending when the server pulls."""
    from photon.federation.aggregator import Aggregator
    from photon.federation.codec import layout_of
    from photon.federation.protocol import tensor_bytes
    from photon.federation.server_state import ServerState
    from photon.model.transformer import Transformer, unique_state_dict
    from photon.transport.server_app import GridTransport, act_as_a_serverapp_process

    act_as_a_serverapp_process()
    cfg = build_config(json.loads(config_json))
    with torch.device("meta"):
        shapes = {n: (t.shape, t.dtype) for n, t in unique_state_dict(Transformer(cfg.model)).items()}
    numel = sum(int(torch.Size(s).numel()) for s, _ in shapes.values())
    update = (np.random.default_rng(0).standard_normal(numel, dtype=np.float32) * 1e-3).tobytes()
    base = _rss_mb()
    params = {n: torch.randn(shape, dtype=dtype) * 0.02 for n, (shape, dtype) in shapes.items()}
    state = ServerState.fresh(params, cfg.data.partition.num_clients, 0)
    agg = Aggregator(cfg, state, [[]] * cfg.data.partition.num_clients, {}, spill_dir=Path(spill) / "spill",
                     state_dir=Path(spill) / "state")
    grid = LoopbackGrid(nodes=k, update_bytes=update)
    grid._layout = [[n, list(p.shape)] for n, p in sorted(params.items())]
    result = agg.run_round(GridTransport(grid, poll_s=0.0))  # type: ignore[arg-type]
    assert result.committed and len(result.ok) == k, (result.ok, result.failed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_mb = tensor_bytes(params) / 2**20
    print(json.dumps({"k": k, "model_mb": model_mb, "peak_over_base_mb": peak - base,
                      "multiple": (peak - base) / model_mb, "layout": len(layout_of(params))}))


def aggregator_memory(cfg: RunConfig, ks: tuple[int, ...], spill: Path) -> list[dict[str, Any]]:
    out = []
    for k in ks:
        tree = config_to_dict(cfg)
        tree["data"]["partition"]["num_clients"] = max(k, tree["data"]["partition"]["num_clients"])
        tree["federation"]["clients_per_round"] = k
        tree["federation"]["min_replies"] = 1
        tree["federation"]["client_optimizer"] = "reset"  # replies carry the update only (no kept state)
        code = ("import sys; from photon.bench.federation import memory_probe; "
                "memory_probe(sys.argv[1], int(sys.argv[2]), sys.argv[3])")
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(tree), str(k), str(spill / f"k{k}")],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the aggregator memory probe (K={k}) failed: {proc.stderr[-2000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def run_federation_bench(cfg: RunConfig, mem_cfg: RunConfig, out: Path, console: Console,
                         deployed: bool = False) -> dict[str, Any]:
    """Overhead in simulation (and, with `deployed`, on loopback SuperNodes: plain and warm), aggregator memory
    for K = 2, 4, 8, bytes per token; stored in docs/results/federation.json."""
    from photon.bench.results import LoadSampler, publish
    from photon.federation.protocol import tensor_bytes
    from photon.model.transformer import Transformer, unique_state_dict

    started = time.time()
    with LoadSampler() as load:
        result = overhead(cfg, out / "overhead-run", console)
        model_bytes = tensor_bytes(unique_state_dict(Transformer(cfg.model)))
        t, fed = cfg.train, cfg.federation
        result["dp_bytes_per_token"] = data_parallel_bytes_per_token(model_bytes, fed.clients_per_round,
                                                                     t.batch_size, t.seq_len)
        result["memory"] = aggregator_memory(mem_cfg, (2, 4, 8), out / "spill")
        result["memory_preset"] = mem_cfg.name
        if deployed:
            result["deployed"] = {kind: deployed_overhead(cfg, Path(out) / "deployed" / kind, console,
                                                          warm=(kind == "warm")) for kind in ("plain", "warm")}
    data = {"preset": cfg.name, "k": cfg.federation.clients_per_round, "h": cfg.federation.local_steps,
            "nodes": cfg.federation.num_nodes, **result}
    publish("federation", data, render, load, started, console)
    return data


def render(data: dict[str, Any]) -> str:
    lines = [f"Preset `{data['preset']}`, K = {data['k']} clients on {data['nodes']} nodes, H = {data['h']}. Overhead = "
             "(round wall time − the busiest node's time inside local training) / round wall time.", "",
             "| measure | value | goal |", "|---|---|---|",
             f"| simulation overhead, first round (Ray and worker start-up) | {data['overhead_first_round']:.1%} | |",
             f"| simulation overhead, later rounds | {data['overhead_steady']:.1%} | ≤ 3%: "
             f"{'met' if data['overhead_steady'] <= 0.03 else 'NOT met'} |",
             f"| simulation round wall s / busiest node's training s | {data['round_seconds']:.2f} / "
             f"{data['train_seconds']:.2f} | |",
             f"| bytes sent per training token (updates up + down, as sent) | {data['bytes_per_token']:,.1f} | |",
             f"| per-step fp32 data-parallel, {data['k']} workers (ring all-reduce) | "
             f"{data['dp_bytes_per_token']:,.1f} | |",
             f"| communication ratio DP / Photon | {data['dp_bytes_per_token'] / data['bytes_per_token']:,.1f}× | |"]
    for m in data["memory"]:
        lines.append(f"| aggregator peak RAM / model size, K = {m['k']} (`{data['memory_preset']}` shape, "
                     f"{m['model_mb']:,.0f} MB; replies through the real `GridTransport` decode path) | "
                     f"{m['multiple']:.2f}× | ≤ 3×: {'met' if m['multiple'] <= 3 else 'NOT met'} |")
    if "deployed" in data:
        lines += ["", "Deployed on loopback (a SuperLink and SuperNodes on 127.0.0.1, insecure, the same run):", "",
                  "| measure | plain Flower node | `photon node --warm` |", "|---|---|---|"]
        d = data["deployed"]
        for label, cell in (("overhead, first round", lambda r: f"{r['overhead_first_round']:.1%}"),
                            ("overhead, later rounds", lambda r: f"{r['overhead_steady']:.1%}"),
                            ("round wall s / busiest node's training s",
                             lambda r: f"{r['round_seconds']:.2f} / {r['train_seconds']:.2f}"),
                            ("failed replies", lambda r: str(r["failed"])),
                            ("SuperLink + nodes up, s", lambda r: f"{r['startup_seconds']:.1f}")):
            lines.append(f"| {label} | {cell(d['plain'])} | {cell(d['warm'])} |")
        lines.append(f"\nGoal ≤ 10% overhead per round deployed: plain {d['plain']['overhead_steady']:.1%}, warm "
                     f"{d['warm']['overhead_steady']:.1%}.")
    return "\n".join(lines)


def overhead_from_run(run_dir: Path) -> dict[str, Any]:
    """`overhead()`'s measures from a finished run's metrics.jsonl (round rows), whatever runtime ran it."""
    rounds = [r for r in read_metrics(run_dir) if r["kind"] == "round"]
    if not rounds:
        raise RuntimeError(f"{run_dir} holds no round metrics")
    per_round = [(r["wall_seconds"] - r["critical_train_seconds"]) / r["wall_seconds"] for r in rounds]
    later = rounds[1:] or rounds
    return {"overhead_first_round": per_round[0], "overhead_steady": statistics.mean(per_round[1:] or per_round),
            "overhead_per_round": per_round,
            "round_seconds": statistics.mean(r["wall_seconds"] for r in later),
            "train_seconds": statistics.mean(r["critical_train_seconds"] for r in later),
            "failed": sum(r["failed"] for r in rounds)}


def deployed_overhead(cfg: RunConfig, out: Path, console: Console | None = None, nodes: int = 2,
                      timeout_s: float = 1800.0, warm: bool = False) -> dict[str, Any]:
    """The same overhead measure on Flower's deployment runtime: a SuperLink and `nodes` SuperNodes started
    by `photon.launch.superlink` on 127.0.0.1, the run submitted with `flwr run` as `photon submit` does.

    INSECURE on purpose (no TLS, no node authentication): everything binds to 127.0.0.1 and lives only for the
    benchmark. TLS would add a little per-message cost; the process, polling and transfer costs are the same.
    Each node trains with cores / nodes threads (as the simulation gives its workers)."""
    from photon.launch import processes, submit, superlink, supernode
    from photon.launch.certs import read_token
    from photon.launch.simulation import with_threads

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The ServerApp's working directory is not ours: give it an absolute data path.
    cfg = with_overrides(with_threads(cfg, nodes), [f"data.prep_dir={Path(cfg.data.prep_dir).resolve()}"])
    say = console.print if console is not None else print
    address = f"127.0.0.1:{processes.free_port()}"
    procs = []
    start = time.monotonic()
    try:
        procs.append(superlink.start_superlink(int(address.rsplit(":", 1)[1]), out / "server", insecure=True,
                                               log_file=out / "superlink.log"))
        for i in range(nodes):
            procs.append(supernode.start_supernode(address, processes.free_port(), out / f"node-{i}",
                                                   data=cfg.data.prep_dir, insecure=True,
                                                   log_file=out / f"node-{i}.log", warm=warm))
        home = out / "submit"
        token = read_token(superlink.operator_token_file(out / "server", None))
        submit.write_connection(home, address, insecure=True, token=token)
        end = time.monotonic() + 60
        while sum(n["status"] == "online" for n in submit.list_nodes(home)) < nodes:  # all nodes in round 1
            if time.monotonic() > end:
                raise RuntimeError(f"fewer than {nodes} nodes online after 60 s; see {out}/node-*.log")
            time.sleep(0.5)
        ready = time.monotonic() - start
        run_dir = out / "server" / "runs" / "run"  # the SuperLink confines runs under its runs root
        run_id = submit.submit_run(home, cfg, "run")
        say(f"deployed benchmark: run {run_id} on {address} (insecure, loopback), {nodes} nodes; logs in {out}")
        status = submit.wait_run(home, run_id, poll_s=1.0, timeout_s=timeout_s)
    finally:
        for p in reversed(procs):
            processes.stop(p)
    if status["status"] != "finished:completed":
        raise RuntimeError(f"deployed benchmark run ended {status['status']}: {status.get('status-details')}; "
                           f"see `FLWR_HOME={home} flwr log {run_id} {submit.CONNECTION}` and {out}")
    result = overhead_from_run(run_dir)
    result.update(startup_seconds=ready, run_seconds=float(status.get("elapsed") or 0.0), nodes=nodes)
    return result
