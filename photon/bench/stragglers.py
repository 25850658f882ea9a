"""`photon bench stragglers`: what each way of running rounds costs under the faults of real machines, timed to a
target on the in-process engine's virtual clock.

K = 4 of N = 8 clients on 4 nodes. Faults, in every arm but the clean one, belong to the nodes and are drawn
once per node from the seed, so every arm of a seed faces the same machines: one node in four trains 3×
slower (whichever client it trains), each node's link loses 10% of the replies (a fixed trace of the node and
the instant, `faults.drop_trace: link`), and one of the other nodes is down for the middle third of the clean
run's virtual duration, then returns. Nodes keep their replies, and a lost one is asked for again.

Arms: clean sync (no faults; it sets the target); sync waiting for all (a dead node's task is retried elsewhere,
a lost reply asked for again); sync with a fixed deadline (2× a nominal task) and with the adaptive one;
async with normalized staleness weights, with FedBuff's summed ones, with those and dynamic local steps (a slow
node's tasks shortened to its speed, as Async Local-SGD does), and with those folding every reply that arrived
with the quorum's last (how async runs by default); then that default arm with no fault and with each fault
alone, so the record says what each fault costs and what asynchrony costs by itself. Every arm trains until
the mean loss of its last 3 evaluations reaches clean sync's (per seed, ≥ 32 evaluation batches per domain)
or it has folded 3× clean's tokens, on one LR schedule of clean's length in outer steps (later steps train on
its floor). Training is real; time is virtual (H × `virtual_clock.step_seconds` per task at speed 1), so runs
are deterministic and nothing waits. The update screen is off in every arm (a plain weighted mean).

Reported per arm: virtual time to the target per seed and the median; perplexity at clean's tokens; goodput =
folded training time / steady-state node-time (node-time while up, less the end-of-run tail), with where the
rest went (lost, cancelled, refused, died with its node, idle, transfer, tail); the realised reply loss.
Resumable: a finished arm is skipped when the command is run again.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
import statistics
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console

from photon.bench.results import LoadSampler, finished_arm, plots_dir, publish
from photon.config import RunConfig, build_config, config_to_dict, with_overrides
from photon.federation.faults import slow_nodes
from photon.federation.runner import TARGET_WINDOW, run_federation
from photon.federation.worker import ClientWorker
from photon.runlog import read_metrics
from photon.train.evaluate import perplexity
from photon.transport.virtual_clock import VirtualClockTransport

CLEAN, WAIT_ALL = "clean sync", "sync, waits for all"
FIXED, ADAPTIVE = "sync, fixed deadline", "sync, adaptive deadline"
ASYNC_NORMALIZED, ASYNC_SUMMED = "async, normalized weights", "async, FedBuff weights"
ASYNC_DYNAMIC = "async, FedBuff weights, dynamic local steps"
ASYNC_TOGETHER = "async, FedBuff weights, dynamic local steps, folds what arrived together"
ARMS = (CLEAN, WAIT_ALL, FIXED, ADAPTIVE, ASYNC_NORMALIZED, ASYNC_SUMMED, ASYNC_DYNAMIC, ASYNC_TOGETHER)
DEFAULT_ASYNC = ASYNC_TOGETHER  # the arm run as `federation.mode=async` runs by default: the goals are its
# The default async arm under one fault at a time (and none): what each fault costs, and what async costs alone
FAULTS = ("slow", "loss", "outage")
ASYNC_NO_FAULTS = "async (default), no faults"
FAULT_ARMS = {ASYNC_NO_FAULTS: (), "async (default), the slow node only": ("slow",),
              "async (default), lost replies only": ("loss",), "async (default), the outage only": ("outage",)}
PLOT = Path("docs/img/stragglers.png")
TOKENS_CAP = 3      # an arm that has not reached the target by this multiple of clean's tokens stops
EVAL_BATCHES = 32   # per domain: a target within a few percent needs evaluations quieter than the default's
EVAL_EVERY = 2      # outer steps between evaluations (they cost about as much as the training between them)
# where node-time went, in the order the table shows
WASTE = ("lost", "cancelled", "refused", "died", "idle", "transfer")
SLOW_FRACTION, SLOW_FACTOR = 0.25, 3  # one node in four trains 3× slower

# K = 4 of N = 8 clients on 4 nodes (`photon bench async` runs in the same setting)
SETTING = ("data.partition.num_clients=8", "federation.clients_per_round=4", "federation.num_nodes=4")
# the command's defaults, before the user's --set: a task of 32 steps, 32 clean rounds (about 20 training tokens
# per non-embedding parameter on `tiny`), one thread per run (a seed's result does not depend on --jobs)
DEFAULTS = ("federation.local_steps=32", "federation.rounds=32", "train.threads=1")


def clean_tokens(cfg: RunConfig) -> int:
    """The training tokens clean sync folds in `federation.rounds` rounds: the budget of equal-token comparisons."""
    fed, t = cfg.federation, cfg.train
    return fed.rounds * fed.clients_per_round * fed.local_steps * t.batch_size * t.seq_len


def common_overrides(cfg: RunConfig, seed: int, rounds_cap: int) -> list[str]:
    """What every arm of a fault benchmark shares: the seed, clean's LR schedule, rounds that never commit short
    of one reply, and a plain weighted mean with no screen (as in the claims benchmark: these benchmarks measure
    timing and losses; `photon bench robust` measures the aggregation rule). Runs stop on tokens or a target,
    long before `rounds_cap`."""
    return [f"train.seed={seed}", f"federation.schedule_rounds={cfg.federation.rounds}",
            "federation.min_replies=1", f"federation.rounds={rounds_cap}", "federation.aggregation=mean",
            "federation.max_norm_ratio=null", "federation.min_cosine=null"]


def outage_node(cfg: RunConfig, seed: int) -> int:
    """The node that goes down: the first that is not the slow one (two faults on one machine would hide one)."""
    faults = with_overrides(cfg, node_faults(seed, None)).federation.faults
    return min(set(range(cfg.federation.num_nodes)) - slow_nodes(faults, cfg.federation.num_nodes))


def node_faults(seed: int, outage: tuple[int, float, float] | None, kinds: tuple[str, ...] = FAULTS) -> list[str]:
    """The fault overrides of `kinds` (of `FAULTS`), drawn from `seed`: each kind on the same nodes and instants
    whichever others are on."""
    faults = [f"federation.faults.seed={seed}"]
    if "slow" in kinds:
        faults += [f"federation.faults.slow_node_fraction={SLOW_FRACTION}",
                   f"federation.faults.slow_factor={SLOW_FACTOR}"]
    if "loss" in kinds:
        faults += ["federation.faults.drop_probability=0.1", "federation.faults.drop_trace=link"]
    if outage is not None and "outage" in kinds:
        node, start, end = outage
        faults.append(f"federation.faults.outage={{{node}: [{start:.6g}, {end:.6g}]}}")
    return faults


def arm_overrides(arm: str, cfg: RunConfig, seed: int, clean_clock: float | None = None) -> list[str]:
    """The overrides of `arm` for `seed`; `clean_clock`, the clean run's virtual duration, places the outage."""
    fed = cfg.federation
    nominal = fed.local_steps * fed.virtual_clock.step_seconds  # one task at speed 1
    common = common_overrides(cfg, seed, rounds_cap=TOKENS_CAP * 4 * fed.rounds) + [
        f"federation.eval_every={EVAL_EVERY}", f"train.eval_batches={max(EVAL_BATCHES, cfg.train.eval_batches)}"]
    if arm == CLEAN:
        return common + [f"federation.round_timeout_s={4 * nominal}"]
    if clean_clock is None:
        raise ValueError("the faulty arms need the clean run's virtual duration to place the outage")
    faults = node_faults(seed, (outage_node(cfg, seed), clean_clock / 3, 2 * clean_clock / 3),
                         FAULT_ARMS.get(arm, FAULTS))
    if arm in FAULT_ARMS:
        arm = DEFAULT_ASYNC
    if arm == WAIT_ALL:  # a backstop only: a dead node's task fails when the node does, and is retried
        return common + faults + [f"federation.round_timeout_s={20 * nominal}"]
    if arm == FIXED:
        return common + faults + [f"federation.round_timeout_s={2 * nominal}"]
    if arm == ADAPTIVE:
        return common + faults + ["federation.deadline=adaptive", f"federation.round_timeout_s={4 * nominal}"]
    weighting = "normalized" if arm == ASYNC_NORMALIZED else "summed"
    dynamic, together = arm in (ASYNC_DYNAMIC, ASYNC_TOGETHER), arm == ASYNC_TOGETHER
    return common + faults + ["federation.mode=async", f"federation.asynchronous.weighting={weighting}",
                              f"federation.round_timeout_s={4 * nominal}",
                              f"federation.asynchronous.dynamic_local_steps={str(dynamic).lower()}",
                              f"federation.asynchronous.fold_arrived_together={str(together).lower()}"]


