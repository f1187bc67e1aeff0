"""Waiting for a folder's lock that another process holds: say once who holds it (and
whether it is stopped), then wait at most `PATIENCE` seconds, or until Ctrl-C.

`fsutil.folder_lock(wait=True)` waits in silence, for ever if the holder is stopped
(Ctrl-Z, SIGSTOP). Here the lock is tried without waiting, ten times a second. Who holds
it comes from the kernel's table of locks (/proc/locks: nothing is written to say it, so
a lock taken by any version of mlecli is named), and whether that process is stopped from
/proc/<pid>/stat. Where /proc cannot tell, the holder is "another process".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mlecli.safe.errors import MlecliError
from mlecli.safe.files import HeldLock, folder_lock

# Seconds a command waits for another process to let go of a folder's lock: longer than an
# honest download of MNIST from the slowest mirror allowed (about 40 minutes at 50 kB/s,
# retries included).
PATIENCE = 3600.0
POLL = 0.1  # seconds between tries
LOCKS = "/proc/locks"


@dataclass(frozen=True)
class Holder:
    """The process that holds a lock, as far as the system can tell."""

    pid: int | None
    stopped: bool

    def __str__(self) -> str:
        return f"process {self.pid}" if self.pid else "another process"

    def state(self) -> str:
        if not self.stopped:
            return ""
        return f"; it is stopped (Ctrl-Z?): resume it with fg in its terminal, or kill -CONT {self.pid}"


@contextlib.contextmanager
def waiting_lock(folder: Path, *, what: str, log: Callable[[str], None],
                 patience: float | None = None) -> Iterator[HeldLock]:
    """Hold `folder`'s lock for the block, waiting for another holder as the module says.

    Raises MlecliError naming `what` once `patience` (default PATIENCE) seconds have
    passed; any error in taking the lock other than its being held is raised at once."""
    patience = PATIENCE if patience is None else patience
    lock_path = Path(folder) / ".lock"
    start = time.monotonic()
    told = False
    free = 0  # tries that failed while nobody held the lock
    with contextlib.ExitStack() as stack:
        while True:
            try:
                lock = stack.enter_context(folder_lock(folder, wait=False, what=what))
                break
            except MlecliError:
                holder = holder_of(lock_path)
                if holder is None:  # not held: the error is another (a read-only disk), or it was just let go
                    free += 1
                    if free >= 3:
                        raise
                    continue
                free = 0
            waited = time.monotonic() - start
            if waited >= patience:
                raise MlecliError(
                    f"{what} is still in use by {holder} after {_duration(patience)} of waiting (lock {lock_path})"
                    f"{holder.state()}; try again once it has finished"
                ) from None
            if not told:
                told = True
                log(f"{what} is in use by {holder} (lock {lock_path}){holder.state()}; waiting for it at most "
                    f"{_duration(patience)} (Ctrl-C stops waiting)")
            time.sleep(POLL)
        yield lock


def holder_of(lock_path: Path) -> Holder | None:
    """Who holds an exclusive lock on `lock_path`; None if nobody does (or it cannot be opened)."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            st = os.fstat(fd)
        except OSError:
            return None
        else:
            return None  # free (closing the file lets go of our shared lock)
    finally:
        os.close(fd)
    pid = _flock_owner(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    return Holder(pid, pid is not None and _stopped(pid))


def _flock_owner(major: int, minor: int, inode: int) -> int | None:
    """The process holding an flock on the file (major:minor:inode), from /proc/locks.

    Its lines read `1: FLOCK  ADVISORY  WRITE 4663 fe:00:2165331 0 EOF` (a process waiting
    for a lock has `->` after the number); the pid is 0 or absent where it is not visible."""
    try:
        with open(LOCKS, "rb") as f:
            table = f.read(1 << 20)
    except OSError:
        return None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] != b"FLOCK":
            continue
        try:
            dev = fields[5].split(b":")
            if (int(dev[0], 16), int(dev[1], 16), int(dev[2])) == (major, minor, inode):
                pid = int(fields[4])
                return pid if pid > 0 else None
        except (ValueError, IndexError):
            continue
    return None


def _stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (state T, or t: stopped by a debugger)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(4096)
    except OSError:
        return False
    fields = stat[stat.rfind(b")") + 1 :].split()  # the command name, in parentheses, may hold anything
    return bool(fields) and fields[0] in (b"T", b"t")


def _duration(seconds: float) -> str:
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:g} s"
