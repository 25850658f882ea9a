"""`photon bench report`: rewrite the measured blocks of docs/RESULTS.md (and the computed tables of README.md
and docs/DEPLOY.md) from the stored benchmark outputs, and write the generated pages beside RESULTS.md.

docs/RESULTS.md is prose plus blocks between `<!-- results:NAME -->` and `<!-- /results:NAME -->` markers.
Each block is rendered from `docs/results/NAME.json` (written by the benchmark that measured it, see
`results.py`) by the renderer of that benchmark, with the command, date and machine on top; nothing inside
a block is typed by hand, and rendering is a pure function of the stored files (a test checks it). A block
`NAME-brief` shows the same record in a sentence without its provenance, `NAME-verdicts` its verdicts only.
The generated pages (each claims scale's full tables, docs/results/claims-SCALE.md) are written whole: fixed
prose from their template around their blocks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from photon.bench.claims import render as claims
from photon.bench.results import RESULTS_DIR, is_published, load_results
from photon.errors import UserError

RESULTS_MD = Path("docs/RESULTS.md")
TARGETS = (Path("docs/RESULTS.md"), Path("README.md"), Path("docs/DEPLOY.md"))
_VIEWS = ("-brief", "-verdicts")  # other views of a record NAME: its block names end so
_BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def _renderers() -> dict[str, Callable[[dict[str, Any]], str]]:
    from photon.bench import (
        async_outer,
        compression,
        demo,
        federation,
        prepare,
        recipe,
        robust,
        stragglers,
        throughput,
        wire,
    )

    return {"robust": robust.render, "stragglers": stragglers.render, "stragglers-brief": stragglers.render_brief,
            "async": async_outer.render,
            "recipe": recipe.render, "recipe-brief": recipe.render_brief,
            "trainer-cpu": throughput.render, "trainer-cuda": throughput.render, "wire": wire.render,
            "compression": compression.render, "compression-brief": compression.render_brief, "prepare": prepare.render,
            "federation": federation.render,
            "demo": demo.render, "demo-brief": demo.render_brief,
            **{f"claims-{s}": claims.render_page for s in claims.SCALES},
            **{f"claims-{s}-verdicts": claims.render_verdicts for s in claims.SCALES}}


def _computed(results_dir: Path) -> dict[str, Callable[[], str]]:
    """Blocks computed from the presets (and which stored results ran them), not measured."""
    from photon.bench import sizing

    return {"sizing": sizing.render_deploy, "presets": lambda: sizing.render_presets(results_dir),
            "claims-findings": lambda: claims.render_findings(results_dir)}


def pages(targets: tuple[Path, ...]) -> dict[Path, str]:
    """The generated pages beside each RESULTS.md among `targets` (its results/ folder): path -> the page's
    skeleton, its fixed prose around empty blocks."""
    return {Path(t).parent / "results" / f"claims-{s}.md": claims.page(s)
            for t in targets if Path(t).name == "RESULTS.md" for s in claims.SCALES}


def _stem(name: str) -> str:
    """The record a block renders: NAME for NAME and each of its views."""
    return next((name.removesuffix(v) for v in _VIEWS if name.endswith(v)), name)


def provenance(record: dict[str, Any]) -> str:
    m = record.get("machine", {})
    load = m.get("load_average")
    load_text = f", load average {load['mean']:g} (max {load['max']:g}) while it ran" if load else ""
    took = f", took {record['wall_seconds'] / 60:.1f} min" if record.get("wall_seconds") else ""
    where = f"{m.get('cores', '?')} cores ({m.get('cpu', '?')})" + (f", GPU {m['gpu']}" if m.get("gpu") else "")
    return (f"`{record['command']}` on {record['date']}: {where}, torch {m.get('torch', '?')}{load_text}{took}.")


def render_block(name: str, record: dict[str, Any] | None, path: Path | None = None) -> str:
    """A block `NAME` renders docs/results/NAME.json; `NAME-brief` the same record in one sentence, without
    its provenance (for the README); `NAME-verdicts` its verdicts, with it. A record its renderer cannot read
    is a UserError naming `path`."""
    renderer = _renderers().get(name)
    if renderer is None:
        raise KeyError(f"no renderer for results {name!r}")
    if record is None:
        return f"*Not measured yet: no `{RESULTS_DIR}/{_stem(name)}.json`.*\n"
    try:
        if name.endswith("-brief"):
            return f"{renderer(record['data']).rstrip()}\n"
        return f"{provenance(record)}\n\n{renderer(record['data']).rstrip()}\n"
    except UserError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        where = path or f"{RESULTS_DIR}/{_stem(name)}.json"
        raise UserError(f"{where}: lacks or mistypes a field the {name} block needs ({type(e).__name__}: {e}); "
                        "restore it (git checkout) or rerun the benchmark that writes it") from e


def check_results(results: dict[str, dict[str, Any]], results_dir: Path = RESULTS_DIR) -> None:
    """Render every stored record with each of its renderers, so a damaged one is a UserError naming its file
    before any target is written (also the ones a computed block reads, such as claims-findings)."""
    renderers = _renderers()
    for name, record in results.items():
        for block in (name, *(f"{name}{v}" for v in _VIEWS)):
            if block in renderers:
                render_block(block, record, Path(results_dir) / f"{name}.json")


def render(text: str, results: dict[str, dict[str, Any]], results_dir: Path = RESULTS_DIR) -> str:
    """`text` with every results block re-rendered from `results` (name -> stored record), or computed."""
    computed = _computed(results_dir)

    def block(m: re.Match) -> str:
        name = m.group("name")
        stem = _stem(name)
        record = results.get(stem)
        body = computed[name]() + "\n" if name in computed else \
            render_block(name, record, Path(results_dir) / f"{stem}.json")
        return m.group(1) + body + m.group(4)

    return _BLOCK.sub(block, text)


def write_report(results_dir: Path = RESULTS_DIR, targets: tuple[Path, ...] = TARGETS) -> list[str]:
    """Re-render every target file in place, and write the generated pages beside a RESULTS.md target
    (`pages`); returns the names of the blocks rewritten.

    A missing or empty results folder, one other than docs/results that lacks a record a target or page now
    shows measured, or a damaged record, is a UserError and nothing is written (a mistyped --results, or a
    folder of a few trial records, would otherwise turn every other block into "Not measured yet")."""
    results = load_results(results_dir)
    if not results:
        raise UserError(f"{results_dir}: holds no benchmark results (*.json); pass the folder the benchmarks "
                        f"wrote, e.g. --results {RESULTS_DIR}")
    texts = {Path(t): Path(t).read_text(encoding="utf-8") for t in targets}
    skeletons = pages(targets)
    if not is_published(results_dir):  # a folder of a few trial records, say
        computed = _computed(results_dir)
        now = [*texts.values(), *(p.read_text(encoding="utf-8") for p in skeletons if p.is_file())]
        shown = {_stem(m.group("name")) for text in now for m in _BLOCK.finditer(text)
                 if m.group("name") not in computed and m.group("body").strip()
                 and not m.group("body").startswith("*Not measured yet")}
        lacking = sorted(shown - set(results))
        if lacking:
            raise UserError(f"{results_dir} lacks records the docs now show measured ({', '.join(lacking[:4])}"
                            f"{', ...' if len(lacking) > 4 else ''}): the report would mark them not measured; "
                            f"copy them in first (cp -n {RESULTS_DIR}/*.json {results_dir}/) and report again")
    check_results(results, results_dir)
    rendered, names = {}, []
    for path, text in {**texts, **skeletons}.items():
        rendered[path] = render(text, results, results_dir)
        names += [m.group("name") for m in _BLOCK.finditer(text)]
    for path, text in rendered.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return names
