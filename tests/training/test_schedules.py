import math

import keras
import numpy as np
import pytest

from ultimate_trainer.training.schedules import WarmupCosine

pytestmark = pytest.mark.backends


def expected_lr(step, peak, end, warmup, total):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup,total", [(10, 100), (1, 5), (0, 50), (30, 31)])
def test_schedule_matches_formula(warmup, total):
    sched = WarmupCosine(peak=3e-3, end=3e-5, warmup_steps=warmup, total_steps=total)
    for step in list(range(0, total + 5)):
        got = float(keras.ops.convert_to_numpy(sched(step)))
        np.testing.assert_allclose(got, expected_lr(step, 3e-3, 3e-5, warmup, total), rtol=1e-5, atol=1e-10)


def test_schedule_endpoints_and_config():
    sched = WarmupCosine(peak=1.0, end=0.1, warmup_steps=10, total_steps=110)
    assert float(sched(0)) == pytest.approx(0.1)
    assert float(sched(9)) == pytest.approx(1.0)
    assert float(sched(60)) == pytest.approx(0.55)
    assert float(sched(110)) == pytest.approx(0.1)
    assert WarmupCosine.from_config(sched.get_config()).get_config() == sched.get_config()