def node_time(transport: VirtualClockTransport, folded: set[str], cfg: RunConfig) -> dict[str, float]:
    """Where the nodes' time went, in node-seconds, from the clock's task records and the folded task ids:
    `up` (node-time while up, to the run's end), `folded` (training that was folded), `lost` (training whose
    reply never arrived), `cancelled` (training the server gave up on), `refused` (a reply that arrived but was
    not folded: too stale, late), `died` (training cut short by its node's outage), `tail` (work under way when
    the run ended), `transfer` (moving messages), `idle` (up and doing nothing)."""
    end = transport.now
    out = dict.fromkeys(("up", "folded", "tail", *WASTE), 0.0)
    for node in range(len(transport.free_at)):
        down = cfg.federation.faults.outage.get(node)
        out["up"] += end - (max(0.0, min(end, down[1]) - min(end, down[0])) if down else 0.0)
    busy = 0.0
    for record in transport.records.values():
        span = max(0.0, min(record.done, end) - record.start)
        busy += span
        if record.done > end:
            out["tail"] += span
            continue
        out["transfer"] += span - record.compute
        if record.fate == "died":
            out["died"] += record.compute
        elif record.fate == "cancelled":
            out["cancelled"] += record.compute
        elif record.task_id in folded:
            out["folded"] += record.compute
        elif record.fate == "lost":
            out["lost"] += record.compute
        else:
            out["refused"] += record.compute
    out["idle"] = out["up"] - busy
    return out


