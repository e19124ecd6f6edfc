"""Packaging: `import fastllava` pulls in no server, plotting or training code; a command that needs
an extra that is not installed says which in one line; the package has no import cycle; the
training heads of the embedded models live in training/heads, outside the installed package."""

import ast
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

import fastllava

SRC = Path(fastllava.__file__).parent  # src/fastllava
ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that sees this fastllava and, so that an import of it would
    be seen rather than fail, the repository root's `training` package."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC.parent), str(ROOT)]))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_fastllava_loads_no_server_plotting_or_training_code(tmp_path):
    r = _python("import sys, fastllava\n"
                "fastllava.load\n"
                "print(' '.join(sorted(sys.modules)))", tmp_path)
    assert r.returncode == 0, r.stderr
    loaded = r.stdout.split()
    for top in ("fastapi", "uvicorn", "starlette", "matplotlib", "training"):
        assert not [m for m in loaded if m == top or m.startswith(top + ".")], f"import fastllava imports {top}"
    assert not [m for m in loaded if m.startswith("fastllava.serve")]


def _main_without(module: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """fastllava.cli.main(argv) in a fresh interpreter where `import module` raises ImportError."""
    return _python(f"import sys\n"
                   f"sys.modules[{module!r}] = None\n"
                   f"from fastllava.cli import main\n"
                   f"sys.exit(main({argv!r}))", cwd)


def _one_line_error(r: subprocess.CompletedProcess, module: str, extra: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("fastllava: error: ") and module in lines[0], lines[0]
    assert f"pip install 'fastllava[{extra}]'" in lines[0], lines[0]


@pytest.mark.parametrize("module", ["fastapi", "uvicorn"])
def test_serve_without_the_serve_extra_says_so_in_one_line(tmp_path, module):
    # a model that does not exist: the message must come before any weights are looked for
    r = _main_without(module, ["serve", "--model", str(tmp_path / "no-such-model")], tmp_path)
    _one_line_error(r, module, "serve")
    assert "fastllava serve needs" in r.stderr


def test_sweep_without_the_plots_extra_says_so_in_one_line(tmp_path):
    from fastllava.evaluation.dataset import generate_dataset

    data = tmp_path / "data"
    generate_dataset(2, 0, data, image_size=32, progress=False)
    r = _main_without("matplotlib", ["eval", "--model", str(tmp_path / "no-such-model"), "--data", str(data),
                                     "--reduce", "fastv,pool", "--keep", "8", "--out", str(tmp_path / "out")],
                      tmp_path)
    _one_line_error(r, "matplotlib", "plots")
    assert not (tmp_path / "out").exists()


def test_bench_without_the_plots_extra_says_so_in_one_line(tmp_path):
    r = _main_without("matplotlib", ["bench", "--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "out")],
                      tmp_path)
    _one_line_error(r, "matplotlib", "plots")
    assert "fastllava bench needs" in r.stderr
    assert not (tmp_path / "out").exists()


# --- import cycles -----------------------------------------------------------------------------

def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its __init__.py)."""
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_imports(body: list[ast.stmt]):
    """The import statements that run when the module is imported: those at module level,
    including under if/try/with/for and in class bodies, but not inside functions and not under
    `if TYPE_CHECKING:`."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _top_level_imports(node.body)
            yield from _top_level_imports(node.orelse)
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            for part in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _top_level_imports(part)
        elif isinstance(node, (ast.With, ast.AsyncWith, ast.For, ast.AsyncFor, ast.While, ast.ClassDef)):
            yield from _top_level_imports(node.body)
            yield from _top_level_imports(getattr(node, "orelse", []))


def _import_edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that importing `name` executes directly: each imported module, and the
    packages (their __init__) on the way to it that are not `name`'s own parents (those are
    already being imported when `name` is)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    own_parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    out: set[str] = set()

    def reach(target: str) -> None:
        parts = target.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if prefix in modules and prefix not in own_parents:
                out.add(prefix)
        if target in modules and target not in own_parents:
            out.add(target)

    for node in _top_level_imports(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                reach(alias.name)
            continue
        if node.level:
            base = package.split(".")
            base = base[:len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module
        reach(source)
        for alias in node.names:
            if f"{source}.{alias.name}" in modules:  # `from package import submodule`
                out.add(f"{source}.{alias.name}")
            elif source in modules:  # a name defined in `source`: its code must have run
                out.add(source)
    out.discard(name)
    return {m for m in out if m in modules}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _import_edges(name, path, modules) for name, path in sorted(modules.items())}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """In each strongly connected component (Tarjan), the shortest cycle through each of its
    modules (BFS), without repeats: every module on a cycle shows up on at least one."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def connect(v: str) -> None:  # recursion depth is bounded by the number of modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = set()
    for component in components:
        for start in sorted(component):  # the shortest way back to `start`, inside the component
            came_from, queue = {start: None}, deque([start])
            while queue:
                v = queue.popleft()
                if start in graph[v]:
                    path = [v]
                    while came_from[path[-1]] is not None:
                        path.append(came_from[path[-1]])
                    cycle = path[::-1]
                    first = cycle.index(min(cycle))  # one rotation of each cycle
                    cycles.add(tuple(cycle[first:] + cycle[:first]))
                    break
                for w in sorted(graph[v] & component):
                    if w not in came_from:
                        came_from[w] = v
                        queue.append(w)
    return sorted([*c, c[0]] for c in cycles)


def test_find_cycles_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"b"}, "e": {"f"}, "f": set(), "g": {"g"}}
    # self-imports (g) are dropped by _import_edges
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["b", "c", "d", "b"]]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "fastllava.engine" in graph["fastllava"]  # the graph is read at all
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(" -> ".join(c) for c in cycles)


# --- training outside the package ----------------------------------------------------------------

def test_the_embedded_models_training_heads_live_outside_the_package():
    from fastllava.assets import EMBEDDED
    from training.trainer import HEADS_FILE, heads_path

    assert not list(SRC.rglob(HEADS_FILE)) and not list(SRC.rglob("training*.py"))
    for name, directory in EMBEDDED.items():
        path = heads_path(directory)
        assert path == ROOT / "training" / "heads" / f"{directory.name}.safetensors"
        assert path.is_file(), f"the training heads of the embedded {name!r} model are missing: {path}"
    assert heads_path(ROOT / "runs" / "v1") == ROOT / "runs" / "v1" / HEADS_FILE
