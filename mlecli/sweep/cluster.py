"""A sweep's runs on a Dask cluster: `mlecli sweep --cluster ADDRESS`.

Dask's `distributed` schedules, retries and reports; mlecli keeps what is its own: what a
run is, where it writes, how it resumes. Each run that needs work is one task
(`Client.submit(run_on_worker, …)`), reported as it ends (`as_completed`). On a Dask
worker the task looks at its run folder as it is *then* (a task Dask starts again after
its worker died finds the checkpoint the first try left, and resumes it) and hands the
run to the local sweep's own machinery, `workers.run_tasks` with one task: a fresh worker
process whose BLAS threads are set before numpy loads, the ordinary trainer, the same
signals. So a run made on the cluster has the bits of the same run in a local sweep and
of `mlecli train`, and a Dask worker's memory is never a run's.

The sweep folder (and the data folder) must be at the same path on every worker: checked
before any task is sent (`cannot_see`). Two sweeps of one folder never train one run
twice: each run folder's flock is held by its trainer, wherever it runs, on a file system
whose flock holds across machines.

Stopping. A signal reaches this process only: a LocalCluster's worker processes start
with the stop signals blocked (a terminal's Ctrl-C reaches its whole process group), and a
scheduler's own workers run elsewhere. The first signal sets a Dask Event that every
running task watches (its run saves its place, as at a first Ctrl-C) and cancels the tasks
not yet running; a second sets another (the runs stop at once). The scheduler going away
cancels every future: the sweep ends in one line, and each run goes on from its last
checkpoint when the same command runs again.

distributed is an optional extra (`pip install 'mlecli[cluster]'`): it is imported inside
the functions that need it, never at the top.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import logging
import multiprocessing
import multiprocessing.resource_tracker
import os
import queue
import re
import signal
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from mlecli.run.config import from_dict
from mlecli.safe.errors import ConfigError, MlecliError
from mlecli.sweep import runner, workers
from mlecli.sweep.grid import RunSpec
from mlecli.version import __version__

INSTALL = "--cluster needs Dask's distributed, an optional extra: pip install 'mlecli[cluster]'"
CONNECT_TIMEOUT = 10.0  # seconds to reach a scheduler
WORKERS_TIMEOUT = 60.0  # seconds for a first worker to join a scheduler that has none
POLL = 0.5  # seconds between looks at the signals and the scheduler while runs go on
WATCH = 2.0  # seconds a task's watch waits on the scheduler for a stop at a time
HELD_WAIT = 30.0  # seconds a task waits for a run folder another process holds (a dead worker's trainer saving)
GIVE_UP_AFTER = workers.GIVE_UP_AFTER + 15.0  # seconds after a stop before the sweep stops waiting for its tasks
LOCAL = re.compile(r"local:(\d+)")
ADDRESS = re.compile(r"(?:[a-z][a-z0-9+.-]*://)?[^\s/:]+(?::\d+)?")


def parse_address(text: str) -> str:
    """`--cluster`: a scheduler's address (tcp://HOST:PORT) or local:N."""
    m = LOCAL.fullmatch(text)
    if m and 1 <= int(m.group(1)) <= 1024:
        return text
    if not m and ADDRESS.fullmatch(text) and not text.startswith("local"):
        return text
    raise ConfigError(f"--cluster {text!r}: give a Dask scheduler's address (tcp://HOST:PORT) or local:N "
                      "(a cluster of N worker processes on this machine, 1 to 1024)")


def _distributed():
    try:
        import distributed  # lazy: distributed is an optional extra
    except ImportError:
        raise MlecliError(INSTALL) from None
    return distributed


