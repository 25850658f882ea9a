"""`photon bench ...`: the benchmarks; each stores its record, `photon bench report` renders them into the docs."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from photon.cli.common import (
    PresetOpt,
    SetOpt,
    bench_app,
    console,
    flags_config,
    numbers,
)
from photon.config import comma_list, load_config
from photon.data.builtin import ensure_prepared
from photon.errors import UserError


@bench_app.callback()
def _bench(results: Annotated[Optional[Path], typer.Option(
        "--results", help="Where the benchmarks store their records (default docs/results, which `photon bench "
        "report` renders into the docs): another folder for a trial run, e.g. `photon bench --results "
        "/tmp/trial trainer --steps 2`; the plots of compression, stragglers and claims then go to DIR/img, not "
        "docs/img.")]
        = None
        ) -> None:
    if results is not None:
        from photon.bench.results import store_results_in

        store_results_in(results)


@bench_app.command("trainer")
def bench_trainer(
    preset: PresetOpt = "small",
    overrides: SetOpt = None,
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per arm.")] = 20,
    repeats: Annotated[int, typer.Option(min=1, help="Alternating repeats per arm (best is kept).")] = 5,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or mps (train.device).")] = None,
    settings: Annotated[str, typer.Option(help="Comma-separated settings: fp32, bf16, fp32+compile, "
                                          "bf16+compile.")] = "fp32,bf16,fp32+compile,bf16+compile",
) -> None:
    """Tokens/s of photon's local trainer vs a bare PyTorch loop (same model, batch, threads, device), and
    model FLOP/s against the machine's measured matmul peak; stores docs/results/trainer-DEVICE.json."""
    from photon.bench.throughput import run_trainer_bench

    chosen = tuple(comma_list(settings))
    bad = [s for s in chosen if s not in ("fp32", "bf16", "fp32+compile", "bf16+compile")]
    if bad or not chosen:
        raise UserError(f"--settings {','.join(bad) or settings!r}: choose from fp32, bf16, fp32+compile, "
                        "bf16+compile")
    cfg = flags_config(preset, overrides, **{"train.device": device})
    run_trainer_bench(cfg, steps=steps, repeats=repeats, settings=chosen, console=console)


@bench_app.command("federation")
def bench_federation(
    preset: PresetOpt = "small",
    overrides: SetOpt = None,
    local_steps: Annotated[int, typer.Option(min=1, help="H for the overhead run.")] = 64,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds of the overhead run (the first includes start-up).")] = 3,
    memory_preset: Annotated[str, typer.Option(help="Model shape for the aggregator-memory probe.")] = "paper-125m",
    out: Annotated[Path, typer.Option(help="Where runs and results go.")] = Path("runs/bench-federation"),
    deployed: Annotated[bool, typer.Option("--deployed", help="Also measure the overhead on Flower's deployment "
                                           "runtime: a loopback SuperLink and 2 `photon node`s (insecure, "
                                           "127.0.0.1 only).")] = False,
) -> None:
    """Federation overhead in simulation, aggregator peak RAM for K=2,4,8, bytes per token vs data-parallel."""
    from photon.bench.federation import run_federation_bench
    from photon.bench.outdir import fresh_out_dir

    k = 2
    cfg = flags_config(preset, list(overrides or []) + [
        f"federation.local_steps={local_steps}", f"federation.rounds={rounds}", f"federation.clients_per_round={k}",
        f"federation.num_nodes={k}", f"federation.eval_every={rounds}"])
    memory_cfg = load_config(memory_preset)
    fresh_out_dir(out)  # once every option is known to be good
    ensure_prepared(cfg)
    run_federation_bench(cfg, memory_cfg, out, console, deployed=deployed)


