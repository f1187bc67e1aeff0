"""The `mlecli` program's first lines.

From here until the command is known, SIGINT, SIGTERM and SIGHUP wait (blocked): then
the command either handles them itself from its first line (`train` and `sweep`, with
mlecli.run.signals.StopRequest) or gets Python's own actions for them back (cli.Group).
So no signal meets its default action while Python imports the tool (SIGTERM's and
SIGHUP's: the process dies without a word), and a Ctrl-C then is one line, like one that
comes later. The tool is imported after that, inside `main`, for the same reason.
"""

import signal

# What stops a command (mlecli.run.signals.STOP_SIGNALS, not imported: nothing of mlecli loads before the block).
STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


def main() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    from mlecli.cli import entry  # lazy: loaded once the stop signals wait (see above)

    entry()
