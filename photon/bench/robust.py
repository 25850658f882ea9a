"""`photon bench robust`: colluding attackers among K clients; what does each aggregation rule cost and save?

Settings (`--settings`, K×m): K by-domain clients, all sampled every round, the last m of them attackers
that send one identical crafted update (bench/adversary.py: they see the round's honest updates). Attacks:
sign flip −s·mean(honest) for each s in `--scales`, noise at the honest norm, zero (a free-rider), a replay
of an honest client's previous update, and ALIE (mean − z·std, z = `--alie-z`). Rules, on the same seed,
data, model and budget: the default config, the plain mean with every check off, the cosine screen (mean,
norm ratio 10, pairwise cosine ≥ 0), the coordinate-wise median and the trimmed mean. A clean run per K and
rule gives each rule's cost when nobody attacks, and a run per setting where the attackers send the honest
mean gives the floor: what losing their data costs (by-domain, their domains), which no rule can undercut
by rejecting them. Reported per arm: final validation perplexity, its cost
against the clean plain mean of the same K, and the honest updates rejected or clipped below half their
weight; a rule that turns every reply away until the run stops is reported so. Each finished arm is kept
in its folder, so a rerun skips it. Stored in docs/results/robust.json.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from photon.bench.adversary import Adversary
from photon.bench.results import LoadSampler, publish
from photon.config import RunConfig, with_overrides
from photon.errors import UserError
from photon.federation.runner import run_federation
from photon.federation.worker import ClientWorker
from photon.runlog import read_metrics
from photon.train.evaluate import OVERALL, bits_per_byte, perplexity
from photon.transport.inprocess import InProcessTransport

CHECKS_OFF = ["federation.max_norm_ratio=null", "federation.min_cosine=null"]
RULES: dict[str, list[str]] = {
    "default": [],
    "mean, no checks": ["federation.aggregation=mean", *CHECKS_OFF],
    "cosine screen": ["federation.aggregation=mean", "federation.max_norm_ratio=10", "federation.min_cosine=0"],
    "median": ["federation.aggregation=median", *CHECKS_OFF],
    "trimmed mean": ["federation.aggregation=trimmed-mean", *CHECKS_OFF],
}
BASELINE = "mean, no checks"
SETTINGS = ((4, 1), (4, 2), (8, 1), (8, 2))
GOAL_SETTINGS = ((4, 1), (8, 2))  # the goal: ≤ 10% with one attacker of four and two of eight
OTHER_ATTACKS = ("noise", "zero", "replay", "alie")
DIVERGED = 11.0  # a final perplexity over 11× the clean run's (cost over +1000%) is shown as diverged


def attack_list(scales: tuple[float, ...], alie_z: float) -> list[tuple[str, float]]:
    """(attack, its scale) in table order: the flips, then the rest (noise, zero and replay have none)."""
    return [("flip", s) for s in scales] + [(a, alie_z if a == "alie" else 1.0) for a in OTHER_ATTACKS]


def _label(attack: str | None, scale: float) -> str:
    if attack is None:
        return "clean"
    if attack == "flip":
        return f"flip ×{scale:g}"
    return f"ALIE z={scale:g}" if attack == "alie" else attack


def _run_arm(cfg: RunConfig, run_dir: Path, attackers: list[int], attack: str | None, scale: float
             ) -> dict[str, Any]:
    """One run; its summary is kept beside it (arm.json), so a rerun of the bench reuses it."""
    done = run_dir / "arm.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    k = cfg.federation.clients_per_round
    transport: Any = InProcessTransport(ClientWorker(run_dir / "node"), k)  # a node each: a round returns whole
    if attack is not None:
        transport = Adversary(transport, attackers, attack, scale)
    ended = None
    try:
        run_federation(cfg, run_dir, transport, console=Console(quiet=True))
    except UserError as e:  # a rule that turns every reply away ends the run: that is its result
        ended = str(e).splitlines()[0]
    rows = read_metrics(run_dir)
    evals = [r for r in rows if r["kind"] == "eval"]
    rounds = [r for r in rows if r["kind"] == "round"]
    honest = [c for c in range(cfg.data.partition.num_clients) if c not in attackers]
    arm = {"ppl_before": perplexity(evals[0]["loss/overall"]), "ppl_after": perplexity(evals[-1]["loss/overall"]),
           "bpb_after": evals[-1].get("bpb/overall"),
           "rounds": len(rounds),
           "honest_rejected": sum(c not in r["accepted"] for r in rounds for c in honest),
           "honest_clipped": sum(r.get("clip_scales", {}).get(str(c), 1.0) < 0.5 for r in rounds for c in honest),
           "attackers_rejected": sum(c not in r["accepted"] for r in rounds for c in attackers), "ended": ended}
    done.write_text(json.dumps(arm))
    return arm


def run_robust_bench(cfg: RunConfig, out: Path, scales: tuple[float, ...] = (1, 2, 5, 10), alie_z: float = 1.0,
                     settings: tuple[tuple[int, int], ...] = SETTINGS, rules: dict[str, list[str]] | None = None,
                     seeds: int = 1, console: Console | None = None, results_dir: Path | None = None
                     ) -> dict[str, Any]:
    console = console or Console()
    rules = rules or RULES
    attacks = attack_list(scales, alie_z)
    plan: list[tuple[str, int, int, str | None, float, int]] = []
    for seed in range(seeds):
        for k in sorted({k for k, _ in settings}):
            plan += [(rule, k, 0, None, 1.0, seed) for rule in rules]
        for k, m in settings:
            plan.append((BASELINE, k, m, "absent", 1.0, seed))  # the floor: the attackers' data missing
            plan += [(rule, k, m, a, s, seed) for a, s in attacks for rule in rules]
    rows = []
    started = time.time()
    with LoadSampler() as load:
        for i, (rule, k, m, attack, scale, seed) in enumerate(plan, 1):
            # min_replies 1: a round that rejects the attackers still commits
            acfg = with_overrides(cfg, [f"data.partition.num_clients={k}", f"federation.clients_per_round={k}",
                                        "federation.min_replies=1", *rules[rule], f"train.seed={seed}"])
            attackers = list(range(k - m, k))
            name = re.sub(r"[^a-z0-9]+", "-", f"k{k} m{m} {_label(attack, scale)} {rule} seed{seed}".lower())
            console.print(f"[{i}/{len(plan)}] K={k}, {m} attacker(s), {_label(attack, scale)}, {rule}, seed {seed}")
            rows.append({"rule": rule, "clients": k, "attackers": m, "attack": attack, "scale": scale, "seed": seed,
                         **_run_arm(acfg, out / name.strip("-"), attackers, attack, scale)})
    fed = cfg.federation
    data = {"preset": cfg.name, "rounds": fed.rounds, "local_steps": fed.local_steps, "scales": list(scales),
            "alie_z": alie_z, "settings": [list(s) for s in settings], "rules": list(rules), "seeds": seeds,
            "default": {"aggregation": fed.aggregation, "max_norm_ratio": fed.max_norm_ratio,
                        "min_cosine": fed.min_cosine, "clipping": fed.clipping.model_dump()},
            "rows": rows}
    publish("robust", data, render, load, started, console, results_dir=results_dir)
    return data


def _bpb(data: dict[str, Any], ppl: float) -> float | None:
    """Bits per byte of an overall perplexity, from the record's scored tokens and bytes (if it holds them)."""
    return bits_per_byte({OVERALL: math.log(ppl)}, data.get("eval_bytes", {})).get(OVERALL)


