"""The centralized baseline: a stopped-and-resumed run ends bitwise equal to an uninterrupted one."""

import io
import shutil

import pytest
import torch
from rich.console import Console

from photon.checkpoint import hold_run_dir, list_checkpoints, load_checkpoint
from photon.errors import UserError
from photon.runlog import read_metrics
from photon.train.centralized import train_central
from photon.train.evaluate import OVERALL
from tests.helpers import tiny_cfg, torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest: steady timing on a shared 2-core box

# A resume must be invisible over a long run: 2k steps straight vs 1k + resume + 1k. At the tiny preset's 8×64
# batch that is ~40 s on 2 cores, so the long check uses 2×16 batches (~3.5 ms/step); the short one keeps the preset's shape.
LONG = ("train.batch_size=2", "train.seq_len=16", "train.steps=2000", "train.eval_every=500",
        "train.ckpt_every=500", "train.eval_batches=1")
SHORT = ("train.steps=40", "train.warmup_steps=5", "train.eval_every=10", "train.ckpt_every=10",
         "train.eval_batches=2")


def _quiet():
    return Console(file=io.StringIO(), width=200)


def _final(run_dir):
    path = list_checkpoints(run_dir / "checkpoints")[-1]
    return path, *load_checkpoint(path)


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for group in a:
        assert a[group].keys() == b[group].keys(), group
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), f"{group}/{k}"


def _steps(rows, kind):
    return [r["step"] for r in rows if r["kind"] == kind]


@pytest.fixture(scope="module")
def short_runs(tiny_prep, tmp_path_factory):
    """The SHORT run straight, and stopped at 25 (not a checkpoint boundary) then resumed."""
    tmp = tmp_path_factory.mktemp("central")
    cfg = tiny_cfg(tiny_prep, *SHORT)
    with torch_threads(1):
        straight = train_central(cfg, tmp / "straight", console=_quiet())
        first = train_central(cfg, tmp / "resumed", stop_at=25, console=_quiet())
        rows_at_stop = read_metrics(tmp / "resumed")
        resumed = train_central(cfg, tmp / "resumed", resume=True, console=_quiet())
    return dict(cfg=cfg, straight_dir=tmp / "straight", resumed_dir=tmp / "resumed", straight=straight,
                first=first, resumed=resumed, rows_at_stop=rows_at_stop)


def test_resumed_short_run_is_bitwise_equal(short_runs):
    p1, t1, m1 = _final(short_runs["straight_dir"])
    p2, t2, m2 = _final(short_runs["resumed_dir"])
    assert p1.name == p2.name == "step_00000040"
    assert (m1["step"], m1["cursor"]) == (m2["step"], m2["cursor"]) == (40, 40 * 8)
    _assert_bitwise_equal(t1, t2)  # model and AdamW state
    assert short_runs["straight"] == short_runs["resumed"]  # the same final evaluation, to the bit


def test_stop_at_checkpoints_where_it_stops(short_runs):
    names = [p.name for p in list_checkpoints(short_runs["resumed_dir"] / "checkpoints")]
    assert "step_00000025" in names  # stop_at is saved even off the ckpt_every grid
    assert _steps(short_runs["rows_at_stop"], "train")[-1] == 25


def test_validation_loss_falls(short_runs):
    rows = read_metrics(short_runs["straight_dir"])
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[-1][f"loss/{OVERALL}"] < evals[0][f"loss/{OVERALL}"] - 0.5
    assert short_runs["straight"][OVERALL] == evals[-1][f"loss/{OVERALL}"]


def test_metrics_have_train_and_eval_rows_without_duplicates(short_runs):
    for run in ("straight_dir", "resumed_dir"):
        rows = read_metrics(short_runs[run])
        assert _steps(rows, "train") == list(range(1, 41)), run
        assert _steps(rows, "eval") == [0, 10, 20, 30, 40], run
        train = [r for r in rows if r["kind"] == "train"]
        assert all(r["lr"] > 0 and r["loss"] > 0 for r in train)
        assert {f"{kind}/{d}" for d in ("code_python", "literature", "speech_sotu", OVERALL)
                for kind in ("loss", "bpb")} <= set(rows[0])
    straight, resumed = read_metrics(short_runs["straight_dir"]), read_metrics(short_runs["resumed_dir"])
    assert [r.get("loss") for r in straight] == [r.get("loss") for r in resumed]  # same curve, same bits


