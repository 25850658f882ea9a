"""Reports: the per-domain table and the PNG curves, read back from metrics.jsonl only."""

import io
import math

import pytest
from rich.console import Console

from photon.display import eval_table, plot_run
from photon.errors import UserError
from photon.runlog import METRICS, RunLog, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LOSSES = {"code_python": 5.0, "literature": 4.0, "speech_sotu": 6.0, "overall": 5.1}


def _render(table) -> str:
    console = Console(file=io.StringIO(), width=120)
    console.print(table)
    return console.file.getvalue()


def _fake_run(run_dir, evals=True, train=True):
    log = RunLog(run_dir, tensorboard=False)
    for step in range(0, 21, 10):
        if evals:
            log.log("eval", step, **{f"loss/{d}": v - step / 10 for d, v in LOSSES.items()})
        if train and step:
            for s in range(step - 9, step + 1):
                log.log("train", s, loss=7.0 - s / 10, lr=1e-3)
    log.close()


def test_eval_table_has_a_row_per_domain():
    table = eval_table(LOSSES, title="validation")
    assert table.row_count == len(LOSSES)
    assert [c.header for c in table.columns] == ["domain", "loss", "ppl"]
    text = _render(table)
    for domain, loss in LOSSES.items():
        line = next(line for line in text.splitlines() if domain in line)
        assert f"{loss:.4f}" in line and f"{math.exp(loss):.1f}" in line


def test_eval_table_with_before_column():
    table = eval_table(LOSSES, title="t", before={"overall": 6.0, "literature": 5.0})
    assert [c.header for c in table.columns] == ["domain", "ppl before", "loss", "ppl"]
    text = _render(table)
    assert f"{math.exp(6.0):.1f}" in text
    code_line = next(line for line in text.splitlines() if "code_python" in line)
    assert " - " in code_line  # no 'before' for that domain


def test_a_title_wider_than_the_table_stays_on_one_line():
    title = "validation after 1234 rounds of a long federated run"
    assert title in _render(eval_table({"overall": 3.0}, title=title)).splitlines()[0]


def test_plot_run_writes_a_png(tmp_path):
    _fake_run(tmp_path)
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    other = plot_run(tmp_path, tmp_path / "x.png")
    assert other.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("evals, train", [(True, False), (False, True)])
def test_plot_run_with_only_one_kind_of_row(tmp_path, evals, train):
    _fake_run(tmp_path, evals=evals, train=train)
    assert plot_run(tmp_path).read_bytes()[:8] == PNG_MAGIC


def test_plot_without_metrics_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / METRICS).write_text("")
    with pytest.raises(UserError, match="metrics.jsonl is empty"):
        plot_run(tmp_path)
    (tmp_path / METRICS).write_text('{"kind": "tra')  # only a torn line: nothing logged either
    with pytest.raises(UserError, match="metrics.jsonl is empty"):
        plot_run(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        plot_run(tmp_path / "nope")


@pytest.mark.parametrize("name, magic", [("c.png", PNG_MAGIC), ("c.pdf", b"%PDF"), ("c.svg", b"<?xml"),
                                         ("C.SVG", b"<?xml")])
def test_plot_run_writes_the_format_its_suffix_names(tmp_path, name, magic):
    _fake_run(tmp_path)
    assert plot_run(tmp_path, tmp_path / name) == tmp_path / name
    assert (tmp_path / name).read_bytes().startswith(magic)


def test_plot_run_refuses_an_unsupported_suffix(tmp_path):
    _fake_run(tmp_path)
    with pytest.raises(UserError, match=r"x\.txt: cannot write a '\.txt' plot; end --out with one of \.png, \.pdf, "):
        plot_run(tmp_path, tmp_path / "x.txt")
    assert not (tmp_path / "x.txt").exists()


def test_plot_run_returns_the_path_it_wrote(tmp_path):
    _fake_run(tmp_path)
    out = plot_run(tmp_path, tmp_path / "mycurves")  # no suffix: .png is added, and said
    assert out == tmp_path / "mycurves.png" and out.read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "mycurves").exists()
    folder = tmp_path / "plots"
    folder.mkdir()
    out = plot_run(tmp_path, folder)  # an existing folder: the plot goes inside it
    assert out == folder / "curves.png" and out.read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "plots.png").exists()
    out = plot_run(tmp_path, tmp_path / "new" / "deep" / "c.svg")  # missing folders are made
    assert out.read_bytes().startswith(b"<?xml")
    out = plot_run(tmp_path, f"{tmp_path / 'later'}/")  # a missing folder, named with a slash, as typed
    assert out == tmp_path / "later" / "curves.png" and out.read_bytes()[:8] == PNG_MAGIC


def test_a_damaged_log_is_read_up_to_the_damage(tmp_path):
    good = '{"kind": "train", "step": 1, "loss": 5.0}\n'
    for damage in (b"\xff\xfe binary\n", b"[1, 2]\n", b'{"no": "kind"}\n'):
        (tmp_path / METRICS).write_bytes(good.encode() + damage + good.encode())
        assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    (tmp_path / METRICS).write_bytes(b"\xff\xfe\n")
    with pytest.raises(UserError, match="metrics.jsonl is empty"):
        plot_run(tmp_path)


def test_a_torn_last_line_ends_the_log(tmp_path):
    _fake_run(tmp_path)
    n = len(read_metrics(tmp_path))
    with open(tmp_path / METRICS, "a") as f:
        f.write('{"kind": "train", "st')
    assert len(read_metrics(tmp_path)) == n
    assert plot_run(tmp_path).exists()


def test_runlog_resume_drops_rows_past_the_checkpoint(tmp_path):
    _fake_run(tmp_path)
    RunLog(tmp_path, resume_step=10, tensorboard=False).close()
    rows = read_metrics(tmp_path)
    assert max(r["step"] for r in rows) == 10 and len(rows) == 2 + 10
    RunLog(tmp_path, tensorboard=False).close()  # a fresh run starts a fresh log
    assert read_metrics(tmp_path) == []
