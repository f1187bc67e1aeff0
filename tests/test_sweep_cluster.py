"""`mlecli sweep --cluster`: a sweep's runs as tasks on a real Dask cluster (a scheduler and
two worker processes on 127.0.0.1, started with the `dask` command line as docs/sweep.md
shows, or `--cluster local:N`), with the folders, weights, sweep.json, table and picture of
a local sweep; a worker killed with SIGKILL, a stopped scheduler and Ctrl-C each leave a
sweep that finishes (now, or when the same command runs again) bit-identical."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import distributed
import pytest
from click.testing import CliRunner
from conftest import require

from mlecli.cli import main
from mlecli.safe.locks import is_locked
from mlecli.sweep import cluster

RUNS = ["learning_rate=0.05,seed=0", "learning_rate=0.1,seed=0",  # in start order
        "learning_rate=0.05,seed=1", "learning_rate=0.1,seed=1"]
GRID = ("--grid", "train.learning_rate=0.05,0.1", "--seeds", "0-1")
DASK = Path(sys.executable).parent / "dask"


def cli(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def same_files(a: Path, b: Path, *names: str) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), (a, name)


def assert_same_weights(a: Path, b: Path) -> None:
    """Byte-identical last.npz and best.npz: a checkpoint is a pure function of the training state."""
    same_files(a, b, "checkpoints/last.npz", "checkpoints/best.npz")


def epochs_of(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def until(condition, what: str, timeout: float = 60.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"the sweep ended first: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{what}: not in {timeout:.0f} s"
        time.sleep(0.01)


class DaskCluster:
    """`dask scheduler` and `dask worker … --nworkers 2 --nthreads 1`, each a process group."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.scheduler = self._start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                     "--scheduler-file", folder / "scheduler.json")
        until(lambda: (folder / "scheduler.json").is_file() and (folder / "scheduler.json").stat().st_size,
              "the scheduler's address")
        self.address = json.loads((folder / "scheduler.json").read_text())["address"]
        self.workers = self._start("workers", "worker", self.address, "--nworkers", "2", "--nthreads", "1",
                                   "--no-dashboard", "--host", "127.0.0.1", "--local-directory", folder / "space")
        self.wait_for_workers()

    def _start(self, log: str, *args) -> subprocess.Popen:
        with open(self.folder / f"{log}.log", "ab") as out:
            return subprocess.Popen([str(DASK), *map(str, args)], stdout=out, stderr=out, process_group=0)

    def wait_for_workers(self, n: int = 2) -> None:
        """Until the scheduler has exactly `n` workers (a killed one gone, its restart joined)."""
        with distributed.Client(self.address, timeout=20) as client:
            until(lambda: len(client.scheduler_info(n_workers=-1)["workers"]) == n, f"{n} Dask workers")

    def stop(self) -> None:
        for proc in (self.workers, self.scheduler):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in (self.workers, self.scheduler):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny, tiny_folder):
    """A config whose runs take about a second (so that they can be interrupted), the data
    cache, and an uninterrupted local sweep (`--jobs 2`) of 2 learning rates x 2 seeds."""
    root = tmp_path_factory.mktemp("cluster-sweep")
    cfg = tiny.write_config(root / "tiny.toml", tiny_folder, "validation = 0.2\n[model]\nhidden = [8]\n"
                            "[train]\nepochs = 12\nbatch_size = 1\nlearning_rate = 0.05\n")
    data = root / "data"
    ref = root / "local" / "lr"
    res = cli("sweep", cfg, *GRID, "--sweep-dir", ref, "--data-dir", data, "--jobs", 2)
    assert res.exit_code == 0, res.output
    return cfg, data, ref, res


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    c = DaskCluster(tmp_path_factory.mktemp("dask"))
    yield c
    c.stop()


