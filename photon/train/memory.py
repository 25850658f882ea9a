"""How much memory a client needs, how much a machine has free, and the lean recipe when it is short.

Estimates from the config, stated as such (the model of each part is in `client_memory`):
- memory per rank = weights (fp32) + gradients (fp32) + AdamW moments (2 × fp32), divided by the ranks under
  FSDP (with `train.step_in_backward`, one process, the gradients are only ever the largest parameter's),
  plus, under bf16 autocast, each weight's bf16 copy that backward keeps (all of them, or one block's with
  activation checkpointing, which recasts a block's weights as it recomputes it), plus activations of one
  micro-batch under bf16 autocast with SDPA attention: ≈ 34 × d_model bytes per token per layer stored for
  backward (Korthikanti et al. 2022, without the attention-score term that SDPA's fused kernels avoid), or
  ≈ 2 × d_model bytes per token per layer with activation checkpointing (only each block's input) plus one
  block's full activations, plus one chunk of fp32 logits.
A run refuses to start where a client cannot fit (`check_fits`); a node short of memory trains lean
(`lean_if_short`) rather than be killed by the kernel.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from photon.config import RunConfig
from photon.errors import UserError
from photon.model.transformer import count_params
from photon.train.local import LEAN, lean_config

GIB = 2**30
GPU_MEMORY_GIB = 80
RUNTIME_BYTES = 300 * 2**20  # a process that has imported what a node runs (the wire benchmark measured 263 MB)
SERVER_MODELS = 3  # the server's peak over the fp32 model: its goal (the wire benchmark measured ≈ 2.4×)


def client_memory(cfg: RunConfig, procs: int | None = None) -> dict[str, float]:
    """Bytes a rank of a client needs, by part (see the module docstring for the model of each part)."""
    m, t = cfg.model, cfg.train
    procs = procs or cfg.federation.procs_per_node
    n = count_params(m)
    states = n * (4 + 4 + 8)  # fp32 weights, fp32 grads, AdamW exp_avg + exp_avg_sq
    sharded = procs > 1 and (t.sharding == "fsdp" or (t.sharding == "auto" and states > 0.7 * GPU_MEMORY_GIB * GIB))
    if t.step_in_backward:  # one gradient at a time: the largest parameter's (the embedding, or an MLP matrix)
        states = n * (4 + 8) + 4 * max(m.vocab_size * m.d_model, m.d_model * m.hidden)
    casts = 0 if not t.bf16 else 2 * n // (m.n_layer if t.activation_checkpointing else 1)
    micro = min(t.micro_batch_size or t.batch_size, max(1, t.batch_size // procs))  # rows per forward, per rank
    tokens = micro * t.seq_len
    if t.activation_checkpointing:
        acts = tokens * m.n_layer * 2 * m.d_model + tokens * 34 * m.d_model
    else:
        acts = tokens * m.n_layer * 34 * m.d_model
    chunk = 4096 if (t.loss_chunk is None and m.vocab_size >= 32768) else (t.loss_chunk or tokens)
    logits = min(chunk, tokens) * m.vocab_size * (4 + 2)  # fp32 logits + their bf16 source
    if sharded:  # its shard, plus one block's weights and gradients gathered in full while it runs
        model_states = states / procs + 8 * n / max(1, m.n_layer)
    else:
        model_states = states
    return {"params": n, "procs": procs, "sharding": "fsdp" if sharded else ("ddp" if procs > 1 else "none"),
            "micro_batch": micro, "model_states": model_states, "bf16_casts": casts, "activations": acts,
            "logits": logits, "total": model_states + casts + acts + logits}


def device_memory(device_type: str) -> int | None:
    """Bytes of memory the device has in all: this machine's RAM for the CPU, the first GPU's for CUDA."""
    if device_type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return None


def free_memory(device_type: str) -> int | None:
    """Bytes this process could use on the device now (Linux, CUDA; None where unknown): the RAM available
    (the machine's, or its cgroup's where a container or a job scheduler caps it) plus this process's own
    anonymous memory (a warm node's kept model; not its mapped files, which the available RAM counts already),
    or the GPU's free memory plus what torch holds there."""
    if device_type == "cpu":
        try:
            meminfo = _kib_fields(Path("/proc/meminfo").read_text())
            own = _kib_fields(Path("/proc/self/status").read_text()).get("RssAnon", 0)
        except OSError:
            return None
        if "MemAvailable" not in meminfo:
            return None
        available = meminfo["MemAvailable"]
        capped = _cgroup_room()
        return min(available, capped) + own if capped is not None else available + own
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved()
    return None


def _kib_fields(text: str) -> dict[str, int]:
    """`Name:   123 kB` lines of /proc files, in bytes."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[name] = int(parts[0]) * 1024
    return out


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup v2 memory limit, None without one."""
    try:
        group = Path("/proc/self/cgroup").read_text().strip().split("\n")[0].rpartition(":")[2]
        folder = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((folder / "memory.current").read_text()))
    except (OSError, ValueError, IndexError):
        return None


