"""The run folder: claiming it, its manifest, its metrics log.

```
runs/<name>/
  .lock                 held (flock) while a training process uses the folder
  config.toml           the fully resolved config
  manifest.json         versions, dataset hashes, seeds, BLAS, start, each resume, how it ended
  metrics.jsonl         one JSON record per line, appended, never rewritten while training
  checkpoints/last.npz  THE COMMIT RECORD: the run's state at its newest epoch end (or stop)
  checkpoints/epoch-NNNN.npz, best.npz   byte copies of last.npz, written after it
```

A run's truth is `last.npz`. Everything else either comes before it (metrics lines are
appended and synced before the checkpoint that covers them is renamed in) or is a copy
of it made after the rename. So after a crash at any moment, opening the run again cuts
metrics.jsonl back to the records the newest checkpoint covers, and writes again the
copies that were due (see train.py's `_repair`); the run then goes on exactly as if it
had never stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from mlecli.run import checkpoint as ckpt
from mlecli.safe import schema
from mlecli.safe.errors import ConfigError, MlecliError
from mlecli.safe.files import (
    atomic_write_bytes,
    atomic_write_text,
    cannot_write,
    is_temporary_name,
    open_regular,
    remove_stale_temporaries,
)
from mlecli.safe.locks import folder_lock

RUNS_DIR = Path("runs")
MAX_METRICS_BYTES = 2 << 30  # years of records every step; more is not a metrics file
LOCK = ".lock"



def new_default(name: str, runs_dir: Path = RUNS_DIR) -> Path:
    """Create and return `runs/<name>-<timestamp>` (then `-2`, `-3`, … if taken)."""
    return unique_folder(runs_dir, name, option="--run-dir")


def unique_folder(root: Path, base: str, *, option: str, create: bool = True) -> Path:
    """`root/<base>-<timestamp>`, then `-2`, `-3`, … if taken, made with one exclusive
    mkdir, so two commands started in the same second can never be given the same folder
    (with `create` False: the first name free now, made by nobody). `option` is the one that
    names a folder instead, for the message when there is none free."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MlecliError(cannot_write(exc, root)) from None
    for n in range(1, 10_000):
        path = root / (f"{base}-{stamp}" if n == 1 else f"{base}-{stamp}-{n}")
        if not create:
            if not path.exists():
                return path
            continue
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise MlecliError(cannot_write(exc, path)) from None
    raise MlecliError(f"no free folder name for {base} in {root}; use {option}")


def _leftovers(run_dir: Path) -> list[str]:
    """What a folder holds beyond the remains of a run that never wrote its first
    checkpoint (its lock, an empty checkpoints/ folder, temporaries)."""
    found = []
    for p in sorted(run_dir.iterdir()):
        if p.name == LOCK or is_temporary_name(p.name):
            continue
        if p.name == "checkpoints" and p.is_dir() and not p.is_symlink() and all(
            is_temporary_name(q.name) for q in p.iterdir()
        ):
            continue
        found.append(p.name)
    return found


def check_unused(run_dir: Path) -> None:
    """Refuse a folder that holds anything but an unstarted run's remains."""
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise ConfigError(f"run folder {run_dir} exists and is not a folder: choose another --run-dir")
    if run_dir.is_dir() and _leftovers(run_dir):
        raise ConfigError(
            f"run folder {run_dir} already exists and is not empty: resume it with --resume {run_dir}, "
            "or choose another --run-dir"
        )


@contextlib.contextmanager
def claim(run_dir: Path, *, fresh: bool, created: bool = False) -> Iterator[None]:
    """Hold the run folder's lock for the block.

    For a new run (`fresh`), the folder is checked to be unused only once the lock is
    held, so of two trainings started on one folder exactly one gets it, and the other
    leaves it alone. If the block fails before the run's first checkpoint exists, what
    it made is removed again (the folder too, if `created` says this process made it),
    so that the same command can simply be run again."""
    run_dir = Path(run_dir)
    with folder_lock(run_dir, wait=False, what=f"run folder {run_dir}"):
        if fresh:
            check_unused(run_dir)
        try:
            yield
        except BaseException:
            if fresh and not (run_dir / "checkpoints" / "last.npz").exists():
                _remove_unstarted(run_dir, created)
            raise


def _remove_unstarted(run_dir: Path, created: bool) -> None:
    ckpt_dir = run_dir / "checkpoints"
    with contextlib.suppress(OSError):
        if not ckpt_dir.is_symlink():  # never delete in the folder a link points to
            for p in ckpt_dir.iterdir():
                if is_temporary_name(p.name):
                    p.unlink()
            ckpt_dir.rmdir()
    for name in ("config.toml", "manifest.json", "metrics.jsonl"):
        with contextlib.suppress(OSError):
            (run_dir / name).unlink()
    if created:
        with contextlib.suppress(OSError):
            (run_dir / LOCK).unlink()
            run_dir.rmdir()


# ---------------------------------------------------------------------------
# manifest.json


def read_manifest(run_dir: Path, *, strict: bool = False) -> dict[str, Any]:
    """The manifest ({} when there is none). A damaged one raises SchemaError if
    `strict`, else counts as none (training writes a new one)."""
    path = run_dir / "manifest.json"
    if not path.exists():
        return {}
    try:
        return schema.read_json(path, schema.MANIFEST)
    except schema.SchemaError:
        if strict:
            raise
        return {}


