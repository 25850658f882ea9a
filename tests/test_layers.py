"""The layers are folders, and their import rules hold: the algorithm core knows neither Flower nor the
benchmarks, only the transport and the launchers import Flower, only the CLI imports the benchmarks (besides the
benchmarks themselves), and no module imports one that imports it back.

Imports are read from the source (every import statement, also those inside functions), so an import
that only runs on some path counts as well."""

import ast
from pathlib import Path

import photon

ROOT = Path(photon.__file__).parent
FOUNDATION = ("photon.model", "photon.data", "photon.train", "photon.config", "photon.checkpoint", "photon.digest",
              "photon.errors", "photon.runlog", "photon.display")
LAYERS = ("photon.federation", "photon.transport", "photon.launch", "photon.bench", "photon.cli")
# what each layer may not import (besides those below it, everything above it is out of bounds)
FORBIDDEN = {
    FOUNDATION: ("flwr", *LAYERS),
    ("photon.federation",): ("flwr", "photon.transport", "photon.launch", "photon.bench", "photon.cli"),
    ("photon.transport",): ("photon.launch", "photon.bench", "photon.cli"),
    ("photon.launch",): ("photon.bench", "photon.cli"),
    ("photon.bench",): ("flwr", "photon.cli"),
    ("photon.cli",): ("flwr",),
}


def module_names(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = ("photon", *path.relative_to(root).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules `name` imports: photon modules by full name (a name imported from a package that is itself a
    module counts as that module, not the package), anything else by its top-level package."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        else:
            continue
        for t in targets:
            found.add(t if t.startswith("photon") else t.split(".")[0])
    found.discard(name)
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports(name, path, modules) for name, path in modules.items()}


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(g: dict[str, set[str]]) -> list[str]:
    out = []
    for owners, banned in FORBIDDEN.items():
        for name, deps in g.items():
            if under(name, owners):
                out += [f"{name} imports {d}" for d in sorted(deps) if under(d, banned)]
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_each_layer_imports_only_what_is_below_it():
    assert violations(graph()) == []


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(graph()) == []


def test_the_rules_see_a_breach(tmp_path):
    """The checks catch what they are for: a Flower import in the algorithm core, a benchmark imported by the
    runtime, and a circle."""
    for rel, text in {"federation/__init__.py": "", "federation/fold.py": "import flwr\nfrom . import outer\n",
                      "federation/outer.py": "from photon.federation import fold\n",
                      "train/__init__.py": "", "train/local.py": "from photon.bench import sizing\n",
                      "bench/__init__.py": "", "bench/sizing.py": ""}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    g = graph(tmp_path)
    assert violations(g) == ["photon.train.local imports photon.bench.sizing", "photon.federation.fold imports flwr"]
    assert cycles(g) == [["photon.federation.fold", "photon.federation.outer"]]
