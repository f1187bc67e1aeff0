"""The local dataset cache: verified raw files, their content record, and the arrays built from them.

```
<data_dir>/<folder>/              `mnist`, `fashion-mnist`, or `<name>-<key>` for a custom dataset
    raw/<file>                    verified decompressed IDX files, under the dataset's own file names only
    record.json                   the content record: what the folder is keyed by, and per file
                                  its sha256, size and where it came from
    train.npz, test.npz           uint8 images N x H x W, uint8 labels, and `meta` naming the
                                  sha256 of the raw files they were built from (mlecli.data.splits)
    partial/<file>[.gz].part      downloads in progress (+ `.part.json`: URL and validators to resume)
    staged/<file>                 an unpinned dataset's new files, verified, until all four are
    .lock                         writers queue on it; reading never needs it
```

Where the data came from decides the folder: a built-in dataset is its name (its files
are pinned by hash: any mirror gives the same bytes); a custom dataset with all four
hashes pinned is keyed by those hashes; any other custom dataset by its URL and file
names, so that pointing a config at another URL never finds the old files.

An unpinned dataset's four files are one set: fetched together from its URL into
staged/, then committed (the record names all four, then they are renamed into raw/),
never one at a time, so that two versions of the data never mix. Its record counts only
if it names all four files, all from the URL the folder is keyed by.

Freshness is decided by content records, never by modification times: a split's .npz
is fresh when the hashes it was built from are the pinned hashes (or, for an unpinned
file, the hashes in record.json, written when the set was verified), and it is used only
if every byte is as it was built (mlecli.data.splits). A complete cache therefore loads from
a read-only copy (`cp -r` included) without writing anything. Every write is an atomic
rename made under the lock; leftovers of a killed writer (temporaries, partial downloads)
are removed by the next writer, or by the next reader that finds the lock free.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlecli.data import splits as npz_splits
from mlecli.data.datasets import BUILTIN, ROLES, SPLITS, Dataset, is_builtin
from mlecli.data.download import Expected, fetch_file, meta_path, mirror_location
from mlecli.data.http import DEFAULT_POLICY, HttpPolicy, new_session
from mlecli.data.idx import MAX_DECOMPRESSED, MAX_HEADER, IdxHeader, read_header
from mlecli.data.splits import MAX_SIDE, Split, Unusable, split_hashes
from mlecli.safe.errors import DataError, DownloadError, MlecliError
from mlecli.safe.files import (
    atomic_write_text,
    cannot_write,
    fsync_dir,
    hash_file,
    is_temporary_name,
    open_own_folder,
    open_regular,
    read_regular,
    remove_own_files,
    remove_stale_temporaries,
)
from mlecli.safe.locks import folder_lock, waiting_lock
from mlecli.safe.resources import need_memory, need_space, physical_memory

__all__ = ["Split", "split_hashes", "ensure_dataset", "ensure_splits", "load_split", "keep_loaded", "dataset_dir"]

CACHE_FORMAT = 2
RECORD = "record.json"
RECORD_LIMIT = 1 << 16  # bytes: a record is a few kB (four entries, a key of file names and a URL)
RAW = "raw"
PARTIAL = "partial"
STAGED = "staged"
# Memory that training needs per image, beyond its pixels twice (the split, and the task's
# copy of the images it chose): indices, labels and targets.
BYTES_PER_IMAGE = 48

# What ensure_splits() may download when a dataset is not cached (see ensure_splits).
DOWNLOAD_ANY = "any"
DOWNLOAD_BUILTIN = "builtin"
DOWNLOAD_NEVER = "never"
DOWNLOAD_POLICIES = (DOWNLOAD_ANY, DOWNLOAD_BUILTIN, DOWNLOAD_NEVER)


def default_data_dir() -> Path:
    return Path(os.environ.get("MLECLI_DATA_DIR") or "data")


@dataclass(frozen=True)
class FileReport:
    """What `ensure_dataset` did for one file."""

    role: str
    path: Path
    size: int
    sha256: str
    verified: bool  # matched a known hash (built in or from the config)
    source: str  # "cache" or the URL / path it was fetched from


# ---------------------------------------------------------------------------
# Where a dataset lives


def source_key(dataset: Dataset) -> dict:
    """What a dataset's cache folder is keyed by: its pinned hashes, or else where it comes from."""
    files = {role: dataset.files[role] for role in ROLES}
    if dataset.verified:
        return {"files": files, "sha256": {role: dataset.sha256[role] for role in ROLES}}
    return {"files": files, "url": [_normal_url(m) for m in dataset.mirrors]}