def trained_data_dir(target: Path) -> Path | None:
    """The data folder a run (or the run of a checkpoint file in it) was trained with,
    if its manifest names one that still exists."""
    target = Path(target)
    run = target if target.is_dir() else target.parent.parent if target.parent.name == "checkpoints" else None
    if run is None:
        return None
    folder = read_manifest(run).get("data_dir")
    return Path(folder) if folder and Path(folder).is_dir() else None


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def record_end(run_dir: Path, status: str, at: str, error: str | None = None, **extra: Any) -> None:
    """Note in manifest.json how the run ended (best effort: never hides the real error)."""
    manifest = read_manifest(run_dir)
    if not manifest:
        return
    manifest["ended"] = {"status": status, "at": at, "error": error, **extra}
    with contextlib.suppress(OSError, MlecliError):
        write_manifest(run_dir, manifest)


# ---------------------------------------------------------------------------
# metrics.jsonl


def _metric_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """metrics.jsonl's lines (numbered from 1, each with its newline), read a piece at a
    time. A last line without its newline is one a crash cut short: it is not a line."""
    try:
        f = open_regular(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise MlecliError(f"cannot read {path}: {exc.strerror or exc}") from None
    with f:
        if os.fstat(f.fileno()).st_size > MAX_METRICS_BYTES:
            raise MlecliError(f"cannot read {path}: larger than {MAX_METRICS_BYTES:,} bytes; it is not mlecli's")
        for i, line in enumerate(f, start=1):
            if line.endswith(b"\n"):
                yield i, line


def read_metrics(run_dir: Path, upto_step: int | None = None, kinds: tuple[str, ...] | None = None
                 ) -> list[dict[str, Any]]:
    """The records of metrics.jsonl in order (those with step <= `upto_step`, if given; of
    the `kinds` given, if any: a record without a kind is an epoch's).

    Every line is checked, whatever is kept, and only what is kept is held, so a file of
    millions of step records costs the memory of its epoch records. A line that is not a
    record, or a record out of the order the trainer writes them (steps never going back,
    step records' steps rising, epochs counting up by one), is damage, and is refused
    naming the file and line."""
    path = run_dir / "metrics.jsonl"
    records: list[dict[str, Any]] = []
    last_step, last_epoch_step, last_epoch = -1, -1, None
    for i, line in _metric_lines(path):
        where = f"{path}, line {i}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise schema.SchemaError(f"{where}: not UTF-8 text; the file is damaged or not mlecli's") from None
        record = schema.load_json(text, schema.RECORD, where)
        kind, step = record.get("kind", "epoch"), record["step"]
        if kind == "epoch":  # after the step record of its last step, if one was due
            wrong = step < last_step or step <= last_epoch_step or (
                last_epoch is not None and record["epoch"] != last_epoch + 1)
            last_epoch_step, last_epoch = step, record["epoch"]
        else:
            wrong = step <= last_step
        if wrong:
            raise schema.SchemaError(f"{where}: a record of epoch {record['epoch']}, step {step}, out of the order "
                                     "the trainer writes them in; the file is damaged or edited")
        last_step = step
        if (upto_step is None or step <= upto_step) and (kinds is None or kind in kinds):
            records.append(record)
    return records


def committed_epochs(run_dir: Path, last_meta: dict[str, Any], last_path: Path) -> list[dict[str, Any]]:
    """The epoch records the run's newest checkpoint (`last_meta`, read from `last_path`)
    commits, the whole file checked. A crash only ever loses records after that
    checkpoint; a metrics.jsonl that ends before its epoch was cut or edited, and is
    refused. (No metrics.jsonl at all is a run whose records were moved away.)"""
    path, done = run_dir / "metrics.jsonl", last_meta["epochs_done"]
    epochs = read_metrics(run_dir, upto_step=last_meta["step"], kinds=("epoch",))
    reached = epochs[-1]["epoch"] if epochs else 0
    if reached != done and path.exists():
        raise MlecliError(
            f"{path} ends at {f'epoch {reached}' if reached else 'no epoch'}'s record, but {last_path} has finished "
            f"epoch {done}: records of the run were lost after they were written (the file was cut or edited); "
            "restore the file, or move it away (a resumed run then records only what comes next)"
        )
    return epochs


def cut_metrics(run_dir: Path, step: int) -> None:
    """Keep only the records a checkpoint at `step` covers (the rest are replayed), and
    drop a last line that a crash cut short."""
    path = run_dir / "metrics.jsonl"
    keep, dropped = [], False
    for _, line in _metric_lines(path):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None  # damage is not ours to drop: read_metrics names it
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped = True
            continue
        keep.append(line)
    if dropped or (path.exists() and sum(map(len, keep)) != path.stat().st_size):
        atomic_write_bytes(path, b"".join(keep))


# What a run folder holds before its first checkpoint: such a folder is started afresh.
TRAINER_FILES = {"config.toml", "manifest.json", "metrics.jsonl", ".lock", "checkpoints"}


def clear_unstarted(run_dir: Path) -> None:
    """Remove what a run stopped before its first checkpoint left (nothing of value), so
    that it can start afresh, holding the run folder's lock: a trainer that holds it is
    alive, and its folder is left alone (MlecliError). The lock file itself stays (whoever
    waits on it keeps a valid lock); anything else in the folder stays and is refused later."""

    with folder_lock(run_dir, wait=False, what=f"run folder {run_dir}"):
        if ckpt.checkpoints_in(run_dir):
            raise MlecliError(f"{run_dir} has checkpoints: resume it instead")  # the plan said otherwise: a bug
        folder = run_dir / "checkpoints"
        try:
            remove_stale_temporaries(run_dir)
            if folder.is_dir() and not folder.is_symlink():
                for leftover in folder.iterdir():  # under the lock, every temporary here is a dead writer's
                    if is_temporary_name(leftover.name):
                        leftover.unlink()
                folder.rmdir()
            for name in TRAINER_FILES - {"checkpoints", ".lock"}:
                (run_dir / name).unlink(missing_ok=True)
        except OSError as exc:
            raise MlecliError(f"cannot clear {run_dir}, which a run left before its first checkpoint: {exc}") from None

