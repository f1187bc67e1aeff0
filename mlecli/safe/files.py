"""Writing files so that a crash never leaves half of one, and reading them back.

Every file mlecli writes goes to a temporary name in the same folder, is flushed to
disk, then renamed over the target: readers see the old file or the new one, never a
mix. Temporary names start with '.' and end with '.tmp' so nothing mistakes them for
data or checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from mlecli.safe.errors import MlecliError

TMP_SUFFIX = ".tmp"
# What tempfile.mkstemp adds between atomic_write's prefix and suffix: 8 of these characters.
_TEMPORARY = re.compile(r"\..+\.\d+-\d+\.[a-z0-9_]{8}\.tmp", re.DOTALL)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; what we write should get the
# same permissions as any other file the user creates.
FILE_MODE = 0o666 & ~_current_umask()


def cannot_write(exc: OSError, path: Path) -> str:
    """The one line saying why `path` could not be written (or its folder made), for the OSError that said so."""
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device while writing {path}: free some space and try again"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: {exc.strerror}; make the folder writable or choose another one"
    if exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST):
        return (f"cannot write {path}: {exc.strerror} (a folder or file of that name is in the way); move it "
                "aside or choose another place")
    if exc.errno == errno.ENAMETOOLONG:
        return f"cannot write {path}: {exc.strerror}; choose a shorter name or folder"
    if exc.errno == errno.ELOOP:
        return (f"cannot write {path}: {exc.strerror} (a symbolic link on the way points, through others, back to "
                "itself); remove the loop or choose another folder")
    if exc.errno == errno.ENOENT:
        return (f"cannot write {path}: {exc.strerror} (its folder cannot be made there: a folder of the system, "
                "such as /proc?); choose another folder")
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


PSEUDO_FILE_SYSTEMS = ("/proc/", "/sys/")
EMPTY = "a size of 0 (an empty file, or one the kernel makes up, as in /proc); not read"


class Refused(OSError):
    """A file refused before a byte of it is read: not a regular file of data (EINVAL), empty
    where that is refused (ENODATA) or over a limit (EFBIG). `strerror` says what it is, to
    follow its name; `size` is its size in bytes (None if it is not a regular file)."""

    def __init__(self, code: int, what: str, path: Path | str, size: int | None = None):
        super().__init__(code, what, str(path))
        self.size = size


def check_readable(fd: int, path: Path | str, *, refuse_empty: bool = False) -> os.stat_result:
    """The stat of an open file that reading will end on: a regular file, and not one of
    the kernel's pseudo files (/proc/kmsg is "regular" with size 0 and blocks a reader for
    ever). Refused otherwise, and for a file of size 0 if `refuse_empty`."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise Refused(errno.EINVAL, "not a regular file", path)
    if refuse_empty and st.st_size == 0:
        raise Refused(errno.ENODATA, EMPTY, path, 0)
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")  # where the file really is, links followed
    except OSError:
        return st
    if target.startswith(PSEUDO_FILE_SYSTEMS):
        raise Refused(errno.EINVAL, f"a kernel file ({target}), not a file of data", path, st.st_size)
    return st


def open_regular(path: Path | str) -> BinaryIO:
    """Open `path` for reading if it is a regular file; OSError otherwise.

    Every file mlecli reads back goes through here or read_pieces: a FIFO put in a file's
    place would block the reader forever, a device (/dev/zero) or a kernel file
    (/proc/kmsg) would never end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # does not wait for a FIFO's writer
    try:
        check_readable(fd, path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


CHUNK = 1 << 16  # read_pieces' piece: what a download's decoder or a hash takes in one step


def read_pieces(path: Path | str, limit: int | None, *, refuse_empty: bool = False,
                chunk: int = CHUNK) -> Iterator[bytes]:
    """The bytes of a regular file of data, in pieces of at most `chunk`, no more than the
    size it had when opened (a file that grows meanwhile is read as it was).

    Before any byte is read, Refused (an OSError) for anything open_regular refuses (a
    FIFO, a device, a folder, a kernel file: none of them is ever read), for a file of
    more than `limit` bytes (None: any size), and for one of size 0 if `refuse_empty`;
    any other OSError of opening or reading it as it comes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once, and is refused below
    try:
        st = check_readable(fd, path, refuse_empty=refuse_empty)
        if limit is not None and st.st_size > limit:
            raise Refused(errno.EFBIG, f"larger than {limit:,} bytes", path, st.st_size)
        os.set_blocking(fd, True)
        left = st.st_size
        while left > 0:
            piece = os.read(fd, min(chunk, left))
            if not piece:
                return
            left -= len(piece)
            yield piece
    finally:
        os.close(fd)


def read_regular(path: Path | str, limit: int | None, *, refuse_empty: bool = False) -> bytes:
    """The bytes of a regular file of data at once: read_pieces, in one piece (one read of
    its size, no copy) but for a file of more than a GiB or a read the kernel cuts short."""
    pieces = list(read_pieces(path, limit, refuse_empty=refuse_empty, chunk=1 << 30))
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class FileHash(NamedTuple):
    sha256: str  # hex digits
    size: int  # bytes


def hash_file(path: Path | str) -> FileHash | None:
    """The SHA-256 and size of a regular file of data (read_pieces), None if it cannot be read."""
    digest = hashlib.sha256()
    size = 0
    try:
        for piece in read_pieces(path, None, chunk=1 << 20):  # a hash goes faster in large pieces
            digest.update(piece)
            size += len(piece)
    except OSError:
        return None
    return FileHash(digest.hexdigest(), size)


