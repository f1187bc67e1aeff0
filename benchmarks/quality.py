"""Quality bar: mlecli's test accuracy against the same network trained with PyTorch.

    python benchmarks/quality.py [--runs default logreg ...] [--seeds 0 1]

Each shipped config is trained on real Fashion-MNIST (Debian's files, imported offline)
by mlecli, and by PyTorch 2.13 CPU with the same network (sigmoid hidden layers, one
logit), the same initial weights, the same training images and batch order, plain SGD
on the SUMMED binary cross-entropy (= ascent on the summed log-likelihood) with the same
batch size, learning rate and epochs. Both are scored on the official test images of the
task's classes, with the weights after the last epoch. The quality bar: mlecli's accuracy
within 0.3 percentage points of PyTorch's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import cached_fashion, table, write_results  # noqa: E402

from mlecli import config, train  # noqa: E402
from mlecli.step import ll_and_accuracy  # noqa: E402
from mlecli.cache import prepare  # noqa: E402
from mlecli.checkpoint import load as load_checkpoint  # noqa: E402
from mlecli.model import init_params, layer_sizes  # noqa: E402
from mlecli.task import build_task, pixels  # noqa: E402


def mlecli_accuracy(cfg, data_dir: Path, test_images, y_test) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        report = train.Reporter(line=lambda s: None, log=lambda s: None, progress=False)
        t0 = time.perf_counter()
        train.run(cfg, Path(tmp) / "run", data_dir=data_dir, report=report)
        seconds = time.perf_counter() - t0
        last = load_checkpoint(Path(tmp) / "run" / "checkpoints" / "last.npz")
    _, acc = ll_and_accuracy(last.params, test_images, y_test)
    return acc, seconds


def torch_accuracy(cfg, splits, X_test, y_test) -> tuple[float, float]:
    import torch

    torch.set_num_threads(2)
    dtype = np.dtype(cfg.model.dtype)
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    rng = np.random.default_rng(cfg.train.seed)
    task = build_task(cfg, splits, rng)  # the same split; rng continues into the same shuffles
    init = init_params(layer_sizes(task.n_inputs, cfg.model.hidden), np.random.default_rng(cfg.model.seed), dtype)
    layers = []
    for i, (W, b) in enumerate(init):
        lin = torch.nn.Linear(W.shape[0], W.shape[1]).to(tdtype)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if i < len(init) - 1:
            layers.append(torch.nn.Sigmoid())
    net = torch.nn.Sequential(*layers)
    X = torch.from_numpy(pixels(task.train.images, dtype))
    Y = torch.from_numpy(task.train.y.astype(dtype))
    opt = torch.optim.SGD(net.parameters(), lr=cfg.train.learning_rate)
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")
    bs = cfg.train.batch_size
    t0 = time.perf_counter()
    for _ in range(cfg.train.epochs):
        order = torch.from_numpy(rng.permutation(len(X)))
        for k in range(0, len(X), bs):
            idx = order[k : k + bs]
            opt.zero_grad(set_to_none=True)
            loss_fn(net(X[idx])[:, 0], Y[idx]).backward()
            opt.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        z = net(torch.from_numpy(X_test))[:, 0].numpy()
    return float(np.mean((z > 0) == (y_test == 1))), seconds


# (label, built-in config, extra overrides): the shipped configs as they are, plus two
# Fashion-MNIST tasks that are hard for these networks.
RUNS = {
    "default": ("default", []),
    "logreg": ("logreg", []),
    "four-vs-nine": ("four-vs-nine", []),
    "deep": ("deep", []),
    "tshirt-vs-shirt": ("default", ["task.positive=[0]", "task.negative=[6]"]),
    "0-4-vs-5-9": ("default", ["task.positive=[0,1,2,3,4]", "task.negative=[5,6,7,8,9]"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="model and train seeds to average over")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        dataset = cached_fashion(data_dir)
        splits = prepare(dataset, data_dir)
        rows, results = [], []
        for label in args.runs:
            name, extra = RUNS[label]
            accs = {"mlecli": [], "pytorch": []}
            secs = {"mlecli": [], "pytorch": []}
            for seed in args.seeds:
                cfg = config.load(
                    name, ["data.dataset=fashion-mnist", *extra, f"model.seed={seed}", f"train.seed={seed}"]
                )
                task = build_task(cfg, splits, np.random.default_rng(cfg.train.seed))
                X_test, y_test = pixels(task.test.images, np.dtype(cfg.model.dtype)), task.test.y
                a, s = mlecli_accuracy(cfg, data_dir, task.test.images, y_test)
                accs["mlecli"].append(a)
                secs["mlecli"].append(s)
                a, s = torch_accuracy(cfg, splits, X_test, y_test)
                accs["pytorch"].append(a)
                secs["pytorch"].append(s)
            m, t = statistics.mean(accs["mlecli"]), statistics.mean(accs["pytorch"])
            diff = 100 * (m - t)
            rows.append([
                label, f"{cfg.task.describe()}", str(list(cfg.model.hidden)),
                f"{cfg.train.batch_size}/{cfg.train.learning_rate:g}/{cfg.train.epochs}",
                f"{100 * m:.2f}", f"{100 * t:.2f}", f"{diff:+.2f}", "yes" if diff >= -0.3 else "NO",
                f"{statistics.mean(secs['mlecli']):.1f}", f"{statistics.mean(secs['pytorch']):.1f}",
            ])
            results.append({"run": label, "config": name, "overrides": extra, "mlecli_acc": accs["mlecli"], "pytorch_acc": accs["pytorch"],
                            "mlecli_s": secs["mlecli"], "pytorch_s": secs["pytorch"]})
    print(f"Fashion-MNIST, test accuracy after the last epoch, mean over seeds {args.seeds}")
    print(table(["run", "task (classes)", "hidden", "batch/lr/epochs", "mlecli %", "pytorch %",
                 "diff pp", "within 0.3", "mlecli s", "pytorch s"], rows))
    print(f"results: {write_results('quality', {'seeds': args.seeds, 'configs': results})}")


if __name__ == "__main__":
    main()
