"""The centralized baseline: one site trains on the union of all domains, with the same local trainer.

Checkpoints every `train.ckpt_every` steps (model, AdamW state, data cursor, step) and resumes exactly: a
run stopped and resumed ends with parameters bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from photon.checkpoint import (
    hold_run_dir,
    list_checkpoints,
    load_latest,
    none_verified,
    prune_checkpoints,
    refuse_a_taken_run_dir,
    require_kind,
    save_checkpoint,
)
from photon.config import RunConfig, config_to_dict
from photon.data.shards import Prepared, TokenStream, open_prepared
from photon.display import eval_table
from photon.errors import UserError
from photon.model.transformer import (
    Transformer,
    load_unique_state_dict,
    unique_state_dict,
)
from photon.runlog import LOSS, RunLog
from photon.train.device import place, resolve_device, setup_backend
from photon.train.evaluate import OVERALL, bpb_fields, evaluable_domains, evaluate, scored_bytes
from photon.train.local import (
    load_optimizer_state_tensors,
    make_optimizer,
    optimizer_state_tensors,
    train_local,
)
from photon.train.run_tasks import open_run_tasks, tasks_due

log = logging.getLogger(__name__)


def open_data(cfg: RunConfig) -> Prepared:
    """The prepared corpus for `cfg`, checked against the model's vocabulary."""
    prepared = open_prepared(cfg.data.prep_dir)
    vocab = prepared.manifest["vocab_size"]
    if vocab != cfg.model.vocab_size:
        raise UserError(f"{cfg.data.prep_dir} was prepared with vocab_size={vocab} but model.vocab_size="
                        f"{cfg.model.vocab_size}; run `photon prepare` with this preset, or point data.prep_dir "
                        "elsewhere (--set data.prep_dir=PATH, or --data where the command has it)")
    return prepared


def check_same_data(cfg: RunConfig, meta: dict, prepared: Prepared, where: Path) -> None:
    """Refuse data tokenized by another tokenizer than the checkpoint's (the checkpoint keeps a copy of its
    tokenizer and that copy's SHA-256): whatever its vocabulary size, its token ids mean other things to the
    model. A folder prepared again from other text, or the wrong folder, is caught here."""
    saved, now = meta.get("files", {}).get("tokenizer.json"), prepared.manifest.get("tokenizer_sha256")
    if saved and now and saved != now:
        raise UserError(f"{cfg.data.prep_dir} was tokenized by another tokenizer than {where}, so its token ids "
                        "mean other things to this model; use the data the run was trained on (--set "
                        "data.prep_dir=PATH, or --data where the command has it)")


def build_model(cfg: RunConfig) -> Transformer:
    torch.manual_seed(cfg.train.seed)
    return Transformer(cfg.model)


def check_same_model(cfg: RunConfig, meta: dict, where: Path) -> None:
    """Refuse to resume with a model shape, or a data order, other than the checkpoint's."""
    saved = meta.get("config", {})
    if saved.get("model") is not None and saved["model"] != cfg.model.model_dump(mode="json"):
        raise UserError(f"{where} was trained with a different model shape ({saved['model']}); "
                        "resume with the same preset and overrides, or use another --out")
    for key in ("batch_size", "seq_len", "seed"):  # these decide which tokens the cursor points at
        was, now = saved.get("train", {}).get(key), getattr(cfg.train, key)
        if was is not None and was != now:
            raise UserError(f"{where} was trained with train.{key}={was}, not {now}: the data cursor would "
                            "point at other tokens; resume with the saved config")


