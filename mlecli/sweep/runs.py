"""Listing the runs in a folder, side by side. A broken run is listed as broken, never
stops the listing.

A folder holding `sweep.json` is a sweep: its runs are listed with the sweep's name.
The figures come from the newest checkpoint's `best` record (older checkpoints: its
epoch's line in metrics.jsonl), test accuracy from the default-threshold evaluation
report.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from mlecli.nn.metrics import shown
from mlecli.run import checkpoint as ckpt
from mlecli.run import config as config_mod
from mlecli.run.evaluate import default_report, read_report
from mlecli.run.rundir import committed_epochs, read_manifest
from mlecli.safe import schema
from mlecli.safe.errors import ConfigError, MlecliError, printable
from mlecli.safe.locks import is_locked
from mlecli.sweep.record import read_sweep_json

ASCENDING = {"name", "started"}
# Columns --where can filter on besides config keys.
COLUMNS = ("name", "sweep", "status", "dataset", "task")
DEFAULT_OPTIMIZER = "sgd"  # what a config without train.optimizer trains with


def _number(v: Any) -> float | None:
    return float(v) if schema.is_number(v) else None


def run_row(run_dir: Path, sweep: str | None = None) -> dict[str, Any]:
    """One row: what the run is, how far it got, its best and test figures, its status.
    Whatever is wrong with the run's files makes it a `broken` row saying why."""
    row: dict[str, Any] = {"name": run_dir.name, "path": str(run_dir), "sweep": sweep, "task": None,
                           "dataset": None, "hidden": None, "learning_rate": None, "batch_size": None,
                           "optimizer": None, "epochs_done": None, "epochs": None, "best_epoch": None,
                           "val_ll": None, "val_acc": None, "test_acc": None, "seconds": None, "started": None,
                           "status": "broken", "problem": None, "note": None, "config": None}
    try:
        _fill(row, run_dir)
    except MlecliError as exc:
        row["status"], row["problem"] = "broken", str(exc)
    except OSError as exc:  # a folder or file this user may not read, say
        row["status"], row["problem"] = "broken", f"cannot read {exc.filename or run_dir}: {exc.strerror or exc}"
    except Exception as exc:  # any type, on purpose: a bug of ours must not hide the other runs; this row names it
        row["status"], row["problem"] = "broken", f"cannot be read ({type(exc).__name__}: {exc})"
    return row


def _fill(row: dict[str, Any], run_dir: Path) -> None:
    if _is_sweep(run_dir):  # listed as a row only when its sweep.json is damaged (run_folders)
        read_sweep_json(run_dir)
    last = ckpt.load(run_dir / "checkpoints" / "last.npz")
    cfg = last.config
    raw = cfg.to_dict()
    # only what the newest checkpoint commits: a crash may have left a record after it
    epochs = committed_epochs(run_dir, last.meta, last.path)
    best = last.meta.get("best") or {}
    best_row = best.get("record") or next((m for m in epochs if m.get("epoch") == best.get("epoch")), None)
    row.update(
        task=cfg.task.describe(),
        dataset=cfg.data.dataset,
        hidden=list(cfg.model.hidden),
        learning_rate=cfg.train.learning_rate,
        batch_size=cfg.train.batch_size,
        optimizer=raw["train"].get("optimizer", DEFAULT_OPTIMIZER),
        epochs_done=last.epoch,
        epochs=cfg.train.epochs,
        best_epoch=best.get("epoch") if best_row else None,
        val_ll=_number(best_row.get("val_ll_mean")) if best_row else None,
        val_acc=_number(best_row.get("val_acc")) if best_row else None,
        seconds=sum(_number(m.get("seconds")) or 0.0 for m in epochs),
        config=raw,
    )
    manifest = read_manifest(run_dir, strict=True)
    row["started"] = manifest.get("started")
    ended = manifest.get("ended") or {}
    if is_locked(run_dir):
        row["status"] = "running"
    elif ended.get("status") == "failed":
        row["status"] = "failed"
        row["problem"] = ended.get("error")
    elif last.epoch >= cfg.train.epochs or last.meta.get("stopped_early"):
        row["status"] = "finished"
        early = last.meta.get("stopped_early")
        if early:
            row["note"] = (f"stopped early after epoch {early['epoch']}: no better validation LL since epoch "
                           f"{early['best_epoch']}")
    else:
        row["status"] = "interrupted"
    report = default_report(run_dir)
    if report is not None:
        row["test_acc"] = _number(read_report(report)["accuracy"])


def _is_run(p: Path) -> bool:
    return p.is_dir() and ((p / "checkpoints").is_dir() or (p / "config.toml").exists())


def _is_sweep(p: Path) -> bool:
    return p.is_dir() and (p / "sweep.json").is_file()


def _guarded(test, p: Path) -> bool | None:
    """`test(p)`, or None when the file system will not say (permissions, a name too long)."""
    try:
        return test(p)
    except OSError:
        return None


def run_folders(folder: Path) -> list[tuple[Path, str | None]]:
    """(run folder, sweep name or None) for every run in `folder` and in the sweeps in it;
    `folder` itself may be a sweep. A folder that cannot be looked into is listed too (as
    a run, which `run_row` then shows broken, saying why): one unreadable folder never
    hides the others."""
    def runs_in(sweep: Path) -> list[tuple[Path, str | None]]:
        try:
            entries = sorted(sweep.iterdir())
        except OSError:
            return [(sweep, None)]
        return [(q, sweep.name) for q in entries if _guarded(_is_run, q) is not False]

    if _is_sweep(folder):
        read_sweep_json(folder)  # damaged: one line, as sweep and plot say it
        return runs_in(folder)
    found = []
    for p in sorted(folder.iterdir()):
        if not _guarded(lambda q: q.is_dir() and not q.name.startswith("."), p):
            continue
        sweep = _guarded(_is_sweep, p)
        if sweep:
            found += _unless_damaged(p, runs_in(p))
        elif sweep is None or _guarded(_is_run, p) is not False:
            found.append((p, None))
    return found


