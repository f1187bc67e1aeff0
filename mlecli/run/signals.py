"""Signals during a training: what SIGINT, SIGTERM and SIGHUP do, phase by phase.

`StopRequest` is entered around the whole of `mlecli train` (and of `mlecli sweep`), from
the command's first line to its last line printed. Its phases:

- before training starts (`armed` False): a signal stops the command at once
  (`Stopped`, which the CLI says in one line; nothing of a run is written);
- while training (`armed`): the first signal is a flag (`signal`) the loop checks
  between batches, so the checkpoint written on the way out holds a consistent state;
  a second stops at once (`StopNow`), the run resuming from its last checkpoint;
- once the run has stopped or finished (`settled`), and once a signal has raised
  `Stopped` or `StopNow`: nothing, so that the way out and what the command prints
  about it are never cut short.

No moment is left where a signal meets its default action (SIGTERM's and SIGHUP's:
the process dies at once). The program blocks the three signals from its first line
(`_entry.py`), so that one arriving while Python imports the tool waits; `StopRequest`
unblocks them once its handlers are in place, and a signal that waited arrives then. On
leaving, a StopRequest of the program (`program_ends`) leaves the signals ignored, for
the program ends with it: giving back the default actions would let a signal that comes
as the command exits kill it with no word and an exit status of -15 instead of the one
the command decided. One entered in process (tests, a sweep's worker) gives back the
handlers and the mask it found, with the signals blocked in between.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

from mlecli.safe.errors import Stopped

# What stops a command: Ctrl-C, `kill`, a closed terminal.
STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


class StopNow(BaseException):
    """A second signal: stop at once, without saving the position (the run resumes from
    its last checkpoint). A BaseException, like KeyboardInterrupt, so nothing swallows it."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class StopRequest:
    """What SIGINT, SIGTERM and SIGHUP do, for as long as it is entered (see the module's
    docstring for the phases). `program_ends`: the block is the rest of the program,
    which ignores the signals after it."""

    SIGNALS = STOP_SIGNALS

    def __init__(self, *, program_ends: bool = False):
        self.signal: str | None = None
        self.armed = False
        self.settled = False
        self.program_ends = program_ends
        self._old: dict[int, Any] = {}
        self._mask: set[int] = set()

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.settled:
            return
        if not self.armed:
            self.settled = True  # one signal stops the command; the next must not cut its way out short
            raise Stopped(name)
        if self.signal is not None:
            self.settled = True
            raise StopNow(name)
        self.signal = name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
            try:  # a signal that waited, blocked, while the program started arrives here
                self._mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
            except BaseException:
                self.__exit__(None, None, None)
                raise
        return self

    def __exit__(self, *exc):
        if not self._old:
            return
        if self.program_ends:
            for sig in self._old:
                signal.signal(sig, signal.SIG_IGN)
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)  # none meets a handler half given back
        for sig, old in self._old.items():
            signal.signal(sig, old)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
