"""Where `predict --show` and `export --out` may write: one check, before any work is done.

A command that writes a file the user named can destroy what the name points to by
mistake (`--show mine.png` where mine.png is the input, `--out run/checkpoints/best.npz`).
So an output's name must end in its format's suffix (a picture, a checkpoint, a config or a
record of the run never does: .png is refused only when it is one of the inputs), must not
be one of the files the command reads, and must be a regular file or nothing yet (a folder, or a name ending in /, is refused).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from mlecli.errors import MlecliError


class OutputError(MlecliError):
    """An output name that would write somewhere it must not."""


def check_output(value: str | Path, option: str, suffix: str, kind: str,
                 keep: Iterable[tuple[Path, str]] = ()) -> Path:
    """The path to write the `kind` file (e.g. "PNG picture") named by `option`, or OutputError.

    `keep`: (path, what it is) of the files the command reads: none may be the output (the
    same file, by device and inode, whatever the name or link)."""
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
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path
    except OSError:
        return path  # the write itself will say why it cannot be done
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{option} {path} is not a regular file (a device, a pipe or a socket): "
                          "give the name of a file to write")
    for other, what in keep:
        try:
            theirs = os.stat(other)
        except OSError:
            continue
        if (theirs.st_dev, theirs.st_ino) == (st.st_dev, st.st_ino):
            raise OutputError(f"{option} {path} is {what}: writing there would destroy it; give another name")
    return path
