"""docs/RESULTS.md's measured blocks are a pure function of the stored benchmark outputs (docs/results)."""

import json
import re
from pathlib import Path

import pytest

from photon.bench.publish import pages, render, write_report
from photon.bench.results import load_results, save_result
from photon.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def _robust_data():
    """A robust-benchmark record: one setting (K = 4, 1 attacker), one flip scale, every rule and attack."""
    from photon.bench.robust import RULES, attack_list

    rows = []
    for rule in RULES:
        clean = 300.0 if rule == "mean, no checks" else 301.0
        rows.append({"rule": rule, "clients": 4, "attackers": 0, "attack": None, "scale": 1.0, "seed": 0,
                     "ppl_before": 1000.0, "ppl_after": clean, "honest_rejected": 0, "honest_clipped": 0,
                     "attackers_rejected": 0, "rounds": 6})
        for attack, scale in attack_list((5.0,), 1.0):
            ppl = 310.0 if rule == "default" else 2000.0
            rows.append({"rule": rule, "clients": 4, "attackers": 1, "attack": attack, "scale": scale, "seed": 0,
                         "ppl_before": 1000.0, "ppl_after": ppl, "honest_rejected": 0, "honest_clipped": 1,
                         "attackers_rejected": 0, "rounds": 6})
    rows.append({"rule": "mean, no checks", "clients": 4, "attackers": 1, "attack": "absent", "scale": 1.0, "seed": 0,
                 "ppl_before": 1000.0, "ppl_after": 305.0, "honest_rejected": 0, "honest_clipped": 0,
                 "attackers_rejected": 0, "rounds": 6})
    return {"preset": "tiny", "rounds": 6, "local_steps": 16, "scales": [5.0], "alie_z": 1.0,
            "settings": [[4, 1]], "rules": list(RULES), "seeds": 1,
            "default": {"aggregation": "centered-clip", "max_norm_ratio": 100.0, "min_cosine": None,
                        "clipping": {"centre": "median", "radius": "median", "radius_factor": 2.0,
                                     "iterations": 1, "bucket_size": 1}},
            "rows": rows}


TEXT = "intro\n<!-- results:robust -->\nstale text typed by hand\n<!-- /results:robust -->\n" \
       "<!-- results:wire -->\n<!-- /results:wire -->\noutro\n"


def test_blocks_are_rendered_from_the_stored_outputs_only(tmp_path):
    save_result("robust", _robust_data(), command="photon bench robust", results_dir=tmp_path)
    results = load_results(tmp_path)
    first = render(TEXT, results)
    assert render(first, results) == first == render(TEXT, json.loads(json.dumps(results)))
    assert "stale text" not in first and first.startswith("intro\n") and first.endswith("outro\n")
    assert "`photon bench robust` on" in first and "cores" in first
    assert "+3.3%" in first and "NOT met" not in first.split("results:wire")[0]
    assert "Not measured yet" in first.split("results:wire -->")[1]


def test_write_report_rewrites_in_place(tmp_path):
    save_result("robust", _robust_data(), command="photon bench robust", results_dir=tmp_path / "r")
    md = tmp_path / "RESULTS.md"
    md.write_text(TEXT)
    names = write_report(tmp_path / "r", (md,))
    assert names == ["robust", "wire", "claims-tiny", "claims-small", "claims-medium"]
    assert md.read_text() == render(TEXT, load_results(tmp_path / "r"), tmp_path / "r")
    # the claims pages beside RESULTS.md are written whole, here without a record to show
    page = tmp_path / "results" / "claims-tiny.md"
    assert "Not measured yet: no `docs/results/claims-tiny.json`" in page.read_text()
    other = tmp_path / "README.md"
    other.write_text(TEXT)
    assert write_report(tmp_path / "r", (other,)) == ["robust", "wire"]  # no pages beside it


def test_the_committed_docs_match_the_committed_outputs_and_presets():
    results = load_results(ROOT / "docs/results")
    for doc in ("docs/RESULTS.md", "README.md", "docs/DEPLOY.md"):
        text = (ROOT / doc).read_text()
        assert render(text, results, ROOT / "docs/results") == text, \
            f"{doc} is stale or was edited by hand inside a results block: run `photon bench report`"
    generated = pages((ROOT / "docs/RESULTS.md",))
    assert sorted(p.name for p in generated) == ["claims-medium.md", "claims-small.md", "claims-tiny.md"]
    for page, skeleton in generated.items():
        assert page.read_text() == render(skeleton, results, ROOT / "docs/results"), \
            f"{page} is stale or was edited by hand: run `photon bench report`"


