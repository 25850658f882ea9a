"""The PNGs a scale's claims page links to, drawn by the benchmark (`run.py`) from the stored record; `photon
bench report` only links them, so rendering needs no matplotlib."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from photon.bench.claims.record import BANDWIDTH_SWEEP, View, crossovers_at, ratio_curve, wall
from photon.bench.network import NETWORKS


def _mean_curve(v: View, name: str, per: float = 1.0) -> tuple[list[float], list[float]]:
    runs = [v.curve(name, s, per=per) for s in v.seeds(name)]
    n = min(len(c) for c in runs)
    return ([statistics.mean(c[i][0] for c in runs) for i in range(n)],
            [math.exp(statistics.mean(math.log(c[i][1]) for c in runs)) for i in range(n)])


def plot(data: dict[str, Any], img_dir: Path) -> list[Path]:
    """Draw claims-SCALE-{curves,sweeps,bandwidth}.png into `img_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v, scale = View(data), data["scale"]
    img_dir = Path(img_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    for n in ("central", "photon", "photon-reset", "paper", "diloco", "diloco-reset", "bigbatch", "iid"):
        if v.has(n):
            xs, ys = _mean_curve(v, n)
            axes[0].plot([x / 1e6 for x in xs], ys, marker="o", ms=2, lw=2.2 if n in ("photon", "central") else 1.1,
                         label=f"{n} ({data['arms'][n]['client_optimizer']})")
    axes[0].set(xlabel="training tokens, all clients (M)", ylabel="validation perplexity (overall)", yscale="log",
                title=f"{scale}: perplexity vs tokens (geometric mean over seeds)")
    axes[0].legend(fontsize=7)
    ratios = (("photon", "central", 1), ("photon-reset", "central", 1), ("paper", "central", v.K),
              ("photon-short", "central-short", 1), ("paper-short", "central-short", v.K))
    for color, (n, ref, per) in enumerate(ratios):
        if v.has(n, ref):
            for i, s in enumerate(v.seeds(n, ref)):
                c = ratio_curve(v, n, ref, s, per)
                axes[1].plot([x / 1e6 for x, _ in c], [r for _, r in c], color=f"C{color}", marker="o", ms=2.5,
                             alpha=1.0 if i == 0 else 0.5, label=f"{n} / {ref}" if i == 0 else None)
    axes[1].axhline(1.0, color="grey", lw=0.8, ls=":")
    axes[1].set(xlabel="centralized tokens (M); paper regime: tokens per client", yscale="log",
                ylabel="federated / centralized perplexity", title="the gap over the run (each seed)")
    axes[1].legend(fontsize=7)
    paths.append(_save(fig, img_dir / f"claims-{scale}-curves.png", plt))

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, s in data["sweeps"].items():
        pts = [(lr, p) for lr, p in zip(s["grid"], s["ppl"]) if p is not None]
        ax.plot([lr for lr, _ in pts], [p for _, p in pts], marker="o", label=name)
        ax.scatter([s["best_lr"]], [dict(pts).get(s["best_lr"], math.nan)], s=80, facecolors="none", edgecolors="k")
    ax.set(xscale="log", yscale="log", xlabel="peak LR", ylabel="final validation perplexity (seed 0)",
           title=f"{scale}: LR sweeps (circled: best)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, img_dir / f"claims-{scale}-sweeps.png", plt))

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if v.has("photon", "central"):
        s0 = v.seeds("photon", "central")[0]
        target = max(v.final(n, s) for n in ("photon", "central") for s in v.seeds("photon", "central"))
        bws = [10 ** (6 + i * 0.1) for i in range(51)]
        walls = [wall(v, s0, target, BANDWIDTH_SWEEP.with_bandwidth(b)) for b in bws]
        ax.plot([b / 1e9 for b in bws], [w[0] for w in walls], label="Photon")
        ax.plot([b / 1e9 for b in bws], [w[2] for w in walls], label="data-parallel")
        for net in NETWORKS:
            ax.axvline(net.bandwidth_bps / 1e9, color="grey", lw=0.6, ls=":")
        for c in crossovers_at(v, s0, target, BANDWIDTH_SWEEP):
            ax.axvline(c / 1e9, color="red", lw=1.0, label=f"crossover {c / 1e9:.3g} Gbit/s")
        ax.set(title=f"{scale}: time to ppl {target:.0f} vs bandwidth (seed {s0})")
    ax.set(xscale="log", yscale="log", xlabel="bandwidth per link (Gbit/s)", ylabel="modelled seconds to target")
    ax.legend(fontsize=8)
    paths.append(_save(fig, img_dir / f"claims-{scale}-bandwidth.png", plt))
    return paths


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
