"""The local dataset cache: verified raw files, and the arrays built from them.

```
<data_dir>/<dataset>/raw/<file>       verified decompressed IDX files (sha256sum-checkable)
<data_dir>/<dataset>/raw/hashes.json  what each cached file hashed to, where it came from
<data_dir>/<dataset>/train.npz        uint8 images N x H x W, uint8 labels, the raw files' hashes
<data_dir>/<dataset>/test.npz
```

The .npz files are built once from the raw files and rebuilt when a raw file changes
(its size or modification time differs from what the .npz recorded), so loading a
split is one read of an uncompressed array file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlecli import npz
from mlecli.datasets import ROLES, SPLITS, Dataset
from mlecli.download import DEFAULT_POLICY, Expected, HttpPolicy, MirrorFailed, fetch_from_mirrors, verify_content
from mlecli.errors import DataError, MlecliError
from mlecli.fsutil import atomic_write, atomic_write_bytes, atomic_write_text, folder_lock
from mlecli.idx import parse_idx

CACHE_FORMAT = 1


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


def dataset_dir(dataset: Dataset, data_dir: Path) -> Path:
    return Path(data_dir) / dataset.name


def _check_content(dataset: Dataset, role: str) -> Callable[[bytes, str], None]:
    def check(content: bytes, source: str) -> None:
        check_array(dataset, role, parse_idx(content, source), source)

    return check


def check_array(dataset: Dataset, role: str, arr: np.ndarray, source: str) -> None:
    """Raise DataError unless `arr` is usable as the dataset's `role` file."""
    if role.endswith("images"):
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[1] == 0 or arr.shape[2] == 0:
            raise DataError(f"{source}: images must be uint8 N x H x W, got {arr.dtype} of shape {arr.shape}")
    else:
        if arr.dtype != np.uint8 or arr.ndim != 1:
            raise DataError(f"{source}: labels must be a uint8 vector, got {arr.dtype} of shape {arr.shape}")
        if dataset.digits and arr.size and int(arr.max()) > 9:
            bad = int(np.flatnonzero(arr > 9)[0])
            raise DataError(f"{source}: label {int(arr[bad])} at index {bad} is not a digit 0-9")


def _expected(dataset: Dataset, role: str) -> Expected:
    return Expected(
        name=dataset.files[role],
        sha256=dataset.sha256.get(role),
        size=dataset.sizes.get(role),
        check=_check_content(dataset, role),
    )


def _read_record(raw: Path) -> dict:
    try:
        record = json.loads((raw / "hashes.json").read_text())
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _cached_ok(path: Path, expected: Expected, recorded: dict | None) -> str | None:
    """Return the sha256 of a cached raw file if it is still what was verified, else None."""
    try:
        content = path.read_bytes()
    except OSError:
        return None
    want = expected.sha256 or (recorded or {}).get("sha256")
    if want is None:
        return None
    try:
        return verify_content(content, Expected(expected.name, want, expected.size, expected.check), str(path))
    except MirrorFailed:
        return None


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
) -> list[FileReport]:
    """Make the four raw files and both .npz splits present and verified.

    A file already cached and verified costs no network; `force` fetches every file
    again (the cached copy stays until a verified replacement is renamed over it).
    Mirrors in `mirrors` are tried before the dataset's own. Holds the dataset
    folder's lock so that concurrent downloads into one data dir queue up.
    """
    folder = dataset_dir(dataset, data_dir)
    all_mirrors = list(dict.fromkeys([*mirrors, *dataset.mirrors]))
    sessions = []  # one HTTP session for every file, opened only if a file is fetched over HTTP

    def shared_session():
        if not sessions:
            sessions.append((session_factory or _session)())
        return sessions[0]

    try:
        return _ensure_files(dataset, folder, all_mirrors, force, policy, progress, log, shared_session)
    finally:
        for s in sessions:
            s.close()