@bench_app.command("robust")
def bench_robust(
    preset: PresetOpt = "tiny",
    overrides: SetOpt = None,
    scales: Annotated[str, typer.Option(help="Comma-separated sign-flip scales s (the attackers send "
                                        "−s × the honest mean).")] = "1,2,5,10",
    alie_z: Annotated[float, typer.Option(min=0, help="ALIE: the attackers send mean − z·std of the honest "
                                          "updates.")] = 1.0,
    settings: Annotated[str, typer.Option(help="Comma-separated KxM: K clients of which M attack.")]
    = "4x1,4x2,8x1,8x2",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per arm.")] = 1,
    out: Annotated[Path, typer.Option(help="Where the arms' runs go (rerunning skips finished arms).")]
    = Path("runs/bench-robust"),
    eval_bytes: Annotated[bool, typer.Option(help="Only count the UTF-8 bytes of the validation rows the arms "
                                             "score (the preset's evaluation, a property of the data) into the "
                                             "stored record, so its perplexities read as bits per byte; train "
                                             "nothing.")] = False,
) -> None:
    """Colluding attackers (sign flip, noise, zero, replay, ALIE) among K clients: the default rule vs the plain
    mean, the cosine screen, median and trimmed mean; stores docs/results/robust.json."""
    from photon.bench.robust import run_robust_bench

    values = numbers(scales, float, "--scales", "1,2,5,10")
    pairs = []
    for item in settings.split(","):
        k, _, m = item.strip().lower().partition("x")
        if not (k.isdigit() and m.isdigit() and 0 < int(m) < int(k)):
            raise UserError(f"--settings {settings!r}: each must be KxM with 0 < M < K, as in 4x1,8x2")
        pairs.append((int(k), int(m)))
    cfg = flags_config(preset, overrides)
    ensure_prepared(cfg)
    if eval_bytes:
        from photon.bench.results import chosen_results_dir, eval_bytes, store_eval_bytes

        t = cfg.train
        path = chosen_results_dir() / "robust.json"
        _say_eval_bytes(path, store_eval_bytes(path, eval_bytes(cfg, t.batch_size, t.eval_batches * t.batch_size)))
        return
    run_robust_bench(cfg, out, values, alie_z, tuple(pairs), seeds=seeds, console=console)


@bench_app.command("stragglers")
def bench_stragglers(
    preset: PresetOpt = "tiny",
    overrides: SetOpt = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per arm.")] = 4,
    jobs: Annotated[int, typer.Option(min=1, help="Seeds run at once, each in its own process.")] = 1,
    out: Annotated[Path, typer.Option(help="Where the arms' runs go (rerunning skips finished arms).")]
    = Path("runs/bench-stragglers"),
) -> None:
    """Clean sync against sync waiting for all, sync with a fixed or adaptive deadline, and async (normalized or
    FedBuff weights; FedBuff with dynamic local steps, and also folding what arrived together) under a slow node,
    lossy links and a node down for a third of the run, timed to clean's perplexity on the in-process engine's
    virtual clock (H = 32, 32 clean rounds unless --set says otherwise); stores docs/results/stragglers.json and
    docs/img/stragglers.png (with --results DIR: DIR and DIR/img)."""
    from photon.bench.stragglers import DEFAULTS, run_stragglers_bench

    cfg = flags_config(preset, [*DEFAULTS, *(overrides or [])])
    ensure_prepared(cfg)
    run_stragglers_bench(cfg, out, seeds, console, jobs=jobs)


@bench_app.command("async")
def bench_async(
    preset: PresetOpt = "tiny",
    overrides: SetOpt = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per run.")] = 2,
    out: Annotated[Path, typer.Option(help="Where the runs go (rerunning skips finished ones).")]
    = Path("runs/bench-async"),
) -> None:
    """Asynchronous rounds under slow clients and lost replies: FedAvg with normalized or summed (FedBuff)
    staleness weights, Nesterov and Delayed Nesterov, each at its outer LRs, against clean sync at equal tokens;
    stores docs/results/async.json."""
    from photon.bench.async_outer import run_async_bench

    cfg = flags_config(preset, overrides)
    ensure_prepared(cfg)
    run_async_bench(cfg, out, seeds, console)


@bench_app.command("recipe")
def bench_recipe(
    preset: PresetOpt = "tiny",
    overrides: SetOpt = None,
    steps: Annotated[int, typer.Option(min=32, help="Global steps of every arm (each replica takes them all); "
                                       "the default trains tiny on ≥ 20 tokens per non-embedding parameter.")]
    = 1152,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds of the headline arms.")] = 2,
    jobs: Annotated[int, typer.Option(min=1, help="Arms trained at once, one thread each.")] = 2,
    out: Annotated[Path, typer.Option(help="Where the arms' runs go (rerunning skips finished arms).")]
    = Path("runs/bench-recipe"),
) -> None:
    """The outer loop against centralized training at equal tokens, in the DiLoCo anchors' protocol (each
    replica batch B/K, every replica takes the centralized steps): FedAvg η=1 and Nesterov over a grid of
    momenta, outer LRs and H, the inner LR, K and the split; stores docs/results/recipe.json."""
    from photon.bench.recipe import RecipePlan, run_recipe_bench

    cfg = flags_config(preset, overrides)
    ensure_prepared(cfg)
    run_recipe_bench(cfg, out, RecipePlan(preset, steps=steps, seeds=seeds, jobs=jobs), console)


