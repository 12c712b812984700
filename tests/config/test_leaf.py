"""The config package is a leaf: it imports no other layer, except for the
preflight steps, which reach out inside functions (files, packages, sizing)."""

import ast
import sys
from pathlib import Path

import ultimate_trainer.config

PACKAGE = Path(ultimate_trainer.config.__file__).parent
# Inside the package: errors; the shipped recipes' lookup (a leaf of its own).
ALLOWED = ("ultimate_trainer.config", "ultimate_trainer.errors", "ultimate_trainer.recipes")
# What preflight.py may import inside a function: the data layer's readers and the model's parameter formula.
PREFLIGHT_REACHES = ("ultimate_trainer.data.sources", "ultimate_trainer.data.tokenizers", "ultimate_trainer.data.shards",
                     "ultimate_trainer.models.sizing")


def _imports(tree):
    """(module imported, at module level?) for every import in `tree`."""
    top = set(id(n) for n in tree.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            for alias in node.names:
                yield (f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base), id(node) in top


def _is_module(name):
    parts = name.split(".")
    if parts[0] != "ultimate_trainer":
        return False
    path = PACKAGE.parent.joinpath(*parts[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_the_config_package_imports_no_other_layer():
    for path in sorted(PACKAGE.glob("*.py")):
        for module, at_top in _imports(ast.parse(path.read_text())):
            if not module.startswith("ultimate_trainer"):
                assert module.split(".")[0] in sys.stdlib_module_names | {"yaml"}, (path.name, module)
            elif at_top:
                assert module.startswith(ALLOWED), (path.name, module)
            else:
                assert path.name == "preflight.py" and module in PREFLIGHT_REACHES, (path.name, module)


def test_the_modules_preflight_reaches_do_not_import_the_config_package_itself():
    # They may use config's submodules; importing `ultimate_trainer.config` would close a cycle through preflight.
    root = PACKAGE.parent
    for module in PREFLIGHT_REACHES:
        path = root.joinpath(*module.split(".")[1:]).with_suffix(".py")
        for imported, _ in _imports(ast.parse(path.read_text())):
            assert imported != "ultimate_trainer.config", (module, imported)


def test_the_tokenizer_floor_agrees_with_the_tokenizers():
    from ultimate_trainer.config.validate import SP_MIN_VOCAB
    from ultimate_trainer.data import tokenizers

    assert SP_MIN_VOCAB == tokenizers.SP_MIN_VOCAB
