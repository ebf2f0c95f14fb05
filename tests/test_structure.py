"""The package's shape: no import cycles among its modules, no module over the size the style asks."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: installed package name -> source folder (pyproject's package-dir)
PACKAGES = {"kvjax": ROOT / "kvjax", "kvjax.models": ROOT / "models", "kvjax.pallas_kernels": ROOT / "pallas_kernels"}


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = path
    return mods


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Modules of the package that `name` imports at module level (imports inside functions are
    deferred on purpose and do not count). `from pkg import sub` is an edge to the submodule."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    base = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in tree.body:
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                mod = ".".join(anchor + ([mod] if mod else []))
            for a in node.names:
                targets.append(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def test_no_import_cycle_among_the_package_modules():
    mods = _modules()
    known = set(mods)
    graph = {m: _imports(m, p, known) for m, p in mods.items()}
    assert "kvjax.compress.oneshot" in graph and "kvjax.models.llama" in graph  # the walk found the package
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_over_400_lines_and_no_kernel_over_600():
    over = []
    for folder, limit in ((ROOT / "kvjax", 400), (ROOT / "models", 400), (ROOT / "pallas_kernels", 600)):
        for path in folder.rglob("*.py"):
            n = len(path.read_text().splitlines())
            if n > limit:
                over.append(f"{path.relative_to(ROOT)}: {n} lines (limit {limit})")
    assert not over, over


def test_every_package_folder_is_declared_in_pyproject():
    """A subpackage missing from pyproject's `packages` works in an editable install and is absent
    from a wheel."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(tool["packages"])
    for pkg, folder in PACKAGES.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            name = ".".join([pkg, *parts])
            assert name in declared, f"{name} ({init.parent}) is not in pyproject's packages"
            assert (ROOT / tool["package-dir"][name]).resolve() == init.parent.resolve(), name
