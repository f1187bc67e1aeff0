"""Sweeps: one ordinary run per grid point and seed (planned by grid.py), in one sweep
folder (record.py), carried out by worker processes (workers.py).

This module finds what is left to do in a sweep folder (start, resume, evaluate, or
nothing) and runs what is left, showing progress; the table per grid point is compare.py's.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlecli.data.cache import ensure_splits
from mlecli.run import checkpoint as ckpt
from mlecli.run.evaluate import default_report
from mlecli.run.rundir import TRAINER_FILES, read_manifest
from mlecli.safe.errors import MlecliError
from mlecli.safe.files import is_temporary_name, remove_stale_temporaries
from mlecli.safe.locks import folder_lock, is_locked
from mlecli.safe.schema import is_int
from mlecli.sweep import workers
from mlecli.sweep.compare import data_key, summary
from mlecli.sweep.grid import Plan, RunSpec
from mlecli.sweep.record import (
    check_sweep_dir,
    config_difference,
    default_sweep_dir,
    find_sweep,
    read_sweep_json,
    write_sweep_json,
)
from mlecli.sweep.runs import run_row

PATH_MAX = 4095  # bytes in a path (Linux's 4096 with its terminating zero)


@dataclass(frozen=True)
class Todo:
    run: RunSpec
    action: str  # "start", "restart" (a folder with no checkpoint yet), "resume", "evaluate", "done" or "running"
    epochs_done: int = 0
    problem: str | None = None  # a run that cannot go on as it is: left alone, and said why


def todo(p: Plan, sweep_dir: Path, evaluate: bool) -> list[Todo]:
    """Each run of the plan (in start order) and what it needs. Only looks: a run folder
    is changed only by whoever holds its lock (the trainer, or `clear_unstarted`)."""
    return [_todo_of(r, Path(sweep_dir) / r.name, evaluate) for r in p.order()]


def _todo_of(run: RunSpec, run_dir: Path, evaluate: bool) -> Todo:
    try:
        return _look(run, run_dir, evaluate)
    except OSError as exc:  # a folder that cannot be read is that run's problem, not the sweep's
        return Todo(run, "start", problem=f"cannot read {run_dir}: {exc.strerror or exc}; make it readable, or move "
                                          "it away, and run the sweep again")


def _look(run: RunSpec, run_dir: Path, evaluate: bool) -> Todo:

    if not run_dir.exists() and not run_dir.is_symlink():
        return Todo(run, "start")
    if run_dir.is_symlink() and not (run_dir.is_dir() and ckpt.checkpoints_in(run_dir)):  # the trainer starts none
        target = "a folder" if run_dir.is_dir() else "nothing it can use (a missing, looping or non-folder target)"
        return Todo(run, "start", problem=f"{run_dir} is a symbolic link to {target}: a run of the sweep starts in a "
                                          "folder of its own; move the link away and run the sweep again")
    if not run_dir.is_dir():
        return Todo(run, "start", problem=f"{run_dir} is not a folder: a run of the sweep goes there; move it away "
                                          "and run the sweep again")
    if is_locked(run_dir):  # a training process holds it: never touched, never counted finished
        return Todo(run, "running", problem=f"run folder {run_dir} is in use by another mlecli process (its .lock "
                                            "is held); left alone: run the sweep again once it has ended")
    if not any(run_dir.iterdir()):
        return Todo(run, "start")
    if not ckpt.checkpoints_in(run_dir):
        extra = sorted(c.name for c in run_dir.iterdir()
                       if (c.name not in TRAINER_FILES or c.name == "checkpoints" and not c.is_dir())
                       and not is_temporary_name(c.name))
        if extra:
            return Todo(run, "start", problem=f"run folder {run_dir} holds {', '.join(extra)} and no checkpoint; "
                                              "move it away and run the sweep again")
        return Todo(run, "restart")  # stopped before its first checkpoint: nothing to lose
    try:
        last = ckpt.load(run_dir / "checkpoints" / "last.npz")
    except MlecliError:
        return Todo(run, "resume")  # the trainer falls back to the newest readable checkpoint, or says why not
    differs = config_difference(last.config, run.config)
    if differs:
        return Todo(run, "resume", problem=f"run folder {run_dir} holds a run whose {differs}; move it away and run "
                                           "the sweep again")
    if (last.epoch >= run.config.train.epochs or last.meta.get("stopped_early")) and _ended(run_dir) != "failed":
        stale = evaluate and default_report(run_dir) is None  # none yet, or one of an earlier best
        return Todo(run, "evaluate" if stale else "done", last.epoch)
    return Todo(run, "resume", last.epoch)


def _ended(run_dir: Path) -> str | None:

    ended = read_manifest(run_dir).get("ended")
    return ended.get("status") if isinstance(ended, dict) else None


def blas_threads(p: Plan, sweep_dir: Path, jobs: int | None) -> int:
    """The BLAS threads of each worker: what the sweep recorded when it began (the last bits
    of a run with batches over 64 depend on it), else the cores shared among the workers."""

    recorded = read_sweep_json(sweep_dir) if Path(sweep_dir).is_dir() else None
    threads = (recorded or {}).get("blas_threads")
    if is_int(threads) and threads > 0:
        return threads
    return max(1, workers.cores() // min(jobs or workers.cores(), len(p.runs)))


@dataclass
class Outcome:
    sweep_dir: Path
    results: dict[str, Any]  # run name → workers.Result, for the runs worked on now
    stopped: str | None  # the signal that stopped the sweep
    summary: dict[str, Any]


def execute(
    p: Plan,
    sweep_dir: Path | None,
    *,
    jobs: int | None,
    data_dir: Path,
    evaluate: bool,
    progress: bool,
    log,
    stop=None,
) -> Outcome:
    """Run (or continue) the sweep `p` in `sweep_dir` (None: continue the newest folder
    under runs/ holding this sweep, else a new runs/<config>-sweep-<timestamp>).

    `stop` (a train.StopRequest the caller has entered) turns a signal before the workers
    start into Stopped: a folder this call made is removed again unless sweep.json is in
    it. Once the workers have ended, it is told that the sweep is settled."""

    if sweep_dir is not None:
        check_sweep_dir(p, sweep_dir)  # before any download
        check_paths(p, sweep_dir)
    # The data first, once, in this process: workers only read the cache, and a sweep that
    # cannot get its data leaves no folder behind. Its training labels give the table each
    # task's majority baseline.
    labels: dict[str, Any] = {}
    for r in p.runs:
        key = data_key(r.config)
        if key not in labels:
            labels[key] = ensure_splits(r.config.data.resolve(), data_dir, progress=progress, log=log)["train"].labels
    made = False
    if sweep_dir is None:
        sweep_dir = find_sweep(p)
        if sweep_dir is None:
            sweep_dir = default_sweep_dir(p.base.name, create=False)
            check_paths(p, sweep_dir)
            sweep_dir, made = default_sweep_dir(p.base.name), True
    made = made or not sweep_dir.exists()
    jobs = jobs or workers.cores()
    if check_sweep_dir(p, sweep_dir) and read_sweep_json(sweep_dir) is not None:
        plan_now = todo(p, sweep_dir, evaluate)
        if all(t.action == "done" or t.problem for t in plan_now):  # only to be read: no lock, nothing written
            return _carry_out(p, sweep_dir, plan_now, True, jobs, blas_threads(p, sweep_dir, jobs), data_dir,
                              evaluate, progress, log, stop, labels)
    with folder_lock(sweep_dir, wait=False, what=f"sweep folder {sweep_dir}") as lock:
        try:
            continuing = check_sweep_dir(p, sweep_dir)  # again, holding the lock: what is there now counts
            remove_stale_temporaries(sweep_dir)
            threads = blas_threads(p, sweep_dir, jobs)
            if read_sweep_json(sweep_dir) is None:
                write_sweep_json(p, sweep_dir, threads)
        except BaseException:
            if made and read_sweep_json(sweep_dir) is None:
                lock.discard()
            raise
        plan_now = todo(p, sweep_dir, evaluate)
        return _carry_out(p, sweep_dir, plan_now, continuing, jobs, threads, data_dir, evaluate, progress, log, stop,
                          labels)


def _carry_out(p: Plan, sweep_dir: Path, plan_now: list[Todo], continuing: bool, jobs: int, threads: int,
               data_dir: Path, evaluate: bool, progress: bool, log, stop, labels: dict[str, Any]) -> Outcome:

    errors = {t.run.name: t.problem for t in plan_now if t.problem}
    tasks = [
        workers.Task(t.run.name, str(sweep_dir / t.run.name), t.run.config.to_dict(), t.action, evaluate)
        for t in plan_now if t.action != "done" and not t.problem
    ]
    counts = {a: sum(t.action == a for t in plan_now if not t.problem) for a in ("done", "resume", "evaluate")}
    workers_now = min(jobs, len(tasks))
    log(f"{'continuing ' if continuing else ''}sweep {sweep_dir}: {_count(len(p.points()), 'grid point')} x "
        f"{_count(len(p.seeds), 'seed')} = {_count(len(p.runs), 'run')} ({counts['done'] + counts['evaluate']} "
        f"finished, {counts['resume']} to resume, {len(tasks) - counts['resume'] - counts['evaluate']} to start"
        + (f", {len(errors)} left alone" if errors else "") + ")"
        + (f" on {_count(workers_now, 'worker')}, {_count(threads, 'BLAS thread')} each" if tasks else ""))
    for name, problem in errors.items():
        log(f"{name}: {problem}")
    display = Progress(p, plan_now, sweep_dir, progress, log)
    try:
        results, stopped = workers.run_tasks(tasks, jobs=jobs, threads=threads, data_dir=data_dir, events=display)
    finally:
        display.close()
        if stop is not None:
            stop.settled = True  # what is said about the sweep from here on is never cut short
    for name, result in results.items():
        if result.status == "failed":
            errors[name] = result.error
    return Outcome(sweep_dir, results, stopped, summary(p, sweep_dir, errors, labels))


def stop_counts(p: Plan, outcome: Outcome) -> dict[str, int]:
    """How a stopped sweep's runs stand, each run counted once: "finished" (by its folder, also
    when the stop came as it ended), "saved" mid-run or stopped "at_once" now (by its worker),
    "failed" now."""
    status = {r.name: row["status"] for r, row in zip(p.runs, outcome.summary["runs"])}
    counts = {"finished": sum(s == "finished" for s in status.values()), "saved": 0, "at_once": 0, "failed": 0}
    for name, result in outcome.results.items():
        if status.get(name) == "finished":
            continue
        if result.status == "interrupted":
            counts["at_once" if result.error is not None else "saved"] += 1
        elif result.status == "failed":
            counts["failed"] += 1
    return counts


def check_paths(p: Plan, sweep_dir: Path) -> None:
    """Refuse a sweep folder so deep that its runs' files could not be named (before
    anything is written). Each run folder's own name fits: grid.folder_name cuts it."""

    inside = len("/checkpoints/.epoch-000000.npz.4194304.abcdefgh.tmp")
    longest = max(len(os.fsencode(os.path.abspath(Path(sweep_dir) / r.name))) for r in p.runs) + inside
    if longest > PATH_MAX:
        raise MlecliError(f"--sweep-dir {sweep_dir}: the paths of its runs' files would be up to {longest:,} bytes "
                          f"long, more than the {PATH_MAX:,} a path may have; choose a folder with a shorter path")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


