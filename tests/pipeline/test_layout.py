"""The package layout's rules, read from the code itself: the library never imports its entry points
(``jobs``), one module owns each boundary (MLflow: ``pipeline.tracking``; boto3: ``pipeline.io``), data
never imports evaluation, every import points down the package order, no module imports itself through
others, and the command line starts without the heavy libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipeline"


def _modules() -> list[str]:
    return sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in PIPELINE.rglob("*.py")
        if path.name != "__main__.py"
    )


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module)
    return roots


def test_importing_all_of_pipeline_never_imports_jobs() -> None:
    code = (
        f"import importlib, sys\nfor name in {_modules()!r}:\n    importlib.import_module(name)\n"
        "assert 'jobs' not in sys.modules, [m for m in sys.modules if m.startswith('jobs')]\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_each_boundary_has_one_owner() -> None:
    owners = {"mlflow": "pipeline/tracking/", "boto3": "pipeline/io/", "botocore": "pipeline/io/"}
    for path in PIPELINE.rglob("*.py"):
        relative = path.relative_to(ROOT).as_posix()
        for name in _imported_roots(path):
            root = name.split(".")[0]
            if root == "jobs":
                raise AssertionError(f"{relative} imports {name}: the library never imports its entry points")
            if root in owners:
                owner = owners[root]
                assert relative.startswith(owner), f"{relative} imports {name}, owned by {owner}"


# The packages of pipeline/, lowest first: a module imports only from its own package and from lower layers.
LAYERS = [{"io", "interrupts"}, {"config", "data", "tracking"}, {"eval"}, {"train"}, {"cli"}]


def _layer(module: str) -> int:
    package = module.split(".")[1]
    return next(index for index, names in enumerate(LAYERS) if package in names)


def _points_up(module: str, imported: str) -> bool:
    """Whether ``module`` importing ``imported`` breaks the package order (its own package aside)."""
    if not imported.startswith("pipeline.") or imported.split(".")[1] == module.split(".")[1]:
        return False
    return _layer(imported) >= _layer(module)


def test_every_import_points_down_the_package_order() -> None:
    """``io`` < ``config`` / ``data`` / ``tracking`` < ``eval`` < ``train`` < ``cli``: no package imports one
    beside or above it (lazy imports count). Evaluation never needs training, and the command line is the
    only place that sees everything."""
    upward = []
    for module in _modules():
        if module == "pipeline":
            continue
        path = ROOT / (module.replace(".", "/") + ".py")
        path = path if path.exists() else ROOT / module.replace(".", "/") / "__init__.py"
        upward += [f"{module} imports {name}" for name in _imported_modules(path) if _points_up(module, name)]
    assert upward == []


def test_the_package_order_is_checked_both_ways() -> None:
    assert _points_up("pipeline.data.inspect", "pipeline.eval.plots")  # up
    assert _points_up("pipeline.data.readers", "pipeline.tracking.base")  # beside
    assert _points_up("pipeline.eval.checkpoint", "pipeline.train.build")
    assert not _points_up("pipeline.train.driver", "pipeline.eval.checkpoint")  # down
    assert not _points_up("pipeline.data.readers", "pipeline.data.schema")  # its own package
    assert not _points_up("pipeline.tracking.mlflow_tracker", "pipeline.interrupts")
    with pytest.raises(StopIteration):  # a new package must be given its place in LAYERS
        _points_up("pipeline.newpackage.module", "pipeline.io.storage")


def test_data_never_imports_eval() -> None:
    """Data sits below evaluation: `ccnet data inspect` paints its grids without loading matplotlib."""
    for path in (PIPELINE / "data").rglob("*.py"):
        assert not any(name.startswith("pipeline.eval") for name in _imported_roots(path)), path
    code = "import sys, pipeline.data.inspect\nassert 'matplotlib' not in sys.modules\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_command_line_starts_without_the_heavy_libraries() -> None:
    """`ccnet --help`, `ccnet data` and `ccnet submit` start fast: the command line's modules import
    neither torch, Ray, MLflow, pyarrow nor matplotlib until a command needs them."""
    code = (
        "import sys, pipeline.cli.main\n"
        "heavy = [m for m in ('torch', 'ray', 'mlflow', 'pyarrow', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (``from a import b`` counts ``a``
    and ``a.b``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_module_imports_itself_through_others() -> None:
    """The import graph of ``pipeline`` has no circle (lazy imports inside functions count too)."""
    paths = {module: ROOT / (module.replace(".", "/") + ".py") for module in _modules()}
    paths |= {m: ROOT / m.replace(".", "/") / "__init__.py" for m in paths if not paths[m].exists()}
    graph = {m: {d for d in _imported_modules(p) if d in paths and d != m} for m, p in paths.items()}
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        path.append(module)
        for other in sorted(graph[module]):
            assert state.get(other) != 1, " -> ".join([*path[path.index(other) :], other])
            if other not in state:
                visit(other, path)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
