"""The layout rules of issue #24, checked from the source: data flows one way and each file has one job.

* no import cycle among ``policy_accel`` modules (function-local imports count: they only hide a cycle);
* the library imports neither ``eval`` nor ``experiments``;
* no ``sys.path`` edits in ``eval/`` and no ``eval/`` script imports another one (the package is installed
  editable by scripts/setup.sh, so every script imports the library, never a sibling);
* every named configuration the entry points select exists in ``configs/experiment/`` (the one schema);
* ``reports/`` holds outputs only.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from policy_accel.experiment.configurations import configuration_names, families

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "policy_accel"
EVAL = ROOT / "eval"
OUTPUT_ONLY_FORBIDDEN = (".py", ".sh", ".patch", ".log")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST, module: str, is_package: bool, modules: set[str] = frozenset()) -> set[str]:
    """Absolute names of every module ``tree`` imports, anywhere in it (function bodies included). ``from pkg import
    x`` names ``pkg.x`` when that is one of ``modules`` (a submodule: the package itself is only its parent, as for
    any submodule import), else ``pkg``."""
    names = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            for alias in node.names:
                name = f"{target}.{alias.name}"
                names.add(name if name in modules else target)
    return names


def library_graph() -> dict[str, set[str]]:
    """policy_accel module -> the policy_accel modules it imports."""
    files = {_module_name(p): p for p in LIBRARY.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        imported = _imported(ast.parse(path.read_text()), module, path.name == "__init__.py", set(files))
        graph[module] = {m for m in imported if m in files and m != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle_and_only_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_function_local_imports_are_seen():
    tree = ast.parse("from . import base\ndef f():\n    from ..policy import DiffusionPolicy\n")
    modules = {"policy_accel.solvers.base", "policy_accel.policy"}
    names = _imported(tree, "policy_accel.solvers.newton", is_package=False, modules=modules)
    assert names == {"policy_accel.solvers.base", "policy_accel.policy"}  # not the package policy_accel.solvers


def test_no_import_cycle_in_the_library():
    found = [sorted(c) for c in cycles(library_graph())]
    assert not found, f"import cycles in policy_accel: {found}"


def test_library_imports_neither_eval_nor_experiments():
    offenders = []
    for path in LIBRARY.rglob("*.py"):
        module = _module_name(path)
        for name in _imported(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            if name.split(".")[0] in ("eval", "experiments"):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


def _eval_scripts() -> list[Path]:
    return sorted(EVAL.glob("*.py"))


def _edits_sys_path(tree: ast.AST) -> bool:
    """``sys.path.<anything>(...)`` or an assignment to ``sys.path``."""
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value
        elif isinstance(node, ast.Assign | ast.AugAssign):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
        if (
            isinstance(target, ast.Attribute)
            and target.attr == "path"
            and isinstance(target.value, ast.Name)
            and target.value.id == "sys"
        ):
            return True
    return False


def test_sys_path_detector():
    assert _edits_sys_path(ast.parse("import sys\nsys.path.insert(0, 'x')"))
    assert _edits_sys_path(ast.parse("import sys\nsys.path = ['x']"))
    assert not _edits_sys_path(ast.parse("import sys\nprint(sys.argv)"))


@pytest.mark.parametrize("script", _eval_scripts(), ids=lambda p: p.name)
def test_eval_script_does_not_edit_sys_path(script: Path):
    assert not _edits_sys_path(ast.parse(script.read_text())), f"{script.relative_to(ROOT)} edits sys.path"


@pytest.mark.parametrize("script", _eval_scripts(), ids=lambda p: p.name)
def test_eval_script_imports_no_other_script(script: Path):
    siblings = {p.stem for p in _eval_scripts()} - {script.stem}
    imported = _imported(ast.parse(script.read_text()), script.stem, is_package=False)
    bad = sorted(n for n in imported if n.split(".")[0] in siblings or n.split(".")[0] == "eval")
    assert not bad, f"{script.relative_to(ROOT)} imports {bad}"


def _selected_configurations() -> dict[str, list[str]]:
    """Every configuration name an entry point's config selects by default."""
    configs = ROOT / "configs"
    latency = yaml.safe_load((configs / "latency.yaml").read_text())
    bench = yaml.safe_load((configs / "solver_bench.yaml").read_text())
    benchmark = yaml.safe_load((configs / "benchmark.yaml").read_text())
    return {
        "latency.yaml: configurations": latency["configurations"],
        "solver_bench.yaml: configurations": bench["configurations"],
        "benchmark.yaml: only": benchmark["only"] or [],
        "benchmark.yaml: front": benchmark["front"],
    }


def test_entry_points_select_configurations_from_the_one_schema():
    defined = set(configuration_names()) | set(families())  # a family's name selects all its members
    missing = {where: sorted(set(names) - defined) for where, names in _selected_configurations().items()}
    assert not any(missing.values()), f"not in configs/experiment/: {missing}"
    for name in ("latency.yaml", "solver_bench.yaml"):  # no private list of solver specs beside it
        config = yaml.safe_load((ROOT / "configs" / name).read_text())
        assert not {"samplers", "solvers"} & set(config), name


def test_reports_hold_only_outputs():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(
        ["git", "ls-files", "reports"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert files, "git ls-files reports listed nothing"
    bad = [f for f in files if f.endswith(OUTPUT_ONLY_FORBIDDEN) or ".hydra" in Path(f).parts]
    assert not bad, f"code or logs under reports/: {bad}"