def run_arm(cfg: RunConfig, run_dir: Path, budget: int, target_loss: float | None = None) -> dict[str, Any]:
    """One arm, or its stored outcome if it already finished with this config: trained until `budget` tokens,
    or, with `target_loss`, until the target or `TOKENS_CAP` × `budget` tokens."""
    stored = finished_arm(run_dir, config_to_dict(cfg))
    if stored is not None and stored.get("target_loss") == target_loss:
        return stored["result"]
    shutil.rmtree(run_dir, ignore_errors=True)
    transport = VirtualClockTransport(ClientWorker(run_dir / "node-cache"), cfg.federation.num_nodes)
    started = time.perf_counter()
    run_federation(cfg, run_dir, transport, console=Console(quiet=True), target_loss=target_loss,
                   token_budget=budget if target_loss is None else TOKENS_CAP * budget)
    rows = read_metrics(run_dir)
    evals = [r for r in rows if r["kind"] == "eval"]
    rounds = [r for r in rows if r["kind"] == "round"]
    folded = {t for r in rounds for t in r["folded"]}
    times = node_time(transport, folded, cfg)
    steady = times["up"] - times["tail"]
    replies = [r for r in transport.records.values() if r.fate in ("delivered", "lost")]
    result = {
        "evals": [[e["clock"], e["tokens"], e["loss/overall"]] for e in evals],
        "curve": [[e["clock"], perplexity(e["loss/overall"]), e["tokens"]] for e in evals],
        "final_ppl": perplexity(evals[-1]["loss/overall"]), "final_bpb": evals[-1].get("bpb/overall"),
        "damping": statistics.mean(r.get("damping", 1.0) for r in rounds), "clock": transport.now,
        "rounds": len(rounds), "tokens": sum(r["tokens"] for r in rounds),
        "goodput": times["folded"] / steady if steady > 0 else 0.0, "node_time": times,
        "loss_rate": sum(r.fate == "lost" for r in replies) / len(replies) if replies else 0.0,
        "dropped": sum(r["dropped"] for r in rounds) / max(1, sum(r["dropped"] + r["ok"] for r in rounds)),
        "staleness": dict(Counter(str(s) for r in rounds for s in r["folded"].values())),
        "tasks": len(transport.records), "folded": len(folded), "seconds": time.perf_counter() - started,
    }
    (run_dir / "done.json").write_text(json.dumps({"config": config_to_dict(cfg), "target_loss": target_loss,
                                                   "result": result}))
    return result


