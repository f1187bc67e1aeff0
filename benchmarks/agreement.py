"""Step by step, mlecli's trainer against PyTorch on the same float64 problem.

    python benchmarks/agreement.py [--steps 125]

The same 784-128-1 network, initial weights, batches (32 Fashion-MNIST T-shirts and
shirts at a time) and learning rate (0.05 on the summed log-likelihood). Prints the
largest difference between the two first-layer weight matrices as training goes: it
starts at rounding level and grows about tenfold every ten steps, which is why the
quality benchmark compares means over seeds rather than single runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import cached_fashion, table  # noqa: E402

from mlecli.cache import prepare  # noqa: E402
from mlecli.model import init_params, layer_sizes  # noqa: E402
from mlecli.step import Workspace, train_step  # noqa: E402
from mlecli.task import pixels  # noqa: E402

LR, BATCH = 0.05, 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=125)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = cached_fashion(Path(tmp) / "data")
        train = prepare(dataset, Path(tmp) / "data")["train"]
    chosen = np.flatnonzero(np.isin(train.labels, [0, 6]))[: args.steps * BATCH]
    images = train.images[chosen].reshape(len(chosen), -1)
    x, y = pixels(images, np.float64), (train.labels[chosen] == 0).astype(np.float64)
    params = init_params(layer_sizes(784, (128,)), np.random.default_rng(0), np.float64)
    net = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.Sigmoid(), torch.nn.Linear(128, 1)).double()
    with torch.no_grad():
        for layer, (W, b) in zip((net[0], net[2]), params):
            layer.weight.copy_(torch.from_numpy(W.T.copy()))
            layer.bias.copy_(torch.from_numpy(b))
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    loss = torch.nn.BCEWithLogitsLoss(reduction="sum")
    ws, z = Workspace(params, BATCH), np.empty((BATCH, 1))
    order = np.random.default_rng(1).permutation(len(x))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    rows = []
    for step in range(args.steps):
        idx = order[step * BATCH : (step + 1) * BATCH]
        train_step(params, ws, images, idx, LR * (y[idx] - 0.5), z[: len(idx)], LR)
        opt.zero_grad()
        loss(net(xt[idx])[:, 0], yt[idx]).backward()
        opt.step()
        if step + 1 in (1, 2, 5, 10, 20, 40, 60, 80, 100, 125) or step + 1 == args.steps:
            gap = np.abs(params[0][0] - net[0].weight.detach().numpy().T).max()
            rows.append([step + 1, f"{gap:.1e}", f"{np.abs(params[0][0]).max():.3f}"])
    print(table(["steps", "max |W1 mlecli − W1 pytorch|", "max |W1|"], rows))


if __name__ == "__main__":
    main()
