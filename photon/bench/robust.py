"""`photon bench robust`: one of four clients sends scaled noise every round; how do the defences fare?

Arms (same seed, data, model, budget): a clean run; the plain mean with every defence off; the plain mean
with the default norm check; coordinate-wise median; trimmed mean; norm clipping. Reported: validation
perplexity before and after, and how many updates were rejected.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from photon.config import RunConfig, build_config, config_to_dict
from photon.federation.inprocess import InProcessTransport
from photon.federation.runner import run_federation
from photon.federation.worker import ClientWorker
from photon.runlog import read_metrics
from photon.train.evaluate import perplexity

NO_CHECK = {"max_norm_ratio": None}
ARMS: dict[str, dict[str, Any]] = {
    "clean (no noisy client)": {**NO_CHECK, "noisy": False},
    "mean, no defence": {**NO_CHECK},
    "mean + norm check (default)": {},
    "median": {**NO_CHECK, "aggregation": "median"},
    "trimmed mean (25%)": {**NO_CHECK, "aggregation": "trimmed-mean", "trim_fraction": 0.25},
    "mean + norm clipping": {**NO_CHECK, "clip_update_norm": 1.0},  # about a clean update's norm per round
}


def arm_config(cfg: RunConfig, arm: dict[str, Any], noisy_client: int, noise_scale: float) -> RunConfig:
    tree = config_to_dict(cfg)
    fed = tree["federation"]
    fed["min_replies"] = 1  # a round with the noisy client rejected must still commit
    for key, value in arm.items():
        if key != "noisy":
            fed[key] = value
    if arm.get("noisy", True):
        fed["faults"] = {**fed["faults"], "noise_clients": [noisy_client], "noise_scale": noise_scale}
    return build_config(tree)


def run_robust_bench(cfg: RunConfig, out: Path, noise_scale: float = 0.5, console: Console | None = None
                     ) -> dict[str, dict[str, float]]:
    console = console or Console()
    results = {}
    for name, arm in ARMS.items():
        run_dir = out / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        shutil.rmtree(run_dir, ignore_errors=True)
        acfg = arm_config(cfg, arm, noisy_client=cfg.data.partition.num_clients - 1, noise_scale=noise_scale)
        console.print(f"[bold]{name}[/]")
        run_federation(acfg, run_dir, InProcessTransport(ClientWorker(run_dir / "node"), 1), console=Console(quiet=True))
        rows = read_metrics(run_dir)
        evals = [r for r in rows if r["kind"] == "eval"]
        rejected = sum(r["failed"] for r in rows if r["kind"] == "round")
        results[name] = {"ppl_before": perplexity(evals[0]["loss/overall"]),
                         "ppl_after": perplexity(evals[-1]["loss/overall"]), "rejected": rejected}
    table = Table(title=f"robustness: client {cfg.data.partition.num_clients - 1} of "
                        f"{cfg.data.partition.num_clients} sends θ + N(0, {noise_scale}²) every round "
                        f"({cfg.name}, {cfg.federation.rounds} rounds, H={cfg.federation.local_steps})")
    for col in ("arm", "ppl before", "ppl after", "rejected updates"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for name, r in results.items():
        table.add_row(name, f"{r['ppl_before']:.1f}", f"{r['ppl_after']:.1f}", str(r["rejected"]))
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "robust-bench.json").write_text(json.dumps(results, indent=1))
    return results