def trailing(evals: list[list[float]]) -> list[tuple[float, float, float]]:
    """(clock, tokens, mean loss of the last `TARGET_WINDOW` evaluations) from the window's first full one."""
    return [(evals[i][0], evals[i][1], statistics.fmean(e[2] for e in evals[i - TARGET_WINDOW + 1: i + 1]))
            for i in range(TARGET_WINDOW - 1, len(evals))]


def capacity_bound(clean: dict[str, Any], nodes: int) -> float:
    """The earliest virtual time at which the faulty machines can have done the training clean sync folded to
    reach its target (its folded node-time, which grows evenly: equal nodes, no faults), were every second of
    theirs folded and no token worth less than in clean sync: the slow node at 1/`SLOW_FACTOR` speed, the
    outage node idle for the middle third of clean's duration. No arm can reach the target sooner. The
    capacity grows at `rate` node-seconds per second, one less during the outage: solved piece by piece."""
    reached = time_to(clean, target_of(clean))
    work = clean["node_time"]["folded"] * reached / clean["clock"]
    start, end = clean["clock"] / 3, 2 * clean["clock"] / 3
    slow = round(SLOW_FRACTION * nodes)
    rate = nodes - slow + slow / SLOW_FACTOR
    if work <= rate * start:  # done before the outage
        return work / rate
    if work <= rate * end - (end - start):  # done during it
        return start + (work - rate * start) / (rate - 1)
    return (work + end - start) / rate


def target_of(clean: dict[str, Any]) -> float:
    """The target loss a seed's arms are timed to: clean sync's mean over its last `TARGET_WINDOW` evaluations."""
    return trailing(clean["evals"])[-1][2]


def time_to(result: dict[str, Any], target: float) -> float | None:
    """Virtual time at which the run's trailing mean loss first reached `target` (None: never)."""
    return next((clock for clock, _, loss in trailing(result["evals"]) if loss <= target), None)


def loss_at_tokens(result: dict[str, Any], tokens: int) -> tuple[float, bool]:
    """The run's trailing mean loss at the first evaluation with at least `tokens` folded; a run that reached
    its target before that gives its last one (second value False)."""
    points = trailing(result["evals"])
    return next(((loss, True) for _, t, loss in points if t >= tokens), (points[-1][2], False))


def seed_runs(base: RunConfig, out: Path, seed: int, console: Console) -> dict[str, dict[str, Any]]:
    """Every arm of one seed: clean sync first (it sets the target and places the outage), then the others."""
    budget = clean_tokens(base)
    clean = run_arm(with_overrides(base, arm_overrides(CLEAN, base, seed)), out / f"seed{seed}" / "clean-sync", budget)
    runs = {CLEAN: clean}
    target = target_of(clean)
    console.print(f"seed {seed}: {CLEAN}: target ppl {math.exp(target):.2f} at {clean['clock']:,.0f} s")
    for arm in (*ARMS[1:], *FAULT_ARMS):
        acfg = with_overrides(base, arm_overrides(arm, base, seed, clean["clock"]))
        r = runs[arm] = run_arm(acfg, out / f"seed{seed}" / arm.replace(",", "").replace(" ", "-"), budget, target)
        reached = time_to(r, target)
        console.print(f"seed {seed}: {arm}: " + (f"target at {reached:,.0f} s" if reached is not None else
                                                 "target not reached") + f", goodput {r['goodput']:.1%}")
    return runs


def _seed_runs_in_process(base: dict[str, Any], out: str, seed: int) -> dict[str, dict[str, Any]]:
    return seed_runs(build_config(base), Path(out), seed, Console())


