"""Running the claims benchmark (`photon bench claims`) and storing its record, docs/results/claims-SCALE.json.

Each arm of the plan (`plan.py`) trains in its own run directory and writes `done.json` when it finishes; a
rerun skips finished arms, so an interrupted benchmark resumes where it stopped. Federated arms use the
engine-free `InProcessTransport` (a test proves it yields bitwise the parameters of the Flower simulation) with
one node per client, so a round's measured critical path is one client's training. The run happens in two
phases: the LR sweeps (seed 0 of each grid point), then every other arm at each side's best LR. What the
report shows is collected from the arms' `metrics.jsonl` into one JSON record (`collect`); `render.py` renders
it and `plots.py` draws it, from that record alone.
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from photon.bench.claims.plan import (
    SWEPT,
    Arm,
    ClaimsPlan,
    Recipes,
    arm_config,
    base_lrs,
    domains,
    estimate,
    job_tokens,
    next_grid,
    print_plan,
    round_lr,
)
from photon.checkpoint import atomic_write_text
from photon.config import RunConfig, build_config, config_to_dict, with_overrides
from photon.errors import UserError

log = logging.getLogger(__name__)


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
    grids = {m: sorted({round_lr(bases[m] * x) for x in plan.lr_grid}) for m in SWEPT}
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
        jobs.sort(key=lambda j: -job_tokens(base, j[0]))  # longest first: the pool ends together
        runner.run(jobs)
        runner.run([(a, 0) for a in arms if a.kind == "peer"])  # alone: the peer starts K processes
        data = collect(base, plan, rec, arms, sweeps, ddp, out, scale, speed, est)
    from photon.bench.claims.plots import plot
    from photon.bench.claims.render import render

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


def add_eval_bytes(base: RunConfig, plan: ClaimsPlan, path: Path) -> dict[str, list[int]]:
    """Store `eval_bytes` in the record at `path` that lacks them, training nothing (the counts depend only on
    the data and the rows the plan scores); the record's other fields stay as they were measured."""
    from photon.bench.results import eval_bytes, load_result, store_eval_bytes

    data = load_result(path)["data"]
    if str(base.data.prep_dir) != data.get("data"):
        raise UserError(f"{path} was measured on {data.get('data')}, not {base.data.prep_dir}; pass --data "
                        f"{data.get('data')}")
    return store_eval_bytes(path, eval_bytes(with_overrides(base, plan.base_overrides), data["batch"],
                                             data["eval_rows"]))


# ---------------------------------------------------------------------------------------------------------
# Throughput


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


def throughput_one(base: RunConfig, batches: list[int], seconds: float) -> dict[str, float]:
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
    from photon.bench.claims.record import model_bytes
    from photon.bench.results import eval_bytes
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
        "data": str(base.data.prep_dir), "domains": domains(base), "seq_len": base.train.seq_len,
        "batch": rec.b, "eval_rows": rec.eval_rows, "eval_bytes": eval_bytes(base, rec.b, rec.eval_rows),
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
