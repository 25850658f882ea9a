"""`photon bench demo`: the main job (`make run`: `photon run`, the `small` preset in Flower's simulation) timed
and scored, so the README's and docs/RESULTS.md's description of it is regenerated, never typed.

Stored in docs/results/demo.json: validation perplexity and bits per byte per domain before and after, the
wall time of the federation (and of each round), the replies that failed and why, and the run's configuration
in brief.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from photon.bench.outdir import fresh_out_dir
from photon.bench.results import LoadSampler, publish
from photon.config import RunConfig
from photon.federation.fold import DISAGREES
from photon.runlog import eval_losses, read_metrics
from photon.train.evaluate import BPB, perplexity


def run_demo_bench(cfg: RunConfig, out: Path, console: Console) -> dict[str, Any]:
    from photon.launch.simulation import run_simulated

    fresh_out_dir(out)
    started = time.time()
    with LoadSampler() as load:
        t0 = time.perf_counter()
        run_simulated(cfg, out, console=console)
        wall = time.perf_counter() - t0
    rows = read_metrics(out)
    evals = [r for r in rows if r["kind"] == "eval"]
    rounds = [r for r in rows if r["kind"] == "round"]
    first, final = eval_losses(evals[0]), eval_losses(evals[-1])
    losses = {domain: (loss, final[domain]) for domain, loss in first.items()}
    fed = cfg.federation
    data = {"preset": cfg.name, "clients": cfg.data.partition.num_clients, "k": fed.clients_per_round,
            "h": fed.local_steps, "rounds": fed.rounds, "nodes": fed.num_nodes, "wall_seconds": wall,
            "round_seconds": [r["wall_seconds"] for r in rounds], "tokens": sum(r["tokens"] for r in rounds),
            "replies": sum(r["ok"] + r["failed"] for r in rounds),
            "failures": [f"round {r['round']}: {why}" for r in rounds for why in r.get("failures", [])],
            "ppl": {d: [perplexity(a), perplexity(b)] for d, (a, b) in losses.items()},
            "bpb": {k.removeprefix(BPB): [v, evals[-1][k]] for k, v in evals[0].items() if k.startswith(BPB)}}
    publish("demo", data, render, load, started, console)
    return data


def render(data: dict[str, Any]) -> str:
    rs = data["round_seconds"]
    lines = [f"`photon run` (preset `{data['preset']}`: {data['clients']} by-domain clients, K = {data['k']}, "
             f"H = {data['h']}, {data['rounds']} rounds, {data['nodes']} simulated nodes): the federation took "
             f"{data['wall_seconds'] / 60:.1f} min (rounds of {min(rs):.1f}–{max(rs):.1f} s), "
             f"{data['tokens'] / 1e6:.1f}M training tokens; validation perplexity per domain:", "",
             "| domain | before | after |" + (" bits/byte before | after |" if data.get("bpb") else ""),
             "|---|---|---|" + ("---|---|" if data.get("bpb") else "")]
    for domain, (before, after) in data["ppl"].items():
        bpb = data.get("bpb", {}).get(domain)
        lines.append(f"| {domain} | {before:,.1f} | {after:,.1f} |" + (f" {bpb[0]:.3f} | {bpb[1]:.3f} |" if bpb else ""))
    if "failures" in data:  # recorded since the round log names its failures
        lines += ["", f"Failed replies: {len(data['failures'])} of {data['replies']}."]
        lines += [f"- {why}" for why in data["failures"]]
        if any(DISAGREES in why for why in data["failures"]):
            lines += ["", "These are honest clients rejected by the direction screen, which this run had on "
                      "(`federation.min_cosine`): late in a by-domain run the clients' updates drift towards "
                      "orthogonal, and a cosine just below 0 with most of the others reads as disagreement (the "
                      "screen's known limit, docs/RELIABILITY.md; `--set federation.min_cosine=null` turns it off, "
                      "as it is by default)."]
    return "\n".join(lines)


def render_brief(data: dict[str, Any]) -> str:
    """One sentence for the README: how long `make run` takes here and what it achieves."""
    before, after = data["ppl"]["overall"]
    return (f"On this 2-core machine the federation took {data['wall_seconds'] / 60:.1f} minutes "
            f"(preparing the corpus the first time comes on top); overall validation perplexity fell from "
            f"{before:,.0f} to {after:,.0f}, and fell on every domain"
            + ("." if all(b < a for a, b in data["ppl"].values()) else " but one or more (see docs/RESULTS.md).")
            + (f" {len(data['failures'])} of its {data['replies']} replies failed (docs/RESULTS.md says why)."
               if data.get("failures") else ""))