def run_stragglers_bench(cfg: RunConfig, out: Path, seeds: int = 4, console: Console | None = None,
                         results_dir: Path | None = None, jobs: int = 1) -> dict[str, Any]:
    """Every seed's arms (`jobs` seeds at once, each in its own process), then the record and the plot."""
    console = console or Console()
    base = with_overrides(cfg, list(SETTING))
    fed, t = base.federation, base.train
    started = time.time()
    with LoadSampler() as load:
        if jobs == 1:
            per_seed = [seed_runs(base, out, seed, console) for seed in range(seeds)]
        else:
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                per_seed = list(pool.map(_seed_runs_in_process, [config_to_dict(base)] * seeds,
                                         [str(out)] * seeds, range(seeds)))
    runs = {arm: [r[arm] for r in per_seed] for arm in (*ARMS, *FAULT_ARMS)}  # every arm: this command ran them
    data = {"preset": cfg.name, "clients": 8, "k": 4, "nodes": 4, "local_steps": fed.local_steps,
            "rounds": fed.rounds, "batch": t.batch_size, "seq_len": t.seq_len, "budget_tokens": clean_tokens(base),
            "seeds": seeds, "step_seconds": fed.virtual_clock.step_seconds, "tokens_cap": TOKENS_CAP,
            "eval_batches": max(EVAL_BATCHES, t.eval_batches), "eval_every": EVAL_EVERY, "runs": runs}
    data["summary"] = summarize(data)
    drawn = plots_dir(results_dir) / PLOT.name
    plot(data, drawn)
    publish("stragglers", data, render, load, started, console, f"; plot {drawn}", results_dir=results_dir)
    return data


