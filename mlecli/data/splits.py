"""A dataset's splits as the cache holds them: `<split>.npz`, built from verified raw files,
and trusted only while it is exactly what was built.

A split's `.npz` holds uint8 images N x H x W, uint8 labels and a JSON `meta` naming the
sha256 of the raw files it was built from. Loading one checks, every time:
- that it was built from the raw files the caller wants (else it is stale);
- the zip's CRC-32 of every member, in the same pass that reads it (a byte changed
  anywhere, by a disk or by hand, makes it damaged: it is rebuilt, never used);
- shapes and types, and that labels are digits 0-9 where the dataset says so.
Loading both of Fashion-MNIST's splits this way takes about 14 ms (benchmarks/bench_data.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlecli.data.datasets import SPLITS, Dataset
from mlecli.data.idx import IdxHeader
from mlecli.safe import npz
from mlecli.safe.files import atomic_write
from mlecli.safe.resources import need_memory, need_space

FORMAT = 2
MAX_SIDE = 4096  # pixels per side of an image


@dataclass(frozen=True)
class Split:
    """One split of a dataset: images (N x H x W uint8), labels (N uint8), raw file hashes."""

    images: np.ndarray
    labels: np.ndarray
    sha256: dict[str, str]


@dataclass(frozen=True)
class Unusable:
    """Why a cached split cannot be used: missing, stale, or `damaged` (then `why` says how)."""

    why: str
    damaged: bool = False


MISSING = Unusable("missing")
STALE = Unusable("built from other files")


def roles(split: str) -> tuple[str, str]:
    return f"{split}-images", f"{split}-labels"


def build(path: Path, dataset: Dataset, split: str, raw: dict[str, tuple[Path, str]],
          headers: dict[str, IdxHeader]) -> None:
    """Write `path` from the split's two verified raw files (`raw`: role -> (path, sha256))."""
    arrays = {}
    for role in roles(split):
        h = headers[role]
        # Mapped, not read: the page cache holds the bytes, the process only streams them out.
        if h.count:
            arrays[role] = np.memmap(raw[role][0], dtype=np.uint8, mode="r", offset=h.header_len, shape=h.dims)
        else:
            arrays[role] = np.zeros(h.dims, np.uint8)
    sources = {role: {"file": raw[role][0].name, "sha256": raw[role][1]} for role in roles(split)}
    meta = json.dumps({"format": FORMAT, "dataset": dataset.name, "split": split, "sources": sources}, sort_keys=True)
    need = sum(a.nbytes for a in arrays.values()) + len(meta) + 4096
    need_space(path.parent, need, f"building {split}.npz of {dataset.name}")
    images, labels = (arrays[role] for role in roles(split))
    atomic_write(path, lambda f: npz.write(f, {"images": images, "labels": labels, "meta": np.array(meta)}))


def load(path: Path, dataset: Dataset, split: str, want: dict[str, str | None]) -> Split | Unusable:
    """The split at `path` if it was built from raw files hashing to `want` (role -> sha256)
    and is whole; else why not. NoRoom if its arrays do not fit in the memory available."""
    try:
        meta = json.loads(str(npz.read(path, check_crc=True, names=("meta",))["meta"][()]))
    except FileNotFoundError:
        return MISSING
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        return _damaged(exc)
    try:
        if meta.get("format") != FORMAT or meta.get("dataset") != dataset.name or meta.get("split") != split:
            return STALE
        sources = meta["sources"]
        for role in roles(split):
            src = sources[role]
            if src["file"] != dataset.files[role] or src["sha256"] != want.get(role):
                return STALE
        built_from = {role: sources[role]["sha256"] for role in roles(split)}
    except (KeyError, TypeError, AttributeError):
        return STALE
    try:
        sizes = npz.member_sizes(path)
        need_memory(sizes.get("images", 0) + sizes.get("labels", 0),
                    f"loading the {split} split of {dataset.name} ({path})", now=True)
        z = npz.read(path, check_crc=True, names=("images", "labels"))
        images, labels = z["images"], z["labels"]
    except (OSError, ValueError, KeyError) as exc:
        return _damaged(exc)
    if (images.dtype != np.uint8 or labels.dtype != np.uint8 or images.ndim != 3 or labels.ndim != 1
            or len(images) != len(labels) or not all(1 <= d <= MAX_SIDE for d in images.shape[1:])):
        return Unusable(f"its arrays are {images.dtype} {images.shape} and {labels.dtype} {labels.shape}, "
                        "not uint8 images N x H x W and N labels", damaged=True)
    if dataset.digits and labels.size and labels.max() > 9:
        i = int(np.argmax(labels > 9))
        return Unusable(f"label {int(labels[i])} at index {i} is not a digit 0-9", damaged=True)
    return Split(images, labels, built_from)


def _damaged(exc: BaseException) -> Unusable:
    if isinstance(exc, KeyError):
        return Unusable(f"it has no {exc} array", damaged=True)
    return Unusable(getattr(exc, "strerror", None) or str(exc), damaged=True)


def split_hashes(splits: dict[str, Split]) -> dict[str, str]:
    """The SHA-256 of the four raw files behind both splits, by role: what a run records."""
    return {role: digest for split in SPLITS for role, digest in splits[split].sha256.items()}
