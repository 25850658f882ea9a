"""One client trained by several processes of a node (N GPUs, or N CPU processes) with torch.distributed.

The worker calls `train_ranks` where it would call `train_local` and gets its model and optimizer back as if
it had trained them itself, so the reply it builds is the single-process one. Ranks are plain subprocesses
(`python -m photon.train.distributed FOLDER RANK PARENT_PID`) that exchange only JSON and safetensors files
with the worker, in a private folder per task; nothing is pickled. Each rank runs the one inner loop,
`train_local`, on its slice of every batch, under DDP or FSDP2 (`fully_shard`). Nothing here knows Flower.
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from photon.config import (
    RunConfig,
    TrainConfig,
    build_config,
    config_to_dict,
    with_overrides,
)
from photon.data.partition import spans_stream
from photon.data.shards import open_prepared
from photon.errors import UserError
from photon.model.transformer import (
    Transformer,
    load_unique_state_dict,
    unique_state_dict,
)
from photon.train.device import place, resolve_device, setup_backend
from photon.train.local import (
    LocalResult,
    load_optimizer_state_tensors,
    make_optimizer,
    optimizer_state_tensors,
    train_local,
)

log = logging.getLogger(__name__)
Tensors = dict[str, torch.Tensor]
PROCS_KEYS = "federation.procs_per_node, or photon node --procs"
FIT_SHARE = 0.7  # sharding auto: FSDP2 when weights + grads + AdamW state need more of a device's free memory


@dataclass(frozen=True)
class StreamSpec:
    """What a rank needs to open the client's `TokenStream` itself (the same spans, batch and seed)."""

    prep_dir: str
    spans: list[dict[str, Any]]
    batch_size: int
    seed: int


def host_config(cfg: RunConfig) -> RunConfig:
    """The config of the worker's own copy of the model when ranks train: on the CPU and not compiled (it only
    carries parameters and optimizer state to and from the ranks, which hold the device copies)."""
    return with_overrides(cfg, ["train.device=cpu", "train.compile=false"])


