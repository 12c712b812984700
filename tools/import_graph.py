"""The package's structure from its source alone (the AST; nothing is imported).

Prints the import cycles among the modules of `ultimate_trainer/`, the functions
longer than the limit, and the imports inside functions that lack a reason
comment. tests/test_structure.py runs the same checks.

Rules (issue 22):
- An import edge goes from a module to the module it names; `from pkg import name`
  goes to `pkg.name` when that is a submodule, else to `pkg`. Imports inside
  functions count too. A package's `__init__` is an edge only where it is named.
- No function (`def` line to its last line, nested functions included) is longer
  than `MAX_FUNCTION_LINES`.
- An import inside a function carries a one-line reason, a comment on its line or
  on the line before, that starts with its kind: `# heavy: ...` (a costly import
  the caller may not need, e.g. keras, which picks its backend on import),
  `# optional: ...` (a dependency a run may lack, e.g. boto3) or `# lazy: ...`
  (a package module imported late, for the reason given). A comment before a
  block of consecutive imports covers the block.

Example:
    python tools/import_graph.py            # exit 1 when any rule is broken
    python tools/import_graph.py --imports  # also every in-function import with its reason
"""

import argparse
import ast
import io
import re
import sys
import tokenize
from pathlib import Path

PACKAGE = "ultimate_trainer"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_FUNCTION_LINES = 80
REASON = re.compile(r"#\s*(heavy|optional|lazy):\s*\S")


def module_name(path, root=ROOT):
    """`ultimate_trainer/data/shards.py` -> `ultimate_trainer.data.shards` (a package: its dir's name)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def parse_package(root=ROOT):
    """{module name: (path from root's parent, ast.Module, source text)} for every .py file under `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        out[module_name(path, root)] = (path.relative_to(root.parent), ast.parse(text, str(path)), text)
    return out


def _resolve(module, node, is_package):
    """The absolute module a `from ... import` names (relative imports resolved)."""
    if not node.level:
        return node.module
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(tree):
    """(import node, enclosing function or None) for every import in `tree`."""
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, function))
            inner = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            visit(child, inner)

    visit(tree, None)
    return found


def import_graph(modules):
    """{module: {imported package module: first line}} from every import, inside functions too."""
    graph = {}
    for name, (path, tree, _) in modules.items():
        edges = graph.setdefault(name, {})
        is_package = path.name == "__init__.py"
        for node, _ in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(name, node, is_package)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    edges.setdefault(target, node.lineno)
    return graph


def cycles(graph):
    """The import cycles: each strongly connected component of more than one module, as
    (its modules sorted, a shortest cycle through the first: [module, ..., module])."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def strongconnect(v):
        # Tarjan's algorithm; the package is a few dozen modules, so recursion is shallow.
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
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

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sorted((component, _a_cycle(graph, component)) for component in components)


def _a_cycle(graph, component):
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start, members = component[0], set(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]]):
            if w == start:
                return path + [start]
            if w in members and w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return component  # unreachable for a strongly connected component


def long_functions(modules, limit=MAX_FUNCTION_LINES):
    """(path:line, qualified name, lines) of every function longer than `limit` lines."""
    out = []
    for name, (path, tree, _) in modules.items():
        def visit(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qualified = f"{prefix}.{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        length = child.end_lineno - child.lineno + 1
                        if length > limit:
                            out.append((f"{path}:{child.lineno}", qualified, length))
                    visit(child, qualified)
                else:
                    visit(child, prefix)

        visit(tree, name)
    return out


def _comments(text):
    """{line number: comment text} of the source."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string
    return out


def function_imports(modules):
    """(path:line, import statement, reason or None) of every import inside a function."""
    out = []
    for name, (path, tree, text) in modules.items():
        comments, lines = _comments(text), text.splitlines()
        found = sorted(((node.lineno, node) for node, function in _imports(tree) if function is not None),
                       key=lambda pair: pair[0])
        ends = {node.end_lineno: node for node, _ in _imports(tree)}
        for lineno, node in found:
            reason = None
            for line in range(node.lineno, node.end_lineno + 1):  # on the statement's own lines
                if line in comments and REASON.search(comments[line]):
                    reason = comments[line]
            first = lineno
            while reason is None:
                before = comments.get(first - 1)
                if before is not None and lines[first - 2].lstrip().startswith("#"):
                    reason = before if REASON.search(before) else None
                    break
                if first - 1 in ends:  # the import above starts the block this one belongs to
                    first = ends[first - 1].lineno
                    continue
                break
            statement = " ".join(lines[node.lineno - 1: node.end_lineno]).split("#")[0].strip()
            out.append((f"{path}:{lineno}", " ".join(statement.split()),
                        reason.lstrip("# ").strip() if reason else None))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--imports", action="store_true", help="also list every in-function import with its reason")
    args = parser.parse_args(argv)
    modules = parse_package()
    found = cycles(import_graph(modules))
    print(f"import cycles: {len(found)}")
    for members, cycle in found:
        print(f"  {len(members)} modules: {', '.join(members)}\n    e.g. {' -> '.join(cycle)}")
    long = long_functions(modules)
    print(f"functions over {MAX_FUNCTION_LINES} lines: {len(long)}")
    for where, name, length in long:
        print(f"  {where} {name}: {length} lines")
    imports = function_imports(modules)
    missing = [i for i in imports if i[2] is None]
    print(f"imports inside functions: {len(imports)}, without a reason (# heavy:/optional:/lazy: ...): {len(missing)}")
    for where, statement, reason in imports if args.imports else missing:
        print(f"  {where} {statement}" + (f"  # {reason}" if reason else ""))
    return 1 if found or long or missing else 0


if __name__ == "__main__":
    sys.exit(main())
