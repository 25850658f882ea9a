"""The claims benchmark's Markdown, from its stored record (docs/results/claims-SCALE.json) alone.

- `render(data)`: every table of one scale (its page, docs/results/claims-SCALE.md, and the benchmark's
  claims.md); `render_verdicts(data)`: that scale's verdicts only (its block in docs/RESULTS.md);
  `render_findings(results_dir)`: the README's verdicts of every stored scale side by side; `page(scale)`:
  the skeleton of a scale's page, whose block `photon bench report` fills.
- `verdicts(data)`: claim id -> (verdict, the numbers behind it): the values are measured here (`record.py`),
  judged by the rules of `verdicts.py`, and every sentence that states a threshold reads it from that rule.
- The fixed prose lives in `templates/*.md` (string.Template, one file per section, named parts); this module
  computes the fields and the tables. Neither reads a run directory, and no number in them is typed by hand.
"""

from __future__ import annotations

import functools
import json
import re
import statistics
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from photon.bench.claims.record import (
    BANDWIDTH_SWEEP,
    OVERALL,
    View,
    bytes_per_token,
    clients_of,
    crossovers_at,
    dp_bytes_per_token,
    k_times,
    not_folded,
    ppl,
    process_hours,
    ratio_curve,
    ratios,
    step_compute_seconds,
    target_tokens,
    to_target,
    wall,
)
from photon.bench.claims.verdicts import NOT_RUN, RULES, mean_or_none, title
from photon.bench.network import NETWORKS, Network, ring_allreduce_bytes

SCALES = ("tiny", "small", "medium")
TEMPLATES = Path(__file__).parent / "templates"
IMG = "img/"  # where the plots are, from docs/RESULTS.md and from the benchmark's claims.md
PAGE_IMG = "../img/"  # the same plots from a scale's page in docs/results/

# ---------------------------------------------------------------------------------------------------------
# Templates: one file per section, its parts named by `<!-- NAME -->` lines. A file is wrapped for reading;
# the rendered Markdown has one line per paragraph or list item, so a wrapped line joins the one before it.

_PART = re.compile(r"^<!-- ([\w-]+) -->$", re.M)
_OWN_LINE = ("- ", "#", "|", "![", "<!--")  # lines that start a block of their own: never joined


def _unwrap(text: str) -> str:
    lines: list[str] = []
    for line in text.strip("\n").split("\n"):
        prev = lines[-1] if lines else ""
        joins = line.strip() and prev.strip() and not prev.startswith(("#", "<!--")) and (
            line.startswith("  ") or not line.startswith(_OWN_LINE))
        if joins:
            lines[-1] = f"{prev} {line.strip()}"
        else:
            lines.append(line)
    return "\n".join(lines)


@functools.cache
def _parts(name: str) -> dict[str, string.Template]:
    text = (TEMPLATES / f"{name}.md").read_text(encoding="utf-8")
    pieces = _PART.split(text)[1:]  # what precedes the first part says what the file is for
    return {key: string.Template(_unwrap(body)) for key, body in zip(pieces[::2], pieces[1::2])}


def fill(name: str, part: str, **fields: Any) -> str:
    """The part `part` of templates/`name`.md with its fields filled in (a missing field is a KeyError)."""
    return _parts(name)[part].substitute(fields)


# ---------------------------------------------------------------------------------------------------------
# Formatting


def mean_spread(values: Sequence[float | None]) -> tuple[float, float] | None:
    if not values or any(v is None for v in values):
        return None
    return statistics.mean(values), (max(values) - min(values)) / 2


def fmt(values: Sequence[float | None], digits: int = 1, scale: float = 1.0) -> str:
    """`mean ± half the range` over seeds (one seed: the value), or how many seeds reached it."""
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


def _network(name: str) -> Network:
    return next(n for n in NETWORKS if n.name == name)


def _worse_final(v: View, a: str, b: str) -> tuple[list[str], float]:
    """The seeds two arms share and the worse of their final perplexities: the target both must reach."""
    seeds = v.seeds(a, b)
    return seeds, max(v.final(n, s) for n in (a, b) for s in seeds)


# ---------------------------------------------------------------------------------------------------------
# Verdicts: one per claim, measured from the record and judged by its rule


