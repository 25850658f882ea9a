"""`photon bench recipe`: which outer loop brings federated training closest to centralized training at equal
tokens, measured in the protocol of the DiLoCo scaling-law anchors (every replica takes the centralized run's
steps on its share of the centralized batch, B/K), over a horizon long enough to matter.

The plan, on one preset (`tiny` by default), in stages, each arm one run (`claims.run.run_arm`, resumable):
1. `central` (batch B) with its LR swept by the claims rule (a geometric grid grown past an edge); FedAvg
   η = 1 (the paper) and Nesterov at each momentum μ of its grid and each outer LR of the grid (grown past an
   edge), each at every H; all at the preset's inner LR, seed 0. The momentum is swept, not fixed at DiLoCo's
   0.9: what an outer step moves is about η/(1 − μ) of the mean update, and a run of tens of rounds has few
   rounds to spare for a momentum that remembers ten.
2. The best Nesterov setting and the best FedAvg H, each with its inner LR swept the same way.
3. Headline arms at a second seed (central, the best FedAvg H, the best Nesterov); K = 1 (one replica: the
   outer loop alone, against `central`), 2 and 8 for both outer loops at their best settings (per-replica batch
   B/K); both on an IID split; Muon inner at the better of the two.
The horizon is ≥ 20 tokens per non-embedding parameter and ≥ 50 outer rounds at the shortest H. The record
(docs/results/recipe.json) keeps every arm's overrides and curve; `render` reports the grid, the ratio to
centralized over the run (25/50/75/100%), bytes per token, and the anchors' published ratios beside ours.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from photon.bench.claims.plan import Arm, ClaimsPlan, Recipes, next_grid, round_lr
from photon.bench.claims.record import bytes_per_token, ppl
from photon.bench.claims.run import Runner, final_ppl, read_run
from photon.bench.results import LoadSampler, plots_dir, publish
from photon.config import RunConfig, with_overrides

OVERALL = "overall"
PLOT = Path("docs/img/recipe.png")
# The anchors: perplexity ratio federated / centralized at equal tokens, per-replica batch B/M.
ANCHORS = [("Charles et al. 2025, 35M, H=30 (Table 4)", {2: 1.023, 4: 1.071, 8: 1.146}),
           ("Charles et al. 2025, 180M, H=30", {2: 1.014, 4: 1.031, 8: 1.071}),
           ("Streaming DiLoCo, 35M, H=30", {2: 1.030, 4: 1.094}),
           ("Streaming DiLoCo, 35M, H=100", {2: 1.051, 4: 1.139})]


@dataclass(frozen=True)
class RecipePlan:
    preset: str = "tiny"
    clients: int = 4                                   # K of the grid (the anchors' M)
    steps: int = 1152                                  # global steps S of every arm (each client takes S)
    hs: tuple[int, ...] = (8, 16, 32)                  # local steps per round
    outer_lrs: tuple[float, ...] = (0.4, 0.6, 0.8, 1.0, 1.2)  # Nesterov's outer LR grid (grown past an edge)
    momenta: tuple[float, ...] = (0.5, 0.7, 0.9)       # Nesterov's momentum grid (DiLoCo's is 0.9)
    lr_grid: tuple[float, ...] = (0.5, 1.0, 2.0)       # × the preset's LR: central's and the inner sweep's grid
    lr_extend: int = 2                                 # how often a grid may grow past an edge
    ks: tuple[int, ...] = (1, 2, 8)                    # besides K: per-replica batch B/K
    seeds: int = 2                                     # of the headline arms
    jobs: int = 2
    eval_every_steps: int = 32                         # global steps between evaluations, every arm
    base_overrides: tuple[str, ...] = field(default=())


def _grow(grid: list[float], scores: dict[float, float], extend: int, step) -> float | None:
    """The next grid point past the edge that holds the best (None: the best is inside, or no growth left)."""
    if extend <= 0 or not scores:
        return None
    best = min(grid, key=lambda x: scores.get(x, math.inf))
    if best == grid[-1]:
        return step(grid[-1], grid[-2], +1)
    if best == grid[0]:
        return step(grid[0], grid[1], -1)
    return None


def _linear(edge: float, inner: float, _: int) -> float:
    """One grid step past `edge`, away from `inner`; below the grid's first step, half the edge (never zero)."""
    nxt = round(2 * edge - inner, 3)
    return nxt if nxt > 0 else round(edge / 2, 4)


