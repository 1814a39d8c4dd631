"""The shape of the library: packages by concern, small modules, imports in layers with no cycle,
the old import paths kept, and no citation of a methods document the project does not hold."""

from __future__ import annotations

import ast
import graphlib
import importlib
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "surgeon"
# Modules that stand beside the packages: shared by every layer, importing none of them.
BASE_MODULES = {"__init__", "_compat", "errors", "shards"}
LONGEST = 450  # lines; the remote-code modeling file is one file by necessity (it ships inside model folders)
ONE_FILE = {"surgeon/modules/modeling_surgeon.py"}
FOREIGN = "METHODS" + ".md"  # a methods document outside the project (spelt apart so this file does not cite it)


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """Every ``surgeon…`` name ``path`` imports (relative imports resolved). ``top_level_only``:
    only those that run when the module is imported (not in functions, not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names: set[str] = set()

    def add(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.update(f"{base}.{a.name}" for a in node.names)

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, field, []):
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])
            else:
                add(node)

    if top_level_only:
        visit(tree.body)
    else:
        for node in ast.walk(tree):
            add(node)
    names.discard("surgeon.__version__")  # the version string, not the package's façade
    return {n for n in names if n == "surgeon" or n.startswith("surgeon.")}


def _unit(module: str) -> str:
    """The package (or base module) a module belongs to: ``surgeon.drift.prior`` -> ``drift``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "surgeon"


def test_the_library_is_a_set_of_packages_by_concern():
    flat = {p.stem for p in LIBRARY.glob("*.py")}
    assert flat <= BASE_MODULES, f"put {sorted(flat - BASE_MODULES)} in the package of its concern"
    packages = {p.name for p in LIBRARY.iterdir() if (p / "__init__.py").is_file()}
    assert {"io", "anatomy", "drift", "merge", "modules", "heads", "perception", "data", "hub", "training", "demo"} <= packages
    for package in packages:  # each package says what it holds, in its docstring
        assert ast.get_docstring(ast.parse((LIBRARY / package / "__init__.py").read_text())), package


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {
        str(p.relative_to(ROOT)): n
        for p in LIBRARY.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > LONGEST and str(p.relative_to(ROOT)) not in ONE_FILE
    }
    assert not long, f"split these modules: {long}"


def test_packages_import_each_other_in_layers_with_no_cycle():
    modules = _modules()
    units: dict[str, set[str]] = defaultdict(set)
    at_import: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        for name in _imports(path, module, top_level_only=False):
            target = name if name in modules else name.rpartition(".")[0]
            if target in modules and _unit(target) != _unit(module):
                units[_unit(module)].add(_unit(target))
        for name in _imports(path, module, top_level_only=True):
            target = name if name in modules else name.rpartition(".")[0]
            if target in modules and target != module and not module.startswith(target + "."):
                at_import[module].add(target)
    # Every import, also those deferred into functions: the packages form layers.
    graphlib.TopologicalSorter(units).prepare()
    # … in the order surgeon/__init__.py lists them: each package uses only those listed above it.
    listed = re.findall(r"^    (\w+)/ ", importlib.import_module("surgeon").__doc__, re.M)
    assert set(listed) == {p.name for p in LIBRARY.iterdir() if (p / "__init__.py").is_file()}
    assert re.findall(r"^  (\w+)/ ", (ROOT / "README.md").read_text(), re.M) == listed  # the README shows the same
    for i, unit in enumerate(listed):
        below = units[unit] - BASE_MODULES - {"surgeon"}
        assert below <= set(listed[:i]), f"{unit} uses {sorted(below - set(listed[:i]))}, listed below it"
    for base in BASE_MODULES - {"__init__", "_compat"}:
        assert not units.get(base), f"surgeon/{base}.py imports {units[base]}"
    assert units["io"] <= {"errors"}, "io is the bottom layer"
    # Module by module, what runs at import time: no cycle.
    graphlib.TopologicalSorter(at_import).prepare()


def test_every_module_imports():
    for name in sorted(_modules()):
        assert importlib.import_module(name).__name__ == name


def test_the_old_import_paths_give_the_same_objects():
    from surgeon._compat import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    import surgeon.checkpoint
    import surgeon.data
    import surgeon.encoding
    import surgeon.hub
    import surgeon.tiny
    from surgeon.data import load_samples
    from surgeon.data.scan import load_samples as moved
    from surgeon.io.checkpoint import open_checkpoint

    assert load_samples is moved and surgeon.checkpoint.open_checkpoint is open_checkpoint
    assert surgeon.encoding.LazyDataset is importlib.import_module("surgeon.data.loading").LazyDataset
    assert surgeon.hub.download_checkpoint is importlib.import_module("surgeon.io.download").download_checkpoint
    assert surgeon.hub.push_folder is importlib.import_module("surgeon.hub.client").push_folder
    assert surgeon.tiny.build is importlib.import_module("surgeon.demo.tiny").build
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        surgeon.data.nothing_here  # noqa: B018
    # and an old path still runs as a program
    ran = subprocess.run([sys.executable, "-m", "surgeon.hub_standin", "--help"], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and "--port" in ran.stdout, ran.stderr[-1000:]


def test_every_methods_citation_points_at_a_section_that_exists():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    methods = (ROOT / "docs" / "methods.md").read_text()
    sections = set(re.findall(r"^## (\d+)\. ", methods, re.M))
    assert sections == {"1", "2", "3", "4", "5"}
    cited = defaultdict(list)
    for name in tracked:
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".toml", ".txt", ".json", ".cfg") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        assert FOREIGN not in text, f"{name} cites a methods document the project does not hold"
        for section in re.findall(r"docs/methods\.md §(\d+)", text):
            cited[section].append(name)
    assert cited and set(cited) <= sections, {s: cited[s] for s in set(cited) - sections}
