import math

import keras
import numpy as np
import pytest

from ultimate_trainer.training.schedules import WarmupCosine, continued

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


def lr_of(sched, step):
    return float(keras.ops.convert_to_numpy(sched(step)))


def expected_continued(step, peak, end, warmup, total, start, start_lr):
    """The continued schedule, written out: from `start_lr` at `start`, up to the peak
    where the plain warmup reaches it (step warmup - 1) and the plain cosine after;
    past the warmup a cosine from `start_lr` to `end` over the steps left."""
    top = warmup - 1
    if start < top:
        if step < top:
            return start_lr + (peak - start_lr) * (step - start) / (top - start)
        return expected_lr(step, peak, end, warmup, total)
    return end + 0.5 * (start_lr - end) * (1 + math.cos(math.pi * min(1.0, (step - start) / (total - start))))


@pytest.mark.parametrize("warmup,total,start,start_lr", [(10, 100, 40, 2e-3), (10, 100, 3, 1e-3), (0, 50, 20, 5e-4),
                                                         (10, 100, 9, 2.5e-3), (30, 31, 5, 1e-4)])
def test_continued_schedule_matches_formula(warmup, total, start, start_lr):
    sched = WarmupCosine(3e-3, 3e-5, warmup, total, from_step=start, from_lr=start_lr)
    assert lr_of(sched, start) == pytest.approx(start_lr, rel=1e-6)
    for step in range(start, total + 3):
        np.testing.assert_allclose(lr_of(sched, step), expected_continued(step, 3e-3, 3e-5, warmup, total, start, start_lr),
                                   rtol=1e-5, atol=1e-10)
    assert WarmupCosine.from_config(sched.get_config()).get_config() == sched.get_config()


def test_a_longer_run_continued_in_its_warmup_is_the_plain_longer_run():
    # Only the length changes and the resume falls inside the warmup: the rise from the
    # checkpoint's LR is the plain warmup itself, and the decay the plain decay.
    old = dict(peak=1e-3, end=1e-4, warmup_steps=20, total_steps=100)
    later = continued(old, 7, dict(old, total_steps=300))
    plain = WarmupCosine(1e-3, 1e-4, 20, 300)
    for step in range(7, 305):
        assert lr_of(WarmupCosine.from_config(later), step) == pytest.approx(lr_of(plain, step), rel=1e-5), step


@pytest.mark.parametrize("start", [5, 60, 150])
def test_continued_schedule_has_no_jump_where_the_plain_one_has(start):
    # The case: a longer run and a higher peak, resumed in the decay.
    old = dict(peak=5e-4, end=5e-5, warmup_steps=10, total_steps=200)
    new = dict(peak=1e-3, end=1e-4, warmup_steps=10, total_steps=400)
    first = WarmupCosine.from_config(continued(old, start, new))
    before = lr_of(WarmupCosine(**old), start - 1)
    normal = max(abs(expected_lr(s + 1, **_args(old)) - expected_lr(s, **_args(old))) for s in range(200))
    assert abs(lr_of(first, start) - before) <= normal * 1.0001
    assert lr_of(first, start) == pytest.approx(expected_lr(start, **_args(old)), rel=1e-5)
    if start > 10:  # the plain new schedule would jump
        assert abs(lr_of(WarmupCosine(**new), start) - before) > 5 * normal


def _args(config):
    return dict(peak=config["peak"], end=config["end"], warmup=config["warmup_steps"], total=config["total_steps"])


def test_from_step_needs_from_lr():
    with pytest.raises(ValueError, match="go together"):
        WarmupCosine(1e-3, 1e-4, 10, 100, from_step=5)
