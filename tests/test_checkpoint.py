"""Checkpoints: round trip, atomic replace, damage detected and skipped, pruning, one writer per run folder, and
no pickle anywhere."""

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from photon.checkpoint import (
    META,
    hold_run_dir,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    prune_checkpoints,
    refuse_a_taken_run_dir,
    resolve_checkpoint,
    save_checkpoint,
)
from photon.errors import UserError

PHOTON = Path(__file__).parent.parent / "photon"


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(3, 4, generator=g), "b": torch.arange(5, dtype=torch.int64)},
            "optimizer": {"w.step": torch.tensor(7.0), "w.exp_avg": torch.randn(3, 4, generator=g)}}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for group in a:
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]) and a[group][k].dtype == b[group][k].dtype


def test_round_trip(tmp_path):
    extra = tmp_path / "tokenizer.json"
    extra.write_text('{"tok": 1}')
    path = save_checkpoint(tmp_path / "ckpts" / "step_00000010", _tensors(), {"step": 10, "cursor": 80},
                           extra_files=(extra,))
    assert sorted(p.name for p in path.iterdir()) == [META, "model.safetensors", "optimizer.safetensors",
                                                       "tokenizer.json"]
    tensors, meta = load_checkpoint(path)
    _assert_same(tensors, _tensors())
    assert meta["step"] == 10 and meta["cursor"] == 80
    assert set(meta["files"]) == {"model.safetensors", "optimizer.safetensors", "tokenizer.json"}
    assert (path / "tokenizer.json").read_text() == '{"tok": 1}'


def test_every_file_is_on_disk_before_the_checkpoint_is_published(tmp_path, monkeypatch):
    import os

    synced, real_fsync, real_replace = set(), os.fsync, os.replace
    published = {}

    def fsync(fd):
        synced.add(os.fstat(fd).st_ino)  # an inode keeps its number through renames
        real_fsync(fd)

    def replace(src, dst):  # the renames that publish a file, or the checkpoint's folder
        published[Path(dst).name] = set(synced)
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    extra = tmp_path / "tokenizer.json"
    extra.write_text("{}")
    path = save_checkpoint(tmp_path / "ckpts" / "round_000001", _tensors(), {"round": 1}, extra_files=(extra,))
    for f in path.iterdir():
        assert f.stat().st_ino in published[path.name], f"{f.name} was not fsynced before the checkpoint's rename"
    assert path.stat().st_ino in published[path.name]  # and the folder itself


def test_non_contiguous_and_view_tensors_are_saved(tmp_path):
    base = torch.randn(4, 6)
    path = save_checkpoint(tmp_path / "c", {"m": {"t": base.t(), "s": base[1]}}, {})
    tensors, _ = load_checkpoint(path)
    assert torch.equal(tensors["m"]["t"], base.t()) and torch.equal(tensors["m"]["s"], base[1])


def test_overwrite_keeps_one_checkpoint_and_no_temporaries(tmp_path):
    ck = tmp_path / "ckpts"
    save_checkpoint(ck / "step_1", _tensors(0), {"step": 1})
    save_checkpoint(ck / "step_1", _tensors(1), {"step": 1, "again": True})
    assert [p.name for p in ck.iterdir()] == ["step_1"]
    tensors, meta = load_checkpoint(ck / "step_1")
    _assert_same(tensors, _tensors(1))
    assert meta["again"] is True


def test_leftover_temporary_is_not_a_checkpoint(tmp_path):
    ck = tmp_path / "ckpts"
    save_checkpoint(ck / "step_1", _tensors(), {"step": 1})
    # A crash between mkdir and rename leaves a hidden temporary, maybe even complete: never listed.
    save_checkpoint(ck / ".step_2.tmp-123", _tensors(1), {"step": 2})
    (ck / ".step_3.tmp-99").mkdir()
    assert list_checkpoints(ck) == [ck / "step_1"]
    path, _, meta = load_latest(ck)
    assert path == ck / "step_1" and meta["step"] == 1