def open_own(path: Path | str, *, append: bool) -> BinaryIO:
    """Open `path` to write (or append to) as a file of mlecli's own: never through a
    symbolic link, never a FIFO or device, never a file that has other names (a hard link
    from elsewhere would be written too). OSError otherwise; nothing is truncated before
    the checks."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_APPEND if append else 0),
                 FILE_MODE)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            raise OSError(errno.EINVAL, "not a file of mlecli's own (a pipe, a device or a file with other names)",
                          str(path))
        if not append:
            os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "ab" if append else "wb")
    except BaseException:
        os.close(fd)
        raise


def atomic_write(path: Path | str, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temporary file beside `path`, then rename it to `path`.

    On any failure the temporary file is removed and `path` is left as it was; an
    OSError (disk full, read-only folder) becomes an MlecliError naming the file.
    """
    path = Path(path)
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        # A rename would put a file where a device, a FIFO or a folder was (as root, /dev/null itself).
        raise MlecliError(f"{path} is not a regular file (a folder, device or pipe): not replacing it; "
                          "choose another name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The writer's process (its pid namespace and id) in the name: anyone may remove a
        # temporary whose writer is gone.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_WRITER}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise MlecliError(cannot_write(exc, path)) from None
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
            raise MlecliError(cannot_write(exc, path)) from None
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
            if self.path.is_symlink():
                raise MlecliError(f"{self.path} is a symbolic link: appending would write into the file it points "
                                  "to; copy the run (cp -rL) and use the copy")
            # O_NONBLOCK: a FIFO in the file's place fails at once instead of waiting for a reader
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, FILE_MODE)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise OSError(errno.EINVAL, "not a regular file", str(self.path))
            if st.st_nlink > 1:  # shared with another run (cp -al): appending would write into both
                os.close(fd)
                atomic_write_bytes(self.path, read_regular(self.path, 1 << 40))
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            os.set_blocking(fd, True)
            self._f = os.fdopen(fd, "ab")
        except OSError as exc:
            raise MlecliError(cannot_write(exc, self.path)) from None

    def add(self, line: str) -> None:
        data = (line + "\n").encode("utf-8")
        start = self._f.tell()
        try:
            self._f.write(data)
            self._f.flush()
        except OSError as exc:
            with contextlib.suppress(OSError):
                self._f.truncate(start)
            raise MlecliError(cannot_write(exc, self.path)) from None

    def sync(self) -> None:
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as exc:
            raise MlecliError(cannot_write(exc, self.path)) from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()


def is_temporary_name(name: str) -> bool:
    """Whether `name` is one atomic_write gives its temporaries: `.<name>.<pidns>-<pid>.<random>.tmp`."""
    return _TEMPORARY.fullmatch(name) is not None


def open_own_folder(folder: Path) -> int | None:
    """A descriptor of `folder` if it is a folder itself (a symbolic link is not followed), else None."""
    try:
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None


def remove_own_files(folder: Path, ours: Callable[[str], bool]) -> int:
    """Delete the regular files in `folder` whose names `ours` accepts; return how many.

    Nothing else is touched: a `folder` that is a symbolic link is not followed (it may
    point at anyone's files), and neither is an entry that is a link or a folder. The
    folder is opened once and its entries removed relative to it, so that a folder
    swapped for a link meanwhile changes nothing."""
    fd = open_own_folder(folder)
    if fd is None:
        return 0
    removed = 0
    try:
        for name in os.listdir(fd):
            if not ours(name):
                continue
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    os.unlink(name, dir_fd=fd)
                    removed += 1
    except OSError:
        pass
    finally:
        os.close(fd)
    return removed


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporary files a killed process left in `folder`; return how many.

    A temporary names its writer's process id (`.<name>.<pidns>-<pid>.<random>.tmp`): one
    whose writer still lives is another process's write in progress and is left alone, so
    any command may call this, holding a lock or not. Only names of that exact pattern are
    removed, and never through a symbolic link (remove_own_files)."""
    folder = Path(folder)
    return remove_own_files(folder, lambda name: is_temporary_name(name) and not _writer_alive(folder / name))


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    except OSError:
        return "0"


_NAMESPACE = _pid_namespace()
_WRITER = f"{_NAMESPACE}-{os.getpid()}"
# A temporary written from another pid namespace (a container sharing the folder) cannot be
# told alive or dead from here: it is removed only once it has not changed for this long.
FOREIGN_TEMPORARY_AGE = 24 * 3600


def _writer_alive(p: Path) -> bool:
    parts = p.name.rsplit(".", 3)  # ['.<name>', '<namespace>-<pid>', '<random>', 'tmp']
    namespace, _, pid = parts[1].rpartition("-") if len(parts) == 4 else ("", "", "")
    if not (pid.isascii() and pid.isdigit()):
        return False  # not named by atomic_write: nobody is writing it
    if namespace != _NAMESPACE:
        try:
            return time.time() - p.stat().st_mtime < FOREIGN_TEMPORARY_AGE
        except OSError:
            return False
    if int(pid) == os.getpid():
        return False  # ours, from a write that failed or was cut short in this process
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError, ValueError):
        return False  # no such process
    return state not in (b"Z", b"X")  # a zombie writes nothing more
