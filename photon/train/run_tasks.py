"""A run's `train.eval_tasks`: lm-evaluation-harness tasks on the model during a run, centralized or federated
(the global model, in the server process), at every `train.eval_tasks_every`-th evaluation and the last.

The names are checked when the run opens, so a bad one stops the run before it trains. Each time the tasks
run they are logged as a `tasks` row of `<task>/<metric>` fields (TensorBoard: `tasks/<task>/<metric>`). A
task that fails mid-run (a hub that went away) is a warning: the training goes on. The harness, an optional
extra, is imported only by a run that names tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn

from photon.config import TrainConfig
from photon.data.tokenizer import load_tokenizer
from photon.display import tasks_table
from photon.errors import UserError
from photon.runlog import RunLog


class RunTasks:
    def __init__(self, cfg: TrainConfig, tokenizer_path: Path):
        from photon.train.harness import resolve_tasks

        self.resolved = resolve_tasks(cfg.eval_tasks, "train.eval_tasks")
        self.cfg = cfg
        self.tokenizer = load_tokenizer(tokenizer_path)

    def run(self, model: nn.Module, runlog: RunLog, step: int, console: Console, **fields: Any
            ) -> dict[str, dict[str, float]]:
        """Run the tasks on `model`, log them (with `fields`, e.g. the round) and show them."""
        from photon.train.harness import evaluate_tasks

        t = self.cfg
        try:
            results = evaluate_tasks(model, self.tokenizer, t.eval_tasks, t.batch_size, t.bf16, t.eval_tasks_limit,
                                     "train.eval_tasks", self.resolved)
        except UserError as e:
            console.print(f"[yellow]warning:[/] train.eval_tasks not run at step {step}: {e}", highlight=False)
            return {}
        runlog.log("tasks", step, **fields, **{f"{task}/{metric}": v for task, metrics in results.items()
                                                for metric, v in metrics.items()})
        console.print(tasks_table(results, title=f"tasks at step {step}"))
        return results


def open_run_tasks(cfg: TrainConfig, tokenizer_path: Path) -> RunTasks | None:
    """The run's tasks, or None when `train.eval_tasks` names none."""
    return RunTasks(cfg, tokenizer_path) if cfg.eval_tasks else None


def tasks_due(position: int, eval_every: int, tasks_every: int, last: bool) -> bool:
    """Whether an evaluation at `position` (a step or a round) also runs the tasks: every `tasks_every`-th
    evaluation, and the last."""
    return last or position % (eval_every * tasks_every) == 0