def test_list_checkpoints_sorted_and_missing_dir(tmp_path):
    assert list_checkpoints(tmp_path / "nope") == []
    assert load_latest(tmp_path / "nope") is None
    for s in (20, 3, 100):
        save_checkpoint(tmp_path / f"step_{s:08d}", {"m": {"x": torch.zeros(1)}}, {"step": s})
    (tmp_path / "notes.txt").write_text("not a folder")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000020", "step_00000100"]


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_byte, Path.unlink])
def test_damaged_tensor_file_is_a_user_error_and_latest_falls_back(tmp_path, damage, caplog):
    ck = tmp_path / "ckpts"
    save_checkpoint(ck / "step_00000001", _tensors(0), {"step": 1})
    save_checkpoint(ck / "step_00000002", _tensors(1), {"step": 2})
    damage(ck / "step_00000002" / "model.safetensors")
    with pytest.raises(UserError, match=r"model\.safetensors is missing or corrupted"):
        load_checkpoint(ck / "step_00000002")
    path, tensors, meta = load_latest(ck)
    assert path == ck / "step_00000001" and meta["step"] == 1
    _assert_same(tensors, _tensors(0))
    assert "skipping damaged checkpoint" in caplog.text


def test_damaged_meta_is_a_user_error(tmp_path):
    path = save_checkpoint(tmp_path / "c", _tensors(), {"step": 1})
    _truncate(path / META)
    with pytest.raises(UserError, match="not JSON"):
        load_checkpoint(path)
    (path / META).unlink()
    with pytest.raises(UserError, match="not a checkpoint"):
        load_checkpoint(path)


def test_all_damaged_gives_none(tmp_path):
    save_checkpoint(tmp_path / "step_1", _tensors(), {"step": 1})
    _flip_byte(tmp_path / "step_1" / "optimizer.safetensors")
    assert load_latest(tmp_path) is None


@pytest.mark.parametrize("keep, left", [(3, 3), (2, 2), (1, 2), (0, 2), (10, 5)])
def test_prune_keeps_the_newest_and_at_least_two(tmp_path, keep, left):
    for s in range(5):
        save_checkpoint(tmp_path / f"step_{s:08d}", {"m": {"x": torch.full((1,), float(s))}}, {"step": s})
    prune_checkpoints(tmp_path, keep)
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step_{s:08d}" for s in range(5 - left, 5)]


def test_resolve_checkpoint(tmp_path):
    run = tmp_path / "run"
    ck = run / "checkpoints"
    with pytest.raises(UserError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    run.mkdir()
    with pytest.raises(UserError, match="holds no checkpoint"):
        resolve_checkpoint(run)
    save_checkpoint(ck / "step_00000001", _tensors(), {"step": 1})
    save_checkpoint(ck / "step_00000002", _tensors(), {"step": 2})
    assert resolve_checkpoint(ck / "step_00000001") == ck / "step_00000001"  # a folder is taken as is
    assert resolve_checkpoint(run) == ck / "step_00000002"  # a run dir: its newest
    assert resolve_checkpoint(ck) == ck / "step_00000002"  # and its checkpoints folder the same
    _truncate(ck / "step_00000002" / "model.safetensors")
    assert resolve_checkpoint(run) == ck / "step_00000001"  # ... that verifies
    with pytest.raises(UserError):
        resolve_checkpoint(tmp_path / "run" / "checkpoints" / "missing")


def test_meta_is_plain_json(tmp_path):
    path = save_checkpoint(tmp_path / "c", _tensors(), {"step": 3, "config": {"a": [1, 2]}})
    meta = json.loads((path / META).read_text())
    assert meta["config"] == {"a": [1, 2]} and all(len(d) == 64 for d in meta["files"].values())


# ---------------------------------------------------------------------------------------------------------
# No pickle: checkpoints and everything else load tensors only.

_PICKLE_IMPORT = re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib|shelve)\b", re.M)


def _unsafe(text: str) -> list[str]:
    """What in `text` could unpickle: pickle-family imports, torch.load without weights_only=True,
    numpy's allow_pickle=True."""
    found = [f"import: {m.group(0).strip()}" for m in _PICKLE_IMPORT.finditer(text)]
    for m in re.finditer(r"torch\.load\(", text):
        call = text[m.start(): text.find(")", m.start()) + 1]
        if "weights_only=True" not in call:
            found.append(f"torch.load without weights_only=True: {call}")
    found += ["allow_pickle=True" for _ in re.finditer(r"allow_pickle\s*=\s*True", text)]
    return found


def test_no_pickle_in_photon():
    found = {str(p.relative_to(PHOTON.parent)): _unsafe(p.read_text(encoding="utf-8"))
             for p in sorted(PHOTON.rglob("*.py"))}
    assert len(found) > 20  # the scan saw the package
    assert {k: v for k, v in found.items() if v} == {}


