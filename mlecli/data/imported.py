"""Datasets made by `mlecli import`: their record in the data folder, and their writer.

An imported dataset is an ordinary dataset folder that no mirror holds:

```
<data_dir>/<name>/
    dataset.json                  the record the registry reads: each raw file's sha256 and size,
                                  the class names, where the pictures came from and how
    raw/<file>                    the four IDX files, under MNIST's file names
    train.npz, test.npz           the splits, as for any dataset (mlecli.data.splits)
    train-files.txt, test-files.txt
                                  line i: the picture image i of the split was made from
```

`lookup` turns the record into a `Dataset` pinned by those hashes: the cache then treats it
as it treats MNIST (a changed raw file is refused by its hash, a damaged split rebuilt), except
that nothing is ever downloaded for it. A name is a folder name the registry can never
confuse with another dataset's: not a built-in name, not a custom dataset's cache folder
(`<name>-<16 hex digits>`).

`write` makes the whole folder under a temporary name in the data folder and renames it into
place in one step: a dataset is there whole or not at all. Replacing one (`force`) swaps the
two folders in one step too (Linux's renameat2 RENAME_EXCHANGE), under the old folder's lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlecli.data import splits as npz_splits
from mlecli.data.datasets import BUILTIN, MNIST_FILES, NAME_RE, ROLES, SPLITS, Dataset, named_classes
from mlecli.data.idx import idx_bytes, read_header
from mlecli.safe import schema
from mlecli.safe.errors import ConfigError, DataError, MlecliError
from mlecli.safe.files import (
    atomic_write_text,
    cannot_write,
    fsync_dir,
    remove_stale_temporary_folders,
    temporary_folder,
)
from mlecli.safe.locks import waiting_lock
from mlecli.safe.resources import need_space

RECORD = "dataset.json"
FORMAT = 1
MAX_CLASSES = 10  # labels are digits 0-9: what a task's positive and negative lists name
CUSTOM_FOLDER = re.compile(r"-[0-9a-f]{16}$")  # how a custom dataset's cache folder ends (cache.dataset_dir)

_FILE = schema.obj(required={"file": schema.string(200), "sha256": schema.SHA256, "size": schema.COUNT})
SPEC = schema.obj(
    required={
        "format": schema.one_of(FORMAT),
        "files": schema.obj(required={role: _FILE for role in ROLES}),
        "classes": schema.array(schema.string(1000), max_len=MAX_CLASSES),
        "command": schema.string(10_000),
    },
    optional={"source": schema.OBJECT, "counts": schema.OBJECT},
)


# ---------------------------------------------------------------------------
# Names


def check_name(name: str, option: str = "--name") -> None:
    """ConfigError unless `name` can be an imported dataset's name (and its folder's)."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{option} {name!r}: a dataset's name is 1-64 lower-case letters, digits, '.', '_' and '-', "
                          "starting with a letter or digit (it names its folder in the data folder)")
    if name in BUILTIN:
        raise ConfigError(f"{option} {name!r}: {name} is a built-in dataset; give yours another name")
    if CUSTOM_FOLDER.search(name):
        raise ConfigError(f"{option} {name!r}: a name ending in '-' and 16 hex digits is how a custom dataset's "
                          "cache folder is named; give yours another name")


# ---------------------------------------------------------------------------
# Reading the registry


def lookup(name: str, data_dir: Path) -> Dataset | None:
    """The dataset imported as `name` into `data_dir`, pinned by the hashes of its record;
    None if there is none (no `<data_dir>/<name>/dataset.json`). A damaged record is a
    SchemaError naming it and the key."""
    if not NAME_RE.match(name) or name in BUILTIN:
        return None
    path = Path(data_dir) / name / RECORD
    if not path.is_file():
        return None
    record = schema.read_json(path, SPEC)
    files = record["files"]
    if any(files[role]["file"] != MNIST_FILES[role] for role in ROLES):
        raise schema.SchemaError(f"{path}: files name other files than an import writes; the file is damaged or not "
                                 "mlecli's")
    classes = tuple(record["classes"])
    if not classes:
        raise schema.SchemaError(f"{path}: classes is empty; the file is damaged or not mlecli's")
    return Dataset(
        name=name,
        mirrors=(),
        files=dict(MNIST_FILES),
        sha256={role: files[role]["sha256"] for role in ROLES},
        sizes={role: files[role]["size"] for role in ROLES},
        classes=classes,
        imported=record["command"],
    )