def test_run_dir_holds_config_and_tensorboard(short_runs):
    run = short_runs["resumed_dir"]
    assert (run / "config.json").is_file() and (run / "tensorboard").is_dir()
    assert len(list_checkpoints(run / "checkpoints")) == 3  # pruned to keep_checkpoints
    assert (list_checkpoints(run / "checkpoints")[-1] / "tokenizer.json").is_file()  # stands alone


def test_resume_after_a_damaged_newest_checkpoint_replays_and_matches(short_runs, tmp_path):
    # Crash after step 30 with the newest checkpoint torn: resume falls back to step 20, drops the log past
    # it, and still ends bitwise equal to the uninterrupted run.
    cfg = short_runs["cfg"]
    run = tmp_path / "run"
    train_central(cfg, run, stop_at=30, console=_quiet())
    newest = list_checkpoints(run / "checkpoints")[-1]
    assert newest.name == "step_00000030"
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 3])
    train_central(cfg, run, resume=True, console=_quiet())
    _assert_bitwise_equal(_final(short_runs["straight_dir"])[1], _final(run)[1])
    rows = read_metrics(run)
    assert _steps(rows, "train") == list(range(1, 41)) and _steps(rows, "eval") == [0, 10, 20, 30, 40]


def test_resume_2000_steps_is_bitwise_equal_to_straight(tiny_prep, tmp_path):
    cfg = tiny_cfg(tiny_prep, *LONG)
    train_central(cfg, tmp_path / "straight", console=_quiet())
    train_central(cfg, tmp_path / "resumed", stop_at=1000, console=_quiet())
    assert _final(tmp_path / "resumed")[2]["step"] == 1000
    train_central(cfg, tmp_path / "resumed", resume=True, console=_quiet())
    p1, t1, m1 = _final(tmp_path / "straight")
    p2, t2, m2 = _final(tmp_path / "resumed")
    assert m1["step"] == m2["step"] == 2000 and m1["cursor"] == m2["cursor"]
    _assert_bitwise_equal(t1, t2)
    steps = _steps(read_metrics(tmp_path / "resumed"), "train")
    assert steps == list(range(1, 2001))


def test_existing_run_without_resume_is_refused(short_runs, tmp_path):
    shutil.copytree(short_runs["straight_dir"], tmp_path / "run")
    with pytest.raises(UserError, match="--resume"):
        train_central(short_runs["cfg"], tmp_path / "run", console=_quiet())
    assert len(read_metrics(tmp_path / "run")) == len(read_metrics(short_runs["straight_dir"]))  # untouched


def test_a_run_another_process_trains_into_is_not_resumed_beside_it(short_runs, tmp_path):
    shutil.copytree(short_runs["resumed_dir"], tmp_path / "run")
    with hold_run_dir(tmp_path / "run"):
        with pytest.raises(UserError, match="in use by process"):
            train_central(short_runs["cfg"], tmp_path / "run", resume=True, console=_quiet())


def test_resume_with_a_different_model_is_refused(short_runs, tmp_path):
    shutil.copytree(short_runs["straight_dir"], tmp_path / "run")
    cfg = tiny_cfg(short_runs["cfg"].data.prep_dir, *SHORT, "model.n_layer=3")
    with pytest.raises(UserError, match="different model shape"):
        train_central(cfg, tmp_path / "run", resume=True, console=_quiet())


def test_resume_without_checkpoint_is_refused(tiny_prep, tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        train_central(tiny_cfg(tiny_prep, *SHORT), tmp_path / "empty", resume=True, console=_quiet())


def test_vocab_mismatch_with_the_prepared_data_is_refused(tiny_prep, tmp_path):
    with pytest.raises(UserError, match="vocab_size=1024"):
        train_central(tiny_cfg(tiny_prep, "model.vocab_size=512"), tmp_path / "run", console=_quiet())
