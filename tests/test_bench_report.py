"""docs/RESULTS.md's measured blocks are a pure function of the stored benchmark outputs (docs/results)."""

import json
from pathlib import Path

from photon.bench.report import render, write_report
from photon.bench.results import load_results, save_result

ROOT = Path(__file__).resolve().parents[1]


def _robust_data():
    rows = [{"arm": "clean", "scale": None, "seed": 0, "ppl_before": 1000.0, "ppl_after": 300.0, "rejected": 0},
            {"arm": "clean, screen off", "scale": None, "seed": 0, "ppl_before": 1000.0, "ppl_after": 301.0,
             "rejected": 0}]
    for arm, ppl in (("default (screen on)", 310.0), ("mean, no defence", 2000.0), ("median", 400.0),
                     ("trimmed mean", 390.0)):
        rows.append({"arm": arm, "scale": 5.0, "seed": 0, "ppl_before": 1000.0, "ppl_after": ppl, "rejected": 6})
    return {"attack": "flip", "attacker": 3, "clients": 4, "preset": "tiny", "rounds": 6, "local_steps": 16,
            "scales": [5.0], "seeds": 1, "rows": rows}


TEXT = "intro\n<!-- results:robust-flip -->\nstale text typed by hand\n<!-- /results:robust-flip -->\n" \
       "<!-- results:robust-noise -->\n<!-- /results:robust-noise -->\noutro\n"


def test_blocks_are_rendered_from_the_stored_outputs_only(tmp_path):
    save_result("robust-flip", _robust_data(), command="photon bench robust", results_dir=tmp_path)
    results = load_results(tmp_path)
    first = render(TEXT, results)
    assert render(first, results) == first == render(TEXT, json.loads(json.dumps(results)))
    assert "stale text" not in first and first.startswith("intro\n") and first.endswith("outro\n")
    assert "`photon bench robust` on" in first and "cores" in first
    assert "+3.3%" in first and "NOT met" not in first.split("robust-noise")[0]
    assert "Not measured yet" in first.split("results:robust-noise -->")[1]


def test_write_report_rewrites_in_place(tmp_path):
    save_result("robust-flip", _robust_data(), command="photon bench robust", results_dir=tmp_path / "r")
    md = tmp_path / "RESULTS.md"
    md.write_text(TEXT)
    assert write_report(tmp_path / "r", (md,)) == ["robust-flip", "robust-noise"]
    assert md.read_text() == render(TEXT, load_results(tmp_path / "r"), tmp_path / "r")


def test_the_committed_docs_match_the_committed_outputs_and_presets():
    for doc in ("docs/RESULTS.md", "README.md", "docs/DEPLOY.md"):
        text = (ROOT / doc).read_text()
        assert render(text, load_results(ROOT / "docs/results"), ROOT / "docs/results") == text, \
            f"{doc} is stale or was edited by hand inside a results block: run `photon bench report`"
