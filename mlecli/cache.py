"""The local dataset cache: verified raw files, their content record, and the arrays built from them.

```
<data_dir>/<folder>/              `mnist`, `fashion-mnist`, or `<name>-<key>` for a custom dataset
    raw/<file>                    verified decompressed IDX files, under the dataset's own file names only
    record.json                   the content record: what the folder is keyed by, and per file
                                  its sha256, size and where it came from
    train.npz, test.npz           uint8 images N x H x W, uint8 labels, and `meta` naming the
                                  sha256 of the raw files they were built from
    partial/<file>[.gz].part      downloads in progress (+ `.part.json`: URL and validators to resume)
    .lock                         writers queue on it; reading never needs it
```

Where the data came from decides the folder: a built-in dataset is its name (its files
are pinned by hash: any mirror gives the same bytes); a custom dataset with all four
hashes pinned is keyed by those hashes; any other custom dataset by its URL and file
names, so that pointing a config at another URL never finds the old files.

Freshness is decided by content records, never by modification times: a split's .npz
is fresh when the hashes it was built from are the pinned hashes (or, for an unpinned
file, the hashes in record.json, written when the file was verified). A complete cache
therefore loads from a read-only copy (`cp -r` included) without writing anything.
Every write is an atomic rename made under the lock; leftovers of a killed writer
(temporaries, partial downloads) are removed by the next writer, or by the next reader
that finds the lock free.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlecli import npz
from mlecli.datasets import BUILTIN, ROLES, SPLITS, Dataset, is_builtin
from mlecli.download import Expected, fetch_file, hash_file, meta_path, mirror_location
from mlecli.errors import DataError, MlecliError
from mlecli.fsutil import atomic_write, atomic_write_text, folder_lock, remove_stale_temporaries
from mlecli.idx import MAX_HEADER, IdxHeader, read_header
from mlecli.network import DEFAULT_POLICY, HttpPolicy, new_session
from mlecli.resources import need_memory, need_space

CACHE_FORMAT = 2
RECORD = "record.json"
RAW = "raw"
PARTIAL = "partial"
MAX_SIDE = 4096  # pixels per side of an image
# Memory that training needs per image, beyond its pixels twice (the split, and the task's
# copy of the images it chose): indices, labels and targets.
BYTES_PER_IMAGE = 48

# What prepare() may download when a dataset is not cached (see prepare).
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


@dataclass(frozen=True)
class Split:
    """One split of a dataset: images (N x H x W uint8), labels (N uint8), raw file hashes."""

    images: np.ndarray
    labels: np.ndarray
    sha256: dict[str, str]


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
    """The verified files' records by file name; empty unless the record is this dataset's."""
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(record, dict) or record.get("format") != CACHE_FORMAT or record.get("key") != source_key(dataset):
        return {}
    files = record.get("files")
    if not isinstance(files, dict):
        return {}
    return {
        name: entry for name, entry in files.items()
        if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("size"), int)
    }


def _write_record(folder: Path, dataset: Dataset, files: dict[str, dict]) -> None:
    record = {"format": CACHE_FORMAT, "dataset": dataset.name, "key": source_key(dataset), "files": files}
    atomic_write_text(folder / RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")


def _want(dataset: Dataset, role: str, record: dict[str, dict]) -> str | None:
    """The sha256 a role's file must have: pinned, else as recorded when it was verified."""
    pinned = dataset.sha256.get(role)
    if pinned is not None:
        return pinned
    return (record.get(dataset.files[role]) or {}).get("sha256")


# ---------------------------------------------------------------------------
# What a file must be


def _expected(dataset: Dataset, role: str, folder: Path, record: dict[str, dict]) -> Expected:
    def on_header(header: IdxHeader, source: str, body_left: int) -> None:
        check_header(dataset, role, header, source)
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
        # Recorded before the file is renamed in: a crash in between leaves a record the file
        # does not match yet (so it is fetched again), never a file the record does not know.
        record[dataset.files[role]] = {"sha256": sha256, "size": size, "source": source}
        _write_record(folder, dataset, record)

    return Expected(
        name=dataset.files[role],
        sha256=dataset.sha256.get(role),
        size=dataset.sizes.get(role),
        on_header=on_header,
        on_data=on_data,
        on_verified=on_verified,
    )


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


def training_memory(images: IdxHeader) -> int:
    """Bytes a split of these images takes in memory while training: its pixels twice, and a little per image."""
    return 2 * images.data_len + BYTES_PER_IMAGE * images.dims[0]


