"""The built-in corpus: where the shipped presets keep it, and its preparation on first use."""

from __future__ import annotations

from pathlib import Path

from photon.config import RunConfig, load_config, preset_names
from photon.errors import UserError


def is_built_in_folder(prep_dir: Path) -> bool:
    """`prep_dir` is where a shipped preset keeps the built-in corpus (data/prepared-v<vocab>, from here)."""
    return Path(prep_dir).absolute() in {load_config(name).data.prep_dir.absolute() for name in preset_names()}


def ensure_prepared(cfg: RunConfig, cache: Path = Path("data/sources"), built_in: bool | None = None) -> None:
    """First use: prepare the built-in offline corpus; afterwards whatever is in data.prep_dir is used.
    `built_in` False (a resume), or None and a folder other than a shipped preset's (a mistyped `--data`):
    missing data is an error, never silently replaced by the built-in corpus."""
    from photon.data.shards import prepare as do_prepare

    prep_dir = cfg.data.prep_dir
    if (prep_dir / "manifest.json").exists():
        return
    if built_in if built_in is not None else is_built_in_folder(prep_dir):
        do_prepare(cfg.data, cfg.model.vocab_size, source=None, cache_dir=cache)
        return
    raise UserError(f"data.prep_dir={prep_dir} holds no prepared data (no manifest.json); point at the run's data "
                    f"with --set data.prep_dir=PATH, or prepare it there first (photon prepare --out {prep_dir}, "
                    "with the run's preset, plus --data YOUR_TEXT unless it is the built-in corpus)")
