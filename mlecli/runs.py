"""Listing the runs in a folder, side by side. A broken run is listed as broken, never
stops the listing."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from mlecli import checkpoint as ckpt
from mlecli.errors import MlecliError
from mlecli.evaluate import read_report
from mlecli.rundir import read_manifest, read_metrics

ASCENDING = {"name", "started"}


def _locked(run_dir: Path) -> bool:
    """True if a training process holds the run's lock right now."""
    try:
        fd = os.open(run_dir / ".lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def describe(run_dir: Path) -> dict[str, Any]:
    """One row: what the run is, how far it got, its best and test figures, its status.
    Whatever is wrong with the run's files makes it a `broken` row saying why."""
    row: dict[str, Any] = {"name": run_dir.name, "path": str(run_dir), "task": None, "hidden": None,
                           "epochs_done": None, "epochs": None, "val_ll": None, "val_acc": None,
                           "test_acc": None, "seconds": None, "started": None, "status": "broken", "problem": None}
    try:
        _fill(row, run_dir)
    except MlecliError as exc:
        row["status"], row["problem"] = "broken", str(exc)
    except Exception as exc:  # a bug of ours must not hide the other runs: show it on this row
        row["status"], row["problem"] = "broken", f"cannot be read ({type(exc).__name__}: {exc})"
    return row


def _fill(row: dict[str, Any], run_dir: Path) -> None:
    last = ckpt.load(run_dir / "checkpoints" / "last.npz")
    cfg = last.config
    epochs = [m for m in read_metrics(run_dir, upto_step=last.meta["step"]) if m.get("kind", "epoch") == "epoch"]
    best = last.meta.get("best") or {}
    best_row = best.get("record") or next((m for m in epochs if m.get("epoch") == best.get("epoch")), None)
    row.update(
        task=cfg.task.describe(),
        hidden=list(cfg.model.hidden),
        epochs_done=last.epoch,
        epochs=cfg.train.epochs,
        val_ll=best_row.get("val_ll_mean") if best_row else None,
        val_acc=best_row.get("val_acc") if best_row else None,
        seconds=sum(m.get("seconds") or 0.0 for m in epochs) if epochs else 0.0,
    )
    manifest = read_manifest(run_dir, strict=True)
    row["started"] = manifest.get("started")
    ended = manifest.get("ended") or {}
    if _locked(run_dir):
        row["status"] = "running"
    elif ended.get("status") == "failed":
        row["status"] = "failed"
        row["problem"] = ended.get("error")
    elif last.epoch >= cfg.train.epochs:
        row["status"] = "finished"
    else:
        row["status"] = "interrupted"
    for name in ("eval-test-best.json", "eval-test-last.json"):
        if (run_dir / name).exists():
            row["test_acc"] = read_report(run_dir / name)["accuracy"]
            break


def list_runs(runs_dir: Path, sort: str = "name") -> list[dict[str, Any]]:
    """Every subfolder of `runs_dir` that looks like a run (it has checkpoints/ or a config.toml)."""
    if not runs_dir.is_dir():
        raise MlecliError(f"{runs_dir} is not a folder: give the folder that holds your runs (default: runs)")
    rows = [describe(p) for p in sorted(runs_dir.iterdir())
            if p.is_dir() and ((p / "checkpoints").is_dir() or (p / "config.toml").exists())]
    present = [r for r in rows if r[sort] is not None]
    missing = [r for r in rows if r[sort] is None]
    present.sort(key=lambda r: r[sort], reverse=sort not in ASCENDING)
    return present + missing


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * v:.2f}%"
    if kind == "ll":
        return f"{v:.4f}"
    if kind == "s":
        return f"{v:.1f}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    headers = ["name", "task", "hidden", "epochs", "best val LL", "best val acc", "test acc", "seconds", "status"]
    body = [[
        r["name"], r["task"] or "-", "-" if r["hidden"] is None else str(r["hidden"]),
        "-" if r["epochs_done"] is None else f"{r['epochs_done']}/{r['epochs']}",
        _fmt(r["val_ll"], "ll"), _fmt(r["val_acc"], "pct"), _fmt(r["test_acc"], "pct"), _fmt(r["seconds"], "s"),
        r["status"],
    ] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [headers, *body]]
    notes = [f"  {r['name']}: {r['problem']}" for r in rows if r["problem"]]
    return "\n".join(lines + notes)
