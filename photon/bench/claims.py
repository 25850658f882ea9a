"""`photon bench claims`: the paper's claims as experiments on this machine, stored in docs/results/claims-SCALE.json.

An arm is one configuration at one learning rate and one seed. Each trains in its own run directory and writes
`done.json` when it finishes; a rerun skips finished arms, so an interrupted benchmark resumes where it stopped.
Federated arms use the engine-free `InProcessTransport` (a test proves it yields bitwise the parameters of the
Flower simulation) with one node per client, so a round's measured critical path is one client's training.
The run happens in two phases: the LR sweeps (seed 0 of each grid point), then every other arm at each side's
best LR. What the report shows is collected from the arms' `metrics.jsonl` into one JSON record
(`collect`); `claims_report.py` renders it and draws the plots, and nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from photon.checkpoint import atomic_write_text
from photon.config import RunConfig, build_config, config_to_dict, with_overrides

log = logging.getLogger(__name__)

SWEPT = ("central", "photon", "diloco")  # the arms whose LR is tuned (issue #12 item 4), one grid rule for all
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
    # The tiny setting: K=4 by-domain, H=32, R=8 (0.5M tokens, ≈5 per non-embedding parameter); minutes.
    "tiny": ClaimsPlan("tiny", seeds=2, sweep_seeds=2, paper_seeds=2, ddp_steps=60),
    # Budget cut to about an hour before issue #12 (R=8 rounds of H=16, sequence length 128); the sweeps and the
    # paper regime added since make it longer (`--dry-run` says how long).
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


def _lr(x: float) -> float:
    return float(f"{x:.3g}")


def base_lrs(base: RunConfig, plan: ClaimsPlan) -> dict[str, float]:
    """The middle of each swept arm's grid: the preset's LR for all three, so they start from one grid and
    only the edge rule (`next_grid`) moves a grid towards its arm's optimum. (The paper gives centralized
    training and DiLoCo a lower LR than Photon; a sweep that starts there needs more extensions to get out.)"""
    return {m: _lr(base.train.lr) for m in SWEPT}


def next_grid(grid: list[float], ppl: dict[float, float]) -> float | None:
    """One more geometric step beyond the edge that holds the best point, or None when the best is inside."""
    best = min(grid, key=lambda lr: ppl.get(lr, math.inf))
    if best == grid[-1]:
        return _lr(grid[-1] * grid[-1] / grid[-2])
    if best == grid[0]:
        return _lr(grid[0] * grid[0] / grid[1])
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
            # The paper's aggregation is a plain weighted mean. The default screen (issue #8) rejects honest
            # by-domain updates late in long runs, whose pairwise cosines fall to ≈0, and then whole rounds.
            "federation.max_norm_ratio=null", "federation.min_cosine=null", *self._train(batch, r * h, lr)),
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
            self.fed("diloco-reset", "DiLoCo with its inner AdamW reset every round (the pre-issue-12 arm)", dl,
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


# ---------------------------------------------------------------------------------------------------------
# Running arms


def run_arm(base: RunConfig, arm: Arm, seed: int, run_dir: Path) -> dict[str, Any]:
    """Train one arm at one seed unless `run_dir/done.json` says it already finished."""
    done = run_dir / "done.json"
    if _finished(base, arm, seed, run_dir):
        return {**json.loads(done.read_text()), "skipped": True}
    if done.exists():
        log.warning("%s: finished with another config; training it again", run_dir)
    cfg = arm_config(base, arm, seed)
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted (or outdated) arm restarts from scratch
    run_dir.mkdir(parents=True)
    quiet = Console(quiet=True)
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if arm.kind == "federated":
        from photon.federation.runner import run_federation
        from photon.federation.worker import ClientWorker
        from photon.transport.inprocess import InProcessTransport

        transport = InProcessTransport(ClientWorker(run_dir / "node-state"), cfg.federation.num_nodes)
        run_federation(cfg, run_dir, transport, console=quiet)
    elif arm.kind == "centralized":
        from photon.train.centralized import train_central

        train_central(cfg, run_dir, console=quiet, keep_checkpoints=1)
    else:
        extra = {"peer": run_peer(cfg, run_dir, seed)}
    record = {"arm": arm.name, "seed": seed, "kind": arm.kind, "about": arm.about, "overrides": list(arm.overrides),
              "seconds": time.perf_counter() - start, "config": config_to_dict(cfg), **extra}
    atomic_write_text(done, json.dumps(record, indent=1))
    return record


def run_peer(cfg: RunConfig, run_dir: Path, seed: int) -> dict[str, Any]:
    """torchft's DiLoCo side by side (photon/bench/baselines/torchft.py), or why it did not run."""
    import importlib.util

    if importlib.util.find_spec("torchft") is None:
        return {"status": "not run: torchft is not installed (pip install -e '.[peers]')"}
    try:
        from photon.bench.baselines.torchft import run_torchft_diloco
    except ImportError as e:
        return {"status": f"not run: photon.bench.baselines.torchft is not available ({e})"}
    try:
        rec = run_torchft_diloco(cfg, run_dir, seed)
    except Exception as e:  # the peer is a reference, not ours: its failure is reported, not fatal
        log.warning("torchft peer failed: %s", e)
        return {"status": f"not run: the torchft run failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})"}
    keep = ("torchft_version", "losses", "sync_s_per_round", "sync_s_steady", "sync_s_first_round",
            "sync_wait_s_per_round", "compute_s_per_round", "wall_s_per_round", "replicas_agree", "differences",
            "seconds", "threads_per_replica", "client_optimizer")
    return {"status": "ran", **{k: rec[k] for k in keep if k in rec}}