def _normal_url(mirror: str) -> str:
    kind, where = mirror_location(mirror)
    return where if kind == "http" else "file://" + os.path.abspath(where)


def dataset_dir(dataset: Dataset, data_dir: Path) -> Path:
    if is_builtin(dataset):
        return Path(data_dir) / dataset.name
    text = json.dumps(source_key(dataset), sort_keys=True)
    return Path(data_dir) / f"{dataset.name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _read_record(folder: Path, dataset: Dataset) -> dict[str, dict]:
    """The verified files' records by file name; empty unless the record is this dataset's.

    For an unpinned dataset, empty unless it names all four files as one set from the URL
    the folder is keyed by (files from elsewhere, or of two fetches, never count)."""
    try:  # a few kB: a damaged or outsized record.json (a sparse 3 GB file) counts as none
        record = json.loads(read_regular(folder / RECORD, RECORD_LIMIT))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(record, dict) or record.get("format") != CACHE_FORMAT or record.get("key") != source_key(dataset):
        return {}
    files = record.get("files")
    if not isinstance(files, dict):
        return {}
    files = {
        name: entry for name, entry in files.items()
        if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("size"), int)
    }
    if dataset.verified:
        return files
    entries = [files.get(dataset.files[role]) for role in ROLES]
    if any(e is None for e in entries):
        return {}
    sources = {e.get("mirror") if isinstance(e.get("mirror"), str) else None for e in entries}
    if len(sources) != 1 or sources.pop() not in source_key(dataset)["url"]:
        return {}
    if any(dataset.sha256.get(role, e["sha256"]) != e["sha256"] for role, e in zip(ROLES, entries)):
        return {}
    return files


