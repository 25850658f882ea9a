"""Turns run logs into what people read: per-evaluation tables on the console and curves (PNG, PDF or SVG).

Reads only `metrics.jsonl` (see `photon.runlog`), so a plot can be redrawn from any finished or running run.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from rich.table import Table
from rich.text import Text

from photon.errors import UserError
from photon.runlog import METRICS, eval_losses, read_metrics
from photon.train.evaluate import OVERALL, perplexity


def eval_table(losses: dict[str, float], title: str, before: dict[str, float] | None = None,
               bpb: dict[str, float] | None = None) -> Table:
    """Loss and perplexity per domain; with `before`, the perplexity before training beside it; with `bpb`,
    bits per byte (comparable across tokenizers)."""
    table = Table(title=Text(title, no_wrap=True, overflow="ignore"), title_justify="left")  # wider than the rows
    table.add_column("domain")
    if before:
        table.add_column("ppl before", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("ppl", justify="right")
    if bpb:
        table.add_column("bits/byte", justify="right")
    for domain, loss in losses.items():
        row = [f"[bold]{domain}[/]" if domain == OVERALL else domain]
        if before:
            row.append(f"{perplexity(before[domain]):.1f}" if domain in before else "-")
        row += [f"{loss:.4f}", f"{perplexity(loss):.1f}"]
        if bpb:
            row.append(f"{bpb[domain]:.3f}" if domain in bpb else "-")
        table.add_row(*row)
    return table


def tasks_table(results: dict[str, dict[str, float]], title: str) -> Table:
    """The harness's metrics: a row per task and metric."""
    table = Table(title=Text(title, no_wrap=True, overflow="ignore"), title_justify="left")
    for name, justify in (("task", "left"), ("metric", "left"), ("value", "right")):
        table.add_column(name, justify=justify)
    for task, metrics in results.items():
        for i, (metric, value) in enumerate(metrics.items()):
            table.add_row(task if i == 0 else "", metric, f"{value:.4f}")
    return table


# The formats `plot_run` writes, chosen by the --out suffix (a name without one gets .png).
PLOT_FORMATS = (".png", ".pdf", ".svg")
PLOT_NAME = "curves.png"


def plot_path(run_dir: Path, out: Path | str | None = None) -> Path:
    """Where `plot_run` writes: RUN_DIR/curves.png by default, DIR/curves.png for an existing folder DIR or a
    name ending in a slash (`DIR/`, as typed; a `Path` drops the slash), NAME.png for a NAME without a suffix;
    a suffix other than those in `PLOT_FORMATS` is a UserError."""
    if out is None:
        return Path(run_dir) / PLOT_NAME
    folder = str(out).endswith(os.sep)
    out = Path(out)
    if folder or out.is_dir():
        return out / PLOT_NAME
    if not out.suffix:
        return out.with_name(out.name + ".png")
    if out.suffix.lower() not in PLOT_FORMATS:
        raise UserError(f"{out}: cannot write a {out.suffix!r} plot; end --out with one of "
                        f"{', '.join(PLOT_FORMATS)} (a name without a suffix gets .png)")
    return out


def plot_run(run_dir: Path, out: Path | str | None = None) -> Path:
    """Draw training loss (left) and validation perplexity per domain (right) against steps into `plot_path`
    (PNG, PDF or SVG by its suffix); returns the path written."""
    out = plot_path(run_dir, out)
    rows = read_metrics(run_dir)
    if not rows:
        metrics = Path(run_dir) / METRICS
        if not Path(run_dir).is_dir():
            what = "is a file" if Path(run_dir).exists() else "does not exist"
            raise UserError(f"{run_dir} {what}; pass a run directory made by photon train-central/run")
        if metrics.is_file():
            raise UserError(f"{metrics} is empty (no complete row logged yet); plot once the run has logged a step")
        raise UserError(f"{run_dir} has no {METRICS}; pass a run directory made by photon train-central/run")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
    ax_loss.set(xlabel="global step", ylabel="train loss", title="training loss")
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in evals:
        for domain, loss in eval_losses(r).items():
            curves[domain].append((r["step"], perplexity(loss)))
    for domain, points in sorted(curves.items()):
        xs, ys = zip(*points)
        ax_ppl.plot(xs, ys, marker="o", ms=3, lw=2.5 if domain == OVERALL else 1, label=domain)
    ax_ppl.set(xlabel="global step", ylabel="validation perplexity", title="validation perplexity", yscale="log")
    if curves:
        ax_ppl.legend(fontsize=7)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)  # --out plots/curves.png makes plots/
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