def arm_config(base: RunConfig, arm: Arm, seed: int) -> RunConfig:
    return with_overrides(base, [*arm.overrides, f"train.seed={seed}"])


def run_ddp_calibration(base: RunConfig, plan: ClaimsPlan, out: Path) -> dict[str, Any]:
    from photon.bench.baselines.ddp import run_ddp

    done = out / "done.json"
    steps = plan.ddp_steps
    cfg = with_overrides(base, [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
                                "train.threads=1", "train.seed=0"])
    if done.exists():
        report = json.loads(done.read_text())
        if report.get("config") == config_to_dict(cfg):
            return report
    start = time.perf_counter()
    report = {**run_ddp(cfg, out, steps=steps, world=2), "seconds": time.perf_counter() - start,
              "config": config_to_dict(cfg)}
    atomic_write_text(done, json.dumps(report, indent=1))
    return report


def _finished(base: RunConfig, arm: Arm, seed: int, run_dir: Path) -> bool:
    """Whether `run_dir` holds a finished run of exactly this arm's resolved config."""
    done = run_dir / "done.json"
    return done.exists() and json.loads(done.read_text()).get("config") == config_to_dict(arm_config(base, arm, seed))


def _failed(base: RunConfig, arm: Arm, seed: int, run_dir: Path) -> str | None:
    """Why this arm's exact config failed here before (a sweep point that diverged), if it did."""
    path = run_dir / "failed.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record["reason"] if record.get("config") == config_to_dict(arm_config(base, arm, seed)) else None


def _run_arm_subprocess(base: RunConfig, arm: Arm, seed: int, run_dir: Path, logs: Path) -> dict[str, Any]:
    """`run_arm` in a fresh process (config and arm as JSON on the command line, the record back as JSON)."""
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{arm.name}-lr{arm.lr:g}-seed{seed}.log"
    args = [json.dumps(config_to_dict(base)), json.dumps(asdict(arm)), str(seed), str(run_dir)]
    with open(log_path, "w") as f:
        code = subprocess.run([sys.executable, "-m", "photon.bench.claims", *args], stdout=f,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"arm {arm.name} (lr {arm.lr:g}) seed {seed} failed (exit {code}); see {log_path}")
    return json.loads((run_dir / "done.json").read_text())


