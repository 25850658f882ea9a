"""Reading the claims benchmark's stored record (docs/results/claims-SCALE.json) and the quantities derived
from it: perplexity curves, tokens and modelled wall time to a target perplexity, bytes per token.

Everything here is a pure function of the record (what `run.collect` wrote) and of the network model in
`photon/bench/network.py`, except `model_bytes`, which the benchmark calls once while collecting.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from photon.bench.network import (
    NETWORKS,
    Network,
    crossovers,
    data_parallel_step_seconds,
    photon_round_seconds,
    ring_allreduce_bytes,
    ring_allreduce_seconds,
)

OVERALL = "overall"
BANDWIDTH_SWEEP = NETWORKS[1]  # the profile whose latency the crossover's bandwidth sweep keeps


def ppl(loss: float) -> float:
    """Perplexity of a mean loss, capped so a diverged run reads as a huge number rather than an overflow."""
    return math.exp(min(loss, 50.0))


# ---------------------------------------------------------------------------------------------------------
# Reading the stored record


class View:
    """Convenient read access to one stored record's arms (seeds are the JSON keys "0", "1", ...)."""

    def __init__(self, data: dict[str, Any]):
        self.d = data
        self.arms: dict[str, dict[str, Any]] = data["arms"]
        self.K = data["plan"]["clients"]

    def seeds(self, *names: str) -> list[str]:
        """The seeds every named arm finished: each comparison uses one common seed set."""
        sets = [set(self.arms.get(n, {}).get("runs", {})) for n in names]
        return sorted(set.intersection(*sets), key=int) if sets else []

    def has(self, *names: str) -> bool:
        return bool(self.seeds(*names))

    def run(self, name: str, seed: str) -> dict[str, Any]:
        return self.arms[name]["runs"][seed]

    def final(self, name: str, seed: str, domain: str = OVERALL) -> float:
        return ppl(self.run(name, seed)["evals"][-1][2][domain])

    def finals(self, name: str, seeds: Sequence[str], domain: str = OVERALL) -> list[float]:
        return [self.final(name, s, domain) for s in seeds]

    def final_bpb(self, name: str, seed: str, domain: str = OVERALL) -> float | None:
        """Bits per byte of the final evaluation (None for a record without the scored bytes)."""
        from photon.train.evaluate import bits_per_byte

        loss = self.run(name, seed)["evals"][-1][2][domain]
        return bits_per_byte({domain: loss}, self.d.get("eval_bytes", {})).get(domain)

    def curve(self, name: str, seed: str, x: int = 0, per: float = 1.0) -> list[tuple[float, float]]:
        """[(x, ppl)]: x = tokens (x=0, divided by `per`) or round-equivalent (x=1)."""
        return [(e[x] / per, ppl(e[2][OVERALL])) for e in self.run(name, seed)["evals"]]

    def domains(self) -> list[str]:
        return list(self.d["domains"])

    def lr(self, name: str) -> str:
        return f"{self.arms[name]['lr']:g}"


# ---------------------------------------------------------------------------------------------------------
# Derived quantities


def to_target(curve: list[tuple[float, float]], target: float) -> float | None:
    """First x at which the ppl curve reaches `target`, interpolating log(ppl) linearly between evaluations."""
    for (x0, p0), (x1, p1) in zip(curve, curve[1:]):
        if p1 <= target:
            if p0 <= target:
                return x0
            f = (math.log(p0) - math.log(target)) / (math.log(p0) - math.log(p1))
            return x0 + f * (x1 - x0)
    return curve[0][0] if curve and curve[0][1] <= target else None


