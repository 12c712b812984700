from ultimate_trainer.training.callbacks import StepClock, format_seconds


def test_clock_epochs_divide_every_interval():
    clock = StepClock(total_steps=1000, intervals=(10, 500, 1000))
    assert clock.epoch_steps == 10 and clock.epochs == 100
    clock = StepClock(total_steps=95, intervals=(10, 25, 50), accumulation=4)
    assert clock.epoch_steps == 5 and clock.fit_steps_per_epoch == 20 and clock.epochs == 19
    assert clock.step_at_end(18) == 95


def test_clock_short_run_and_due_events():
    clock = StepClock(total_steps=7, intervals=(10, 500, 1000))
    assert clock.epoch_steps == 7 and clock.epochs == 1
    clock = StepClock(total_steps=100, intervals=(10, 50, 100))
    assert clock.due(4, 50) and not clock.due(3, 50)
    assert not clock.due(9, 50), "the final step's eval and save belong to the trainer"


def test_format_seconds():
    assert format_seconds(5) == "5s" and format_seconds(125) == "2m05s" and format_seconds(7300) == "2h01m"