class Runner:
    """Runs (arm, seed) jobs on `plan.jobs` processes and says what it did."""

    def __init__(self, base: RunConfig, plan: ClaimsPlan, out: Path, console: Console):
        self.base, self.plan, self.out, self.console = base, plan, out, console
        self.t0 = time.perf_counter()
        self.skipped = self.trained = 0  # runs finished by an earlier invocation, and by this one

    def run(self, jobs: list[tuple[Arm, int]], may_fail: bool = False) -> None:
        """Train every job not yet finished. A sweep point that fails (`may_fail`: e.g. it diverged) is
        recorded in failed.json and counts as infinite perplexity; any other failure stops the benchmark."""
        counter = iter(range(1, len(jobs) + 1))

        def one(job: tuple[Arm, int]) -> None:
            arm, seed = job
            run_dir = arm.dir(self.out, seed)
            if may_fail and _failed(self.base, arm, seed, run_dir) and not _finished(self.base, arm, seed, run_dir):
                return
            try:
                if arm.kind != "peer" and self.plan.jobs > 1 and not _finished(self.base, arm, seed, run_dir):
                    rec = _run_arm_subprocess(self.base, arm, seed, run_dir, self.out / "logs")
                else:
                    rec = run_arm(self.base, arm, seed, run_dir)
            except Exception as e:
                if not may_fail:
                    raise
                run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(run_dir / "failed.json", json.dumps({
                    "reason": str(e).splitlines()[0], "config": config_to_dict(arm_config(self.base, arm, seed))}))
                self.console.print(f"{arm.name} lr {arm.lr:g} seed {seed}: failed ({e})")
                return
            self.skipped += bool(rec.get("skipped"))
            self.trained += not rec.get("skipped")
            state = "done earlier" if rec.get("skipped") else f"{rec['seconds']:.0f} s"
            self.console.print(f"[{next(counter)}/{len(jobs)}] {arm.name} lr {arm.lr:g} seed {seed}: {state}  "
                               f"({time.perf_counter() - self.t0:.0f} s so far)")

        with ThreadPoolExecutor(max_workers=max(1, self.plan.jobs)) as pool:
            list(pool.map(one, jobs))


def sweep(runner: Runner, rec: Recipes, plan: ClaimsPlan) -> dict[str, dict[str, Any]]:
    """Phase 1: seed 0 of every grid point of every swept arm (growing a grid whose best is at an edge, at
    most `plan.lr_extend` times); returns per arm the grid, final perplexities and the best LR."""
    bases = base_lrs(rec.base, plan)
    grids = {m: sorted({_lr(bases[m] * x) for x in plan.lr_grid}) for m in SWEPT}
    ppl: dict[str, dict[float, float]] = {m: {} for m in SWEPT}
    for extension in range(plan.lr_extend + 1):
        jobs = [(rec.swept(m, lr, 1), 0) for m in SWEPT for lr in grids[m] if lr not in ppl[m]]
        jobs = [j for j in jobs if plan.arms is None or j[0].name in plan.arms]
        runner.run(jobs, may_fail=True)
        for arm, _ in jobs:
            ppl[arm.name][arm.lr] = final_ppl(arm.dir(runner.out, 0))
        if extension == plan.lr_extend:
            break
        for m in SWEPT:
            more = next_grid(grids[m], ppl[m]) if ppl[m] else None
            if more is not None:
                grids[m] = sorted({*grids[m], more})
    out = {}
    for m in SWEPT:
        if not ppl[m]:
            continue
        best = min(grids[m], key=lambda lr: ppl[m].get(lr, math.inf))
        failed = {}
        for lr in grids[m]:
            arm = rec.swept(m, lr, 1)
            if why := _failed(rec.base, arm, 0, arm.dir(runner.out, 0)):
                failed[f"{lr:g}"] = why
        out[m] = {"base_lr": bases[m], "grid": grids[m],
                  "ppl": [p if p is not None and math.isfinite(p) else None for p in map(ppl[m].get, grids[m])],
                  "seconds": [_seconds(rec.swept(m, lr, 1).dir(runner.out, 0)) for lr in grids[m]],
                  "best_lr": best, "at_edge": best in (grids[m][0], grids[m][-1]), "failed": failed}
    return out


def _seconds(run_dir: Path) -> float | None:
    done = run_dir / "done.json"
    return round(json.loads(done.read_text())["seconds"], 1) if done.exists() else None


def final_ppl(run_dir: Path) -> float:
    """Final overall validation perplexity of a finished run (inf for a failed or diverged one)."""
    from photon.runlog import read_metrics
    from photon.train.evaluate import OVERALL, perplexity

    if not (run_dir / "done.json").exists():
        return math.inf
    evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
    loss = evals[-1][f"loss/{OVERALL}"] if evals else math.nan
    return perplexity(loss) if math.isfinite(loss) else math.inf