def lean_if_short(cfg: RunConfig, device_type: str) -> tuple[RunConfig, str | None]:
    """The config a node of one process per client trains a task with: the run's, or, when a client of it
    needs more memory than the node has free (estimated) and the lean way (`photon node --lean`: the same
    updates, less memory, more compute) needs less, the lean one, with a line saying why."""
    have = free_memory(device_type)
    need = client_memory(cfg, procs=1)["total"]
    if have is None or need <= have:
        return cfg, None
    lean = lean_config(cfg)
    lean_need = client_memory(lean, procs=1)["total"]
    if lean_need >= need:
        return cfg, None
    fits = "" if lean_need <= have else " (still more than it has: expect it to run out)"
    t = cfg.train
    exact = device_type == "cpu" and not t.compile and t.micro_batch_size in (None, t.batch_size)
    return lean, (f"a client of this run needs about {need / GIB:,.1f} GiB ({device_type}, estimated), more than the "
                  f"{have / GIB:,.1f} GiB free here: this node trains the run lean from now on, as `photon node "
                  f"--lean` does (about {lean_need / GIB:,.1f} GiB{fits}; more compute, and the same updates, "
                  f"{'bitwise' if exact else 'within rounding (micro-batches, compile or a GPU)'})")


def run_memory(cfg: RunConfig, device_type: str, clients_at_once: int = 1, server: bool = False) -> dict[str, float]:
    """Bytes a run needs of the memory its clients train in (estimated). On a GPU: one rank's, since each rank
    has a GPU of its own. On the CPU every process shares the machine's RAM: `clients_at_once` clients
    (simulated workers training side by side) of `federation.procs_per_node` processes each, every process
    with its runtime, plus the server's share when it runs on the same machine (`server`)."""
    rank = client_memory(cfg)
    if device_type != "cpu":
        return {"ranks": 1, "rank": rank["total"], "server": 0.0, "total": rank["total"]}
    ranks = clients_at_once * int(rank["procs"])
    serving = SERVER_MODELS * 4 * count_params(cfg.model) + RUNTIME_BYTES if server else 0.0
    return {"ranks": ranks, "rank": rank["total"] + RUNTIME_BYTES, "server": serving,
            "total": ranks * (rank["total"] + RUNTIME_BYTES) + serving}


def check_fits(cfg: RunConfig, device_type: str, clients_at_once: int = 1, server: bool = False) -> None:
    """Refuse a run that needs more memory, by the estimate of `run_memory`, than the device has in all: it
    would be killed by the kernel without a word, or fail deep inside an allocator, after minutes of set-up.
    Borderline configs are left to run (the estimate is rough). The refusal names the fixes that would make
    it fit: fewer clients training at once, training lean (one process per client), or a smaller batch."""
    need, have = run_memory(cfg, device_type, clients_at_once, server), device_memory(device_type)
    if have is None or need["total"] <= have:
        return
    ranks = int(need["ranks"])
    if ranks > 1 or need["server"]:
        parts = f"{ranks} training {'process' if ranks == 1 else 'processes at once'} × {need['rank'] / GIB:,.1f} GiB"
        if need["server"]:
            parts += f", plus {need['server'] / GIB:,.1f} GiB for the server"
    else:
        parts = "model, optimizer, activations and the process's runtime"
    fixes = ["lower train.batch_size (or set train.micro_batch_size), or use a smaller preset"]
    if cfg.federation.procs_per_node == 1 and not cfg.train.step_in_backward:
        if run_memory(lean_config(cfg), device_type, clients_at_once, server)["total"] <= have:
            fixes.insert(0, f"train lean (the same updates, more compute: {' '.join(f'--set {o}' for o in LEAN)})")
    fitting = [n for n in range(clients_at_once - 1, 0, -1) if run_memory(cfg, device_type, n, server)["total"] <= have]
    if fitting:
        fixes.insert(0, f"train at most {fitting[0]} client(s) at once (federation.num_nodes={fitting[0]})")
    raise UserError(f"this run needs about {need['total'] / GIB:,.1f} GiB ({device_type}; {parts}, estimated), more "
                    f"than the {have / GIB:,.1f} GiB this machine has: {', or '.join(fixes)} (README's presets "
                    "table gives the memory a client needs)")


