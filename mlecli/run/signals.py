"""Signals during a training: what SIGINT, SIGTERM and SIGHUP do, phase by phase.

`StopRequest` is entered around the whole of `mlecli train` (and of `mlecli sweep`), so
that no signal meets Python's default handlers in between. Its phases:

- before training starts (`armed` False): a signal stops the command at once
  (`Stopped`, which the CLI says in one line; nothing of a run is written);
- while training (`armed`): the first signal is a flag (`signal`) the loop checks
  between batches, so the checkpoint written on the way out holds a consistent state;
  a second stops at once (`StopNow`), the run resuming from its last checkpoint;
- once the run has stopped or finished (`settled`): nothing, so that what the command
  prints about it is never cut short.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from mlecli.safe.errors import Stopped


class StopNow(BaseException):
    """A second signal: stop at once, without saving the position (the run resumes from
    its last checkpoint). A BaseException, like KeyboardInterrupt, so nothing swallows it."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class StopRequest:
    """What SIGINT, SIGTERM and SIGHUP do, for as long as it is entered (see the module's
    docstring for the phases)."""

    SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)

    def __init__(self):
        self.signal: str | None = None
        self.armed = False
        self.settled = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.settled:
            return
        if not self.armed:
            raise Stopped(name)
        if self.signal is not None:
            raise StopNow(name)
        self.signal = name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
