"""Where `predict --show` and `export --out` may write: one check, before any work is done.

A command that writes a file the user named can destroy what the name points to by
mistake (`--show mine.png` where mine.png is the input, `--out run/checkpoints/best.npz`).
So an output's name must end in its format's suffix (a picture, a checkpoint, a config or a
record of the run never does: .png is refused only when it is one of the inputs), must not
be one of the files the command reads (by device and inode, or by where its name leads), must
not be written into a folder the command reads (`refuse_inside`: the file would be read back
as an input next time), and must be a regular file or nothing yet (a folder, or a name ending
in /, is refused).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from mlecli.safe.errors import MlecliError


class OutputError(MlecliError):
    """An output name that would write somewhere it must not."""


def check_output(value: str | Path, option: str, suffix: str, kind: str,
                 keep: Iterable[tuple[Path, str]] = (), folders: Iterable[tuple[str | Path, str]] = (),
                 what: str = "it") -> Path:
    """The path to write the `kind` file (e.g. "PNG picture") named by `option`, or OutputError.

    `folders`: (path, name shown) of the folders whose files the command reads: the output
    may not be written into one (`refuse_inside`; `what` is the output in words).

    `keep`: (path, what it is) of the files the command reads: none may be the output (the
    same file, by device and inode, whatever the name or link, nor the name where the output's
    name leads, even before either exists)."""
    text = os.fspath(value)
    shown = text if text else "''"
    if text == "":
        raise OutputError(f"{option} '': an empty name; give a file name ending in {suffix}")
    if text == "-":
        raise OutputError(f"{option} -: standard output is not a file here; give a file name ending in {suffix}")
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise OutputError(f"{option} {shown} is a folder: give a file name ending in {suffix}")
    if path.suffix.lower() != suffix:
        raise OutputError(f"{option} {shown}: a {kind} is written there, so its name must end in {suffix} "
                          "(this keeps it from replacing a file of another kind by mistake)")
    refuse_inside(path, option, folders, what)
    keep = list(keep)
    leads = _leads(path)
    for other, role in keep:
        if leads is not None and _leads(other) == leads:  # a link to a file not written yet, say
            raise OutputError(f"{option} {path} is {role}: writing there would destroy it; give another name")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path
    except OSError:
        return path  # the write itself will say why it cannot be done
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{option} {path} is not a regular file (a device, a pipe or a socket): "
                          "give the name of a file to write")
    for other, role in keep:
        try:
            theirs = os.stat(other)
        except OSError:
            continue
        if (theirs.st_dev, theirs.st_ino) == (st.st_dev, st.st_ino):
            raise OutputError(f"{option} {path} is {role}: writing there would destroy it; give another name")
    return path


def refuse_inside(path: Path, option: str, folders: Iterable[tuple[str | Path, str]], what: str) -> None:
    """OutputError if writing `path` puts a file into one of `folders` ((path, name shown), the
    folders whose files the command reads): the folder that holds the name `path` (where the
    file is written, any spelling, through linked folders), or the one that holds where the
    name leads (`path` a link). Whether the file exists or not: the rule is the place, not the
    file, so a run and the next one see the same folder. `what`: the output, in words."""
    places = set()
    for folder in (Path(path).parent, os.path.dirname(_leads(path) or path)):  # ".." as the system takes it
        with contextlib.suppress(OSError, ValueError):
            st = os.stat(folder)
            places.add((st.st_dev, st.st_ino))
    for folder, name in folders:
        try:
            st = os.stat(folder)
        except (OSError, ValueError):
            continue
        if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) in places:
            raise OutputError(f"{option} {path} is inside the input folder {name}: {what} would be read as an "
                              "input; write it elsewhere")


def _leads(path: str | Path) -> str | None:
    """Where the name `path` leads (links followed, even to a file not there yet), or None for a
    name no file can have (a NUL byte in it)."""
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return None
