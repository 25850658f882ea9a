"""The report half of `photon bench claims`: markdown and plots from the stored record (docs/results/claims-*.json).

`render(data)` is a pure function of one stored record (what `claims.collect` wrote): it models wall time with
`network.py`, derives targets, ratios and verdicts, and formats them; `render_findings(results_dir)` is the
README's table of verdicts over every stored scale. Neither reads a run directory, and neither types a number.
`plot(data, img_dir)` draws the PNGs the report links to (run by the benchmark, not by `photon bench report`).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
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
SCALES = ("tiny", "small", "medium")
CLAIMS = (  # (key, the paper's claim in a few words)
    ("1a", "1. federated ≤ centralized perplexity, equal tokens"),
    ("1b", "1. the same, each client the centralized sample count (K× tokens, the paper's regime)"),
    ("2", "2. more clients, less time to a perplexity"),
    ("3a", "3. H·(n−1)/n× less communication than per-step data-parallel (the paper: 64–512× at H = 64–512)"),
    ("3b", "3. less wall time than data-parallel at 10 Gbps"),
    ("4", "4. converges with one domain per client"),
    ("5", "5. ≈2× fewer tokens than DiLoCo to the same perplexity"),
    ("6", "6. small batch + high LR is why"),
)


def _ppl(loss: float) -> float:
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
        return _ppl(self.run(name, seed)["evals"][-1][2][domain])

    def finals(self, name: str, seeds: Sequence[str], domain: str = OVERALL) -> list[float]:
        return [self.final(name, s, domain) for s in seeds]

    def curve(self, name: str, seed: str, x: int = 0, per: float = 1.0) -> list[tuple[float, float]]:
        """[(x, ppl)]: x = tokens (x=0, divided by `per`) or round-equivalent (x=1)."""
        return [(e[x] / per, _ppl(e[2][OVERALL])) for e in self.run(name, seed)["evals"]]

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
# Formatting


def mean_spread(values: Sequence[float | None]) -> tuple[float, float] | None:
    if not values or any(v is None for v in values):
        return None
    return statistics.mean(values), (max(values) - min(values)) / 2


def fmt(values: Sequence[float | None], digits: int = 1, scale: float = 1.0) -> str:
    ms = mean_spread(values)
    if ms is None:
        reached = sum(v is not None for v in values)
        return f"not reached ({reached}/{len(values)} seeds)" if values else "n/a"
    m, s = ms
    if len(values) == 1:
        return f"{m / scale:,.{digits}f}"
    return f"{m / scale:,.{digits}f} ± {s / scale:,.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _seeds_text(seeds: Sequence[str]) -> str:
    return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"


def _by_sign(values: Sequence[float | None], good: Callable[[float], bool]) -> str:
    """agrees when every seed meets the claim, contradicts when none does, inconclusive otherwise."""
    if not values or any(v is None for v in values):
        return "inconclusive"
    met = [good(v) for v in values]
    return "agrees" if all(met) else "contradicts" if not any(met) else "inconclusive"


# ---------------------------------------------------------------------------------------------------------
# Verdicts: one per claim, from the stored record


def _ratios(v: View, fed: str, central: str) -> tuple[list[str], list[float]]:
    seeds = v.seeds(fed, central)
    return seeds, [a / b for a, b in zip(v.finals(fed, seeds), v.finals(central, seeds))]


def _target_tokens(v: View, a: str, b: str) -> tuple[list[str], float, dict[str, list[float | None]]]:
    """Tokens each arm needs to reach the worse of the two final perplexities (over the common seeds)."""
    seeds = v.seeds(a, b)
    target = max(v.final(n, s) for n in (a, b) for s in seeds)
    return seeds, target, {n: [to_target(v.curve(n, s), target) for s in seeds] for n in (a, b)}


def _k_arms(v: View) -> list[str]:
    p = v.d["plan"]
    return [n for n in (f"k{k}" if k != p["clients"] else "photon" for k in p["ks"]) if v.has(n)]


def _clients(data: dict[str, Any], name: str) -> int:
    over = data["arms"][name]["overrides"]
    return int(next(o.split("=")[1] for o in over if o.startswith("data.partition.num_clients=")))


def _k_times(v: View) -> tuple[list[str], float, float, dict[str, list[float | None]]] | None:
    names = _k_arms(v)
    if len(names) < 2:
        return None
    seeds = v.seeds(*names)
    target = max(v.final(n, s) for n in names for s in seeds)
    # Every K does the same work per client per round: one per-step time (the median measured) for all.
    step_s = statistics.median(step_compute_seconds(v.run(n, s)) for n in names for s in seeds)
    net = NETWORKS[1]
    walls = {n: [_time_to(v.run(n, s), v.curve(n, s), target, net, step_s) for s in seeds] for n in names}
    return seeds, target, step_s, walls


def _time_to(run: dict[str, Any], curve: list[tuple[float, float]], target: float, net: Network,
             step_s: float | None = None) -> float | None:
    times, _, _ = photon_times(run, net, step_s)
    return to_target([(t, p) for t, (_, p) in zip(times, curve)], target)


def _wall(v: View, seed: str, target: float, net: Network) -> tuple[float | None, float | None, float | None,
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


def _bytes_per_token(run: dict[str, Any]) -> float:
    sent = sum(r["bytes_up"] + r["bytes_down"] for r in run["rounds"])
    return sent / sum(r["tokens"] for r in run["rounds"])


def _dp_bytes_per_token(d: dict[str, Any]) -> float:
    K = d["plan"]["clients"]
    return K * ring_allreduce_bytes(d["model"]["bytes"], K) / (K * d["batch"] * d["seq_len"])


def verdicts(data: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """claim key -> (verdict, the numbers behind it, one line)."""
    v, out = View(data), {}
    for key, fed, central in (("1a", "photon", "central"), ("1b", "paper", "central")):
        if not v.has(fed, central):
            out[key] = ("not run", "")
            continue
        seeds, r = _ratios(v, fed, central)
        text = (f"`{fed}`/`central` perplexity {fmt(r, 2)} ({fmt(v.finals(fed, seeds))} vs "
                f"{fmt(v.finals(central, seeds))}, {_seeds_text(seeds)})")
        short = f"{fed}-short"
        if v.has(short, "central-short"):
            s2, r2 = _ratios(v, short, "central-short")
            text += f"; at {data['arms'][short]['horizon']:.2g} of the horizon {fmt(r2, 2)}"
        if key == "1a" and v.has("photon-reset", "central"):
            text += f"; stateless clients (`photon-reset`) {fmt(_ratios(v, 'photon-reset', 'central')[1], 2)}"
        out[key] = (_by_sign(r, lambda x: x <= 1.0), text)
    k = _k_times(v)
    if k is None:
        out["2"] = ("not run", "")
    else:
        seeds, target, _, walls = k
        mean = {n: statistics.mean(w) if all(x is not None for x in w) else None for n, w in walls.items()}
        names = list(walls)
        if any(m is None for m in mean.values()):
            out["2"] = ("inconclusive", "an arm did not reach the target")
        else:
            falls = all(mean[a] > mean[b] for a, b in zip(names, names[1:]))
            verdict = "agrees" if falls else "contradicts" if mean[names[-1]] >= mean[names[0]] else "inconclusive"
            out["2"] = (verdict, f"modelled 1 Gbps s to ppl {target:.0f}: " + ", ".join(
                f"K={_clients(data, n)} {mean[n]:.0f}" for n in names) + f" ({_seeds_text(seeds)})")
    if v.has("photon"):
        s0 = v.seeds("photon")[0]
        bpt = _bytes_per_token(v.run("photon", s0))
        ratio = _dp_bytes_per_token(data) / bpt
        H, K = data["plan"]["local_steps"], data["plan"]["clients"]
        exact = abs(ratio / (H * (K - 1) / K) - 1) < 0.01
        out["3a"] = ("agrees" if exact and ratio > 1 else "contradicts",
                     f"{ratio:.1f}× fewer bytes per token than a per-step ring all-reduce at H={H}, n={K} "
                     f"({'exactly' if exact else 'NOT'} H·(n−1)/n: nothing else is sent)")
    else:
        out["3a"] = ("not run", "")
    if v.has("photon", "central"):
        seeds = v.seeds("photon", "central")
        target = max(v.final(n, s) for n in ("photon", "central") for s in seeds)
        fast = NETWORKS[-1]
        r = []
        for s in seeds:
            t_ph, _, t_dp, _ = _wall(v, s, target, fast)
            r.append(t_dp / t_ph if t_ph and t_dp else None)
        out["3b"] = (_by_sign(r, lambda x: x > 1.0), f"data-parallel needs {fmt(r, 2)}× Photon's modelled time "
                     f"to ppl {target:.0f} at {fast.name} ({_seeds_text(seeds)}, equal tokens)")
    else:
        out["3b"] = ("not run", "")
    if v.has("photon", "iid"):
        seeds = v.seeds("photon", "iid")
        init = [_ppl(v.run("photon", s)["evals"][0][2][OVERALL]) for s in seeds]
        a, b = v.finals("photon", seeds), v.finals("iid", seeds)
        out["4"] = (_by_sign([x / i for x, i in zip(a, init)], lambda x: x < 0.5),
                    f"by-domain {fmt(a)} vs IID {fmt(b)} (from {statistics.mean(init):,.0f} at init, "
                    f"{_seeds_text(seeds)})")
    else:
        out["4"] = ("not run", "")
    if v.has("photon", "diloco"):
        seeds, target, tok = _target_tokens(v, "photon", "diloco")
        r = [d / p if d and p else None for d, p in zip(tok["diloco"], tok["photon"])]
        out["5"] = (_by_sign(r, lambda x: x >= 1.5), f"DiLoCo (kept AdamW state, tuned) needs {fmt(r, 2)}× "
                    f"Photon's tokens to ppl {target:.0f} (finals {fmt(v.finals('photon', seeds))} vs "
                    f"{fmt(v.finals('diloco', seeds))}, {_seeds_text(seeds)}; agrees needs ≥ 1.5×)")
    else:
        out["5"] = ("not run", "")
    if v.has("photon", "bigbatch"):
        seeds = v.seeds("photon", "bigbatch")
        a, b = v.finals("photon", seeds), v.finals("bigbatch", seeds)
        out["6"] = (_by_sign([x / y for x, y in zip(a, b)], lambda x: x < 1.0),
                    f"batch {data['batch']} at LR {v.lr('photon')}: {fmt(a)} vs batch "
                    f"{data['plan']['clients'] * data['batch']} "
                    f"at LR {v.lr('bigbatch')}: {fmt(b)} ({_seeds_text(seeds)})")
    else:
        out["6"] = ("not run", "")
    return out


# ---------------------------------------------------------------------------------------------------------
# The per-scale report


def render(data: dict[str, Any]) -> str:
    """Markdown for one scale (docs/RESULTS.md's `claims-SCALE` block): a pure function of the stored record."""
    v = View(data)
    parts = [_setup(v), _verdict_table(v), _claim1(v), _sweeps(v), _claim2(v), _claim3(v), _claim3_time(v),
             _claim4(v), _claim5(v), _claim6(v), _arms(v)]
    scale = data["scale"]
    plots = [f"![{name}](img/claims-{scale}-{name}.png)" for name in ("curves", "sweeps", "bandwidth")]
    return "\n\n".join([*parts, "\n".join(plots)])


def _setup(v: View) -> str:
    d, p = v.d, v.d["plan"]
    m = d["model"]
    non_emb = m["params"] - m["embedding_params"]
    ref = p["reference_tokens"]
    tput = ", ".join(f"batch {b}: {t:,.0f}" for b, t in d["throughput"]["tokens_per_s"].items())
    est = d["estimate"]
    return "\n".join([
        f"- Model: preset `{d['preset']}` ({m['describe']}; {non_emb / m['params']:.0%} of the parameters outside "
        f"the embeddings), data `{d['data']}` ({len(d['domains'])} domains), sequence length {d['seq_len']}.",
        f"- Reference budget: R={p['rounds']} rounds × H={p['local_steps']} local steps × K={p['clients']} clients "
        "× "
        f"batch {d['batch']} = {p['rounds'] * p['local_steps']} global steps, {ref:,} tokens "
        f"({ref / non_emb:.1f} per non-embedding parameter); the centralized reference trains them in "
        f"{p['rounds'] * p['local_steps']} steps of batch {p['clients'] * d['batch']}.",
        "- Same for every arm: model init (per seed), prepared data, the same "
        f"{d['eval_rows']} validation rows of every domain at every evaluation, cosine schedule over the arm's "
        f"own length with a {p['min_lr_ratio']:.0%} floor and {p['warmup_fraction']:.1%} warmup, AdamW as in the "
        "paper, gradient clipping 1.0.",
        "- Federated arms: in-process engine (`InProcessTransport`, bitwise the Flower simulation's parameters "
        "at equal `train.threads`), "
        "one node per client, clients trained one after another, so a round's critical path is its slowest "
        "client as if each had its own machine. Every federated arm states its client optimizer: `persist` (the "
        "paper's recipe, AdamW state kept per client across rounds) or `reset`. All run with "
        "`federation.state_backup=false`: the arms share one node cache, so no kept state can be lost, and the "
        "bytes counted are the model updates the algorithm needs. The update screen is off "
        "(`federation.max_norm_ratio=null`, `federation.min_cosine=null`): the paper's aggregation is a plain "
        "weighted mean, and the default screen rejects honest by-domain updates late in long runs (their pairwise "
        f"cosines fall to about 0). Client updates not folded over all federated runs: {_not_folded(v)}.",
        f"- Seeds: {p['seeds']} for the headline arms, {p['paper_seeds']} for the paper regime at the full "
        f"horizon, {p['sweep_seeds']} for the secondary arms (`iid`, `bigbatch`, `diloco-reset`, K and H sweeps); "
        "each comparison uses the seeds its arms share; "
        "`a ± b` = mean ± half the range over seeds.",
        f"- Scheduling: {p['jobs']} arm(s) at a time, {p['threads'] or 'default'} thread(s) each; measured compute "
        "times include that sharing and the machine's other load (timings are noisy; perplexities and bytes are "
        f"not). Throughput measured at the start (tokens/s per process, {d['throughput'].get('processes', 1)} "
        f"measuring at once): {tput} at load average {d['throughput']['load_average']}; the plan was estimated at "
        f"{est['seconds'] / 3600:.2f} h "
        f"({est['worst_case_seconds'] / 3600:.2f} h with LR-grid extensions); the runs it stores took "
        f"{_process_hours(v):.2f} process-hours ({p['jobs']} at a time), across however many invocations.",
        f"- Budget changes for this scale: {', '.join(f'`{o}`' for o in p['base_overrides']) or 'none'}."])


def _process_hours(v: View) -> float:
    """Seconds of every stored run: the arms' and the sweep points' other than each arm's seed 0 at its best LR
    (which is both)."""
    arms = sum(r["seconds"] for a in v.arms.values() for r in a["runs"].values())
    sweeps = sum(t or 0.0 for name, s in v.d["sweeps"].items() for lr, t in zip(s["grid"], s.get("seconds", []))
                 if lr != s["best_lr"])
    return (arms + sweeps) / 3600


def _not_folded(v: View) -> int:
    return sum(r.get("dropped", 0) + r.get("failed", 0) for a in v.arms.values() if a["kind"] == "federated"
               for run in a["runs"].values() for r in run["rounds"])


def _verdict_table(v: View) -> str:
    vs = verdicts(v.d)
    rows = [[title, f"**{vs[k][0]}**", vs[k][1] or "-"] for k, title in CLAIMS]
    return "#### Verdicts\n\n" + table(["the paper's claim", "verdict", "measured"], rows)


def _claim1(v: View) -> str:
    d = v.d
    K = v.K
    out = ["#### 1. Federated vs centralized, in both regimes",
           "*Equal tokens*: the federation as a whole trains the centralized run's tokens. *Paper regime*: each "
           f"client trains the centralized run's sample count (K={K}× the tokens in total, K× the rounds). The "
           "centralized reference is `central` at its best LR; every ratio is federated over centralized "
           "perplexity at the same horizon, per seed (< 1: federated better)."]
    rows = []
    for name, ref in (("central", None), ("photon", "central"), ("photon-reset", "central"), ("paper", "central"),
                      ("central-short", None), ("photon-short", "central-short"), ("paper-short", "central-short")):
        if not v.has(name):
            continue
        a = d["arms"][name]
        seeds = v.seeds(name, ref) if ref and v.has(name, ref) else v.seeds(name)
        tokens = a["runs"][seeds[0]]["evals"][-1][0]
        ratio = fmt(_ratios(v, name, ref)[1], 2) if ref and v.has(name, ref) else "-"
        rows.append([f"`{name}`", a["regime"] if a["kind"] != "centralized" else "-", a["client_optimizer"],
                     f"{a['lr']:g}", f"{a['horizon']:.2g}", f"{tokens / 1e6:.2f}", fmt(v.finals(name, seeds)), ratio,
                     ", ".join(seeds)])
    if not rows:
        return out[0] + "\n\n(arms missing: not run)"
    out.append(table(["arm", "regime", "client optimizer", "LR", "horizon", "tokens (M)", "final ppl",
                      "ratio to centralized", "seeds"], rows))
    curves = []
    for name, ref, per in (("photon", "central", 1), ("photon-reset", "central", 1), ("paper", "central", K),
                           ("photon-short", "central-short", 1), ("paper-short", "central-short", K)):
        if not v.has(name, ref):
            continue
        seeds = v.seeds(name, ref)
        per_seed = [ratio_curve(v, name, ref, s, per) for s in seeds]
        end = v.run(ref, seeds[0])["evals"][-1][0]
        cells = []
        for q in (0.25, 0.5, 0.75, 1.0):
            vals = [next((r for x, r in c if x >= q * end - 1e-6), None) for c in per_seed]
            cells.append(fmt(vals, 2))
        curves.append([f"`{name}` / `{ref}`", *cells])
    if curves:
        out += ["Ratio over the run (federated / centralized perplexity at the first federated evaluation at or "
                "past each fraction of the centralized tokens; the centralized curve is interpolated in log "
                "perplexity; paper regime: against each client's tokens). The whole curves are in "
                f"`claims-{d['scale']}-curves.png`.",
                table(["ratio", "25%", "50%", "75%", "100%"], curves)]
    named = [n for n in ("central", "photon", "photon-reset", "paper") if v.has(n)]
    if len(named) > 1:
        seeds = {n: v.seeds(n) for n in named}
        out += ["Final perplexity per domain (full horizon):",
                table(["domain", *[f"`{n}`" for n in named]],
                      [[dom, *[fmt(v.finals(n, seeds[n], dom)) for n in named]] for dom in [*v.domains(), OVERALL]])]
    vs = verdicts(d)
    out.append(f"**Result:** equal tokens: **{vs['1a'][0]}** ({vs['1a'][1]}). Paper regime: **{vs['1b'][0]}** "
               f"({vs['1b'][1]}).")
    return "\n\n".join(out)


def _sweeps(v: View) -> str:
    d, p = v.d, v.d["plan"]
    out = ["#### Learning-rate sweeps (claims 1 and 5 use each side's best)",
           "Rule, the same for `central`, `photon` and `diloco`: the arm's base LR × "
           f"{{{', '.join(f'{x:g}' for x in p['lr_grid'])}}} "
           f"at seed 0; while the best final validation perplexity is at an edge of the grid, one more geometric "
           f"step beyond it (at most {p['lr_extend']} times); the other seeds then run at the best LR. The base LR "
           "is the preset's for all three, so they start from the same grid (the paper gives centralized training "
           "and DiLoCo a lower LR than Photon; the edge rule lets each grid move to its own optimum). Arms that "
           "are not swept take the best LR of their family: "
           "`photon`'s for `photon-reset`, `paper`, `iid`, the `-short`, K and H arms; `central`'s for "
           "`central-short` and `bigbatch`; `diloco`'s for `diloco-reset` and the torchft peer. Final validation "
           "perplexity at seed 0:"]
    rows = []
    for name, s in d["sweeps"].items():
        cells = [f"{lr:g}: " + ("failed" if ppl is None else f"**{ppl:,.1f}**" if lr == s["best_lr"] else f"{ppl:,.1f}")
                 for lr, ppl in zip(s["grid"], s["ppl"])]
        note = " (at the grid's edge)" if s["at_edge"] else ""
        rows.append([f"`{name}`", f"{s['base_lr']:g}", " · ".join(cells), f"{s['best_lr']:g}{note}"])
    if not rows:
        return out[0] + "\n\n(not run)"
    out.append(table(["arm", "base LR", "LR: final ppl", "best LR"], rows))
    for name, s in d["sweeps"].items():
        for lr, why in s.get("failed", {}).items():
            out.append(f"`{name}` at LR {lr} failed (counted as infinite perplexity): {why}")
    edge = [n for n, s in d["sweeps"].items() if s["at_edge"]]
    if edge:
        out.append(f"The best LR of {', '.join(f'`{n}`' for n in edge)} is still at the edge of its grid: a wider "
                   "sweep might find a better one.")
    return "\n\n".join(out)


def _claim2(v: View) -> str:
    p = v.d["plan"]
    head = ("#### 2. Scaling the number of clients (iso-rounds; compute grows with K)\n\n"
            f"K ∈ {p['ks']} by-domain clients (N=K), fixed local batch, R={p['rounds']}, H={p['local_steps']}, "
            "Photon's best LR: more clients = more tokens per round (a larger effective global batch) at the same "
            "wall time per round. Target = the worst final perplexity among these arms. Modelled wall time uses "
            "the 1 Gbps network of claim 3, the measured bytes and one measured per-step compute time (the median "
            "over the arms, since each client does the same work whatever K is).")
    k = _k_times(v)
    if k is None:
        return head + "\n\n(arms missing: not run)"
    seeds, target, step_s, walls = k
    rows = []
    for n in walls:
        rows.append([_clients(v.d, n), fmt([v.run(n, s)["evals"][-1][0] for s in seeds], 0, 1e3),
                     fmt(v.finals(n, seeds)),
                     fmt([to_target(v.curve(n, s, x=1), target) for s in seeds], 2),
                     fmt([to_target(v.curve(n, s), target) for s in seeds], 0, 1e3), fmt(walls[n], 1)])
    vs = verdicts(v.d)["2"]
    return "\n\n".join([head, f"Target perplexity {target:.1f}; compute per local step {step_s:.3f} s; seeds "
                        f"{', '.join(seeds)}.",
                        table(["K", "tokens (k)", "final ppl", "rounds to target", "tokens to target (k)",
                               "modelled wall s to target (1 Gbps)"], rows),
                        f"**Result:** **{vs[0]}** ({vs[1]})."])


def _claim3(v: View) -> str:
    d, p = v.d, v.d["plan"]
    K = p["clients"]
    head = ("#### 3. Communication per training token (equal tokens)\n\n"
            "Bytes per training token = (bytes_up + bytes_down actually sent, over the run's rounds) / tokens "
            "trained; kept client state is not sent (`federation.state_backup=false`; with it, each client "
            "would also upload its AdamW moments every round). Data-parallel: a ring all-reduce of every gradient "
            f"each step, 2(n−1)/n × model bytes sent by each of n=K={K} workers per step of n·b·T tokens; the DDP "
            "row is measured from the bytes the real gloo DDP run handed to all-reduce (2 ranks).")
    hs = sorted({*p["hs"], p["local_steps"]})
    names = [n for n in (f"h{h}" if h != p["local_steps"] else "photon" for h in hs) if v.has(n)]
    if not names:
        return head + "\n\n(arms missing: not run)"
    dp = _dp_bytes_per_token(d)
    rows = []
    for n in names:
        seeds = v.seeds(n)
        run = v.run(n, seeds[0])
        sent = sum(r["bytes_up"] + r["bytes_down"] for r in run["rounds"])
        tokens = sum(r["tokens"] for r in run["rounds"])
        state = sum(r["bytes_state_up"] + r["bytes_state_down"] for r in run["rounds"])
        rows.append([run["local_steps"], len(run["rounds"]), f"{tokens / 1e3:,.0f}", f"{sent / 1e6:,.1f}",
                     f"{state / 1e6:,.1f}", f"{sent / tokens:.2f}", f"{dp / (sent / tokens):.1f}×",
                     fmt(v.finals(n, seeds))])
    rows.append([f"data-parallel (ring, n={K})", "-", "-", "-", "-", f"{dp:.2f}", "1×", "-"])
    if d.get("ddp"):
        x = d["ddp"]
        bpt = x["world"] * ring_allreduce_bytes(x["allreduce_bytes_per_step"], x["world"]) / x["tokens_per_step"]
        rows.append([f"DDP measured (gloo, n={x['world']})", "-", "-", "-", "-", f"{bpt:.2f}", "-", "-"])
    vs = verdicts(d)["3a"]
    return "\n\n".join([head, f"Model: {d['model']['bytes'] / 1e6:.2f} MB of fp32 parameters (tied embedding "
                        "counted once).",
                        table(["H", "rounds", "tokens (k)", "MB sent", "MB of kept state sent", "bytes/token",
                               "DP / Photon", "final ppl"], rows),
                        f"**Result:** **{vs[0]}** ({vs[1]}). A client moves 2 models per H local steps, a ring worker "
                        "2(n−1)/n models per step: the ratio is H·(n−1)/n by construction, and the check is that "
                        "nothing else is sent. The paper's 64–512× are its H."])


def _claim3_time(v: View) -> str:
    d = v.d
    head = ("#### 3. Wall time under a network model (equal tokens; time to equal perplexity)\n\n"
            "`photon/bench/network.py` turns measured compute and measured bytes into wall time. Per worker link: "
            "bandwidth B each way, one-way latency L per message. Photon round = slowest client's measured training "
            "+ (L + 8·bytes_down/B) + (L + 8·bytes_up/B) + a fixed per-round overhead + the measured time outside "
            "training per client. Data-parallel step = Photon's measured compute per local step (same model and "
            "local batch) + a ring all-reduce 2(n−1)·(L + 8·M/(n·B)), not overlapped with backward. "
            "Data-parallel's "
            "perplexity curve is `central`'s (n workers of batch b compute what one batch of n·b does). Target = "
            "the worse of the two final perplexities.")
    if not v.has("photon", "central"):
        return head + "\n\n(arms missing: not run)"
    seeds = v.seeds("photon", "central")
    target = max(v.final(n, s) for n in ("photon", "central") for s in seeds)
    rows = []
    for net in NETWORKS:
        w = [_wall(v, s, target, net) for s in seeds]
        ratio = [x[2] / x[0] if x[0] and x[2] else None for x in w]
        rows.append([net.name, f"{net.latency_s * 1e3:g} ms", fmt([x[0] for x in w]), fmt([x[1] for x in w], 2),
                     fmt([x[2] for x in w]), fmt([x[3] for x in w], 2), fmt(ratio, 2)])
    cross = {s: _crossovers(v, s, target) for s in seeds}
    where = "; ".join(f"seed {s}: " + (", ".join(f"{c / 1e9:.3g} Gbit/s" for c in cs) or "none")
                      for s, cs in cross.items())
    steps = ", ".join(f"{step_compute_seconds(v.run('photon', s)):.3f} s (seed {s})" for s in seeds)
    vs = verdicts(d)["3b"]
    out = [head, f"Target perplexity {target:.1f}; n=K={v.K} workers; model {d['model']['bytes'] / 1e6:.2f} MB; Photon "
           f"per-round overhead {NETWORKS[0].round_overhead_s} s; measured compute per local step {steps}.",
           table(["network", "latency", "Photon s to target", "of which communication + overhead s",
                  "DP s to target", "of which all-reduce s", "DP / Photon"], rows),
           f"**Crossover** (latency of the 1 Gbps profile, bandwidth swept 1 Mbit/s–1 Tbit/s): Photon and "
           f"data-parallel reach the target together at {where} (`claims-{d['scale']}-bandwidth.png`).",
           f"**Result:** **{vs[0]}** ({vs[1]}; the paper: 35% less wall time than a 10 Gbps ring all-reduce at "
           "7B, where per-step communication was 66% of DP's time)."]
    if d.get("ddp"):
        x = d["ddp"]
        share = x["comm_seconds"] / x["step_seconds"]
        bw = 8 * ring_allreduce_bytes(x["allreduce_bytes_per_step"], x["world"]) / max(x["comm_seconds"], 1e-9)
        out += [f"Real data-parallel calibration (`photon/bench/baselines/ddp.py`): torch DDP, gloo, {x['world']} processes "
                f"over loopback, {x['threads']} thread each, {x['steps']} steps of local batch "
                f"{x['batch_size']}×{x['seq_len']}, each rank on a disjoint IID shard; a comm hook all-reduces each "
                "bucket synchronously and times it (the first 2 steps excluded).",
                table(["measure", "value"], [
                    ["seconds per step (rank 0)", f"{x['step_seconds']:.4f}"],
                    ["  in compute", f"{x['compute_seconds']:.4f}"],
                    ["  in all-reduce", f"{x['comm_seconds']:.4f} ({share:.1%} of the step)"],
                    ["bytes all-reduced per step per rank", f"{x['allreduce_bytes_per_step'] / 1e6:.2f} MB"],
                    ["effective loopback bandwidth (ring bytes / all-reduce time)", f"{bw / 1e9:.2f} Gbit/s"],
                    ["loss first → last step", f"{x['loss_first']:.3f} → {x['loss_last']:.3f}"],
                    ["ranks end with identical parameters", "yes" if x["ranks_agree"] else "NO"],
                    ["run time", f"{x['seconds']:.0f} s"]])]
    return "\n\n".join(out)


def _crossovers(v: View, seed: str, target: float) -> list[float]:
    net = NETWORKS[1]
    return crossovers(lambda bw: _wall(v, seed, target, net.with_bandwidth(bw))[0] or math.inf,
                      lambda bw: _wall(v, seed, target, net.with_bandwidth(bw))[2] or math.inf)


def _claim4(v: View) -> str:
    head = ("#### 4. Heterogeneity: by-domain vs IID clients (equal tokens)\n\n"
            "The same Photon arm with each client holding whole domains (by-domain) or a slice of every domain "
            "(IID). Final validation perplexity per domain:")
    if not v.has("photon", "iid"):
        return head + "\n\n(arms missing: not run)"
    seeds = v.seeds("photon", "iid")
    rows = [[dom, fmt(v.finals("photon", seeds, dom)), fmt(v.finals("iid", seeds, dom))]
            for dom in [*v.domains(), OVERALL]]
    vs = verdicts(v.d)["4"]
    a, b = statistics.mean(v.finals("photon", seeds)), statistics.mean(v.finals("iid", seeds))
    return "\n\n".join([head, table(["domain", "by-domain (`photon`)", "IID (`iid`)"], rows),
                        f"**Result:** **{vs[0]}** (agrees = by-domain clients end below half the initial "
                        f"perplexity on every seed; {vs[1]}; {100 * (a / b - 1):+.1f}% for heterogeneous clients "
                        "against IID)."])


def _claim5(v: View) -> str:
    d = v.d
    head = ("#### 5. Photon vs DiLoCo (equal tokens, same rounds and tokens per round)\n\n"
            "DiLoCo's recipe: outer Nesterov (η=0.7, μ=0.9), the centralized-style batch K·b, its inner AdamW state "
            "kept per client across rounds (`persist`, as DiLoCo and torchft do), its own tuned LR; H is set so a "
            "DiLoCo round trains the same tokens per client as a Photon round, so both send the same bytes per "
            "token over the same rounds. `diloco-reset` (inner AdamW reset each round, at `diloco`'s LR) is the "
            "arm this benchmark used before issue #12. Target = the worse of `photon`'s and `diloco`'s final "
            "perplexities; tokens to target interpolate log perplexity between evaluations.")
    if not v.has("photon", "diloco"):
        return head + "\n\n(arms missing: not run)"
    seeds, target, tok = _target_tokens(v, "photon", "diloco")
    rows = []
    for n in ("photon", "diloco", "diloco-reset"):
        if not v.has(n):
            continue
        ss = v.seeds(n) if n == "diloco-reset" else seeds
        a = d["arms"][n]
        t = [to_target(v.curve(n, s), target) for s in ss]
        rows.append([f"`{n}`", a["client_optimizer"], a["lr"], fmt(v.finals(n, ss)), fmt(t, 0, 1e3),
                     ", ".join(ss)])
    out = [head, f"Target perplexity {target:.1f}.",
           table(["arm", "client optimizer", "LR", "final ppl", "tokens to target (k)", "seeds"], rows)]
    vs = verdicts(d)["5"]
    out.append(f"**Result:** **{vs[0]}** ({vs[1]}; the paper: ≈2× at 125M).")
    out.append(_peer(v))
    return "\n\n".join(out)


def _peer(v: View) -> str:
    arm = v.d["arms"].get("torchft")
    if arm is None:
        return "**torchft peer:** not in this plan."
    run = arm["runs"].get("0")
    peer = run["peer"] if run else {"status": "not run: the arm did not finish"}
    if peer.get("status") != "ran":
        return f"**torchft peer** (`photon/bench/baselines/torchft.py`): {peer.get('status', 'not run')}."
    ppl = _ppl(peer["losses"][OVERALL])
    ours = f"; our `diloco` at seed 0: {v.final('diloco', '0'):,.1f}" if v.has("diloco") and "0" in v.seeds(
        "diloco") else ""
    return (f"**torchft peer** (`photon/bench/baselines/torchft.py`, torchft {peer.get('torchft_version', '?')}): "
            f"torchft's DiLoCo on the same model, data, seed 0 and recipe as `diloco` (LR {arm['lr']:g}, client "
            f"optimizer {peer.get('client_optimizer', '?')}), one process per client on loopback: final perplexity "
            f"{ppl:,.1f}{ours}. Synchronisation per round (the last replica to arrive: quorum + all-reduce + outer "
            f"step) {peer['sync_s_per_round']:.3f} s (first round {peer['sync_s_first_round']:.3f} s, later "
            f"{peer['sync_s_steady']:.3f} s) against {peer['compute_s_per_round']:.2f} s of compute per round; "
            f"replicas end identical: {'yes' if peer.get('replicas_agree') else 'NO'}. Differences from our arm: "
            + "; ".join(peer.get("differences", [])) + ".")


def _claim6(v: View) -> str:
    head = ("#### 6. Why it works: small batch + high LR vs large batch + centralized LR (equal tokens)\n\n"
            "`photon` vs `bigbatch`: identical (K, data, rounds, tokens per round, FedAvg η=1, kept client state, "
            "bytes) except local batch, H and LR (`bigbatch` at `central`'s best LR); `diloco` differs from "
            "`bigbatch` in the outer optimizer and its own tuned LR.")
    names = [n for n in ("photon", "bigbatch", "diloco") if v.has(n)]
    if not v.has("photon", "bigbatch"):
        return head + "\n\n(arms missing: not run)"
    seeds = v.seeds(*names)
    rows = [[dom, *[fmt(v.finals(n, seeds, dom)) for n in names]] for dom in [*v.domains(), OVERALL]]
    vs = verdicts(v.d)["6"]
    return "\n\n".join([head, table(["domain", *[f"`{n}`" for n in names]], rows),
                        f"**Result:** **{vs[0]}** ({vs[1]})."])


def _arms(v: View) -> str:
    d = v.d
    rows, sets = [], []
    for name, a in d["arms"].items():
        runs = a["runs"]
        if not runs:
            rows.append([f"`{name}`", a["about"], a["kind"], a["regime"], a["client_optimizer"], f"{a['lr']:g}", "-",
                         "not run", "-"])
            continue
        first = next(iter(runs.values()))
        tokens = first["evals"][-1][0] / 1e6 if "evals" in first else None
        rows.append([f"`{name}`", a["about"], a["kind"], a["regime"], a["client_optimizer"], f"{a['lr']:g}",
                     f"{tokens:.2f}" if tokens is not None else "-", ", ".join(sorted(runs, key=int)),
                     fmt([r["seconds"] for r in runs.values()], 0)])
        sets.append(f"- `{name}`: `{' '.join(a['overrides'])}`")
    n_sweep = sum(len(s["grid"]) for s in d["sweeps"].values())
    return "\n\n".join(["#### Arms: exact configurations",
                        "Every arm = the preset plus these overrides plus `train.seed=<seed>`; the LR sweeps add "
                        f"{n_sweep} runs at seed 0 (the best of each is seed 0 of its arm below).",
                        table(["arm", "what", "kind", "regime", "client optimizer", "LR", "tokens (M)", "seeds",
                               "run time s"], rows), "\n".join(sets)])


# ---------------------------------------------------------------------------------------------------------
# The README's findings: every stored scale side by side


def render_findings(results_dir: Path) -> str:
    """The README's "What we found" table from docs/results/claims-*.json (a pure function of those files)."""
    records = {}
    for scale in SCALES:
        path = Path(results_dir) / f"claims-{scale}.json"
        if path.exists():
            records[scale] = json.loads(path.read_text())
    rows = []
    vs = {s: verdicts(r["data"]) for s, r in records.items()}
    for key, title in CLAIMS:
        cells = []
        for scale in SCALES:
            if scale not in vs:
                cells.append("not measured yet")
                continue
            verdict, text = vs[scale][key]
            cells.append(f"**{verdict}**" + (f": {text}" if text else ""))
        rows.append([title, *cells])
    lines = [table(["the paper's claim", *[f"`{s}`" for s in SCALES]], rows), ""]
    for scale in SCALES:
        if scale in records:
            r = records[scale]
            m = r["machine"]
            load = m.get("load_average", {})
            lines.append(f"- `{scale}`: `{r['command']}` on {r['date']}, {m.get('cores', '?')} cores, load average "
                         f"{load.get('mean', '?')} (max {load.get('max', '?')}); {r['data']['model']['describe']}.")
        else:
            lines.append(f"- `{scale}`: not measured yet (`photon bench claims --scale {scale}`).")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Plots (drawn by the benchmark from the same record)


def _mean_curve(v: View, name: str, per: float = 1.0) -> tuple[list[float], list[float]]:
    runs = [v.curve(name, s, per=per) for s in v.seeds(name)]
    n = min(len(c) for c in runs)
    return ([statistics.mean(c[i][0] for c in runs) for i in range(n)],
            [math.exp(statistics.mean(math.log(c[i][1]) for c in runs)) for i in range(n)])


def plot(data: dict[str, Any], img_dir: Path) -> list[Path]:
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
        walls = [_wall(v, s0, target, NETWORKS[1].with_bandwidth(b)) for b in bws]
        ax.plot([b / 1e9 for b in bws], [w[0] for w in walls], label="Photon")
        ax.plot([b / 1e9 for b in bws], [w[2] for w in walls], label="data-parallel")
        for net in NETWORKS:
            ax.axvline(net.bandwidth_bps / 1e9, color="grey", lw=0.6, ls=":")
        for c in _crossovers(v, s0, target):
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