def verdicts(data: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """claim id -> (verdict, the numbers behind it in one line; "" when not run)."""
    v = View(data)
    return {"1a": _verdict1(v, "1a", "photon"), "1b": _verdict1(v, "1b", "paper"), "2": _verdict2(v),
            "3a": _verdict3a(v), "3b": _verdict3b(v), "4": _verdict4(v), "5": _verdict5(v), "6": _verdict6(v)}


def _verdict1(v: View, claim: str, fed: str) -> tuple[str, str]:
    if not v.has(fed, "central"):
        return NOT_RUN, ""
    seeds, r = ratios(v, fed, "central")
    text = fill("claim1", "measured", fed=fed, ratio=fmt(r, 2), fed_ppl=fmt(v.finals(fed, seeds)),
                central_ppl=fmt(v.finals("central", seeds)), seeds=_seeds_text(seeds))
    short = f"{fed}-short"
    if v.has(short, "central-short"):
        text += fill("claim1", "measured-short", horizon=f"{v.arms[short]['horizon']:.2g}",
                     ratio=fmt(ratios(v, short, "central-short")[1], 2))
    if claim == "1a" and v.has("photon-reset", "central"):
        text += fill("claim1", "measured-stateless", ratio=fmt(ratios(v, "photon-reset", "central")[1], 2))
    return RULES[claim].judge(r), text


def _verdict2(v: View) -> tuple[str, str]:
    rule = RULES["2"]
    k = k_times(v, _network(rule.network))
    if k is None:
        return NOT_RUN, ""
    seeds, target, _, walls = k
    mean = {n: mean_or_none(w) for n, w in walls.items()}
    verdict = rule.judge(list(mean.values()))
    if any(m is None for m in mean.values()):
        return verdict, fill("claim2", "unreached")
    times = ", ".join(f"K={clients_of(v.d, n)} {mean[n]:.0f}" for n in walls)
    return verdict, fill("claim2", "measured", network=rule.network, target=f"{target:.0f}", times=times,
                         seeds=_seeds_text(seeds))


def _verdict3a(v: View) -> tuple[str, str]:
    if not v.has("photon"):
        return NOT_RUN, ""
    rule, p = RULES["3a"], v.d["plan"]
    ratio = dp_bytes_per_token(v.d) / bytes_per_token(v.run("photon", v.seeds("photon")[0]))
    H, K = p["local_steps"], p["clients"]
    expected = H * (K - 1) / K
    return rule.judge(ratio, expected), fill(
        "claim3", "bytes-measured", ratio=f"{ratio:.1f}", local_steps=H, clients=K,
        exactly="exactly" if rule.exact(ratio, expected) else "NOT")


def _verdict3b(v: View) -> tuple[str, str]:
    if not v.has("photon", "central"):
        return NOT_RUN, ""
    rule = RULES["3b"]
    seeds, target = _worse_final(v, "photon", "central")
    r = []
    for s in seeds:
        t_ph, _, t_dp, _ = wall(v, s, target, _network(rule.network))
        r.append(t_dp / t_ph if t_ph and t_dp else None)
    return rule.judge(r), fill("claim3", "time-measured", ratio=fmt(r, 2), target=f"{target:.0f}",
                               network=rule.network, seeds=_seeds_text(seeds))


def _verdict4(v: View) -> tuple[str, str]:
    if not v.has("photon", "iid"):
        return NOT_RUN, ""
    seeds = v.seeds("photon", "iid")
    init = [ppl(v.run("photon", s)["evals"][0][2][OVERALL]) for s in seeds]
    a, b = v.finals("photon", seeds), v.finals("iid", seeds)
    return RULES["4"].judge([x / i for x, i in zip(a, init)]), fill(
        "claim4", "measured", fed_ppl=fmt(a), iid_ppl=fmt(b), init=f"{statistics.mean(init):,.0f}",
        seeds=_seeds_text(seeds))


def _verdict5(v: View) -> tuple[str, str]:
    if not v.has("photon", "diloco"):
        return NOT_RUN, ""
    rule = RULES["5"]
    seeds, target, tok = target_tokens(v, "photon", "diloco")
    r = [d / p if d and p else None for d, p in zip(tok["diloco"], tok["photon"])]
    return rule.judge(r), fill("claim5", "measured", ratio=fmt(r, 2), target=f"{target:.0f}",
                               photon_ppl=fmt(v.finals("photon", seeds)), diloco_ppl=fmt(v.finals("diloco", seeds)),
                               seeds=_seeds_text(seeds), bound=rule.bound_text())


def _verdict6(v: View) -> tuple[str, str]:
    if not v.has("photon", "bigbatch"):
        return NOT_RUN, ""
    d = v.d
    seeds = v.seeds("photon", "bigbatch")
    a, b = v.finals("photon", seeds), v.finals("bigbatch", seeds)
    return RULES["6"].judge([x / y for x, y in zip(a, b)]), fill(
        "claim6", "measured", batch=d["batch"], photon_lr=v.lr("photon"), photon_ppl=fmt(a),
        big=d["plan"]["clients"] * d["batch"], bigbatch_lr=v.lr("bigbatch"), bigbatch_ppl=fmt(b),
        seeds=_seeds_text(seeds))


# ---------------------------------------------------------------------------------------------------------
# One scale


def render(data: dict[str, Any], img: str = IMG) -> str:
    """Every table of one scale, a pure function of the stored record; `img`: the plots' folder, relative to
    the page that shows them."""
    v = View(data)
    parts = [_setup(v), render_verdicts(data), _claim1(v), _sweeps(v), _claim2(v), _claim3(v), _claim3_time(v),
             _claim4(v), _claim5(v), _claim6(v), _arms(v)]
    return "\n\n".join([*parts, fill("setup", "plots", img=img, scale=data["scale"])])


def render_page(data: dict[str, Any]) -> str:
    """A scale's block on its own page in docs/results/ (the plots one folder up)."""
    return render(data, PAGE_IMG)


def render_verdicts(data: dict[str, Any]) -> str:
    """One scale's verdict table (its block in docs/RESULTS.md, and the top of its page)."""
    vs = verdicts(data)
    rows = [[title(k), f"**{vs[k][0]}**", vs[k][1] or "-"] for k in RULES]
    return fill("setup", "verdicts", table=table(["the paper's claim", "verdict", "measured"], rows))


def page(scale: str) -> str:
    """The skeleton of docs/results/claims-SCALE.md: fixed prose around an empty `claims-SCALE` block."""
    return fill("page", "page", scale=scale) + "\n"


def _setup(v: View) -> str:
    d, p = v.d, v.d["plan"]
    m = d["model"]
    non_emb = m["params"] - m["embedding_params"]
    ref = p["reference_tokens"]
    est = d["estimate"]
    return fill(
        "setup", "setup", preset=d["preset"], describe=m["describe"], outside=f"{non_emb / m['params']:.0%}",
        data=d["data"], n_domains=len(d["domains"]), seq_len=d["seq_len"], rounds=p["rounds"],
        local_steps=p["local_steps"], clients=p["clients"], batch=d["batch"], steps=p["rounds"] * p["local_steps"],
        tokens=f"{ref:,}", per_param=f"{ref / non_emb:.1f}", big=p["clients"] * d["batch"],
        eval_rows=d["eval_rows"], floor=f"{p['min_lr_ratio']:.0%}", warmup=f"{p['warmup_fraction']:.1%}",
        not_folded=not_folded(v), seeds=p["seeds"], paper_seeds=p["paper_seeds"], sweep_seeds=p["sweep_seeds"],
        jobs=p["jobs"], threads=p["threads"] or "default", processes=d["throughput"].get("processes", 1),
        throughput=", ".join(f"batch {b}: {t:,.0f}" for b, t in d["throughput"]["tokens_per_s"].items()),
        load=d["throughput"]["load_average"], estimate=f"{est['seconds'] / 3600:.2f}",
        worst_case=f"{est['worst_case_seconds'] / 3600:.2f}", process_hours=f"{process_hours(v):.2f}",
        budget_changes=", ".join(f"`{o}`" for o in p["base_overrides"]) or "none")


def _claim1(v: View) -> str:
    d, K = v.d, v.K
    head = fill("claim1", "head")
    rows = []
    for name, ref in (("central", None), ("photon", "central"), ("photon-reset", "central"), ("paper", "central"),
                      ("central-short", None), ("photon-short", "central-short"), ("paper-short", "central-short")):
        if not v.has(name):
            continue
        a = d["arms"][name]
        seeds = v.seeds(name, ref) if ref and v.has(name, ref) else v.seeds(name)
        tokens = a["runs"][seeds[0]]["evals"][-1][0]
        ratio = fmt(ratios(v, name, ref)[1], 2) if ref and v.has(name, ref) else "-"
        rows.append([f"`{name}`", a["regime"] if a["kind"] != "centralized" else "-", a["client_optimizer"],
                     f"{a['lr']:g}", f"{a['horizon']:.2g}", f"{tokens / 1e6:.2f}", fmt(v.finals(name, seeds)),
                     fmt([v.final_bpb(name, s) for s in seeds], 3), ratio, ", ".join(seeds)])
    if not rows:
        return fill("setup", "missing", head=head)
    out = [head, fill("claim1", "intro", clients=K),
           table(["arm", "regime", "client optimizer", "LR", "horizon", "tokens (M)", "final ppl",
                  "final bits/byte", "ratio to centralized", "seeds"], rows)]
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
        out += [fill("claim1", "over-the-run", scale=d["scale"]), table(["ratio", "25%", "50%", "75%", "100%"], curves)]
    named = [n for n in ("central", "photon", "photon-reset", "paper") if v.has(n)]
    if len(named) > 1:
        seeds = {n: v.seeds(n) for n in named}
        out += [fill("claim1", "per-domain"),
                table(["domain", *[f"`{n}`" for n in named]],
                      [[dom, *[fmt(v.finals(n, seeds[n], dom)) for n in named]] for dom in [*v.domains(), OVERALL]])]
    vs = verdicts(d)
    out.append(fill("claim1", "result", verdict_equal=vs["1a"][0], measured_equal=vs["1a"][1],
                    verdict_paper=vs["1b"][0], measured_paper=vs["1b"][1]))
    return "\n\n".join(out)


def _sweeps(v: View) -> str:
    d, p = v.d, v.d["plan"]
    head = fill("sweeps", "head")
    rows = []
    for name, s in d["sweeps"].items():
        cells = [f"{lr:g}: " + ("failed" if p_ is None else f"**{p_:,.1f}**" if lr == s["best_lr"] else f"{p_:,.1f}")
                 for lr, p_ in zip(s["grid"], s["ppl"])]
        note = " (at the grid's edge)" if s["at_edge"] else ""
        rows.append([f"`{name}`", f"{s['base_lr']:g}", " · ".join(cells), f"{s['best_lr']:g}{note}"])
    if not rows:
        return fill("setup", "not-run", head=head)
    out = [head, fill("sweeps", "rule", grid=", ".join(f"{x:g}" for x in p["lr_grid"]), extend=p["lr_extend"]),
           table(["arm", "base LR", "LR: final ppl", "best LR"], rows)]
    for name, s in d["sweeps"].items():
        for lr, why in s.get("failed", {}).items():
            out.append(fill("sweeps", "failed", arm=name, lr=lr, why=why))
    edge = [n for n, s in d["sweeps"].items() if s["at_edge"]]
    if edge:
        out.append(fill("sweeps", "at-edge", arms=", ".join(f"`{n}`" for n in edge)))
    return "\n\n".join(out)


def _claim2(v: View) -> str:
    p, network = v.d["plan"], RULES["2"].network
    head = fill("claim2", "head", ks=p["ks"], rounds=p["rounds"], local_steps=p["local_steps"], network=network)
    k = k_times(v, _network(network))
    if k is None:
        return fill("setup", "missing", head=head)
    seeds, target, step_s, walls = k
    rows = []
    for n in walls:
        rows.append([clients_of(v.d, n), fmt([v.run(n, s)["evals"][-1][0] for s in seeds], 0, 1e3),
                     fmt(v.finals(n, seeds)),
                     fmt([to_target(v.curve(n, s, x=1), target) for s in seeds], 2),
                     fmt([to_target(v.curve(n, s), target) for s in seeds], 0, 1e3), fmt(walls[n], 1)])
    vs = verdicts(v.d)["2"]
    return "\n\n".join([
        head, fill("claim2", "target", target=f"{target:.1f}", step_s=f"{step_s:.3f}", seeds=", ".join(seeds)),
        table(["K", "tokens (k)", "final ppl", "rounds to target", "tokens to target (k)",
               f"modelled wall s to target ({network})"], rows),
        fill("claim2", "result", verdict=vs[0], measured=vs[1])])


def _claim3(v: View) -> str:
    d, p = v.d, v.d["plan"]
    K = p["clients"]
    head = fill("claim3", "bytes-head", clients=K)
    hs = sorted({*p["hs"], p["local_steps"]})
    names = [n for n in (f"h{h}" if h != p["local_steps"] else "photon" for h in hs) if v.has(n)]
    if not names:
        return fill("setup", "missing", head=head)
    dp = dp_bytes_per_token(d)
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
    return "\n\n".join([head, fill("claim3", "bytes-model", mb=f"{d['model']['bytes'] / 1e6:.2f}"),
                        table(["H", "rounds", "tokens (k)", "MB sent", "MB of kept state sent", "bytes/token",
                               "DP / Photon", "final ppl"], rows),
                        fill("claim3", "bytes-result", verdict=vs[0], measured=vs[1])])


def _claim3_time(v: View) -> str:
    d = v.d
    head = fill("claim3", "time-head")
    if not v.has("photon", "central"):
        return fill("setup", "missing", head=head)
    seeds, target = _worse_final(v, "photon", "central")
    rows = []
    for net in NETWORKS:
        w = [wall(v, s, target, net) for s in seeds]
        ratio = [x[2] / x[0] if x[0] and x[2] else None for x in w]
        rows.append([net.name, f"{net.latency_s * 1e3:g} ms", fmt([x[0] for x in w]), fmt([x[1] for x in w], 2),
                     fmt([x[2] for x in w]), fmt([x[3] for x in w], 2), fmt(ratio, 2)])
    sweep = BANDWIDTH_SWEEP
    cross = {s: crossovers_at(v, s, target, sweep) for s in seeds}
    where = "; ".join(f"seed {s}: " + (", ".join(f"{c / 1e9:.3g} Gbit/s" for c in cs) or "none")
                      for s, cs in cross.items())
    steps = ", ".join(f"{step_compute_seconds(v.run('photon', s)):.3f} s (seed {s})" for s in seeds)
    vs = verdicts(d)["3b"]
    out = [head, fill("claim3", "time-target", target=f"{target:.1f}", clients=v.K,
                      mb=f"{d['model']['bytes'] / 1e6:.2f}", overhead=NETWORKS[0].round_overhead_s, steps=steps),
           table(["network", "latency", "Photon s to target", "of which communication + overhead s",
                  "DP s to target", "of which all-reduce s", "DP / Photon"], rows),
           fill("claim3", "time-crossover", network=sweep.name, where=where, scale=d["scale"]),
           fill("claim3", "time-result", verdict=vs[0], measured=vs[1])]
    if d.get("ddp"):
        x = d["ddp"]
        share = x["comm_seconds"] / x["step_seconds"]
        bw = 8 * ring_allreduce_bytes(x["allreduce_bytes_per_step"], x["world"]) / max(x["comm_seconds"], 1e-9)
        out += [fill("claim3", "ddp", world=x["world"], threads=x["threads"], steps=x["steps"],
                     batch=x["batch_size"], seq_len=x["seq_len"]),
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


def _claim4(v: View) -> str:
    head = fill("claim4", "head")
    if not v.has("photon", "iid"):
        return fill("setup", "missing", head=head)
    seeds = v.seeds("photon", "iid")
    rows = [[dom, fmt(v.finals("photon", seeds, dom)), fmt(v.finals("iid", seeds, dom))]
            for dom in [*v.domains(), OVERALL]]
    vs = verdicts(v.d)["4"]
    a, b = statistics.mean(v.finals("photon", seeds)), statistics.mean(v.finals("iid", seeds))
    return "\n\n".join([head, table(["domain", "by-domain (`photon`)", "IID (`iid`)"], rows),
                        fill("claim4", "result", verdict=vs[0], bound=RULES["4"].bound_words(), measured=vs[1],
                             change=f"{100 * (a / b - 1):+.1f}%")])


def _claim5(v: View) -> str:
    d = v.d
    head = fill("claim5", "head")
    if not v.has("photon", "diloco"):
        return fill("setup", "missing", head=head)
    seeds, target, _ = target_tokens(v, "photon", "diloco")
    rows = []
    for n in ("photon", "diloco", "diloco-reset"):
        if not v.has(n):
            continue
        ss = v.seeds(n) if n == "diloco-reset" else seeds
        a = d["arms"][n]
        t = [to_target(v.curve(n, s), target) for s in ss]
        rows.append([f"`{n}`", a["client_optimizer"], a["lr"], fmt(v.finals(n, ss)), fmt(t, 0, 1e3),
                     ", ".join(ss)])
    vs = verdicts(d)["5"]
    return "\n\n".join([head, fill("claim5", "target", target=f"{target:.1f}"),
                        table(["arm", "client optimizer", "LR", "final ppl", "tokens to target (k)", "seeds"], rows),
                        fill("claim5", "result", verdict=vs[0], measured=vs[1]), _peer(v)])


def _peer(v: View) -> str:
    arm = v.d["arms"].get("torchft")
    if arm is None:
        return fill("claim5", "peer-absent")
    run = arm["runs"].get("0")
    peer = run["peer"] if run else {"status": "not run: the arm did not finish"}
    if peer.get("status") != "ran":
        return fill("claim5", "peer-not-run", status=peer.get("status", "not run"))
    ours = fill("claim5", "peer-ours", ppl=f"{v.final('diloco', '0'):,.1f}") \
        if v.has("diloco") and "0" in v.seeds("diloco") else ""
    return fill("claim5", "peer", version=peer.get("torchft_version", "?"), lr=f"{arm['lr']:g}",
                client_optimizer=peer.get("client_optimizer", "?"), ppl=f"{ppl(peer['losses'][OVERALL]):,.1f}",
                ours=ours, sync=f"{peer['sync_s_per_round']:.3f}", sync_first=f"{peer['sync_s_first_round']:.3f}",
                sync_steady=f"{peer['sync_s_steady']:.3f}", compute=f"{peer['compute_s_per_round']:.2f}",
                agree="yes" if peer.get("replicas_agree") else "NO",
                differences="; ".join(peer.get("differences", [])))


def _claim6(v: View) -> str:
    head = fill("claim6", "head")
    names = [n for n in ("photon", "bigbatch", "diloco") if v.has(n)]
    if not v.has("photon", "bigbatch"):
        return fill("setup", "missing", head=head)
    seeds = v.seeds(*names)
    rows = [[dom, *[fmt(v.finals(n, seeds, dom)) for n in names]] for dom in [*v.domains(), OVERALL]]
    vs = verdicts(v.d)["6"]
    return "\n\n".join([head, table(["domain", *[f"`{n}`" for n in names]], rows),
                        fill("claim6", "result", verdict=vs[0], measured=vs[1])])


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
    return "\n\n".join([fill("arms", "head"),
                        fill("arms", "intro", sweep_runs=sum(len(s["grid"]) for s in d["sweeps"].values())),
                        table(["arm", "what", "kind", "regime", "client optimizer", "LR", "tokens (M)", "seeds",
                               "run time s"], rows), "\n".join(sets)])


# ---------------------------------------------------------------------------------------------------------
# The README's findings: every stored scale side by side


def _bpb_pair(d: dict[str, Any]) -> str:
    v = View(d)
    if not d.get("eval_bytes") or not v.has("central", "photon"):
        return "n/a"
    seeds = v.seeds("central", "photon")
    return " / ".join(fmt([v.final_bpb(n, s) for s in seeds], 3) for n in ("central", "photon"))


def render_findings(results_dir: Path) -> str:
    """The README's "What we found" table from docs/results/claims-*.json (a pure function of those files)."""
    records = {}
    for scale in SCALES:
        path = Path(results_dir) / f"claims-{scale}.json"
        if path.exists():
            records[scale] = json.loads(path.read_text())
    vs = {s: verdicts(r["data"]) for s, r in records.items()}
    rows = []
    for key in RULES:
        cells = []
        for scale in SCALES:
            if scale not in vs:
                cells.append("not measured yet")
                continue
            verdict, text = vs[scale][key]
            cells.append(f"**{verdict}**" + (f": {text}" if text else ""))
        rows.append([title(key), *cells])
    rows.append(["final bits per byte, `central` / `photon` (comparable across vocabularies)",
                 *[_bpb_pair(records[s]["data"]) if s in records else "not measured yet" for s in SCALES]])
    lines = [table(["the paper's claim", *[f"`{s}`" for s in SCALES]], rows), ""]
    for scale in SCALES:
        if scale not in records:
            lines.append(fill("findings", "not-measured", scale=scale))
            continue
        r = records[scale]
        m = r["machine"]
        load = m.get("load_average", {})
        lines.append(fill("findings", "measured", scale=scale, command=r["command"], date=r["date"],
                          cores=m.get("cores", "?"), load=load.get("mean", "?"), load_max=load.get("max", "?"),
                          describe=r["data"]["model"]["describe"]))
    return "\n".join(lines)
