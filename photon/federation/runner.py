"""The federated run from the server's side: open it (set up or resume state), run its rounds (evaluate,
checkpoint), finish it (the summary and report).

Engine-free: the Flower ServerApp passes a Grid-backed transport, tests pass an in-process one. The server
checkpoints after every committed round, so `photon run --resume RUN_DIR` loses at most the round in flight
and ends with the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from photon.checkpoint import (
    atomic_write_text,
    hold_run_dir,
    list_checkpoints,
    none_verified,
    refuse_a_resume_of_no_run,
    refuse_a_taken_run_dir,
)
from photon.config import RunConfig, build_config, config_to_dict
from photon.data.partition import client_seed, client_stream, make_partition
from photon.data.shards import Prepared
from photon.digest import tensors_digest
from photon.display import eval_table, plot_run
from photon.errors import UserError
from photon.federation.aggregator import Aggregator, RoundResult, Transport
from photon.federation.client_state import StateFiles
from photon.federation.fold import DISAGREES
from photon.federation.server_state import ServerState, referenced_state_digests
from photon.model.transformer import load_unique_state_dict, unique_state_dict
from photon.runlog import LOSS, RunLog, eval_losses, read_metrics
from photon.train.centralized import (
    build_model,
    check_same_data,
    check_same_model,
    open_data,
)
from photon.train.device import release_freed_memory, resolve_device
from photon.train.evaluate import (
    OVERALL,
    bits_per_byte,
    bpb_fields,
    evaluable_domains,
    evaluate,
    perplexity,
    scored_bytes,
)
from photon.train.run_tasks import RunTasks, open_run_tasks, tasks_due

log = logging.getLogger(__name__)
TARGET_WINDOW = 3  # evaluations whose mean loss must reach a run's `target_loss`

# "MB down"/"MB up": everything the round moved (the model, and each client's kept AdamW state when it is backed
# up; metrics.jsonl has the two apart); "train s" is the busiest node's time inside local training; "round s"
# the round's wall time; "failed": replies turned away or lost (metrics.jsonl's `failures` says why).
COLUMNS = ("round", "ok", "failed", "loss", "val ppl", "bits/B", "MB down", "MB up", "train s", "round s")


def check_same_partition(cfg: RunConfig, meta: dict, run_dir: Path) -> None:
    """Refuse a resume that would hand the clients other data: their cursors and kept AdamW state belong to
    the partition they were trained on."""
    saved = meta.get("config", {}).get("data", {}).get("partition")
    now = cfg.data.partition.model_dump(mode="json")
    changed = ", ".join(f"data.partition.{k}={saved[k]!r} (not {now[k]!r})"  # keys both know: an older
                        for k in sorted(saved or {}) if k in now and saved[k] != now[k])  # checkpoint may lack some
    if changed:
        raise UserError(f"{run_dir} was trained with {changed}: the clients' cursors and kept state belong to "
                        "that partition; resume with the saved config, or start a new run with another --out")


def _open_state(cfg: RunConfig, run_dir: Path, resume: bool, prepared: Prepared,
                console: Console) -> tuple[ServerState, bool]:
    """The state to start from, and whether it came from a checkpoint."""
    ckpt_dir = run_dir / "checkpoints"
    found = ServerState.load_latest(ckpt_dir) if resume else None
    if resume and found is None:
        if list_checkpoints(ckpt_dir):
            raise none_verified(ckpt_dir)
        console.print(f"no checkpoint in {ckpt_dir} yet (killed during the first round?): starting from round 0")
    if found is not None:
        state, meta = found
        check_same_model(cfg, meta, ckpt_dir)
        check_same_data(cfg, meta, prepared, ckpt_dir)
        check_same_partition(cfg, meta, run_dir)
        check_same_schedule(cfg, meta, run_dir, done=state.round)
        if len(state.clients) != cfg.data.partition.num_clients:
            raise UserError(f"{run_dir} has {len(state.clients)} clients but data.partition.num_clients="
                            f"{cfg.data.partition.num_clients}; resume with the same config")
        console.print(f"resumed {run_dir} after round {state.round} (global step {state.global_step})")
        return state, True
    if not resume:  # (a resume killed in its first round starts from round 0 in its own folder)
        refuse_a_taken_run_dir(run_dir)
    params = {k: v.detach() for k, v in unique_state_dict(build_model(cfg)).items()}  # the model's own tensors
    return ServerState.fresh(params, cfg.data.partition.num_clients, cfg.train.seed), False


def check_same_schedule(cfg: RunConfig, meta: dict, run_dir: Path, done: int = 0) -> None:
    """Refuse a resume that would bend the LR schedule mid-run (e.g. --set federation.rounds=20 re-stretches
    the cosine over 20 rounds from wherever the run is): say how to extend a run on purpose instead. `done`:
    the rounds the run has trained."""
    try:
        saved = build_config(meta["config"])
    except Exception:  # an old or foreign checkpoint: the model check has already vetted what matters
        return
    was, now = saved.federated_steps, cfg.federated_steps
    if was != now:
        rounds, h = saved.federation.schedule_rounds or saved.federation.rounds, saved.federation.local_steps
        if cfg.federation.local_steps != h:
            advice = f"Resume with its H: --set federation.local_steps={h}"
        elif cfg.federation.rounds <= done:
            advice = (f"It has trained {done} rounds already, so federation.rounds={cfg.federation.rounds} asks for "
                      f"no more: to train on, set federation.rounds above {done} and add --set "
                      f"federation.schedule_rounds={rounds}")
        else:
            advice = f"To train longer on the LR floor add --set federation.schedule_rounds={rounds}"
        raise UserError(f"{run_dir} was started with an LR schedule of {was} global steps ({rounds} rounds × "
                        f"H={h}); this config makes it {now}, which would re-stretch the cosine mid-run. {advice}; "
                        "to change the schedule start a new run")
    for key in ("lr", "warmup_steps", "min_lr_ratio"):
        if getattr(saved.train, key) != getattr(cfg.train, key):
            raise UserError(f"{run_dir} was started with train.{key}={getattr(saved.train, key)}, not "
                            f"{getattr(cfg.train, key)}: that would bend the LR schedule mid-run; resume with the "
                            "saved value or start a new run")


def run_federation(cfg: RunConfig, run_dir: Path, transport: Transport, resume: bool = False,
                   console: Console | None = None, stop_after: int | None = None,
                   token_budget: int | None = None, lock_wait_s: float = 0.0,
                   lock_held: bool = False, target_loss: float | None = None) -> dict[str, Any]:
    """Run rounds until `federation.rounds` (or `stop_after` rounds in this call, or until `token_budget`
    training tokens have been folded, for benchmarks that compare arms at equal tokens, or until the mean
    validation loss of the last `TARGET_WINDOW` evaluations is at most `target_loss`, for benchmarks that time
    arms to a target); returns a summary.
    Another process training into `run_dir` is waited for up to `lock_wait_s` seconds, then refused;
    `lock_held`: the caller holds `run_dir`'s lock already (`launch.simulation.run_simulated`, around its blob
    server). Three steps: `open_run` (vet, set up or resume), `run_rounds`, `finish_run` (the summary)."""
    console = console or Console()
    run_dir = Path(run_dir)
    if resume:
        refuse_a_resume_of_no_run(run_dir)  # before the lock would make a folder of a mistyped name
    cfg.check_federated_schedule()
    device = resolve_device(cfg.train.device)  # a device this machine lacks: refused before the folder is written
    prepared = open_data(cfg)
    evaluable_domains(prepared, cfg.train.seq_len)  # before any round: a run that cannot be evaluated is refused
    partition = make_partition(prepared.manifest, cfg.data.partition)
    for c in partition["clients"]:  # every client can fill a batch: say so now, with the fix, not mid-round
        client_stream(prepared, partition, c["id"], cfg.train.seq_len, cfg.train.batch_size, client_seed(cfg, c["id"]))
    with contextlib.nullcontext() if lock_held else hold_run_dir(run_dir, lock_wait_s, say=console.print):
        run = open_run(cfg, run_dir, resume, prepared, partition, device, console)
        try:
            run_rounds(run, transport, stop_after, token_budget, target_loss)
        finally:  # an interrupt too: TensorBoard's buffered events are written
            run.runlog.close()
        return finish_run(run, token_budget)


@dataclass
class OpenRun:
    """A run being trained: its vetted config and data, its state (new or resumed) and where it writes."""

    cfg: RunConfig
    run_dir: Path
    console: Console
    prepared: Prepared
    state: ServerState
    agg: Aggregator
    next_round: Callable[[Transport], RoundResult]  # a synchronous round, or the async driver's next outer step
    keep: int  # checkpoints kept
    runlog: RunLog
    eval_model: torch.nn.Module
    quorum: int | None = None  # async: replies per outer step
    last: dict[str, float] = field(default_factory=dict)  # the latest evaluation's losses
    short_rounds: list[int] = field(default_factory=list)  # rounds that committed without some sampled clients
    screened_out: bool = False  # a drop was the direction screen's
    eval_bytes: dict[str, tuple[int, int]] | None = None  # tokens and text bytes the evaluation scores
    tasks: RunTasks | None = None  # train.eval_tasks, if the run names any

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def evaluate(self, last: bool = False) -> dict[str, float]:
        """The validation losses of θ, logged; and the harness tasks, when due (`last`: the run's last round)."""
        # On the CPU the evaluation model reads θ itself (no second copy of the model on the server)
        t, state = self.cfg.train, self.state
        on_cpu = next(self.eval_model.parameters()).device.type == "cpu"
        load_unique_state_dict(self.eval_model, state.params, share=on_cpu)
        losses = evaluate(self.eval_model, self.prepared, t.seq_len, t.batch_size, t.eval_batches, t.bf16)
        if self.eval_bytes is None:
            self.eval_bytes = scored_bytes(self.prepared, t.seq_len, t.batch_size, t.eval_batches)
        self.runlog.log("eval", state.global_step, round=state.round, tokens=state.totals.get("tokens", 0),
                        clock=state.clock, **{f"{LOSS}{k}": v for k, v in losses.items()},
                        **bpb_fields(losses, self.eval_bytes))
        if self.tasks is not None and tasks_due(state.round, self.cfg.federation.eval_every, t.eval_tasks_every, last):
            self.tasks.run(self.eval_model, self.runlog, state.global_step, self.console, round=state.round,
                           tokens=state.totals.get("tokens", 0))
        return losses

    def tokens_left(self, token_budget: int | None) -> bool:
        return token_budget is None or self.state.totals.get("tokens", 0) < token_budget


def open_run(cfg: RunConfig, run_dir: Path, resume: bool, prepared: Prepared, partition: dict[str, Any],
             device: torch.device, console: Console) -> OpenRun:
    """Set up a new run's state or resume the last verified checkpoint; write the run's config and partition."""
    fed = cfg.federation
    state, found = _open_state(cfg, run_dir, resume, prepared, console)
    atomic_write_text(run_dir / "partition.json", json.dumps(partition, indent=1))  # once the config is vetted
    atomic_write_text(run_dir / "config.json", json.dumps(config_to_dict(cfg), indent=1))
    task_config = {**config_to_dict(cfg), "tokenizer_sha256": prepared.manifest.get("tokenizer_sha256")}
    agg = Aggregator(cfg, state, [c["spans"] for c in partition["clients"]], task_config,
                     spill_dir=run_dir / ".spill", state_dir=run_dir / "client_state")
    quorum = None
    if fed.mode == "async":
        from photon.federation.async_rounds import AsyncRounds

        driver = AsyncRounds(agg, run_dir / ".spill", run_dir / "checkpoints")
        next_round, keep = driver.step, max(fed.keep_checkpoints, fed.asynchronous.max_staleness + 2)  # in flight
        quorum = driver.quorum
    else:
        next_round, keep = agg.run_round, fed.keep_checkpoints
    eval_model = build_model(cfg).to(device)  # before the log opens: nothing to close if the model cannot be built
    tasks = open_run_tasks(cfg.train, prepared.tokenizer_path)  # so are harness tasks that cannot run
    runlog = RunLog(run_dir, resume_step=state.round if found else None, step_key="round")
    return OpenRun(cfg, run_dir, console, prepared, state, agg, next_round, keep, runlog, eval_model, quorum,
                   tasks=tasks)


def run_rounds(run: OpenRun, transport: Transport, stop_after: int | None = None,
               token_budget: int | None = None, target_loss: float | None = None) -> None:
    """Train rounds until the run's last (or `stop_after` more, or `token_budget` tokens, or `target_loss`
    reached): each committed round is logged, evaluated every `eval_every` rounds and checkpointed; a round
    short of `min_replies` is retried."""
    cfg, state, console, fed = run.cfg, run.state, run.console, run.cfg.federation
    mode = "" if fed.mode == "sync" else f"async (quorum {run.quorum}), "
    console.print(f"federation: {mode}{cfg.data.partition.num_clients} clients ({cfg.data.partition.kind}), "
                  f"{fed.clients_per_round} per round, H={fed.local_steps}, {fed.rounds} rounds, "
                  f"outer {fed.outer.name} lr {fed.outer.lr}, {len(transport.nodes())} node(s) now")
    first = run.evaluate() if state.round == 0 else None
    release_freed_memory()  # the evaluation model's own parameters, replaced by θ (CPU)
    run.last = first or {}
    if state.round >= fed.rounds:  # resumed after its last round: say so, and show its last evaluation
        ran = (f"its {fed.rounds} rounds" if state.round == fed.rounds else
               f"{state.round} rounds, past federation.rounds={fed.rounds}")  # a shortened --set rounds
        console.print(f"the run already ran {ran}: nothing to train. To train on: --resume with --set "
                      f"federation.rounds=<more than {state.round}> --set federation.schedule_rounds="
                      f"{fed.schedule_rounds or fed.rounds}", highlight=False)
        evals = [r for r in read_metrics(run.run_dir) if r["kind"] == "eval"]
        run.last = eval_losses(evals[-1]) if evals else {}
    else:
        console.print(" ".join(f"{c:>7s}" for c in COLUMNS))
    end = fed.rounds if stop_after is None else min(fed.rounds, state.round + stop_after)
    retries = 0
    # the last evaluations' overall losses (this run's, resumed ones included): a single evaluation is too
    # noisy to say a target was reached
    recent = deque((r[f"{LOSS}{OVERALL}"] for r in read_metrics(run.run_dir) if r["kind"] == "eval"),
                   maxlen=TARGET_WINDOW)
    while state.round < end and run.tokens_left(token_budget) and not _reached(recent, target_loss):
        result = run.next_round(transport)
        for node, reason in result.excluded.items():
            console.print(f"  [yellow]excluded node {node}[/] from the run (last error: {reason})", highlight=False)
        if not result.committed:
            retries += 1
            console.print(f"round {result.round + 1}: only {len(result.ok)} good replies "
                          f"(< {fed.min_replies}); retry {retries}/{fed.max_round_retries}")
            for cid, reason in sorted(result.dropped.items()):
                console.print(f"  [yellow]dropped[/] client {cid}: {reason}", highlight=False)
            if retries > fed.max_round_retries:
                raise UserError(f"round {result.round + 1} failed {retries} times; last errors: "
                                f"{'; '.join(result.failed[-2:])}")
            continue
        retries = 0
        state.clock = result.clock
        if result.dropped:
            run.short_rounds.append(state.round)
            run.screened_out |= any(DISAGREES in reason for reason in result.dropped.values())
        last = state.round == fed.rounds or not run.tokens_left(token_budget)
        if state.round % fed.eval_every == 0 or last:
            run.last = run.evaluate(last)
            recent.append(run.last[OVERALL])
        _log_round(run.runlog, state, result, run.last, run.eval_bytes, console)
        state.save(run.ckpt_dir, config_to_dict(cfg), extra_files=(run.prepared.tokenizer_path,), keep=run.keep)
        kept = referenced_state_digests(run.ckpt_dir) | state.state_digests()
        StateFiles(run.run_dir / "client_state").keep_only(kept)
        release_freed_memory()  # the round's replies and delta: back to the OS before the next round's


def _reached(recent: deque[float], target_loss: float | None) -> bool:
    return target_loss is not None and len(recent) == recent.maxlen and statistics.fmean(recent) <= target_loss


def finish_run(run: OpenRun, token_budget: int | None = None) -> dict[str, Any]:
    """The run's summary; a warning for rounds that committed short, and at its end the before/after table and
    the curves."""
    console, state, run_dir, short_rounds = run.console, run.state, run.run_dir, run.short_rounds
    if short_rounds:
        console.print(f"[yellow]warning:[/] {len(short_rounds)} of the rounds run here committed without some of "
                      f"their sampled clients (rounds {', '.join(map(str, short_rounds[:10]))}"
                      f"{' ...' if len(short_rounds) > 10 else ''}); see the 'dropped' lines above and "
                      f"{run_dir / 'metrics.jsonl'}" + (
                          ". An update the direction screen turned away can be an honest client's whose domain "
                          "has drifted from the others' (`federation.min_cosine`; docs/RELIABILITY.md)"
                          if run.screened_out else ""), highlight=False)
    summary = _summary(run_dir, state, run.last)
    summary["short_rounds"] = short_rounds
    if state.round >= run.cfg.federation.rounds or not run.tokens_left(token_budget):
        before = next((r for r in read_metrics(run_dir) if r["kind"] == "eval"), None)
        before_losses = eval_losses(before or {})
        bpb = bits_per_byte(run.last, run.eval_bytes) if run.eval_bytes else None
        console.print(eval_table(run.last, title=f"validation after {state.round} rounds", before=before_losses,
                                 bpb=bpb))
        summary["plot"] = str(plot_run(run_dir))
        console.print(f"curves: {summary['plot']}")
    return summary


def _log_round(runlog: RunLog, state: ServerState, r: RoundResult, losses: dict[str, float],
               eval_bytes: dict[str, tuple[int, int]] | None, console: Console) -> None:
    ppl = perplexity(losses[OVERALL]) if losses else float("nan")
    bpb = bits_per_byte(losses, eval_bytes).get(OVERALL, float("nan")) if losses and eval_bytes else float("nan")
    runlog.log("round", state.global_step, round=state.round, ok=len(r.ok), failed=len(r.failed),
               dropped=len(r.dropped), late=len(r.late), resent=r.resent, loss=r.loss, bytes_up=r.bytes_up, bytes_down=r.bytes_down,
               bytes_state_up=r.bytes_state_up, bytes_state_down=r.bytes_state_down, tokens=r.tokens,
               train_seconds=r.train_seconds, critical_train_seconds=r.critical_train_seconds,
               wall_seconds=r.wall_seconds, clock=r.clock, norms={str(k): v for k, v in r.norms.items()},
               cosines={str(k): v for k, v in r.cosines.items()}, folded=r.folded, failures=r.failed,
               clip_scales={str(k): v for k, v in r.clip_scales.items()}, accepted=r.ok, damping=r.damping)
    runlog.log("train", state.global_step, round=state.round, loss=r.loss)
    down, up = r.bytes_down + r.bytes_state_down, r.bytes_up + r.bytes_state_up  # all of it: the kept state too
    cells = (state.round, len(r.ok), len(r.failed), f"{r.loss:.4f}", f"{ppl:.1f}", f"{bpb:.3f}", f"{down / 1e6:.1f}",
             f"{up / 1e6:.1f}", f"{r.critical_train_seconds:.1f}", f"{r.wall_seconds:.1f}")
    console.print(" ".join(f"{c!s:>7s}" for c in cells))
    for cid in sorted(r.retried - set(r.dropped)):
        console.print(f"  [yellow]retried[/] client {cid}: it failed once, then succeeded", highlight=False)
    for cid, reason in sorted(r.dropped.items()):
        console.print(f"  [yellow]dropped[/] client {cid}: {reason}", highlight=False)
    if r.resent:
        console.print(f"  [yellow]re-sent[/] {r.resent} lost repl{'y' if r.resent == 1 else 'ies'}: asked for "
                      "again, not trained again", highlight=False)
    if r.late:
        console.print(f"  [yellow]ignored[/] {len(r.late)} late or duplicate repl{'y' if len(r.late) == 1 else 'ies'} "
                      f"(from {', '.join(r.late[:3])})", highlight=False)


def _summary(run_dir: Path, state: ServerState, losses: dict[str, float]) -> dict[str, Any]:
    return {"run_dir": str(run_dir), "rounds": state.round, "global_step": state.global_step,
            "losses": losses, "totals": dict(state.totals),
            "params_sha": tensors_digest(state.params)}
