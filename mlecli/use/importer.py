"""A folder of labelled pictures as a dataset (`mlecli import`), as torchvision's ImageFolder
reads one and Keras' image_dataset_from_directory splits one.

FOLDER holds one folder per class (`mine/0/*.png`, `mine/cat/*.jpg`), or that twice, as
`FOLDER/train/<class>/` and `FOLDER/test/<class>/`. Classes are the class folders' names:
when every one is a digit 0-9, label d is the digit d (so a network trained on MNIST can be
measured on them); otherwise the names sorted, label i the i-th (`find_classes`). Without
train/ and test/, a seeded share of each class is held out as the test split (`hold_out`).

Every picture is read by `inputs.load` and prepared by `preparation.prepare_many`, the very
path of `mlecli predict` (MNIST's preparation; with `none`, pictures already 28×28 light ink
on black are taken as they are), a chunk of files at a time, in worker processes when there
are many (`read_pictures`). The dataset is written by the data layer (mlecli.data.imported),
whole or not at all. Anything that cannot be read stops the import before anything is
written, with one line naming the files; what is not meant to be read (hidden files, files
not named like pictures, folders inside class folders, files beside them) is skipped and
said (`Layout.skipped`).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
import shlex
import signal
import stat
import sys
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlecli.data import imported
from mlecli.data.datasets import DIGITS, SPLITS
from mlecli.nn import blas
from mlecli.safe.errors import InputError, MlecliError, display
from mlecli.use import inputs
from mlecli.use.preparation import FRAME, MNIST, BlankImage, Style, blank_message, prepare_many, prepare_steps

PREPARATIONS = {"mnist": MNIST, "none": None}
DEFAULT_TEST_FRACTION = 0.2
CHUNK_FILES = 128  # pictures read by one task of a worker process
CHUNK_PIXELS = 1 << 21  # pixels of one size prepared at a time (predict's chunk): memory follows it, not the folder
PARALLEL_FROM = 1000  # pictures: fewer are read in this process (starting workers costs about half a second)
SHOWN = 3  # names shown per reason something was skipped, or per error

# Why an entry of the folder was not read (Layout.skipped's keys, in the order they are said).
HIDDEN = "hidden (a name starting with '.')"
NOT_A_PICTURE = f"not named like a picture ({', '.join(inputs.IMAGE_SUFFIXES[:3])}, …)"
NESTED = "folders inside a class folder (classes are one level deep)"
LOOSE = "beside the class folders, in no class"
REASONS = (HIDDEN, NOT_A_PICTURE, NESTED, LOOSE)


@dataclass(frozen=True)
class Picture:
    """One picture to read: `path` to open, `name` to show (as the user typed the folder),
    `source` (its path inside the folder, as the dataset records it), its `label`, and the
    split its folder puts it in (None: held out by `hold_out`)."""

    path: str
    name: str
    source: str
    label: int
    split: str | None


@dataclass
class Layout:
    """What a folder holds: its classes (`classes[i]` names label i), whether they are the
    digits, its pictures in order (by label, then by file name, numbers as numbers), whether
    it is split into train/ and test/, and what was skipped, by reason."""

    classes: tuple[str, ...]
    digits: bool
    pictures: list[Picture]
    split_folders: bool
    skipped: dict[str, list[str]] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Finding the classes and their pictures


def find_classes(folder: str) -> Layout:
    """The classes and pictures of `folder` (as typed: names are shown that way), or
    MlecliError with one line saying what is wrong with it. Nothing is read but listings."""
    shown = display(folder)
    _check_folder(folder, shown)
    skipped: dict[str, list[str]] = {}
    top = _class_folders(folder, shown, skipped)
    split_names = {"train", "test"} & set(top)
    if split_names:
        if split_names != {"train", "test"}:
            has, lacks = (("train", "test") if "train" in split_names else ("test", "train"))
            raise MlecliError(f"{shown} has {has}/ but no {lacks}/: give both ({shown}/train/<class>/, "
                              f"{shown}/test/<class>/), or neither, to hold out --test-fraction of each class")
        others = sorted(set(top) - split_names)
        if others:
            raise MlecliError(f"{shown} has train/ and test/ beside other folders ({_names(others)}): with train/ "
                              "and test/, every class folder goes inside them")
        found = {s: _class_folders(os.path.join(folder, s), display(os.path.join(folder, s)), skipped)
                 for s in SPLITS}
    else:
        found = {None: top}
    names = list(dict.fromkeys(n for folders in found.values() for n in folders))
    digits = all(re.fullmatch(r"[0-9]", n) for n in names)
    classes = DIGITS if digits else tuple(sorted(names))
    if len(classes) > imported.MAX_CLASSES:
        raise MlecliError(f"{shown} has {len(classes)} class folders ({_names(list(classes))}); at most "
                          f"{imported.MAX_CLASSES}: a task names its classes by the labels 0-9")
    if split_names:
        missing = sorted(set(found["test"]) - set(found["train"]), key=lambda n: found["test"][n])
        if missing:
            raise MlecliError(f"{shown}/test/{found['test'][missing[0]]} has no folder in {shown}/train/: a class "
                              "needs training pictures")
    pictures = []
    for label, name in enumerate(classes):
        for split, folders in found.items():
            if name in folders:
                pictures += _pictures(folder, split, folders[name], label, skipped)
    return Layout(classes, digits, pictures, bool(split_names), skipped)


def _check_folder(folder: str, shown: str) -> None:
    try:
        mode = os.stat(folder).st_mode
    except FileNotFoundError:
        raise MlecliError(f"{shown} does not exist") from None
    except OSError as exc:
        raise MlecliError(f"{shown}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISDIR(mode):
        raise MlecliError(f"{shown} is not a folder: give a folder holding one folder of pictures per class "
                          f"({shown}/0/*.png, {shown}/cat/*.jpg, …)")


def _entries(folder: str, shown: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: inputs.natural_key(e.name))
    except OSError as exc:
        raise MlecliError(f"{shown}: cannot list this folder ({exc.strerror})") from None


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether an entry is a folder, a link to one included (as predict follows a folder it is given)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _class_folders(folder: str, shown: str, skipped: dict[str, list[str]]) -> dict[str, str]:
    """The class folders of `folder` by their class name, each mapped to its own name; what
    else is there goes into `skipped`."""
    found: dict[str, str] = {}
    seen: dict[str, str] = {}  # case-folded class name -> folder name: two folders, one class
    for entry in _entries(folder, shown):
        where = display(os.path.join(folder, entry.name))
        if entry.name.startswith("."):
            skipped.setdefault(HIDDEN, []).append(where)
        elif not _is_dir(entry):
            skipped.setdefault(LOOSE, []).append(where)
        else:
            name = class_name(entry.name)
            if not name:
                raise MlecliError(f"{where}: a class folder's name is its class's: give it one that is not blank")
            key = name.casefold()
            if key in seen:
                other = display(os.path.join(folder, seen[key]))
                raise MlecliError(f"{other} and {where} would both be the class {name}: rename or merge one of them")
            seen[key] = entry.name
            found[name] = entry.name
    if not found:
        raise MlecliError(f"{shown} holds no class folders: put the pictures of each class in a folder of its own "
                          f"({shown}/0/*.png, {shown}/cat/*.jpg, …)")
    return found


def class_name(folder_name: str) -> str:
    """The class a folder stands for: its name as valid Unicode in one normal form (NFC,
    blanks around it dropped); a digit written with leading zeros (`07`) is the digit."""
    name = unicodedata.normalize("NFC", display(folder_name)).strip()
    return str(int(name)) if re.fullmatch(r"0*[0-9]", name) else name


def _pictures(folder: str, split: str | None, class_folder: str, label: int,
              skipped: dict[str, list[str]]) -> list[Picture]:
    """The pictures of one class folder by file name (numbers compared as numbers)."""
    inside = os.path.join(split, class_folder) if split else class_folder
    path = os.path.join(folder, inside)
    shown = display(path)
    found = []
    for entry in _entries(path, shown):
        where = display(os.path.join(path, entry.name))
        if entry.name.startswith("."):
            skipped.setdefault(HIDDEN, []).append(where)
        elif _is_dir(entry):
            skipped.setdefault(NESTED, []).append(where)
        elif os.path.splitext(entry.name)[1].lower() not in inputs.IMAGE_SUFFIXES:
            skipped.setdefault(NOT_A_PICTURE, []).append(where)
        else:
            found.append(Picture(os.path.join(path, entry.name), where, display(os.path.join(inside, entry.name)),
                                 label, split))
    if not found:
        raise MlecliError(f"{shown} holds no pictures (files ending in {', '.join(inputs.IMAGE_SUFFIXES[:6])}, …): "
                          "put the class's pictures in it, or remove the folder")
    return found


def _names(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (", …" if len(names) > SHOWN else "")


# ---------------------------------------------------------------------------
# Reading and preparing the pictures


def read_pictures(pictures: list[Picture], style: Style | None, *, jobs: int = 1,
                  progress: Callable[[int], None] = lambda n: None) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Every picture read and prepared in `style` (None: taken as it is, 28×28): uint8
    (N, 28, 28) in the order given, and (name, error) of each picture that could not be
    used, in that order too (its image is all zeros). `jobs` worker processes when there
    are many; `progress(n)` is told of each n pictures done."""
    items = [(p.path, p.name) for p in pictures]
    chunks = [items[k : k + CHUNK_FILES] for k in range(0, len(items), CHUNK_FILES)]
    images = np.zeros((len(items), FRAME, FRAME), np.uint8)
    errors: dict[int, str] = {}
    for k, (chunk_images, chunk_errors) in _chunks_read(chunks, style, jobs if len(items) >= PARALLEL_FROM else 1):
        start = k * CHUNK_FILES
        images[start : start + len(chunk_images)] = chunk_images
        errors.update({start + i: message for i, message in chunk_errors})
        progress(len(chunk_images))
    return images, [(pictures[i].name, errors[i]) for i in sorted(errors)]


