"""The room rules of docs/architecture.md, kept true: imports run down the levels, no import cycles, small modules."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sdlora"
# room -> level; a module may import its own room or a room of a lower level, never a room of its level or above
LEVELS = {"errors": 0, "util": 0, "formats": 1, "models": 2, "lora": 3, "data": 3, "sample": 4, "training": 5,
          "tools": 5, "eval": 5, "cli": 6, "ui": 6}
MAX_LINES = 420
# same-level imports the table allows: util raises the one error type (its output-folder and thread checks)
WITHIN_LEVEL = {("util", "errors")}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, top_level_only: bool) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("sdlora")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdlora") and node.level == 0:
            found += [(node.lineno, node.module)]
            # `from sdlora.cli import eval as cli_eval` imports the module sdlora.cli.eval
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "<relative import>"))
    return found


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package root (public API, __version__)


def test_imports_run_down_the_levels():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        room = _room(name)
        if room is None or room == "__main__":
            continue
        assert room in LEVELS, f"{name}: room '{room}' is not in docs/architecture.md's table"
        for line, target in _imports(path, top_level_only=False):
            assert target != "<relative import>", f"{path}:{line}: use absolute sdlora.<room> imports"
            to = _room(target)
            if to is None or to == room or target not in modules:
                continue  # the package root, the own room, or a name imported from a module (not a module)
            if LEVELS[to] >= LEVELS[room] and (room, to) not in WITHIN_LEVEL:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({room}, level {LEVELS[room]}) imports {target} "
                           f"({to}, level {LEVELS[to]})")
    assert not bad, "imports against the room order:\n" + "\n".join(bad)


def test_no_import_cycles_at_module_level():
    modules = _modules()
    graph = {name: {t for _, t in _imports(path, top_level_only=True) if t in modules and t != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1 and not node.startswith(nxt + ".") and nxt != "sdlora":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_module_is_long():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_lower_rooms_take_narrow_arguments():
    """Only training/ and the front ends know TrainConfig; lora/, formats/, data/, sample/ and models/ take values."""
    for room in ("lora", "formats", "data", "sample", "models", "tools", "eval"):
        for path in (PACKAGE / room).rglob("*.py"):
            assert "TrainConfig" not in path.read_text(), f"{path} mentions TrainConfig"