def _read_header_of(path: Path) -> IdxHeader:
    try:
        with open(path, "rb") as f:
            head = f.read(MAX_HEADER)
    except OSError as exc:
        raise MlecliError(f"cannot read {path}: {exc.strerror or exc}") from None
    header = read_header(head, str(path), final=True)
    assert header is not None
    return header


def _check_together(dataset: Dataset, paths: dict[str, Path]) -> dict[str, IdxHeader]:
    """The four files' headers, once they are known to belong together."""
    headers = {role: _read_header_of(paths[role]) for role in ROLES}
    for role, header in headers.items():
        check_header(dataset, role, header, str(paths[role]))
    for split in SPLITS:
        n_img, n_lab = headers[f"{split}-images"].dims[0], headers[f"{split}-labels"].dims[0]
        if n_img != n_lab:
            raise DataError(
                f"{dataset.name} {split}: {n_img} images but {n_lab} labels "
                f"({paths[f'{split}-images']}, {paths[f'{split}-labels']}); the files do not belong together"
            )
    train, test = headers["train-images"].dims[1:], headers["test-images"].dims[1:]
    if train != test:
        raise DataError(
            f"{dataset.name}: train images are {train[0]}x{train[1]} but test images are {test[0]}x{test[1]} "
            f"({paths['train-images']}, {paths['test-images']}); the files do not belong together"
        )
    return headers


# ---------------------------------------------------------------------------
# Making the cache complete


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

    A complete cache (every raw file hashing to what it must, both splits fresh) is only
    read: no lock, no write, no network. Otherwise, under the dataset folder's lock (so
    that concurrent downloads queue up), whatever is missing or wrong is fetched (unless
    `fetch` is False: then DataError says to run `how_to_fetch`) and the splits are
    rebuilt. `force` fetches every file again (the cached copy stays until a verified
    replacement is renamed over it). Mirrors in `mirrors` are tried before the
    dataset's own.
    """
    folder = dataset_dir(dataset, data_dir)
    if not force:
        reports = _complete(dataset, folder)
        if reports is not None:
            _tidy_if_free(folder, dataset)
            _warn_unverified(dataset, reports, log)
            return reports
    all_mirrors = list(dict.fromkeys([*mirrors, *dataset.mirrors]))
    sessions = []  # one HTTP session for every file, opened only if a file is fetched over HTTP

    def shared_session():
        if not sessions:
            sessions.append((session_factory or new_session)())
        return sessions[0]

    made = [p for p in (Path(data_dir), folder) if not p.exists()]  # what a failure should not leave behind
    try:
        with folder_lock(folder, wait=True, what=f"the data folder {folder}") as lock:
            try:
                reports = _ensure_locked(dataset, folder, all_mirrors, force, policy, progress, log, shared_session,
                                         fetch, how_to_fetch)
            except BaseException:
                if folder in made:
                    _remove_if_unused(folder, lock)
                raise
    except BaseException:
        if Path(data_dir) in made:
            with contextlib.suppress(OSError):
                Path(data_dir).rmdir()  # only if the failure left it empty
        raise
    finally:
        for s in sessions:
            s.close()
    _warn_unverified(dataset, reports, log)
    return reports


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
    if any(_load_npz(folder, split, dataset, record) is None for split in SPLITS):
        return None
    return reports


def _ensure_locked(dataset, folder, all_mirrors, force, policy, progress, log, session_factory, fetch,
                   how_to_fetch) -> list[FileReport]:
    raw, partial = folder / RAW, folder / PARTIAL
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MlecliError(f"cannot create {raw}: {exc.strerror}; choose another --data-dir") from None
    _tidy(folder, dataset, everything=False)
    record = _read_record(folder, dataset)
    reports = []
    for role in ROLES:
        expected = _expected(dataset, role, folder, record)
        path = raw / expected.name
        want = _want(dataset, role, record)
        got = None if force or want is None else hash_file(path)
        if got is not None and got[0] == want and expected.size in (None, got[1]):
            digest, size, source = got[0], got[1], "cache"
        else:
            if not fetch:
                raise DataError(_refusal(dataset, folder, how_to_fetch))
            extra = {} if is_builtin(dataset) else {
                "advice": f"Check the network, and the url of the {dataset.name} dataset in its config's [data] table"
            }
            digest, source = fetch_file(
                all_mirrors, expected, path, partial,
                session_factory=session_factory, policy=policy, progress=progress, log=log, **extra,
            )
            size = record[expected.name]["size"]
        reports.append(FileReport(role, path, size, digest, verified=role in dataset.sha256, source=source))
    headers = _check_together(dataset, {r.role: r.path for r in reports})
    for split in SPLITS:
        if _load_npz(folder, split, dataset, record) is None:
            _build_npz(dataset, folder, split, {r.role: r for r in reports}, headers)
    _tidy(folder, dataset, everything=True)
    return reports


def _refusal(dataset: Dataset, folder: Path, how_to_fetch: str | None) -> str:
    url = dataset.mirrors[0] if dataset.mirrors else "its URL"
    how = how_to_fetch or "mlecli download --config CONFIG (a config whose [data] table names it)"
    return (
        f"{dataset.name} is not (completely) in the cache {folder}, and its URL {url} comes from a checkpoint or "
        f"run folder, from which mlecli never downloads by itself; if you trust that URL, fetch it with: {how}"
    )


def _tidy(folder: Path, dataset: Dataset, *, everything: bool) -> None:
    """Remove what killed writers left: temporaries always; partial downloads that are not this
    dataset's (or, with `everything`, all of them: the cache is complete). Holds the lock."""
    for sub in (folder, folder / RAW, folder / PARTIAL):
        remove_stale_temporaries(sub)
    partial = folder / PARTIAL
    if not partial.is_dir():
        return
    keep = set()
    if not everything:
        for name in dataset.files.values():
            for candidate in (name + ".gz", name):
                keep |= {candidate + ".part", meta_path(Path(candidate + ".part")).name}
    for p in partial.iterdir():
        if p.name not in keep:
            with contextlib.suppress(OSError):
                p.unlink()
    if everything:
        with contextlib.suppress(OSError):
            partial.rmdir()