def sweep_process(cfg, sweep_dir, data, *extra):
    """`mlecli sweep` as a shell runs a job: in a process group of its own, which Ctrl-C signals."""
    return subprocess.Popen(
        [sys.executable, "-m", "mlecli", "sweep", str(cfg), *GRID, "--sweep-dir", str(sweep_dir), "--data-dir",
         str(data), *map(str, extra)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        process_group=0, text=True,
    )


def holder(lock: Path) -> int | None:
    """The process that has `lock` open (a run's trainer), if one has."""
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == str(lock) for fd in fd_dir.iterdir()):
                return int(fd_dir.parent.name)
        except OSError:
            continue
    return None


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


# ---------------------------------------------------------------------------
# The same sweep


def test_a_sweep_on_a_dask_cluster_is_the_local_sweep_bit_for_bit(setup, dask_cluster, tmp_path):
    cfg, data, ref, local = setup
    folder = tmp_path / "lr"
    proc = sweep_process(cfg, folder, data, "--cluster", dask_cluster.address)
    until(lambda: list(folder.glob("*/checkpoints/epoch-0001.npz")), "a first epoch", proc=proc)
    # A local sweep of the same folder meanwhile trains nothing: the folder is the cluster sweep's.
    res = cli("sweep", cfg, *GRID, "--sweep-dir", folder, "--data-dir", data)
    assert res.exit_code == 1
    assert res.stderr == (f"Error: sweep folder {folder} is in use by another mlecli process "
                          f"(lock {folder / '.lock'}); wait for it to finish or use another folder\n")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert err.splitlines()[:2] == [
        f"on the Dask cluster at {dask_cluster.address}: 2 workers, 2 threads",
        f"sweep {folder}: 2 grid points x 2 seeds = 4 runs (0 finished, 0 to resume, 4 to start) on 2 workers, "
        "1 BLAS thread each"]
    assert out == local.stdout.replace(str(ref), str(folder))
    for name in RUNS:
        assert_same_weights(folder / name, ref / name)
        assert epochs_of(folder / name) == list(range(1, 13))
    recorded = {k: v for k, v in json.loads((folder / "sweep.json").read_text()).items() if k != "created"}
    assert recorded == {k: v for k, v in json.loads((ref / "sweep.json").read_text()).items() if k != "created"}
    when = ("path", "started", "seconds")  # where and when each was made
    listed = [[{k: v for k, v in row.items() if k not in when} for row in json.loads(res.stdout)]
              for res in (cli("runs", folder.parent, "--json"), cli("runs", ref.parent, "--json"))]
    assert listed[0] == listed[1]
    assert cli("plot", folder).exit_code == 0 and cli("plot", ref).exit_code == 0
    same_files(folder, ref, "compare.png")


# ---------------------------------------------------------------------------
# Faults


def test_a_dask_worker_killed_mid_run_loses_nothing_and_the_sweep_finishes_bit_identical(setup, dask_cluster,
                                                                                         tmp_path):
    cfg, data, ref, _ = setup
    folder = tmp_path / "lr"
    proc = sweep_process(cfg, folder, data, "--cluster", dask_cluster.address)
    until(lambda: list(folder.glob("*/checkpoints/epoch-0002.npz")), "a second epoch", proc=proc)
    victim = trainer = None
    while trainer is None:  # a run well before its end: its trainer holds the run folder's lock
        assert proc.poll() is None, "the sweep ended first"
        for name in RUNS:
            if len(list((folder / name).glob("checkpoints/epoch-*.npz"))) in range(1, 7):
                trainer = holder(folder / name / ".lock")
                if trainer is not None:
                    victim = name
                    break
    os.kill(parent_of(trainer), signal.SIGKILL)  # the Dask worker process whose task trains it
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "failed" not in err and "Traceback" not in err
    for name in RUNS:
        assert_same_weights(folder / name, ref / name)
        assert epochs_of(folder / name) == list(range(1, 13))
    # its trainer saved its place as its worker died, and the task Dask ran again resumed it
    assert len(json.loads((folder / victim / "manifest.json").read_text())["resumed"]) >= 1
    dask_cluster.wait_for_workers(2)  # the nanny started a new worker process