def test_the_scan_catches_pickle():
    bad = "import pickle\nx = torch.load(f)\ny = torch.load(f, weights_only=True)\nnp.load(p, allow_pickle=True)\n"
    assert len(_unsafe(bad)) == 3


def test_a_checkpoint_is_resumed_only_by_the_kind_of_run_that_wrote_it(tmp_path):
    from photon.checkpoint import require_kind
    from photon.errors import UserError

    require_kind({"kind": "federated"}, "federated", tmp_path)
    require_kind({}, "central", tmp_path)  # written before checkpoints said their kind
    with pytest.raises(UserError, match="federated run, not a central one.*photon run --resume"):
        require_kind({"kind": "federated"}, "central", tmp_path)
    with pytest.raises(UserError, match="central run, not a federated one.*photon train-central --resume"):
        require_kind({"kind": "central"}, "federated", tmp_path)


@pytest.mark.parametrize("meta", ["{}", '{"step": 2, "files": {}}', '{"step": 2, "files": []}'])
def test_a_meta_json_that_lists_no_files_is_damaged_and_the_previous_checkpoint_is_used(tmp_path, meta):
    save_checkpoint(tmp_path / "step_00000001", _tensors(), {"step": 1})
    save_checkpoint(tmp_path / "step_00000002", _tensors(), {"step": 2})
    (tmp_path / "step_00000002" / META).write_text(meta)
    with pytest.raises(UserError, match=r"meta.json is corrupted \(it lists (no files|no checksum for model)"):
        load_checkpoint(tmp_path / "step_00000002")
    assert load_latest(tmp_path)[0] == tmp_path / "step_00000001"


def test_a_meta_json_that_is_not_an_object_is_a_damaged_checkpoint(tmp_path):
    from photon.checkpoint import load_checkpoint
    from photon.errors import UserError

    (tmp_path / "meta.json").write_text("[]")
    with pytest.raises(UserError, match="not a JSON object"):
        load_checkpoint(tmp_path)


def test_a_run_folder_has_one_writer_and_a_second_is_refused_with_the_holders_pid(tmp_path):
    run = tmp_path / "run"
    with hold_run_dir(run):
        assert (run / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(UserError, match=rf"in use by process {os.getpid()}"):
            with hold_run_dir(run):
                pass
    with hold_run_dir(run):  # released when its holder is done
        pass


def test_a_run_folder_is_free_when_its_writer_returns_even_if_a_child_forked_meanwhile(tmp_path):
    """A process forked while the lock was held (one caught between its fork and its exec on a busy machine)
    shares the lock through its copy of the descriptor: the folder must still be free once the writer is done,
    so a caller that stops and resumes in one process is not refused by itself."""
    run = tmp_path / "run"
    with hold_run_dir(run):
        child = os.fork()
        if child == 0:  # the child keeps its inherited descriptor open for a while, then leaves without clean-up
            time.sleep(10)
            os._exit(0)
    try:
        with hold_run_dir(run):
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_writer_may_wait_for_the_holder_to_let_go(tmp_path):
    run, held, said = tmp_path / "run", threading.Event(), []

    def hold_briefly():
        with hold_run_dir(run):
            held.set()
            threading.Event().wait(0.6)

    holder = threading.Thread(target=hold_briefly)
    holder.start()
    held.wait()
    with hold_run_dir(run, wait_s=30, say=said.append):
        assert not holder.is_alive()
    holder.join()
    assert len(said) == 1 and "waiting up to 30 s" in said[0]


def test_a_new_run_may_start_beside_photons_own_files_dot_files_and_logs_but_not_among_others(tmp_path):
    from photon.bench.outdir import fresh_out_dir

    run = fresh_out_dir(tmp_path / "bench-out")  # a benchmark's --out, which it then trains into
    for name in ("config.json", "metrics.jsonl", ".lock", ".DS_Store", "run.log", "slurm-1234.out"):
        (run / name).write_text("")
    (run / "tensorboard").mkdir()
    refuse_a_taken_run_dir(run)
    for other in ("model.safetensors", "literature"):
        (run / other).mkdir() if other == "literature" else (run / other).write_text("")
        with pytest.raises(UserError, match=f"holds files that are not a photon run's \\({other}\\)"):
            refuse_a_taken_run_dir(run)
        (run / other).rmdir() if other == "literature" else (run / other).unlink()
