"""The shipped recipes: the YAML files beside this module, found by name.

They are package data (setup.cfg), so `--recipe NAME` works from any install,
not only a checkout. `ultimate-trainer train --recipe ttt-125m` is
`--config <package>/recipes/ttt-125m.yaml`; `ultimate-trainer recipes` lists
them with their size and cost (`cost.py`). Nothing here imports keras.

Example:
    >>> recipe_path("ttt-125m").name
    'ttt-125m.yaml'
"""

import difflib
from pathlib import Path

from ultimate_trainer.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent


def recipe_names():
    """Names of the shipped recipes, sorted."""
    if not RECIPES_DIR.is_dir():
        return []
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name):
    """The YAML file of the recipe `name`; a `UserError` naming the nearest one otherwise."""
    names = recipe_names()
    if name in names:
        return RECIPES_DIR / f"{name}.yaml"
    if not names:
        raise UserError(
            f"--recipe {name}: no recipes found in {RECIPES_DIR} (this install lacks the package data; "
            f"reinstall ultimate_trainer); pass a YAML file with --config instead"
        )
    near = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]}?" if near else ""
    raise UserError(f"unknown --recipe {name!r}{hint} (`ultimate-trainer recipes` lists: {', '.join(names)})")


def describe(name):
    """The first line of the recipe's leading comment: what it is."""
    for line in recipe_path(name).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").rstrip(":").strip()
        if line.strip():
            break
    return ""
