"""`photon bench prepare` on tiny generated inputs: both arms run, numbers are stored and rendered."""

import io
import json

import pytest
from rich.console import Console

from photon.bench.prepare import make_input, render, run_prepare_bench
from photon.config import load_config
from photon.data.corpora import load_user_corpus
from tests.helpers import FIXTURE_CORPUS

FIXTURE = FIXTURE_CORPUS


def test_make_input_repeats_the_corpus_in_every_format(tmp_path):
    corpus = load_user_corpus(FIXTURE)
    mb = make_input(corpus, tmp_path, 0.001)
    assert 1.0 <= mb < 1.2
    assert sorted(p.name for p in tmp_path.rglob("*.*")) == ["code_python.parquet", "literature.txt",
                                                             "speech_sotu.txt"]
    again = load_user_corpus(tmp_path)
    assert again["code_python"][:len(corpus["code_python"])] == corpus["code_python"]
    assert len(again["literature"]) > 10 * len(corpus["literature"])  # one .txt: documents at blank lines


def test_prepare_bench_on_tiny_inputs(tmp_path):
    cfg = load_config("tiny", ["data.tokenizer_sample_mb=0.2", "model.vocab_size=512"])
    out = io.StringIO()
    data = run_prepare_bench(cfg, (0.0005, 0.001), tmp_path / "out", load_user_corpus(FIXTURE),
                             console=Console(file=out, width=200), results_dir=tmp_path / "results")
    small, big = data["runs"]
    assert 0.9 < big["text_mb"] / small["text_mb"] / 2 < 1.1
    assert small["peak_rss_mb"] > 50 and big["peak_rss_mb"] > 50
    base = data["baseline"]
    assert base["text_mb"] == pytest.approx(small["text_mb"], abs=0.002)  # the manifest rounds per domain
    assert base["encode_batch"]["tokens"] + base["documents"] == small["tokens"]  # prepare adds one EOT each
    stored = json.loads((tmp_path / "results" / "prepare.json").read_text())
    assert stored["data"] == json.loads(json.dumps(data))
    text = render(stored["data"])
    assert "Peak RSS as the input grows 2×" in text and "one `encode_batch` call" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".photon-bench", "baseline.log",
                                                                    "prepare-0.0005gb.log", "prepare-0.001gb.log"]
