"""A real per-step data-parallel baseline: torch DDP over gloo, N processes on this machine (loopback).

It calibrates what the claims' network model assumes for data-parallel training: compute time per step and
time inside the gradient all-reduce. Each rank trains the same model with the same local trainer
(`train_local`) on a disjoint (IID) shard of the training tokens; a DDP communication hook all-reduces each
gradient bucket synchronously and times it. Ranks are plain subprocesses; results come back as JSON files
(nothing pickled crosses processes).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from photon.config import RunConfig, build_config, config_to_dict
from photon.digest import tensors_digest
from photon.errors import UserError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CommTimer:
    """State of `timed_allreduce`: seconds and bytes spent in all-reduce so far on this rank."""

    def __init__(self, world: int):
        self.world, self.seconds, self.bytes, self.calls = world, 0.0, 0, 0


def timed_allreduce(state, bucket):  # no annotations: DDP checks them and `from __future__` makes them strings
    """DDP comm hook: all-reduce the bucket *synchronously* (no overlap with backward) and time it, so time
    in communication and time in compute separate cleanly. Returns the mean gradient, as DDP's default does."""
    buf = bucket.buffer()
    start = time.perf_counter()
    dist.all_reduce(buf)
    state.seconds += time.perf_counter() - start
    state.bytes += buf.numel() * buf.element_size()
    state.calls += 1
    fut = torch.futures.Future()
    fut.set_result(buf.div_(state.world))
    return fut


def _rank_main(cfg: RunConfig, rank: int, world: int, port: int, out_dir: Path, steps: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from photon.data.partition import make_partition
    from photon.data.shards import TokenStream
    from photon.train.centralized import build_model, open_data
    from photon.train.local import make_optimizer, train_local

    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        prepared = open_data(cfg)
        # Disjoint shards: rank r reads the r-th contiguous slice of every domain (an IID split).
        part = make_partition(prepared.manifest, cfg.data.partition.model_copy(update={"kind": "iid",
                                                                                        "num_clients": world}))
        spans = part["clients"][rank]["spans"]
        stream = TokenStream([prepared.tokens(s["domain"], "train")[s["start"]:s["end"]] for s in spans],
                             cfg.train.seq_len, cfg.train.batch_size, cfg.train.seed + rank)
        model = build_model(cfg)  # same seed on every rank; DDP also broadcasts rank 0's weights
        ddp = DistributedDataParallel(model)
        hook = CommTimer(world)
        ddp.register_comm_hook(hook, timed_allreduce)
        optimizer = make_optimizer(model, cfg.train)
        marks, comm = [time.perf_counter()], [0.0]

        def on_step(step: int, loss: float, lr: float) -> None:
            marks.append(time.perf_counter())
            comm.append(hook.seconds)

        result = train_local(ddp, optimizer, stream, 0, 0, steps, cfg.train, steps, on_step)
        step_s = [b - a for a, b in zip(marks, marks[1:])]
        comm_s = [b - a for a, b in zip(comm, comm[1:])]
        skip = min(2, steps - 1)  # the first steps build DDP's buckets and warm caches
        report = {
            "rank": rank, "world": world, "steps": steps, "batch_size": cfg.train.batch_size,
            "seq_len": cfg.train.seq_len, "threads": torch.get_num_threads(),
            "step_seconds": statistics.mean(step_s[skip:]),
            "comm_seconds": statistics.mean(comm_s[skip:]),
            "compute_seconds": statistics.mean(s - c for s, c in zip(step_s[skip:], comm_s[skip:])),
            "allreduce_bytes_per_step": hook.bytes / steps, "allreduce_calls_per_step": hook.calls / steps,
            "tokens_per_step": world * cfg.train.batch_size * cfg.train.seq_len,
            "loss_first": result.losses[0], "loss_last": result.losses[-1],
            "params_sha256": tensors_digest(model.state_dict()),
        }
        (out_dir / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
        dist.barrier()  # no rank tears gloo down (rank 0 hosts the store) while another still talks to it
    finally:
        dist.destroy_process_group()


def run_ddp(cfg: RunConfig, out_dir: Path, steps: int, world: int = 2, timeout_s: float = 1800) -> dict[str, Any]:
    """Train `steps` DDP steps on `world` local processes; returns rank 0's report plus every rank's digest."""
    if steps < 1 or world < 1:
        raise UserError(f"ddp: steps={steps} and world={world} must both be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "config.json"
    cfg_path.write_text(json.dumps(config_to_dict(cfg), indent=1))
    for old in out_dir.glob("rank*.json"):
        old.unlink()
    port = free_port()
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "photon.bench.baselines.ddp", str(cfg_path), str(rank), str(world),
                               str(port), str(out_dir), str(steps)], env=env,
                              stdout=open(out_dir / f"rank{rank}.log", "w"), stderr=subprocess.STDOUT)
             for rank in range(world)]
    deadline = time.monotonic() + timeout_s
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        tail = (out_dir / f"rank{codes.index(next(c for c in codes if c))}.log").read_text()[-2000:]
        raise RuntimeError(f"ddp ranks exited with codes {codes}; log tail:\n{tail}")
    reports = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
    return {**reports[0], "digests": [r["params_sha256"] for r in reports],
            "comm_seconds_per_rank": [r["comm_seconds"] for r in reports],
            "compute_seconds_per_rank": [r["compute_seconds"] for r in reports]}


if __name__ == "__main__":
    # One rank: python -m photon.bench.baselines.ddp CONFIG_JSON RANK WORLD PORT OUT_DIR STEPS (started by run_ddp).
    path, rank_, world_, port_, out_, steps_ = sys.argv[1:7]
    _rank_main(build_config(json.loads(Path(path).read_text())), int(rank_), int(world_), int(port_),
               Path(out_), int(steps_))
