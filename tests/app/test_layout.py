"""The package's layout rules, read from the source: no backend imports another, the imports between
fastvq's modules form no circle, the backend table names a real function for every entry, nothing above
``fastvq/ops/`` calls ``torch.ops.fastvq``, the reference shares no code with the backends, and every op
family has one name across ``ops/<family>.py`` and ``backends/{torch,triton}/<family>.py``."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import torch

import fastvq
from fastvq import backends

PACKAGE = Path(fastvq.__file__).resolve().parent
BACKEND_ROOTS = {
    "torch": PACKAGE / "backends" / "torch",
    "triton": PACKAGE / "backends" / "triton",
    "cpp": PACKAGE / "backends" / "cpp.py",
}
BACKEND_MODULES = {name: f"fastvq.backends.{name}" for name in BACKEND_ROOTS}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path) -> set[str]:
    """The fastvq modules ``path`` imports at module level or inside functions, as absolute names."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("fastvq"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("fastvq"):
                continue
            # ``from . import x`` depends on the submodule x when there is one, else on the module itself
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if _is_module(submodule) else target)
    return found


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").exists() or (PACKAGE / relative / "__init__.py").exists()


def _backend_of(module: str) -> str | None:
    for name, prefix in BACKEND_MODULES.items():
        if module == prefix or module.startswith(prefix + "."):
            return name
    return None


def _sources(root: Path) -> list[Path]:
    return [root] if root.suffix else sorted(root.rglob("*.py"))


@pytest.mark.parametrize("backend", sorted(BACKEND_ROOTS))
def test_no_backend_imports_another_backend(backend):
    for path in _sources(BACKEND_ROOTS[backend]):
        for target in _imported_modules(path):
            other = _backend_of(target)
            assert other in (None, backend), f"{path.relative_to(PACKAGE)} imports {target} of the {other} backend"
            assert target != "fastvq.backends", f"{path.relative_to(PACKAGE)} imports the dispatcher (data flows down)"
            assert not target.startswith(("fastvq.ops", "fastvq.functional", "fastvq.losses", "fastvq.nn",
                                          "fastvq.models")), (
                f"{path.relative_to(PACKAGE)} imports {target}, which sits above the backends"
            )


def test_fastvq_imports_form_no_circle():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        graph[_module_name(path)] = {target for target in _imported_modules(path) if _is_module(target)}
    # A package's __init__ re-exporting its own submodules is how Python packages work, not a circle.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not (name.startswith(t + ".") and _is_package(t))}
    visiting, done, path = set(), set(), []

    def visit(node):
        if node in done:
            return
        assert node not in visiting, "import circle: " + " -> ".join(path[path.index(node):] + [node])
        visiting.add(node)
        path.append(node)
        for target in sorted(graph.get(node, ())):
            visit(target)
        path.pop()
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        visit(node)


def _is_package(name: str) -> bool:
    return (PACKAGE / Path(*name.split(".")[1:]) / "__init__.py").exists()


def test_every_table_entry_names_a_function_of_a_real_module():
    for op, routes in backends.TABLE.items():
        assert set(routes) == set(backends.IMPLEMENTATIONS), f"{op}: the table must say what every backend does"
        family, function = backends.OPS[op]
        for selected, route in routes.items():
            assert (route.runs == selected) == (route.reason is None), f"{op} on {selected}: a fallback says why"
            if route.runs == "triton" and not backends.triton_available():
                continue
            module = importlib.import_module(backends._MODULES[route.runs][family])
            assert callable(getattr(module, function, None)), f"{module.__name__} has no {function} for {op}"


def test_backend_info_lists_the_table_and_what_runs_now():
    info = backends.backend_info()
    assert {row["op"] for row in info["table"]} == set(backends.OPS)
    assert set(info["ops"]) == set(backends.OPS)
    assert info["ops"]["vector_quantize_backward"]["cpu"] in ("torch", "triton")


# --------------------------------------------------------------------------- the ops layer

OPS_PACKAGE = PACKAGE / "ops"


def _calls_fastvq_operators(path: Path) -> list[int]:
    """The lines of ``path`` that reach ``torch.ops.fastvq`` (code, not docstrings)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Attribute) and node.attr == "fastvq" and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ops" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "torch"):
            lines.append(node.lineno)
    return lines


def test_nothing_above_the_ops_layer_calls_the_operators_directly():
    """Layers, models, k-means and the app call fastvq.ops' public functions (which check once and resolve
    defaults); only ops/ (which registers the operators) and backends/ touch torch.ops.fastvq."""
    for path in sorted(PACKAGE.rglob("*.py")):
        if OPS_PACKAGE in path.parents or PACKAGE / "backends" in path.parents:
            continue
        assert not _calls_fastvq_operators(path), (
            f"{path.relative_to(PACKAGE)} calls torch.ops.fastvq at lines {_calls_fastvq_operators(path)}: "
            "call the public function in fastvq/ops/ with keywords"
        )


def test_the_reference_shares_no_code_with_the_backends_it_judges():
    path = PACKAGE / "reference.py"
    imported = sorted(target for target in _imported_modules(path) if target.startswith("fastvq.backends"))
    assert not imported, f"reference.py imports {imported}: the oracle must not share code with what it judges"


def _registered_operators() -> dict[str, str]:
    """``fastvq::name`` operator -> the ops/ family file that registers it, read from the source."""
    registered = {}
    for path in sorted(OPS_PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "custom_op"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                name = node.args[0].value.removeprefix("fastvq::")
                assert name not in registered, f"fastvq::{name} is registered in two files"
                registered[name] = path.stem
    return registered


def test_one_family_name_per_op_across_ops_and_backends():
    families = set(backends._MODULES["torch"])
    assert set(backends._MODULES["triton"]) == families
    ops_files = {path.stem for path in OPS_PACKAGE.glob("*.py") if not path.stem.startswith("_")}
    assert ops_files == families, f"fastvq/ops/ holds {sorted(ops_files)}, the table's families are {sorted(families)}"
    for backend in ("torch", "triton"):
        files = {path.stem for path in (PACKAGE / "backends" / backend).glob("*.py")}
        assert families <= files, f"backends/{backend}/ lacks the family files {sorted(families - files)}"
    registered = _registered_operators()
    assert {f"fastvq::{name}" for name in registered} == {
        f"fastvq::{name}" for name in dir(torch.ops.fastvq) if not name.startswith("_") and name != "name"
    }, "every torch.ops.fastvq operator is registered in fastvq/ops/"
    for op, (family, function) in backends.OPS.items():
        if function in registered:
            assert registered[function] == family, (
                f"the operator fastvq::{function} ({op}) lives in ops/{registered[function]}.py but its backends in "
                f"the {family} family"
            )