@bench_app.command("wire")
def bench_wire(
    preset: PresetOpt = "paper-350m",
    overrides: SetOpt = None,
    out: Annotated[Path, typer.Option(help="Where the runs and logs go.")] = Path("runs/bench-wire"),
) -> None:
    """A large model through the real Flower path on loopback (deployed and simulated): peak RSS of server and
    node over the model size, seconds per transfer, against a plain socket copy; stores docs/results/wire.json."""
    from photon.bench.outdir import fresh_out_dir
    from photon.bench.wire import run_wire_bench

    cfg = flags_config(preset, overrides)
    fresh_out_dir(out)  # before the data is prepared (minutes)
    ensure_prepared(cfg)
    run_wire_bench(cfg, out, console)


@bench_app.command("prepare")
def bench_prepare(
    preset: PresetOpt = "small",
    overrides: SetOpt = None,
    sizes: Annotated[str, typer.Option(help="Comma-separated input sizes in GB (the built-in corpus repeated).")]
    = "0.1,1",
    out: Annotated[Path, typer.Option(help="Where inputs (deleted after each size) and logs go.")]
    = Path("runs/bench-prepare"),
    cache: Annotated[Path, typer.Option(help="Where downloaded source archives are kept.")] = Path("data/sources"),
) -> None:
    """Streaming `photon prepare` on growing inputs: MB/s against one `encode_batch` call on the same text, and
    peak RSS per size (it must stay flat); stores docs/results/prepare.json."""
    from photon.bench.prepare import builtin_corpus, run_prepare_bench

    values = numbers(sizes, float, "--sizes", "0.1,1")
    run_prepare_bench(flags_config(preset, overrides), values, out, builtin_corpus(cache), console)


