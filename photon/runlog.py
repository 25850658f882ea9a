"""Where a run's numbers go: one JSON line per event in `RUN_DIR/metrics.jsonl`, mirrored to TensorBoard.

JSONL is the source of truth (plots, tables and benchmarks read it back); TensorBoard is for watching live.
On resume, lines past the checkpoint being resumed are dropped so the log matches the restored state.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
LOSS = "loss/"  # an eval row's per-domain validation losses are logged as loss/<domain>


def eval_losses(row: dict[str, Any]) -> dict[str, float]:
    """The per-domain losses an eval row logged, keyed by domain (`overall` included)."""
    return {k.removeprefix(LOSS): v for k, v in row.items() if k.startswith(LOSS)}


class RunLog:
    def __init__(self, run_dir: Path, resume_step: int | None = None, step_key: str = "step",
                 tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.run_dir) if r.get(step_key, 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import (
                SummaryWriter,  # slow import: only when logging for real
            )

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, kind: str, step: int, **metrics: Any) -> None:
        row = {"kind": kind, "step": step, "time": time.time(), **metrics}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line torn by a crash ends the log
        if not isinstance(row, dict) or "kind" not in row or "step" not in row:
            break  # nor a line this log never wrote (damaged): what is read is what came before it
        rows.append(row)
    return rows