def test_results_md_shows_each_claims_scale_by_its_verdicts_and_links_its_page():
    text = (ROOT / "docs/RESULTS.md").read_text()
    assert len(text.encode()) < 60_000
    for scale in ("tiny", "small", "medium"):
        assert f"<!-- results:claims-{scale}-verdicts -->" in text and f"(results/claims-{scale}.md)" in text
        assert f"<!-- results:claims-{scale} -->" not in text  # its full tables live on its page
        page = (ROOT / "docs/results" / f"claims-{scale}.md").read_text()
        assert f"<!-- results:claims-{scale} -->" in page and f"](../img/claims-{scale}-curves.png)" in page
        assert (ROOT / "docs/img" / f"claims-{scale}-curves.png").exists()
    assert not re.search(r"^#.*issues? #\d", text, re.M)  # headings say what, not which issue


def test_a_page_edited_by_hand_is_written_whole_again(tmp_path):
    results, md = _results_and_target(tmp_path)
    write_report(results, (md,))
    page = tmp_path / "results" / "claims-small.md"
    fresh = page.read_text()
    page.write_text("typed by hand\n" + fresh)
    write_report(results, (md,))
    assert page.read_text() == fresh


def test_a_trial_folder_without_the_claims_records_the_pages_show_is_refused(tmp_path):
    results, md = _results_and_target(tmp_path)
    (tmp_path / "results").mkdir()
    page = tmp_path / "results" / "claims-tiny.md"
    page.write_text("<!-- results:claims-tiny -->\nmeasured tables\n<!-- /results:claims-tiny -->\n")
    with pytest.raises(UserError, match=r"lacks records the docs now show measured \(claims-tiny\)"):
        write_report(results, (md,))
    assert md.read_text() == TEXT and page.read_text().startswith("<!-- results:claims-tiny -->")


def test_a_verdicts_block_renders_the_record_of_its_name(tmp_path):
    record = json.loads((ROOT / "docs/results/claims-tiny.json").read_text())
    results = {"claims-tiny": record}
    text = "<!-- results:claims-tiny-verdicts -->\n<!-- /results:claims-tiny-verdicts -->\n"
    out = render(text, results, tmp_path)
    assert "`photon bench claims --scale tiny` on" in out and "#### Verdicts" in out
    assert "#### 1. Federated" not in out
    assert "Not measured yet: no `docs/results/claims-small.json`" in render(text.replace("tiny", "small"), results)


def _results_and_target(tmp_path):
    """A results folder with one good record, and a target file whose blocks render from it."""
    save_result("robust", _robust_data(), command="photon bench robust", results_dir=tmp_path / "r")
    md = tmp_path / "RESULTS.md"
    md.write_text(TEXT)
    return tmp_path / "r", md


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_missing_or_empty_results_folder_is_refused_and_nothing_written(tmp_path, folder):
    _, md = _results_and_target(tmp_path)
    results = tmp_path / folder
    if folder == "empty":
        results.mkdir()
    match = "no such results folder" if folder == "missing" else "holds no benchmark results"
    with pytest.raises(UserError, match=f"{results}: {match}"):
        write_report(results, (md,))
    assert md.read_text() == TEXT


@pytest.mark.parametrize("content,match", [
    ('{"name": "robust", "comm', "not valid JSON"),
    ("[]", "holds a JSON list, not a benchmark record"),
    ("{}", "lacks 'command', 'date', 'data'"),
    ('{"command": "photon bench robust", "date": "2024-01-01", "data": []}', "lacks 'data'"),
    ('{"command": "c", "date": "d", "data": {}, "machine": "x"}', "'machine' is not an object"),
    ('{"name": "wire", "command": "c", "date": "d", "data": {}}', "records the name 'wire', not 'robust'"),
    ('{"command": "c", "date": "d", "data": {"rows": []}}', "lacks or mistypes a field the robust block"),
    ('{"command": "c", "date": "d", "wall_seconds": "long", "data": {}}', "lacks or mistypes a field"),
])
def test_a_damaged_results_file_is_a_user_error_naming_it(tmp_path, content, match):
    results, md = _results_and_target(tmp_path)
    bad = results / "robust.json"
    bad.write_text(content)
    with pytest.raises(UserError, match=re.escape(f"{bad}: ") + ".*" + re.escape(match)):
        write_report(results, (md,))
    assert md.read_text() == TEXT


