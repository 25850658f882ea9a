"""What a preset needs: memory per client rank and the time a round should take, computed from the config.

The tables in docs/DEPLOY.md and the README's presets table are rendered from these functions by
`photon bench report` (no stored measurement: they are arithmetic on the presets), so they cannot drift from
the presets. Estimates, stated as such:
- memory per rank: `photon.train.memory.client_memory` (its module docstring has the model of each part);
- time per round = H × batch × seq × (FLOPs per token) / (ranks × MFU × the GPU's bf16 peak), at an assumed
  40% MFU on an H100 SXM (989 TFLOP/s bf16); moving the model both ways at 1 and 10 Gbit/s comes on top.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from photon.bench.throughput import DATASHEET_BF16
from photon.config import RunConfig, load_config, preset_names
from photon.model.flops import flops_per_token
from photon.model.transformer import count_params
from photon.train.local import LEAN, lean_config
from photon.train.memory import GIB, GPU_MEMORY_GIB, client_memory

MFU_ASSUMED = 0.40
GPU = "H100 SXM"


def round_seconds(cfg: RunConfig, procs: int | None = None, mfu: float = MFU_ASSUMED) -> float:
    t, fed = cfg.train, cfg.federation
    procs = procs or fed.procs_per_node
    flops = fed.local_steps * t.batch_size * t.seq_len * flops_per_token(cfg)
    return flops / (procs * mfu * DATASHEET_BF16[GPU])


def transfer_seconds(cfg: RunConfig, gbit: float) -> float:
    """Down and up one full fp32 model over a link of `gbit` Gbit/s."""
    return 2 * count_params(cfg.model) * 4 * 8 / (gbit * 1e9)


def _fmt_time(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else (f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s")


def render_deploy(_: Any = None) -> str:
    """The table for docs/DEPLOY.md: memory per rank and time per round for every preset."""
    lines = [f"Computed from the presets by `photon/train/memory.py` and `photon/bench/sizing.py` (estimates: see "
             f"their docstrings; time at an assumed {MFU_ASSUMED:.0%} MFU on {GPU} GPUs, {GPU_MEMORY_GIB} GiB). "
             f"Lean node: the same preset on a node started as `photon node --lean` (`{' '.join(LEAN)}`: the whole "
             "batch in one pass, since micro-batches cannot be stepped in backward; with the paper's clipping, each "
             "step runs backward twice through one forward).",
             "",
             "| preset | parameters | ranks (GPUs) per client | sharding | micro-batch | memory per rank | fits one "
             f"{GPU_MEMORY_GIB} GiB GPU? | lean node (one process) | compute per round (H × batch) | model down + up "
             "at 1 / 10 Gbit/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in preset_names():
        cfg = load_config(name)
        mem = client_memory(cfg)
        fits = "yes" if mem["total"] <= GPU_MEMORY_GIB * GIB else "no"
        lean = "—" if mem["procs"] > 1 else f"{client_memory(lean_config(cfg))['total'] / GIB:,.1f} GiB"
        lines.append(f"| `{name}` | {mem['params'] / 1e6:,.1f}M | {mem['procs']} | {mem['sharding']} | "
                     f"{mem['micro_batch']} | {mem['total'] / GIB:,.1f} GiB | {fits} | {lean} | "
                     f"{_fmt_time(round_seconds(cfg))} (H = {cfg.federation.local_steps} × {cfg.train.batch_size}) "
                     f"| {_fmt_time(transfer_seconds(cfg, 1))} / {_fmt_time(transfer_seconds(cfg, 10))} |")
    return "\n".join(lines)


def where_run(results_dir: Path) -> dict[str, set[str]]:
    """Preset -> {"here", "GPU"}: which stored benchmark results ran it, on this machine or on a GPU."""
    out: dict[str, set[str]] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        record = json.loads(path.read_text())
        preset = record.get("data", {}).get("preset")
        if preset:
            out.setdefault(preset, set()).add("GPU" if record.get("machine", {}).get("gpu") else "here")
    return out


def render_presets(results_dir: Path) -> str:
    """The README's presets table: size, memory per client rank, and where it has run."""
    ran = where_run(results_dir)
    lines = ["| preset | what | parameters | memory per client rank (as configured) | ran |", "|---|---|---|---|---|"]
    for name in preset_names():
        cfg = load_config(name)
        mem = client_memory(cfg)
        where = ", ".join(sorted(ran.get(name, set()))) or "not yet"
        lines.append(f"| `{name}` | {_blurb(name)} | {mem['params'] / 1e6:,.2f}M | "
                     f"{mem['total'] / GIB:,.2f} GiB × {mem['procs']} rank(s) ({mem['sharding']}) | {where} |")
    return "\n".join(lines)


def _blurb(name: str) -> str:
    return {"tiny": "tests, seconds", "small": "the demo (`make run`), Photon's recipe",
            "small-diloco": "DiLoCo's recipe on the demo model", "medium": "claims benchmark, non-embedding "
            "parameters dominate"}.get(name, "the paper's shape (arXiv 2411.02908)")
