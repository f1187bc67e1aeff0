"""Sweep speed: `mlecli sweep --jobs 2` against the same runs made one after another, and
the same sweep on a Dask cluster (`--cluster`, issue #22).

    python benchmarks/bench_sweep.py [--rounds 3]

Workload (issue #14): 8 runs of the default network (784-128-1, batch 32) on
Fashion-MNIST (Debian's files, imported offline): the default config's 60,000 training
images (54,000 trained on, 6,000 held out for validation), 3 epochs each; 4 learning
rates (0.01, 0.02, 0.05, 0.1) x seeds 0-1. Each round times, in turn (the order rotates
from round to round, and this machine is shared, so a drift of its speed lands on all):

- one after another: one process that loads mlecli, then makes the 8 runs with
  `train.run`, one after the other, inside `blas.threads(2)`; only the runs are timed
  (no start-up). The reference.
- `mlecli sweep --jobs 1`: the same runs by the command with one worker (2 BLAS threads),
  the whole command timed.
- `mlecli sweep --jobs 2`: two workers of 1 BLAS thread each, the whole command timed
  (start-up, spawning the workers, reading the data, the table at the end).

- `mlecli sweep --cluster local:2`: the same sweep on a LocalCluster of 2 worker processes
  that the command starts (and stops) itself, the whole command timed. Against `--jobs 2`
  in the same round: the engine's overhead per run, (cluster - jobs 2) / 8, in seconds.
- `mlecli sweep --cluster tcp://…`: the same sweep on a scheduler with 2 workers of one
  thread each that this benchmark started before the rounds (a LocalCluster of its own; its
  start-up is not timed). From Dask's own timings of each run's task: the scheduler's
  transition log (when the task went to a worker, when its result came back) and the task
  stream (when the worker began and ended computing it): the scheduling overhead per task =
  (back at the scheduler - sent to a worker) - computing. And inside each task, what is not
  the run's own epochs: the task's computing time minus the seconds metrics.jsonl records
  for its epochs (a fresh process per run, numpy and the data loaded, checkpoints written).

At batch 32 the trainer runs its BLAS on one thread whatever it is given (`step.blas_threads`:
faster there than two), so "2 BLAS threads" changes nothing for this workload; the
reference is the fastest way to make the runs one after another. The goal: the sweep with
--jobs 2 takes at most 0.65x the reference. Also checked: the weights of every run of the
sweep are bit-identical to the reference's.

Load: before each round the 1-minute load average, and during each round the CPU the
rest of the machine used (all busy CPU time in /proc/stat minus this benchmark's own
processes), in cores; and for each way of running, its processes' CPU seconds (the
whole process, start-up included) and the cores it got (CPU seconds over its seconds).
With the kernel's autogroup scheduling (on here: /proc/sys/kernel/sched_autogroup_enabled),
CPU is shared fairly between sessions, not threads: while other sessions keep the cores
busy, two workers get no more CPU than one, and the sweep cannot be faster than the runs
one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cached_fashion, table, write_results  # noqa: E402

GRID = ["--grid", "train.learning_rate=0.01,0.02,0.05,0.1", "--seeds", "0-1"]
SETS = ["--set", "data.dataset=fashion-mnist", "--set", "train.epochs=3"]
CORES = len(os.sched_getaffinity(0))

SEQUENTIAL = """
import sys, time
from pathlib import Path
from mlecli.nn import blas
from mlecli.sweep import grid
from mlecli.run import train
sweep_dir, data_dir = Path(sys.argv[1]), Path(sys.argv[2])
p = grid.plan("default", tuple(sys.argv[3:]), ({grid!r},), {seeds!r})
report = train.Reporter(line=lambda s: None, log=lambda s: None, progress=False)
t0 = time.perf_counter()
with blas.threads(2):
    for r in p.order():
        train.run(r.config, sweep_dir / r.name, data_dir=data_dir, report=report)
print(time.perf_counter() - t0)
"""


def busy_jiffies() -> int:
    """All CPU time spent busy on this machine so far, in clock ticks."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields[:8]) - idle


def own_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    s = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime + s.ru_utime + s.ru_stime


