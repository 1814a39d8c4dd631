"""The shape of the library: packages by concern, small modules and functions, imports in layers
with no cycle between files, one import path per name, one build file, and no citation of a
methods document the project does not hold."""

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
BASE_MODULES = {"__init__", "errors", "dtypes", "dtensor"}
LONGEST = 450  # lines; the remote-code modeling file is one file by necessity (it ships inside model folders)
ONE_FILE = {"surgeon/modules/modeling_surgeon.py"}
LONGEST_FUNCTION = 100  # lines
# Module ``__getattr__``s that build rather than forward: the façade's lazy ``surgeon.DriftCallback``,
# and the remote-code file's ``Surgeon<Architecture>`` classes that ``auto_map`` names.
BUILT_ON_DEMAND = {"surgeon", "surgeon.modules.modeling_surgeon"}
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
    assert {"io", "hub", "anatomy", "drift", "merge", "modules", "heads", "perception", "data", "training", "publish", "demo", "cli"} <= packages
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
    for base in BASE_MODULES - {"__init__"}:
        assert not units.get(base, set()) - {"errors"}, f"surgeon/{base}.py imports {units[base]}"
    assert units["io"] <= {"errors"}, "io is the bottom layer"
    # Module by module, what runs at import time: no cycle.
    graphlib.TopologicalSorter(at_import).prepare()


def test_files_import_each_other_with_no_cycle_deferred_imports_included():
    """A circle between two files, even through an import inside a function, means one of them
    holds two jobs."""
    modules = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        for name in _imports(path, module, top_level_only=False):
            target = name if name in modules else name.rpartition(".")[0]
            if target in modules and target not in (module, "surgeon") and not module.startswith(target + "."):
                edges[module].add(target)
    try:
        graphlib.TopologicalSorter(edges).prepare()
    except graphlib.CycleError as e:
        raise AssertionError(f"import circle: {' -> '.join(e.args[1])}") from None


def test_no_function_is_longer_than_a_screen_or_two():
    long = {}
    for path in LIBRARY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION:
                long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = node.end_lineno - node.lineno + 1
    assert not long, f"name the parts of: {long}"


def test_only_the_command_line_uses_click_and_rich_and_only_hub_talks_to_the_hub():
    for module, path in _modules().items():
        tree = ast.parse(path.read_text())
        used = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        used |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        if not module.startswith("surgeon.cli"):
            assert not used & {"click", "rich"}, module
        if not module.startswith("surgeon.hub"):
            assert "huggingface_hub" not in used, module


def test_every_module_imports():
    for name in sorted(_modules()):
        if not name.endswith(".__main__"):  # a program, run by ``python -m``
            assert importlib.import_module(name).__name__ == name


def test_one_import_path_per_name_and_one_build_file():
    """No forwarding hook: packages do not look names up in their modules (``__getattr__``), the
    only module ``__getattr__`` is the package façade's lazy ``DriftCallback`` & co., and the build
    is pyproject.toml alone with the command line inside the package."""
    for module, path in _modules().items():
        defined = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert "__getattr__" not in defined or module in BUILT_ON_DEMAND, module
    assert not (LIBRARY / "_compat.py").exists() and not (ROOT / "setup.py").exists() and not (ROOT / "commands").exists()
    assert "package-dir" not in (ROOT / "pyproject.toml").read_text()
    for old in ("surgeon.commands", "surgeon.shards", "surgeon.prior", "surgeon.io.download", "surgeon.training.setup"):
        with pytest.raises(ImportError):
            importlib.import_module(old)
    import surgeon

    assert surgeon.DriftCallback is importlib.import_module("surgeon.training.integrations").DriftCallback
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        surgeon.nothing_here  # noqa: B018
    ran = subprocess.run([sys.executable, "-m", "surgeon.cli", "--version"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert ran.returncode == 0 and "surgeon, version" in ran.stdout, ran.stderr[-1000:]


def test_every_methods_citation_points_at_a_section_that_exists():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    methods = (ROOT / "docs" / "methods.md").read_text()
    sections = set(re.findall(r"^## (\d+)\. ", methods, re.M))
    assert sections == {str(i) for i in range(1, len(sections) + 1)} and {"1", "2", "3", "4", "5"} <= sections
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