def run_claims(base: RunConfig, out: Path, plan: ClaimsPlan, console: Console | None = None,
               command: str = "photon bench claims", scale: str | None = None, results_dir: Path | None = None,
               img_dir: Path | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Run (or finish) every arm of `plan`, store docs/results/claims-SCALE.json and the plots; returns the data.

    `dry_run`: print the plan and its estimated duration (from a throughput measured now) and stop."""
    from photon.bench.results import LoadSampler, plots_dir, save_result

    console = console or Console()
    out, scale = Path(out), scale or plan.preset
    base = with_overrides(base, plan.base_overrides)
    if plan.jobs > 1 and base.train.threads is None:
        base = with_overrides(base, ["train.threads=1"])  # arms share the cores: one thread each
    rec = Recipes(base, plan)
    started = time.time()
    with LoadSampler() as load:
        speed, est = _estimate_once(base, plan, rec, out, dry_run)
        print_plan(console, rec, speed, est)
        if dry_run:
            return {"estimate": est, "throughput": speed}
        runner = Runner(base, plan, out, console)
        ddp = None
        if plan.ddp_steps > 0:  # first, alone, so its timing is not shared with training arms
            ddp = run_ddp_calibration(base, plan, out / "ddp")
            console.print(f"ddp calibration: {ddp['steps']} steps on 2 gloo ranks, {ddp['seconds']:.0f} s")
        sweeps = sweep(runner, rec, plan)
        best = {m: sweeps[m]["best_lr"] if m in sweeps else base_lrs(base, plan)[m] for m in SWEPT}
        console.print("best LRs: " + ", ".join(f"{m} {lr:g}" for m, lr in best.items()))
        arms = rec.arms(best)
        jobs = [(a, s) for a in arms if a.kind != "peer" for s in range(a.seeds)]
        jobs.sort(key=lambda j: -_job_tokens(base, j[0]))  # longest first: the pool ends together
        runner.run(jobs)
        runner.run([(a, 0) for a in arms if a.kind == "peer"])  # alone: the peer starts K processes
        data = collect(base, plan, rec, arms, sweeps, ddp, out, scale, speed, est)
    from photon.bench.claims_report import plot, render

    img_dir = Path(img_dir) if img_dir is not None else plots_dir(results_dir)
    data["plots"] = [str(p) for p in plot(data, img_dir)]
    kwargs = {"results_dir": results_dir} if results_dir is not None else {}
    # The machine's load while the runs trained, over every invocation that trained some; the wall time of
    # this invocation is the benchmark's only when it trained every run itself.
    history = out / "load.json"
    samples = json.loads(history.read_text()) if history.exists() else []
    if runner.trained:
        samples += load.samples
        atomic_write_text(history, json.dumps(samples))
    load.samples = samples or load.samples
    path = save_result(f"claims-{scale}", data, load, command=command,
                       started=started if runner.skipped == 0 else None, **kwargs)
    atomic_write_text(out / "claims.md", render(data) + "\n")
    console.print(f"stored {path}; plots in {img_dir}; {out / 'claims.md'} ({time.time() - started:.0f} s)")
    return data


# ---------------------------------------------------------------------------------------------------------
# Throughput and the plan's cost


def measure_throughput(base: RunConfig, batches: tuple[int, ...], seconds: float = 6.0,
                       procs: int = 1) -> dict[str, Any]:
    """Training tokens/s per process with `procs` processes measuring at once (as the plan's arms run), each
    on `train.threads` threads, random tokens, this model and sequence length; whatever else runs on the
    machine now slows it too (the load average is recorded)."""
    args = [sys.executable, "-m", "photon.bench.claims", "--throughput", json.dumps(config_to_dict(base)),
            ",".join(map(str, sorted(set(batches)))), str(seconds)]
    load = round(os.getloadavg()[0], 2)
    running = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True) for _ in range(max(1, procs))]
    reports = []
    for p in running:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"throughput measurement failed (exit {p.returncode})")
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    per_batch = {b: round(sum(r[b] for r in reports) / len(reports), 1) for b in reports[0]}
    return {"load_average": load, "threads": base.train.threads or "default", "processes": len(reports),
            "tokens_per_s": per_batch}


def _throughput_one(base: RunConfig, batches: list[int], seconds: float) -> dict[str, float]:
    import torch

    from photon.model.transformer import Transformer
    from photon.train.local import make_optimizer

    if base.train.threads:
        torch.set_num_threads(base.train.threads)
    t, out = base.train, {}
    for batch in batches:
        torch.manual_seed(0)
        model = Transformer(base.model)
        opt = make_optimizer(model, t)
        x = torch.randint(0, base.model.vocab_size, (batch, t.seq_len))

        def step() -> None:
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        n, start = 0, time.perf_counter()
        while n < 2 or (time.perf_counter() - start < seconds / len(batches) and n < 50):
            step()
            n += 1
        out[str(batch)] = n * batch * t.seq_len / (time.perf_counter() - start)
    return out


def _estimate_once(base: RunConfig, plan: ClaimsPlan, rec: Recipes, out: Path,
                   dry_run: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Throughput and estimate, measured before the plan's first run and kept (out/estimate.json) for the
    invocations that resume it; a dry run always measures afresh."""
    key = json.loads(json.dumps({"plan": asdict(plan), "base": config_to_dict(base)}))
    path = out / "estimate.json"
    stored = json.loads(path.read_text()) if path.exists() and not dry_run else {}
    if stored.get("key") == key:
        return stored["speed"], stored["estimate"]
    speed = measure_throughput(base, (rec.b, rec.big), plan.throughput_seconds, plan.jobs)
    est = estimate(rec, speed)
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"key": key, "speed": speed, "estimate": est}))
    return speed, est