def run_sequential(out: Path, data: Path) -> tuple[float, float]:
    """(seconds of the 8 runs, CPU seconds of the whole process)"""
    script = SEQUENTIAL.format(grid=GRID[1], seeds=(0, 1))
    cpu0 = own_seconds()
    res = subprocess.run([sys.executable, "-c", script, str(out), str(data), *SETS[1::2]],
                         capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1]), own_seconds() - cpu0


def run_sweep(out: Path, data: Path, jobs: int) -> tuple[float, float]:
    """(seconds of the whole command, CPU seconds of its processes)"""
    t0, cpu0 = time.perf_counter(), own_seconds()
    subprocess.run([sys.executable, "-m", "mlecli", "sweep", *SETS, *GRID, "--jobs", str(jobs), "--sweep-dir", str(out),
                    "--data-dir", str(data), "-q"], capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, own_seconds() - cpu0


def run_cluster_sweep(out: Path, data: Path, address: str) -> tuple[float, float]:
    """`--cluster ADDRESS`: (seconds of the whole command, CPU seconds of its processes)"""
    t0, cpu0 = time.perf_counter(), own_seconds()
    subprocess.run([sys.executable, "-m", "mlecli", "sweep", *SETS, *GRID, "--cluster", address, "--sweep-dir",
                    str(out), "--data-dir", str(data), "-q"], capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, own_seconds() - cpu0


def dask_timings(client, out: Path, since: float) -> dict[str, list[float]]:
    """From Dask's own records of the sweep just made on `client`'s cluster: for each worker,
    the scheduling overhead per task, i.e. the time from the scheduler sending its first
    task to getting its last result back, less the time the worker computed them, shared
    among its tasks (the scheduler's transition log gives the first two, the task stream
    the third); and the tasks' computing time minus their runs' epochs, per run (seconds)."""
    log = client.run_on_scheduler(lambda dask_scheduler: [(t[0], t[1], t[2], t[-1])
                                                          for t in dask_scheduler.transition_log])
    sent, back = {}, {}
    for key, start, finish, when in log:
        if not str(key).startswith("mlecli-sweep-") or when < since:
            continue
        if finish == "processing":
            sent[key] = when
        elif start == "processing" and finish == "memory":
            back[key] = when
    computed = {}  # key -> (worker, seconds computing)
    for t in client.get_task_stream(start=since):
        if str(t["key"]).startswith("mlecli-sweep-") and t["key"] in sent and t["key"] in back:
            computed[t["key"]] = (t["worker"], sum(s["stop"] - s["start"] for s in t["startstops"]
                                                   if s["action"] == "compute"))
    overhead = []
    for worker in {w for w, _ in computed.values()}:
        keys = [k for k, (w, _) in computed.items() if w == worker]
        span = max(back[k] for k in keys) - min(sent[k] for k in keys)
        overhead.append((span - sum(computed[k][1] for k in keys)) / len(keys))
    epochs = sum(json.loads(line)["seconds"] for run in out.iterdir() if run.is_dir()
                 for line in (run / "metrics.jsonl").read_text().splitlines())
    return {"scheduling": overhead,
            "outside_epochs": [(sum(seconds for _, seconds in computed.values()) - epochs) / len(computed)]}


def same_weights(a: Path, b: Path) -> bool:
    import numpy as np

    for name in ("last.npz", "best.npz"):
        with np.load(a / "checkpoints" / name) as x, np.load(b / "checkpoints" / name) as y:
            if any(x[k].tobytes() != y[k].tobytes() for k in x.files if k != "meta"):
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    kinds = ["one after another", "sweep --jobs 1", "sweep --jobs 2", "sweep --cluster local:2",
             "sweep --cluster tcp (2 workers)"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}  # CPU seconds
    loads, others = [], []
    identical = {}
    dask: dict[str, list[float]] = {"scheduling": [], "outside_epochs": []}
    import distributed

    with tempfile.TemporaryDirectory() as tmp, distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0",
            silence_logs=50, memory_limit=0) as cluster, distributed.Client(cluster) as client:
        data = Path(tmp) / "data"
        cached_fashion(data)
        client.get_task_stream()  # the scheduler records the task stream from its first call on
        for rnd in range(args.rounds):
            loads.append(os.getloadavg()[0])
            t0, busy0, own0 = time.perf_counter(), busy_jiffies(), own_seconds()
            order = kinds[rnd % len(kinds):] + kinds[: rnd % len(kinds)]
            for kind in order:
                out = Path(tmp) / f"r{rnd}-{kind.split(' (')[0].replace(' ', '_')}"
                if kind == "one after another":
                    seconds, cpu_seconds = run_sequential(out, data)
                elif kind.startswith("sweep --jobs"):
                    seconds, cpu_seconds = run_sweep(out, data, int(kind[-1]))
                elif kind == "sweep --cluster local:2":
                    seconds, cpu_seconds = run_cluster_sweep(out, data, "local:2")
                else:
                    since = time.time()
                    seconds, cpu_seconds = run_cluster_sweep(out, data, cluster.scheduler_address)
                    for name, values in dask_timings(client, out, since).items():
                        dask[name] += values
                times[kind].append(seconds)
                cpu[kind].append(cpu_seconds)
            wall = time.perf_counter() - t0
            theirs = (busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK") - (own_seconds() - own0)
            others.append(max(0.0, theirs) / wall)
            ref = Path(tmp) / f"r{rnd}-one_after_another"
            names = sorted(p.name for p in ref.iterdir() if p.is_dir())
            for kind in kinds[1:]:
                par = Path(tmp) / f"r{rnd}-{kind.split(' (')[0].replace(' ', '_')}"
                identical[kind] = sum(same_weights(ref / n, par / n) for n in names), len(names)
            print(f"round {rnd + 1}: "
                  + ", ".join(f"{k} {times[k][-1]:.2f} s ({cpu[k][-1]:.2f} CPU s)" for k in kinds)
                  + f"; load average {loads[-1]:.2f}, others used {others[-1]:.2f} cores", flush=True)
    ref = times["one after another"]
    ratios = {k: [t / r for t, r in zip(times[k], ref)] for k in kinds}
    print()
    print(f"8 runs (default network, batch 32, 3 epochs, Fashion-MNIST 54,000 + 6,000 validation images) on "
          f"{CORES} cores; {args.rounds} rounds; medians")
    print(table(["how", "seconds", "min", "max", "/ one after another", "CPU s", "cores it got"],
                [[k, statistics.median(times[k]), min(times[k]), max(times[k]), statistics.median(ratios[k]),
                  statistics.median(cpu[k]), statistics.median(c / t for c, t in zip(cpu[k], times[k]))]
                 for k in kinds]))
    goal = statistics.median(ratios["sweep --jobs 2"])
    print(f"sweep --jobs 2 / one after another: {goal:.3f} (median of the rounds' ratios; goal <= 0.65: "
          f"{'met' if goal <= 0.65 else 'NOT met'})")
    for kind in kinds[1:]:
        print(f"weights of {kind}'s runs bit-identical to the runs made one after another: "
              f"{identical[kind][0]}/{identical[kind][1]}")
    overhead = [(c - j) / 8 for c, j in zip(times["sweep --cluster local:2"], times["sweep --jobs 2"])]
    print(f"--cluster local:2 against --jobs 2, the engine's overhead per run: {statistics.median(overhead):.2f} s "
          f"(median of the rounds; {min(overhead):.2f} to {max(overhead):.2f}), of which starting and stopping "
          f"the LocalCluster is shared by the 8 runs")
    sched = sorted(dask["scheduling"])
    print(f"Dask's own timings on the scheduler with 2 workers: scheduling overhead per task (a worker's first task "
          f"sent to its last result back, less its computing, per task; {len(sched)} workers x rounds) median "
          f"{1000 * statistics.median(sched):.1f} ms, max {1000 * max(sched):.1f} ms; inside a task, computing minus "
          "its run's epochs: "
          f"{statistics.median(dask['outside_epochs']):.2f} s per run (a fresh process, numpy and the data loaded, "
          "checkpoints written)")
    print("CPU s of sweep --cluster tcp: the sweep command's processes only (the workers are this benchmark's own "
          "LocalCluster, counted under others)")
    print(f"machine load: 1-minute load average {min(loads):.2f}-{max(loads):.2f} before the rounds; other "
          f"processes used {min(others):.2f}-{max(others):.2f} cores during them")
    path = write_results("bench_sweep", {"times": times, "ratios": ratios, "cpu_seconds": cpu, "load_average": loads,
                                         "others_cores": others, "identical": identical, "dask": dask,
                                         "cluster_overhead_per_run": overhead})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