class Progress:
    """What a sweep shows while it runs: one line per run as it ends (on stderr) and, on a
    terminal, one bar over all the epochs to train, with runs done and the best so far."""

    def __init__(self, p: Plan, plan_now: list[Todo], sweep_dir: Path, bar: bool, log):
        self.sweep_dir = sweep_dir
        self.log = log
        self.total = len(p.runs)
        self.done = sum(t.action == "done" for t in plan_now)
        self.best: tuple[float, str] | None = None
        for t in plan_now:
            if t.action in ("done", "evaluate"):
                self._consider(t.run.name)
        epochs = sum(t.run.config.train.epochs - t.epochs_done for t in plan_now if t.action != "done")
        self.bar = None
        if bar and epochs:
            from tqdm import tqdm  # lazy: tqdm (50 ms) only where a bar is shown

            self.bar = tqdm(total=epochs, desc="sweep", unit="epoch", file=sys.stderr, mininterval=0.5,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} epochs "
                                       "[{elapsed}<{remaining}]{postfix}")
            self._postfix()

    def _consider(self, name: str) -> dict[str, Any] | None:

        row = run_row(self.sweep_dir / name)
        if row["val_ll"] is not None and (self.best is None or row["val_ll"] > self.best[0]):
            self.best = (row["val_ll"], name)
        return row

    def _postfix(self) -> None:
        if self.bar is not None:
            best = f", best {self.best[1]} (val LL {self.best[0]:.4f})" if self.best else ""
            self.bar.set_postfix_str(f"runs {self.done}/{self.total} done{best}", refresh=True)

    def _say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            self.log(text)

    def __call__(self, kind: str, name: str, detail: Any) -> None:
        if kind == "epoch" and self.bar is not None:
            self.bar.update(1)
        elif kind == "log":
            self._say(f"{name}: {detail}")
        elif kind == "done":
            if detail.status == "finished":
                self.done += 1
                row = self._consider(name)
                test = f", test acc {100 * row['test_acc']:.2f}%" if row["test_acc"] is not None else ""
                figures = (f"best val LL {row['val_ll']:.4f}/img, acc {100 * row['val_acc']:.2f}% "
                           f"(epoch {row['best_epoch']}){test}" if row["val_ll"] is not None else "finished")
                self._say(f"[{self.done}/{self.total}] {name}: {figures}")
            elif detail.status == "failed":
                self._say(f"failed {name}: {detail.error}")
            elif detail.status == "interrupted":
                self._say(f"stopped {name}: saved mid-run")
            self._postfix()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

