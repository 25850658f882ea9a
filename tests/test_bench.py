"""The trainer benchmark runs both arms and reports ratios and FLOP/s (speed itself is not asserted: shared CI
boxes)."""

import io

import pytest
from rich.console import Console

from photon.bench.trainer import flops_per_token, run_trainer_bench
from photon.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest: steady timing on a shared 2-core box


def test_trainer_bench_on_tiny_reports_both_arms_against_the_peak():
    cfg = load_config("tiny")
    out = io.StringIO()
    result = run_trainer_bench(cfg, steps=2, repeats=1, settings=("fp32", "bf16"),
                               console=Console(file=out, width=200), save=False)
    for setting in ("fp32", "bf16"):
        row = result["rows"][setting]
        assert row["bare_tok_s"] > 0 and row["photon_tok_s"] > 0
        assert row["ratio"] == row["photon_tok_s"] / row["bare_tok_s"]
        assert row["model_flops"] == pytest.approx(row["photon_tok_s"] * flops_per_token(cfg))
        assert 0 < row["of_peak"] < 10
    assert result["peaks"]["fp32"] > 0 and result["peak_rss_mb"] > 0
    text = out.getvalue()
    assert "bare loop tok/s" in text and "photon / bare" in text


def test_flops_per_token_counts_every_matmul_and_attention():
    cfg = load_config("tiny")
    m, T = cfg.model, cfg.train.seq_len
    per_layer = 4 * m.d_model**2 + 3 * m.d_model * m.hidden
    assert flops_per_token(cfg) == 6 * (m.n_layer * per_layer + m.vocab_size * m.d_model) + 12 * m.n_layer * m.d_model * T
