"""SIGINT/SIGTERM: finish the current step, save, exit 0; a second Ctrl+C stops at once."""

import contextlib
import signal


@contextlib.contextmanager
def graceful_stop(clock, say=print):
    """While active, the first SIGINT or SIGTERM asks `fit` to stop at the next
    optimizer-step boundary (`clock.interrupted`); the trainer then saves a
    checkpoint. A second signal raises KeyboardInterrupt immediately.

    Example:
        with graceful_stop(clock):
            model.fit(...)
    """
    previous = {}

    def handler(signum, frame):
        if clock.interrupted:
            raise KeyboardInterrupt
        clock.interrupted = True
        name = signal.Signals(signum).name
        say(f"{name}: finishing the current step, then saving a checkpoint (send it again to stop at once)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