def names(data_dir: Path) -> list[str]:
    """The names of the datasets imported into `data_dir`, sorted."""
    try:
        entries = sorted(os.listdir(data_dir))
    except OSError:
        return []
    return [n for n in entries if NAME_RE.match(n) and n not in BUILTIN and (Path(data_dir) / n / RECORD).is_file()]


def find(name: str, data_dir: Path, option: str = "--dataset") -> Dataset:
    """A dataset by name: built in, or imported into `data_dir`; ConfigError saying which there are."""
    if name in BUILTIN:
        return BUILTIN[name]
    found = lookup(name, data_dir)
    if found is None:
        there = names(data_dir)
        imported = f"imported into {data_dir}: {', '.join(there)}" if there else f"none is imported into {data_dir}"
        raise ConfigError(f"{option} {name}: no such dataset (built in: {', '.join(BUILTIN)}; {imported}); "
                          f"make one from a folder of pictures with mlecli import FOLDER --name {name}")
    return found


def class_names(name: str, url: str | None, data_dir: Path | None) -> tuple[str, ...] | None:
    """What a config's dataset calls its labels where they are not the digits themselves
    (datasets.named_classes): Fashion-MNIST's names, or an imported dataset's class folders,
    looked up in `data_dir`. None for digits, for a custom IDX dataset (`url`), and where the
    record cannot be read: a command that uses the data says what is wrong with it."""
    if name in BUILTIN:
        return named_classes(BUILTIN[name])
    if url is not None or data_dir is None:
        return None
    try:
        found = lookup(name, data_dir)
    except MlecliError:
        return None
    return None if found is None else named_classes(found)


# ---------------------------------------------------------------------------
# Writing one


@dataclass(frozen=True)
class Part:
    """One split of a dataset to write: images (N, H, W) uint8, labels (N,) uint8, and what
    each image was made from (N names, one per line of `<split>-files.txt`)."""

    images: np.ndarray
    labels: np.ndarray
    sources: list[str]


def write(data_dir: Path, name: str, parts: dict[str, Part], classes: tuple[str, ...], *, command: str,
          source: dict, force: bool = False, log: Callable[[str], None] = lambda msg: None) -> Path:
    """Write the dataset `name` into `data_dir` whole, or nothing; return its folder.

    `parts` holds the train and test splits, `classes[i]` names label i, `command` is the
    command that made it and `source` where the pictures came from (both recorded). A name
    already there is refused unless `force`, which replaces an imported dataset (never a
    folder that is not one) in one step."""
    check_name(name)
    final = Path(data_dir) / name
    refuse_existing(final, force)
    made = _missing_folders(Path(data_dir))
    tmp = None
    try:
        try:
            Path(data_dir).mkdir(parents=True, exist_ok=True)
            remove_stale_temporary_folders(Path(data_dir))  # a killed import's
            pixels = sum(p.images.nbytes + p.labels.nbytes for p in parts.values())
            need_space(Path(data_dir), 2 * pixels + (1 << 20), f"importing {name}")  # the raw files, and the splits
            tmp = temporary_folder(final)
        except OSError as exc:
            raise MlecliError(cannot_write(exc, final)) from None
        _fill(tmp, name, parts, classes, command=command, source=source)
        _commit(tmp, final, force, log)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)
        raise
    fsync_dir(Path(data_dir))
    return final


def refuse_existing(final: Path, force: bool) -> None:
    """MlecliError if `final` is there and may not be replaced: without `force` whatever it
    is; with `force` anything but an imported dataset's folder (mlecli never deletes what
    it did not make)."""
    if not os.path.lexists(final):
        return
    name = final.name
    ours = final.is_dir() and not final.is_symlink() and (final / RECORD).is_file()
    if not ours:
        raise MlecliError(f"{final} is there and is not a dataset mlecli imported (no {RECORD} in it): mlecli does "
                          f"not replace it; move it away or give another --name")
    if not force:
        raise MlecliError(f"{final} already holds the dataset {name}: give another --name, or --force to replace it "
                          "(whole, in one step)")