@contextlib.contextmanager
def _stop_signals_blocked():
    """The stop signals blocked in this thread, and in every thread and process started
    from it meanwhile (a LocalCluster's event loop, then its worker processes)."""
    # multiprocessing starts its resource tracker with the first process it spawns, and
    # unblocks SIGINT and SIGTERM in that thread afterwards, blocked before or not: it
    # must be running before they are blocked.
    multiprocessing.resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, workers.STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Cluster:
    """A Dask cluster for the length of a sweep: a client of the scheduler at `address`,
    or of a LocalCluster of N worker processes (one thread each) this process starts for
    `local:N`. `jobs` is the runs it trains at once (its workers' threads)."""

    def __init__(self, address: str, log):
        self.address = parse_address(address)
        self.log = log
        self.client = None
        self._local = None
        self._environ: dict[str, str] = {}
        self._logging = logging.root.manager.disable
        self.jobs = 0
        self._hosts: dict[str, tuple[int, int]] = {}  # host → (its cores, threads of its workers)

    def __enter__(self) -> Cluster:
        distributed = _distributed()
        # Dask reports on its own through logging (a lost connection, a restarted worker):
        # what a user needs to know, the sweep says in its own lines.
        logging.disable(logging.CRITICAL)
        self._environ = dict(os.environ)  # a LocalCluster's nannies set the workers' variables in ours
        try:
            self._connect(distributed)
            self._survey()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _connect(self, distributed) -> None:
        m = LOCAL.fullmatch(self.address)
        if m:
            try:
                with _stop_signals_blocked():
                    self._local = distributed.LocalCluster(
                        n_workers=int(m.group(1)), threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address=":0", silence_logs=logging.CRITICAL, memory_limit=0)
                    self.client = distributed.Client(self._local)
            except (OSError, RuntimeError, TimeoutError) as exc:
                raise MlecliError(f"could not start a local Dask cluster of {m.group(1)} workers "
                                  f"({_said(exc)})") from None
            return
        try:
            self.client = distributed.Client(self.address, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as exc:
            raise MlecliError(f"cannot reach the Dask scheduler at {self.address} ({_said(exc)}): start one "
                              "(dask scheduler) or check the address") from None
        try:
            self.client.wait_for_workers(1, timeout=WORKERS_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise MlecliError(f"no Dask worker joined the scheduler at {self.address} within {WORKERS_TIMEOUT:.0f} s "
                              f"({_said(exc)}): start some (dask worker {self.address})") from None

    def _survey(self) -> None:
        """The workers: their threads, their machines' cores, and that each runs this mlecli."""
        info = self.client.scheduler_info(n_workers=-1)
        about = self.client.run(describe_worker, on_error="return")
        cores: dict[str, int] = {}
        for address, said in sorted(about.items()):
            if isinstance(said, BaseException):
                raise MlecliError(f"Dask worker {address} cannot run mlecli ({_said(said)}): install mlecli "
                                  f"{__version__} on every worker")
            if said["mlecli"] != __version__:
                raise MlecliError(f"Dask worker {address} runs mlecli {said['mlecli']}, this sweep {__version__}: "
                                  "install the same mlecli on every worker")
            cores[address] = said["cores"]
        for address, w in info["workers"].items():
            host_cores, threads = self._hosts.get(w["host"], (0, 0))
            self._hosts[w["host"]] = (max(host_cores, cores.get(address, 1)), threads + w["nthreads"])
        self.jobs = sum(w["nthreads"] for w in info["workers"].values())
        dashboard = f"; dashboard {self.client.dashboard_link}" if self._has_dashboard(info) else ""
        where = f"a local Dask cluster ({self._local.scheduler_address})" if self._local else \
            f"the Dask cluster at {self.address}"
        self.log(f"on {where}: {_count(len(info['workers']), 'worker')}, {_count(self.jobs, 'thread')}{dashboard}")

    def _has_dashboard(self, info) -> bool:
        """Whether the scheduler serves Dask's dashboard (its web server may run without:
        no bokeh there, or --no-dashboard)."""
        if not info.get("services", {}).get("dashboard"):
            return False
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(self.client.dashboard_link,
                                                                                    timeout=5) as page:
                return page.status == 200
        except (OSError, ValueError):
            return False

    def __exit__(self, *exc) -> None:
        try:
            if self.client is not None:
                with contextlib.suppress(Exception):
                    self.client.close(timeout=5)
            if self._local is not None:
                with contextlib.suppress(Exception):
                    self._local.close(timeout=10)
        finally:
            if self._environ:
                os.environ.clear()
                os.environ.update(self._environ)
            logging.disable(self._logging)

    def blas_threads(self, runs: int) -> int:
        """BLAS threads for each run: on each machine, its cores shared among the runs its
        workers train at once (the fewest of any machine), as a local sweep shares them."""
        return max(1, min(cores // max(1, min(threads, runs)) for cores, threads in self._hosts.values()))

    # -----------------------------------------------------------------------
    # Running the tasks

    def run_tasks(self, tasks: list[workers.Task], *, jobs: int, threads: int, data_dir: Path,
                  events: workers.Events) -> tuple[dict[str, workers.Result], str | None]:
        """As workers.run_tasks, on the cluster: each task's Result by name, and the signal
        that stopped the sweep (None if none did)."""
        if not tasks:
            return {}, None
        from distributed import Event, as_completed  # lazy: distributed is an optional extra

        # A worker's folders are not this process's: every path absolute.
        tasks = [replace(t, run_dir=str(Path(t.run_dir).absolute())) for t in tasks]
        data_dir = Path(data_dir).absolute()
        self._check_sees(Path(tasks[0].run_dir).parent)
        name = f"mlecli-sweep-{uuid.uuid4().hex[:12]}"
        names = (name, f"{name}-stop", f"{name}-now")  # the events' topic; the first stop; the second
        inbox: queue.Queue = queue.Queue()
        self.client.subscribe_topic(name, lambda event: inbox.put(tuple(event[1])))
        futures = {}
        for i, task in enumerate(tasks):  # the first run first, as in a local sweep
            f = self.client.submit(run_on_worker, task, threads, str(data_dir), names, key=f"{name}-{i}",
                                   pure=False, priority=len(tasks) - i)
            futures[f.key] = (f, task)
        every = [f for f, _ in futures.values()]
        threading.Thread(target=lambda: [inbox.put(("done", f)) for f in as_completed(every)],
                         name="mlecli-sweep-as-completed", daemon=True).start()
        results: dict[str, workers.Result] = {}
        cancelled: set[str] = set()
        with _Signals() as signals:
            told = 0
            while len(results) < len(tasks):
                try:
                    item = inbox.get(timeout=POLL)
                except queue.Empty:
                    item = None
                while told < min(signals.count, 2):  # a stop: the runs save (a second: at once)
                    told += 1
                    Event(names[told], client=self.client).set()
                    if told == 1:
                        cancelled = self._cancel_queued(futures, results)
                if item is not None and item[0] == "done":
                    f, task = futures[item[1].key]
                    result = self._result(f, item[1].key in cancelled)
                    if result is None:  # cancelled by no one here: the scheduler went away
                        raise self._gone(tasks, results)
                    results[task.name] = result
                    events("done", task.name, result)
                elif item is not None and item[0] in ("epoch", "log"):
                    events(item[0], item[1], item[2])
                if self.client.status != "running":
                    raise self._gone(tasks, results)
                if signals.first_at is not None and time.monotonic() - signals.first_at > GIVE_UP_AFTER:
                    for f, task in futures.values():
                        if task.name not in results:
                            f.cancel()
                            results[task.name] = workers.Result(
                                "interrupted", "its Dask worker did not answer: it goes on from its last checkpoint")
        with contextlib.suppress(Exception):
            self.client.unsubscribe_topic(name)
        return results, signals.name

    def _check_sees(self, sweep_dir: Path) -> None:
        """Fail the sweep if a worker cannot see and write the sweep folder as this process
        does (the very sweep.json), before any task is sent."""
        digest = hashlib.sha256((sweep_dir / "sweep.json").read_bytes()).hexdigest()
        said = self.client.run(cannot_see, str(sweep_dir), digest, on_error="return")
        for address, why in sorted(said.items()):
            if isinstance(why, BaseException):
                why = _said(why)
            if why is not None:
                raise MlecliError(f"Dask worker {address} cannot see the sweep folder {sweep_dir} ({why}): the sweep "
                                  "folder must be on a file system every worker sees, at the same path")

    def _cancel_queued(self, futures, results) -> set[str]:
        """Cancel the tasks no worker has begun; those begun see the stop and save."""
        busy = {key for keys in self.client.processing().values() for key in keys}
        queued = {key for key, (f, task) in futures.items() if key not in busy and not f.done()}
        self.client.cancel([futures[key][0] for key in queued])
        return queued

    def _result(self, f, cancelled: bool) -> workers.Result | None:
        """A task's Result, from its future (None: it was cancelled, and not by this sweep)."""
        if f.status == "finished":
            return f.result()
        if f.status == "cancelled":
            return workers.Result("not started") if cancelled else None
        exc = f.exception()
        if type(exc).__name__ == "KilledWorker":
            times = getattr(exc, "allowed_failures", None)
            last = getattr(getattr(exc, "last_worker", None), "address", None)
            return workers.Result("failed", "Dask workers died while running it"
                                  + (f", {times + 1} times" if isinstance(times, int) else "")
                                  + (f" (the last: {last})" if last else "")
                                  + "; run the same sweep again to resume it from its last checkpoint")
        return workers.Result("failed", f"its task failed on the Dask cluster: {type(exc).__name__}: {exc}")

    def _gone(self, tasks, results) -> MlecliError:
        done = sum(r.status == "finished" for r in results.values())
        return MlecliError(f"the Dask scheduler at {self.address} went away ({done} of the {len(tasks)} runs to do "
                           "had finished); each run goes on from its last checkpoint: run the same command again to "
                           "continue the sweep")


class _Signals:
    """The sweep's own signals while its tasks run (this thread must be the main one to
    receive them): how many came, the first one's name and when."""

    def __init__(self):
        self.count = 0
        self.name: str | None = None
        self.first_at: float | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        self.count += 1
        if self.name is None:
            self.name, self.first_at = signal.Signals(signum).name, time.monotonic()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in workers.STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------
# On the workers (sent by reference: each worker imports this module)


def describe_worker() -> dict[str, Any]:
    return {"mlecli": __version__, "cores": workers.cores()}


def cannot_see(sweep_dir: str, digest: str) -> str | None:
    """Why this worker cannot work in the sweep folder (None: it can): it must read the
    very sweep.json the sweep wrote, and be able to write beside it."""
    folder = Path(sweep_dir)
    try:
        data = (folder / "sweep.json").read_bytes()
    except FileNotFoundError:
        return "its sweep.json is not there" if folder.is_dir() else "no such folder there"
    except OSError as exc:
        return f"cannot read its sweep.json there: {exc.strerror or exc}"
    if hashlib.sha256(data).hexdigest() != digest:
        return "its sweep.json there is another file: another folder has that path there"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "cannot write in it there"
    return None


def run_on_worker(task: workers.Task, threads: int, data_dir: str, names: tuple[str, str, str]) -> workers.Result:
    """One run, as a task on a Dask worker: look at its folder now, then train it (or
    evaluate it) in a fresh worker process, stopping when the sweep says so."""
    from distributed import Event, get_worker  # lazy: distributed is an optional extra

    topic, first, second = names
    if Event(first).is_set():  # the sweep was stopped before this task began
        return workers.Result("not started")
    watch = _Watch(Event(first), Event(second))
    try:
        now = _as_it_is_now(task, watch)
        if isinstance(now, workers.Result):
            return now
        worker = get_worker()

        def events(kind: str, name: str, detail: Any) -> None:
            if kind in ("epoch", "log"):  # its "done" is the task's result
                worker.log_event(topic, [kind, name, detail])

        # A Dask worker under a nanny is a daemonic process, and multiprocessing refuses
        # daemonic processes children: this one's run goes in a child of its own (which
        # ends with it, and saves its run as it does).
        multiprocessing.current_process().daemon = False
        with _main_not_imported():
            results, _ = workers.run_tasks([now], jobs=1, threads=threads, data_dir=Path(data_dir), events=events,
                                           requests=watch.count)
        return results[task.name]
    finally:
        watch.close()


_main_lock = threading.Lock()
_main_users = 0


@contextlib.contextmanager
def _main_not_imported():
    """multiprocessing's spawn makes each child import the parent's main script again (for
    the functions it may define): under `dask worker` that is Dask's command line, seconds
    of imports before every run (measured: 3.0 s to a tiny run's first epoch, 0.8 s
    without). A run's process needs nothing of it (workers.worker_main is mlecli's): while
    tasks run here, __main__ says it is a package's __main__, which spawn never imports."""
    global _main_users
    main = sys.modules.get("__main__")
    with _main_lock:
        # a main run with -m (a LocalCluster of `python -m mlecli`): spawn imports nothing of it already
        ours = main is not None and (_main_users > 0 or getattr(main, "__spec__", None) is None)
        if ours:
            _main_users += 1
            main.__spec__ = importlib.machinery.ModuleSpec("mlecli.__main__", None)
    try:
        yield
    finally:
        if ours:
            with _main_lock:
                _main_users -= 1
                if _main_users == 0:
                    main.__spec__ = None


def _as_it_is_now(task: workers.Task, watch: _Watch) -> workers.Task | workers.Result:
    """The task for the run folder as it is now (the sweep planned from what it saw when it
    began). A folder another process holds is waited for a while: the trainer of a worker
    that died saves its run and ends."""
    cfg = from_dict(task.config, name=str(task.config["name"]))
    run = RunSpec(task.name, (), (), (), cfg.model.seed, cfg)  # a folder is judged by its config alone
    deadline = time.monotonic() + HELD_WAIT
    while True:
        todo = runner.todo_of(run, Path(task.run_dir), task.evaluate)
        if todo.action != "running" or time.monotonic() > deadline or watch.count():
            break
        time.sleep(0.1)
    if watch.count():
        return workers.Result("not started")
    if todo.problem:
        return workers.Result("failed", todo.problem)
    if todo.action == "done":
        return workers.Result("finished")
    return replace(task, action=todo.action)


class _Watch:
    """The sweep's stops as a task sees them: a thread waits on the scheduler for each
    Event in turn; `count()` is how many are set (0, 1 or 2)."""

    def __init__(self, *events):
        self._events = events
        self._count = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._wait, name="mlecli-sweep-watch", daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        while self._count < len(self._events) and not self._done.is_set():
            try:
                if self._events[self._count].wait(timeout=WATCH):
                    self._count += 1
            except Exception:  # the scheduler is away for now: the run goes on meanwhile
                self._done.wait(WATCH)

    def count(self) -> int:
        return self._count

    def close(self) -> None:
        self._done.set()


def _said(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"

