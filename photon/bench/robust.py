"""`photon bench robust`: one of four clients attacks every round; what does each defence cost and save?

Attacks (`--attack`): `flip` (the client sends its honest update reversed and scaled, θ − s·(θ_k − θ), for
each scale in `--scales`) or `noise` (θ + N(0, s²)). Arms, on the same seed, data, model and budget: a clean
run with the default config; a clean run with the screen off (what screening costs when nobody attacks);
and, per attack scale, the default config, the plain mean with every defence off, the coordinate-wise
median and the trimmed mean (both without the screen). Reported: final validation perplexity, its cost
against the clean run, and the updates rejected. Stored in docs/results/robust-<attack>.json.
"""

from __future__ import annotations

import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from photon.bench.results import LoadSampler, publish
from photon.config import RunConfig, with_overrides
from photon.federation.runner import run_federation
from photon.federation.worker import ClientWorker
from photon.runlog import read_metrics
from photon.train.evaluate import perplexity
from photon.transport.inprocess import InProcessTransport

NO_SCREEN = ["federation.max_norm_ratio=null", "federation.min_cosine=null"]
CLEAN_ARMS: dict[str, list[str]] = {
    "clean": [],
    "clean, screen off": NO_SCREEN,
}
ATTACK_ARMS: dict[str, list[str]] = {
    "default (screen on)": [],
    "mean, no defence": NO_SCREEN,
    "median": [*NO_SCREEN, "federation.aggregation=median"],
    "trimmed mean": [*NO_SCREEN, "federation.aggregation=trimmed-mean"],
}


def _attack(kind: str, client: int, scale: float) -> list[str]:
    if kind == "flip":
        return [f"federation.faults.reply={{{client}: flip}}", f"federation.faults.flip_scale={scale}"]
    return [f"federation.faults.noise_clients=[{client}]", f"federation.faults.noise_scale={scale}"]


def _run_arm(cfg: RunConfig, run_dir: Path) -> dict[str, float]:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_federation(cfg, run_dir, InProcessTransport(ClientWorker(run_dir / "node"), 1), console=Console(quiet=True))
    rows = read_metrics(run_dir)
    evals = [r for r in rows if r["kind"] == "eval"]
    rounds = [r for r in rows if r["kind"] == "round"]
    return {"ppl_before": perplexity(evals[0]["loss/overall"]), "ppl_after": perplexity(evals[-1]["loss/overall"]),
            "rejected": sum(r["dropped"] for r in rounds)}


def run_robust_bench(cfg: RunConfig, out: Path, attack: str = "flip", scales: tuple[float, ...] = (1, 2, 5, 10),
                     seeds: int = 1, console: Console | None = None, results_dir: Path | None = None
                     ) -> dict[str, Any]:
    console = console or Console()
    attacker = cfg.data.partition.num_clients - 1
    base = with_overrides(cfg, ["federation.min_replies=1"])  # a round with the attacker rejected still commits
    plan: list[tuple[str, float | None, int, list[str]]] = []
    for seed in range(seeds):
        plan += [(arm, None, seed, sets) for arm, sets in CLEAN_ARMS.items()]
        for scale in scales:
            plan += [(arm, scale, seed, [*sets, *_attack(attack, attacker, scale)]) for arm, sets in ATTACK_ARMS.items()]
    rows = []
    started = time.time()
    with LoadSampler() as load:
        for i, (arm, scale, seed, sets) in enumerate(plan, 1):
            acfg = with_overrides(base, [*sets, f"train.seed={seed}"])
            name = re.sub(r"[^a-z0-9]+", "-", f"{arm} s{scale} seed{seed}".lower()).strip("-")
            console.print(f"[{i}/{len(plan)}] {arm}" + (f", {attack} scale {scale:g}" if scale is not None else "")
                          + f", seed {seed}")
            rows.append({"arm": arm, "scale": scale, "seed": seed, **_run_arm(acfg, out / name)})
    fed = cfg.federation
    data = {"attack": attack, "attacker": attacker, "clients": cfg.data.partition.num_clients, "preset": cfg.name,
            "rounds": fed.rounds, "local_steps": fed.local_steps, "scales": list(scales), "seeds": seeds,
            "rows": rows}
    publish(f"robust-{attack}", data, render, load, started, console, results_dir=results_dir)
    return data


def _mean_ppl(rows: list[dict], arm: str, scale: float | None) -> float:
    return statistics.mean(r["ppl_after"] for r in rows if r["arm"] == arm and r["scale"] == scale)


def render(data: dict[str, Any]) -> str:
    """The markdown table and goal lines for docs/RESULTS.md."""
    rows, attack = data["rows"], data["attack"]
    clean = _mean_ppl(rows, "clean", None)
    what = ("θ − s·(θ_k − θ) (its honest update reversed and scaled by s)" if attack == "flip"
            else "θ + N(0, s²)")
    lines = [f"Preset `{data['preset']}`, {data['clients']} by-domain clients all sampled every round, "
             f"{data['rounds']} rounds of H = {data['local_steps']}; client {data['attacker']} replies {what} every "
             f"round; {data['seeds']} seed(s), perplexity averaged over seeds. Cost = final perplexity over the "
             "clean run's, minus 1.", "",
             "| arm | " + " | ".join(f"s = {s:g}" for s in data["scales"]) + " |",
             "|---|" + "---|" * len(data["scales"])]
    for arm in ATTACK_ARMS:
        cells = []
        for s in data["scales"]:
            ppl = _mean_ppl(rows, arm, s)
            rejected = sum(r["rejected"] for r in rows if r["arm"] == arm and r["scale"] == s)
            cells.append(f"{ppl:,.1f} ({ppl / clean - 1:+.1%}, {rejected} rejected)")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    off = _mean_ppl(rows, "clean, screen off", None)
    worst = max(_mean_ppl(rows, "default (screen on)", s) / clean - 1 for s in data["scales"])
    clean_rejected = sum(r["rejected"] for r in rows if r["arm"] == "clean")
    lines += ["", f"Clean run: perplexity {clean:,.1f} with the default screen, {off:,.1f} with it off "
              f"({clean / off - 1:+.2%}; {clean_rejected} honest updates rejected).", "",
              f"- Goal: the default config costs at most 10% under attack at every scale: worst {worst:+.1%}, "
              f"{'met' if worst <= 0.10 else 'NOT met'}.",
              f"- Goal: a clean run changes by at most 1% with the screen on: {clean / off - 1:+.2%}, "
              f"{'met' if abs(clean / off - 1) <= 0.01 else 'NOT met'}."]
    return "\n".join(lines)
