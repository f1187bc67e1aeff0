"""Running a sweep's runs in parallel worker processes.

The parent hands each idle worker one run at a time over a pipe and listens to all of
them, and to their deaths, at once. A worker is a fresh Python process
(multiprocessing's "spawn") whose BLAS runs on `threads` threads; it trains with the
ordinary trainer, one `train.run` call per run, and keeps each dataset it has read
loaded for its next runs (`cache.keep_loaded`).

Stopping. The first Ctrl-C or SIGTERM reaches the parent (from a terminal, the workers
too): the parent starts no more runs and sends each busy worker SIGTERM, again every
half second until it answers; the trainer finishes its batch, saves last.npz and
returns. A second Ctrl-C sends the workers SIGINT, which stops a trainer at once (the
trainer's own rule); a worker that has still not ended 5 s later is killed. A worker that
dies (kill -9, out of memory) fails its run only: a new worker takes the next run.
Workers die with the parent (PR_SET_PDEATHSIG: a SIGTERM, so they save first).

This module imports no numpy at the top, so that a worker sets its BLAS threads before
numpy loads the BLAS.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from mlecli.errors import MlecliError

NUDGE_EVERY = 0.5  # seconds between SIGTERMs to a worker that has not stopped yet
KILL_AFTER = 5.0  # seconds after a second Ctrl-C before a worker is killed
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class Task:
    """One run for a worker: train it (start, restart or resume) and maybe evaluate it,
    or only evaluate it."""

    name: str
    run_dir: str
    config: dict[str, Any]  # Config.to_dict()
    action: str  # "start", "restart", "resume" or "evaluate"
    evaluate: bool


@dataclass(frozen=True)
class Result:
    status: str  # "finished", "interrupted", "failed" or "not started"
    error: str | None = None


# An event is (kind, run name, detail): ("start", name, None), ("epoch", name, None) after
# each finished epoch, ("log", name, message), ("done", name, Result).
Events = Callable[[str, str, Any], None]


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------
# The parent


def run_tasks(tasks: list[Task], *, jobs: int, threads: int, data_dir: Path, events: Events) -> tuple[dict[str, Result], str | None]:
    """Run `tasks` on up to `jobs` workers; return each task's Result by name, and the
    signal that stopped the sweep (None if it was not stopped)."""
    ctx = multiprocessing.get_context("spawn")
    pending = deque(tasks)
    results: dict[str, Result] = {}
    workers: list[_Worker] = []
    stop = _Stop()
    died_idle = 0

    def start_worker() -> None:
        workers.append(_Worker(ctx, data_dir, threads))

    with stop:
        try:
            for _ in range(min(jobs, len(pending))):
                start_worker()
            while True:
                if stop.signal is None:
                    for w in workers:
                        if w.task is None and w.alive and pending:
                            task = pending.popleft()
                            if w.give(task):
                                events("start", task.name, None)
                                continue
                            pending.appendleft(task)  # it died idle: the task goes to the next worker
                            died_idle += 1
                            if died_idle > jobs + 2:
                                raise MlecliError(f"the sweep's worker processes die before they can start a run "
                                                  f"({_exit(w.process.exitcode)}); nothing more was started")
                busy = [w for w in workers if w.task is not None]
                if not busy and (stop.signal is not None or not pending):
                    break
                stop.nudge(busy)
                ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=NUDGE_EVERY))
                for w in busy:
                    if w.conn in ready or w.process.sentinel in ready:
                        w.drain(events, results)
                for w in [w for w in workers if not w.alive]:
                    workers.remove(w)
                    if pending and stop.signal is None:
                        start_worker()
        finally:
            for w in workers:
                w.close()
    for task in pending:
        results[task.name] = Result("not started")
    return results, stop.signal


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Block Ctrl-C and SIGTERM while a worker starts: it inherits the mask and unblocks
    them once its own handlers are in place (a signal meanwhile waits, it is not lost)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Worker:
    """A worker process, the parent's end of its pipe, and the task it is on."""

    def __init__(self, ctx, data_dir: Path, threads: int):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child, str(data_dir), threads, os.getpid()),
                                   name="mlecli-sweep-worker", daemon=True)
        # The BLAS reads its thread count when numpy loads it: a run then gets exactly the
        # bits of `OPENBLAS_NUM_THREADS=threads mlecli train ...`.
        with _signals_blocked(), _environment(OPENBLAS_NUM_THREADS=str(threads)):
            self.process.start()
        child.close()
        self.task: Task | None = None
        self.alive = True

    def give(self, task: Task) -> bool:
        """Send the worker `task`; False if it has died."""
        try:
            self.conn.send(task)
        except OSError:
            self.process.join()
            self.alive = False
            return False
        self.task = task
        return True

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(self.process.pid, signum)

    def drain(self, events: Events, results: dict[str, Result]) -> None:
        """Handle every message waiting, then notice if the worker has died."""
        try:
            while self.conn.poll():
                kind, name, detail = self.conn.recv()
                if kind == "done":
                    results[name] = detail
                    self.task = None
                events(kind, name, detail)
        except (EOFError, OSError):
            pass
        if self.process.is_alive():
            return
        self.process.join()
        self.alive = False
        if self.task is not None:
            result = Result("failed", f"its worker process died ({_exit(self.process.exitcode)}); run the same "
                                      "sweep again to resume it from its last checkpoint")
            results[self.task.name] = result
            events("done", self.task.name, result)
            self.task = None

    def close(self) -> None:
        """Ask the worker to end, and make sure it does."""
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class _Stop:
    """The parent's Ctrl-C and SIGTERM: the first stops the sweep cleanly, a second
    Ctrl-C stops the workers at once."""

    def __init__(self):
        self.signal: str | None = None
        self.at_once: float | None = None  # when the second Ctrl-C came
        self._sent_at_once = False
        self._last_nudge = 0.0
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signal is None:
            self.signal = signal.Signals(signum).name
        elif signum == signal.SIGINT and self.at_once is None:
            self.at_once = time.monotonic()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def nudge(self, busy: list[_Worker]) -> None:
        """Pass the stop on to the busy workers (see the module's docstring)."""
        now = time.monotonic()
        if self.signal is None:
            return
        if self.at_once is not None:
            if not self._sent_at_once:
                for w in busy:
                    w.signal(signal.SIGINT)
                self._sent_at_once = True
            elif now - self.at_once > KILL_AFTER:
                for w in busy:
                    w.signal(signal.SIGKILL)
            return
        if now - self._last_nudge >= NUDGE_EVERY:
            for w in busy:
                w.signal(signal.SIGTERM)
            self._last_nudge = now