def _job_tokens(base: RunConfig, arm: Arm) -> int:
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
    eval_tokens = evals * t.eval_batches * t.batch_size * t.seq_len * len(_domains(cfg))
    seconds = (_job_tokens(base, arm) + eval_tokens / 3) / speed + JOB_OVERHEAD_S
    if arm.kind == "peer":  # K processes share the cores
        seconds = seconds / max(1, os.cpu_count() or 1) * 1.2
    return seconds


def _domains(cfg: RunConfig) -> list[str]:
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
    sweep_jobs = [(rec.swept(m, _lr(bases[m] * x), 1), 0) for m in SWEPT for x in plan.lr_grid]
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
            "tokens": sum(_job_tokens(base, a) for a, _ in [*sweep_jobs, *main, *peer])}


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
        console.print(f"  {a.name:13s} {a.kind:11s} seeds {a.seeds}  {_job_tokens(base, a) / 1e6:7.2f}M tokens  "
                      f"client optimizer {a.client_optimizer}  {a.about}", highlight=False)
    tput = ", ".join(f"batch {b}: {v:,.0f} tok/s" for b, v in speed["tokens_per_s"].items())
    console.print(f"throughput now, per process ({speed['processes']} measuring at once, {speed['threads']} "
                  f"thread(s) each, load average {speed['load_average']}): {tput}", highlight=False)
    phases = ", ".join(f"{k} {v / 60:.0f} min" for k, v in est["phases"].items())
    console.print(f"estimate: {est['jobs']} runs, {est['tokens'] / 1e6:.1f}M tokens, {est['seconds'] / 3600:.2f} h "
                  f"on {plan.jobs} process(es) ({phases}); worst case with LR-grid extensions "
                  f"{est['worst_case_seconds'] / 3600:.2f} h", highlight=False)


# ---------------------------------------------------------------------------------------------------------
# Collecting what the report shows


