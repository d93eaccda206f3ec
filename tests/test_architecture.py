"""The layout's rules, checked on the source: floors (a room imports only from rooms on lower floors), file
sizes, a torch-free estimator half, and tests that use only public names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "tangentlens"

# room -> floor (docs/architecture.md); a room may import only from rooms on strictly lower floors
FLOORS: dict[str, int] = {
    "errors": 0,
    "inputs": 1, "memory": 1, "arrays": 1, "kinds": 1, "datasets": 1,
    "network": 2, "projection": 2, "logits": 2, "explanation": 2, "lds_store": 2, "report": 2,
    "probes": 3, "capture": 3, "config": 3, "surrogate": 3, "faithfulness": 3, "explain": 3,
    "blocks": 4, "engine": 4, "lds": 4, "attribution_core": 4,
    "features": 5,
    "api": 6,
    "attribution": 7, "store": 7,
    "__init__": 8,
    "demo": 9,
    "cli": 10,
    "__main__": 11,
}
ESTIMATOR_HALF = (
    "surrogate", "faithfulness", "explain", "explanation", "logits", "arrays", "lds", "lds_store",
)
MAX_LINES = 600


def _room(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """The tangentlens rooms a source file imports (relative and absolute imports)."""
    tree = ast.parse(path.read_text())
    depth = len(path.relative_to(PKG).parts) - 1  # 0 for a top-level module, 1 inside a room package
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level > depth:  # reaches the package root: the room is the module named
                    names = [node.module] if node.module else [a.name for a in node.names]
                    out.update(n.split(".")[0] if n.split(".")[0] in FLOORS else "__init__" for n in names)
            elif node.module and node.module.startswith("tangentlens"):
                parts = node.module.split(".")
                out.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("tangentlens"):
                    parts = a.name.split(".")
                    out.add(parts[1] if len(parts) > 1 else "__init__")
    return out


SOURCES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_go_only_to_lower_floors(path: Path) -> None:
    room = _room(path)
    assert room in FLOORS, f"{room} has no floor: add it to FLOORS and docs/architecture.md"
    upward = [r for r in _imports(path) - {room} if FLOORS.get(r, 99) >= FLOORS[room]]
    where = f"{path.relative_to(PKG)} (floor {FLOORS[room]})"
    assert not upward, f"{where} imports {upward} from its floor or above"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_no_source_file_over_the_limit(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PKG)}: {n} lines (> {MAX_LINES}); split a concern out"


@pytest.mark.parametrize("room", ESTIMATOR_HALF)
def test_the_estimator_half_does_not_import_torch(room: str) -> None:
    files = [PKG / f"{room}.py"] if (PKG / f"{room}.py").exists() else sorted((PKG / room).rglob("*.py"))
    for f in files:
        tree = ast.parse(f.read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert not any(m == "torch" or m.startswith("torch.") for m in mods), f"{f.name} imports torch"


def test_tests_use_only_public_names() -> None:
    private = re.compile(r"from tangentlens[\w.]* import [^\n]*\b_[a-z]\w*|tangentlens(\.\w+)*\._[a-z]\w*")
    found = []
    for f in sorted((ROOT / "tests").glob("*.py")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if private.search(line):
                found.append(f"{f.name}:{i}: {line.strip()}")
    assert not found, "tests import private names:\n" + "\n".join(found)
