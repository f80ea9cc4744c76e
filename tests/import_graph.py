"""The project's import graph, read with `ast` (imports inside functions included), and the layering
it must keep. `python -m tests.import_graph` prints its numbers and anything that breaks a rule;
`tests/test_import_graph.py` fails on the same.

Layers, lowest first: a module may import its own layer and those below, never one above.
Data flows one way inside the core (records -> pipeline -> model -> loss or tokens -> metrics);
the PyTorch converters, the configs and the applications sit above it; `run.py` on top.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("emola_jax", "converters", "configs")

# (layer, module-name regex), first match wins
LAYERS = (
    ("foundation", r"emola_jax\.(settings|atomic|progress|weights|config|quantization|lora|sharding|distributed)"),
    ("data", r"emola_jax\.data(\..*)?"),
    ("models", r"emola_jax\.models(\..*)?"),
    ("storage and decoding", r"emola_jax\.(checkpoint|generate)"),
    ("engines", r"emola_jax\.(predictor|serving|train|eval)(\..*)?"),
    ("plans", r"emola_jax\.plan"),
    ("package facade", r"emola_jax"),
    ("converters", r"converters(\..*)?"),
    ("configs", r"configs(\..*)?"),
    ("apps", r"emola_jax\.apps(\..*)?"),
    ("command line", r"run"),
)
RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}
DEFERRED = re.compile(r"#.*\bdeferred\b")  # the comment a function-local import must carry


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a module of the project, or the top-level name of a library
    file: str  # relative to the project's root
    line: int
    local: bool  # made inside a function
    commented: bool  # carries a `# deferred: ...` comment (its line, or the comment lines above its block)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def layer(module: str) -> str:
    """The layer `module` belongs to; ValueError for a module no layer names (add it to `LAYERS`)."""
    for name, pattern in LAYERS:
        if re.fullmatch(pattern, module):
            return name
    raise ValueError(f"module {module} is in no layer of tests/import_graph.py's LAYERS")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the project under `root`, by its dotted name."""
    files = [p for package in PACKAGES for p in (root / package).rglob("*.py")] + [root / "run.py"]
    named = {}
    for path in files:
        parts = list(path.relative_to(root).with_suffix("").parts)
        named[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return named


def imports(named: dict[str, Path], root: Path = ROOT) -> list[Import]:
    """Every import statement of the project's modules, one `Import` per module it names."""
    found = []
    for module, path in named.items():
        source = path.read_text()
        lines = source.splitlines()
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node, local in _walk(ast.parse(source)):
            try:
                targets = _targets(node, package, named)
            except ValueError as err:
                raise ValueError(f"{path.relative_to(root)}: {err}") from None
            for target in targets:
                found.append(Import(module, target, str(path.relative_to(root)), node.lineno, local,
                                    _commented(lines, node.lineno)))
    return found


def _walk(tree: ast.AST, local: bool = False):
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, local
        yield from _walk(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def _targets(node: ast.Import | ast.ImportFrom, package: str, named: dict[str, Path]) -> list[str]:
    """The modules `node` imports: a project module by its full name, a library by its top-level
    name. ValueError for a project module that does not exist (a rename left behind)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parent = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parent, *([node.module] if node.module else [])])
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in named else base for a in node.names]
    missing = [n for n in names if n.split(".")[0] in PACKAGES + ("run",) and n not in named]
    if missing:
        raise ValueError(f"line {node.lineno} imports {missing[0]}, which is not a module of the project")
    out = []
    for name in names:
        while name not in named and "." in name:
            name = name.rpartition(".")[0]
        out.append(name)
    return out


def _commented(lines: list[str], line: int) -> bool:
    """A `# deferred` comment on the import's line, or on a comment line above its block of imports."""
    if DEFERRED.search(lines[line - 1]):
        return True
    above = line - 2
    while above >= 0 and (lines[above].strip().startswith(("import ", "from ", "#")) or not lines[above].strip()):
        if DEFERRED.search(lines[above]):
            return True
        above -= 1
    return False


def cycles(named: dict[str, Path], found: list[Import]) -> list[list[str]]:
    """The import graph's strongly connected components of more than one module (Tarjan)."""
    edges: dict[str, set[str]] = {}
    for imp in found:
        if imp.target in named and imp.target != imp.importer:
            edges.setdefault(imp.importer, set()).add(imp.target)
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(named)))
    for v in sorted(named):
        if v not in index:
            visit(v)
    return components


@dataclasses.dataclass(frozen=True)
class Report:
    modules: int
    arrows: int
    local_imports: int
    local_project_imports: int
    cycles: list[list[str]]
    upward: list[str]  # "file:line: importer (layer) imports target (layer)"
    uncommented: list[str]  # function-local imports without a `# deferred` comment

    def problems(self) -> list[str]:
        return ([f"import circle: {' -> '.join(c)}" for c in self.cycles] + self.upward
                + [f"{u}: a function-local import without a `# deferred: ...` comment" for u in self.uncommented])


def report(root: Path = ROOT) -> Report:
    named = modules(root)
    found = imports(named, root)
    project = [i for i in found if i.target in named and i.target != i.importer]
    upward = [f"{i.where}: {i.importer} ({layer(i.importer)}) imports {i.target} ({layer(i.target)})"
              for i in project if RANK[layer(i.target)] > RANK[layer(i.importer)]]
    uncommented = [f"{i.where}: {i.target}" for i in found if i.local and not i.commented]
    arrows = {(i.importer, i.target) for i in project}
    return Report(len(named), len(arrows), sum(i.local for i in found), sum(i.local for i in project),
                  cycles(named, found), upward, uncommented)


def main() -> int:
    result = report()
    print(f"modules {result.modules}, arrows {result.arrows}, function-local imports {result.local_imports} "
          f"({result.local_project_imports} of project modules), import circles {len(result.cycles)} "
          f"(largest {max(map(len, result.cycles), default=0)} modules), upward imports {len(result.upward)}")
    for problem in result.problems():
        print(problem)
    return 1 if result.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
