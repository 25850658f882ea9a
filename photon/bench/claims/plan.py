"""The claims benchmark's plan: the experiment grid per scale, the arms it trains and their exact overrides,
and what the plan costs on this machine (`photon bench claims --dry-run`).

An arm is one configuration at one learning rate and one seed. Nothing here trains or reads a run: `run.py`
trains the arms this module spells out, and the report (`render.py`) reads only the stored record.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from photon.config import RunConfig, with_overrides

log = logging.getLogger(__name__)

SWEPT = ("central", "photon", "diloco")  # the arms whose LR is tuned, one grid rule for all: a fair comparison
JOB_OVERHEAD_S = 10.0  # per arm: a fresh process imports torch, opens the data, builds the model (estimate)


@dataclass(frozen=True)
class ClaimsPlan:
    """The experiment grid. The reference budget is R·H sequential (global) steps of K clients × batch b;
    the centralized reference trains the same tokens in R·H steps of batch K·b."""

    preset: str
    clients: int = 4  # K of the reference Photon arm (and data-parallel workers in the network model)
    rounds: int = 8  # R of the reference arm
    local_steps: int = 32  # H of the reference arm
    ks: tuple[int, ...] = (1, 2, 4, 8)  # claim 2: clients, at fixed local batch, R and H
    hs: tuple[int, ...] = (16, 64, 256)  # claim 3: local steps, at R·H fixed (iso-token)
    seeds: int = 2  # seeds 0..seeds-1 of the headline arms (claims 1, 4, 5, 6 and Photon in both client modes)
    sweep_seeds: int = 2  # seeds of the secondary arms (iid, bigbatch, diloco-reset, the K and H sweeps)
    paper_seeds: int = 1  # seeds of the paper regime (K× the tokens) at the full horizon
    short_horizon: float | None = 0.25  # claim 1 is also run at this fraction of the horizon (None: not)
    lr_grid: tuple[float, ...] = (0.5, 1.0, 2.0)  # every swept arm tries its base LR × these (seed 0)
    lr_extend: int = 3  # the grid grows by one geometric step this many times while the best is at an edge
    ddp_steps: int = 200  # steps of the real 2-process DDP calibration run
    throughput_seconds: float = 6.0  # spent measuring tokens/s for the estimate
    torchft: bool = True  # run the torchft DiLoCo peer when torchft is importable
    jobs: int = 2  # arms trained at once, each in its own process with 1 thread (2 cores here)
    base_overrides: tuple[str, ...] = ()  # applied to the preset for every arm (budget cuts, documented)
    arms: tuple[str, ...] | None = None  # run only these arms (tests, partial reruns); None = all


PLANS = {
    # The test model: K=4 by-domain, H=32, R=8 (0.5M tokens, ≈5 per non-embedding parameter); minutes.
    "tiny": ClaimsPlan("tiny", seeds=2, sweep_seeds=2, paper_seeds=2, ddp_steps=60),
    # R=8 rounds of H=16 at sequence length 128 keep the equal-token arms near an hour on 2 cores; the sweeps
    # and the paper regime come on top (`--dry-run` says how long).
    "small": ClaimsPlan("small", rounds=8, local_steps=16, hs=(16, 64, 128), seeds=2, sweep_seeds=1, ddp_steps=100,
                        base_overrides=("train.seq_len=128",)),
    # The `medium` preset (blocks hold 71% of the parameters) at R=13 × H=32: 1.7M tokens, 5.3 per
    # non-embedding parameter, for the centralized reference. 2 seeds for the headline arms; the paper regime
    # at 1 seed at the full horizon and 2 at a quarter of it; 1 seed for the secondary arms. Sized from the
    # measured throughput (≈6k tokens/s per process, 2 processes, one thread each, on a nearly free machine):
    # `--dry-run` estimated 1.2 h (1.6 h if every LR grid grows 3 times).
    "medium": ClaimsPlan("medium", rounds=13, local_steps=32, ks=(1, 2, 4), hs=(), seeds=2, sweep_seeds=1,
                         paper_seeds=1, ddp_steps=60),
}


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # "federated", "centralized" or "peer" (torchft)
    about: str
    overrides: tuple[str, ...]
    lr: float
    seeds: int  # seeds 0..seeds-1
    regime: str  # "equal tokens", "paper (K× tokens)", "iso-rounds"
    client_optimizer: str = "-"  # "persist", "reset" ("-": centralized, one optimizer throughout)
    horizon: float = 1.0  # fraction of the reference budget (per client in the paper regime)

    def dir(self, out: Path, seed: int) -> Path:
        return Path(out) / "arms" / self.name / f"lr{self.lr:g}" / f"seed{seed}"


def round_lr(x: float) -> float:
    return float(f"{x:.3g}")


def base_lrs(base: RunConfig, plan: ClaimsPlan) -> dict[str, float]:
    """The middle of each swept arm's grid: the preset's LR for all three, so they start from one grid and
    only the edge rule (`next_grid`) moves a grid towards its arm's optimum. (The paper gives centralized
    training and DiLoCo a lower LR than Photon; a sweep that starts there needs more extensions to get out.)"""
    return {m: round_lr(base.train.lr) for m in SWEPT}


def next_grid(grid: list[float], ppl: dict[float, float]) -> float | None:
    """One more geometric step beyond the edge that holds the best point, or None when the best is inside."""
    best = min(grid, key=lambda lr: ppl.get(lr, math.inf))
    if best == grid[-1]:
        return round_lr(grid[-1] * grid[-1] / grid[-2])
    if best == grid[0]:
        return round_lr(grid[0] * grid[0] / grid[1])
    return None


class Recipes:
    """Arm builders over one base config and plan: every arm's overrides are spelled out here."""

    def __init__(self, base: RunConfig, plan: ClaimsPlan):
        self.base, self.plan = base, plan
        t = base.train
        self.b, self.K, self.H, self.R = t.batch_size, plan.clients, plan.local_steps, plan.rounds
        self.S, self.big = self.R * self.H, self.K * t.batch_size
        self.eval_rows = t.eval_batches * t.batch_size  # every arm scores exactly these validation rows
        self.warm_frac = t.warmup_steps / t.steps
        assert self.H * self.b % self.big == 0, \
            f"H·b = {self.H * self.b} must be a multiple of K·b = {self.big} (the large-batch arms' batch)"
        self.h_big = self.H * self.b // self.big  # local steps of a batch-K·b client for the same tokens per round

    def _train(self, batch: int, steps: int, lr: float) -> list[str]:
        assert self.eval_rows % batch == 0, f"eval rows {self.eval_rows} not divisible by batch {batch}"
        return [f"train.batch_size={batch}", f"train.lr={lr:g}", f"train.steps={steps}",
                f"train.warmup_steps={max(1, round(self.warm_frac * steps))}",
                f"train.eval_batches={self.eval_rows // batch}"]

    def fed(self, name: str, about: str, lr: float, seeds: int, *, k: int | None = None, h: int | None = None,
            r: int | None = None, batch: int | None = None, split: str = "by-domain",
            outer: tuple[str, float] = ("fedavg", 1.0), mode: str = "persist", eval_every: int = 1,
            regime: str = "equal tokens", horizon: float = 1.0) -> Arm:
        k, h, r, batch = k or self.K, h or self.H, r or self.R, batch or self.b
        return Arm(name, "federated", about, (
            f"data.partition.kind={split}", f"data.partition.num_clients={k}", f"federation.clients_per_round={k}",
            f"federation.num_nodes={k}", f"federation.local_steps={h}", f"federation.rounds={r}",
            f"federation.eval_every={eval_every}", f"federation.outer.name={outer[0]}",
            f"federation.outer.lr={outer[1]:g}", "federation.outer.momentum=0.9",
            f"federation.client_optimizer={mode}", "federation.state_backup=false",
            # The paper's aggregation: a plain weighted mean, with no update screen.
            "federation.aggregation=mean", "federation.max_norm_ratio=null", "federation.min_cosine=null",
            *self._train(batch, r * h, lr)),
            lr, seeds, regime, mode, horizon)

    def central(self, name: str, about: str, lr: float, seeds: int, horizon: float = 1.0) -> Arm:
        steps = round(self.S * horizon)
        return Arm(name, "centralized", about, (*self._train(self.big, steps, lr), f"train.eval_every={self.H}",
                                                 f"train.ckpt_every={steps}"), lr, seeds, "equal tokens",
                   horizon=horizon)

    # -- the swept arms -------------------------------------------------------------------------------------

    def swept(self, method: str, lr: float, seeds: int) -> Arm:
        K, b, big, H = self.K, self.b, self.big, self.H
        if method == "central":
            return self.central("central", f"centralized, batch K·b={big}", lr, seeds)
        if method == "photon":
            return self.fed("photon", f"Photon: K={K} by-domain clients, local batch {b}, H={H}, FedAvg η=1",
                            lr, seeds)
        if method == "diloco":
            return self.fed("diloco", f"DiLoCo: batch {big}, H={self.h_big} (Photon's tokens per round), outer "
                            "Nesterov η=0.7 μ=0.9", lr, seeds, h=self.h_big, batch=big, outer=("nesterov", 0.7))
        raise ValueError(f"no swept arm {method!r}")

    def arms(self, best: dict[str, float]) -> list[Arm]:
        """Every arm of the plan at each side's best LR (`best`: swept arm -> LR), seeds included."""
        p, K, H, R, S, big = self.plan, self.K, self.H, self.R, self.S, self.big
        ph, ce, dl = best["photon"], best["central"], best["diloco"]
        arms = [self.swept(m, best[m], p.seeds) for m in SWEPT]
        arms += [
            self.fed("photon-reset", "Photon with stateless clients (a fresh AdamW every round)", ph, p.seeds,
                     mode="reset"),
            self.fed("paper", f"Photon, each client the centralized sample count: R={K * R} rounds (K× the "
                     "tokens; the paper's regime)", ph, p.paper_seeds, r=K * R, eval_every=K,
                     regime="paper (K× tokens)"),
            self.fed("iid", "Photon on an IID split (every client holds a slice of every domain)", ph,
                     p.sweep_seeds, split="iid"),
            self.fed("diloco-reset", "DiLoCo with its inner AdamW reset every round", dl,
                     p.sweep_seeds, h=self.h_big, batch=big, outer=("nesterov", 0.7), mode="reset"),
            self.fed("bigbatch", f"Photon with DiLoCo's batch {big}, `central`'s best LR and H={self.h_big}, "
                     "FedAvg η=1", ce, p.sweep_seeds, h=self.h_big, batch=big),
        ]
        if p.short_horizon:
            rs = max(1, round(R * p.short_horizon))  # whole rounds: the horizon is rs/R, reported as such
            f = rs / R
            arms += [self.central("central-short", f"`central` at {f:.2g} of the horizon", ce, p.seeds, horizon=f),
                     self.fed("photon-short", f"`photon` at {f:.2g} of the horizon", ph, p.seeds, r=rs, horizon=f),
                     self.fed("paper-short", f"`paper` at {f:.2g} of the horizon", ph, p.seeds, r=K * rs,
                              eval_every=K, regime="paper (K× tokens)", horizon=f)]
        arms += [self.fed(f"k{k}", f"Photon with K={k} (N=K by-domain clients)", ph, p.sweep_seeds, k=k,
                          regime="iso-rounds") for k in p.ks if k != K]
        for h in p.hs:
            if h != H:
                if S % h:
                    log.warning("skipping H=%d: the budget of %d global steps is not a multiple of it", h, S)
                    continue
                arms.append(self.fed(f"h{h}", f"Photon with H={h}, R={S // h} (same tokens)", ph, p.sweep_seeds,
                                     h=h, r=S // h))
        if p.torchft:
            d = self.swept("diloco", dl, 1)
            arms.append(replace(d, name="torchft", kind="peer", seeds=1, about="torchft 0.2's DiLoCo on the same "
                                "model, data, seed and recipe as `diloco` (K replica processes on loopback)"))
        return [a for a in arms if p.arms is None or a.name in p.arms]



def arm_config(base: RunConfig, arm: Arm, seed: int) -> RunConfig:
    return with_overrides(base, [*arm.overrides, f"train.seed={seed}"])



# ---------------------------------------------------------------------------------------------------------
# The plan's cost


def job_tokens(base: RunConfig, arm: Arm) -> int:
    cfg = arm_config(base, arm, 0)
    t, f = cfg.train, cfg.federation
    if arm.kind == "centralized":
        return t.steps * t.batch_size * t.seq_len
    return f.rounds * f.clients_per_round * f.local_steps * t.batch_size * t.seq_len


def _job_seconds(base: RunConfig, arm: Arm, tok_s: dict[str, float]) -> float:
    """Estimated seconds of one (arm, seed) job: training at the measured speed of its batch, plus its
    evaluations (forward only: a third of a training step's work per token)."""
    cfg = arm_config(base, arm, 0)
    t, f = cfg.train, cfg.federation
    speed = tok_s.get(str(t.batch_size)) or min(tok_s.values())
    evals = (f.rounds // f.eval_every if arm.kind != "centralized" else t.steps // t.eval_every) + 1
    eval_tokens = evals * t.eval_batches * t.batch_size * t.seq_len * len(domains(cfg))
    seconds = (job_tokens(base, arm) + eval_tokens / 3) / speed + JOB_OVERHEAD_S
    if arm.kind == "peer":  # K processes share the cores
        seconds = seconds / max(1, os.cpu_count() or 1) * 1.2
    return seconds


def domains(cfg: RunConfig) -> list[str]:
    path = Path(cfg.data.prep_dir) / "manifest.json"
    return sorted(json.loads(path.read_text())["domains"]) if path.exists() else ["?"] * 6


def _schedule(seconds: list[float], workers: int) -> float:
    """Makespan of jobs handed, longest first, to whichever of `workers` frees up first."""
    free = [0.0] * max(1, workers)
    for s in sorted(seconds, reverse=True):
        i = free.index(min(free))
        free[i] += s
    return max(free)


def estimate(rec: Recipes, speed: dict[str, Any]) -> dict[str, Any]:
    """The plan's jobs and estimated duration at the measured throughput; the sweep's possible extensions
    (one grid point per swept arm and extension) are counted apart, as the worst case."""
    base, plan = rec.base, rec.plan
    tok_s = speed["tokens_per_s"]
    bases = base_lrs(base, plan)
    sweep_jobs = [(rec.swept(m, round_lr(bases[m] * x), 1), 0) for m in SWEPT for x in plan.lr_grid]
    sweep_jobs = [j for j in sweep_jobs if plan.arms is None or j[0].name in plan.arms]
    arms = rec.arms(bases)
    main = [(a, s) for a in arms if a.kind != "peer" for s in range(a.seeds)
            if not (a.name in SWEPT and s == 0)]  # seed 0 of a swept arm is its best grid point
    peer = [(a, 0) for a in arms if a.kind == "peer"]
    extension = [_job_seconds(base, a, tok_s) for a, _ in sweep_jobs[::len(plan.lr_grid)]] * plan.lr_extend
    ddp = plan.ddp_steps * rec.b * base.train.seq_len / tok_s[str(rec.b)] + 15 if plan.ddp_steps else 0.0
    phases = {"ddp calibration": ddp,
              "LR sweeps (seed 0)": _schedule([_job_seconds(base, a, tok_s) for a, _ in sweep_jobs], plan.jobs),
              "other arms": _schedule([_job_seconds(base, a, tok_s) for a, _ in main], plan.jobs),
              "torchft peer": sum(_job_seconds(base, a, tok_s) for a, _ in peer)}
    total = sum(phases.values())
    return {"phases": {k: round(v) for k, v in phases.items()}, "seconds": round(total),
            "worst_case_seconds": round(total + _schedule(extension, plan.jobs)),
            "jobs": len(sweep_jobs) + len(main) + len(peer),
            "tokens": sum(job_tokens(base, a) for a, _ in [*sweep_jobs, *main, *peer])}


def print_plan(console: Console, rec: Recipes, speed: dict[str, Any], est: dict[str, Any]) -> None:
    from photon.model.transformer import count_params, describe, embedding_params

    base, plan = rec.base, rec.plan
    m = base.model
    non_emb = count_params(m) - embedding_params(m)
    ref = rec.S * rec.big * base.train.seq_len
    bases = base_lrs(base, plan)
    console.print(f"claims plan `{plan.preset}`: {describe(m)}; reference {rec.R} rounds × H={rec.H} × K={rec.K} × "
                  f"batch {rec.b} × {base.train.seq_len} = {ref:,} tokens ({ref / non_emb:.1f} per non-embedding "
                  f"parameter)", highlight=False)
    console.print("LR grids (seed 0; best by final validation perplexity, then the other seeds): " + "; ".join(
        f"{s} {', '.join(f'{bases[s] * x:.3g}' for x in plan.lr_grid)}" for s in SWEPT), highlight=False)
    for a in rec.arms(bases):
        console.print(f"  {a.name:13s} {a.kind:11s} seeds {a.seeds}  {job_tokens(base, a) / 1e6:7.2f}M tokens  "
                      f"client optimizer {a.client_optimizer}  {a.about}", highlight=False)
    tput = ", ".join(f"batch {b}: {v:,.0f} tok/s" for b, v in speed["tokens_per_s"].items())
    console.print(f"throughput now, per process ({speed['processes']} measuring at once, {speed['threads']} "
                  f"thread(s) each, load average {speed['load_average']}): {tput}", highlight=False)
    phases = ", ".join(f"{k} {v / 60:.0f} min" for k, v in est["phases"].items())
    console.print(f"estimate: {est['jobs']} runs, {est['tokens'] / 1e6:.1f}M tokens, {est['seconds'] / 3600:.2f} h "
                  f"on {plan.jobs} process(es) ({phases}); worst case with LR-grid extensions "
                  f"{est['worst_case_seconds'] / 3600:.2f} h", highlight=False)
