"""Where a benchmark's numbers are kept: one JSON file per benchmark under `docs/results/`, committed.

Each file holds the numbers, the exact command that produced them, the date, and the machine (cores, CPU,
torch version, and the load average sampled while the benchmark ran, since this 2-core machine is often
shared). `photon bench report` renders docs/RESULTS.md from these files and nothing else (`publish.py`).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from photon.config import same_config
from photon.errors import UserError

RESULTS_DIR = Path("docs/results")
IMG_DIR = Path("docs/img")  # the published plots, beside the published records


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class LoadSampler:
    """Samples the 1-minute load average every `every_s` seconds while a benchmark runs."""

    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every_s):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        s = self.samples or [os.getloadavg()[0]]
        return {"mean": round(sum(s) / len(s), 2), "max": round(max(s), 2)}


def machine(load: LoadSampler | None = None) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cores": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__,
                            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if load is not None:
        info["load_average"] = load.summary()
    return info


def finished_arm(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """What a benchmark arm stored in `run_dir/done.json` when it finished, if it finished with this config
    (a config-dict, `config_to_dict`; a field added since the arm ran matches at its default); None when the
    arm has to run (again)."""
    done = Path(run_dir) / "done.json"
    if not done.exists():
        return None
    stored = json.loads(done.read_text())
    return stored if isinstance(stored.get("config"), dict) and same_config(stored["config"], config) else None


def command_line() -> str:
    """The command as the user typed it (`photon ...`)."""
    argv0 = Path(sys.argv[0])
    typed_photon = argv0.name == "photon" or argv0.parts[-2:] == ("cli", "__main__.py")  # or python -m photon.cli
    return shlex.join(["photon", *sys.argv[1:]]) if typed_photon else shlex.join(sys.argv)


_STORE = {"dir": RESULTS_DIR}  # `photon bench --results DIR`: where this process's benchmarks store records


def store_results_in(results_dir: Path) -> None:
    """Where `save_result` writes when not told (`photon bench --results`: a trial run leaves the published
    records in docs/results as they are)."""
    _STORE["dir"] = Path(results_dir)


def chosen_results_dir() -> Path:
    return _STORE["dir"]


def is_published(results_dir: Path) -> bool:
    """Whether `results_dir` is docs/results, the folder `photon bench report` renders into the docs."""
    return Path(results_dir).resolve() == RESULTS_DIR.resolve()


def plots_dir(results_dir: Path | None = None) -> Path:
    """Where a benchmark storing its record in `results_dir` (default: the chosen folder) draws its plots:
    docs/img beside the published records, DIR/img beside a trial run's (`photon bench --results DIR`), so a
    trial leaves the published plots as they are too."""
    chosen = Path(chosen_results_dir() if results_dir is None else results_dir)
    return IMG_DIR if is_published(chosen) else chosen / "img"


def save_result(name: str, data: dict[str, Any], load: LoadSampler | None = None, command: str | None = None,
                results_dir: Path | None = None, started: float | None = None) -> Path:
    """Write `results_dir/<name>.json` (default: `store_results_in`'s folder, docs/results unless changed): the
    numbers plus how, when and where they were measured."""
    results_dir = chosen_results_dir() if results_dir is None else results_dir
    record = {"name": name, "command": command or command_line(),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
              "wall_seconds": round(time.time() - started, 1) if started else None,
              "machine": machine(load), "data": data}
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def load_result(path: Path) -> dict[str, Any]:
    """One stored record, checked for the fields every report block reads (UserError naming the file if not)."""
    fix = "restore it (git checkout) or rerun the benchmark that writes it"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: holds a JSON {type(record).__name__}, not a benchmark record (an object); {fix}")
    missing = [k for k, kind in (("command", str), ("date", str), ("data", dict))
               if not isinstance(record.get(k), kind)]
    if missing:
        raise UserError(f"{path}: lacks {', '.join(map(repr, missing))} (or has the wrong type); {fix}")
    if not isinstance(record.get("machine", {}), dict):
        raise UserError(f"{path}: 'machine' is not an object; {fix}")
    if record.get("name", path.stem) != path.stem:
        raise UserError(f"{path}: records the name {record['name']!r}, not {path.stem!r}; rename the file to match")
    return record


def load_results(results_dir: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    """Every `results_dir/NAME.json` as NAME -> record; a missing folder or a damaged file is a UserError."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise UserError(f"{results_dir}: no such results folder; pass the folder the benchmarks wrote, "
                        f"e.g. --results {RESULTS_DIR}")
    return {path.stem: load_result(path) for path in sorted(results_dir.glob("*.json"))}


def publish(name: str, data: dict[str, Any], render, load: LoadSampler, started: float, console,
            note: str = "", results_dir: Path | None = None) -> Path:
    """Store a benchmark's numbers (`save_result`), show them as the report will, and say where they went."""
    path = save_result(name, data, load, started=started, results_dir=results_dir)
    console.print(render(data))
    console.print(f"stored in {path}{note}")
    return path


def eval_bytes(cfg: Any, batch: int, rows: int) -> dict[str, list[int]]:
    """[tokens scored, UTF-8 bytes of their text] per domain and overall, for the `rows` validation rows a
    benchmark's arms score in batches of `batch` (cfg's data and sequence length): a property of the data
    alone, so a report turns each stored loss into bits per byte."""
    from photon.data.shards import open_prepared
    from photon.train.evaluate import scored_bytes

    prepared = open_prepared(cfg.data.prep_dir)
    return {d: list(c) for d, c in scored_bytes(prepared, cfg.train.seq_len, batch, rows // batch).items()}


def store_eval_bytes(path: Path, counts: dict[str, Any]) -> dict[str, Any]:
    """Add `eval_bytes` (per domain: [tokens scored, UTF-8 bytes of their text]) to the stored record at
    `path`, which lacks them, so its stored losses read as bits per byte. The counts are a property of the data
    and of the validation rows the benchmark scores, not of training; every other field stays as measured."""
    if not path.exists():
        raise UserError(f"{path}: no stored record to add the evaluation bytes to; run the benchmark first")
    record = load_result(path)
    record["data"]["eval_bytes"] = {d: list(c) for d, c in counts.items()}
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record["data"]["eval_bytes"]