def train_central(cfg: RunConfig, run_dir: Path, resume: bool = False, stop_at: int | None = None,
                  console: Console | None = None, keep_checkpoints: int | None = None) -> dict[str, float]:
    """Train for `cfg.train.steps` steps (or stop early at `stop_at`); returns the last evaluation."""
    console = console or Console()
    cfg.check_central_schedule()
    tcfg = cfg.train
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    prepared = open_data(cfg)
    evaluable_domains(prepared, tcfg.seq_len)  # before any step: a run that cannot be evaluated is refused
    tasks = open_run_tasks(tcfg, prepared.tokenizer_path)  # so is one whose harness tasks cannot run
    device = resolve_device(tcfg.device)
    setup_backend(device)
    model = build_model(cfg)
    trainable = place(model, tcfg, device)
    optimizer = make_optimizer(model, tcfg)
    stream = TokenStream([prepared.tokens(d, "train") for d in prepared.domains], tcfg.seq_len,
                         tcfg.batch_size, tcfg.seed)
    ckpt_dir = Path(run_dir) / "checkpoints"
    if resume and not list_checkpoints(ckpt_dir):  # said before the lock makes a folder of a mistyped name
        raise UserError(f"no checkpoint under {ckpt_dir} to resume from; run without --resume")
    with hold_run_dir(Path(run_dir), say=console.print):  # one writer per run folder
        step, cursor = 0, 0
        if resume:
            found = load_latest(ckpt_dir)
            if found is None:
                raise none_verified(ckpt_dir)
            path, tensors, meta = found
            require_kind(meta, "central", path)
            check_same_model(cfg, meta, path)
            check_same_data(cfg, meta, prepared, path)
            load_unique_state_dict(model, tensors["model"])
            load_optimizer_state_tensors(model, optimizer, tensors.get("optimizer", {}))
            step, cursor = meta["step"], meta["cursor"]
            if step >= tcfg.steps:
                raise UserError(f"{path} is at step {step} and the run's schedule ends at train.steps={tcfg.steps}: "
                                f"nothing left to train; pass --steps larger than {step} to train on")
            console.print(f"resumed from {path} at step {step}")
        else:
            refuse_a_taken_run_dir(run_dir)

        runlog = RunLog(run_dir, resume_step=step if resume else None)
        (Path(run_dir) / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
        total = tcfg.steps
        end = min(total, stop_at) if stop_at is not None else total
        console.print(f"centralized: {model.num_params() / 1e6:.2f}M parameters, {total} steps of "
                      f"{tcfg.batch_size}×{tcfg.seq_len} tokens on {device}, data {cfg.data.prep_dir}")

        eval_bytes = scored_bytes(prepared, tcfg.seq_len, tcfg.batch_size, tcfg.eval_batches)

        def run_eval(at: int) -> dict[str, float]:
            losses = evaluate(model, prepared, tcfg.seq_len, tcfg.batch_size, tcfg.eval_batches, tcfg.bf16)
            runlog.log("eval", at, **{f"{LOSS}{k}": v for k, v in losses.items()}, **bpb_fields(losses, eval_bytes))
            console.print(eval_table(losses, title=f"validation at step {at}"))
            if tasks is not None and tasks_due(at, tcfg.eval_every, tcfg.eval_tasks_every, at == total):
                tasks.run(model, runlog, at, console)
            return losses

        losses = run_eval(step) if step == 0 else {}
        progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=console,
                            transient=True, disable=not console.is_terminal)  # a log gets the eval tables only

        with progress:
            task = progress.add_task("train", total=total, completed=step, loss="-")

            def on_step(s: int, loss: float, lr: float) -> None:
                runlog.log("train", s + 1, loss=loss, lr=lr)
                progress.update(task, advance=1, loss=f"{loss:.3f}")

            while step < end:
                nxt = min(end, (step // tcfg.eval_every + 1) * tcfg.eval_every,
                          (step // tcfg.ckpt_every + 1) * tcfg.ckpt_every)
                result = train_local(trainable, optimizer, stream, cursor, step, nxt - step, tcfg, total, on_step)
                step, cursor = nxt, result.cursor
                if step % tcfg.eval_every == 0 or step == total:
                    progress.stop()
                    losses = run_eval(step)
                    progress.start()
                if step % tcfg.ckpt_every == 0 or step == end:
                    save_checkpoint(ckpt_dir / f"step_{step:08d}", {
                        "model": unique_state_dict(model),
                        "optimizer": optimizer_state_tensors(model, optimizer),
                    }, {"kind": "central", "step": step, "cursor": cursor, "config": config_to_dict(cfg),
                        "tokenizer_sha256": prepared.manifest.get("tokenizer_sha256")},
                        extra_files=(prepared.tokenizer_path,))
                    prune_checkpoints(ckpt_dir, keep_checkpoints or tcfg.keep_checkpoints)
        runlog.close()
        if losses:
            console.print(f"final validation loss {losses[OVERALL]:.4f}")
        return losses
