"""Atomic, checksummed checkpoints: a folder of safetensors files plus one JSON of metadata.

Every checkpoint (centralized step, federated round) is written to a temporary folder, every file and the
folder fsynced, then renamed, so a crash (of the process or of the machine) leaves either the old checkpoint or
the new one, never half of one. Its files are then dropped from the page cache: only a resume reads them.
`meta.json` records the SHA-256 of every tensor file; a damaged file is detected at load and the previous good
checkpoint is used.
Tensors only: nothing here is pickled.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from photon.digest import sha256_file
from photon.errors import UserError

log = logging.getLogger(__name__)
META = "meta.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_and_uncache(path: Path) -> None:
    """Flush a written file to disk (so the rename that publishes its checkpoint never points at bytes a power
    loss could take back), then tell the kernel its pages need not stay cached: a checkpoint is read again only
    to resume, and a model-sized one would otherwise push hotter pages out of the page cache (the uploads the
    blob server receives into, the model blob nodes fetch)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so that readers see the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


RUN_LOCK = ".lock"
# Everything Photon writes into a run folder (runs, train-central, the benchmarks' arms and their --out marker),
# beside which a new run may start: an empty folder, one a run left in its first round, or one with dot-files and
# logs a user or a scheduler put there (`tee RUN/run.log`, Slurm's `--output`). Anything else (an export, a
# corpus) would be written over.
RUN_FOLDER_NAMES = frozenset({
    RUN_LOCK, "config.json", "partition.json", "metrics.jsonl", "tensorboard", "curves.png", "checkpoints",
    "client_state", "node-cache", "blobs", ".spill", "node", "node-state", "done.json", "failed.json",
    ".photon-bench"})
LOG_SUFFIXES = (".log", ".out", ".err")


def refuse_a_taken_run_dir(run_dir: Path) -> None:
    """A new run may not start in a folder that holds another run's checkpoints, or things Photon did not write
    there (an export, a corpus: the run would write over them); dot-files and log files are left alone."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file; choose a folder for --out")
    if list_checkpoints(run_dir / "checkpoints"):
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FOLDER_NAMES
                     and not p.name.startswith(".") and not (p.is_file() and p.suffix in LOG_SUFFIXES))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UserError(f"{run_dir} holds files that are not a photon run's ({shown}); a run would write among "
                        "them: choose a new or empty folder for --out")


def refuse_a_resume_of_no_run(run_dir: Path) -> None:
    """`--resume` of a folder without the run's `config.json`: a mistyped name must not start a new run (nor be
    made by the run-folder lock)."""
    if not (Path(run_dir) / "config.json").is_file():
        raise UserError(f"{run_dir} holds no run to resume (no config.json); check the run folder's name, or "
                        "start a new run without --resume")


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, wait_s: float = 0.0, say: Callable[[str], None] = log.info) -> Iterator[None]:
    """One writer per run folder: hold an exclusive lock on `run_dir/.lock` (holding the process id) while a
    run trains into it. Another process holding it is waited for up to `wait_s` seconds (a deployed server
    restarted after a kill can briefly overlap the old run's ServerApp, which Flower starts and ends), then
    refused with its process id. The kernel releases the lock when its holder exits, however it exits."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, waiting = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):  # a file system without locks
                    log.warning("cannot lock %s on this file system (%s): make sure only one process trains "
                                "into it", run_dir, e.strerror)
                    break
                if not isinstance(e, BlockingIOError):
                    raise
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if time.monotonic() >= deadline:
                    raise UserError(f"{run_dir} is in use by process {holder} (a photon run or server training "
                                    "into it); wait for it to end or stop it, then try again") from None
                if not waiting:
                    say(f"waiting up to {wait_s:.0f} s for process {holder} to release {run_dir}")
                    waiting = True
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        # Unlock before closing: a child forked while the lock was held (a process started between its fork and
        # its exec, on a busy machine) shares the lock through its copy of the descriptor, so a close alone could
        # leave the folder locked for a moment after the run returned, and a resume in this process refused.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def save_checkpoint(path: Path, tensors: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any],
                    extra_files: tuple[Path, ...] = ()) -> Path:
    """Write `path/` holding one `<group>.safetensors` per entry of `tensors`, copies of `extra_files`
    (the tokenizer, so a checkpoint stands alone) and `meta.json`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {}
    for group, tdict in tensors.items():
        fname = f"{group}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tdict.items()}, tmp / fname)
        files[fname] = sha256_file(tmp / fname)
        _sync_and_uncache(tmp / fname)
    for src in extra_files:
        shutil.copyfile(src, tmp / Path(src).name)
        files[Path(src).name] = sha256_file(tmp / Path(src).name)
        _sync_and_uncache(tmp / Path(src).name)
    atomic_write_text(tmp / META, json.dumps({"files": files, **meta}, indent=1))
    _fsync_dir(tmp)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read and verify a checkpoint folder; UserError naming the damaged file if a checksum fails."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.exists():
        raise UserError(f"{path} is not a checkpoint (no {META}); pass a folder under RUN_DIR/checkpoints/")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{meta_path} is corrupted (not JSON); use an earlier checkpoint") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path} is corrupted (not a JSON object); use an earlier checkpoint")
    files = meta.get("files")  # every checkpoint writes and lists its tensor files
    if not isinstance(files, dict) or not files:
        raise UserError(f"{meta_path} is corrupted (it lists no files); use an earlier checkpoint")
    unlisted = sorted(p.name for p in path.glob("*.safetensors") if p.name not in files)
    if unlisted:
        raise UserError(f"{meta_path} is corrupted (it lists no checksum for {', '.join(unlisted)}); use an "
                        "earlier checkpoint")
    tensors = {}
    for fname, digest in files.items():
        fpath = path / fname
        if not fpath.exists() or sha256_file(fpath) != digest:
            raise UserError(f"{fpath} is missing or corrupted (checksum mismatch); use an earlier checkpoint")
        if fname.endswith(".safetensors"):
            tensors[fname.removesuffix(".safetensors")] = load_file(fpath)
    return tensors, meta


RESUMED_BY = {"central": "photon train-central --resume --out RUN_DIR",
              "federated": "photon run --resume RUN_DIR (photon submit --resume on a server)"}


def require_kind(meta: dict[str, Any], kind: str, where: Path) -> None:
    """Refuse to resume a checkpoint another kind of run wrote (`meta["kind"]`: central or federated)."""
    found = meta.get("kind")
    if found is not None and found != kind:
        raise UserError(f"{where} is a checkpoint of a {found} run, not a {kind} one; continue it with "
                        f"{RESUMED_BY.get(found, 'the command that started it')}")


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint folders under `ckpt_dir`, oldest first (names sort by step/round)."""
    if not Path(ckpt_dir).is_dir():
        return []
    return sorted(p for p in Path(ckpt_dir).iterdir() if p.is_dir() and not p.name.startswith("."))