def _fill(folder: Path, name: str, parts: dict[str, Part], classes: tuple[str, ...], *, command: str,
          source: dict) -> None:
    raw = folder / "raw"
    raw.mkdir()
    arrays = {f"{s}-images": parts[s].images for s in SPLITS} | {f"{s}-labels": parts[s].labels for s in SPLITS}
    sha256, sizes, headers = {}, {}, {}
    for role in ROLES:
        data = idx_bytes(arrays[role])
        path = raw / MNIST_FILES[role]
        try:
            with open(path, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise MlecliError(cannot_write(exc, path)) from None
        sha256[role], sizes[role] = hashlib.sha256(data).hexdigest(), len(data)
        headers[role] = read_header(data[:1024], str(path), final=True)
    fsync_dir(raw)
    dataset = Dataset(name, (), dict(MNIST_FILES), sha256, sizes, classes=classes, imported=command)
    for split in SPLITS:
        raw_files = {role: (raw / MNIST_FILES[role], sha256[role]) for role in npz_splits.roles(split)}
        npz_splits.build(folder / f"{split}.npz", dataset, split, raw_files, headers)
        atomic_write_text(folder / f"{split}-files.txt", "".join(f"{s}\n" for s in parts[split].sources))
    counts = {s: np.bincount(parts[s].labels, minlength=len(classes)).tolist() for s in SPLITS}
    record = {
        "format": FORMAT,
        "files": {role: {"file": MNIST_FILES[role], "sha256": sha256[role], "size": sizes[role]} for role in ROLES},
        "classes": list(classes),
        "counts": counts,
        "command": command,
        "source": source,
    }
    atomic_write_text(folder / RECORD, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    fsync_dir(folder)


def _commit(tmp: Path, final: Path, force: bool, log: Callable[[str], None]) -> None:
    """Rename the finished folder `tmp` to `final`: a new name in one step, refused if a
    folder of that name appeared meanwhile; with `force`, the old dataset swapped out in one
    step under its lock (readers have the old folder or the new one, never a mix) and removed."""
    if not os.path.lexists(final):
        try:
            _rename(tmp, final, RENAME_NOREPLACE)
            return
        except FileExistsError:
            pass  # another import got there first: what it made is judged like any existing folder
        refuse_existing(final, force)
    with waiting_lock(final, what=f"the data folder {final}", log=log):
        refuse_existing(final, force)  # still an imported dataset, now that we hold its lock
        try:
            _rename(tmp, final, RENAME_EXCHANGE)
        except NotImplementedError:
            # No swap on this file system: the old folder goes aside, then the new one in (a
            # crash between the two leaves the old one under the temporary name, and no `final`).
            os.replace(final, tmp.with_name(tmp.name + ".old"))
            os.replace(tmp, final)
            tmp = tmp.with_name(tmp.name + ".old")
        # `tmp` now holds the replaced dataset, and the lock file we hold: removed while held,
        # which those waiting on it notice (mlecli.safe.locks).
        shutil.rmtree(tmp, ignore_errors=True)


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _rename(src: Path, dest: Path, flags: int) -> None:
    """renameat2(src, dest, flags): FileExistsError if `dest` exists (RENAME_NOREPLACE);
    NotImplementedError where the system or file system cannot do it (then, for NOREPLACE,
    a plain rename onto a name that is still free)."""
    libc = ctypes.CDLL(None, use_errno=True)
    call = getattr(libc, "renameat2", None)
    if call is not None:
        if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dest), flags) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dest))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise MlecliError(cannot_write(OSError(err, os.strerror(err)), dest))
    if flags == RENAME_EXCHANGE:
        raise NotImplementedError
    if os.path.lexists(dest):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dest))
    try:
        os.rename(src, dest)
    except OSError as exc:
        raise MlecliError(cannot_write(exc, dest)) from None


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and each of its parents that does not exist yet, deepest first."""
    missing = []
    p = Path(folder)
    while p != p.parent and not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    return missing


def _remove_made(made: list[Path]) -> None:
    for p in made:
        with contextlib.suppress(OSError):
            p.rmdir()  # only if nothing else is in it


def damaged(dataset: Dataset, role: str, path: Path, got: str | None) -> DataError:
    """The error for a raw file of an imported dataset that is missing or no longer hashes to its record."""
    what = "is missing" if got is None else f"has the sha256 {got}, not the {dataset.sha256[role]} recorded"
    return DataError(f"{path} {what}: it was changed or damaged since {dataset.name} was imported; import it "
                     f"again: {dataset.imported} --force")
