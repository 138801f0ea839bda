"""Imports only go down: the layer order in docs/architecture.md, checked against every import in the package.

A unit is a folder of the package (`readout/`) or a top-level module (`scorer.py`). The docs list the units
top to bottom, one layer per line; a module may import from its own unit and from layers below its own, never
from a unit of its own layer or above. Every import statement counts, at module level and inside functions: a
lazy import defers an upward edge, it does not remove it.
"""
import ast
import graphlib
from pathlib import Path

import siglip_dola

PACKAGE_ROOT = Path(siglip_dola.__file__).parent
ARCHITECTURE = PACKAGE_ROOT.parent / "docs" / "architecture.md"
FENCE = "```layers"


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the modules of root's package it imports}, read from the source with ast.

    `from pkg import name` is an edge to the module pkg.name when that is a module, else to pkg. Not counted:
    the implicit import of a parent package (a package's __init__ importing its own submodules is the layout,
    not a cycle) and importlib.import_module(...) strings."""
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:   # relative: from . import x / from ..y import z
                    base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        graph[name] = {target for target in targets if target in files and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle [a, b, ..., a], or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        return error.args[1]
    return None


def unit_of(module: str, root: Path) -> str:
    """siglip_dola.readout.kernel -> "readout/", siglip_dola.scorer -> "scorer.py", siglip_dola -> "__init__.py"."""
    parts = module.split(".")[1:]
    if not parts:
        return "__init__.py"
    return f"{parts[0]}/" if (root / parts[0]).is_dir() else f"{parts[0]}.py"


def unit_graph(graph: dict[str, set[str]], root: Path) -> dict[str, dict[str, list[str]]]:
    """{unit: {unit it imports: ["module -> module", ...]}} over edges that leave a unit."""
    units: dict[str, dict[str, list[str]]] = {}
    for source, targets in graph.items():
        edges = units.setdefault(unit_of(source, root), {})
        for target in targets:
            if unit_of(target, root) != unit_of(source, root):
                edges.setdefault(unit_of(target, root), []).append(f"{source} -> {target}")
    return units


def read_layers(markdown: str) -> list[list[str]]:
    """The ```layers block of the docs: one layer per line, top to bottom, units separated by spaces."""
    lines = markdown.splitlines()
    start = lines.index(FENCE) + 1
    stop = lines.index("```", start)
    return [line.split() for line in lines[start:stop] if line.strip()]


def layering_violations(graph: dict[str, set[str]], root: Path, layers: list[list[str]]) -> list[str]:
    """Each edge from a unit to one of its own layer or above, and each unit missing from or unknown to `layers`."""
    depth = {unit: row for row, units in enumerate(layers) for unit in units}   # 0 is the top
    units = unit_graph(graph, root)
    problems = [f"{unit} is in no layer of docs/architecture.md" for unit in sorted(set(units) - set(depth))]
    problems += [f"{unit} is listed but not in the package" for unit in sorted(set(depth) - set(units))]
    for source, targets in sorted(units.items()):
        for target, edges in sorted(targets.items()):
            if source in depth and target in depth and depth[target] <= depth[source]:
                problems.append(f"{source} imports {target}, which is not below it: {'; '.join(sorted(edges))}")
    return problems


def test_imports_only_go_down_the_documented_layers():
    graph = import_graph(PACKAGE_ROOT)
    layers = read_layers(ARCHITECTURE.read_text(encoding="utf-8"))
    assert len(graph) > 40 and "siglip_dola.scoring.checks" in graph["siglip_dola.scorer"]   # it reads the tree
    assert sum(map(len, layers)) > 15
    assert layering_violations(graph, PACKAGE_ROOT, layers) == []


def test_no_unit_level_cycles():
    units = unit_graph(import_graph(PACKAGE_ROOT), PACKAGE_ROOT)
    cycle = find_cycle({unit: set(targets) for unit, targets in units.items()})
    assert cycle is None, f"folder-level import cycle: {' -> '.join(cycle)}"


def test_no_module_level_cycles():
    cycle = find_cycle(import_graph(PACKAGE_ROOT))
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_cycle_finder_sees_lazy_relative_and_from_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import b\n")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("import os\n")
    assert import_graph(package) == {"pkg": set(), "pkg.sub": {"pkg.sub.b"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub.b": set()}
    assert find_cycle(import_graph(package)) is None
    (package / "sub" / "b.py").write_text("def late():\n    from ..a import x\n")   # a function-level cycle
    assert set(find_cycle(import_graph(package))) == {"pkg.a", "pkg.sub.b"}


def _write_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for name, source in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(source)
    return package


def test_layering_sees_upward_lazy_and_same_layer_imports(tmp_path):
    package = _write_package(tmp_path, {"__init__.py": "", "top.py": "from pkg.low import kernel\n",
                                        "low/__init__.py": "", "low/kernel.py": "import os\n",
                                        "side.py": ""})
    layers = read_layers("intro\n```layers\n__init__.py\ntop.py  side.py\nlow/\n```\nafter\n")
    assert layers == [["__init__.py"], ["top.py", "side.py"], ["low/"]]
    assert layering_violations(import_graph(package), package, layers) == []
    (package / "low" / "kernel.py").write_text("def late():\n    from pkg import top\n")   # upward, in a function
    assert layering_violations(import_graph(package), package, layers) == [
        "low/ imports top.py, which is not below it: pkg.low.kernel -> pkg.top"]
    (package / "low" / "kernel.py").write_text("")
    (package / "side.py").write_text("from . import top\n")   # same layer: neither is below the other
    assert layering_violations(import_graph(package), package, layers) == [
        "side.py imports top.py, which is not below it: pkg.side -> pkg.top"]
    (package / "side.py").write_text("")
    (package / "new.py").write_text("")
    assert layering_violations(import_graph(package), package, layers) == [
        "new.py is in no layer of docs/architecture.md"]
