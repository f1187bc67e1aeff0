"""The `mlecli` program's first lines: a Ctrl-C that comes while Python is still importing
the tool ends it with one line and exit status 130, like one that comes later."""

import sys


def main() -> None:
    try:
        from mlecli.cli import entry  # lazy: a Ctrl-C during this import is caught above
    except KeyboardInterrupt:
        sys.stderr.write("Stopped by SIGINT before the command began.\n")
        sys.exit(130)
    entry()
