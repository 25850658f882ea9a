"""The trainer benchmark runs both arms and reports a ratio (speed itself is not asserted: shared CI boxes)."""

import io

import pytest
from rich.console import Console

from photon.bench.trainer import run_trainer_bench
from photon.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest: steady timing on a shared 2-core box


def test_trainer_bench_on_tiny():
    cfg = load_config("tiny")
    out = io.StringIO()
    result = run_trainer_bench(cfg, steps=2, repeats=1, console=Console(file=out, width=200))
    assert result["bare_tok_s"] > 0 and result["photon_tok_s"] > 0
    assert result["ratio"] == result["photon_tok_s"] / result["bare_tok_s"]
    assert result["peak_rss_mb"] > 0
    text = out.getvalue()
    assert "bare" in text and "photon" in text and "ratio" in text
