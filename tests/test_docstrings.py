"""The runnable examples in docstrings of the pure-Python modules stay true."""

import doctest

import pytest

from ultimate_trainer import backend, config, cost, distribution, recipes
from ultimate_trainer.checkpoint import resume
from ultimate_trainer.data import pipeline, tokenizers
from ultimate_trainer.models import sizing
from ultimate_trainer.training import callbacks, evaluator, mfu, reporting, schedules


@pytest.mark.parametrize("module", [backend, config, distribution, sizing, pipeline, tokenizers, callbacks, schedules,
                                    mfu, cost, recipes, resume, reporting, evaluator])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.failed == 0