def test_ctrl_c_stops_a_sweep_on_a_local_cluster_cleanly_and_running_it_again_finishes_bit_identical(
        setup, dask_cluster, tmp_path):
    cfg, data, ref, _ = setup
    folder = tmp_path / "lr"
    # local:2: a LocalCluster's worker processes are in the sweep's process group, which Ctrl-C signals
    proc = sweep_process(cfg, folder, data, "--cluster", "local:2")
    until(lambda: list(folder.glob("*/checkpoints/epoch-0002.npz")), "a second epoch", proc=proc)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C on a terminal
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and out == ""
    status = {n: json.loads((folder / n / "manifest.json").read_text())["ended"]
              for n in RUNS if (folder / n / "manifest.json").exists()}
    finished = sum(e["status"] == "finished" for e in status.values())
    saved = sum(e == {**e, "status": "interrupted", "error": None} for e in status.values())
    assert saved >= 1 and finished + saved == len(status)
    assert err.splitlines()[-1] == (
        f"Stopped by SIGINT: {finished} of 4 runs finished, {saved} saved mid-run. Continue with: mlecli sweep {cfg} "
        f"--grid train.learning_rate=0.05,0.1 --seeds 0-1 --cluster local:2 --data-dir {data} --sweep-dir {folder}")
    assert re.fullmatch(r"on a local Dask cluster \(tcp://127\.0\.0\.1:\d+\): 2 workers, 2 threads"
                        r"(; dashboard http://127\.0\.0\.1:\d+/status)?", err.splitlines()[0])
    again = sweep_process(cfg, folder, data, "--cluster", dask_cluster.address)  # or anywhere: the folder says all
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert f"({finished} finished, {saved} to resume, {4 - finished - saved} to start)" in err
    for name in RUNS:
        assert_same_weights(folder / name, ref / name)
        assert epochs_of(folder / name) == list(range(1, 13))


def test_a_stopped_scheduler_ends_the_sweep_in_one_line_and_the_same_command_finishes_it(setup, tmp_path):
    cfg, data, ref, _ = setup
    doomed = DaskCluster(tmp_path / "dask")
    folder = tmp_path / "lr"
    try:
        proc = sweep_process(cfg, folder, data, "--cluster", doomed.address)
        until(lambda: list(folder.glob("*/checkpoints/epoch-0002.npz")), "a second epoch", proc=proc)
        os.killpg(doomed.scheduler.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        doomed.stop()  # and with its workers, the trainers they started save their runs
    assert proc.returncode == 1, err
    lines = err.splitlines()
    assert [line for line in lines if not line.startswith(("[", "on the Dask cluster", "sweep "))] == [lines[-1]]
    assert lines[-1].startswith(f"Error: the Dask scheduler at {doomed.address} went away (")
    assert lines[-1].endswith("each run goes on from its last checkpoint: run the same command again to continue "
                              "the sweep")
    until(lambda: not any(is_locked(folder / n) for n in RUNS if (folder / n).is_dir()), "the trainers' ends")
    res = cli("sweep", cfg, *GRID, "--sweep-dir", folder, "--data-dir", data, "--jobs", 2)  # here, without it
    assert res.exit_code == 0, res.output
    for name in RUNS:
        assert_same_weights(folder / name, ref / name)
        assert epochs_of(folder / name) == list(range(1, 13))


# ---------------------------------------------------------------------------
# What is checked before anything runs


def test_a_worker_that_cannot_see_the_sweep_folder_fails_the_sweep_in_one_line_naming_both(setup, dask_cluster,
                                                                                          tmp_path):
    cfg, data, _, _ = setup
    require(shutil.which("unshare") is not None, "unshare (util-linux) is missing: apt-get install util-linux")
    elsewhere = tmp_path / "elsewhere"  # the test's folder, hidden from one worker under an empty file system
    elsewhere.mkdir()
    with open(tmp_path / "hidden.log", "wb") as log:
        hidden = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"',
             str(tmp_path), str(DASK), "worker", dask_cluster.address, "--nthreads", "1", "--no-dashboard", "--host",
             "127.0.0.1", "--local-directory", str(elsewhere)], stdout=log, stderr=log, process_group=0)
    try:
        until(lambda: hidden.poll() is not None or "Registered to" in (tmp_path / "hidden.log").read_text(),
              "the third worker")
        require(hidden.poll() is None, f"cannot give a worker a mount namespace of its own here: "
                                       f"{(tmp_path / 'hidden.log').read_text().strip()} (run as root)")
        dask_cluster.wait_for_workers(3)
        folder = tmp_path / "lr"
        res = subprocess.run([sys.executable, "-m", "mlecli", "sweep", cfg, *GRID, "--sweep-dir", folder, "--data-dir",
                              data, "--cluster", dask_cluster.address], capture_output=True, text=True, timeout=120)
    finally:
        os.killpg(hidden.pid, signal.SIGTERM)
        hidden.wait(timeout=30)
    dask_cluster.wait_for_workers(2)
    assert res.returncode == 1
    line = res.stderr.splitlines()[-1]
    assert re.fullmatch(r"Error: Dask worker tcp://127\.0\.0\.1:\d+ cannot see the sweep folder "
                        + re.escape(f"{folder} (no such folder there): the sweep folder must be on a file system every "
                                    "worker sees, at the same path"), line)
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "sweep.json"]  # nothing trained: resumable


