"""Sweep speed: `mlecli sweep --jobs 2` against the same runs made one after another.

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
    kinds = ["one after another", "sweep --jobs 1", "sweep --jobs 2"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}  # CPU seconds
    loads, others = [], []
    identical = None
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        cached_fashion(data)
        for rnd in range(args.rounds):
            loads.append(os.getloadavg()[0])
            t0, busy0, own0 = time.perf_counter(), busy_jiffies(), own_seconds()
            order = kinds[rnd % 3:] + kinds[: rnd % 3]
            for kind in order:
                out = Path(tmp) / f"r{rnd}-{kind.replace(' ', '_')}"
                seconds, cpu_seconds = run_sequential(out, data) if kind == "one after another" else \
                    run_sweep(out, data, int(kind[-1]))
                times[kind].append(seconds)
                cpu[kind].append(cpu_seconds)
            wall = time.perf_counter() - t0
            theirs = (busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK") - (own_seconds() - own0)
            others.append(max(0.0, theirs) / wall)
            ref, par = Path(tmp) / f"r{rnd}-one_after_another", Path(tmp) / f"r{rnd}-sweep_--jobs_2"
            names = sorted(p.name for p in ref.iterdir() if p.is_dir())
            identical = sum(same_weights(ref / n, par / n) for n in names), len(names)
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
    print(f"weights of the sweep's runs bit-identical to the runs made one after another: "
          f"{identical[0]}/{identical[1]}")
    print(f"machine load: 1-minute load average {min(loads):.2f}-{max(loads):.2f} before the rounds; other "
          f"processes used {min(others):.2f}-{max(others):.2f} cores during them")
    path = write_results("bench_sweep", {"times": times, "ratios": ratios, "cpu_seconds": cpu, "load_average": loads,
                                         "others_cores": others, "identical": identical})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
