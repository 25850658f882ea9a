"""`photon prepare`, `train-central`, `eval`, `export`, `generate`, `plot`, `run`, `presets`: data, training and
evaluation on this machine."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from photon.cli.common import (
    DataOpt,
    PresetOpt,
    SetOpt,
    app,
    console,
    err_console,
    flags_config,
)
from photon.config import comma_list, load_config, preset_names
from photon.data.builtin import ensure_prepared
from photon.errors import UserError
from photon.launch.engines import ENGINES, check_run_fits, run_federated


@app.command()
def prepare(
    data: Annotated[Optional[Path], typer.Option("--data", help="Your text: a dir of domain subdirs with .txt/"
                                                  ".jsonl/.parquet. Default: the built-in offline multi-domain "
                                                  "corpus.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Where to write (default: the preset's "
                                                "data.prep_dir).")] = None,
    preset: PresetOpt = "small",
    overrides: SetOpt = None,
    cache: Annotated[Path, typer.Option(help="Where downloaded source archives are kept.")] = Path("data/sources"),
) -> None:
    """Build the tokenizer and token shards (per domain, train/val) once, offline."""
    from photon.data.shards import prepare as do_prepare

    cfg = flags_config(preset, overrides, out, data_flag="--out")
    path = do_prepare(cfg.data, cfg.model.vocab_size, source=data, cache_dir=cache)
    console.print(f"prepared data in {path}")


@app.command("train-central")
def train_central(
    data: DataOpt = None,
    preset: PresetOpt = "small",
    overrides: SetOpt = None,
    steps: Annotated[Optional[int], typer.Option(help="Schedule length in steps (train.steps).")] = None,
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/central"),
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint, with the config "
                                         "saved there (--set/--steps apply on top; --preset is ignored).")] = False,
) -> None:
    """Train the centralized baseline on the union of all domains; checkpoints under OUT/checkpoints/."""
    from photon.checkpoint import refuse_a_resume_of_no_run, refuse_a_taken_run_dir
    from photon.config import with_absolute_prep_dir
    from photon.train.centralized import train_central as run

    if resume:
        refuse_a_resume_of_no_run(out)  # a mistyped --out must not fall back to the preset
    else:
        refuse_a_taken_run_dir(out)  # before the data is opened: the folder is the likelier mistake
    cfg = with_absolute_prep_dir(flags_config(preset, overrides, data, saved=out if resume else None,
                                         **{"train.steps": steps}))
    check_run_fits(cfg)
    run(cfg, out, resume=resume, console=console)
    console.print(f"run directory: {out}")


@app.command("eval")
def eval_cmd(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint folder or run directory (its newest checkpoint).")],
    data: DataOpt = None,
    batches: Annotated[Optional[int], typer.Option(min=1, help="Validation batches per domain (default: the "
                                                   "run's train.eval_batches).")] = None,
    text: Annotated[Optional[Path], typer.Option(help="Score this held-out text instead: a .txt/.jsonl/.parquet "
                                                 "file, or a folder of them laid out as for `photon prepare` "
                                                 "(a subfolder per domain).")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="Run these lm-evaluation-harness tasks instead, comma-"
                                                 "separated: registry names (e.g. arc_easy,hellaswag; their data "
                                                 "comes from the Hugging Face hub), task YAML files or folders "
                                                 "of them (e.g. with a local JSONL). Needs pip install -e "
                                                 "'.[eval]'.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="With --tasks: at most this many examples per "
                                                 "task.")] = None,
) -> None:
    """Print validation loss, perplexity and bits per byte per domain and overall (or, with --tasks, the
    harness's metrics)."""
    from photon.checkpoint import load_model_checkpoint, resolve_checkpoint
    from photon.config import with_overrides
    from photon.display import eval_table
    from photon.train.centralized import check_same_data, open_data
    from photon.train.evaluate import bits_per_byte, evaluable_domains, evaluate, scored_bytes

    ckpt = resolve_checkpoint(ckpt)  # the checkpoint the table names: the newest that verifies
    model, cfg, meta, tokenizer_path = load_model_checkpoint(ckpt)
    if text is not None and tasks is not None:
        raise UserError("--text and --tasks are two evaluations: give one")
    if tasks is not None:
        from photon.data.tokenizer import load_tokenizer
        from photon.display import tasks_table
        from photon.train.harness import evaluate_tasks

        names = comma_list(tasks)
        err_console.print(f"running {', '.join(names)} through lm-evaluation-harness (its progress below)")
        results = evaluate_tasks(model, load_tokenizer(tokenizer_path), names, cfg.train.batch_size,
                                 cfg.train.bf16, limit)
        console.print(tasks_table(results, title=f"{ckpt}"))
        return
    if text is not None:
        from photon.data.tokenizer import load_tokenizer
        from photon.train.evaluate_text import evaluate_text, text_domains

        domains = text_domains(text)
        with console.status(f"scoring {text}") as status:
            losses, counts = evaluate_text(
                model, load_tokenizer(tokenizer_path), domains, cfg.train.seq_len, cfg.train.batch_size,
                progress=lambda d, n: status.update(f"scoring {text}: {d}, {n:,} tokens"))
        console.print(eval_table(losses, title=f"{ckpt} on {text} ({counts['overall'][0]:,} tokens)",
                                 bpb=bits_per_byte(losses, counts)))
        return
    if data is not None:
        cfg = with_overrides(cfg, [f"data.prep_dir={data}"])
    prepared = open_data(cfg)  # refuses data of another vocabulary
    check_same_data(cfg, meta, prepared, ckpt)  # and of another tokenizer
    t = cfg.train
    evaluable_domains(prepared, t.seq_len)
    n = batches or t.eval_batches
    losses = evaluate(model, prepared, t.seq_len, t.batch_size, n, t.bf16)
    bpb = bits_per_byte(losses, scored_bytes(prepared, t.seq_len, t.batch_size, n))
    console.print(eval_table(losses, title=f"{ckpt}", bpb=bpb))


@app.command()
def export(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint folder or run directory.")],
    hf: Annotated[Path, typer.Option("--hf", help="Output dir loadable by transformers' from_pretrained.")],
) -> None:
    """Write a Hugging Face LlamaForCausalLM + tokenizer directory."""
    from photon.checkpoint import load_model_checkpoint
    from photon.model.hf import export_hf

    model, cfg, _, tokenizer = load_model_checkpoint(ckpt)
    export_hf(model, cfg.model, tokenizer, hf)
    console.print(f"exported to {hf} (load with AutoModelForCausalLM.from_pretrained({str(hf)!r}))")


@app.command()
def generate(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint folder or run directory.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "The",
    tokens: Annotated[int, typer.Option(min=1, help="New tokens to sample.")] = 80,
    temperature: Annotated[float, typer.Option(min=0.01, max=100.0)] = 0.8,
    top_k: Annotated[int, typer.Option(min=1)] = 50,
    seed: Annotated[int, typer.Option(min=0, max=2**63 - 1)] = 0,
) -> None:
    """Sample a continuation of PROMPT."""
    import torch

    if not math.isfinite(temperature):  # click's range check lets nan through
        raise UserError(f"--temperature {temperature}: give a number from 0.01 to 100, e.g. 0.8")

    from photon.checkpoint import load_model_checkpoint
    from photon.data.tokenizer import load_tokenizer

    model, _, _, tok_path = load_model_checkpoint(ckpt)
    tok = load_tokenizer(tok_path)
    ids = tok.encode(prompt).ids or [0]
    gen = torch.Generator().manual_seed(seed)
    out = model.generate(torch.tensor([ids]), tokens, temperature=temperature, top_k=top_k, generator=gen)
    console.print(tok.decode(out[0].tolist()), markup=False, highlight=False, soft_wrap=True)  # as generated


@app.command()
def plot(run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
         out: Annotated[Optional[str], typer.Option(help="Output file: .png, .pdf or .svg (no suffix: .png), or a "
                                                    "folder, existing or ending in / (default RUN_DIR/curves.png).")]
         = None) -> None:
    """Draw the loss / perplexity curves of a run (PNG, PDF or SVG)."""
    from photon.display import plot_run

    console.print(f"wrote {plot_run(run_dir, out)}")


@app.command()
def run(
    preset: PresetOpt = "small",
    overrides: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory (default runs/<preset>-federated).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the federated run in this directory with the "
                                                   "config saved there; --set still applies on top (e.g. "
                                                   "federation.rounds=20 --set federation.schedule_rounds=<the "
                                                   "original rounds> to run longer on the LR floor); --preset is "
                                                   "ignored.")] = None,
    engine: Annotated[str, typer.Option(help="simulation (Flower, default) or inprocess (no Flower: tasks run one "
                                        "at a time, timed by a virtual clock; deterministic, for debugging and "
                                        "straggler/async studies).")]
    = "simulation",
    cache: Annotated[Path, typer.Option(help="Where downloaded source archives are kept.")] = Path("data/sources"),
) -> None:
    """Federated pre-training on this machine: prepares data on first use, then runs Photon's rounds."""
    if engine not in ENGINES:  # before data is prepared (minutes on first use)
        raise UserError(f"--engine {engine!r}: choose {' or '.join(ENGINES)}")
    from photon.config import with_absolute_prep_dir

    if resume is not None:
        if out is not None:
            raise UserError(f"--out does not go with --resume: the run continues in {resume}")
        cfg = with_absolute_prep_dir(flags_config(preset, overrides, saved=resume))
        run_dir = resume
    else:
        cfg = with_absolute_prep_dir(flags_config(preset, overrides))
        run_dir = out or Path("runs") / f"{cfg.name}-federated"
        from photon.checkpoint import refuse_a_taken_run_dir

        refuse_a_taken_run_dir(run_dir)  # before data is prepared and Ray started (seconds to minutes)
    cfg.check_federated_schedule()  # so is a warmup longer than the schedule, and a run too big to fit
    check_run_fits(cfg, engine)
    ensure_prepared(cfg, cache, built_in=False if resume is not None else None)
    try:
        summary = run_federated(cfg, run_dir, resume=resume is not None, engine=engine, console=console)
    except KeyboardInterrupt:
        from photon.launch.simulation import exit_after_interrupt

        err_console.print(f"interrupted; the run keeps its last checkpoint: continue it with photon run --resume "
                          f"{run_dir}", highlight=False, soft_wrap=True)
        exit_after_interrupt(130)
    console.print(f"run directory: {summary['run_dir']}")


@app.command()
def presets() -> None:
    """List the presets with their model sizes."""
    from photon.model.transformer import describe

    for name in preset_names():
        cfg = load_config(name)
        console.print(f"[bold]{name:12s}[/] {describe(cfg.model)}")