def load_latest(ckpt_dir: Path) -> tuple[Path, dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None:
    """The newest checkpoint that verifies; damaged ones are skipped with a warning."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            tensors, meta = load_checkpoint(path)
        except UserError as e:
            log.warning("skipping damaged checkpoint: %s", e)
            continue
        return path, tensors, meta
    return None


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (at least 2, so a damaged newest still has a fallback)."""
    for path in list_checkpoints(ckpt_dir)[: -max(keep, 2)]:
        shutil.rmtree(path, ignore_errors=True)


def none_verified(ckpt_dir: Path) -> UserError:
    """The refusal of a resume whose checkpoints all failed verification (each one's warning was logged)."""
    return UserError(f"every checkpoint in {ckpt_dir} failed verification (see the warnings above); restore one "
                     "from a backup or start a new run with another --out")


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run directory or its `checkpoints` folder (the newest checkpoint that
    verifies)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a checkpoint folder or a run directory")
    if (path / META).exists():
        return path
    holds = any((p / META).exists() for p in list_checkpoints(path))  # RUN_DIR/checkpoints itself
    found = load_latest(path if holds else path / "checkpoints")
    if found is None:
        raise UserError(f"{path} holds no checkpoint; pass RUN_DIR or RUN_DIR/checkpoints/<name>")
    return found[0]


def load_model_checkpoint(path: Path):
    """(model, config, meta, tokenizer.json path) from a checkpoint folder or run directory."""
    from photon.config import build_config
    from photon.model.transformer import Transformer, load_unique_state_dict

    path = resolve_checkpoint(path)
    tensors, meta = load_checkpoint(path)
    if "model" not in tensors or "config" not in meta:
        raise UserError(f"{path} holds no model; pass a checkpoint written by photon train-central or run")
    cfg = build_config(meta["config"])
    model = Transformer(cfg.model)
    load_unique_state_dict(model, tensors["model"])
    model.eval()
    return model, cfg, meta, path / "tokenizer.json"
