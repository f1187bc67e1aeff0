"""Writing files so that a crash never leaves half of one, and locking folders.

Every file mlecli writes goes to a temporary name in the same folder, is flushed to
disk, then renamed over the target: readers see the old file or the new one, never a
mix. Temporary names start with '.' and end with '.tmp' so nothing mistakes them for
data or checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from mlecli.errors import MlecliError

TMP_SUFFIX = ".tmp"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; what we write should get the
# same permissions as any other file the user creates.
FILE_MODE = 0o666 & ~_current_umask()


def describe_os_error(exc: OSError, path: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device while writing {path}: free some space and try again"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: {exc.strerror}; make the folder writable or choose another one"
    return f"cannot write {path}: {exc.strerror or exc}"


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path | str, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temporary file beside `path`, then rename it to `path`.

    On any failure the temporary file is removed and `path` is left as it was; an
    OSError (disk full, read-only folder) becomes an MlecliError naming the file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise MlecliError(describe_os_error(exc, path)) from None
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise MlecliError(describe_os_error(exc, path)) from None
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class Appender:
    """Appends whole lines to a file (metrics.jsonl): one write per line, flushed, made
    durable by `sync` before the commit that covers them. A failed write (a full disk) is
    cut back off, so the file only ever ends in whole lines that were written completely.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._f = open(self.path, "ab")
        except OSError as exc:
            raise MlecliError(describe_os_error(exc, self.path)) from None

    def add(self, line: str) -> None:
        data = (line + "\n").encode("utf-8")
        start = self._f.tell()
        try:
            self._f.write(data)
            self._f.flush()
        except OSError as exc:
            with contextlib.suppress(OSError):
                self._f.truncate(start)
            raise MlecliError(describe_os_error(exc, self.path)) from None

    def sync(self) -> None:
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as exc:
            raise MlecliError(describe_os_error(exc, self.path)) from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporary files a killed process left in `folder`; return how many."""
    removed = 0
    if not folder.is_dir():
        return 0
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX):
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
    return removed


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
    lock_path = folder / ".lock"
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise MlecliError(describe_os_error(exc, lock_path)) from None
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