def _select(rows: list[dict], **match: Any) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _ppl(rows: list[dict], **match: Any) -> float:
    """Mean final perplexity of the matching arms; infinite if one of them ended early (its rule stopped it)."""
    sel = _select(rows, **match)
    return float("inf") if any(r.get("ended") for r in sel) else statistics.mean(r["ppl_after"] for r in sel)


def render(data: dict[str, Any]) -> str:
    """The markdown tables and goal lines for docs/RESULTS.md."""
    rows, rules = data["rows"], data["rules"]
    attacks = attack_list(tuple(data["scales"]), data["alie_z"])
    ks = sorted({k for k, _ in data["settings"]})
    d = data["default"]
    clip = d["clipping"]
    default = d["aggregation"] + (f" (centre {clip['centre']}, radius {clip['radius']}"
                                  f"{' × ' + format(clip['radius_factor'], 'g') if clip['radius'] == 'median' else ''}"
                                  f", {clip['iterations']} iteration(s), buckets of {clip['bucket_size']})"
                                  if d["aggregation"] == "centered-clip" else "")
    lines = [f"Preset `{data['preset']}`, K by-domain clients all sampled every round, {data['rounds']} rounds of "
             f"H = {data['local_steps']}, {data['seeds']} seed(s) (perplexity averaged). The last m clients "
             "collude: each round they see the honest updates and all send one crafted update. Default rule: "
             f"{default}; its screen rejects only malformed or non-finite updates and norms above "
             f"{d['max_norm_ratio']}× the median. Cost = final perplexity over the clean plain mean's at the same K, "
             "minus 1; *r*/*c* = honest updates rejected / clipped below half their weight (over all rounds). The "
             "floor is the plain mean with the attackers sending the honest mean: their domains' data missing, "
             "what a rule that removed them exactly would cost.", "",
             "Clean runs (nobody attacks):", "",
             "| rule | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]

    def cell(match: dict[str, Any], base: float) -> str:
        sel = _select(rows, **match)
        if any(r.get("ended") for r in sel):
            return f"run stopped after {min(r['rounds'] for r in sel)} round(s)"
        ppl = statistics.mean(r["ppl_after"] for r in sel)
        r_, c_ = sum(r["honest_rejected"] for r in sel), sum(r["honest_clipped"] for r in sel)
        cost = f"{ppl / base - 1:+.1%}" if ppl < DIVERGED * base else "diverged"
        return (f"{ppl:,.1f}" if ppl < DIVERGED * base else f"{ppl:.2g}") + \
            f" ({cost}{f', r {r_}' if r_ else ''}{f', c {c_}' if c_ else ''})"

    base = {k: _ppl(rows, rule=BASELINE, clients=k, attack=None) for k in ks}
    bpb = {k: [r.get("bpb_after") or _bpb(data, r["ppl_after"])
               for r in _select(rows, rule=BASELINE, clients=k, attack=None)] for k in ks}
    if all(v and None not in v for v in bpb.values()):  # records measured before bits per byte was logged lack it
        ends = ", ".join(f"{statistics.mean(bpb[k]):.3f} bits per byte for K = {k}" for k in ks)
        clean = lines.index("Clean runs (nobody attacks):")
        lines[clean] = f"Clean runs (nobody attacks; the plain mean ends at {ends}):"
    for rule in rules:
        lines.append(f"| {rule} | " + " | ".join(cell({"rule": rule, "clients": k, "attack": None}, base[k])
                                                   for k in ks) + " |")
    worst: dict[tuple[int, int], tuple[float, str, float]] = {}
    for k, m in data["settings"]:
        floor = _ppl(rows, rule=BASELINE, clients=k, attackers=m, attack="absent")
        lines += ["", f"K = {k}, {m} attacker(s); floor {floor:,.1f} ({floor / base[k] - 1:+.1%}):", "",
                  "| rule | " + " | ".join(_label(a, s) for a, s in attacks) + " |", "|---|" + "---|" * len(attacks)]
        for rule in rules:
            cells = [cell({"rule": rule, "clients": k, "attackers": m, "attack": a, "scale": s}, base[k])
                     for a, s in attacks]
            lines.append(f"| {rule} | " + " | ".join(cells) + " |")
        costs = [(_ppl(rows, rule="default", clients=k, attackers=m, attack=a, scale=s) / base[k] - 1, _label(a, s))
                 for a, s in attacks]
        worst[(k, m)] = (*max(costs), floor / base[k] - 1)
        worsts = []
        for rule in rules:
            cost, label = max((_ppl(rows, rule=rule, clients=k, attackers=m, attack=a, scale=s) / base[k] - 1,
                               _label(a, s)) for a, s in attacks)
            worsts.append(f"{rule} {'diverged or stopped' if cost > DIVERGED - 1 else f'{cost:+.1%}'} ({label})")
        lines += ["", "Worst attack per rule: " + "; ".join(worsts) + "."]
    clean_rejected = sum(r["honest_rejected"] for r in _select(rows, rule="default", attack=None))
    clean_clipped = sum(r["honest_clipped"] for r in _select(rows, rule="default", attack=None))
    clean_cost = max(abs(_ppl(rows, rule="default", clients=k, attack=None) / base[k] - 1) for k in ks)
    lines += ["", f"- Goal: clean runs with the default reject no honest update: {clean_rejected} rejected, "
              f"{clean_clipped} clipped below half; {'met' if clean_rejected == 0 else 'NOT met'}.",
              f"- Goal: clean runs with the default are within 1% of the plain mean: worst {clean_cost:.2%}; "
              f"{'met' if clean_cost <= 0.01 else 'NOT met'}."]
    for k, m in GOAL_SETTINGS:
        if (k, m) in worst:
            cost, label, floor_cost = worst[(k, m)]
            lines.append(f"- Goal: every attack with {m} of {k} costs the default at most 10%: worst {cost:+.1%} "
                         f"({label}); {'met' if cost <= 0.10 else 'NOT met'} (the floor, their data missing: "
                         f"{floor_cost:+.1%}).")
    return "\n".join(lines)
