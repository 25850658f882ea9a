"""`photon bench claims`: the paper's claims as experiments on this machine; `claims_report.py` writes `claims.md`.

An arm is one configuration at one seed. Each trains in its own run directory and writes `done.json` when it
finishes; a rerun skips finished arms, so an interrupted benchmark resumes where it stopped. Federated arms use
the engine-free `InProcessTransport` (a test proves it yields bitwise the parameters of the Flower simulation)
with one node per client, so a round's measured critical path is one client's local training. Every number in
`claims.md` is computed from the arms' `metrics.jsonl`; none is typed by hand.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from photon.checkpoint import atomic_write_text
from photon.config import RunConfig, build_config, config_to_dict, with_overrides

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimsPlan:
    """The experiment grid. Every arm trains R·H sequential (global) steps' worth of the reference budget."""

    preset: str
    clients: int = 4  # K of the reference Photon arm (and data-parallel workers in the network model)
    rounds: int = 8  # R of the reference arm
    local_steps: int = 32  # H of the reference arm
    ks: tuple[int, ...] = (1, 2, 4, 8)  # claim 2: clients, at fixed local batch, R and H
    hs: tuple[int, ...] = (16, 64, 256)  # claim 3: local steps, at R·H fixed (iso-token)
    seeds: int = 2  # seeds 0..seeds-1 for the core arms (claims 1, 4, 5, 6, 7)
    sweep_seeds: int = 2  # seeds for the K and H sweeps (claims 2, 3): the first `sweep_seeds` of the same set
    central_lr_ratio: float = 1 / 3  # the centralized LR = Photon's LR × this (paper 1.3B: 2e-4 vs 6e-4)
    ddp_steps: int = 200  # steps of the real 2-process DDP calibration run
    jobs: int = 2  # arms trained at once, each in its own process with 1 thread (2 cores here)
    base_overrides: tuple[str, ...] = ()  # applied to the preset for every arm (budget cuts, documented)
    arms: tuple[str, ...] | None = None  # run only these arms (tests, partial reruns); None = all


PLANS = {
    "tiny": ClaimsPlan("tiny", seeds=2, sweep_seeds=2, ddp_steps=60),
    # Budget cut to fit about an hour on a shared 2-core machine (measured ≈1 s per local step under load):
    # R=8 rounds of H=16 (128 global steps, ≈5.5k local steps of batch 8×128 over all arms), H grid 16/64/128,
    # sequence length 128 instead of the preset's 256, 2 seeds for the core arms and 1 for the K and H sweeps.
    "small": ClaimsPlan("small", rounds=8, local_steps=16, hs=(16, 64, 128), seeds=2, sweep_seeds=1, ddp_steps=100,
                        base_overrides=("train.seq_len=128",)),
}


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # "federated" or "centralized"
    about: str
    overrides: tuple[str, ...]
    sweep: bool = False