def _chunks_read(chunks: list[list[tuple[str, str]]], style: Style | None, jobs: int
                 ) -> Iterator[tuple[int, tuple[np.ndarray, list[tuple[int, str]]]]]:
    """(index, read_chunk's result) of every chunk, in this process or in `jobs` workers, as they are done."""
    if jobs <= 1 or len(chunks) <= 1:
        for k, chunk in enumerate(chunks):
            yield k, read_chunk(chunk, style)
        return
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=min(jobs, len(chunks)),
                                                  mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_worker_start)
    try:
        # The workers start while these are submitted: with Ctrl-C blocked, which they inherit
        # and unblock once they ignore it (the command's process alone answers it).
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            futures = {pool.submit(read_chunk, chunk, style, 1): k for k, chunk in enumerate(chunks)}
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_start() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def read_chunk(items: list[tuple[str, str]], style: Style | None, threads: int | None = None
               ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Read and prepare pictures ((path, name) pairs): uint8 (n, 28, 28), and (i, error) of
    each that could not be used. Pictures of one size are prepared together, a chunk of
    about CHUNK_PIXELS at a time; `threads` BLAS threads (a worker takes 1: the processes
    are the parallelism)."""
    images = np.zeros((len(items), FRAME, FRAME), np.uint8)
    errors: list[tuple[int, str]] = []
    pending: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    pixels: dict[tuple[int, int], int] = {}  # of the pictures pending, by size

    def flush(shape: tuple[int, int]) -> None:
        group = pending.pop(shape)
        pixels.pop(shape)
        prepared, blank = prepare_many(np.stack([g for _, g in group]), style=style)
        for (i, _), image, empty in zip(group, prepared, blank):
            if empty:
                errors.append((i, blank_message(items[i][1])))
            else:
                images[i] = image

    with blas.threads(threads):
        for i, (path, name) in enumerate(items):
            try:
                g = _gray(path, name, style)
            except MlecliError as exc:
                errors.append((i, str(exc)))
                continue
            if style is None:
                images[i] = np.floor(g * 255 + 0.5).astype(np.uint8)
            elif g.size >= CHUNK_PIXELS:  # one large picture: prepared alone, in place (as predict does)
                try:
                    images[i] = prepare_steps(g, name, style, overwrite=True)[0]
                except BlankImage as exc:
                    errors.append((i, str(exc)))
            else:
                pending.setdefault(g.shape, []).append((i, g))
                pixels[g.shape] = pixels.get(g.shape, 0) + g.size
                if pixels[g.shape] >= CHUNK_PIXELS:
                    flush(g.shape)
        for shape in list(pending):
            flush(shape)
    errors.sort()
    return images, errors


def _gray(path: str, name: str, style: Style | None) -> np.ndarray:
    """One picture file as gray (H, W) float64 in [0, 1], read as predict reads it; InputError if it cannot be used."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise InputError(f"{name}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(mode):  # a named pipe, a device or a socket: never opened
        raise InputError(f"{name} is not a file (a named pipe, a device or a socket): mlecli imports picture files")
    loaded = inputs.load(inputs.Source(name, Path(path)))
    if not loaded.picture:
        raise InputError(f"{name} holds an array or an IDX file, not a picture ({inputs.PICTURES}): mlecli imports "
                         "pictures")
    g = loaded.images
    if style is None and g.shape != (FRAME, FRAME):
        raise InputError(f"{name}: --preparation none needs 28×28 pictures (light ink on black, as MNIST's), this "
                         f"is {g.shape[1]}×{g.shape[0]}; leave out --preparation none to prepare it")
    return g


# ---------------------------------------------------------------------------
# The test split


def hold_out(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: the images held out for the test split, `fraction` of each class (rounded,
    as data.validation is), chosen by numpy.random.default_rng(seed); a class keeps at
    least one training image unless `fraction` is 1."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        n = len(where)
        count = n if fraction == 1 else min(int(round(fraction * n)), n - 1)
        test[rng.permutation(where)[:count]] = True
    return test


# ---------------------------------------------------------------------------
# The import


@dataclass(frozen=True)
class Imported:
    """What an import made: the dataset's name and folder, its classes, the images per class
    in each split (`counts[split][label]`), and what was skipped, by reason."""

    name: str
    folder: Path
    classes: tuple[str, ...]
    digits: bool
    counts: dict[str, list[int]]
    skipped: dict[str, list[str]]
    split_folders: bool
    preparation: str
    test: str  # how the test split was made, in words


def import_folder(folder: str, name: str, data_dir: Path, *, test_fraction: float | None = None, seed: int = 0,
                  preparation: str = "mnist", force: bool = False, jobs: int | None = None,
                  progress: bool = False, log: Callable[[str], None] = lambda msg: None) -> Imported:
    """Read `folder` (as typed) and write it into `data_dir` as the dataset `name`; see the module."""
    imported.check_name(name)
    imported.refuse_existing(Path(data_dir) / name, force)  # before a picture is read; again when it is written
    if preparation not in PREPARATIONS:
        raise MlecliError(f"--preparation {preparation!r}: one of {', '.join(PREPARATIONS)}")
    layout = find_classes(folder)
    if layout.split_folders and test_fraction is not None:
        raise MlecliError(f"--test-fraction {test_fraction:g}: {display(folder)} has train/ and test/ folders, which "
                          "say what the test split is; leave out --test-fraction")
    fraction = DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
    with _bar(len(layout.pictures), progress) as advance:
        images, errors = read_pictures(layout.pictures, PREPARATIONS[preparation], jobs=jobs or os.cpu_count() or 1,
                                       progress=advance)
    if errors:
        raise MlecliError(_unusable(errors))
    labels = np.array([p.label for p in layout.pictures], np.uint8)
    if layout.split_folders:
        test = np.array([p.split == "test" for p in layout.pictures])
    else:
        test = hold_out(labels, fraction, seed)
    parts = {split: imported.Part(images[where], labels[where],
                                  [layout.pictures[i].source for i in np.flatnonzero(where)])
             for split, where in (("train", ~test), ("test", test))}
    absolute = os.path.abspath(folder)
    words = ["mlecli", "import", absolute, "--name", name]
    if preparation != "mnist":
        words += ["--preparation", preparation]
    if not layout.split_folders:
        words += ["--test-fraction", f"{fraction:g}", "--seed", str(seed)]
    words += ["--data-dir", os.path.abspath(data_dir)]
    test_split = "its test/ folder" if layout.split_folders else f"{fraction:g} of each class held out, seed {seed}"
    source = {"folder": display(absolute), "preparation": preparation, "test": test_split,
              "skipped": sum(len(v) for v in layout.skipped.values())}
    path = imported.write(Path(data_dir), name, parts, layout.classes, command=display(shlex.join(words)),
                          source=source, force=force, log=log)
    counts = {s: np.bincount(parts[s].labels, minlength=len(layout.classes)).tolist() for s in SPLITS}
    return Imported(name, path, layout.classes, layout.digits, counts, layout.skipped, layout.split_folders,
                    preparation, test_split)


def _unusable(errors: list[tuple[str, str]]) -> str:
    """One line for the pictures that cannot be used ((name, error) each): the first's error,
    and how many more there are, the next few by name."""
    first = errors[0][1]
    if len(errors) == 1:
        return f"{first}; nothing was imported: fix or remove it, then import again"
    return (f"{first}; {len(errors):,} pictures in all cannot be used (also {_names([n for n, _ in errors[1:]])}); "
            "nothing was imported: fix or remove them, then import again")


class _bar:
    """A tqdm bar on stderr while the pictures are read (only when `shown`)."""

    def __init__(self, total: int, shown: bool):
        self.total, self.shown, self.bar = total, shown, None

    def __enter__(self) -> Callable[[int], None]:
        if self.shown:
            from tqdm import tqdm  # lazy: tqdm (50 ms) only where a bar is shown

            self.bar = tqdm(total=self.total, desc="import", unit="img", file=sys.stderr, mininterval=0.25,
                            leave=False)
            return self.bar.update
        return lambda n: None

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------
# What the command prints


def commands(result: Imported, data_dir: str | None) -> tuple[str, str]:
    """The commands to train on an imported dataset and to measure a network on it (with
    `--data-dir data_dir` if it is given). A task of named classes is said in full: class 1
    against class 0 (of two), or class 0 against the rest (of more); digits take the default
    config's (odd against even)."""
    train = ["mlecli", "train", "--set", f"data.dataset={result.name}"]
    if not result.digits:
        train += ["--set", "task.positive=[1]", "--set", "task.negative=[0]"] if len(result.classes) == 2 else \
            ["--set", "task.positive=[0]", "--set", "task.negative=rest"]
    evaluate = ["mlecli", "evaluate", "RUN", "--dataset", result.name]
    extra = [] if data_dir is None else ["--data-dir", data_dir]
    return shlex.join(train + extra), shlex.join(evaluate + extra)


def summary(result: Imported, shown_folder: str, train_command: str, evaluate_command: str) -> list[str]:
    """The import's report: images per class and split, what was skipped and why, where the
    dataset is, and the commands to train on it and to measure a network on it."""
    classes = "the digits" if result.digits else f"{len(result.classes)} classes"
    total = sum(map(sum, result.counts.values()))
    how = "prepared as MNIST's digits" if result.preparation == "mnist" else "taken as they are"
    lines = [f"{result.name}: {total:,} images of {classes}, {how}, in {shown_folder} (test split: {result.test})"]
    width = max(5, *(len(c) for c in result.classes))
    lines.append(f"  {'label':>5}  {'class':<{width}}  {'train':>7}  {'test':>7}")
    for label, cls in enumerate(result.classes):
        train, test = result.counts["train"][label], result.counts["test"][label]
        if result.digits and not train and not test:
            continue  # a digit without a folder: not one of the folder's classes
        lines.append(f"  {label:>5}  {cls:<{width}}  {train:>7,}  {test:>7,}")
    lines.append(f"  {'':>5}  {'all':<{width}}  {sum(result.counts['train']):>7,}  {sum(result.counts['test']):>7,}")
    if any(result.skipped.values()):
        lines.append("skipped (not read):")
        for reason in REASONS:
            names = result.skipped.get(reason, [])
            if names:
                lines.append(f"  {reason}: {len(names):,} ({_names(names)})")
    lines.append(f"train:    {train_command}")
    lines.append(f"evaluate: {evaluate_command}  (a network trained on data with the same classes)")
    return lines
