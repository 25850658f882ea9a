"""The claims' verdict rules (photon/bench/claims/verdicts.py): each rule on both sides of its threshold, the
table's thresholds as published, and the report's sentences reading their thresholds from that table."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from photon.bench.claims import render as claims_render
from photon.bench.claims.render import TEMPLATES, _parts, render, render_findings, verdicts
from photon.bench.claims.verdicts import (
    AGREES,
    CONTRADICTS,
    INCONCLUSIVE,
    RULES,
    EverySeed,
    Exactly,
    Falling,
    fraction_words,
    title,
)

ROOT = Path(__file__).resolve().parents[2]
EPS = 1e-6

# The published verdicts were judged with these thresholds: changing one changes what the docs claim.
PUBLISHED = {"1a": ("<=", 1.0), "1b": ("<=", 1.0), "3b": (">", 1.0), "4": ("<", 0.5), "5": (">=", 1.5),
             "6": ("<", 1.0)}


def _record(scale: str = "tiny") -> dict:
    return json.loads((ROOT / "docs" / "results" / f"claims-{scale}.json").read_text())["data"]


def test_the_table_holds_every_claim_with_the_published_thresholds():
    assert list(RULES) == ["1a", "1b", "2", "3a", "3b", "4", "5", "6"]
    assert {k: (r.op, r.bound) for k, r in RULES.items() if isinstance(r, EverySeed)} == PUBLISHED
    assert (RULES["3a"].tolerance, RULES["3a"].floor) == (0.01, 1.0)
    assert RULES["2"].network == "1 Gbps" and RULES["3b"].network == "10 Gbps"
    assert title("3b") == "3. less wall time than data-parallel at 10 Gbps"


@pytest.mark.parametrize("claim", sorted(PUBLISHED))
def test_each_per_seed_rule_on_both_sides_of_its_threshold(claim):
    rule = RULES[claim]
    bound = rule.bound
    good, bad = (bound - EPS, bound + EPS) if rule.op in ("<", "<=") else (bound + EPS, bound - EPS)
    assert rule.judge([good, good]) == AGREES
    assert rule.judge([bad, bad]) == CONTRADICTS
    assert rule.judge([good, bad]) == INCONCLUSIVE  # the seeds disagree
    assert rule.judge([good, None]) == INCONCLUSIVE  # a seed never reached the target
    assert rule.judge([]) == INCONCLUSIVE
    # the threshold itself: met by ≤ and ≥, not by < and >
    assert rule.meets(bound) is (rule.op in ("<=", ">="))


def test_more_clients_agrees_only_when_the_time_falls_at_every_step():
    rule = RULES["2"]
    assert rule.judge([30.0, 20.0, 10.0]) == AGREES
    assert rule.judge([10.0, 20.0, 30.0]) == CONTRADICTS
    assert rule.judge([10.0, 5.0, 10.0]) == CONTRADICTS  # the largest K no faster than the smallest
    assert rule.judge([42.0, 68.0, 40.0]) == INCONCLUSIVE  # faster at the end, not at every step
    assert rule.judge([30.0, 30.0 - EPS]) == AGREES and rule.judge([30.0, 30.0]) == CONTRADICTS
    assert rule.judge([30.0, None]) == INCONCLUSIVE and rule.judge([30.0]) == INCONCLUSIVE


def test_communication_agrees_only_at_exactly_the_ratio_of_construction():
    rule = RULES["3a"]
    expected = 32 * 3 / 4
    inside, outside = expected * (1 + rule.tolerance - EPS), expected * (1 + rule.tolerance + EPS)
    assert rule.judge(expected, expected) == AGREES and rule.judge(inside, expected) == AGREES
    assert rule.judge(outside, expected) == CONTRADICTS
    assert rule.judge(expected * (1 - rule.tolerance - EPS), expected) == CONTRADICTS
    # exact, but not less than data-parallel (H=1, n=2: 0.5 per step) is no saving
    assert rule.judge(0.5, 0.5) == CONTRADICTS and rule.judge(1.0, 1.0) == CONTRADICTS


def test_rule_kinds_judge_their_own_shapes_without_the_table():
    below = EverySeed("t", "v", "<", 2.0)
    assert below.judge([1.0]) == AGREES and below.judge([2.0]) == CONTRADICTS
    assert below.bound_text() == "< 2×" and EverySeed("t", "v", ">=", 1.5).bound_text() == "≥ 1.5×"
    assert EverySeed("t", "v", "<", 0.5).bound_words() == "below half" and fraction_words(0.3) == "0.3×"
    assert Falling("t", "v", "x").judge([2.0, 1.0]) == AGREES
    assert Exactly("t", "v", tolerance=0.1, floor=0.0).judge(1.05, 1.0) == AGREES


def test_the_published_verdicts_follow_the_rules():
    for scale in ("tiny", "small", "medium"):
        for claim, (verdict, text) in verdicts(_record(scale)).items():
            assert verdict in (AGREES, CONTRADICTS, INCONCLUSIVE), (scale, claim)
            assert text and "$" not in text, (scale, claim)


def test_sentences_state_the_threshold_the_verdict_used(monkeypatch):
    """Move claim 5's and claim 4's thresholds in the table: the verdict and the sentence move with them."""
    data = _record("tiny")
    assert verdicts(data)["5"][0] == AGREES and "agrees needs ≥ 1.5×" in verdicts(data)["5"][1]
    text = render(data)
    assert "agrees = by-domain clients end below half the initial perplexity" in text
    monkeypatch.setitem(RULES, "5", dataclasses.replace(RULES["5"], bound=10.0))
    monkeypatch.setitem(RULES, "4", dataclasses.replace(RULES["4"], bound=0.001))
    verdict, line = verdicts(data)["5"]
    assert verdict == CONTRADICTS and "agrees needs ≥ 10×" in line and "1.5" not in line
    text = render(data)
    assert "agrees needs ≥ 10×" in text and "≥ 1.5×" not in text
    assert "**Result:** **contradicts** (agrees = by-domain clients end below 0.001× the initial" in text
    assert "**contradicts**: DiLoCo" in render_findings(ROOT / "docs" / "results")


def test_networks_named_by_the_table_are_the_ones_modelled(monkeypatch):
    data = _record("tiny")
    monkeypatch.setitem(RULES, "2", dataclasses.replace(RULES["2"], network="100 Mbps"))
    monkeypatch.setitem(RULES, "3b", dataclasses.replace(RULES["3b"], network="1 Gbps"))
    vs = verdicts(data)
    assert vs["2"][1].startswith("modelled 100 Mbps s to ppl") and "at 1 Gbps (" in vs["3b"][1]
    assert "| 3. less wall time than data-parallel at 1 Gbps |" in claims_render.render_verdicts(data)
    assert "modelled wall s to target (100 Mbps)" in render(data)


def test_every_template_part_is_used_and_unwraps_to_one_line_per_paragraph():
    source = (ROOT / "photon" / "bench" / "claims" / "render.py").read_text()
    for path in sorted(TEMPLATES.glob("*.md")):
        parts = _parts(path.stem)
        assert parts, path
        for name, template in parts.items():
            assert f'"{path.stem}", "{name}"' in source, f"{path.name}: part {name!r} is never rendered"
            for para in template.template.split("\n\n"):
                lines = para.split("\n")
                # a paragraph is one line, unless it is a list, a table, images or a block's markers
                assert len(lines) == 1 or all(re.match(r"- |\||!\[|<!--|#|\$", ln) for ln in lines), (path, name)


def test_no_issue_numbers_in_the_code_or_the_prose():
    for path in [*(ROOT / "photon" / "bench" / "claims").rglob("*.py"), *TEMPLATES.glob("*.md")]:
        assert not re.search(r"issue[s]? ?#?\d|#\d+\b", path.read_text()), path
