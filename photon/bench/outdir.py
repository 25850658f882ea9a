"""A benchmark's own output folder (`--out`): replaced by each run, but only when a benchmark made it.

Benchmarks that start from nothing (federation, wire, demo, prepare) clear their `--out` first. A mistyped
`--out` (`.`, `runs`, a run directory) must not be wiped, so the folder a benchmark makes holds a marker file,
and only a folder with that marker, or an empty one, is ever cleared.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from photon.errors import UserError

MARK = ".photon-bench"


def fresh_out_dir(out: Path) -> Path:
    """`out` empty but for the marker: made if missing, cleared if a benchmark made it, refused otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the benchmark's runs")
    if out.is_dir() and (out / MARK).is_file():
        shutil.rmtree(out)
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} holds files no photon benchmark made, and a benchmark clears its --out "
                        "first; pass a new folder (or empty this one)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARK).write_text("Made by `photon bench`: the next benchmark run with this --out clears this folder.\n")
    return out
