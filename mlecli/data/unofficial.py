"""A local mirror that holds IDX files in MNIST's format that are not a built-in dataset's
official ones (10,000 of MNIST's training digits, a set of your own): what to say when
`mlecli download --mirror FOLDER` then fails, instead of "check the network".

Such files cannot stand in for MNIST (they are refused by its pinned hashes, rightly), but
they are a dataset: `advice` says so in one line, with the ready-to-paste command that trains
on them as a custom IDX dataset pinned by their own hashes.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path

from mlecli.data.datasets import BUILTIN, NAME_RE, ROLES, Dataset, is_builtin
from mlecli.data.download import mirror_location
from mlecli.data.idx import IdxDecoder, IdxHeader
from mlecli.safe.errors import DataError, MlecliError
from mlecli.safe.files import read_pieces

TITLES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}  # as their makers write them
MAX_READ = 1 << 30  # bytes of one file as stored: MNIST's largest, gzipped or not, is 47 MB


def advice(dataset: Dataset, mirrors: tuple[str, ...], data_dir: str | None = None) -> str | None:
    """One line for a built-in `dataset` that no mirror gave, when a local `mirrors` folder
    holds all four of its files as IDX files of another set; None otherwise (the download's
    own error says it best). `data_dir` (as typed) goes into the command, if given."""
    if not is_builtin(dataset):
        return None
    for mirror in mirrors:
        try:
            kind, where = mirror_location(mirror)
        except MlecliError:
            continue
        if kind != "local":
            continue
        found = _set_in(Path(where), dataset)
        if found is None:
            continue
        hashes, headers = found
        if hashes == dataset.sha256 or _known(hashes):
            continue  # the official files after all, or another built-in set's: the download says which
        return _said(dataset, mirror, Path(where), hashes, headers, data_dir)
    return None


def _set_in(folder: Path, dataset: Dataset) -> tuple[dict[str, str], dict[str, IdxHeader]] | None:
    """The sha256 and header of each of the four files in `folder` (`<file>.gz` or `<file>`),
    decompressed, if all four are IDX files of images and labels that belong together."""
    hashes, headers = {}, {}
    for role in ROLES:
        for name in (dataset.files[role] + ".gz", dataset.files[role]):
            try:
                hashes[role], headers[role] = _content(folder / name)
                break
            except (OSError, DataError):
                continue
        else:
            return None
    for split in ("train", "test"):
        images, labels = headers[f"{split}-images"], headers[f"{split}-labels"]
        if len(images.dims) != 3 or len(labels.dims) != 1 or images.dims[0] != labels.dims[0]:
            return None
    return hashes, headers


def _content(path: Path) -> tuple[str, IdxHeader]:
    """The sha256 of a file's decompressed IDX content, and its header (DataError if it is none)."""
    decoder = IdxDecoder(str(path))
    digest = hashlib.sha256()
    for piece in read_pieces(path, MAX_READ, refuse_empty=True):
        for out in decoder.feed(piece):
            digest.update(out)
    for out in decoder.finish():
        digest.update(out)
    assert decoder.header is not None  # finish() raises without one
    return digest.hexdigest(), decoder.header


def _known(hashes: dict[str, str]) -> bool:
    """Whether any file is one of a built-in dataset's."""
    official = {h for d in BUILTIN.values() for h in d.sha256.values()}
    return any(h in official for h in hashes.values())


def _said(dataset: Dataset, mirror: str, folder: Path, hashes: dict[str, str], headers: dict[str, IdxHeader],
          data_dir: str | None) -> str:
    role = next(r for r in ROLES if hashes[r] != dataset.sha256[r])
    name, h, title = dataset.files[role], headers[role], TITLES[dataset.name]
    if h.total_len != dataset.sizes[role]:
        what = f"{name} holds {_count(role, h.dims)}, {title}'s {_count(role, _official_dims(dataset, role))}"
    else:
        what = f"{name} has other bytes than {title}'s"
    # the folder in full: the run's config names it, wherever the run is used from later
    words = ["mlecli", "train", "--set", f"data.dataset={_name_for(folder)}", "--set", f"data.url={folder.absolute()}",
             "--set", "data.sha256={" + ", ".join(f'{r} = "{hashes[r]}"' for r in ROLES) + "}"]
    if data_dir is not None:
        words += ["--data-dir", data_dir]
    return (f"--mirror {mirror} holds IDX files in {title}'s format that are not its official ones ({what}), and "
            f"{title}'s own mirrors could not be reached; to train on them as a dataset of your own: "
            f"{shlex.join(words)}")


def _official_dims(dataset: Dataset, role: str) -> tuple[int, ...]:
    """A built-in dataset's file's dimensions, from its size (its images are 28×28, as both are)."""
    size = dataset.sizes[role]
    return ((size - 16) // 784, 28, 28) if role.endswith("images") else (size - 8,)


def _count(role: str, dims: tuple[int, ...]) -> str:
    if role.endswith("images"):
        return f"{dims[0]:,} images of {dims[1]}x{dims[2]}"
    return f"{dims[0]:,} labels"


def _name_for(folder: Path) -> str:
    """A custom dataset's name from a folder's: lower-case, other characters as '-'."""
    name = re.sub(r"[^a-z0-9._-]+", "-", folder.resolve().name.lower()).strip("-._")[:64]
    return name if NAME_RE.match(name) and name not in BUILTIN else "my-digits"