def make_arms(base: RunConfig, plan: ClaimsPlan) -> list[Arm]:
    """All arms of the plan. Shared where identical: `photon` serves claims 1-7."""
    b, lr, K, H, R = base.train.batch_size, base.train.lr, plan.clients, plan.local_steps, plan.rounds
    S, big, low_lr = R * H, K * base.train.batch_size, base.train.lr * plan.central_lr_ratio
    eval_rows = base.train.eval_batches * b  # every arm scores exactly these validation rows
    warm_frac = base.train.warmup_steps / base.train.steps

    def train(batch: int, steps: int, lr_: float) -> list[str]:
        assert eval_rows % batch == 0, f"eval rows {eval_rows} not divisible by batch {batch}"
        return [f"train.batch_size={batch}", f"train.lr={lr_:g}", f"train.steps={steps}",
                f"train.warmup_steps={round(warm_frac * steps)}", f"train.eval_batches={eval_rows // batch}"]

    def fed(name: str, about: str, k: int = K, h: int = H, r: int = R, batch: int = b, lr_: float = lr,
            split: str = "by-domain", outer: tuple[str, float] = ("fedavg", 1.0), sweep: bool = False) -> Arm:
        return Arm(name, "federated", about, (
            f"data.partition.kind={split}", f"data.partition.num_clients={k}", f"federation.clients_per_round={k}",
            f"federation.num_nodes={k}", f"federation.local_steps={h}", f"federation.rounds={r}",
            "federation.eval_every=1", f"federation.outer.name={outer[0]}", f"federation.outer.lr={outer[1]:g}",
            "federation.outer.momentum=0.9", *train(batch, r * h, lr_)), sweep)

    def central(name: str, about: str, lr_: float) -> Arm:
        return Arm(name, "centralized", about, (*train(big, S, lr_), f"train.eval_every={H}", f"train.ckpt_every={S}"))

    assert H * b % big == 0, f"H·b = {H * b} must be a multiple of K·b = {big} (the large-batch arms' batch)"
    arms = [
        fed("photon", f"Photon: K={K} by-domain clients, local batch {b}, LR {lr:g}, H={H}, FedAvg η=1"),
        central("central", f"centralized, batch K·b={big}, the centralized LR {low_lr:g}", low_lr),
        central("central-hilr", f"centralized, batch {big}, Photon's LR {lr:g}", lr),
        fed("iid", "Photon on an IID split (every client holds a slice of every domain)", split="iid"),
        fed("diloco", f"DiLoCo: batch {big}, LR {low_lr:g}, H={H * b // big} (same tokens per round), "
            "outer Nesterov η=0.7 μ=0.9", h=H * b // big, batch=big, lr_=low_lr, outer=("nesterov", 0.7)),
        fed("bigbatch", f"Photon with DiLoCo's large batch {big}, the centralized LR {low_lr:g} and H={H * b // big} "
            "(same tokens per round), FedAvg η=1", h=H * b // big, batch=big, lr_=low_lr),
    ]
    arms += [fed(f"k{k}", f"Photon with K={k} (N=K by-domain clients)", k=k, sweep=True) for k in plan.ks if k != K]
    for h in plan.hs:
        if h != H:
            if S % h:
                log.warning("skipping H=%d: the budget of %d global steps is not a multiple of it", h, S)
                continue
            arms.append(fed(f"h{h}", f"Photon with H={h}, R={S // h} (same tokens)", h=h, r=S // h, sweep=True))
    if plan.arms is not None:
        arms = [a for a in arms if a.name in plan.arms]
    return arms


# ---------------------------------------------------------------------------------------------------------
# Running arms


def run_arm(base: RunConfig, arm: Arm, seed: int, run_dir: Path) -> dict[str, Any]:
    """Train one arm at one seed unless `run_dir/done.json` says it already finished."""
    done = run_dir / "done.json"
    if _finished(base, arm, seed, run_dir):
        return {**json.loads(done.read_text()), "skipped": True}
    if done.exists():
        log.warning("%s: finished with another config; training it again", run_dir)
    cfg = with_overrides(base, [*arm.overrides, f"train.seed={seed}"])
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted (or outdated) arm restarts from scratch
    run_dir.mkdir(parents=True)
    quiet = Console(quiet=True)
    start = time.perf_counter()
    if arm.kind == "federated":
        from photon.federation.inprocess import InProcessTransport
        from photon.federation.runner import run_federation
        from photon.federation.worker import ClientWorker

        transport = InProcessTransport(ClientWorker(run_dir / "node-state"), cfg.federation.num_nodes)
        run_federation(cfg, run_dir, transport, console=quiet)
    else:
        from photon.train.centralized import train_central

        train_central(cfg, run_dir, console=quiet)
    record = {"arm": arm.name, "seed": seed, "kind": arm.kind, "about": arm.about, "overrides": list(arm.overrides),
              "seconds": time.perf_counter() - start, "config": config_to_dict(cfg)}
    atomic_write_text(done, json.dumps(record, indent=1))
    return record


def run_ddp_calibration(base: RunConfig, plan: ClaimsPlan, out: Path) -> dict[str, Any]:
    from photon.train.ddp import run_ddp

    done = out / "done.json"
    steps = plan.ddp_steps
    cfg = with_overrides(base, [f"train.steps={steps}", f"train.warmup_steps={steps // 10}", "train.threads=1",
                                "train.seed=0"])
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
    cfg = with_overrides(base, [*arm.overrides, f"train.seed={seed}"])
    return done.exists() and json.loads(done.read_text()).get("config") == config_to_dict(cfg)


def _run_arm_subprocess(base: RunConfig, arm: Arm, seed: int, run_dir: Path, logs: Path) -> dict[str, Any]:
    """`run_arm` in a fresh process (config and arm as JSON on the command line, the record back as JSON)."""
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{arm.name}-seed{seed}.log"
    args = [json.dumps(config_to_dict(base)), json.dumps(arm.__dict__), str(seed), str(run_dir)]
    with open(log_path, "w") as f:
        code = subprocess.run([sys.executable, "-m", "photon.bench.claims", *args], stdout=f,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"arm {arm.name} seed {seed} failed (exit {code}); see {log_path}")
    return json.loads((run_dir / "done.json").read_text())


def run_claims(base: RunConfig, out: Path, plan: ClaimsPlan, console: Console | None = None,
               command: str = "photon bench claims") -> Path:
    """Run (or finish) every arm of `plan`, then write OUT/claims.md and the PNG plots; returns claims.md."""
    console = console or Console()
    out = Path(out)
    base = with_overrides(base, plan.base_overrides)
    if plan.jobs > 1 and base.train.threads is None:
        base = with_overrides(base, ["train.threads=1"])  # arms share the cores: one thread each
    arms = make_arms(base, plan)
    t0 = time.perf_counter()
    ddp = None
    if plan.ddp_steps > 0:  # first, alone, so its timing is not shared with training arms
        ddp = run_ddp_calibration(base, plan, out / "ddp")
        console.print(f"ddp calibration: {ddp['steps']} steps on 2 gloo ranks, {ddp['seconds']:.0f} s")
    jobs = [(arm, seed) for arm in arms for seed in range(plan.sweep_seeds if arm.sweep else plan.seeds)]
    counter = iter(range(1, len(jobs) + 1))

    def one(job: tuple[Arm, int]) -> None:
        arm, seed = job
        run_dir = out / "arms" / arm.name / f"seed{seed}"
        if plan.jobs > 1 and not _finished(base, arm, seed, run_dir):
            rec = _run_arm_subprocess(base, arm, seed, run_dir, out / "logs")
        else:
            rec = run_arm(base, arm, seed, run_dir)
        state = "done earlier" if rec.get("skipped") else f"{rec['seconds']:.0f} s"
        console.print(f"[{next(counter)}/{len(jobs)}] {arm.name} seed {seed}: {state}  "
                      f"({time.perf_counter() - t0:.0f} s so far)")

    with ThreadPoolExecutor(max_workers=max(1, plan.jobs)) as pool:
        list(pool.map(one, jobs))
    from photon.bench.claims_report import Results, write_report

    results = Results(base, plan, arms, out)
    path = write_report(results, ddp, out, command)
    console.print(f"wrote {path} and plots in {out} ({time.perf_counter() - t0:.0f} s)")
    return path


if __name__ == "__main__":
    # One arm in its own process (started by run_claims): BASE_CONFIG_JSON ARM_JSON SEED RUN_DIR.
    _base, _arm, _seed, _dir = sys.argv[1:5]
    _a = json.loads(_arm)
    run_arm(build_config(json.loads(_base)), Arm(**{**_a, "overrides": tuple(_a["overrides"])}), int(_seed),
            Path(_dir))