def _leftovers(folder: Path) -> bool:
    """Whether a killed writer left anything in `folder` (cheap: three small listings)."""
    for sub in (folder, folder / RAW):
        try:
            if any(n.startswith(".") and n.endswith(".tmp") for n in os.listdir(sub)):
                return True
        except OSError:
            pass
    return (folder / PARTIAL).exists()


def _remove_if_unused(folder: Path, lock) -> None:
    """Remove a dataset folder this call made, if a failure left no file of the dataset in it
    (its empty raw/ and partial/ folders go too; partial downloads worth resuming stay)."""
    for sub in (RAW, PARTIAL):
        with contextlib.suppress(OSError):
            (folder / sub).rmdir()
    if all(p.name == ".lock" for p in folder.iterdir()):
        lock.discard()


def _tidy_if_free(folder: Path, dataset: Dataset) -> None:
    """Best effort, for readers: tidy a complete cache if nobody is writing to it and it is writable."""
    if not _leftovers(folder):
        return
    with contextlib.suppress(MlecliError, OSError), folder_lock(folder, wait=False, what=f"the data folder {folder}"):
        _tidy(folder, dataset, everything=True)


# ---------------------------------------------------------------------------
# The splits' arrays


def _build_npz(dataset: Dataset, folder: Path, split: str, reports: dict[str, FileReport],
               headers: dict[str, IdxHeader]) -> None:
    roles = (f"{split}-images", f"{split}-labels")
    arrays = {}
    for role in roles:
        h = headers[role]
        # Mapped, not read: the page cache holds the bytes, the process only streams them out.
        if h.count:
            arrays[role] = np.memmap(reports[role].path, dtype=np.uint8, mode="r", offset=h.header_len, shape=h.dims)
        else:
            arrays[role] = np.zeros(h.dims, np.uint8)
    sources = {role: {"file": reports[role].path.name, "sha256": reports[role].sha256} for role in roles}
    meta = json.dumps({"format": CACHE_FORMAT, "dataset": dataset.name, "split": split, "sources": sources},
                      sort_keys=True)
    need = sum(a.nbytes for a in arrays.values()) + len(meta) + 4096
    need_space(folder, need, f"building {split}.npz of {dataset.name}")
    images, labels = arrays[roles[0]], arrays[roles[1]]
    atomic_write(folder / f"{split}.npz",
                 lambda f: npz.write(f, {"images": images, "labels": labels, "meta": np.array(meta)}))


