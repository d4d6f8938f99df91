"""The shape of the package: imports flow one way, no cycles, no edits of the interpreter's
import path, one door to MLflow, small modules. Read from the source (nothing is imported)."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "hjepa_core"
MAX_LINES = 600

# The layers of hjepa_core, lowest first. A module may import its own layer and the layers below
# it, never one above. A module belongs to the layer of the longest prefix that names it.
#   - constants, utils: no hjepa_core imports but constants (utils), no torch in constants.
#   - tracking (the only mlflow door) and plots (matplotlib; the one way a PNG is written) sit
#     just above utils: every layer logs and draws.
#   - serving (the registered encoder's file and MLflow loader) needs only the ViT, so a model
#     loaded from the registry imports no training or evaluation code.
#   - config validates masking strategies and encoder sizes with masks and models, so it sits
#     above them; what reads a Config (train, eval, pipeline, cli) sits above it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("hjepa_core", "hjepa_core.constants"),
    ("hjepa_core.utils",),
    ("hjepa_core.tracking", "hjepa_core.plots"),
    ("hjepa_core.masks",),
    ("hjepa_core.data",),
    ("hjepa_core.losses",),
    ("hjepa_core.models", "hjepa_core.serving"),
    ("hjepa_core.config",),
    ("hjepa_core.train",),
    ("hjepa_core.eval",),
    ("hjepa_core.pipeline",),
    ("hjepa_core.cli",),
)

# Temporary, known exceptions: (importer, imported). Each one names why it is still here.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()
# .py files that may edit the import path (sys dot path): none.
SYS_PATH_EXCEPTIONS: set[str] = set()
_SKIPPED_DIRS = {"outputs", "build", "dist", "node_modules", "mlruns", "mlartifacts"}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the absolute dotted name as written (a module, or a module's attribute)
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(name: str, path: Path) -> list[Import]:
    """Every import statement of a module, at any depth (module level, functions, TYPE_CHECKING)."""
    found = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(name, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join([*here, base] if base else here)
            found.append(Import(name, base, node.lineno))
            found += [Import(name, f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the hjepa_core modules importing it runs: the module itself and the packages
    above it whose ``__init__`` it runs (those that do not already contain the importer)."""
    modules = _modules(PACKAGE)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for imp in _imports(name, path):
            if imp.target not in modules or imp.target == name or (name, imp.target) in KNOWN_EXCEPTIONS:
                continue
            parts = imp.target.split(".")
            for depth in range(1, len(parts) + 1):
                target = ".".join(parts[:depth])
                if target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def _layer(module: str) -> int:
    best, rank = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    return rank


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycles() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_module_has_a_layer() -> None:
    missing = [m for m in _modules(PACKAGE) if _layer(m) < 0]
    assert not missing, f"place these modules in LAYERS of {Path(__file__).name}: {missing}"


def test_imports_flow_one_way() -> None:
    upward: set[str] = set()
    modules = _modules(PACKAGE)
    for name, path in modules.items():
        for imp in _imports(name, path):
            target = imp.target if imp.target in modules else imp.target.rpartition(".")[0]
            if target not in modules or (name, target) in KNOWN_EXCEPTIONS:
                continue
            if _layer(target) > _layer(name):
                upward.add(f"{path.relative_to(ROOT)}:{imp.line} imports {target}")
    assert not upward, "imports running upward (see LAYERS):\n" + "\n".join(sorted(upward))


def test_known_exceptions_are_still_needed() -> None:
    modules = _modules(PACKAGE)
    stale = [pair for pair in KNOWN_EXCEPTIONS
             if pair[0] not in modules
             or not any(i.target == pair[1] for i in _imports(pair[0], modules[pair[0]]))]
    assert not stale, f"these exceptions are fixed: delete them from KNOWN_EXCEPTIONS: {stale}"


def test_library_never_imports_the_front_doors_or_kfp() -> None:
    banned = ("kfp", "hjepa_kfp", "components", "pipelines")
    found = [f"{path.relative_to(ROOT)}:{imp.line} imports {imp.target}"
             for name, path in _modules(PACKAGE).items() for imp in _imports(name, path)
             if imp.target.split(".")[0] in banned]
    assert not found, "\n".join(found)


def test_mlflow_is_imported_only_in_tracking() -> None:
    found = [f"{path.relative_to(ROOT)}:{imp.line}"
             for package in (PACKAGE, "hjepa_kfp")
             for name, path in _modules(package).items() for imp in _imports(name, path)
             if imp.target.split(".")[0] == "mlflow" and name != "hjepa_core.tracking"]
    assert not found, "mlflow imported outside hjepa_core/tracking.py: " + ", ".join(found)


def test_no_import_path_edits() -> None:
    needle = re.compile(r"\bsys\s*\." + "path" + r"\b")
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if any(part.startswith(".") or part in _SKIPPED_DIRS or part.endswith(".egg-info")
               for part in relative.parts[:-1]):
            continue
        if relative.as_posix() not in SYS_PATH_EXCEPTIONS and needle.search(path.read_text(errors="replace")):
            found.append(relative.as_posix())
    assert not found, f"import-path edits in {found}: install the package, or use pytest's pythonpath"


def test_modules_are_small() -> None:
    long = {f"{path.relative_to(ROOT)}": n for package in (PACKAGE, "hjepa_kfp")
            for path in _modules(package).values() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"