def at(curve: list[tuple[float, float]], x: float) -> float | None:
    """log-linear interpolation of a ppl curve at x (None outside it)."""
    for (x0, p0), (x1, p1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            f = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return math.exp(math.log(p0) + f * (math.log(p1) - math.log(p0)))
    return None


def ratio_curve(v: View, fed: str, central: str, seed: str, per: float) -> list[tuple[float, float]]:
    """Federated over centralized perplexity at each federated evaluation, against the centralized tokens
    (`per` = K in the paper's regime, where each client trains what the centralized run trains)."""
    c = v.curve(central, seed)
    out = []
    for x, p in v.curve(fed, seed, per=per)[1:]:
        q = at(c, x)
        if q is not None:
            out.append((x, p / q))
    return out


def step_compute_seconds(run: dict[str, Any]) -> float:
    """Measured seconds per local step on the round's critical path (the slowest client)."""
    return sum(r["critical_train_seconds"] for r in run["rounds"]) / (run["local_steps"] * len(run["rounds"]))


def photon_times(run: dict[str, Any], net: Network, step_s: float | None = None) -> tuple[list[float], float, float]:
    """Modelled wall time at each evaluation and the total compute / communication seconds.

    Compute per round is the measured critical path, or H × `step_s` when given (a common per-step time for
    arms that do identical per-client work, which keeps machine-load noise out of their comparison)."""
    times, compute, comm, t = [0.0], 0.0, 0.0, 0.0
    for r in run["rounds"]:
        crit = r["critical_train_seconds"] if step_s is None else step_s * run["local_steps"]
        ok = max(1, r["ok"])
        # Time outside local training, per client: each client's task set-up (parallel on real machines) plus
        # its share of the server's fold and outer step (small next to set-up).
        server = max(0.0, r["wall_seconds"] - r["train_seconds"]) / ok
        step = photon_round_seconds(crit, r["bytes_down"] / ok, r["bytes_up"] / ok, net, server)
        compute += crit
        comm += step - crit
        t += step
        times.append(t)
    return [times[int(e[1])] for e in run["evals"]], compute, comm


def dp_times(run: dict[str, Any], step_s: float, model_bytes: int, workers: int, tokens_per_step: int,
             net: Network) -> tuple[list[float], float, float]:
    """Data-parallel training with `workers` ranks of batch b (= the centralized arm's batch K·b)."""
    per_step = data_parallel_step_seconds(step_s, model_bytes, workers, net)
    steps = [e[0] / tokens_per_step for e in run["evals"]]
    return [s * per_step for s in steps], steps[-1] * step_s, steps[-1] * ring_allreduce_seconds(model_bytes,
                                                                                                 workers, net)


def model_bytes(cfg: Any) -> int:
    """fp32 bytes of the model's unique parameters (at collect time; needs torch)."""
    from photon.federation.protocol import tensor_bytes
    from photon.model.transformer import Transformer, unique_state_dict

    return tensor_bytes(unique_state_dict(Transformer(cfg.model)))



# ---------------------------------------------------------------------------------------------------------
# What each claim compares, measured from the record


def ratios(v: View, fed: str, central: str) -> tuple[list[str], list[float]]:
    """The common seeds and, per seed, `fed`'s final perplexity over `central`'s."""
    seeds = v.seeds(fed, central)
    return seeds, [a / b for a, b in zip(v.finals(fed, seeds), v.finals(central, seeds))]


def target_tokens(v: View, a: str, b: str) -> tuple[list[str], float, dict[str, list[float | None]]]:
    """Tokens each arm needs to reach the worse of the two final perplexities (over the common seeds)."""
    seeds = v.seeds(a, b)
    target = max(v.final(n, s) for n in (a, b) for s in seeds)
    return seeds, target, {n: [to_target(v.curve(n, s), target) for s in seeds] for n in (a, b)}


def k_arms(v: View) -> list[str]:
    """The K-sweep arms that ran, in increasing K (`photon` is the plan's own K)."""
    p = v.d["plan"]
    return [n for n in (f"k{k}" if k != p["clients"] else "photon" for k in p["ks"]) if v.has(n)]


def clients_of(data: dict[str, Any], name: str) -> int:
    over = data["arms"][name]["overrides"]
    return int(next(o.split("=")[1] for o in over if o.startswith("data.partition.num_clients=")))


def k_times(v: View, net: Network) -> tuple[list[str], float, float, dict[str, list[float | None]]] | None:
    """(seeds, target, seconds per local step, arm -> modelled seconds to the target per seed) of the K sweep
    on `net`, or None when fewer than two K ran. Target = the worst final perplexity among the arms."""
    names = k_arms(v)
    if len(names) < 2:
        return None
    seeds = v.seeds(*names)
    target = max(v.final(n, s) for n in names for s in seeds)
    # Every K does the same work per client per round: one per-step time (the median measured) for all.
    step_s = statistics.median(step_compute_seconds(v.run(n, s)) for n in names for s in seeds)
    walls = {n: [time_to(v.run(n, s), v.curve(n, s), target, net, step_s) for s in seeds] for n in names}
    return seeds, target, step_s, walls


def time_to(run: dict[str, Any], curve: list[tuple[float, float]], target: float, net: Network,
            step_s: float | None = None) -> float | None:
    times, _, _ = photon_times(run, net, step_s)
    return to_target([(t, p) for t, (_, p) in zip(times, curve)], target)


def wall(v: View, seed: str, target: float, net: Network) -> tuple[float | None, float | None, float | None,
                                                                    float | None]:
    """(Photon s to target, of which comm+overhead, DP s to target, of which all-reduce), pro rata."""
    d, ph = v.d, v.run("photon", seed)
    times, _, comm = photon_times(ph, net)
    t_ph = to_target([(t, p) for t, (_, p) in zip(times, v.curve("photon", seed))], target)
    # n = K workers of Photon's local batch b: a data-parallel step trains the centralized arm's K·b rows
    dts, _, dcomm = dp_times(v.run("central", seed), step_compute_seconds(ph), d["model"]["bytes"], v.K,
                             v.K * d["batch"] * d["seq_len"], net)
    t_dp = to_target([(t, p) for t, (_, p) in zip(dts, v.curve("central", seed))], target)
    share = (lambda t, c, tot: None if t is None else t * c / (tot or 1.0))
    return t_ph, share(t_ph, comm, times[-1]), t_dp, share(t_dp, dcomm, dts[-1])


def bytes_per_token(run: dict[str, Any]) -> float:
    sent = sum(r["bytes_up"] + r["bytes_down"] for r in run["rounds"])
    return sent / sum(r["tokens"] for r in run["rounds"])


def dp_bytes_per_token(d: dict[str, Any]) -> float:
    K = d["plan"]["clients"]
    return K * ring_allreduce_bytes(d["model"]["bytes"], K) / (K * d["batch"] * d["seq_len"])


def crossovers_at(v: View, seed: str, target: float, net: Network) -> list[float]:
    """Bandwidths at which Photon and data-parallel reach `target` together, at `net`'s latency."""
    return crossovers(lambda bw: wall(v, seed, target, net.with_bandwidth(bw))[0] or math.inf,
                      lambda bw: wall(v, seed, target, net.with_bandwidth(bw))[2] or math.inf)


def process_hours(v: View) -> float:
    """Seconds of every stored run: the arms' and the sweep points' other than each arm's seed 0 at its best LR
    (which is both)."""
    arms = sum(r["seconds"] for a in v.arms.values() for r in a["runs"].values())
    sweeps = sum(t or 0.0 for name, s in v.d["sweeps"].items() for lr, t in zip(s["grid"], s.get("seconds", []))
                 if lr != s["best_lr"])
    return (arms + sweeps) / 3600


def not_folded(v: View) -> int:
    """Client updates the server did not fold (dropped or failed), over every federated run."""
    return sum(r.get("dropped", 0) + r.get("failed", 0) for a in v.arms.values() if a["kind"] == "federated"
               for run in a["runs"].values() for r in run["rounds"])
