"""The package's shape, read from its source (the AST; nothing of the package is imported):
no import cycle, no function over 80 lines, a reason on every import inside a function.
The checks live in tools/import_graph.py, which prints the same report."""

import importlib.util
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_graph", REPO / "tools" / "import_graph.py")
graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(graph)



@pytest.fixture(scope="module")
def modules():
    return graph.parse_package()


def _package(tmp_path, files):
    """A throwaway package `pkg` under tmp_path, parsed as the checks parse the real one."""
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return graph.parse_package(tmp_path / "pkg")


# The checks themselves, on small packages whose answer is known.

def test_a_cycle_through_a_submodule_named_in_from_import_is_found(tmp_path):
    found = graph.cycles(graph.import_graph(_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg import b\n",            # `b` is a submodule: an edge to pkg.b
        "b.py": "def f():\n    from .sub import c  # lazy: x\n",  # relative, inside a function
        "sub/__init__.py": "",
        "sub/c.py": "import pkg.a\n",
        "d.py": "from pkg import a\nfrom pkg.sub import c\n",  # imports into the cycle, not part of it
    })))
    assert found == [(["pkg.a", "pkg.b", "pkg.sub.c"], ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"])]


def test_a_name_from_a_package_is_an_edge_to_the_package_only(tmp_path):
    modules = _package(tmp_path, {"__init__.py": "from pkg.a import VALUE\n", "a.py": "VALUE = 1\nimport pkg\n"})
    assert graph.import_graph(modules) == {"pkg": {"pkg.a": 1}, "pkg.a": {"pkg": 2}}
    assert graph.cycles(graph.import_graph(modules)) == [(["pkg", "pkg.a"], ["pkg", "pkg.a", "pkg"])]


def test_long_functions_are_measured_from_def_to_last_line(tmp_path):
    body = "".join(f"x = {i}\n" for i in range(79))  # with its `def` line, 80 lines: the most allowed
    longer = body + "y = 1\n"
    text = (f"def ok():\n{textwrap.indent(body, ' ' * 4)}\n"
            f"class C:\n    def long(self):\n{textwrap.indent(longer, ' ' * 8)}")
    modules = _package(tmp_path, {"m.py": text})
    assert graph.long_functions(modules) == [("pkg/m.py:83", "pkg.m.C.long", 81)]


def test_each_import_in_a_function_needs_a_reason_of_a_known_kind(tmp_path):
    modules = _package(tmp_path, {"m.py": """\
        import os


        def f():
            import keras  # heavy: keras picks its backend on import
            # optional: boto3 is only needed for --cloud-provider s3
            import boto3
            from boto3.s3.transfer import (
                TransferConfig,
            )

            import json
            # just a note
            import yaml
            import numpy  # why not


        def g():
            # lazy: the trainer pulls in keras
            from pkg import m
    """})
    reasons = {where.split(":")[1]: reason for where, _, reason in graph.function_imports(modules)}
    assert reasons == {
        "5": "heavy: keras picks its backend on import",
        "7": "optional: boto3 is only needed for --cloud-provider s3",
        "8": "optional: boto3 is only needed for --cloud-provider s3",  # the block under the comment
        "12": None, "14": None, "15": None,  # a blank line ends the block; a comment of no kind is no reason
        "20": "lazy: the trainer pulls in keras",
    }


# The package itself.

def test_the_package_has_no_import_cycle(modules):
    found = graph.cycles(graph.import_graph(modules))
    assert not found, "import cycles (python tools/import_graph.py):\n" + "\n".join(
        f"{', '.join(members)}: e.g. {' -> '.join(cycle)}" for members, cycle in found)


def test_no_function_is_longer_than_80_lines(modules):
    long = graph.long_functions(modules)
    assert not long, "\n".join(f"{where} {name}: {length} lines" for where, name, length in long)


def test_every_import_inside_a_function_says_why(modules):
    missing = [f"{where} {statement}" for where, statement, reason in graph.function_imports(modules) if not reason]
    assert not missing, (f"{len(missing)} imports inside functions without a `# heavy:`, `# optional:` or `# lazy:` "
                         "reason on their line or the line before:\n" + "\n".join(missing))
