"""The package's shape (docs/LAYOUT.md): no import cycle, no function over 100 lines.

Measured from the source, so an import inside a function counts as much as one at the top.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "whisfusion_cli"
MAX_FUNCTION_LINES = 100


def _files() -> list[Path]:
    """The package's source files, its subpackages' (bench/) included."""
    return sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    """`audio`, `bench` (bench/__init__.py), `bench.metrics`; the package's own __init__ is `__init__`."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in _files()}


def _imports(name: str, tree: ast.Module, names: set[str]) -> set[str]:
    """The package modules module `name` imports, at any depth (`from . import x`, `from .x import y`,
    `from ..x import y` in a subpackage, absolute)."""
    package = name.split(".")[:-1] if name != "__init__" else []
    if name in names and any(n.startswith(name + ".") for n in names):  # a subpackage's __init__
        package = name.split(".")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package[:len(package) - (node.level - 1)]
            elif module.startswith("whisfusion_cli"):
                base, module = [], module.removeprefix("whisfusion_cli").lstrip(".")
            else:
                continue
            target = base + (module.split(".") if module else [])
            candidates = [target + [alias.name] for alias in node.names] if not module else [target]
            for parts in candidates:  # the longest prefix that names a module
                for n in range(len(parts), 0, -1):
                    if ".".join(parts[:n]) in names:
                        found.add(".".join(parts[:n]))
                        break
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("whisfusion_cli."):
                    found.add(alias.name.split(".")[1])
    return found & names


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, tree, set(modules)) - {name} for name, tree in modules.items()}
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_function_over_100_lines():
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                length = node.end_lineno - start + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, "functions over 100 lines: " + ", ".join(sorted(long))


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text with white space folded), leaving out what a reader skips: blank lines,
    comments, lone punctuation and imports."""
    kept = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = " ".join(line.split())
        if not text or text.startswith("#") or text.startswith(("import ", "from ")) or not any(c.isalnum() for c in text):
            continue
        kept.append((number, text))
    return kept


def test_no_six_line_block_repeated():
    seen, repeats = {}, []
    for path in _files():
        lines = _code_lines(path)
        for i in range(len(lines) - 5):
            block = tuple(text for _, text in lines[i:i + 6])
            place = (str(path.relative_to(PACKAGE)), lines[i][0])
            first = seen.setdefault(block, place)
            if first != place and (first[0] != place[0] or place[1] - first[1] >= 6):
                repeats.append(f"{first[0]}:{first[1]} ~ {place[0]}:{place[1]}")
    assert not repeats, "six-line blocks repeated: " + ", ".join(repeats)


def _layout_table() -> list[tuple[str, set[str]]]:
    """(module, modules it may import) from docs/LAYOUT.md's table, in its order."""
    import re

    rows = []
    text = (PACKAGE.parent / "docs" / "LAYOUT.md").read_text(encoding="utf-8")
    for line in text.splitlines():
        m = re.match(r"\| `([\w/]+?)(?:/__init__)?\.py` \|.*\| ([^|]*) \|$", line)
        if m:
            may = {n.strip() for n in m.group(2).split(",")} - {"-", ""}
            rows.append((m.group(1).replace("/", "."), may))
    return rows


def test_layout_doc_lists_every_module_and_what_it_imports():
    modules = _modules()
    names = set(modules)
    table = _layout_table()
    listed = [name for name, _ in table]
    assert sorted(listed) == sorted(names), "docs/LAYOUT.md's table and the package differ: " + \
        ", ".join(sorted(set(listed) ^ names))
    above = set()
    for name, may in table:
        actual = _imports(name, modules[name], names) - {name}
        assert actual <= may, f"{name} imports {', '.join(sorted(actual - may))}, not in its LAYOUT.md row"
        assert may <= above, f"{name} may import {', '.join(sorted(may - above))}, listed below it (data flows one way)"
        above.add(name)