def summarize(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    runs, budget = data["runs"], data["budget_tokens"]
    out: dict[str, dict[str, Any]] = {}
    for arm in _arms(runs, (*ARMS, *FAULT_ARMS)):
        per_seed = []
        for seed, r in enumerate(runs[arm]):
            target = target_of(runs[CLEAN][seed])
            loss, at_budget = loss_at_tokens(r, budget)
            per_seed.append({"time_to_target": time_to(r, target), "ppl_at_budget": math.exp(loss),
                             "cost": math.exp(loss - target) - 1, "at_budget": at_budget})
        times = [p["time_to_target"] for p in per_seed]
        reached = sorted(x for x in times if x is not None)
        # the median over seeds, counting a seed that never reached the target as the slowest
        median = (statistics.median([x if x is not None else math.inf for x in times])
                  if len(reached) * 2 > len(times) else None)
        node_times = {k: sum(r["node_time"][k] for r in runs[arm]) for k in runs[arm][0]["node_time"]}
        steady = node_times["up"] - node_times["tail"]
        staleness: Counter[str] = Counter()
        for r in runs[arm]:
            staleness.update(r["staleness"])
        out[arm] = {"time_to_target": times, "median_time": median if median != math.inf else None,
                    "reached": f"{len(reached)}/{len(times)}",
                    "cost": statistics.mean(p["cost"] for p in per_seed),
                    "ppl_at_budget": statistics.mean(p["ppl_at_budget"] for p in per_seed),
                    "all_at_budget": all(p["at_budget"] for p in per_seed),
                    "goodput": node_times["folded"] / steady if steady > 0 else 0.0,
                    "waste": {k: node_times[k] / steady if steady > 0 else 0.0 for k in WASTE},
                    "tail": node_times["tail"] / node_times["up"] if node_times["up"] else 0.0,
                    "loss_rate": statistics.mean(r["loss_rate"] for r in runs[arm]),
                    "dropped": statistics.mean(r["dropped"] for r in runs[arm]),
                    "tokens": statistics.mean(r["tokens"] for r in runs[arm]) / budget,
                    "staleness": dict(sorted(staleness.items(), key=lambda kv: int(kv[0])))}
    return out


def _arms(by_arm: dict[str, Any], arms: tuple[str, ...] = ARMS) -> list[str]:
    """Those of `arms` a record holds, in the table's order (a record from before an arm was added lacks it)."""
    return [arm for arm in arms if arm in by_arm]


def _speedup(s: dict[str, dict[str, Any]], slow: str, fast: str) -> float | None:
    a, b = s[slow]["median_time"], s[fast]["median_time"]
    return a / b if a and b else None


def render(data: dict[str, Any]) -> str:
    s = data["summary"]
    lines = [f"Preset `{data['preset']}`, K = {data['k']} of N = {data['clients']} by-domain clients on "
             f"{data['nodes']} nodes, H = {data['local_steps']}, batch {data['batch']}×{data['seq_len']}, "
             f"{data['seeds']} seeds. Faults of the nodes (not in clean sync): one node in four 3× slower, 10% of "
             "the replies lost on each node's link, and another node down for the middle third of clean's "
             "virtual duration; lost replies are asked for again. Target, per seed: clean sync's mean loss over "
             f"its last 3 evaluations ({data['eval_batches']} batches per domain each, one every "
             f"{data['eval_every']} outer steps) after {data['rounds']} "
             f"rounds ({data['budget_tokens']:,} tokens); each arm trains until its own 3-evaluation mean reaches "
             f"it or it has folded {data['tokens_cap']}× those tokens. Time is virtual: a task at speed 1 takes "
             f"H × {data['step_seconds']:g} s. The update screen is off in every arm (a plain weighted mean).", "",
             "| arm | virtual time to target (median; per seed) | ppl at clean's tokens | cost vs clean | "
             "tokens trained | goodput | replies lost | clients dropped | staleness of folded updates |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm in _arms(s):
        a = s[arm]
        median, seeds, stale = _cells(a)
        ppl = f"{a['ppl_at_budget']:,.2f}" + ("" if a["all_at_budget"] else " (a seed stopped sooner, at the target)")
        lines.append(f"| {arm} | {median} ({seeds}; reached {a['reached']}) | {ppl} | {a['cost']:+.2%} | "
                     f"{a['tokens']:.2f}× | {a['goodput']:.1%} | {a['loss_rate']:.1%} | {a['dropped']:.1%} | {stale} |")
    lines += ["", "Where the node-time went (share of steady-state node-time: time nodes were up, less the "
              "end-of-run tail; folded is the goodput):", "",
              "| arm | folded | lost | cancelled | refused (stale or late) | died with its node | idle | transfer | "
              "end-of-run tail (of all up-time) |", "|---|---|---|---|---|---|---|---|---|"]
    for arm in _arms(s):
        a = s[arm]
        lines.append(f"| {arm} | {a['goodput']:.1%} | " + " | ".join(f"{a['waste'][k]:.1%}" for k in WASTE) +
                     f" | {a['tail']:.1%} |")
    lines += _render_fault_costs(s)
    best_deadline = min((FIXED, ADAPTIVE), key=lambda arm: s[arm]["median_time"] or math.inf)
    default = DEFAULT_ASYNC if DEFAULT_ASYNC in s else ASYNC_SUMMED  # the default when an older record was made
    lines += ["", f"Goals ({default}, how async runs by default, under these faults):"]
    bound = statistics.median(capacity_bound(r, data["nodes"]) for r in data["runs"][CLEAN])
    for label, slow, want in (("sync waiting for all", WAIT_ALL, 1.5), (f"the best deadline arm ({best_deadline})",
                                                                        best_deadline, 2.0)):
        x = _speedup(s, slow, default)
        most = s[slow]["median_time"] / bound if s[slow]["median_time"] else None
        lines.append(f"- ≥ {want:g}× less virtual time to target than {label}: " +
                     (f"{x:.2f}×, {'met' if x >= want else 'NOT met'}" if x else
                      "not measurable (an arm did not reach the target in most seeds): NOT met") +
                     (f" (at most {most:.2f}× is possible: see the bound below)" if most else ""))
    a = s[default]
    lines += [f"- goodput ≥ 93%: {a['goodput']:.1%}, {'met' if a['goodput'] >= 0.93 else 'NOT met'}",
              f"- perplexity at equal tokens within 2% of clean sync: {a['cost']:+.2%}, "
              f"{'met' if a['cost'] <= 0.02 else 'NOT met'}",
              "", f"The bound: no arm can reach the target before {bound:,.0f} s (median over seeds), the time the "
              "faulty machines take to do the training clean sync folded (one node at a third of its speed, "
              "another down for a third of clean's duration), were every second of theirs folded at clean's "
              f"cost per token. {default} reaches it in {a['median_time'] / bound:.2f}× that time."
              if a["median_time"] else "",
              "", f"![perplexity against virtual wall time]({PLOT.relative_to('docs')})"]
    return "\n".join(lines)


def _cells(a: dict[str, Any]) -> tuple[str, str, str]:
    """An arm summary's median time to target, its per-seed times and its staleness counts, as table cells."""
    median = f"{a['median_time']:,.0f} s" if a["median_time"] is not None else "not reached"
    seeds = ", ".join("–" if x is None else f"{x:,.0f}" for x in a["time_to_target"])
    return median, seeds, ", ".join(f"{k}: {v}" for k, v in a["staleness"].items())


def _render_fault_costs(s: dict[str, dict[str, Any]]) -> list[str]:
    """The default async arm under each fault alone, beside all of them and none (absent from older records)."""
    arms = [*_arms(s, tuple(FAULT_ARMS)), *_arms(s, (DEFAULT_ASYNC,))]
    if ASYNC_NO_FAULTS not in s:
        return []
    lines = ["", f"What each fault costs: {DEFAULT_ASYNC} (async as it runs by default) with no fault, with one "
             "fault at a time (each on the same node and instants as in the arms above), and with all three:", "",
             "| faults | virtual time to target (median; per seed) | ppl at clean's tokens | cost vs clean | goodput | "
             "replies lost | staleness of folded updates |", "|---|---|---|---|---|---|---|"]
    for arm in arms:
        a = s[arm]
        label = "all three" if arm == DEFAULT_ASYNC else arm.split(", ", 1)[1]
        median, seeds, stale = _cells(a)
        lines.append(f"| {label} | {median} ({seeds}) | {a['ppl_at_budget']:,.2f} | {a['cost']:+.2%} | "
                     f"{a['goodput']:.1%} | {a['loss_rate']:.1%} | {stale} |")
    return lines


def render_brief(data: dict[str, Any]) -> str:
    """The README's view: each arm's median time to clean's loss, its cost per token and its goodput."""
    s = data["summary"]
    cells, arms = [], _arms(s)[1:]
    for arm in arms:
        a = s[arm]
        cells.append(f"| {arm} | {_cells(a)[0]} | {a['cost']:+.1%} | {a['goodput']:.1%} |")
    clean = s[CLEAN]["median_time"]
    fastest = min(arms, key=lambda arm: s[arm]["median_time"] or math.inf)
    busiest = max(arms, key=lambda arm: s[arm]["goodput"])
    return "\n".join([
        f"`photon bench stragglers` on preset `{data['preset']}` ({data['seeds']} seeds; K = {data['k']} of "
        f"{data['clients']} clients on {data['nodes']} nodes; one node 3× slower, 10% of replies lost, a node down for "
        f"a third of the run; clean sync reaches its own loss in {clean:,.0f} virtual s; every number in "
        "docs/RESULTS.md):", "",
        "| arm | virtual time to clean's loss (median) | perplexity at clean's tokens | goodput |", "|---|---|---|---|",
        *cells, "", f"First to clean's loss: {fastest}; most node-time productive: {busiest} "
        f"({s[busiest]['goodput']:.1%}), at {s[busiest]['cost']:+.1%} perplexity per token."])


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm in _arms(data["runs"]):
        r = data["runs"][arm][0]
        points = trailing(r["evals"])
        ax.plot([p[0] for p in points], [math.exp(p[2]) for p in points], color=f"C{ARMS.index(arm)}", label=arm)
    ax.axhline(math.exp(target_of(data["runs"][CLEAN][0])), color="k", lw=0.8, ls=":", label="target")
    ax.set_xlabel("virtual wall time (s)")
    ax.set_ylabel("validation perplexity (mean of 3 evaluations)")
    ax.set_yscale("log")
    ax.set_title("stragglers, seed 0: a slow node, lossy links, a node down for a third of the run")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