# ---------------------------------------------------------------------------
# The worker


_stop_signal: str | None = None  # the worker's: set by a signal that came outside a training


def _on_stop_signal(signum, frame):
    global _stop_signal
    if _stop_signal is not None and signum == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a third one must not break the way out
        raise KeyboardInterrupt
    _stop_signal = signal.Signals(signum).name


def _die_with_parent(parent: int) -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (best effort elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def worker_main(conn, data_dir: str, threads: int, parent: int) -> None:
    """A worker's life: take tasks from `conn` until told to stop (None) or the parent is gone."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)
    _die_with_parent(parent)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    from mlecli import blas, cache

    task = None
    try:
        with cache.keep_loaded(), blas.threads(threads):
            while True:
                try:
                    task = conn.recv()
                except (EOFError, OSError):
                    return
                if task is None:
                    return
                result = _perform(task, conn, Path(data_dir))
                conn.send(("done", task.name, result))
                task = None
    except KeyboardInterrupt:  # a second Ctrl-C: the trainer stopped at once
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if task is not None:
            with contextlib.suppress(OSError):
                conn.send(("done", task.name, Result("interrupted", "stopped at once by a second Ctrl-C")))
    except OSError:
        return  # the parent is gone


def _perform(task: Task, conn, data_dir: Path) -> Result:
    from mlecli import evaluate as ev
    from mlecli import sweep
    from mlecli import train
    from mlecli.config import from_dict
    from mlecli.errors import MlecliError

    def send(*message) -> None:
        with contextlib.suppress(OSError):
            conn.send(message)

    if _stop_signal is not None:
        return Result("not started")
    report = train.Reporter(line=lambda text: send("epoch", task.name, None),
                            log=lambda msg: send("log", task.name, msg), progress=False)
    run_dir = Path(task.run_dir)
    try:
        if task.action != "evaluate":
            cfg = from_dict(task.config, name=str(task.config["name"]))
            resume_from = None
            if task.action == "resume":
                resume_from = train.newest_checkpoint(run_dir, report.log)
                cfg = train.resumed_config(resume_from.config, ())
            else:
                if task.action == "restart":
                    sweep.clear_unstarted(run_dir)
                train.prepare_run_dir(run_dir, resume=False)
            outcome = train.run(cfg, run_dir, data_dir=data_dir, report=report, resume_from=resume_from)
            if outcome.interrupted:
                return Result("interrupted")
        if task.evaluate and _stop_signal is None:
            ev.save_report(ev.evaluate(run_dir, which="best", split="test", data_dir=data_dir, log=report.log))
        return Result("finished")
    except MlecliError as exc:
        return Result("failed", str(exc))
    except Exception as exc:  # a bug: reported as the run's failure, and the sweep goes on
        return Result("failed", f"internal error (a bug in mlecli, please report it): {type(exc).__name__}: {exc}")