def _unless_damaged(sweep: Path, runs: list[tuple[Path, str | None]]) -> list[tuple[Path, str | None]]:
    """A sweep's runs, or, when its sweep.json is damaged, the sweep folder itself (which
    `run_row` then shows broken, saying why): the other runs are still listed."""
    try:
        read_sweep_json(sweep)
    except MlecliError:
        return [(sweep, None)]
    return runs


# ---------------------------------------------------------------------------
# --where KEY=VALUE


def parse_where(item: str) -> tuple[str, Any]:
    """`KEY=VALUE`, KEY a config key (train.learning_rate) or a column (name, sweep,
    status, dataset, task), VALUE a TOML value as for --set; raises ConfigError."""
    try:
        path, value = config_mod.parse_override(item)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--set", "--where", 1)) from None
    key = ".".join(path)
    if key in COLUMNS and not isinstance(value, str):
        value = item.partition("=")[2].strip()  # a column holds text: a run named true or 1e3 is named so
    known = [*COLUMNS, *(k for k in config_mod.ALL_KEYS if "." in k)]
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = (f"did you mean {close[0]}?" if close
                else f"use a config key such as train.learning_rate, or {', '.join(COLUMNS)}")
        raise ConfigError(f"--where {item!r}: unknown key {key} ({hint})")
    return key, value


def _matches(row: dict[str, Any], key: str, want: Any) -> bool:
    if key in COLUMNS:
        have = row.get(key)
        return have is not None and str(have) == want
    if row["config"] is None:
        return False
    node: Any = row["config"]
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return _equal(node, want)


def _equal(have: Any, want: Any) -> bool:
    """Equal as config values: numbers by value (1 and 1.0), everything else by type and
    value (true is not 1, "1" is not 1)."""
    if isinstance(have, (list, tuple)) and isinstance(want, (list, tuple)):
        return len(have) == len(want) and all(_equal(a, b) for a, b in zip(have, want))
    if isinstance(have, dict) and isinstance(want, dict):
        return have.keys() == want.keys() and all(_equal(have[k], want[k]) for k in have)
    if _number(have) is not None and _number(want) is not None:
        return float(have) == float(want)
    return type(have) is type(want) and have == want


def list_runs(runs_dir: Path, sort: str = "name", where: tuple[tuple[str, Any], ...] = ()) -> list[dict[str, Any]]:
    """Every run in `runs_dir` (and in the sweeps inside it) that passes every `where` filter."""
    if not runs_dir.is_dir():
        raise MlecliError(f"{runs_dir} is not a folder: give the folder that holds your runs (default: runs)")
    rows = [run_row(p, sweep) for p, sweep in run_folders(runs_dir)]
    rows = [r for r in rows if all(_matches(r, k, v) for k, v in where)]
    if sort == "name":
        return sorted(rows, key=lambda r: (r["sweep"] or "", r["name"]))
    present = [r for r in rows if r[sort] is not None]
    missing = [r for r in rows if r[sort] is None]
    present.sort(key=lambda r: r[sort], reverse=sort not in ASCENDING)
    return present + missing


def public(row: dict[str, Any]) -> dict[str, Any]:
    """A row for --json (without the config it was filtered on)."""
    return {k: v for k, v in row.items() if k != "config"}


def _fmt(v: Any, kind: str) -> str:
    return shown(v, {"pct": "%", "ll": ".4f", "s": ".1f", "g": "g"}.get(kind, ""), missing="-")


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a table. The sweep column shows when any run belongs to a sweep, the
    optimizer column when the runs differ in it or any is not plain SGD."""
    optimizers = {json.dumps(r["optimizer"], sort_keys=True) for r in rows if r["optimizer"] is not None}
    show_optimizer = len(optimizers) > 1 or any(o != json.dumps(DEFAULT_OPTIMIZER) for o in optimizers)
    show_sweep = any(r["sweep"] for r in rows)
    columns = [
        ("name", lambda r: r["name"]),
        *([("sweep", lambda r: r["sweep"] or "-")] if show_sweep else []),
        ("task", lambda r: r["task"] or "-"),
        ("dataset", lambda r: r["dataset"] or "-"),
        ("hidden", lambda r: "-" if r["hidden"] is None else str(r["hidden"])),
        ("lr", lambda r: _fmt(r["learning_rate"], "g")),
        ("batch", lambda r: _fmt(r["batch_size"], "")),
        *([("optimizer", lambda r: _optimizer(r["optimizer"]))] if show_optimizer else []),
        ("epochs", lambda r: "-" if r["epochs_done"] is None else f"{r['epochs_done']}/{r['epochs']}"),
        ("best val LL", lambda r: _fmt(r["val_ll"], "ll")),
        ("best val acc", lambda r: _fmt(r["val_acc"], "pct")),
        ("test acc", lambda r: _fmt(r["test_acc"], "pct")),
        ("seconds", lambda r: _fmt(r["seconds"], "s")),
        ("status", lambda r: r["status"]),
    ]
    headers = [h for h, _ in columns]
    body = [[printable(cell(r)) for _, cell in columns] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [headers, *body]]
    notes = [printable(f"  {r['name']}: {r['problem'] or r['note']}") for r in rows if r["problem"] or r["note"]]
    return "\n".join(lines + notes)


def _optimizer(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)
