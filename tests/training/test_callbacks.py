from ultimate_trainer.training.callbacks import StepClock, format_seconds


def test_clock_epochs_divide_every_interval():
    clock = StepClock(total_steps=1000, intervals=(10, 500, 1000))
    assert clock.epoch_steps == 10 and clock.segments() == [(0, 10, 100)]
    clock = StepClock(total_steps=95, intervals=(10, 25, 50), accumulation=4)
    assert clock.epoch_steps == 5 and clock.segments() == [(0, 5, 19)]


def test_clock_short_run_and_resumed_segments():
    assert StepClock(total_steps=7, intervals=(10, 500, 1000)).segments() == [(0, 7, 1)]
    # Resumed between boundaries: a short segment first, then aligned epochs.
    assert StepClock(total_steps=100, intervals=(10,), start_step=37).segments() == [(37, 3, 1), (40, 10, 6)]
    assert StepClock(total_steps=100, intervals=(10,), start_step=40).segments() == [(40, 10, 6)]
    assert StepClock(total_steps=100, intervals=(10,), start_step=100).segments() == []


def test_clock_due_events():
    clock = StepClock(total_steps=100, intervals=(10, 50, 100))
    clock.step = 50
    assert clock.due(50) and clock.due(10) and not clock.due(100)
    clock.step = 100
    assert not clock.due(50), "the final step's eval and save belong to the trainer"
    resumed = StepClock(total_steps=100, intervals=(10,), start_step=50)
    assert not resumed.due(50), "the step a run resumed at was saved already"


def test_format_seconds():
    assert format_seconds(5) == "5s" and format_seconds(125) == "2m05s" and format_seconds(7300) == "2h01m"
