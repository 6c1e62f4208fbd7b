"""The package as a map of its parts (docs/DESIGN.md, "Layers"): import-linter's contracts hold, no
module imports another in a cycle (function-local imports included), the layers stay few, re-export
shims stay thin and unused, every function-local import says why it is local, and functions stay
small. All of it is read from the source (ast) or checked by `lint-imports`; nothing is imported."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, _env

PACKAGE = REPO / "dist_gpt"

# Old module paths kept importable for users' scripts; each re-exports the module that moved.
SHIMS = {"dist_gpt.dist", "dist_gpt.doc_mask", "dist_gpt.faults", "dist_gpt.hf", "dist_gpt.muon", "dist_gpt.muon_layout",
         "dist_gpt.notebook", "dist_gpt.precision", "dist_gpt.resume", "dist_gpt.runinfo", "dist_gpt.runlock",
         "dist_gpt.tasks", "dist_gpt.trainer", "dist_gpt.weights", "dist_gpt.model", "dist_gpt.optim"}
MAX_ROOMS, MAX_MODULES = 7, 10

# Functions allowed past 60 lines or 6 parameters: the public signatures the docs show users, and
# signatures torch or pickle impose.
SIZE_EXCEPTIONS = {
    "dist_gpt.model.gpt:GPT.generate", "dist_gpt.model.gpt:GPT.stream", "dist_gpt.data.loader:TrainBatches.__init__",
    "dist_gpt.data.loader:ValBlocks.__init__", "dist_gpt.optim.muon:Muon.__init__",
    "dist_gpt.data.mixloader:MixtureBatches.__init__",  # a TrainBatches: its documented signature, plus the mixture
    "dist_gpt.model.gpt:_fill_tied_head",            # a load_state_dict pre-hook: torch's signature
    "dist_gpt.convert.notebook:_rebuild_tensor",      # stands in for torch._utils._rebuild_tensor_v2 in a pickle
}
# Why an import may sit inside a function: its comment (on the line or the one above) says which.
LOCAL_IMPORT_REASONS = ("optional", "start-up")


def _modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package's __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _imports(name: str, path: Path, is_pkg: bool, modules) -> list[tuple[ast.stmt, str]]:
    """(statement, imported project module) for every import in the file, at any depth."""
    base = name if is_pkg else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node, a.name) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            parts = base.split(".")
            src = ".".join(parts[:len(parts) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else node.module or ""
            for a in node.names:  # `from pkg import module` imports the module, else the package
                target = f"{src}.{a.name}" if f"{src}.{a.name}" in modules else src
                if target in modules and target != name:
                    found.append((node, target))
    return found


def _graph(skip=SHIMS) -> dict[str, set[str]]:
    modules = _modules()
    return {m: {t for _, t in _imports(m, p, pkg, modules) if t not in skip}
            for m, (p, pkg) in modules.items() if m not in skip}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), i.e. the import cycles."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on.discard(component[-1])
            out.append(component)

    for v in list(graph):
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def _longest_chain(graph: dict[str, set[str]]) -> list[str]:
    memo: dict[str, list[str]] = {}

    def chain(v):
        if v not in memo:
            memo[v] = [v] + max((chain(w) for w in graph.get(v, ())), key=len, default=[])
        return memo[v]

    return max((chain(v) for v in graph), key=len)


def _rooms(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph of rooms: each top-level module or subpackage of dist_gpt is one."""
    def room(m):
        return ".".join(m.split(".")[:2])
    out: dict[str, set[str]] = {}
    for m, targets in graph.items():
        out.setdefault(room(m), set()).update(room(t) for t in targets if room(t) != room(m))
    return out


def test_import_linter_contracts_hold():
    if shutil.which("lint-imports") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            raise AssertionError("lint-imports is missing: pip install -e '.[dev]' installs import-linter")
        pytest.skip("import-linter is not installed (pip install -e '.[dev]'); CI always runs it")
    out = subprocess.run(["lint-imports", "--no-cache"], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_no_import_cycles_even_through_function_local_imports():
    graph = _graph()
    assert len(graph) > 50  # the whole package was read
    assert _cycles(graph) == []


def test_the_layers_stay_few():
    graph = _graph()
    rooms = _longest_chain(_rooms(graph))
    modules = _longest_chain(graph)
    assert len(rooms) <= MAX_ROOMS, " -> ".join(rooms)
    assert len(modules) <= MAX_MODULES, " -> ".join(modules)


def test_old_paths_are_thin_re_exports_nothing_inside_imports():
    modules = _modules()
    for shim in SHIMS:
        tree = ast.parse(modules[shim][0].read_text())
        for node in tree.body:
            docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            dunder_all = isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"]
            assert docstring or dunder_all or isinstance(node, ast.ImportFrom), f"{shim}: {ast.dump(node)[:80]}"
    users = {m: t & SHIMS for m, t in _graph(skip=set()).items() if m not in SHIMS and t & SHIMS}
    assert users == {}


def test_function_local_imports_say_why():
    modules = _modules()
    unexplained = []
    for name, (path, is_pkg) in modules.items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        project = {(node.lineno, node.col_offset) for node, _ in _imports(name, path, is_pkg, modules)}
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in (n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))):
                said = " ".join(lines[max(node.lineno - 5, 0):node.lineno]).lower()  # its line, 4 above
                if not any(reason in said for reason in LOCAL_IMPORT_REASONS):
                    unexplained.append(f"{path.relative_to(REPO)}:{node.lineno}")
                elif (node.lineno, node.col_offset) in project and name != "dist_gpt.data":  # the one torch-bound exception
                    unexplained.append(f"{path.relative_to(REPO)}:{node.lineno} (a project module)")
    assert unexplained == []


def test_no_project_module_is_imported_by_a_string():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__"):
                arg = node.args[0] if node.args else None
                assert not (isinstance(arg, ast.Constant) and str(arg.value).startswith(("dist_gpt", "."))), path
                assert path.name == "streams.py", f"{path}: import modules by statement"  # optional pyarrow/zstd


def test_functions_stay_small():
    too_big = []
    for name, (path, _) in _modules().items():
        tree = ast.parse(path.read_text())
        for cls in [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
            for fn in (n for n in ast.iter_child_nodes(cls) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
                a = fn.args
                params = [p for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
                n_params = len(params) + bool(a.vararg) + bool(a.kwarg)
                lines = fn.end_lineno - fn.lineno + 1
                where = f"{name}:{'' if cls is tree else cls.name + '.'}{fn.name}"
                if (lines > 60 or n_params > 6) and where not in SIZE_EXCEPTIONS:
                    too_big.append(f"{where} ({lines} lines, {n_params} parameters)")
    assert too_big == []


def test_prepare_workers_never_import_torch():
    # prepare's worker processes import dist_gpt.data to encode with numpy alone
    code = "import sys, dist_gpt.data, dist_gpt.data.encode, dist_gpt.data.prepare; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=300, check=True)
    assert out.stdout.strip() == "False"
