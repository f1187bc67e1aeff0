"""Run `mlecli ARGS…` in this process and die at its N-th write boundary, as a kill -9
or a power cut would: `python tests/crash.py N ARGS…`.

A write boundary is any operation whose order matters for what a crash leaves behind:
creating or renaming or removing a file or folder, truncating one, and appending a
metrics line (which also gets a boundary half-way through the line, a torn write).
The process dies with os._exit(CRASHED) just BEFORE its N-th boundary (so crashing at
N + 1 is crashing right after the N-th), leaving whatever the operating system holds.
It prints the number of boundaries it passed on stderr as `boundaries: K` if it ends
without reaching N. Crash-consistency testers (ALICE, CrashMonkey) enumerate crash
points the same way.
"""

from __future__ import annotations

import os
import sys

CRASHED = 77


def main() -> None:
    target = int(sys.argv[1])
    passed = 0

    def boundary() -> None:
        nonlocal passed
        passed += 1
        if passed == target:
            os._exit(CRASHED)

    def wrap(module, name):
        real = getattr(module, name)

        def wrapped(*args, **kwargs):
            boundary()
            return real(*args, **kwargs)

        setattr(module, name, wrapped)

    for name in ("replace", "rename", "unlink", "rmdir", "mkdir", "truncate", "ftruncate"):
        wrap(os, name)

    from mlecli.safe import files as fsutil

    real_add = fsutil.Appender.add

    def add(self, line: str) -> None:
        boundary()
        half = (line + "\n").encode("utf-8")[: (len(line) + 1) // 2]
        if passed + 1 == target:  # the torn write: half the line on disk, then death
            self._f.write(half)
            self._f.flush()
            os._exit(CRASHED)
        boundary()
        real_add(self, line)

    fsutil.Appender.add = add

    from mlecli.cli import main as cli

    try:
        cli.main(sys.argv[2:], prog_name="mlecli", standalone_mode=True)
    finally:
        print(f"boundaries: {passed}", file=sys.stderr)


if __name__ == "__main__":
    main()