@bench_app.command("compression")
def bench_compression(
    preset: PresetOpt = "tiny",
    overrides: SetOpt = None,
    hs: Annotated[str, typer.Option("--hs", help="Comma-separated local steps H.")] = "64,256,512",
    steps: Annotated[int, typer.Option(min=1, help="Global steps of every arm (equal tokens at every H); the "
                                       "default is 100 rounds at H = 64.")] = 6400,
    codecs: Annotated[Optional[str], typer.Option(help="Only these arms, comma-separated (default: all): fp32, "
                                                  "int8, 2bit, '2bit + EF', 'top-k 1/64 + 2bit + EF', "
                                                  "SparseLoCo.")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds of the headline arms (fp32, 2bit, SparseLoCo).")] = 2,
    jobs: Annotated[int, typer.Option(min=1, help="Arms trained at once, one process and one thread each.")] = 2,
    out: Annotated[Path, typer.Option(help="Where the arms' runs go (rerunning skips finished arms).")]
    = Path("runs/bench-compression"),
) -> None:
    """Every codec up-link only and both ways, and SparseLoCo's recipe, at equal tokens: bytes per token against
    data-parallel, perplexity cost against fp32 Photon at the same H and at its best H, codec time on the
    critical path; stores docs/results/compression.json and docs/img/compression.png (with --results DIR: DIR and
    DIR/img)."""
    from photon.bench.compression import CODECS, run_compression_bench

    values = numbers(hs, int, "--hs", "64,256,512")
    chosen = tuple(comma_list(codecs)) if codecs else None
    unknown = sorted(set(chosen or ()) - set(CODECS))
    if unknown:
        raise UserError(f"--codecs: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(CODECS)}")
    bad = [h for h in values if steps % h]
    if bad:
        raise UserError(f"--steps {steps} is not a multiple of H = {', '.join(map(str, bad))}: every arm trains "
                        "the same tokens in whole rounds")
    cfg = flags_config(preset, overrides)
    ensure_prepared(cfg)
    run_compression_bench(cfg, out, values, seeds, jobs, console, steps=steps, codecs=chosen)


@bench_app.command("demo")
def bench_demo(
    preset: PresetOpt = "small",
    overrides: SetOpt = None,
    out: Annotated[Path, typer.Option(help="Run directory (replaced by each run).")] = Path("runs/bench-demo"),
) -> None:
    """The main job (`make run`) timed and scored: per-domain perplexity before/after and wall time; stores
    docs/results/demo.json (the README's and RESULTS.md's description of `make run` come from it)."""
    from photon.bench.demo import run_demo_bench

    cfg = flags_config(preset, overrides)
    ensure_prepared(cfg)
    run_demo_bench(cfg, out, console)


@bench_app.command("report")
def bench_report(
    results: Annotated[Optional[Path], typer.Option(help="Stored benchmark outputs (default: `photon bench "
                                                    "--results`, docs/results).")] = None,
    target: Annotated[Optional[list[Path]], typer.Option(help="Markdown files whose results blocks are rewritten "
                                                         "(default: docs/RESULTS.md, README.md, docs/DEPLOY.md).")]
    = None,
) -> None:
    """Rewrite the measured blocks of docs/RESULTS.md (and the computed tables of README.md and docs/DEPLOY.md)
    from the stored benchmark outputs (docs/results/*.json) and the presets."""
    from photon.bench.publish import TARGETS, write_report
    from photon.bench.results import chosen_results_dir, plots_dir

    targets = tuple(target) if target else TARGETS
    for t in targets:
        if not t.is_file():
            raise UserError(f"{t} does not exist; run from the repository root or pass --target")
    chosen = results or chosen_results_dir()
    names = write_report(chosen, targets)
    console.print(f"rewrote {len(names)} block(s) in {', '.join(map(str, targets))}: {', '.join(names) or 'none'}")
    drawn, shown = plots_dir(chosen), [t.parent / "img" for t in targets if t.name == "RESULTS.md"]
    if shown and drawn.is_dir() and drawn.resolve() != shown[0].resolve():  # a trial's plots, beside its numbers
        plots = sorted(drawn.glob("*.png"))
        shown[0].mkdir(exist_ok=True)
        for png in plots:
            shutil.copyfile(png, shown[0] / png.name)
        console.print(f"copied {len(plots)} plot(s) from {drawn} into {shown[0]}")


def _say_eval_bytes(path: Path, counts: dict[str, list[int]]) -> None:
    tokens, size = counts["overall"]
    console.print(f"{path}: {tokens:,} scored tokens are {size:,} bytes of text ({size / tokens:.2f} per token)")


@bench_app.command("claims")
def bench_claims(
    scale: Annotated[str, typer.Option(help="tiny (≈30 min), small or medium (< 2 h on 2 free cores); "
                                       "--dry-run prints the plan and its estimated duration.")] = "tiny",
    out: Annotated[Optional[Path], typer.Option(help="Where arms and claims.md go (default runs/claims-SCALE). "
                                                "Rerunning skips finished arms.")] = None,
    seeds: Annotated[Optional[int], typer.Option(min=1, help="Seeds of the headline arms (default: the "
                                                 "scale's).")] = None,
    sweep_seeds: Annotated[Optional[int], typer.Option(min=1, help="Seeds of the secondary arms (iid, bigbatch, "
                                                       "diloco-reset, K and H sweeps; default: the scale's).")] = None,
    jobs: Annotated[Optional[int], typer.Option(min=1, help="Arms trained at once, one process and one thread "
                                                "each (default: the scale's, 2).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the plan and its cost estimate (from a throughput "
                                          "measured now), train nothing.")] = False,
    eval_bytes: Annotated[bool, typer.Option(help="Only count the UTF-8 bytes of the validation rows the arms "
                                             "score (the data's, not training's) into the stored record, so its "
                                             "losses read as bits per byte; train nothing.")] = False,
    results: Annotated[Optional[Path], typer.Option(help="Where the record claims-SCALE.json is stored (default: "
                                                    "`photon bench --results`, docs/results).")] = None,
    overrides: SetOpt = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Prepared data every arm trains and is evaluated "
                                                 "on (default: the scale's preset's data.prep_dir).")] = None,
) -> None:
    """The paper's claims as experiments (federated vs centralized in both regimes, LR sweeps, K, H, network,
    heterogeneity, DiLoCo, torchft, ablation), stored in RESULTS/claims-SCALE.json with plots in docs/img
    (RESULTS/img with --results); `photon bench report` renders them into docs/RESULTS.md and the README."""
    import dataclasses
    import shlex

    from photon.bench.claims.plan import PLANS
    from photon.bench.claims.run import add_eval_bytes, run_claims

    if scale not in PLANS:
        raise UserError(f"--scale {scale!r}: choose one of {', '.join(PLANS)}")
    plan = PLANS[scale]
    plan = dataclasses.replace(plan, seeds=seeds or plan.seeds, sweep_seeds=sweep_seeds or plan.sweep_seeds,
                               jobs=jobs or plan.jobs)
    cfg = flags_config(plan.preset, overrides, data)
    ensure_prepared(cfg)
    if eval_bytes:
        from photon.bench.results import chosen_results_dir

        path = (results or chosen_results_dir()) / f"claims-{scale}.json"
        _say_eval_bytes(path, add_eval_bytes(cfg, plan, path))
        return
    out = out or Path("runs") / f"claims-{scale}"
    run_claims(cfg, out, plan, console=console, command=shlex.join(["photon", *sys.argv[1:]]), scale=scale,
               results_dir=results, dry_run=dry_run)