def check_split(cfg: RunConfig, batch_size: int, procs: int) -> None:
    """The client's batch must split evenly over the ranks (and each rank's share into micro-batches), so that
    its recipe does not depend on how many processes train it."""
    micro = cfg.train.micro_batch_size
    if cfg.train.step_in_backward:
        raise UserError(f"train.step_in_backward trains a client in one process, not {procs} ({PROCS_KEYS}): "
                        f"their gradients are averaged over the processes first; unset one of the two")
    if batch_size % procs or (micro and (batch_size // procs) % micro):
        also = f" and train.micro_batch_size={micro}" if micro else ""
        raise UserError(f"train.batch_size={batch_size} does not split over {procs} processes{also} "
                        f"({PROCS_KEYS}): use a batch size that is a multiple of "
                        f"{procs * (micro or 1)}, or another number of processes")


def check_devices(cfg: RunConfig, procs: int) -> torch.device:
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and torch.cuda.device_count() < procs:
        raise UserError(f"{procs} processes ({PROCS_KEYS}) need {procs} GPUs, one each; this node has "
                        f"{torch.cuda.device_count()}: use fewer processes, or train.device=cpu")
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"{procs} processes ({PROCS_KEYS}) run on CUDA GPUs or the CPU, not train.device="
                        f"{cfg.train.device}: use one process there")
    return device


# ---------------------------------------------------------------------------------------------------------
# The worker's side: write the task, start the ranks, watch them, read the result back


def train_ranks(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig, stream: StreamSpec,
                cursor: int, global_step: int, steps: int, schedule_steps: int, procs: int, work_dir: Path,
                optimizer_state: bool = True) -> LocalResult:
    """`train_local` on `procs` local ranks: `model` (on the CPU) and `optimizer` are left trained as if
    `train_local` had run here. `optimizer_state=False` does not bring the new AdamW state back (a client that
    drops it). A rank that dies or fails stops the others at once and raises a RuntimeError naming it; so does
    a task that runs past `federation.round_timeout_s`."""
    check_split(cfg, stream.batch_size, procs)
    device = check_devices(cfg, procs)
    folder = _private_folder(Path(work_dir))
    timeout = cfg.federation.round_timeout_s
    # The rendezvous store lives here, on a port the OS picks: no race for a free port, gone with this process.
    store = dist.TCPStore("127.0.0.1", 0, procs, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    try:
        save_file({k: v.detach().contiguous() for k, v in unique_state_dict(model).items()},
                  folder / "start.safetensors")
        state = optimizer_state_tensors(model, optimizer)
        if state:
            save_file({k: v.contiguous() for k, v in state.items()}, folder / "state.safetensors")
        threads = max(1, (cfg.train.threads or os.cpu_count() or 1) // procs)
        header = {"config": config_to_dict(cfg), "stream": asdict(stream), "cursor": cursor,
                  "global_step": global_step, "steps": steps, "schedule_steps": schedule_steps, "world": procs,
                  "port": store.port, "threads": threads, "state": bool(state),
                  "return_state": optimizer_state, "timeout_s": timeout}
        (folder / "task.json").write_text(json.dumps(header))
        start = time.perf_counter()
        _run_ranks(folder, procs, threads, device, timeout)
        result = json.loads((folder / "result.json").read_text())
        load_unique_state_dict(model, load_file(folder / "params.safetensors"))
        if optimizer_state:
            load_optimizer_state_tensors(model, optimizer, load_file(folder / "state.safetensors"), adopt=True)
        log.info("%d ranks trained %d steps in %.1f s (%.1f s in train_local, %s)", procs, steps,
                 time.perf_counter() - start, result["seconds"], result.pop("sharding"))
        return LocalResult(**result)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _private_folder(work_dir: Path) -> Path:
    """A new folder for one task's files, mode 700 (only this user reads the tensors), named by this process;
    folders left by a worker that was killed (its process is gone) are removed first."""
    work_dir.mkdir(parents=True, exist_ok=True)
    for old in work_dir.glob("ranks-*-*"):
        try:
            os.kill(int(old.name.split("-")[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, PermissionError):  # not ours, or another user's live process
            pass
    return Path(tempfile.mkdtemp(prefix=f"ranks-{os.getpid()}-", dir=work_dir))


def _run_ranks(folder: Path, world: int, threads: int, device: torch.device, timeout: float) -> None:
    # The ranks import the photon this worker runs (a Flower app bundle need not be installed), on their share
    # of the cores; gloo talks over loopback (it would otherwise look up this host's name, which may not resolve).
    code = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")]))}
    if device.type == "cpu":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = []
    try:
        for rank in range(world):
            with open(folder / f"rank{rank}.log", "wb") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "photon.train.distributed", str(folder), str(rank), str(os.getpid())],
                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            # A rank that failed before its closing marker stops the others now: they would wait in a
            # collective for the dead one.
            early = [(r, c) for r, c in failed if not _done(folder, r)]
            if early:
                raise RuntimeError("; ".join(_describe(folder, r, c, world) for r, c in
                                             sorted(early, key=lambda rc: rc[1] > 0)))
            if all(c is not None for c in codes):
                # Every rank passed the closing barrier, so the result is whole: one that then died in its
                # teardown (gloo can abort as a peer's sockets close) cost nothing. Said, not hidden.
                for r, c in failed:
                    log.warning("%s; the result is kept", _describe(folder, r, c, world))
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{world} ranks ran past federation.round_timeout_s={timeout:g} s; stopped")
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()


def _done(folder: Path, rank: int) -> bool:
    """Whether `rank` passed the closing barrier (its marker is written after every collective)."""
    return (folder / f"rank{rank}.done").exists()


def _describe(folder: Path, rank: int, code: int, world: int) -> str:
    """One line for a rank that failed: how it ended and the last line it printed (a C++ abort prints its
    reason before the signal)."""
    log_file = folder / f"rank{rank}.log"
    lines = log_file.read_text(errors="replace").strip().splitlines() if log_file.exists() else []
    last = lines[-1].strip() if lines else ""
    if code < 0:
        when = "in its teardown, after the task was complete" if _done(folder, rank) else "during local training"
        how = f"rank {rank} of {world} died of {signal.Signals(-code).name} {when}"
        return f"{how} (its last output: {last})" if last else how
    return f"rank {rank} of {world} exited with code {code}: {last or 'no output'}"


# ---------------------------------------------------------------------------------------------------------
# A rank: open the client's stream, wrap the model, train its slice of every batch, rank 0 writes the result


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's switch for not broadcasting buffers before each forward: `forward_sync_buffers` since torch 2.13
    (whose `broadcast_buffers` warns), `broadcast_buffers` before (a GPU image may carry an older torch)."""
    from torch.nn.parallel import DistributedDataParallel

    name = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    return {name: False}


def wrap(model: Transformer, cfg: TrainConfig, device: torch.device, sharding: str
         ) -> tuple[nn.Module, Callable[[], contextlib.AbstractContextManager]]:
    """The module to train and its no-sync context (gradient accumulation without communication): DDP, or
    FSDP2 on every block and the root. `torch.compile`, if asked, wraps the result."""
    plain = cfg.model_copy(update={"compile": False})
    if sharding == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(place(model, plain, device),
                                      device_ids=[device.index] if device.type == "cuda" else None,
                                      init_sync=False, **_no_buffer_sync())  # every rank loaded the same
        module, no_sync = ddp, ddp.no_sync
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        place(model, plain, torch.device("cpu"))  # fully_shard moves each block to the device as it shards it
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        module, no_sync = model, lambda: _no_gradient_sync(model)
    return (torch.compile(module) if cfg.compile else module), no_sync


@contextlib.contextmanager
def _no_gradient_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def choose_sharding(cfg: TrainConfig, model: nn.Module, device: torch.device) -> str:
    """`train.sharding`, with auto = FSDP2 when a replica's weights, gradients and AdamW state (16 bytes per
    parameter) need more than FIT_SHARE of the fullest device's free memory; DDP on CPU processes. Every rank
    takes the same decision (a collective)."""
    if cfg.sharding != "auto":
        return cfg.sharding
    if device.type != "cuda":
        return "ddp"
    free = torch.tensor([torch.cuda.mem_get_info(device)[0]], dtype=torch.float64, device=device)
    dist.all_reduce(free, op=dist.ReduceOp.MIN)
    need = 16 * sum(p.numel() for p in model.parameters())
    return "fsdp" if need > FIT_SHARE * free.item() else "ddp"


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor on the CPU in fp32 (a DTensor shard is gathered: a collective every rank takes part in)."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu", torch.float32)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Tensors:
    """`optimizer_state_tensors`, with each sharded moment gathered whole (same names, whatever the ranks)."""
    out = {}
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            out[f"{name}.{key}"] = _full(value if torch.is_tensor(value) else torch.tensor(value))
    return out


def load_sharded_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: Tensors) -> None:
    """`load_optimizer_state_tensors` for FSDP2: each rank keeps its shard of every moment, placed as its
    parameter is (every rank holds the whole state, so nothing is sent)."""
    from torch.distributed.tensor import distribute_tensor

    fused = bool(optimizer.defaults.get("fused"))
    for name, p in model.named_parameters():
        state = {}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            t = tensors.get(f"{name}.{key}")
            if t is None:
                continue
            if key == "step":
                state[key] = t.to(p.device if fused else "cpu", copy=True)
            else:
                state[key] = distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        if state:
            optimizer.state[p] = state


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t / dist.get_world_size()


def _train_rank(folder: Path, spec: dict[str, Any], cfg: RunConfig, rank: int, device: torch.device) -> None:
    world = spec["world"]
    model = Transformer(cfg.model)  # its init is overwritten: every rank starts from the worker's parameters
    load_unique_state_dict(model, load_file(folder / "start.safetensors"))
    sharding = choose_sharding(cfg.train, model, device)
    trainable, no_sync = wrap(model, cfg.train, device, sharding)
    optimizer = make_optimizer(model, cfg.train)
    if spec["state"]:
        state = load_file(folder / "state.safetensors")
        load = load_sharded_optimizer_state if sharding == "fsdp" else load_optimizer_state_tensors
        load(model, optimizer, state)
        del state
    s = spec["stream"]
    stream = spans_stream(open_prepared(Path(s["prep_dir"])), s["spans"], cfg.train.seq_len, s["batch_size"],
                          s["seed"])
    kill_after = max(1, spec["steps"] // 2) if cfg.federation.faults.kill_rank == rank else None

    def kill_midway(step: int, loss: float, lr: float) -> None:  # federation.faults.kill_rank: a crashed GPU process
        if step + 1 - spec["global_step"] >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    result = train_local(trainable, optimizer, stream, spec["cursor"], spec["global_step"], spec["steps"],
                         cfg.train, spec["schedule_steps"], on_step=kill_midway if kill_after is not None else None,
                         shard=(rank, world), no_sync=no_sync, reduce_loss=_mean_over_ranks)
    params = {k: _full(v) for k, v in unique_state_dict(model).items()}  # gathers: every rank takes part
    state = full_optimizer_state(model, optimizer) if spec["return_state"] else {}
    if rank == 0:  # the result file last: it says the others are complete
        save_file({k: v.contiguous() for k, v in params.items()}, folder / "params.safetensors")
        if spec["return_state"]:
            save_file({k: v.contiguous() for k, v in state.items()}, folder / "state.safetensors")
        out = {"cursor": result.cursor, "steps": result.steps, "samples": result.samples, "tokens": result.tokens,
               "losses": result.losses, "seconds": result.seconds, "sharding": sharding}
        (folder / "result.json").write_text(json.dumps(out))
    # No rank tears its process group down while a peer may still be in a collective with it: past this barrier
    # every collective is complete, rank 0's files are written, and the marker says so to the worker.
    dist.barrier()
    (folder / f"rank{rank}.done").touch()


def _die_with(parent: int) -> None:
    """SIGKILL this rank when the worker that started it dies, however it dies (Linux; as `launch.processes.spawn`
    does for Flower's processes), so a killed node leaves no rank behind holding a GPU."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def rank_main(folder: Path, rank: int, parent: int) -> None:
    _die_with(parent)
    spec = json.loads((folder / "task.json").read_text())
    cfg = build_config(spec["config"])
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":  # rank r trains on GPU r
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        setup_backend(device)
    torch.set_num_threads(spec["threads"])
    timeout = timedelta(seconds=spec["timeout_s"])
    store = dist.TCPStore("127.0.0.1", spec["port"], spec["world"], is_master=False, timeout=timeout)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=spec["world"], timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    try:
        _train_rank(folder, spec, cfg, rank, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    # One rank: python -m photon.train.distributed FOLDER RANK PARENT_PID (started by train_ranks).
    rank_main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