def _round_row(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("ok", "failed", "dropped", "tokens", "bytes_up", "bytes_down", "bytes_state_up", "bytes_state_down")
    secs = ("critical_train_seconds", "train_seconds", "wall_seconds")
    return {**{k: r.get(k, 0) for k in keys}, **{k: round(r[k], 4) for k in secs}}


def read_run(run_dir: Path, arm: Arm, local_steps: int) -> dict[str, Any] | None:
    """One finished run as stored: evaluations [tokens, round-equivalent, {domain: loss}], round rows, seconds."""
    from photon.runlog import eval_losses, read_metrics

    done = run_dir / "done.json"
    if not done.exists():
        return None
    record = json.loads(done.read_text())
    if arm.kind == "peer":
        return {"seconds": round(record["seconds"], 1), "peer": record.get("peer", {})}
    cfg = build_config(json.loads((run_dir / "config.json").read_text()))
    rows = read_metrics(run_dir)
    evals, rounds = [], [r for r in rows if r["kind"] == "round"]
    by_round, cum = {0: 0}, 0
    for r in rounds:  # round rows carry per-round tokens
        cum += r["tokens"]
        by_round[r["round"]] = cum
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    for r in (r for r in rows if r["kind"] == "eval"):
        losses = eval_losses(r)
        if arm.kind == "federated":
            evals.append([by_round.get(r["round"], r["tokens"]), r["round"], losses])
        else:  # a centralized step of batch K·b is one global step of K clients: round-equivalent = step/H
            evals.append([r["step"] * tokens_per_step, r["step"] / local_steps, losses])
    out = {"seconds": round(record["seconds"], 1), "evals": evals}
    if arm.kind == "federated":
        out["rounds"] = [_round_row(r) for r in rounds]
        out["local_steps"] = cfg.federation.local_steps
    return out


def collect(base: RunConfig, plan: ClaimsPlan, rec: Recipes, arms: list[Arm], sweeps: dict[str, Any],
            ddp: dict[str, Any] | None, out: Path, scale: str, speed: dict[str, Any],
            est: dict[str, Any]) -> dict[str, Any]:
    """Everything the report shows, as plain JSON."""
    from photon.bench.claims_report import model_bytes
    from photon.model.transformer import count_params, describe, embedding_params

    m = base.model
    stored_arms = {}
    for a in arms:
        runs = {str(s): r for s in range(a.seeds) if (r := read_run(a.dir(out, s), a, rec.H)) is not None}
        stored_arms[a.name] = {"kind": a.kind, "about": a.about, "lr": a.lr, "regime": a.regime,
                               "client_optimizer": a.client_optimizer, "horizon": a.horizon,
                               "overrides": list(a.overrides), "runs": runs}
    ddp_keep = ("world", "threads", "steps", "batch_size", "seq_len", "step_seconds", "compute_seconds",
                "comm_seconds", "allreduce_bytes_per_step", "tokens_per_step", "loss_first", "loss_last", "seconds")
    return {
        "scale": scale, "preset": plan.preset, "model": {
            "describe": describe(m), "params": count_params(m), "embedding_params": embedding_params(m),
            "vocab_size": m.vocab_size, "n_layer": m.n_layer, "d_model": m.d_model, "bytes": model_bytes(base)},
        "data": str(base.data.prep_dir), "domains": _domains(base), "seq_len": base.train.seq_len,
        "batch": rec.b, "eval_rows": rec.eval_rows,
        "plan": {"clients": plan.clients, "rounds": plan.rounds, "local_steps": plan.local_steps, "ks": list(plan.ks),
                 "hs": list(plan.hs), "seeds": plan.seeds, "sweep_seeds": plan.sweep_seeds,
                 "paper_seeds": plan.paper_seeds, "short_horizon": plan.short_horizon, "lr_grid": list(plan.lr_grid),
                 "lr_extend": plan.lr_extend, "jobs": plan.jobs,
                 "threads": base.train.threads, "base_overrides": list(plan.base_overrides),
                 "reference_tokens": rec.S * rec.big * base.train.seq_len,
                 "warmup_fraction": rec.warm_frac, "min_lr_ratio": base.train.min_lr_ratio},
        "throughput": speed, "estimate": est, "sweeps": sweeps, "arms": stored_arms,
        "ddp": {k: ddp[k] for k in ddp_keep if k in ddp} | {"ranks_agree": len(set(ddp["digests"])) == 1}
        if ddp else None,
    }


if __name__ == "__main__" and sys.argv[1:2] == ["--throughput"]:
    # One throughput probe (started by measure_throughput): --throughput CONFIG_JSON BATCHES SECONDS.
    print(json.dumps(_throughput_one(build_config(json.loads(sys.argv[2])), [int(b) for b in sys.argv[3].split(",")],
                                     float(sys.argv[4]))))
elif __name__ == "__main__":
    # One arm in its own process (started by Runner): BASE_CONFIG_JSON ARM_JSON SEED RUN_DIR.
    _base, _arm, _seed, _dir = sys.argv[1:5]
    _a = json.loads(_arm)
    run_arm(build_config(json.loads(_base)), Arm(**{**_a, "overrides": tuple(_a["overrides"])}), int(_seed),
            Path(_dir))
