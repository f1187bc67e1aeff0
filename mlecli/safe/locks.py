"""Folder locks: taking one, waiting for one, and telling who holds one.

A folder's lock is an flock on `<folder>/.lock` (folder_lock): the kernel lets go of it
when its process dies, so a crashed command never leaves it stuck. Waiting for a lock that
another process holds (waiting_lock) says once who holds it (and whether it is stopped),
then waits at most `PATIENCE` seconds, or until Ctrl-C: `folder_lock(wait=True)` would
wait in silence, for ever if the holder is stopped (Ctrl-Z, SIGSTOP). Whether a folder is
locked (is_locked) and by whom (holder_of) comes from trying a shared lock without waiting,
and the holder from the kernel's table of locks (/proc/locks: nothing is written to say
it, so a lock taken by any version of mlecli is named), whether it is stopped from
/proc/<pid>/stat. Where /proc cannot tell, the holder is "another process".

This is the only module that calls flock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mlecli.safe.errors import MlecliError
from mlecli.safe.files import cannot_write

# Seconds a command waits for another process to let go of a folder's lock: longer than an
# honest download of MNIST from the slowest mirror allowed (about 40 minutes at 50 kB/s,
# retries included).
PATIENCE = 3600.0
POLL = 0.1  # seconds between tries
LOCKS = "/proc/locks"
LOCK_NAME = ".lock"  # the file in a folder that holds its lock


class HeldLock:
    """A folder's lock, held: `discard` removes the lock file and, if nothing else is in
    it, the folder (for a folder this process made and then had no use for)."""

    def __init__(self, folder: Path, lock_path: Path):
        self.folder, self.path = folder, lock_path

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self.folder)


@contextlib.contextmanager
def folder_lock(folder: Path, *, wait: bool, what: str) -> Iterator[HeldLock]:
    """Hold an exclusive lock on `folder/.lock` for the duration of the block.

    The lock is an flock on an open file, so the kernel releases it when the process
    dies: a crashed run never leaves it stuck. With wait=False a lock held by another
    process raises MlecliError naming `what`. A holder may remove the lock file (and
    the folder) before it lets go: whoever was waiting on the removed file sees that
    it is no longer the folder's lock, and takes the lock of the folder as it is now.
    """
    lock_path = folder / LOCK_NAME
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # never through a link (a dangling one would create its target), never a pipe
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(errno.EINVAL, "not a regular file", str(lock_path))
        except OSError as exc:
            if exc.errno == errno.ELOOP and os.path.islink(lock_path):  # not a loop on the way to it
                raise MlecliError(f"{lock_path} is a symbolic link: mlecli never writes through one; remove it "
                                  f"(rm {lock_path}) and run again") from None
            raise MlecliError(cannot_write(exc, lock_path)) from None
        try:
            flags = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                raise MlecliError(
                    f"{what} is in use by another mlecli process (lock {lock_path}); "
                    "wait for it to finish or use another folder"
                ) from None
            try:
                here = os.stat(lock_path)
                mine = os.fstat(fd)
                current = (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)  # the holder before us removed this lock file: take the folder's lock anew
    try:
        yield HeldLock(folder, lock_path)
    finally:
        os.close(fd)


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
    lock_path = Path(folder) / LOCK_NAME
    start = time.monotonic()
    told = False
    free = 0  # tries that failed while nobody held the lock
    with contextlib.ExitStack() as stack:
        while True:
            try:
                lock = stack.enter_context(folder_lock(folder, wait=False, what=what))
                break
            except MlecliError:
                holder = holder_of(folder)
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


def is_locked(folder: Path) -> bool:
    """Whether a process holds `folder`'s lock right now."""
    return _held(Path(folder) / LOCK_NAME) is not None


def holder_of(folder: Path) -> Holder | None:
    """Who holds `folder`'s lock; None if nobody does (or its lock file cannot be opened)."""
    st = _held(Path(folder) / LOCK_NAME)
    if st is None:
        return None
    pid = _flock_owner(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    return Holder(pid, pid is not None and _stopped(pid))


def _held(lock_path: Path) -> os.stat_result | None:
    """The stat of `lock_path` if a process holds an exclusive lock on it, else None: a
    shared lock tried without waiting (and let go at once) tells."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO there must not block
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.fstat(fd)
    except OSError:
        return None
    else:
        return None  # free (closing the file lets go of our shared lock)
    finally:
        os.close(fd)


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
