"""Training speed: mlecli against PyTorch (CPU) and against the machine's GEMM floor.

    python benchmarks/bench_train.py [--repeat 5] [--batches 32 128 512] [--variants sgd momentum ...]

Workload (issue #5): a 784-128-1 sigmoid network, float32, learning rate 0.01, a binary
task over all 60,000 training images of Fashion-MNIST (Debian's files, imported offline;
classes 0-4 vs 5-9, no validation hold-out). Same machine, same run, 2 threads for
everyone. Per batch size, `--repeat` rounds, each timing one epoch of each of the three
below in turn, each right after its own untimed warm-up epoch (this machine is shared and
its speed drifts by ±20% over minutes; a drift then lands on all three). Reported:
medians, and ratios as the median of each round's own ratio.

- mlecli: the real trainer (`mlecli.run.train.run`), a 2-epoch run per round, the second
  epoch's time as it logs it in metrics.jsonl (training only: validation and checkpoint
  writes excluded).
- PyTorch 2.13 CPU: the same network, torch.set_num_threads(2), plain SGD on the summed
  BCE-with-logits, data already in tensors, batches gathered with index_select.
- floor: the epoch's matrix-multiply FLOPs (forward X·W1 and h·w2, weight gradients
  Xᵀ·δ1 and hᵀ·δ2; the input's gradient is never needed) divided by the float32 GEMM
  throughput numpy reaches here at exactly those shapes, measured in this run.

Then, at batch 128, the update rules, the prior, a schedule and shifted digits against
plain sgd (`--variants`): rounds again, each timing one epoch of every variant in turn
(each after its own warm-up epoch), the ratio the median of each round's variant/sgd,
beside the most each may cost (issue #13: momentum 1.15, Adam 1.35, shifts 1.2; the prior
and a schedule nothing measurable, taken as 1.05).

Also: `mlecli --help` start-up time, loading the cached dataset, and the peak memory
(max RSS) of a whole `mlecli train` process on the 60,000 images.
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

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import cached_fashion, median_time, table, write_results  # noqa: E402

from mlecli.data.cache import ensure_splits, load_split  # noqa: E402
from mlecli.nn.model import init_params, layer_sizes  # noqa: E402
from mlecli.nn.pixels import pixels
from mlecli.run import config, train  # noqa: E402
from mlecli.run.task import build_task  # noqa: E402

HIDDEN = 128
LR = 0.01
OVERRIDES = [
    "data.dataset=fashion-mnist", "data.validation=0", "task.positive=[0,1,2,3,4]", 'task.negative="rest"',
    f"model.hidden=[{HIDDEN}]", "model.dtype=\"float32\"", f"train.learning_rate={LR}",
]


def workload(batch: int, epochs: int, extra: tuple[str, ...] = ()):
    return config.load(None, [*OVERRIDES, f"train.batch_size={batch}", f"train.epochs={epochs}",
                              f"train.checkpoint_every={epochs}", *extra])


# The update rules, the prior and shifted digits, each timed against plain sgd in the same
# round (batch 128), with the most each may cost (issue #13).
VARIANTS = {
    "sgd": ((), None),
    "momentum": (("train.optimizer=momentum", "train.learning_rate=0.001"), 1.15),
    "nesterov": (("train.optimizer=nesterov", "train.learning_rate=0.001"), 1.15),
    "adam": (("train.optimizer=adam", "train.learning_rate=0.001"), 1.35),
    "sgd + prior": (("train.prior_sd=1.0",), 1.05),
    "sgd + cosine": (("train.schedule=cosine", "train.warmup_epochs=0.5"), 1.05),
    "shift 2": (("train.shift=2",), 1.2),
}


def mlecli_epoch(batch: int, data_dir: Path, extra: tuple[str, ...] = ()) -> float:
    """Seconds of one epoch of the real trainer, after a warm-up epoch in the same run."""
    cfg = workload(batch, 2, extra)
    with tempfile.TemporaryDirectory() as tmp:
        report = train.Reporter(line=lambda s: None, log=lambda s: None, progress=False)
        train.run(cfg, Path(tmp) / "run", data_dir=data_dir, report=report)
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    # the second epoch's training seconds as the trainer logged them
    return 60000 / lines[-1]["images_per_s"]


class TorchTrainer:
    """The same network in PyTorch: plain SGD on the summed BCE-with-logits."""

    def __init__(self, batch: int, X_np, Y_np, init):
        import torch

        torch.set_num_threads(2)
        self.torch, self.batch = torch, batch
        (W1, b1), (W2, b2) = init
        self.net = torch.nn.Sequential(torch.nn.Linear(784, HIDDEN), torch.nn.Sigmoid(), torch.nn.Linear(HIDDEN, 1))
        with torch.no_grad():
            self.net[0].weight.copy_(torch.from_numpy(W1.T.copy()))
            self.net[0].bias.copy_(torch.from_numpy(b1))
            self.net[2].weight.copy_(torch.from_numpy(W2.T.copy()))
            self.net[2].bias.copy_(torch.from_numpy(b2))
        self.X, self.Y = torch.from_numpy(X_np), torch.from_numpy(Y_np)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=LR)
        self.loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")
        self.gen = torch.Generator().manual_seed(0)

    def epoch(self) -> float:
        """Seconds of one epoch, after a warm-up epoch right before it (as mlecli gets)."""
        self._epoch()
        return self._epoch()

    def _epoch(self) -> float:
        t0 = time.perf_counter()
        order = self.torch.randperm(len(self.X), generator=self.gen)
        for k in range(0, len(self.X), self.batch):
            idx = order[k : k + self.batch]
            xb, yb = self.X.index_select(0, idx), self.Y.index_select(0, idx)
            self.opt.zero_grad(set_to_none=True)
            self.loss_fn(self.net(xb)[:, 0], yb).backward()
            self.opt.step()
        return time.perf_counter() - t0


def torch_trainer(batch: int, X_np, Y_np, init) -> TorchTrainer | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    return TorchTrainer(batch, X_np, Y_np, init)


class GemmFloor:
    """The epoch's matrix products (forward X·W1 and h·w2, weight gradients Xᵀ·δ1 and
    hᵀ·δ2) with numpy at exactly the epoch's shapes: `epoch()` times a sample of
    batches and scales it to the epoch's batch count."""

    def __init__(self, batch: int, n: int):
        rng = np.random.default_rng(0)
        self.batch, self.parts, self.flops = batch, [], 0.0
        full, rest = divmod(n, batch)
        for m, count in ((batch, full), (rest, 1 if rest else 0)):
            if not count:
                continue
            x = rng.random((m, 784), dtype=np.float32)
            W1 = rng.random((784, HIDDEN), dtype=np.float32)
            h = rng.random((m, HIDDEN), dtype=np.float32)
            w2 = rng.random((HIDDEN, 1), dtype=np.float32)
            d1 = rng.random((m, HIDDEN), dtype=np.float32)
            d2 = rng.random((m, 1), dtype=np.float32)
            products = [(x, W1, np.empty((m, HIDDEN), np.float32)), (h, w2, np.empty((m, 1), np.float32)),
                        (x.T, d1, np.empty((784, HIDDEN), np.float32)), (h.T, d2, np.empty((HIDDEN, 1), np.float32))]
            self.parts.append((products, count))
            self.flops += count * sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b, _ in products)

    def epoch(self) -> float:
        """The sample's time scaled to an epoch, after one untimed warm-up pass."""
        self._epoch()
        return self._epoch()

    def _epoch(self) -> float:
        seconds = 0.0
        for products, count in self.parts:
            reps = max(50, 20000 // self.batch)
            t0 = time.perf_counter()
            for _ in range(reps):
                for a, b, out in products:
                    np.matmul(a, b, out=out)
            seconds += (time.perf_counter() - t0) / reps * count
        return seconds


def startup_seconds(repeat: int) -> float:
    exe = Path(sys.executable).with_name("mlecli")
    cmd = [str(exe), "--help"] if exe.exists() else [sys.executable, "-m", "mlecli", "--help"]
    subprocess.run(cmd, capture_output=True, check=True)
    return median_time(lambda: subprocess.run(cmd, capture_output=True, check=True), repeat)[0]


def peak_memory_mb(data_dir: Path) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "mlecli", "train", "-q", "--run-dir", str(Path(tmp) / "run"),
                "--data-dir", str(data_dir)]
        for o in [*OVERRIDES, "train.batch_size=128", "train.epochs=1"]:
            args += ["--set", o]
        subprocess.run(args, capture_output=True, check=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info

        return ", ".join(f"{i['internal_api']} {i.get('version')} ({i['num_threads']} threads, {i.get('architecture')})"
                         for i in threadpool_info() if i["user_api"] == "blas")
    except ImportError:
        return "threadpoolctl not installed"


def variants_table(names: list[str], repeat: int, data_dir: Path) -> tuple[list[list], dict]:
    """Each variant's epoch against sgd's, interleaved in rounds (sgd first in each)."""
    if not names:
        return [], {}
    names = ["sgd", *(n for n in names if n != "sgd")]
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeat):
        for name in names:
            times[name].append(mlecli_epoch(128, data_dir, VARIANTS[name][0]))
    rows = []
    for name in names:
        med = statistics.median(times[name])
        ratio = statistics.median(t / s for t, s in zip(times[name], times["sgd"]))
        limit = VARIANTS[name][1]
        rows.append([name, f"{med:.3f}", f"{60000 / med:,.0f}", f"{ratio:.2f}", f"{limit:.2f}" if limit else "",
                     ("yes" if ratio <= limit else "NO") if limit else ""])
    return rows, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                    help="update rules etc. timed against sgd at batch 128 (none: skip that table)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        dataset = cached_fashion(data_dir)
        load_s = median_time(lambda: [load_split(dataset, data_dir, s) for s in ("train", "test")], 7)[0]
        peak = peak_memory_mb(data_dir)
        splits = ensure_splits(dataset, data_dir)
        cfg = workload(128, 1)
        task = build_task(cfg, splits, np.random.default_rng(0))
        X, Y = pixels(task.train.images, np.float32), task.train.y.astype(np.float32)
        init = init_params(layer_sizes(784, (HIDDEN,)), np.random.default_rng(0), np.float32)
        rows, results = [], []
        for batch in args.batches:
            # Rounds interleave the three measurements, so that a slow spell of this shared
            # machine lands on all of them; ratios are medians of each round's own ratios.
            theirs_trainer = torch_trainer(batch, X, Y, init)
            floor_runner = GemmFloor(batch, len(X))
            ours_t, theirs_t, floor_t = [], [], []
            for _ in range(args.repeat):
                ours_t.append(mlecli_epoch(batch, data_dir))
                if theirs_trainer is not None:
                    theirs_t.append(theirs_trainer.epoch())
                floor_t.append(floor_runner.epoch())
            ours, floor = statistics.median(ours_t), statistics.median(floor_t)
            theirs = statistics.median(theirs_t) if theirs_t else None
            vs_torch = statistics.median(o / t for o, t in zip(ours_t, theirs_t)) if theirs_t else None
            of_floor = statistics.median(f / o for f, o in zip(floor_t, ours_t))
            gflops = floor_runner.flops / floor / 1e9
            rows.append([
                batch, f"{ours:.3f}", f"{len(X) / ours:,.0f}",
                f"{theirs:.3f}" if theirs else "n/a", f"{len(X) / theirs:,.0f}" if theirs else "n/a",
                f"{vs_torch:.2f}" if theirs else "n/a", f"{floor:.3f}", f"{gflops:.0f}", f"{of_floor:.0%}",
            ])
            results.append({"batch": batch, "mlecli_s": ours_t, "pytorch_s": theirs_t, "floor_s": floor_t,
                            "mlecli_over_pytorch": vs_torch, "floor_over_mlecli": of_floor, "gemm_gflops": gflops})
        variant_rows, variant_results = variants_table(args.variants, args.repeat, data_dir)
    startup = startup_seconds(9)
    print(f"784-{HIDDEN}-1 sigmoid, float32, lr {LR}, {len(X):,} Fashion-MNIST images; {args.repeat} rounds, each "
          f"timing one epoch of mlecli, PyTorch and the floor, each after its own warm-up epoch; medians; 2 threads")
    print(f"BLAS: {blas_info()}")
    print(table(["batch", "mlecli s/epoch", "mlecli img/s", "pytorch s/epoch", "pytorch img/s",
                 "mlecli/pytorch", "floor s", "GEMM GFLOP/s", "floor/mlecli"], rows))
    print("ratios: median over rounds of that round's mlecli/pytorch and floor/mlecli")
    if not any(r["pytorch_s"] for r in results):
        print("PyTorch is not installed: `pip install torch==2.13.0` for its column (never a dependency).")
    if variant_rows:
        print(f"\nUpdate rules, prior, schedule and shifts at batch 128: {args.repeat} rounds, each timing one epoch of "
              "every row in turn (each after its own warm-up epoch); ratios: median over rounds of that round's "
              "row/sgd")
        print(table(["run", "s/epoch", "img/s", "x sgd", "at most", "ok"], variant_rows))
    print(f"\nmlecli --help: {startup * 1e3:.0f} ms   load cached train+test: {load_s * 1e3:.1f} ms   "
          f"peak memory of `mlecli train` (60,000 images, batch 128): {peak:.0f} MB")
    print("targets: batch 128/512 floor/mlecli >= 50%; mlecli/pytorch <= 0.6 for every batch; "
          "peak < 400 MB; --help < 300 ms; load < 50 ms")
    path = write_results("train", {"rows": results, "variants": variant_results, "startup_s": startup, "load_s": load_s, "peak_mb": peak,
                                   "blas": blas_info()})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