def test_without_distributed_cluster_says_what_to_install(setup, tmp_path, monkeypatch):
    cfg, data, _, _ = setup
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if it were not installed
    res = cli("sweep", cfg, *GRID, "--sweep-dir", tmp_path / "s", "--data-dir", data, "--cluster", "local:2")
    assert (res.exit_code, res.stderr) == (
        1, "Error: --cluster needs Dask's distributed, an optional extra: pip install 'mlecli[cluster]'\n")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("args, message", [
    (["--cluster", "local:0"], "Invalid value for '--cluster': give a Dask scheduler's address (tcp://HOST:PORT) or "
                               "local:N (a cluster of N worker processes on this machine, 1 to 1024)"),
    (["--cluster", "tcp://a b"], "Invalid value for '--cluster': give a Dask scheduler's address (tcp://HOST:PORT) "
                                 "or local:N (a cluster of N worker processes on this machine, 1 to 1024)"),
    (["--cluster", "local:2", "--jobs", "2"], "--cluster and --jobs do not go together: on a cluster its workers' "
                                              "threads are the runs at once; --dry-run starts nothing"),
    (["--cluster", "local:2", "--dry-run"], "--cluster and --dry-run do not go together: on a cluster its workers' "
                                            "threads are the runs at once; --dry-run starts nothing"),
])
def test_a_bad_cluster_option_is_a_usage_error(setup, tmp_path, args, message):
    cfg, data, _, _ = setup
    res = cli("sweep", cfg, *GRID, "--sweep-dir", tmp_path / "s", *args)
    assert res.exit_code == 2
    assert res.stderr.splitlines()[-1] == f"Error: {message}"
    assert not (tmp_path / "s").exists()


def test_a_scheduler_that_cannot_be_reached_is_one_line_before_anything_is_written(setup, tmp_path, monkeypatch):
    cfg, data, _, _ = setup
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 1.0)
    res = cli("sweep", cfg, *GRID, "--sweep-dir", tmp_path / "s", "--data-dir", tmp_path / "d",
              "--cluster", "tcp://127.0.0.1:9")  # the discard port: nothing listens
    assert res.exit_code == 1
    assert res.stderr.startswith("Error: cannot reach the Dask scheduler at tcp://127.0.0.1:9 (")
    assert res.stderr.endswith("): start one (dask scheduler) or check the address\n")
    assert len(res.stderr.splitlines()) == 1
    assert not (tmp_path / "s").exists() and not (tmp_path / "d").exists()