def test_a_damaged_claims_record_is_caught_before_any_target_is_written(tmp_path):
    """claims-tiny.json feeds README's computed findings block too: it is checked even when no target shows
    its own block, and neither target is half-written."""
    results, md = _results_and_target(tmp_path)
    (results / "claims-tiny.json").write_text('{"command": "c", "date": "d", "data": {"runs": 1}}')
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:claims-findings -->\n<!-- /results:claims-findings -->\n")
    with pytest.raises(UserError, match=re.escape(str(results / "claims-tiny.json"))):
        write_report(results, (md, readme))
    assert md.read_text() == TEXT and not (tmp_path / "results").exists()


def test_a_folder_of_a_few_trial_records_does_not_blank_the_blocks_it_lacks(tmp_path):
    results, md = _results_and_target(tmp_path)
    write_report(results, (md,))
    measured = md.read_text()
    trial = tmp_path / "trial"
    wire = json.loads((ROOT / "docs/results/wire.json").read_text())
    save_result("wire", wire["data"], command="c", results_dir=trial)
    with pytest.raises(UserError, match=r"trial lacks records the docs now show measured \(robust\): .*cp -n"):
        write_report(trial, (md,))
    assert md.read_text() == measured


def test_benchmarks_store_their_records_where_photon_bench_results_says(tmp_path, monkeypatch, photon):
    from photon.bench import results as stored

    monkeypatch.setitem(stored._STORE, "dir", stored.RESULTS_DIR)
    code, _, err = photon("bench", "--results", tmp_path / "trial", "report")
    assert code == 2 and f"{tmp_path / 'trial'}: no such results folder" in err
    assert stored.save_result("x", {}, results_dir=None) == tmp_path / "trial" / "x.json"
    assert stored.plots_dir() == tmp_path / "trial" / "img"  # a trial's plots leave docs/img alone too
    monkeypatch.setitem(stored._STORE, "dir", stored.RESULTS_DIR)
    assert stored.plots_dir() == stored.IMG_DIR
    assert stored.plots_dir(tmp_path / "other") == tmp_path / "other" / "img"


def test_cli_bench_report_with_a_mistyped_folder_exits_with_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from photon.cli import app

    _, md = _results_and_target(tmp_path)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["bench", "report", "--results", "rsults", "--target", str(md)])
    assert res.exit_code != 0 and isinstance(res.exception, UserError) and "rsults" in str(res.exception)
    assert md.read_text() == TEXT


def test_demo_names_its_failed_replies_and_renders_older_records_without_them():
    from photon.bench.demo import render

    data = {"preset": "small", "clients": 4, "k": 4, "h": 32, "rounds": 2, "nodes": 2, "wall_seconds": 60.0,
            "round_seconds": [30.0, 30.0], "tokens": 10**6, "ppl": {"overall": [8000.0, 500.0]}}
    assert "Failed replies" not in render(data)  # stored before failures were recorded
    text = render({**data, "replies": 8, "failures": ["round 2: client 1 attempt 1: update disagrees"]})
    assert "Failed replies: 1 of 8." in text and "- round 2: client 1 attempt 1: update disagrees" in text
    assert "known limit" not in text
    text = render({**data, "replies": 8, "failures": ["round 2: client 1: update disagrees with the round's majority"]})
    assert "honest clients rejected by the direction screen" in text and "federation.min_cosine=null" in text


def test_rendering_a_trial_folder_brings_its_plots_beside_its_numbers(tmp_path, monkeypatch):
    """`photon bench --results DIR` draws plots into DIR/img; `bench report --results DIR` renders DIR's numbers
    into RESULTS.md and copies those plots into the img folder beside it, so numbers and plots match."""
    from typer.testing import CliRunner

    from photon.cli import app

    results, md = _results_and_target(tmp_path)
    (results / "img").mkdir()
    (results / "img" / "compression.png").write_bytes(b"trial plot")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["bench", "report", "--results", str(results), "--target", str(md)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "img" / "compression.png").read_bytes() == b"trial plot"
