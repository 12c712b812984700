"""The runnable examples in docstrings of the pure-Python modules stay true."""

import doctest
import importlib

import pytest

from ultimate_trainer import backend, config, cost, distribution, recipes
from ultimate_trainer.checkpoint import resume
from ultimate_trainer.data import pipeline, tokenizers
from ultimate_trainer.models import sizing
from ultimate_trainer.training import callbacks, evaluator, mfu, reporting, schedules

# By module path: `config.validate` and `config.preflight` are also the names of the functions the package exports.
CONFIG = [importlib.import_module(f"ultimate_trainer.config.{name}") for name in
          ("derived", "parsers", "preflight", "recipe_files", "resolve", "resume_settings", "schema", "validate")]


@pytest.mark.parametrize("module", [backend, config, distribution, sizing, pipeline, tokenizers, callbacks, schedules,
                                    mfu, cost, recipes, resume, reporting, evaluator, *CONFIG])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.failed == 0
