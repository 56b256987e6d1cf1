"""Ctrl-C and SIGTERM during training: stop at the next step boundary, where state is consistent.

A ``KeyboardInterrupt`` can land in the middle of an optimizer step, after some parameters were
updated and others not; a checkpoint taken there could not be resumed exactly. So while training
runs, the first SIGINT (Ctrl-C) or SIGTERM (what ``torchrun`` sends its workers when stopped) only
asks the loop to stop; the loop checks between steps, saves a checkpoint and raises
:class:`~qcompile.errors.TrainingInterrupted`. A second Ctrl-C raises ``KeyboardInterrupt`` at
once, for a step that hangs.
"""

import logging
import signal
import threading

log = logging.getLogger("qcompile.qat")


class StopRequests:
    """Context manager that turns SIGINT/SIGTERM into a ``requested`` flag (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s received: stopping after the current step (Ctrl-C again to stop now)",
                    signal.Signals(signum).name)
