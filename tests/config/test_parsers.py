import pytest

from ultimate_trainer.config import count


@pytest.mark.parametrize("text,value", [("100000000", 10**8), ("1e8", 10**8), ("100M", 10**8), ("1.5B", 1_500_000_000), ("2_400_000", 2_400_000)])
def test_count_parses_human_numbers(text, value):
    assert count(text) == value


@pytest.mark.parametrize("text", ["abc", "1.5", "nan", ""])
def test_count_rejects_non_counts(text):
    with pytest.raises(ValueError):
        count(text)
