"""`photon bench async`: how asynchronous rounds should fold stale replies and step the model, under the
stragglers benchmark's faults (a quarter of the clients 3× slower, 10% of replies lost).

Arms, each at two outer learning rates (the LR is tuned per arm, not shared): FedAvg with the staleness weights
normalized (Σ n·s·Δ / Σ n·s) or summed as FedBuff does (Σ n·s·Δ / Σ n), and the momentum outer optimizers
Nesterov (DiLoCo's) and Delayed Nesterov (Async Local-SGD's, momentum updated every N outer steps). A clean
synchronous run (no faults) is the reference. Every arm folds the same training tokens on the same LR schedule,
on the in-process engine's virtual clock (`stragglers.run_arm`), with the stragglers benchmark's settings (K = 4
of 8 clients on 4 nodes, a plain weighted mean, the update screen off).

Reported per arm: final perplexity and bits per byte (mean over seeds), its cost against clean sync, the
virtual time the tokens took, and the mean damping of the summed weights. Resumable: a finished arm is skipped.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from photon.bench.results import LoadSampler, publish
from photon.bench.stragglers import SETTING, clean_tokens, common_overrides, run_arm
from photon.config import RunConfig, with_overrides

CLEAN = "clean sync"
# the faults of this benchmark's record: slowness and losses drawn per client and task (the stragglers
# benchmark has since moved to faults of the node)
CLIENT_FAULTS = ("federation.faults.slow_fraction=0.25", "federation.faults.slow_factor=3",
                 "federation.faults.drop_probability=0.1")
# name -> (outer optimizer, staleness weighting, the outer LRs tried)
ARMS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "FedAvg, normalized weights": ("fedavg", "normalized", (0.6, 0.8, 1.0)),
    "FedAvg, summed weights (FedBuff)": ("fedavg", "summed", (0.6, 0.8, 1.0)),
    "Nesterov, normalized weights": ("nesterov", "normalized", (0.35, 0.7)),
    "Delayed Nesterov (N = 4), normalized weights": ("delayed-nesterov", "normalized", (0.35, 0.7)),
}


def arm_runs() -> list[tuple[str, str, float | None]]:
    """(label, arm, outer LR) of every run of a seed: the clean reference, then each arm at each of its LRs."""
    runs: list[tuple[str, str, float | None]] = [(CLEAN, CLEAN, None)]
    for arm, (_, _, lrs) in ARMS.items():
        runs += [(f"{arm}, lr {lr:g}", arm, lr) for lr in lrs]
    return runs


def run_config(base: RunConfig, arm: str, lr: float | None, seed: int) -> RunConfig:
    fed = base.federation
    common = common_overrides(base, seed, rounds_cap=4 * fed.rounds) + [
        f"federation.round_timeout_s={4 * fed.local_steps * fed.virtual_clock.step_seconds}"]
    if arm == CLEAN:
        return with_overrides(base, common)
    outer, weighting, _ = ARMS[arm]
    return with_overrides(base, common + list(CLIENT_FAULTS) + [
        f"federation.faults.seed={seed}", "federation.mode=async", f"federation.outer.name={outer}",
        f"federation.outer.lr={lr}", f"federation.asynchronous.weighting={weighting}"])


def run_async_bench(cfg: RunConfig, out: Path, seeds: int = 2, console: Console | None = None,
                    results_dir: Path | None = None) -> dict[str, Any]:
    console = console or Console()
    base = with_overrides(cfg, list(SETTING))
    fed, t = base.federation, base.train
    budget = clean_tokens(base)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in arm_runs()}
    started = time.time()
    with LoadSampler() as load:
        for seed in range(seeds):
            for label, arm, lr in arm_runs():
                console.print(f"seed {seed}: {label}")
                name = label.replace(",", "").replace(" ", "-").replace("(", "").replace(")", "").replace("=", "")
                runs[label].append(run_arm(run_config(base, arm, lr, seed), out / f"seed{seed}" / name, budget))
    data = {"preset": cfg.name, "clients": 8, "k": 4, "nodes": 4, "local_steps": fed.local_steps,
            "rounds": fed.rounds, "batch": t.batch_size, "seq_len": t.seq_len, "budget_tokens": budget,
            "seeds": seeds, "delay": base.federation.outer.delay, "runs": runs}
    publish("async", data, render, load, started, console, results_dir=results_dir)
    return data


def _mean(rs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rs if r.get(key) is not None]
    return statistics.mean(values) if len(values) == len(rs) else None


def render(data: dict[str, Any]) -> str:
    runs = data["runs"]
    clean = _mean(runs[CLEAN], "final_ppl")
    lines = [f"Preset `{data['preset']}`, K = {data['k']} of N = {data['clients']} by-domain clients on "
             f"{data['nodes']} nodes, H = {data['local_steps']}, batch {data['batch']}×{data['seq_len']}; every run "
             f"folds {data['budget_tokens']:,} training tokens ({data['rounds']} clean rounds). Async runs: a quarter "
             f"of the clients 3× slower, 10% of replies lost, quorum K, staleness weight s = 1/√(1+τ); "
             f"{data['seeds']} seeds (means). A plain weighted mean, the update screen off.",
             "", "| run | final ppl | bits/byte | cost vs clean sync | virtual time | mean damping |",
             "|---|---|---|---|---|---|"]
    for label in [label for label, _, _ in arm_runs() if label in runs]:  # in the plan's order
        rs = runs[label]
        ppl, bpb = _mean(rs, "final_ppl"), _mean(rs, "final_bpb")
        damping = _mean(rs, "damping")
        lines.append(f"| {label} | {ppl:,.1f} | {f'{bpb:.3f}' if bpb is not None else '-'} | "
                     + (f"{ppl / clean - 1:+.1%}" if label != CLEAN else "-")
                     + f" | {_mean(rs, 'clock'):,.0f} s | {f'{damping:.3f}' if damping is not None else '-'} |")
    lines += ["", *verdicts(data)]
    return "\n".join(lines)


def _best(data: dict[str, Any], arm: str) -> tuple[float, float]:
    """(perplexity, LR) of `arm` at its best outer LR."""
    return min((_mean(data["runs"][f"{arm}, lr {lr:g}"], "final_ppl"), lr) for lr in ARMS[arm][2])


def verdicts(data: dict[str, Any]) -> list[str]:
    runs = data["runs"]
    norm, summed = "FedAvg, normalized weights", "FedAvg, summed weights (FedBuff)"
    at_default = [_mean(runs[f"{arm}, lr 1"], "final_ppl") for arm in (norm, summed)]
    (bn, ln), (bs, ls) = _best(data, norm), _best(data, summed)
    edge = _edge((norm, ln), (summed, ls))
    (nesterov, lnes), (delayed, ldel) = (_best(data, "Nesterov, normalized weights"),
                                         _best(data, "Delayed Nesterov (N = 4), normalized weights"))
    return [
        f"- At the default outer LR 1.0: summed weights {at_default[1]:,.1f} against normalized "
        f"{at_default[0]:,.1f} ({at_default[1] / at_default[0] - 1:+.1%}).",
        f"- Each at its best LR: summed {bs:,.1f} (lr {ls:g}) against normalized {bn:,.1f} (lr {ln:g}) "
        f"({bs / bn - 1:+.1%}){edge}.",
        f"- Momentum, each at its best LR: Delayed Nesterov {delayed:,.1f} (lr {ldel:g}) against Nesterov "
        f"{nesterov:,.1f} (lr {lnes:g}) ({delayed / nesterov - 1:+.1%})"
        f"{_edge(('Nesterov, normalized weights', lnes), ('Delayed Nesterov (N = 4), normalized weights', ldel))}; "
        f"the best FedAvg run: {min(bn, bs):,.1f}."]


def _edge(*best: tuple[str, float]) -> str:
    """Said when an arm's best LR is the lowest or highest it tried: the optimum may lie beyond the grid."""
    out = [f"{arm}: best at the {'lowest' if lr == min(ARMS[arm][2]) else 'highest'} LR tried"
           for arm, lr in best if len(ARMS[arm][2]) > 1 and lr in (min(ARMS[arm][2]), max(ARMS[arm][2]))]
    return f" ({'; '.join(out)}: the optimum may lie beyond)" if out else ""
