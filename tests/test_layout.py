"""The house rules of DESIGN.md: imports run one way (launch -> pipeline -> data_prep -> model), no
module imports another in a cycle, and an import inside a function says why beside it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("model", "data_prep", "pipeline", "launch")


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for floor in FLOORS for p in (ROOT / floor).rglob("*.py")}


def _imports(name: str, path: Path) -> list[tuple[str, ast.AST, bool]]:
    """(imported module, node, at module level) for each import of our packages in a module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(n) for n in tree.body} | {id(n) for n in ast.walk(tree) if isinstance(n, ast.If)
                                        and getattr(n.test, "id", None) == "TYPE_CHECKING"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in FLOORS:
                found.append((target, node, id(node) in top))
    return found


def test_imports_run_one_way():
    upward = []
    for name, path in _modules().items():
        floor = FLOORS.index(name.split(".")[0])
        for target, node, _ in _imports(name, path):
            if FLOORS.index(target.split(".")[0]) > floor:
                upward.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {t for t, _, _ in _imports(name, path) if t in modules and t != name}
             for name, path in modules.items()}
    done, stack, cycles = set(), [], []

    def visit(name: str) -> None:
        if name in stack:
            cycles.append(" -> ".join(stack[stack.index(name):] + [name]))
            return
        if name in done:
            return
        stack.append(name)
        for target in sorted(graph[name]):
            if not target.startswith(name + "."):  # a package importing its own submodules
                visit(target)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert not cycles, "\n".join(cycles)


def test_an_import_inside_a_function_gives_its_reason():
    silent = []
    for path in _modules().values():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in (n for n in ast.walk(func) if isinstance(n, (ast.Import, ast.ImportFrom))):
                nearby = lines[max(0, node.lineno - 4):node.lineno]
                if not any("#" in line for line in nearby):
                    silent.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not silent, "imports inside functions without a reason beside them:\n" + "\n".join(silent)
