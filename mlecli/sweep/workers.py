"""Running a sweep's runs in parallel worker processes.

The parent hands each idle worker one run at a time over a pipe and listens to all of
them, and to their deaths, at once. A worker is a fresh Python process
(multiprocessing's "spawn") in a process group of its own, whose BLAS runs on
`threads` threads; it trains with the ordinary trainer, one `train.run` call per run,
and keeps each dataset it has read loaded for its next runs (`cache.keep_loaded`).

Stopping. A terminal's Ctrl-C (or a SIGTERM, SIGHUP) reaches the parent only, since the
workers have their own process group. The parent then starts no more runs and sends
each busy worker exactly one SIGTERM: a trainer finishes its batch, saves last.npz and
returns (a worker not yet training drops its run). A second signal is passed on as a
second SIGTERM, which stops a trainer at once (the trainer's own rule), and a worker
that has still not ended 5 s later is killed. Each SIGTERM comes with a SIGCONT, so that
a worker someone stopped (SIGSTOP) ends too; one that has not ended 30 s after the
first signal is killed (its run goes on from its last checkpoint, like a run stopped at
once). Ctrl-Z stops the workers with the parent,
and they go on with it. A worker that dies (kill -9, out of memory) fails its run only:
a new worker takes the next run. Workers die with the parent (PR_SET_PDEATHSIG: a
SIGTERM, so a trainer saves first).

This module imports no numpy at the top: a worker's BLAS thread count is set (in its
environment) before numpy loads the BLAS.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from mlecli.safe.errors import MlecliError, Stopped

POLL = 0.5  # seconds between looks at the clock while waiting for the workers
KILL_AFTER = 5.0  # seconds after a second signal before a worker is killed
GIVE_UP_AFTER = 30.0  # seconds after the first signal before a worker that has not ended is killed
STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


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


def run_tasks(
    tasks: list[Task], *, jobs: int, threads: int, data_dir: Path, events: Events
) -> tuple[dict[str, Result], str | None]:
    """Run `tasks` on up to `jobs` workers; return each task's Result by name, and the
    signal that stopped the sweep (None if it was not stopped)."""
    ctx = multiprocessing.get_context("spawn")
    pending = deque(tasks)
    results: dict[str, Result] = {}
    workers: list[_Worker] = []
    stop = _Stop(lambda: workers)
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
                stop.pass_on(busy)
                ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=POLL))
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
            if self.process.exitcode == 0:  # it ended on a signal before it read the task
                result = Result("not started")
            else:
                result = Result("failed", f"its worker process died ({_exit(self.process.exitcode)}); run the "
                                          "same sweep again to resume it from its last checkpoint")
            results[self.task.name] = result
            events("done", self.task.name, result)
            self.task = None

    def close(self) -> None:
        """Ask the worker to end, and make sure it does."""
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.signal(signal.SIGCONT)  # a stopped worker could not read it
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
    """The parent's signals: the first (SIGINT, SIGTERM, SIGHUP) stops the sweep cleanly,
    a second stops the workers at once; Ctrl-Z (SIGTSTP) suspends the workers with the
    parent."""

    def __init__(self, workers: Callable[[], list[_Worker]]):
        self.signal: str | None = None
        self.count = 0  # signals received
        self.at_once: float | None = None  # when the second one came
        self.first_at: float | None = None  # when the first was passed on
        self._workers = workers
        self._told: dict[int, int] = {}  # worker pid → SIGTERMs sent
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        self.count += 1
        if self.signal is None:
            self.signal = signal.Signals(signum).name
        elif self.at_once is None:
            self.at_once = time.monotonic()

    def _suspend(self, signum, frame):
        for w in self._workers():
            w.signal(signal.SIGSTOP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # this process stops here until SIGCONT
        signal.signal(signal.SIGTSTP, self._suspend)
        for w in self._workers():
            w.signal(signal.SIGCONT)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
            if hasattr(signal, "SIGTSTP"):
                self._old[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, self._suspend)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def pass_on(self, busy: list[_Worker], now: float | None = None) -> None:
        """Send each busy worker one SIGTERM per signal received (up to two), each with a
        SIGCONT (a stopped worker would never see it), and kill the ones still busy 5 s
        after the second, or GIVE_UP_AFTER s after the first: their runs go on from their
        last checkpoints."""
        if self.signal is None:
            return
        now = time.monotonic() if now is None else now
        if self.first_at is None:
            self.first_at = now
        for w in busy:
            pid = w.process.pid
            while self._told.get(pid, 0) < min(self.count, 2):
                w.signal(signal.SIGTERM)
                w.signal(signal.SIGCONT)
                self._told[pid] = self._told.get(pid, 0) + 1
            if ((self.at_once is not None and now - self.at_once > KILL_AFTER)
                    or now - self.first_at > GIVE_UP_AFTER):
                w.signal(signal.SIGKILL)


# ---------------------------------------------------------------------------
# The worker


class _Stopped(BaseException):
    """A signal reached a worker outside a training (which has handlers of its own): what
    the worker was doing is dropped. A BaseException, so that nothing swallows it."""


_stop_signal: str | None = None  # the first signal that reached the worker's own handler


def _on_stop_signal(signum, frame):
    global _stop_signal
    if _stop_signal is not None:
        return  # already on the way out
    _stop_signal = signal.Signals(signum).name
    raise _Stopped(_stop_signal)


@contextlib.contextmanager
def _no_signals() -> Iterator[None]:
    """Hold signals back for the block (a message on the pipe is sent whole)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (best effort elsewhere)."""
    try:
        import ctypes  # lazy: only in the worker, for prctl

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def worker_main(conn, data_dir: str, threads: int, parent: int) -> None:
    """A worker's life: take tasks from `conn` until told to stop (None), stopped by a
    signal, or the parent is gone. Signals arrive blocked (see _signals_blocked)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)
    try:
        os.setpgrp()  # a terminal's Ctrl-C goes to the parent, which passes it on once
        _die_with_parent(parent)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # one that came meanwhile arrives here
        from mlecli.data import cache  # lazy: a worker sets its BLAS threads before numpy loads
        from mlecli.nn import blas  # lazy: a worker sets its BLAS threads before numpy loads

        with cache.keep_loaded(), blas.threads(threads):
            while True:
                task = conn.recv()
                if task is None:
                    return
                result = None
                try:
                    result = _perform(task, conn, Path(data_dir))
                finally:  # a signal landing as the run ends stops the worker, not its result on the way
                    if result is not None:
                        with _no_signals():
                            conn.send(("done", task.name, result))
    except (_Stopped, Stopped, EOFError, OSError):
        return  # stopped by a signal (the trainer's own Stopped: before its training began), or the parent is gone
    except BaseException as exc:  # a bug: one line, and the parent reports the run as failed
        print(f"mlecli sweep worker {os.getpid()}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        os._exit(1)


def recorded_threads(cp) -> int | None:
    """The BLAS threads a checkpoint's run trained on, where its bits depend on them
    (batches over 64: step.blas_threads), else None (the trainer sets its own)."""
    from mlecli.nn.step import blas_threads  # lazy: a worker sets its BLAS threads before numpy loads

    threads = (cp.meta.get("blas") or {}).get("threads")
    if blas_threads(cp.config.train.batch_size) is not None or not isinstance(threads, int) or threads < 1:
        return None
    return threads


def _perform(task: Task, conn, data_dir: Path) -> Result:
    """Train (and maybe evaluate) one run; every error becomes the run's Result."""
    from mlecli.nn import blas  # lazy: a worker sets its BLAS threads before numpy loads
    from mlecli.run import evaluate as ev  # lazy: a worker sets its BLAS threads before numpy loads
    from mlecli.run import train  # lazy: a worker sets its BLAS threads before numpy loads
    from mlecli.run.config import from_dict  # lazy: a worker sets its BLAS threads before numpy loads
    from mlecli.run.rundir import clear_unstarted  # lazy: a worker sets its BLAS threads before numpy loads
    from mlecli.sweep.record import config_difference  # lazy: a worker sets its BLAS threads before numpy loads
    from mlecli.sweep.runs import run_row  # lazy: a worker sets its BLAS threads before numpy loads

    def send(*message) -> None:
        with _no_signals(), contextlib.suppress(OSError):
            conn.send(message)

    def log(msg: str) -> None:
        if not msg.startswith(announcement):  # each run's "training ...": the sweep's lines say it
            send("log", task.name, msg)

    cfg = from_dict(task.config, name=str(task.config["name"]))
    announcement = f"training {cfg.name}: "
    report = train.Reporter(line=lambda text: send("epoch", task.name, None), log=log, progress=False)
    run_dir = Path(task.run_dir)
    try:
        if _stop_signal is not None:
            return Result("not started")
        if task.action != "evaluate":
            resume_from, threads = None, None
            if task.action == "resume":
                resume_from = train.newest_checkpoint(run_dir, report.log)
                differs = config_difference(resume_from.config, cfg)
                if differs:
                    raise MlecliError(f"{resume_from.path} holds a run whose {differs}; move {run_dir} away and run "
                                      "the sweep again")
                cfg = train.resumed_config(resume_from.config, ())
                threads = recorded_threads(resume_from)
            elif task.action == "restart":
                clear_unstarted(run_dir)
            with blas.threads(threads):  # a resumed run goes on with the threads it began with: the same bits
                outcome = train.run(cfg, run_dir, data_dir=data_dir, report=report, resume_from=resume_from)
            if outcome.interrupted:
                return Result("interrupted", "stopped at once: it goes on from its last checkpoint"
                              if outcome.at_once else None)
        if task.evaluate:
            ev.save_report(ev.evaluate(run_dir, which="best", split="test", data_dir=data_dir, log=report.log))
        return Result("finished")
    except (_Stopped, Stopped, train.StopNow):  # outside the training loop: the folder says where the run is
        status = run_row(run_dir)["status"] if (run_dir / "checkpoints" / "last.npz").is_file() else "not started"
        return Result(status if status in ("finished", "interrupted") else "not started")
    except MlecliError as exc:
        return Result("failed", str(exc))
    except Exception as exc:  # any type, on purpose: a bug fails this run, named as a bug; the sweep goes on
        return Result("failed", f"internal error (a bug in mlecli, please report it): {type(exc).__name__}: {exc}")
