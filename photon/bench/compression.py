"""`photon bench compression`: how few bytes Photon can send for a given perplexity, codec by codec.

On the `tiny` preset with K = 4 by-domain clients, every arm trains the same tokens (`--steps` global steps:
100 rounds at H = 64 by default) at H ∈ {64, 256, 512}, with one way of moving updates, each on the up-link
only and both ways (the server's outer update compressed the same way, with its own error feedback where the
arm has it): fp32, int8, 2-bit (the 4-level codebook), 2-bit + error feedback (decayed, β = 0.95), top-k 1/64 +
2-bit + error feedback with the plain mean and a re-sparsified down-link, and SparseLoCo's recipe
(`federation.compression.recipe=sparseloco`: the contributor mean, the replies as the down-link; one variant,
both ways by construction). The aggregation is the paper's plain mean (the recipe's own for SparseLoCo), no
update screen. Kept client state is not uploaded (`state_backup=false`), so the bytes are exactly what the
algorithm sends. Reported per arm: bytes per training token (all, and in steady state: after the first round,
whose download is the initial model), the steady-state ratio against fp32 ring all-reduce data-parallel at the
same n, final perplexity and its cost against fp32 Photon at the same H and against fp32 Photon at its best H
(same seed, same tokens), and the codec time on a round's critical path (one client's encode, clients encoding
in parallel, plus the decode of the last reply, the others overlapping its wait; both ways also the server's
encode and a node's decode or rebuild) against the round's compute. Stored in docs/results/compression.json
with a Pareto plot (docs/img/compression.png) that marks the anchors' operating points. Resumable.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from photon.bench.results import LoadSampler, finished_arm, plots_dir, publish
from photon.config import RunConfig, build_config, config_to_dict, with_overrides
from photon.runlog import read_metrics
from photon.train.evaluate import perplexity

PLOT = Path("docs/img/compression.png")
EF = ("error_feedback=true", "error_feedback_decay=0.95")
SPARSELOCO = "SparseLoCo"
CODECS: dict[str, tuple[str, ...]] = {  # arm name -> codec settings (applied to up, and down for "both ways")
    "fp32": (),
    "int8": ("codec=int8",),
    "2bit": ("codec=2bit", "two_bit=codebook"),
    "2bit + EF": ("codec=2bit", "two_bit=codebook", *EF),
    "top-k 1/64 + 2bit + EF": ("codec=topk", "density=0.015625", "values=2bit", "two_bit=codebook", *EF),
    SPARSELOCO: (),  # the recipe: `federation.compression.recipe=sparseloco`, both ways by construction
}
HEADLINE = ("fp32", "2bit", SPARSELOCO)  # arms with every seed (the rest: seed 0)
# Anchors' operating points as compression against fp32 data-parallel (their papers, their scales): INTELLECT-1
# (int8 all-reduce of DiLoCo pseudo-gradients every 100 steps) ≈ 400×; Streaming DiLoCo (FP4, H = 100) ≈ 400×;
# SparseLoCo (> 97× per synchronisation, every H = 30 steps) ≈ 97 × 30.
ANCHOR_POINTS = {"INTELLECT-1 ≈400×": 400, "Streaming DiLoCo ≈400×": 400, "SparseLoCo ≈2,900×": 97 * 30}
ANCHORS = ("INTELLECT-1: int8 all-reduce of DiLoCo pseudo-gradients, ≈400× less than data-parallel; "
           "SparseLoCo: top-k 1–3% + 2-bit + error feedback, > 97× per synchronisation, better than dense DiLoCo; "
           "Streaming DiLoCo: FP4 (E3M0) outer gradients, ≈400× fewer bits with overlap; DeMo: DCT + top-k, ≈85× "
           "less than AdamW data-parallel.")


def arms(hs: tuple[int, ...], seeds: int) -> list[dict[str, Any]]:
    out = []
    for h in hs:
        for name, settings in CODECS.items():
            for both in ((False,) if name == "fp32" else (True,) if name == SPARSELOCO else (False, True)):
                for seed in range(seeds if name in HEADLINE else 1):
                    out.append({"codec": name, "both": both, "h": h, "seed": seed, "settings": list(settings)})
    return out


def arm_config(base: RunConfig, arm: dict[str, Any], steps: int) -> RunConfig:
    """`steps` global steps at the arm's H (equal tokens), evaluated 8 times over the run."""
    rounds = steps // arm["h"]
    sets = [f"federation.local_steps={arm['h']}", f"federation.rounds={rounds}", f"train.seed={arm['seed']}",
            "federation.state_backup=false", f"federation.eval_every={max(1, rounds // 8)}",
            f"train.warmup_steps={max(1, steps // 10)}", "federation.aggregation=mean", "federation.min_cosine=null"]
    return with_overrides(base, sets + codec_overrides(arm["codec"], arm["both"]))