def _write_record(folder: Path, dataset: Dataset, files: dict[str, dict]) -> None:
    record = {"format": CACHE_FORMAT, "dataset": dataset.name, "key": source_key(dataset), "files": files}
    atomic_write_text(folder / RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")


def _want(dataset: Dataset, role: str, record: dict[str, dict]) -> str | None:
    """The sha256 a role's file must have: pinned, else as recorded when it was verified."""
    pinned = dataset.sha256.get(role)
    if pinned is not None:
        return pinned
    return (record.get(dataset.files[role]) or {}).get("sha256")


def _check_path(folder: Path, dataset: Dataset) -> None:
    """MlecliError with advice if the cache's longest paths under `folder` are longer than the system allows."""
    # The longest: the temporary of a part's meta file, `.<file>.gz.part.json.<pid>.<random>.tmp`.
    longest = folder / PARTIAL / ("x" * (max(map(len, dataset.files.values())) + 48))
    try:
        os.stat(longest)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            shown = str(folder) if len(str(folder)) <= 100 else f"{str(folder)[:60]}…{str(folder)[-30:]}"
            raise MlecliError(
                f"the data folder {shown} ({len(str(folder)):,} characters) makes paths longer than this system "
                f"allows ({exc.strerror}): choose a shorter data folder (--data-dir or $MLECLI_DATA_DIR)"
            ) from None


# ---------------------------------------------------------------------------
# What a file must be


def _expected(dataset: Dataset, role: str, folder: Path, record: dict[str, dict], mirror: str | None, *,
              record_each: bool, known: dict[str, tuple[Path, str]]) -> Expected:
    """What `role`'s file must be; once verified, its entry goes into `record` (and, with
    `record_each`, into record.json right away), naming `mirror` if it is given. `known`
    holds the verified files of the set there are already: the header must agree with theirs."""

    def on_header(header: IdxHeader, source: str, body_left: int) -> None:
        check_header(dataset, role, header, source)
        _check_with_known(dataset, role, header, source, known)
        # The raw file, and about as much again for the split's .npz, beside what is still to arrive.
        need_space(folder, body_left + 2 * header.total_len,
                   f"caching {dataset.files[role]} of {dataset.name} ({header.describe()})")

    def on_data(header: IdxHeader, offset: int, data: bytes, source: str) -> None:
        if role.endswith("labels") and dataset.digits:
            values = np.frombuffer(data, np.uint8)
            bad = np.flatnonzero(values > 9)
            if bad.size:
                i = int(bad[0])
                raise DataError(f"{source}: label {int(values[i])} at index {offset + i} is not a digit 0-9")

    def on_verified(sha256: str, size: int, source: str) -> None:
        entry = {"sha256": sha256, "size": size, "source": source}
        record[dataset.files[role]] = entry if mirror is None else {**entry, "mirror": mirror}
        if record_each:
            # Recorded before the file is renamed in: a crash in between leaves a record the file
            # does not match yet (so it is fetched again), never a file the record does not know.
            _write_record(folder, dataset, record)

    return Expected(
        name=dataset.files[role],
        sha256=dataset.sha256.get(role),
        size=dataset.sizes.get(role),
        plausible=largest_plausible(role),
        on_header=on_header,
        on_data=on_data,
        on_verified=on_verified,
    )


def largest_plausible(role: str) -> int:
    """Most bytes a `role` file can have and still pass check_header on this machine: images
    whose pixels fit twice in its memory, labels for as many images as fit (each takes at
    least 2 + BYTES_PER_IMAGE bytes)."""
    have = physical_memory()
    if have is None:
        return MAX_DECOMPRESSED
    per_item = 2 if role.endswith("images") else 2 + BYTES_PER_IMAGE
    return min(MAX_DECOMPRESSED, MAX_HEADER + have // per_item)


def check_header(dataset: Dataset, role: str, header: IdxHeader, source: str) -> None:
    """Raise DataError unless an IDX header fits the dataset's `role`; NoRoom if it can never fit in memory."""
    if role.endswith("images"):
        dims = header.dims
        if header.code != 0x08 or len(dims) != 3 or not (1 <= dims[1] <= MAX_SIDE and 1 <= dims[2] <= MAX_SIDE):
            raise DataError(
                f"{source}: images must be uint8 N x H x W with 1 <= H, W <= {MAX_SIDE}, "
                f"got {header.dtype.name} {header.describe()}"
            )
        need_memory(training_memory(header), f"{source}: {dims[0]:,} images of {dims[1]}x{dims[2]} "
                    "(held in memory to train on)", now=False)
    elif header.code != 0x08 or len(header.dims) != 1:
        raise DataError(f"{source}: labels must be a uint8 vector, got {header.dtype.name} {header.describe()}")


class _NotTogether(MlecliError):
    """A file's header at odds with the set's: not this mirror's fault alone, so not a DataError
    (which would move on to the next mirror); ensure_dataset raises it as one."""


def _check_with_known(dataset: Dataset, role: str, header: IdxHeader, source: str,
                      known: dict[str, tuple[Path, str]]) -> None:
    """_NotTogether if a header is at odds with those of the set's files already there (as
    soon as it is known: before the body is downloaded or written). `known` maps a role to
    its file and what to call it."""
    split, kind = role.split("-")
    for other_role, (path, shown) in known.items():
        if other_role == role:
            continue
        try:
            other = _read_header_of(path)
        except (MlecliError, DataError):
            continue  # _check_together says what is wrong with it
        other_split, other_kind = other_role.split("-")
        if other_split == split and header.dims[0] != other.dims[0]:
            mine, theirs = (header.dims[0], source), (other.dims[0], shown)
            (n_img, img), (n_lab, lab) = (mine, theirs) if kind == "images" else (theirs, mine)
            raise _NotTogether(f"{dataset.name} {split}: {n_img} images but {n_lab} labels ({img}, {lab}); the files "
                               "do not belong together")
        if kind == "images" and other_kind == "images" and header.dims[1:] != other.dims[1:]:
            mine, theirs = (header.dims[1:], source), (other.dims[1:], shown)
            (train, train_src), (test, test_src) = (mine, theirs) if split == "train" else (theirs, mine)
            raise _NotTogether(f"{dataset.name}: train images are {train[0]}x{train[1]} but test images are "
                               f"{test[0]}x{test[1]} ({train_src}, {test_src}); the files do not belong together")


def training_memory(images: IdxHeader) -> int:
    """Bytes a split of these images takes in memory while training: its pixels twice, and a little per image."""
    return 2 * images.data_len + BYTES_PER_IMAGE * images.dims[0]


def _read_header_of(path: Path) -> IdxHeader:
    try:
        with open_regular(path) as f:
            head = f.read(MAX_HEADER)
    except OSError as exc:
        raise MlecliError(f"cannot read {path}: {exc.strerror or exc}") from None
    header = read_header(head, str(path), final=True)
    assert header is not None
    return header


def _check_together(dataset: Dataset, paths: dict[str, Path], shown: dict[str, str] | None = None
                    ) -> dict[str, IdxHeader]:
    """The four files' headers, once they are known to belong together (`shown` names them in errors)."""
    shown = shown or {role: str(p) for role, p in paths.items()}
    headers = {role: _read_header_of(paths[role]) for role in ROLES}
    for role, header in headers.items():
        check_header(dataset, role, header, shown[role])
    for split in SPLITS:
        n_img, n_lab = headers[f"{split}-images"].dims[0], headers[f"{split}-labels"].dims[0]
        if n_img != n_lab:
            raise DataError(
                f"{dataset.name} {split}: {n_img} images but {n_lab} labels "
                f"({shown[f'{split}-images']}, {shown[f'{split}-labels']}); the files do not belong together"
            )
    train, test = headers["train-images"].dims[1:], headers["test-images"].dims[1:]
    if train != test:
        raise DataError(
            f"{dataset.name}: train images are {train[0]}x{train[1]} but test images are {test[0]}x{test[1]} "
            f"({shown['train-images']}, {shown['test-images']}); the files do not belong together"
        )
    return headers


# ---------------------------------------------------------------------------
# Making the cache complete


@dataclass
class _Fetching:
    """How to fetch what is missing: the mirrors and the settings of one ensure_dataset call."""

    mirrors: list[str]
    policy: HttpPolicy
    progress: bool
    log: Callable[[str], None]
    session: Callable[[], object]
    fetch: bool
    how_to_fetch: str | None

    def file(self, dataset: Dataset, mirrors: list[str], expected: Expected, dest: Path, partial: Path
             ) -> tuple[str, str]:
        extra = {} if is_builtin(dataset) else {
            "advice": f"Check the network, and the url of the {dataset.name} dataset in its config's [data] table"
        }
        return fetch_file(mirrors, expected, dest, partial, session_factory=self.session, policy=self.policy,
                          progress=self.progress, log=self.log, **extra)


def ensure_dataset(
    dataset: Dataset,
    data_dir: Path,
    *,
    mirrors: tuple[str, ...] = (),
    force: bool = False,
    policy: HttpPolicy = DEFAULT_POLICY,
    progress: bool = False,
    log: Callable[[str], None] = lambda msg: None,
    session_factory: Callable[[], object] | None = None,
    fetch: bool = True,
    how_to_fetch: str | None = None,
) -> list[FileReport]:
    """Make the four raw files and both .npz splits present and verified.

    A complete cache (every raw file hashing to what it must, both splits fresh and whole)
    is only read: no lock, no write, no network. Otherwise, under the dataset folder's lock
    (so that concurrent downloads queue up; mlecli.safe.locks says who is waited for),
    whatever is missing or wrong is fetched (unless `fetch` is False: then DataError says
    to run `how_to_fetch`) and the splits are rebuilt. `force` fetches every file again
    (the cached copy stays until a verified replacement is renamed over it; an unpinned
    dataset's four files are replaced together or not at all). Mirrors in `mirrors` are
    tried before the dataset's own; an unpinned dataset takes none (nothing would tell
    their files from those at its URL).
    """
    folder = dataset_dir(dataset, data_dir)
    _check_path(folder, dataset)
    _refuse_other_sources(dataset, mirrors)
    if not force:
        reports = _complete(dataset, folder)
        if reports is not None:
            _tidy_if_free(folder, dataset)
            _warn_unverified(dataset, reports, log)
            return reports
    sessions = []  # one HTTP session for every file, opened only if a file is fetched over HTTP

    def shared_session():
        if not sessions:
            sessions.append((session_factory or new_session)())
        return sessions[0]

    how = _Fetching(list(dict.fromkeys([*mirrors, *dataset.mirrors])), policy, progress, log, shared_session, fetch,
                    how_to_fetch)
    made = _missing_folders(folder)  # what a failure should not leave behind, deepest first
    try:
        with waiting_lock(folder, what=f"the data folder {folder}", log=log) as lock:
            try:
                reports = _ensure_locked(dataset, folder, force, how)
            except BaseException:
                _clean_after_failure(folder, lock, made)
                raise
    except BaseException:
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()  # only if the failure left it empty
        raise
    finally:
        for s in sessions:
            s.close()
    _warn_unverified(dataset, reports, log)
    return reports


def _refuse_other_sources(dataset: Dataset, mirrors: tuple[str, ...]) -> None:
    if dataset.verified:
        return
    own = source_key(dataset)["url"]
    other = [m for m in mirrors if _normal_url(m) not in own]
    if other:
        raise MlecliError(
            f"--mirror {other[0]}: the files of {dataset.name} are not pinned by a sha256 in its config, so nothing "
            f"would tell the mirror's files from those at its url {dataset.mirrors[0]}; to fetch them from the mirror, "
            f"set url = \"{other[0]}\" in the config's [data] table (or pin the files' sha256 there: then any mirror "
            "will do)"
        )


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and each of its parents that does not exist yet, deepest first."""
    missing = []
    p = Path(folder)
    while p != p.parent:
        try:
            os.lstat(p)
            break
        except FileNotFoundError:
            missing.append(p)
            p = p.parent
        except OSError:  # not ours to remove, whatever it is
            break
    return missing


def _warn_unverified(dataset: Dataset, reports: list[FileReport], log) -> None:
    """One warning for a dataset whose files are not all pinned, and the line that pins them."""
    loose = [r.role for r in reports if not r.verified]
    if loose:
        log(f"warning: {', '.join(loose)} of {dataset.name} are not pinned by a sha256 in its config, so nothing "
            "tells if they change; to pin them as they are now, add this line to the config's [data] table:")
        log("sha256 = { " + ", ".join(f'{r.role} = "{r.sha256}"' for r in reports) + " }")


def _complete(dataset: Dataset, folder: Path) -> list[FileReport] | None:
    """Reports for a cache that needs nothing (read without the lock), else None."""
    record = _read_record(folder, dataset)
    reports = []
    for role in ROLES:
        path = folder / RAW / dataset.files[role]
        want = _want(dataset, role, record)
        got = hash_file(path) if want is not None else None
        if got is None or got[0] != want or (dataset.sizes.get(role) not in (None, got[1])):
            return None
        reports.append(FileReport(role, path, got[1], got[0], verified=role in dataset.sha256, source="cache"))
    if any(not isinstance(_load_npz(folder, split, dataset, record), Split) for split in SPLITS):
        return None
    return reports


def _ensure_locked(dataset: Dataset, folder: Path, force: bool, how: _Fetching) -> list[FileReport]:
    raw = folder / RAW
    _refuse_linked_subfolders(folder)
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MlecliError(f"cannot create {raw}: {exc.strerror}; choose another --data-dir") from None
    _tidy(folder, dataset, everything=False)
    if dataset.verified:
        reports = _ensure_each(dataset, folder, force, how)
    else:
        reports = _ensure_set(dataset, folder, force, how)
    record = _read_record(folder, dataset)
    headers = _check_together(dataset, {r.role: r.path for r in reports})
    for split in SPLITS:
        path = folder / f"{split}.npz"
        loaded = _load_npz(folder, split, dataset, record)
        if isinstance(loaded, Split):
            continue
        if loaded.damaged:
            how.log(f"{path}: {loaded.why}; rebuilding it from the verified raw files")
        raw_files = {r.role: (r.path, r.sha256) for r in reports}
        npz_splits.build(path, dataset, split, raw_files, headers)
    _tidy(folder, dataset, everything=True)
    return reports


def _ensure_each(dataset: Dataset, folder: Path, force: bool, how: _Fetching) -> list[FileReport]:
    """A pinned dataset's files, each fetched if it is not as pinned: any copy of it is the same bytes."""
    record = _read_record(folder, dataset)
    cached = {}
    for role in ROLES:
        path = folder / RAW / dataset.files[role]
        got = None if force else hash_file(path)
        if got is not None and got[0] == dataset.sha256[role] and dataset.sizes.get(role) in (None, got[1]):
            cached[role] = FileReport(role, path, got[1], got[0], verified=True, source="cache")
    # What a fetched file's header must agree with: the files there are, each file once fetched.
    known = {role: (r.path, str(r.path)) for role, r in cached.items()}
    reports = []
    for role in ROLES:
        if role in cached:
            reports.append(cached[role])
            continue
        if not how.fetch:
            raise DataError(_refusal(dataset, folder, how.how_to_fetch))
        path = folder / RAW / dataset.files[role]
        expected = _expected(dataset, role, folder, record, None, record_each=True, known=known)
        try:
            digest, source = how.file(dataset, how.mirrors, expected, path, folder / PARTIAL)
        except _NotTogether as exc:
            raise DataError(str(exc)) from None
        reports.append(FileReport(role, path, record[expected.name]["size"], digest, verified=True, source=source))
        known[role] = (path, source)
    return reports


def _ensure_set(dataset: Dataset, folder: Path, force: bool, how: _Fetching) -> list[FileReport]:
    """An unpinned dataset's four files: the recorded set if it is whole, else a new set, fetched whole."""
    current = _current_set(dataset, folder)  # finishes a commit a crash cut short, even before --force
    if current is not None and not force:
        return current
    _remove_staged(folder, dataset)  # a killed fetch's files: of another moment, never mixed into a new set
    if not how.fetch:
        raise DataError(_refusal(dataset, folder, how.how_to_fetch))
    failures = []
    for i, mirror in enumerate(how.mirrors):
        try:
            return _fetch_set(dataset, folder, mirror, how)
        except DownloadError as exc:
            if len(how.mirrors) == 1:
                raise
            failures.append(str(exc))
            if i < len(how.mirrors) - 1:
                how.log(f"{dataset.name}: {mirror} failed; trying the next mirror for all four files")
    raise DownloadError("; ".join(failures))


def _current_set(dataset: Dataset, folder: Path) -> list[FileReport] | None:
    """The recorded set if every file of it is in raw/, finishing a commit a crash cut short
    (from staged/, without the network); None if the set must be fetched again."""
    record = _read_record(folder, dataset)
    if not record:
        return None
    reports = []
    for role in ROLES:
        name = dataset.files[role]
        path, staged = folder / RAW / name, folder / STAGED / name
        want = (record[name]["sha256"], record[name]["size"])
        if hash_file(path) != want:
            if hash_file(staged) != want:
                return None
            _rename_in(staged, path)
        reports.append(FileReport(role, path, want[1], want[0], verified=role in dataset.sha256, source="cache"))
    fsync_dir(folder / RAW)
    return reports


def _fetch_set(dataset: Dataset, folder: Path, mirror: str, how: _Fetching) -> list[FileReport]:
    """All four files from `mirror` into staged/, verified; then committed: the record names
    the new set, then its files are renamed into raw/ one by one. A crash in between leaves a
    record that raw/ does not match yet: the next run finishes the renames (_current_set)."""
    staged = folder / STAGED
    entries: dict[str, dict] = {}
    reports = []
    known: dict[str, tuple[Path, str]] = {}  # the set's files fetched so far: a header must agree with theirs
    try:
        for role in ROLES:
            expected = _expected(dataset, role, folder, entries, _normal_url(mirror), record_each=False, known=known)
            try:
                digest, source = how.file(dataset, [mirror], expected, staged / expected.name, folder / PARTIAL)
            except _NotTogether as exc:
                raise DataError(str(exc)) from None
            known[role] = (staged / expected.name, source)
            reports.append(FileReport(role, folder / RAW / expected.name, entries[expected.name]["size"], digest,
                                      verified=role in dataset.sha256, source=source))
        _check_together(dataset, {role: staged / dataset.files[role] for role in ROLES},
                        {r.role: r.source for r in reports})
    except BaseException:
        _remove_staged(folder, dataset)  # none of it is used: the cached set stays as it was
        raise
    _write_record(folder, dataset, entries)
    for r in reports:
        _rename_in(staged / r.path.name, r.path)
    fsync_dir(folder / RAW)
    _remove_staged(folder, dataset)
    return reports


def _refuse_linked_subfolders(folder: Path) -> None:
    """MlecliError if raw/, partial/ or staged/ is there but not a folder of its own (a symbolic
    link to someone's folder, a file): a writer would write and delete through it."""
    for sub in (RAW, PARTIAL, STAGED):
        path = folder / sub
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode):
            raise MlecliError(
                f"{path} is a symbolic link: mlecli keeps only its own files in its cache and never writes or deletes "
                f"through a link; remove the link (rm {path}: the folder it points to is not touched) and run again"
            )
        if not stat.S_ISDIR(st.st_mode):
            raise MlecliError(f"{path} is not a folder: mlecli keeps its own files there; move it away and run again")


def _rename_in(src: Path, dest: Path) -> None:
    try:
        os.replace(src, dest)
    except OSError as exc:
        raise MlecliError(cannot_write(exc, dest)) from None


def _remove_staged(folder: Path, dataset: Dataset) -> None:
    """Remove staged/'s files: the dataset's own file names and temporaries, never through a link."""
    staged = folder / STAGED
    names = set(dataset.files.values())
    remove_own_files(staged, lambda name: name in names or is_temporary_name(name))
    with contextlib.suppress(OSError):
        staged.rmdir()  # only if empty; a symbolic link is not removed (ENOTDIR)


def _refusal(dataset: Dataset, folder: Path, how_to_fetch: str | None) -> str:
    url = dataset.mirrors[0] if dataset.mirrors else "its URL"
    how = how_to_fetch or "mlecli download --config CONFIG (a config whose [data] table names it)"
    return (
        f"{dataset.name} is not (completely) in the cache {folder}, and its URL {url} comes from a checkpoint or "
        f"run folder, from which mlecli never downloads by itself; if you trust that URL, fetch it with: {how}"
    )


# ---------------------------------------------------------------------------
# Leftovers


def _tidy(folder: Path, dataset: Dataset, *, everything: bool) -> None:
    """Remove what killed writers left: temporaries always; partial downloads that are not this
    dataset's, or are empty (or, with `everything`, all of them, and staged/: the cache is
    complete). Holds the lock."""
    for sub in (folder, folder / RAW, folder / PARTIAL, folder / STAGED):
        remove_stale_temporaries(sub)
    if everything:
        _remove_staged(folder, dataset)
    partial = folder / PARTIAL
    keep = set()
    if not everything:
        for name in dataset.files.values():
            for candidate in (name + ".gz", name):
                keep |= {candidate + ".part", meta_path(Path(candidate + ".part")).name}
    remove_own_files(partial, lambda name: _is_part_name(name) and name not in keep)
    _discard_empty_parts(partial)
    if everything:
        with contextlib.suppress(OSError):
            partial.rmdir()


def _is_part_name(name: str) -> bool:
    """Whether `name` is one a partial download or its meta file has: `<file>[.gz].part[.json]`."""
    return not name.startswith(".") and (name.endswith(".part") or name.endswith(".part.json"))


def _discard_empty_parts(partial: Path) -> None:
    """A part of 0 bytes is not worth resuming; nor is a meta file without its part (never through a link)."""
    fd = open_own_folder(partial)
    if fd is None:
        return
    try:
        names = set(os.listdir(fd))
        empty = set()
        for name in names:
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if name.endswith(".part") and stat.S_ISREG(st.st_mode) and st.st_size == 0:
                    empty.add(name)
        gone = empty | {n + ".json" for n in empty}
        gone |= {n for n in names if n.endswith(".part.json") and n.removesuffix(".json") not in names}
        for name in gone:
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    os.unlink(name, dir_fd=fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _leftovers(folder: Path) -> bool:
    """Whether a killed writer left anything in `folder` (cheap: three small listings)."""
    for sub in (folder, folder / RAW):
        try:
            if any(n.startswith(".") and n.endswith(".tmp") for n in os.listdir(sub)):
                return True
        except OSError:
            pass
    return (folder / PARTIAL).exists() or (folder / STAGED).exists()


def _clean_after_failure(folder: Path, lock, made: list[Path]) -> None:
    """What a failed call leaves: no empty part, no empty folder of the cache; and if it made
    the dataset folder, nothing of it unless a part worth resuming."""
    partial = folder / PARTIAL
    if partial.is_dir():
        _discard_empty_parts(partial)
    for sub in (RAW, PARTIAL, STAGED):
        with contextlib.suppress(OSError):
            (folder / sub).rmdir()
    with contextlib.suppress(OSError):
        if folder in made and all(p.name == ".lock" for p in folder.iterdir()):
            lock.discard()


def _tidy_if_free(folder: Path, dataset: Dataset) -> None:
    """Best effort, for readers: tidy a complete cache if nobody is writing to it and it is writable."""
    if not _leftovers(folder):
        return
    with contextlib.suppress(MlecliError, OSError), folder_lock(folder, wait=False, what=f"the data folder {folder}"):
        _tidy(folder, dataset, everything=True)


# ---------------------------------------------------------------------------
# The splits' arrays


def _load_npz(folder: Path, split: str, dataset: Dataset, record: dict[str, dict]) -> Split | Unusable:
    want = {role: _want(dataset, role, record) for role in npz_splits.roles(split)}
    return npz_splits.load(folder / f"{split}.npz", dataset, split, want)


def _raw_files_there(dataset: Dataset, folder: Path) -> bool:
    """Whether the four raw files are in the cache with the sizes they must have (cheap: no hashing)."""
    record = _read_record(folder, dataset)
    for role in ROLES:
        name = dataset.files[role]
        size = dataset.sizes.get(role) or record.get(name, {}).get("size")
        try:
            st = os.stat(folder / RAW / name)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or size is None or st.st_size != size:
            return False
    return True


def load_split(dataset: Dataset, data_dir: Path, split: str) -> Split | None:
    """Load a cached split without touching the network or writing, or None if it must be (re)built."""
    folder = dataset_dir(dataset, data_dir)
    loaded = _load_split(folder, split, dataset, _read_record(folder, dataset))
    return loaded if isinstance(loaded, Split) else None


def _load_both(dataset: Dataset, folder: Path) -> dict[str, Split | Unusable]:
    record = _read_record(folder, dataset)
    return {s: _load_split(folder, s, dataset, record) for s in SPLITS}


def _load_split(folder: Path, split: str, dataset: Dataset, record: dict) -> Split | Unusable:
    if _kept is None:
        return _load_npz(folder, split, dataset, record)
    key = _stamp(folder, split, dataset)
    if key is not None and key in _kept:
        return _kept[key]
    loaded = _load_npz(folder, split, dataset, record)
    if isinstance(loaded, Split) and key is not None:
        loaded.images.setflags(write=False)  # shared by every run of the process from now on
        loaded.labels.setflags(write=False)
        _kept[key] = loaded
    return loaded


_kept: dict[tuple, Split] | None = None  # splits kept loaded by `keep_loaded`, by _stamp


@contextlib.contextmanager
def keep_loaded() -> Iterator[None]:
    """Within the block, a split once loaded is handed out again without reading it, for
    as long as neither its .npz nor its raw files change (a sweep's worker process reads
    each dataset once for all of its runs). The kept arrays are shared, hence read-only."""
    global _kept
    outer, _kept = _kept, {}
    try:
        yield
    finally:
        _kept = outer


def _stamp(folder: Path, split: str, dataset: Dataset) -> tuple | None:
    """What a kept split depends on: the dataset's files and hashes, and the size,
    modification time and inode of the .npz and of the raw files behind it."""
    roles = npz_splits.roles(split)
    try:
        paths = [folder / f"{split}.npz", *(folder / RAW / dataset.files[r] for r in roles)]
        stats = tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in map(os.stat, paths))
        files = tuple((r, dataset.files[r], dataset.sha256.get(r)) for r in roles)
    except (OSError, KeyError):
        return None
    return str(folder.resolve()), split, dataset.name, files, stats


def ensure_splits(
    dataset: Dataset,
    data_dir: Path,
    *,
    download: str = DOWNLOAD_ANY,
    how_to_fetch: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda msg: None,
    policy: HttpPolicy = DEFAULT_POLICY,
) -> dict[str, Split]:
    """Both splits, from the cache when it is fresh and whole (read only: no lock, no write),
    else made complete first (a damaged split is rebuilt from the verified raw files).

    `download` says where missing data may come from:
    - "any": the dataset's own mirrors, including a config's `url` (a config the user wrote);
    - "builtin": for data named by a checkpoint or run folder. A built-in dataset may be
      fetched from its built-in mirrors only (its hashes are pinned; a `url` in the
      checkpoint's config is ignored); any other dataset only from the cache, else
      DataError saying to fetch it deliberately with `how_to_fetch`;
    - "never": only from the cache.
    """
    if download not in DOWNLOAD_POLICIES:
        raise ValueError(f"download={download!r}: allowed {DOWNLOAD_POLICIES}")
    builtin = is_builtin(dataset)
    if download == DOWNLOAD_BUILTIN and builtin:
        dataset = BUILTIN[dataset.name]
    folder = dataset_dir(dataset, data_dir)
    _check_path(folder, dataset)
    loaded = _load_both(dataset, folder)
    if not all(isinstance(v, Split) for v in loaded.values()):
        fetch = download == DOWNLOAD_ANY or (download == DOWNLOAD_BUILTIN and builtin)
        if not any(isinstance(v, Unusable) and v.damaged for v in loaded.values()):
            missing = [f"{s}.npz" for s, v in loaded.items() if not isinstance(v, Split)]
            if _raw_files_there(dataset, folder):
                log(f"{dataset.name}: {' and '.join(missing)} not in {folder}; building "
                    f"{'it' if len(missing) == 1 else 'them'} from the raw files cached there")
            elif fetch:
                log(f"{dataset.name} is not cached in {folder}; downloading it")
        ensure_dataset(dataset, data_dir, progress=progress, log=log, policy=policy, fetch=fetch,
                       how_to_fetch=how_to_fetch)
        loaded = _load_both(dataset, folder)
        unusable = [f"{folder / f'{s}.npz'}: {v.why}" for s, v in loaded.items() if isinstance(v, Unusable)]
        if unusable:
            raise DataError(f"could not load the splits of {dataset.name} ({'; '.join(unusable)})")
    else:
        _tidy_if_free(folder, dataset)
    splits: dict[str, Split] = loaded  # type: ignore[assignment]
    train, test = splits["train"].images.shape[1:], splits["test"].images.shape[1:]
    if train != test:
        raise DataError(
            f"{dataset.name} in {folder}: train images are {train[0]}x{train[1]} but test images are "
            f"{test[0]}x{test[1]}; the files do not belong together"
        )
    return splits