class RecipeArms:
    """Every arm the plan can train, with its exact overrides (claims' `Recipes` spells the federated and
    centralized recipes, so the two benchmarks train alike)."""

    def __init__(self, base: RunConfig, plan: RecipePlan):
        self.base, self.plan = base, plan
        self.B = plan.clients * base.train.batch_size  # the centralized batch
        ref_h = max(plan.hs)
        claims = ClaimsPlan(plan.preset, clients=plan.clients, rounds=plan.steps // ref_h, local_steps=ref_h)
        self.rec = Recipes(base, claims)
        self.lr0 = round_lr(base.train.lr)

    def central(self, lr: float, seed_count: int = 1, muon: bool = False) -> Arm:
        arm = self.rec.central("central", f"centralized, batch {self.B}", lr, seed_count)
        if not muon:
            return arm
        return replace(arm, name="central-muon", about=arm.about + ", Muon", overrides=(*arm.overrides,
                                                                                        "train.optimizer=muon"))

    def fed(self, outer: str, olr: float, h: int, lr: float, k: int | None = None, split: str = "by-domain",
            seeds: int = 1, muon: bool = False, momentum: float = 0.0) -> Arm:
        """A federated arm: FedAvg η = 1 (`outer="fedavg"`; `olr` and `momentum` unused) or Nesterov at
        (`olr`, `momentum`)."""
        k = k or self.plan.clients
        assert self.B % k == 0 and self.plan.steps % h == 0, (k, h)
        every = max(1, self.plan.eval_every_steps // h)
        tag = "fedavg" if outer == "fedavg" else nesterov_tag(olr, momentum)
        name = f"{tag}-h{h}-k{k}" + ("-iid" if split == "iid" else "") + ("-muon" if muon else "")
        about = (f"{'FedAvg η=1' if outer == 'fedavg' else f'Nesterov η={olr:g} μ={momentum:g}'}, "
                 f"H={h}, K={k} ({split}), batch {self.B // k} per client" + (", Muon inner" if muon else ""))
        arm = self.rec.fed(name, about, lr, seeds, k=k, h=h, r=self.plan.steps // h, batch=self.B // k,
                           split=split, outer=(outer, olr), eval_every=every)
        extra = ("train.optimizer=muon",) if muon else ()
        mu = () if outer == "fedavg" else (f"federation.outer.momentum={momentum:g}",)
        return replace(arm, overrides=(*arm.overrides, *mu, *extra))


def nesterov_tag(olr: float, momentum: float) -> str:
    return f"nesterov{olr:g}-m{momentum:g}"


def _final(out: Path, arm: Arm, seed: int = 0) -> float:
    return final_ppl(arm.dir(out, seed))


def run_recipe_bench(cfg: RunConfig, out: Path, plan: RecipePlan, console: Console | None = None,
                     results_dir: Path | None = None) -> dict[str, Any]:
    console = console or Console()
    base = with_overrides(cfg, [*plan.base_overrides, "train.threads=1"] if plan.jobs > 1 else
                          list(plan.base_overrides))
    arms = RecipeArms(base, plan)
    runner = Runner(base, ClaimsPlan(plan.preset, jobs=plan.jobs), out, console)
    started = time.time()
    with LoadSampler() as load:
        _describe(console, base, plan)
        # 1. central's LR sweep, FedAvg at each H, Nesterov's outer LR grid at each H (seed 0, inner LR lr0)
        lrs = sorted({round_lr(arms.lr0 * x) for x in plan.lr_grid})
        cells = [(mu, h) for mu in plan.momenta for h in plan.hs]  # each grows its own outer LR grid
        olrs = {c: sorted(plan.outer_lrs) for c in cells}
        scores_c: dict[float, float] = {}
        scores_n: dict[tuple[float, int], dict[float, float]] = {c: {} for c in cells}

        def nesterov(c: tuple[float, int], o: float, lr: float = arms.lr0, **kw) -> Arm:
            return arms.fed("nesterov", o, c[1], lr, momentum=c[0], **kw)

        for extension in range(plan.lr_extend + 1):
            jobs = [(arms.central(lr), 0) for lr in lrs if lr not in scores_c]
            if extension == 0:
                jobs += [(arms.fed("fedavg", 1.0, h, arms.lr0), 0) for h in plan.hs]
            jobs += [(nesterov(c, o), 0) for c in cells for o in olrs[c] if o not in scores_n[c]]
            runner.run(jobs, may_fail=True)
            scores_c.update({lr: _final(out, arms.central(lr)) for lr in lrs})
            for c in cells:
                scores_n[c].update({o: _final(out, nesterov(c, o)) for o in olrs[c]})
            left = plan.lr_extend - extension
            grew = False
            if (more := next_grid(lrs, scores_c) if left > 0 else None) is not None:
                lrs, grew = sorted({*lrs, more}), True
            for c in cells:
                if (more := _grow(olrs[c], scores_n[c], left, _linear)) is not None:
                    olrs[c], grew = sorted({*olrs[c], more}), True
            if not grew:
                break
        central_lr = min(lrs, key=lambda x: scores_c.get(x, math.inf))
        best_c, best_olr = min(((c, o) for c in cells for o in olrs[c]),
                               key=lambda t: scores_n[t[0]].get(t[1], math.inf))
        best_mu, best_h = best_c
        fedavg_h = min(plan.hs, key=lambda h: _final(out, arms.fed("fedavg", 1.0, h, arms.lr0)))
        best = {"central_lr": central_lr, "nesterov_h": best_h, "nesterov_lr": best_olr,
                "nesterov_momentum": best_mu, "inner_lr": arms.lr0, "fedavg_h": fedavg_h, "lr0": arms.lr0}
        grid = {"central": {f"{lr:g}": _num(scores_c.get(lr)) for lr in lrs},
                "fedavg": {str(h): _num(_final(out, arms.fed("fedavg", 1.0, h, arms.lr0))) for h in plan.hs},
                "nesterov": {f"{mu:g}": {str(h): {f"{o:g}": _num(scores_n[mu, h].get(o)) for o in olrs[mu, h]}
                                         for h in plan.hs} for mu in plan.momenta},
                "inner": {}}
        trained = [*(arms.central(lr) for lr in lrs), *(arms.fed("fedavg", 1.0, h, arms.lr0) for h in plan.hs),
                   *(nesterov(c, o) for c in cells for o in olrs[c])]
        # stored after each stage, so a long plan that stops part-way still leaves its finished stages reported
        _store(base, plan, arms, out, 1, best, grid, trained, load, runner, started, console, results_dir)
        # 2. the inner LR of the best setting of each outer loop
        def sweep_inner(arm_at) -> tuple[list[float], dict[float, float]]:
            inner = sorted({round_lr(arms.lr0 * x) for x in plan.lr_grid})
            scores: dict[float, float] = {}
            for extension in range(plan.lr_extend + 1):
                runner.run([(arm_at(lr), 0) for lr in inner if lr not in scores], may_fail=True)
                scores.update({lr: _final(out, arm_at(lr)) for lr in inner})
                more = next_grid(inner, scores) if extension < plan.lr_extend else None
                if more is None:
                    break
                inner = sorted({*inner, more})
            trained.extend(arm_at(lr) for lr in inner)
            return inner, scores

        inner, scores_i = sweep_inner(lambda lr: nesterov(best_c, best_olr, lr))
        inner_f, scores_f = sweep_inner(lambda lr: arms.fed("fedavg", 1.0, fedavg_h, lr))
        inner_lr = best["inner_lr"] = min(inner, key=lambda x: scores_i.get(x, math.inf))
        fedavg_lr = best["fedavg_inner_lr"] = min(inner_f, key=lambda x: scores_f.get(x, math.inf))
        grid["inner"] = {f"{lr:g}": _num(scores_i.get(lr)) for lr in inner}
        grid["inner_fedavg"] = {f"{lr:g}": _num(scores_f.get(lr)) for lr in inner_f}
        _store(base, plan, arms, out, 2, best, grid, trained, load, runner, started, console, results_dir)
        # 3. headline seeds; K, IID for both outer loops; Muon inner at the better of the two
        fedavg_best = arms.fed("fedavg", 1.0, fedavg_h, fedavg_lr, seeds=plan.seeds)
        nesterov_best = nesterov(best_c, best_olr, inner_lr, seeds=plan.seeds)
        headline = [arms.central(central_lr, plan.seeds), fedavg_best, nesterov_best]
        others = [nesterov(best_c, best_olr, inner_lr, split="iid"),
                  arms.fed("fedavg", 1.0, fedavg_h, fedavg_lr, split="iid")]
        for k in plan.ks:
            others += [arms.fed("fedavg", 1.0, fedavg_h, fedavg_lr, k=k), nesterov(best_c, best_olr, inner_lr, k=k)]
        fedavg_wins = _final(out, fedavg_best) <= _final(out, nesterov_best)
        best["muon_outer"] = "fedavg" if fedavg_wins else "nesterov"
        runner.run([(a, s) for a in headline for s in range(1, a.seeds)] + [(a, 0) for a in others])
        trained += [*headline, *others]
        # Muon inner at the better outer loop, and `central` with Muon (the fair ratio), each at its own best LR:
        # Muon's update is scaled to AdamW's RMS, but the best LR of the two need not be the same
        muon, scores_m = sweep_inner(lambda lr: arms.fed("fedavg", 1.0, fedavg_h, lr, muon=True) if fedavg_wins
                                     else nesterov(best_c, best_olr, lr, muon=True))
        central_muon, scores_cm = sweep_inner(lambda lr: arms.central(lr, muon=True))
        best["muon_lr"] = min(muon, key=lambda x: scores_m.get(x, math.inf))
        best["central_muon_lr"] = min(central_muon, key=lambda x: scores_cm.get(x, math.inf))
        grid["muon"] = {f"{lr:g}": _num(scores_m.get(lr)) for lr in muon}
        grid["central_muon"] = {f"{lr:g}": _num(scores_cm.get(lr)) for lr in central_muon}
        return _store(base, plan, arms, out, 3, best, grid, trained, load, runner, started, console, results_dir)


def _store(base: RunConfig, plan: RecipePlan, arms: RecipeArms, out: Path, stage: int, best: dict[str, Any],
           grid: dict[str, Any], trained: list[Arm], load: LoadSampler, runner: Runner, started: float,
           console: Console, results_dir: Path | None) -> dict[str, Any]:
    """The record of every finished arm (each once, with all its finished seeds), stored and shown."""
    from photon.model.transformer import count_params, describe, embedding_params

    every: dict[str, Arm] = {}
    for a in trained:
        key = f"{a.name}@{a.lr:g}"
        if key not in every or a.seeds > every[key].seeds:
            every[key] = a
    runs = {}
    for key, a in every.items():
        seeds = {str(s): r for s in range(a.seeds) if (r := read_run(a.dir(out, s), a, 1)) is not None}
        if seeds:
            runs[key] = {"name": a.name, "about": a.about, "kind": a.kind, "lr": a.lr,
                         "overrides": list(a.overrides), "runs": seeds}
    m = base.model
    data = {"preset": plan.preset, "model": describe(m), "non_embedding_params": count_params(m) - embedding_params(m),
            "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in plan.__dict__.items()},
            "stages_done": stage, "batch": arms.B, "seq_len": base.train.seq_len,
            "tokens": plan.steps * arms.B * base.train.seq_len, "best": best, "grid": grid, "arms": runs}
    plot(data, plots_dir(results_dir) / PLOT.name)
    # the wall time is the benchmark's only when this invocation trained every run itself
    publish("recipe", data, render, load, started if runner.skipped == 0 else None, console,
            results_dir=results_dir)
    return data


def plot(data: dict[str, Any], path: Path) -> None:
    """The grid as a plot: perplexity over the best `central`'s against the outer LR, a line per (H, μ) for
    Nesterov (a colour per H, a line style per μ) and a marker per H for FedAvg (outer SGD at η = 1, no
    momentum)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g, p = data["grid"], data["plan"]
    central = g["central"][f"{data['best']['central_lr']:g}"] if f"{data['best']['central_lr']:g}" in g["central"] \
        else min(v for v in g["central"].values() if v is not None)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ("o:", "s--", "^-", "v-.")
    for i, h in enumerate(p["hs"]):
        for j, mu in enumerate(p["momenta"]):
            cell = g["nesterov"].get(f"{mu:g}", {}).get(str(h), {})
            points = sorted((float(lr), v / central) for lr, v in cell.items() if v is not None)
            ax.plot([x for x, _ in points], [y for _, y in points], styles[j % len(styles)], color=f"C{i}",
                    label=f"Nesterov μ={mu:g}, H={h}")
        if g["fedavg"].get(str(h)) is not None:
            ax.plot([1.0], [g["fedavg"][str(h)] / central], "*", ms=13, color=f"C{i}", label=f"FedAvg η=1, H={h}")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("outer learning rate η")
    ax.set_ylabel("final perplexity / best central's")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_title(f"{data['preset']}: the outer loop at equal tokens (K = {p['clients']}, "
                 f"inner LR {data['best']['lr0']:g})")
    ax.legend(fontsize=6, ncol=3)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _num(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _describe(console: Console, base: RunConfig, plan: RecipePlan) -> None:
    from photon.model.transformer import count_params, describe, embedding_params

    m = base.model
    tokens = plan.steps * plan.clients * base.train.batch_size * base.train.seq_len
    non_emb = count_params(m) - embedding_params(m)
    console.print(f"recipe plan `{plan.preset}`: {describe(m)}; {plan.steps} global steps × batch "
                  f"{plan.clients * base.train.batch_size} × {base.train.seq_len} = {tokens:,} tokens "
                  f"({tokens / non_emb:.1f} per non-embedding parameter); H {list(plan.hs)} "
                  f"({plan.steps // max(plan.hs)}–{plan.steps // min(plan.hs)} rounds)", highlight=False)


# ---------------------------------------------------------------------------------------------------------
# The report (a pure function of the stored record)


def _fmt(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:,.{digits}f}"
    return f"{statistics.mean(values):,.{digits}f} ± {(max(values) - min(values)) / 2:,.{digits}f}"


def _key(data: dict[str, Any], name: str, lr: float) -> str:
    return f"{name}@{lr:g}"


def _finals(data: dict[str, Any], key: str) -> dict[str, float]:
    arm = data["arms"].get(key)
    return {s: ppl(r["evals"][-1][2][OVERALL]) for s, r in arm["runs"].items()} if arm else {}


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A record from before the momentum was swept (one `momentum`, grid and arm names without it) in
    today's shape; today's records unchanged."""
    p = data["plan"]
    if "momenta" in p:
        return data
    mu = p["momentum"]
    tag = f"-m{mu:g}-h"

    def renamed(name: str) -> str:
        return name.replace("-h", tag, 1) if name.startswith("nesterov") else name

    arms = {renamed(k): {**a, "name": renamed(a["name"])} for k, a in data["arms"].items()}
    return {**data, "plan": {**p, "momenta": [mu]}, "best": {**data["best"], "nesterov_momentum": mu},
            "grid": {**data["grid"], "nesterov": {f"{mu:g}": data["grid"]["nesterov"]}}, "arms": arms}


def _nesterov(best: dict[str, Any]) -> str:
    """The best Nesterov setting's arm-name tag."""
    return nesterov_tag(best["nesterov_lr"], best["nesterov_momentum"])


def _ratio_at(data: dict[str, Any], key: str, ref: str, q: float) -> list[float]:
    """Per common seed: the arm's perplexity over the reference's at the first evaluation at ≥ q of the run."""
    a, r = data["arms"].get(key), data["arms"].get(ref)
    if not a or not r:
        return []
    out = []
    for s in sorted(set(a["runs"]) & set(r["runs"]), key=int):
        ea, er = a["runs"][s]["evals"], r["runs"][s]["evals"]
        end = er[-1][0]
        pa = next((ppl(e[2][OVERALL]) for e in ea if e[0] >= q * end - 1e-6), None)
        pr = next((ppl(e[2][OVERALL]) for e in er if e[0] >= q * end - 1e-6), None)
        if pa is not None and pr is not None:
            out.append(pa / pr)
    return out


def render(data: dict[str, Any]) -> str:
    data = _upgrade(data)
    b, g, p = data["best"], data["grid"], data["plan"]
    K = p["clients"]
    fa_lr = b.get("fedavg_inner_lr", b["lr0"])
    central = _key(data, "central", b["central_lr"])
    c_final = statistics.mean(_finals(data, central).values()) if _finals(data, central) else None

    def cell(x: float | None) -> str:
        return "diverged" if x is None else f"{x:,.1f}" + (f" ({x / c_final:.2f})" if c_final else "")

    lines = [f"Preset `{data['preset']}` ({data['model']}); every arm trains {data['tokens']:,} tokens "
             f"({data['tokens'] / data['non_embedding_params']:.1f} per non-embedding parameter) in {p['steps']} "
             f"global steps: `central` with batch {data['batch']}, each of K federated replicas with batch "
             f"{data['batch']}/K on its own domains (by-domain), so every replica takes `central`'s steps. Final "
             f"perplexity (ratio to the best `central`); seed 0 unless a spread is shown."
             + ("" if data["stages_done"] == 3 else f" **Stages finished: {data['stages_done']} of 3** (1: the "
                "grid, 2: the inner LR, 3: seeds, K and IID); rerunning `photon bench recipe` resumes."), "",
             "Grid (inner LR " f"{b['lr0']:g}, K = {K}): outer optimizer × H "
             f"([plot: the ratio against outer LR and H]({PLOT.relative_to('docs')})).", "",
             "| outer | " + " | ".join(f"H={h}" for h in p["hs"]) + " |", "|---|" + "---|" * len(p["hs"])]
    lines.append("| FedAvg η=1 (the paper) | " + " | ".join(cell(g["fedavg"].get(str(h))) for h in p["hs"]) + " |")
    for mu in p["momenta"]:
        by_h = g["nesterov"].get(f"{mu:g}", {})
        for o in sorted({float(o) for h in p["hs"] for o in by_h.get(str(h), {})}):
            lines.append(f"| Nesterov η={o:g} μ={mu:g} | " + " | ".join(
                cell(by_h[str(h)][f"{o:g}"]) if f"{o:g}" in by_h.get(str(h), {}) else "-" for h in p["hs"]) + " |")
    lines += ["", "`central`'s LR: " + ", ".join(f"{lr}: {'diverged' if v is None else f'{v:,.1f}'}"
                                                for lr, v in g["central"].items())
              + f" (best {b['central_lr']:g}). The inner LR of the best Nesterov setting: "
              + ", ".join(f"{lr}: {'diverged' if v is None else f'{v:,.1f}'}" for lr, v in g["inner"].items())
              + f" (best {b['inner_lr']:g}); of the best FedAvg H: "
              + ", ".join(f"{lr}: {'diverged' if v is None else f'{v:,.1f}'}"
                          for lr, v in g.get("inner_fedavg", {}).items())
              + f" (best {b.get('fedavg_inner_lr', b['lr0']):g}).", ""]
    heads = [("`central`", central),
             (f"FedAvg η=1, H={b['fedavg_h']}, inner LR {fa_lr:g}",
              _key(data, f"fedavg-h{b['fedavg_h']}-k{K}", fa_lr)),
             (f"Nesterov η={b['nesterov_lr']:g} μ={b['nesterov_momentum']:g}, H={b['nesterov_h']}, inner LR "
              f"{b['inner_lr']:g}", _key(data, f"{_nesterov(b)}-h{b['nesterov_h']}-k{K}", b["inner_lr"]))]
    lines += ["Headline arms: the ratio to `central` over the run (mean ± half the range over seeds).", "",
              "| arm | final ppl | 25% | 50% | 75% | 100% | bytes per token | seeds |",
              "|---|---|---|---|---|---|---|---|"]
    for label, key in heads:
        arm = data["arms"].get(key)
        if not arm:
            lines.append(f"| {label} | not run | | | | | | |")
            continue
        finals = list(_finals(data, key).values())
        ratios = ["-" if key == central else _fmt(_ratio_at(data, key, central, q), 3) for q in (0.25, 0.5, 0.75, 1.0)]
        bpt = "-" if arm["kind"] != "federated" else \
            f"{statistics.mean(bytes_per_token(r) for r in arm['runs'].values()):,.2f}"
        lines.append(f"| {label} | {_fmt(finals)} | " + " | ".join(ratios) + f" | {bpt} | {', '.join(arm['runs'])} |")
    ks = sorted({*p["ks"], K})
    lines += ["", "Against the anchors (perplexity ratio federated / centralized, equal tokens, per-replica batch "
              "B/M); ours at the best settings above, seed 0:", "",
              "| | " + " | ".join(f"M=K={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for label, ratios in ANCHORS:
        lines.append(f"| {label} | " + " | ".join(f"{ratios[k]:.3f}" if k in ratios else "-" for k in ks) + " |")
    for label, name, lr in (("ours: FedAvg η=1", f"fedavg-h{b['fedavg_h']}", fa_lr),
                            ("ours: Nesterov", f"{_nesterov(b)}-h{b['nesterov_h']}", b["inner_lr"])):
        cells = []
        for k in ks:
            r = _ratio_at(data, _key(data, f"{name}-k{k}", lr), central, 1.0)
            cells.append(f"{r[0]:.3f}" if r else "-")
        lines.append(f"| {label} (H={name.split('-h')[1]}) | " + " | ".join(cells) + " |")
    extra = []
    for label, name, lr in (("FedAvg η=1", f"fedavg-h{b['fedavg_h']}-k{K}", fa_lr),
                            ("Nesterov", f"{_nesterov(b)}-h{b['nesterov_h']}-k{K}", b["inner_lr"])):
        by_domain = _ratio_at(data, _key(data, name, lr), central, 1.0)
        iid = _ratio_at(data, _key(data, f"{name}-iid", lr), central, 1.0)
        if iid and by_domain:
            extra.append(f"- {label} at its best setting, K = {K}: ratio {by_domain[0]:.3f} by domain, "
                         f"{iid[0]:.3f} on an IID split (the anchors' data), seed 0.")
        m_lr, cm_lr = b.get("muon_lr", lr), b.get("central_muon_lr", b["central_lr"])
        muon = _ratio_at(data, _key(data, f"{name}-muon", m_lr), central, 1.0)
        both = _ratio_at(data, _key(data, f"{name}-muon", m_lr), _key(data, "central-muon", cm_lr), 1.0)
        if muon and by_domain:
            swept = "muon_lr" in b
            extra.append(f"- {label} at its best setting with a Muon inner optimizer (LR {m_lr:g}"
                         + (", its best" if swept else "") + f"): ratio {muon[0]:.3f} to `central` with AdamW "
                         f"(AdamW federated: {by_domain[0]:.3f})"
                         + (f", {both[0]:.3f} to `central` with Muon at LR {cm_lr:g}"
                            + (" (its best)" if swept else "") if both else "") + ", seed 0.")
    for label, key in (("the federated Muon arm", "muon"), ("`central` with Muon", "central_muon")):
        if g.get(key):
            extra.append(f"- The LR of {label}: " + ", ".join(
                f"{lr}: {'diverged' if v is None else f'{v:,.1f}'}" for lr, v in g[key].items()) + ".")
    one = [(label, _ratio_at(data, _key(data, f"{name}-k1", lr), central, 1.0))
           for label, name, lr in (("FedAvg η=1", f"fedavg-h{b['fedavg_h']}", fa_lr),
                                   ("Nesterov", f"{_nesterov(b)}-h{b['nesterov_h']}", b["inner_lr"]))]
    if all(r for _, r in one):
        extra.append("- One replica (K = 1, batch B: the outer loop alone against `central`'s steps): "
                     + ", ".join(f"{label} {r[0]:.3f}" for label, r in one) + ", seed 0 (Charles et al. find "
                     "DiLoCo with M = 1 at or below data-parallel).")
    if extra:
        lines += ["", *extra]
    return "\n".join(lines)


def render_brief(data: dict[str, Any]) -> str:
    """The README's table: each outer loop at its best measured setting, and which one `photon run` uses."""
    data = _upgrade(data)
    b, p = data["best"], data["plan"]
    K = p["clients"]
    central = _key(data, "central", b["central_lr"])
    fa_lr = b.get("fedavg_inner_lr", b["lr0"])
    rows = [("FedAvg (Photon's, the default)", "FedAvg", "1", b["fedavg_h"], fa_lr,
             f"fedavg-h{b['fedavg_h']}-k{K}"),
            ("Nesterov, tuned (DiLoCo's outer loop)", f"Nesterov μ={b['nesterov_momentum']:g}",
             f"{b['nesterov_lr']:g}", b["nesterov_h"], b["inner_lr"], f"{_nesterov(b)}-h{b['nesterov_h']}-k{K}")]
    lines = [f"`photon bench recipe` on `{data['preset']}`, K = {K} by-domain clients, equal tokens, each replica "
             "batch B/K (docs/RESULTS.md has the grid):", "",
             "| recipe | outer optimizer | outer LR | H | inner LR | ratio to centralized (final) |",
             "|---|---|---|---|---|---|"]
    for label, outer, olr, h, lr, name in rows:
        ratio = _ratio_at(data, _key(data, name, lr), central, 1.0)
        lines.append(f"| {label} | {outer} | {olr} | {h} | {lr:g} | {_fmt(ratio, 3)} |")
        m_lr = b.get("muon_lr", lr)
        muon = _ratio_at(data, _key(data, f"{name}-muon", m_lr),
                         _key(data, "central-muon", b.get("central_muon_lr", b["central_lr"])), 1.0)
        if muon:
            lines.append(f"| {label}, Muon inner (against `central` with Muon) | {outer} | {olr} | {h} | {m_lr:g} | "
                         f"{_fmt(muon, 3)} |")
    return "\n".join(lines)
