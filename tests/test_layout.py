"""The package's shape (docs/LAYOUT.md): no import cycle, no function over 100 lines.

Measured from the source, so an import inside a function counts as much as one at the top.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "whisfusion_cli"
MAX_FUNCTION_LINES = 100


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def _imports(tree: ast.Module, names: set[str]) -> set[str]:
    """The package modules `tree` imports, at any depth (`from . import x`, `from .x import y`, absolute)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 or module.startswith("whisfusion_cli"):
                head = module.removeprefix("whisfusion_cli").lstrip(".").split(".")[0]
                if head:
                    found.add(head)
                else:  # from . import a, b
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("whisfusion_cli."):
                    found.add(alias.name.split(".")[1])
    return found & names


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(tree, set(modules)) - {name} for name, tree in modules.items()}
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
    for path in sorted(PACKAGE.glob("*.py")):
        lines = _code_lines(path)
        for i in range(len(lines) - 5):
            block = tuple(text for _, text in lines[i:i + 6])
            place = (path.name, lines[i][0])
            first = seen.setdefault(block, place)
            if first != place and (first[0] != place[0] or place[1] - first[1] >= 6):
                repeats.append(f"{first[0]}:{first[1]} ~ {place[0]}:{place[1]}")
    assert not repeats, "six-line blocks repeated: " + ", ".join(repeats)
