"""What every command group shares: the typer apps, the consoles, the common options, and the config a
command builds from its preset, --set and --data."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from photon.config import RunConfig, load_config, load_saved_config, preset_names
from photon.errors import UserError

# suggest_commands=False: click itself suggests a close command; typer's own suggestion would say it twice
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, suggest_commands=False,
                  help="Photon: federated pre-training of language models on Flower.")
bench_app = typer.Typer(no_args_is_help=True, suggest_commands=False,
                        help="Benchmarks: ratios against a baseline run in the same call.")
app.add_typer(bench_app, name="bench")
console = Console()
err_console = Console(stderr=True)
STATE = {"debug": False}

PresetOpt = Annotated[str, typer.Option("--preset", "-p", help=f"Preset name ({', '.join(preset_names())}) "
                                        "or a YAML file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override, e.g. train.lr=3e-4 (repeatable).")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Prepared data dir (default: the preset's "
                                                "data.prep_dir; for a run or checkpoint, the run's).")]


def _print_version(value: bool) -> None:
    if value:
        import torch

        from photon import __version__

        console.print(f"photon {__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})",
                      highlight=False)
        raise typer.Exit()


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
          version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    STATE["debug"] = debug
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def flags_config(preset: str, overrides: list[str] | None, data: Path | None = None, saved: Path | None = None,
            data_flag: str = "--data", **extra: object) -> RunConfig:
    """The preset (or, with `saved`, that run directory's config.json) plus --set, --data (`data_flag`: the flag
    that gave it) and other flags."""
    sets = list(overrides or [])
    if data is not None:
        if any(s.split("=", 1)[0].strip() == "data.prep_dir" for s in sets):
            raise UserError(f"{data_flag} and --set data.prep_dir both name the prepared data; give one of them")
        sets.append(f"data.prep_dir={data}")
    sets += [f"{k}={v}" for k, v in extra.items() if v is not None]
    return load_saved_config(saved, sets) if saved is not None else load_config(preset, sets)



def numbers(text: str, kind: type, flag: str, example: str) -> tuple:
    """A comma-separated list of positive, finite numbers from a flag, or a one-line error naming it."""
    try:
        values = tuple(kind(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated {kind.__name__}s, e.g. {example}") from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise UserError(f"{flag} {text!r}: each must be a positive number, e.g. {example}")
    return values