def codec_overrides(name: str, both: bool) -> list[str]:
    """The overrides that make arm `name` move its updates (up only, or both ways)."""
    if name == SPARSELOCO:
        return ["federation.compression.recipe=sparseloco"]
    return [f"federation.compression.{way}.{s}" for way in (("up", "down") if both else ("up",))
            for s in CODECS[name]]


def arm_dir(out: Path, arm: dict[str, Any]) -> Path:
    slug = arm["codec"].replace(" ", "").replace("%", "pct").replace("+", "-")
    return out / f"h{arm['h']}" / f"{slug}-{'both' if arm['both'] else 'up'}" / f"seed{arm['seed']}"


def run_arm(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """One arm in this process (the CLI runs each in its own process, two at a time)."""
    from photon.federation.runner import run_federation
    from photon.federation.worker import ClientWorker
    from photon.transport.inprocess import InProcessTransport

    if not finished(cfg, run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
        transport = InProcessTransport(ClientWorker(run_dir / "node-cache"), cfg.federation.clients_per_round)
        run_federation(cfg, run_dir, transport, console=Console(quiet=True))
        (run_dir / "done.json").write_text(json.dumps({"config": config_to_dict(cfg)}))
    return arm_result(run_dir)


def finished(cfg: RunConfig, run_dir: Path) -> bool:
    return finished_arm(run_dir, config_to_dict(cfg)) is not None


def arm_result(run_dir: Path) -> dict[str, Any]:
    """A finished arm's measures, derived from its metrics. Steady state leaves out the first round, whose
    download is the initial model (sent once, whatever the method; data-parallel needs it too)."""
    rows = read_metrics(run_dir)
    rounds = [r for r in rows if r["kind"] == "round"]
    evals = [r for r in rows if r["kind"] == "eval"]
    later = rounds[1:] or rounds
    return {"final_ppl": perplexity(evals[-1]["loss/overall"]), "final_bpb": evals[-1].get("bpb/overall"),
            "tokens": sum(r["tokens"] for r in rounds),
            "rounds": len(rounds), "bytes_up": sum(r["bytes_up"] for r in rounds),
            "bytes_down": sum(r["bytes_down"] for r in rounds),
            "steady_bytes": sum(r["bytes_up"] + r["bytes_down"] for r in later),
            "steady_tokens": sum(r["tokens"] for r in later),
            "train_seconds_per_round": statistics.mean(r["critical_train_seconds"] for r in rounds),
            "curve": [[e["tokens"], perplexity(e["loss/overall"])] for e in evals]}


def codec_seconds(cfg: RunConfig, name: str, repeats: int = 3) -> dict[str, float]:
    """Encode and decode seconds of one update of the model's shape under arm `name` (best of `repeats`); for
    SparseLoCo also a node's rebuild of the new model from K replies (`rebuild`)."""
    from photon.federation import codec
    from photon.federation.compressed_updates import client_message, rebuild_from_replies, replies_payload
    from photon.model.transformer import Transformer, unique_state_dict

    ccfg = with_overrides(cfg, codec_overrides(name, both=False)).federation.compression.up
    g = torch.Generator().manual_seed(0)
    update = {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in unique_state_dict(Transformer(cfg.model)).items()}
    residual = {f"ef/{k}": torch.zeros_like(v) for k, v in update.items()} if ccfg.error_feedback else None
    layout = codec.layout_of(update)
    torch.set_num_threads(cfg.train.threads or 1)  # as the arms train: one thread each
    best = {"encode": float("inf"), "decode": float("inf")}
    for _ in range(repeats):
        t0 = time.perf_counter()
        payload, _ = client_message(update, residual, ccfg, seed=0)
        t1 = time.perf_counter()
        codec.decode(payload, layout)
        t2 = time.perf_counter()
        best = {"encode": min(best["encode"], t1 - t0), "decode": min(best["decode"], t2 - t1)}
        if name == SPARSELOCO:
            k = cfg.federation.clients_per_round
            t3 = time.perf_counter()
            rebuild_from_replies(update, replies_payload([payload] * k, 1.0), layout)
            best["rebuild"] = min(best.get("rebuild", float("inf")), time.perf_counter() - t3)
    return best


def _run_in_subprocess(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    if finished(cfg, run_dir):
        return arm_result(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        code = subprocess.run([sys.executable, "-m", "photon.bench.compression", json.dumps(config_to_dict(cfg)),
                               str(run_dir)], stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"compression arm {run_dir} failed (exit {code}); see {run_dir}.log")
    return arm_result(run_dir)


def run_compression_bench(cfg: RunConfig, out: Path, hs: tuple[int, ...] = (64, 256, 512), seeds: int = 2,
                          jobs: int = 2, console: Console | None = None, steps: int = 6400,
                          codecs: tuple[str, ...] | None = None) -> dict[str, Any]:
    from photon.bench.federation import data_parallel_bytes_per_token
    from photon.federation.protocol import tensor_bytes
    from photon.model.transformer import Transformer, unique_state_dict

    console = console or Console()
    base = with_overrides(cfg, ["data.partition.num_clients=4", "federation.clients_per_round=4",
                                "federation.num_nodes=4", "train.threads=1"])
    plan = [a for a in arms(hs, seeds) if codecs is None or a["codec"] in codecs]
    started = time.time()
    with LoadSampler() as load:
        def one(arm: dict[str, Any]) -> dict[str, Any]:
            acfg = arm_config(base, arm, steps)
            result = _run_in_subprocess(acfg, arm_dir(out, arm))
            console.print(f"{arm['codec']:>22s} {'both' if arm['both'] else 'up  '} H={arm['h']:<3d} seed "
                          f"{arm['seed']}: ppl {result['final_ppl']:.1f}")
            return {**arm, **result}

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            rows = list(pool.map(one, plan))
        timings = {name: codec_seconds(base, name) for name in CODECS if codecs is None or name in codecs}
    model_bytes = tensor_bytes(unique_state_dict(Transformer(base.model)))
    t, k = base.train, base.federation.clients_per_round
    data = {"preset": cfg.name, "k": k, "hs": list(hs), "seeds": seeds, "steps": steps, "batch": t.batch_size,
            "seq_len": t.seq_len,
            "model_bytes": model_bytes, "dp_bytes_per_token": data_parallel_bytes_per_token(model_bytes, k,
                                                                                             t.batch_size, t.seq_len),
            "rows": rows, "codec_seconds": timings}
    drawn = plots_dir() / PLOT.name
    plot(data, drawn)
    publish("compression", data, render, load, started, console, f"; plot {drawn}")
    return data


def summarize(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (H, codec, direction): means over seeds and the derived measures."""
    out = []
    fp32 = {h: {r["seed"]: r["final_ppl"] for r in data["rows"] if r["h"] == h and r["codec"] == "fp32"}
            for h in data["hs"]}
    means = {h: statistics.mean(v.values()) for h, v in fp32.items() if v}
    best_h = min(means, key=means.get) if means else None
    names = list(dict.fromkeys([*CODECS, *(r["codec"] for r in data["rows"])]))  # an older record's arms too
    for h in data["hs"]:
        ref = fp32[h]
        for name in names:
            for both in (False, True):
                rows = [r for r in data["rows"] if r["h"] == h and r["codec"] == name and r["both"] == both]
                if not rows:
                    continue
                bpt = statistics.mean((r["bytes_up"] + r["bytes_down"]) / r["tokens"] for r in rows)
                steady = statistics.mean(r["steady_bytes"] / r["steady_tokens"] for r in rows)
                cost = statistics.mean(r["final_ppl"] / ref[r["seed"]] for r in rows) - 1 if all(
                    r["seed"] in ref for r in rows) else None  # against the same seed
                best = fp32.get(best_h, {})
                cost_best = statistics.mean(r["final_ppl"] / best[r["seed"]] for r in rows) - 1 if all(
                    r["seed"] in best for r in rows) else None
                ppl = statistics.mean(r["final_ppl"] for r in rows)
                bpbs = [r.get("final_bpb") for r in rows]
                bpb = statistics.mean(bpbs) if None not in bpbs else None  # older records lack it
                spread = (max(r["final_ppl"] for r in rows) - min(r["final_ppl"] for r in rows)) / 2
                secs = data["codec_seconds"][name]
                per_round = secs["encode"] + secs["decode"]  # clients encode at once; decodes overlap the wait
                if both:
                    per_round += secs["rebuild"] if name == SPARSELOCO else secs["encode"] + secs["decode"]
                train = statistics.mean(r["train_seconds_per_round"] for r in rows)
                out.append({"h": h, "codec": name, "both": both, "seeds": len(rows), "bytes_per_token": bpt,
                            "steady_bytes_per_token": steady, "vs_dp": data["dp_bytes_per_token"] / steady,
                            "ppl": ppl, "bpb": bpb, "spread": spread, "cost": cost, "cost_best": cost_best,
                            "best_h": best_h,
                            "codec_s": per_round,
                            "codec_share": per_round / train})
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2%}"


def render(data: dict[str, Any]) -> str:
    rows = summarize(data)
    tokens = statistics.mean(r["tokens"] for r in data["rows"])
    best_h = rows[0]["best_h"] if rows else None
    lines = [f"Preset `{data['preset']}`, K = {data['k']} by-domain clients, batch {data['batch']}×{data['seq_len']}, "
             f"{tokens / 1e6:.2f}M training tokens per arm ({data.get('steps', '?')} global steps at every H); fp32 "
             f"data-parallel (ring all-reduce, n = {data['k']}) sends {data['dp_bytes_per_token']:,.1f} bytes per "
             "training token. Bytes per token: everything sent over the run (all), and in steady state (after the "
             "first round, whose download is the initial model, sent once whatever the method); the ratio to "
             "data-parallel uses the steady state. Cost = final perplexity over fp32 Photon's at the same seed, minus "
             f"1: at the same H, and at fp32's best H (H = {best_h}), averaged over the arm's seeds (ppl ± half the "
             "seed range where there are several). Codec time: the round's critical path (one client's encode, "
             "clients encoding at once, and the decode of the last reply; both ways also the server's encode and a "
             "node's decode, or SparseLoCo's rebuild from the K replies), measured on an update of the model's "
             "shape, over the round's measured compute.", "",
             "| H | codec | direction | seeds | bytes / token (all) | steady state | × fewer than DP | final ppl "
             "| bits/byte | cost (same H) | cost (best-H fp32) | codec s / round | of compute |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = f" ± {r['spread']:.1f}" if r["seeds"] > 1 else ""
        bpb = "-" if r["bpb"] is None else f"{r['bpb']:.3f}"
        lines.append(f"| {r['h']} | {r['codec']} | {'both ways' if r['both'] else 'up only'} | {r['seeds']} | "
                     f"{r['bytes_per_token']:,.2f} | {r['steady_bytes_per_token']:,.3f} | {r['vs_dp']:,.0f}× | "
                     f"{r['ppl']:,.1f}{spread} | {bpb} | "
                     f"{_pct(r['cost'])} | {_pct(r['cost_best'])} | {r['codec_s']:.3f} | "
                     f"{r['codec_share']:.2%} |")
    lines += ["", "Goals:", *_goals(rows), "", f"Anchors (their papers, other scales): {ANCHORS}", "",
              f"![perplexity against bytes per token]({PLOT.relative_to('docs')})"]
    return "\n".join(lines)


def _goals(rows: list[dict[str, Any]]) -> list[str]:
    within = [r for r in rows if r["cost_best"] is not None and r["cost_best"] <= 0.02]
    top = max(within, key=lambda r: r["vs_dp"]) if within else None
    sparse = [r for r in rows if r["codec"] == SPARSELOCO and r["cost_best"] is not None]
    best_sparse = min(sparse, key=lambda r: r["cost_best"]) if sparse else None
    worst_share = max(r["codec_share"] for r in rows) if rows else 0.0
    if top:
        where = f"{top['codec']}, {'both ways' if top['both'] else 'up only'}, H = {top['h']}"
        headline = (f"best {top['vs_dp']:,.0f}× ({where}, {top['cost_best']:+.2%}, {top['seeds']} seed(s)), "
                    f"{'met' if top['vs_dp'] >= 5000 else 'NOT met'}")
    else:
        headline = "no arm within 2%: NOT met"
    return ["- ≥ 5,000× fewer bytes per token than fp32 data-parallel at ≤ 2% perplexity cost against fp32 Photon "
            "at its best H: " + headline,
            "- SparseLoCo's recipe within 2% of that baseline: " + (
                f"best {best_sparse['cost_best']:+.2%} at H = {best_sparse['h']} ({best_sparse['vs_dp']:,.0f}× fewer "
                f"bytes than DP), {'met' if best_sparse['cost_best'] <= 0.02 else 'NOT met'}" if best_sparse else
                "not measured"),
            f"- codec time ≤ 2% of round time on the critical path: worst {worst_share:.2%}, "
            f"{'met' if worst_share <= 0.02 else 'NOT met'}"]


def render_brief(data: dict[str, Any]) -> str:
    """The README's summary: the goals against the measurement, and the Pareto plot."""
    rows = summarize(data)
    tokens = statistics.mean(r["tokens"] for r in data["rows"])
    hs = ", ".join(str(h) for h in data["hs"])
    return "\n".join([f"`photon bench compression` on preset `{data['preset']}` (K = {data['k']} by-domain clients, "
                      f"H ∈ {{{hs}}}, {tokens / 1e6:.2f}M training tokens per arm; "
                      "every arm's bytes, perplexity and codec time in docs/RESULTS.md):", "", *_goals(rows), "",
                      f"![perplexity against bytes per token]({PLOT})"])


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data["hs"]), figsize=(6 * len(data["hs"]), 4.2), squeeze=False)
    names = list(CODECS)
    for ax, h in zip(axes[0], data["hs"]):
        for r in summarize(data):
            if r["h"] != h:
                continue
            marker = "o" if r["both"] else "^"
            ax.scatter(r["steady_bytes_per_token"], r["ppl"], marker=marker,
                       color=f"C{names.index(r['codec']) if r['codec'] in names else 9}",
                       label=f"{r['codec']} ({'both' if r['both'] else 'up'})")
        for i, (label, ratio) in enumerate(ANCHOR_POINTS.items()):
            ax.axvline(data["dp_bytes_per_token"] / ratio, color="grey", ls=("--", "-.", ":")[i % 3], lw=0.8,
                       label=f"{label} (of DP)")
        ax.axvline(data["dp_bytes_per_token"] / 5000, color="black", ls=":", label="goal: 5,000× below DP")
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent per training token (steady state)")
        ax.set_ylabel("final validation perplexity")
        ax.set_title(f"H = {h}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # one arm in its own process: CONFIG_JSON RUN_DIR
    run_arm(build_config(json.loads(sys.argv[1])), Path(sys.argv[2]))