def _ensure_files(dataset, folder, all_mirrors, force, policy, progress, log, session_factory) -> list[FileReport]:
    raw = folder / "raw"
    reports = []
    with folder_lock(folder, wait=True, what=f"the data folder {folder}"):
        try:
            raw.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MlecliError(f"cannot create {raw}: {exc.strerror}; choose another --data-dir") from None
        record = _read_record(raw)
        for role in ROLES:
            expected = _expected(dataset, role)
            path = raw / expected.name
            digest = None if force else _cached_ok(path, expected, record.get(expected.name))
            if digest is not None:
                source = "cache"
            else:
                content, source = fetch_from_mirrors(
                    all_mirrors,
                    expected,
                    raw,
                    session_factory=session_factory,
                    policy=policy,
                    progress=progress,
                    log=log,
                )
                digest = hashlib.sha256(content).hexdigest()
                atomic_write_bytes(path, content)
                record[expected.name] = {"sha256": digest, "size": len(content), "source": source}
                atomic_write_text(raw / "hashes.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
            if not dataset.sha256.get(role):
                log(
                    f"warning: {expected.name} of {dataset.name} is unverified (no sha256 in the config); "
                    f"it hashed to {digest}: add it to [data] sha256 to pin it"
                )
            reports.append(
                FileReport(role, path, path.stat().st_size, digest, verified=role in dataset.sha256, source=source)
            )
        for split in SPLITS:
            if _load_npz(folder, split, dataset) is None:
                _build_npz(dataset, folder, split, {r.role: r for r in reports})
    return reports


def _session():
    import requests

    from mlecli import __version__

    s = requests.Session()
    s.headers["User-Agent"] = f"mlecli/{__version__} (+https://pypi.org/project/requests/)"
    return s


def _raw_stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _build_npz(dataset: Dataset, folder: Path, split: str, reports: dict[str, FileReport]) -> None:
    img_role, lab_role = f"{split}-images", f"{split}-labels"
    arrays = {}
    for role in (img_role, lab_role):
        path = reports[role].path
        arr = parse_idx(path.read_bytes(), str(path))
        check_array(dataset, role, arr, str(path))
        arrays[role] = arr
    images, labels = arrays[img_role], arrays[lab_role]
    if len(images) != len(labels):
        raise DataError(
            f"{dataset.name} {split}: {len(images)} images but {len(labels)} labels "
            f"({reports[img_role].path}, {reports[lab_role].path}); the files do not belong together"
        )
    sources = {
        role: {"file": reports[role].path.name, "sha256": reports[role].sha256, "stat": _raw_stat(reports[role].path)}
        for role in (img_role, lab_role)
    }
    meta = json.dumps({"format": CACHE_FORMAT, "dataset": dataset.name, "split": split, "sources": sources})

    def write(f):
        np.savez(f, images=images, labels=labels, meta=np.array(meta))

    atomic_write(folder / f"{split}.npz", write)


def _load_npz(folder: Path, split: str, dataset: Dataset) -> Split | None:
    """The cached split, or None if it is missing or stale (a raw file changed)."""
    path = folder / f"{split}.npz"
    try:
        # The cache is our own, written whole by atomic rename from verified raw files:
        # skipping the CRC (most of np.load's time on 55 MB) is safe here.
        meta = json.loads(str(npz.read(path, check_crc=False, names=("meta",))["meta"][()]))
        sources = meta["sources"]
        for role in (f"{split}-images", f"{split}-labels"):
            src = sources[role]
            if src["file"] != dataset.files[role]:
                return None
            if _raw_stat(folder / "raw" / src["file"]) != src["stat"]:
                return None
            known = dataset.sha256.get(role)
            if known is not None and src["sha256"] != known:
                return None
        z = npz.read(path, check_crc=False, names=("images", "labels"))  # only once it is known fresh
        images, labels = z["images"], z["labels"]
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        # Missing, stale or corrupt: the caller rebuilds it from the verified raw files.
        return None
    if images.dtype != np.uint8 or labels.dtype != np.uint8 or len(images) != len(labels):
        return None
    return Split(images, labels, {role: s["sha256"] for role, s in sources.items()})


def load_split(dataset: Dataset, data_dir: Path, split: str) -> Split | None:
    """Load a cached split without touching the network, or None if it must be (re)built."""
    folder = dataset_dir(dataset, data_dir)
    if _kept is None:
        return _load_npz(folder, split, dataset)
    key = _stamp(folder, split, dataset)
    if key is not None and key in _kept:
        return _kept[key]
    loaded = _load_npz(folder, split, dataset)
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
        paths = [folder / f"{split}.npz", *(folder / "raw" / dataset.files[r] for r in roles)]
        stats = tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in map(os.stat, paths))
        files = tuple((r, dataset.files[r], dataset.sha256.get(r)) for r in roles)
    except (OSError, KeyError):
        return None
    return str(folder.resolve()), split, dataset.name, files, stats


def prepare(
    dataset: Dataset,
    data_dir: Path,
    *,
    progress: bool = False,
    log: Callable[[str], None] = lambda msg: None,
    policy: HttpPolicy = DEFAULT_POLICY,
) -> dict[str, Split]:
    """Both splits, from the cache when it is fresh, else downloading what is missing first."""
    splits = {s: load_split(dataset, data_dir, s) for s in SPLITS}
    if any(v is None for v in splits.values()):
        log(f"{dataset.name} is not cached in {dataset_dir(dataset, data_dir)}; downloading it")
        ensure_dataset(dataset, data_dir, progress=progress, log=log, policy=policy)
        splits = {s: load_split(dataset, data_dir, s) for s in SPLITS}
    missing = [s for s, v in splits.items() if v is None]
    if missing:
        raise DataError(f"could not load the {', '.join(missing)} split of {dataset.name} from {data_dir}")
    return splits  # type: ignore[return-value]
