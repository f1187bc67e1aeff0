"""The dataset registry: what a dataset is, and the two built in.

A dataset is a name, four files (train/test images/labels), an ordered list of mirror
base URLs, and the SHA-256 and size of each file's DECOMPRESSED content. Verifying the
decompressed bytes accepts honest mirrors that re-compress the same data and still
rejects any change to the data. What each label means is the dataset's too (`classes`):
the digits themselves, Fashion-MNIST's names, or the class folders of an imported dataset
(mlecli/data/imported.py registers those: they have no mirror, their files are only in the
data folder).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mlecli.safe.errors import ConfigError

ROLES = ("train-images", "train-labels", "test-images", "test-labels")
SPLITS = ("train", "test")
MNIST_FILES = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "test-images": "t10k-images-idx3-ubyte",
    "test-labels": "t10k-labels-idx1-ubyte",
}
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# A cached file's name: never a path, never hidden (the cache's temporaries start with '.').
FILE_RE = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,199}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DIGITS = tuple(str(d) for d in range(10))  # what MNIST's labels mean: label d is the digit d


@dataclass(frozen=True)
class Dataset:
    """Where a dataset comes from and what its files must hash to.

    `files` maps each role to a file name (without .gz: mirrors are asked for
    `<name>.gz` first, then `<name>`); `sha256` and `sizes` map roles to the expected
    decompressed content, or are empty for an unverified custom dataset.
    `digits` says labels must be 0-9. `classes[i]` names label i (DIGITS: label d is the
    digit d). `imported` is, for a dataset made by `mlecli import`, the command that made it:
    its files are in the data folder only, and nothing is ever downloaded for it.
    """

    name: str
    mirrors: tuple[str, ...]
    files: dict[str, str]
    sha256: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    digits: bool = True
    classes: tuple[str, ...] = DIGITS
    imported: str | None = None

    @property
    def verified(self) -> bool:
        return all(role in self.sha256 for role in ROLES)


MNIST = Dataset(
    name="mnist",
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    files=dict(MNIST_FILES),
    sha256={
        "train-images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "test-images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "test-labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    sizes={"train-images": 47040016, "train-labels": 60008, "test-images": 7840016, "test-labels": 10008},
)

FASHION_MNIST = Dataset(
    name="fashion-mnist",
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
    ),
    files=dict(MNIST_FILES),
    sha256={
        "train-images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "test-images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "test-labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    sizes={"train-images": 47040016, "train-labels": 60008, "test-images": 7840016, "test-labels": 10008},
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
)

BUILTIN: dict[str, Dataset] = {d.name: d for d in (MNIST, FASHION_MNIST)}


def is_builtin(dataset: Dataset) -> bool:
    """A built-in dataset (whatever mirrors were added): its name and pinned hashes are MNIST's or Fashion-MNIST's."""
    known = BUILTIN.get(dataset.name)
    return known is not None and dataset.sha256 == known.sha256 and dataset.files == known.files


def builtin(name: str) -> Dataset:
    try:
        return BUILTIN[name]
    except KeyError:
        raise ConfigError(
            f"unknown dataset {name!r}: built in are {', '.join(BUILTIN)}; "
            "a custom IDX dataset needs a config with [data] url"
        ) from None


def custom(
    name: str,
    url: str,
    files: dict[str, str] | None = None,
    sha256: dict[str, str] | None = None,
    *,
    where: str = "data",
) -> Dataset:
    """A dataset defined in a config's [data] table; `where` names it in errors."""
    if not NAME_RE.match(name):
        raise ConfigError(f"{where}.dataset = {name!r}: must be a name of lower-case letters, digits, '.', '_', '-'")
    if name in BUILTIN:
        raise ConfigError(f"{where}.dataset = {name!r} is built in; give your own dataset another name")
    files = dict(files or {})
    for role, fname in files.items():
        if role not in ROLES:
            raise ConfigError(f"{where}.files: unknown file {role!r} (allowed: {', '.join(ROLES)})")
        if not FILE_RE.match(fname) or not _strip_gz(fname):
            raise ConfigError(
                f"{where}.files.{role} = {fname!r}: must be a plain file name of at most 200 letters, digits, "
                "'.', '_', '-' or '+', not starting with '.'"
            )
    resolved = {role: _strip_gz(files.get(role, MNIST_FILES[role])) for role in ROLES}
    same = [role for role in ROLES if list(resolved.values()).count(resolved[role]) > 1]
    if same:
        raise ConfigError(
            f"{where}.files: {' and '.join(same)} are both {resolved[same[0]]!r} (with or without .gz); "
            "each file needs a name of its own"
        )
    hashes = {}
    for role, h in (sha256 or {}).items():
        if role not in ROLES:
            raise ConfigError(f"{where}.sha256: unknown file {role!r} (allowed: {', '.join(ROLES)})")
        if not SHA256_RE.match(h):
            raise ConfigError(f"{where}.sha256.{role} = {h!r}: must be 64 lower-case hex digits")
        hashes[role] = h
    return Dataset(name=name, mirrors=(url,), files=resolved, sha256=hashes, sizes={}, digits=True)


def _strip_gz(fname: str) -> str:
    return fname.removesuffix(".gz")


def named_classes(dataset: Dataset) -> tuple[str, ...] | None:
    """What the labels are called where they are not the digits themselves (Fashion-MNIST's
    names, an imported dataset's class folders), in label order; None for digits."""
    return None if dataset.classes == DIGITS else dataset.classes


def said_classes(dataset: Dataset) -> str:
    """A dataset's classes for a message: `the digits 0-9`, or their names."""
    return "the digits 0-9" if dataset.classes == DIGITS else ", ".join(dataset.classes)