def _load_npz(folder: Path, split: str, dataset: Dataset, record: dict[str, dict]) -> Split | None:
    """The cached split, or None if it is missing, stale (built from other content) or damaged."""
    path = folder / f"{split}.npz"
    roles = (f"{split}-images", f"{split}-labels")
    try:
        # The cache is our own, written whole by atomic rename from verified raw files:
        # skipping the CRC (most of np.load's time on 55 MB) is safe here.
        meta = json.loads(str(npz.read(path, check_crc=False, names=("meta",))["meta"][()]))
        if meta.get("format") != CACHE_FORMAT or meta.get("dataset") != dataset.name or meta.get("split") != split:
            return None
        sources = meta["sources"]
        for role in roles:
            src = sources[role]
            if src["file"] != dataset.files[role] or src["sha256"] != _want(dataset, role, record):
                return None
        sizes = npz.member_sizes(path)
        need_memory(sizes.get("images", 0) + sizes.get("labels", 0),
                    f"loading the {split} split of {dataset.name} ({path})", now=True)
        z = npz.read(path, check_crc=False, names=("images", "labels"))  # only once it is known fresh
        images, labels = z["images"], z["labels"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        # Missing, stale or corrupt: the caller rebuilds it from the verified raw files.
        return None
    if (images.dtype != np.uint8 or labels.dtype != np.uint8 or images.ndim != 3 or labels.ndim != 1
            or len(images) != len(labels) or not all(1 <= d <= MAX_SIDE for d in images.shape[1:])):
        return None
    return Split(images, labels, {role: sources[role]["sha256"] for role in roles})


def split_hashes(splits: dict[str, Split]) -> dict[str, str]:
    """The SHA-256 of the four raw files behind both splits, by role: what a run records."""
    return {role: digest for split in SPLITS for role, digest in splits[split].sha256.items()}


def load_split(dataset: Dataset, data_dir: Path, split: str) -> Split | None:
    """Load a cached split without touching the network or writing, or None if it must be (re)built."""
    folder = dataset_dir(dataset, data_dir)
    return _load_split(folder, split, dataset, _read_record(folder, dataset))


def _load_both(dataset: Dataset, folder: Path) -> dict[str, Split] | None:
    record = _read_record(folder, dataset)
    splits = {s: _load_split(folder, s, dataset, record) for s in SPLITS}
    return None if any(v is None for v in splits.values()) else splits  # type: ignore[return-value]


def _load_split(folder: Path, split: str, dataset: Dataset, record: dict) -> Split | None:
    if _kept is None:
        return _load_npz(folder, split, dataset, record)
    key = _stamp(folder, split, dataset)
    if key is not None and key in _kept:
        return _kept[key]
    loaded = _load_npz(folder, split, dataset, record)
    if loaded is not None and key is not None:
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
    roles = (f"{split}-images", f"{split}-labels")
    try:
        paths = [folder / f"{split}.npz", *(folder / RAW / dataset.files[r] for r in roles)]
        stats = tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in map(os.stat, paths))
        files = tuple((r, dataset.files[r], dataset.sha256.get(r)) for r in roles)
    except (OSError, KeyError):
        return None
    return str(folder.resolve()), split, dataset.name, files, stats


def prepare(
    dataset: Dataset,
    data_dir: Path,
    *,
    download: str = DOWNLOAD_ANY,
    how_to_fetch: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda msg: None,
    policy: HttpPolicy = DEFAULT_POLICY,
) -> dict[str, Split]:
    """Both splits, from the cache when it is fresh (read only: no lock, no write), else made complete first.

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
    splits = _load_both(dataset, folder)
    if splits is None:
        fetch = download == DOWNLOAD_ANY or (download == DOWNLOAD_BUILTIN and builtin)
        if fetch:
            log(f"{dataset.name} is not cached in {folder}; downloading it")
        ensure_dataset(dataset, data_dir, progress=progress, log=log, policy=policy, fetch=fetch,
                       how_to_fetch=how_to_fetch)
        splits = _load_both(dataset, folder)
        if splits is None:
            raise DataError(f"could not load the splits of {dataset.name} from {folder}")
    else:
        _tidy_if_free(folder, dataset)
    train, test = splits["train"].images.shape[1:], splits["test"].images.shape[1:]
    if train != test:
        raise DataError(
            f"{dataset.name} in {folder}: train images are {train[0]}x{train[1]} but test images are "
            f"{test[0]}x{test[1]}; the files do not belong together"
        )
    return splits
