"""Step by step, mlecli's update rules against PyTorch's on the same float64 problem.

    python benchmarks/agreement.py [--steps 125]

The same 784-128-1 network, initial weights, batches (32 Fashion-MNIST T-shirts and
shirts at a time) and learning rate, for each rule against its PyTorch twin on the
summed binary cross-entropy:

    sgd            η 0.05          torch.optim.SGD
    momentum       η 0.01, μ 0.9   SGD(momentum=0.9)
    nesterov       η 0.01, μ 0.9   SGD(momentum=0.9, nesterov=True)
    adam           η 0.001         Adam(betas=(0.9, 0.999), eps=1e-8)
    sgd + prior    η 0.05, σ 0.1   SGD(weight_decay=m/(N σ²)) on the weights only: the
                                   prior's gradient (m/N)(−θ/σ²) is PyTorch's coupled decay
    adam + prior   η 0.001, σ 0.1  Adam(weight_decay=m/(N σ²)) on the weights only

Prints the largest difference between the two first-layer weight matrices as training
goes: it starts at rounding level and grows (training at these step sizes is chaotic),
which is why the quality benchmark compares means over seeds rather than single runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import cached_fashion, table  # noqa: E402

from mlecli.data.cache import ensure_splits  # noqa: E402
from mlecli.nn import optim  # noqa: E402
from mlecli.nn.model import init_params, layer_sizes  # noqa: E402
from mlecli.nn.pixels import pixels  # noqa: E402
from mlecli.nn.step import Workspace, train_step  # noqa: E402

BATCH = 32
N_TRAIN = 12_000  # the N of the prior's m/N: the T-shirts and shirts of Fashion-MNIST's training set
SD = 0.1
# label → (mlecli rule, learning rate, prior σ or None, PyTorch optimizer and its arguments)
RULES = {
    "sgd": (optim.Sgd(), 0.05, None, "SGD", {}),
    "momentum": (optim.Momentum(0.9), 0.01, None, "SGD", {"momentum": 0.9}),
    "nesterov": (optim.Momentum(0.9, nesterov=True), 0.01, None, "SGD", {"momentum": 0.9, "nesterov": True}),
    "adam": (optim.Adam(0.9, 0.999, 1e-8), 0.001, None, "Adam", {"betas": (0.9, 0.999), "eps": 1e-8}),
    "sgd + prior": (optim.Sgd(), 0.05, SD, "SGD", {}),
    "adam + prior": (optim.Adam(0.9, 0.999, 1e-8), 0.001, SD, "Adam", {"betas": (0.9, 0.999), "eps": 1e-8}),
}
REPORT = (1, 2, 5, 10, 20, 40, 60, 80, 100, 125)


def compare(label: str, images, x, y, order, steps: int) -> list[str]:
    import torch

    rule, lr, sd, torch_name, kwargs = RULES[label]
    params = init_params(layer_sizes(784, (128,)), np.random.default_rng(0), np.float64)
    net = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.Sigmoid(), torch.nn.Linear(128, 1)).double()
    with torch.no_grad():
        for layer, (W, b) in zip((net[0], net[2]), params):
            layer.weight.copy_(torch.from_numpy(W.T.copy()))
            layer.bias.copy_(torch.from_numpy(b))
    decay = BATCH / (N_TRAIN * sd * sd) if sd else 0.0
    groups = [{"params": [net[0].weight, net[2].weight], "weight_decay": decay},
              {"params": [net[0].bias, net[2].bias], "weight_decay": 0.0}]
    opt = getattr(torch.optim, torch_name)(groups, lr=lr, **kwargs)
    loss = torch.nn.BCEWithLogitsLoss(reduction="sum")
    state = rule.init_state(params)
    prior = optim.Prior(sd, False, N_TRAIN) if sd else None
    ws, z = Workspace(params, BATCH, rule.bind(params, state, prior)), np.empty((BATCH, 1))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gaps = {}
    for step in range(steps):
        idx = order[step * BATCH : (step + 1) * BATCH]
        train_step(params, ws, images, idx, y[idx] - 0.5, z, lr, step + 1)
        opt.zero_grad()
        loss(net(xt[idx])[:, 0], yt[idx]).backward()
        opt.step()
        if step + 1 in REPORT or step + 1 == steps:
            gaps[step + 1] = np.abs(params[0][0] - net[0].weight.detach().numpy().T).max()
    return [label, *(f"{gaps[s]:.1e}" for s in sorted(gaps))], sorted(gaps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=125)
    ap.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = cached_fashion(Path(tmp) / "data")
        train = ensure_splits(dataset, Path(tmp) / "data")["train"]
    chosen = np.flatnonzero(np.isin(train.labels, [0, 6]))[: args.steps * BATCH]
    images = train.images[chosen].reshape(len(chosen), -1)
    x, y = pixels(images, np.float64), (train.labels[chosen] == 0).astype(np.float64)
    order = np.random.default_rng(1).permutation(len(x))
    rows = []
    for label in args.rules:
        row, steps = compare(label, images, x, y, order, args.steps)
        rows.append(row)
    print(f"float64, 784-128-1, batches of {BATCH} T-shirts/shirts; max |W1 mlecli − W1 pytorch| after each step count")
    print(table(["rule", *(f"step {s}" for s in steps)], rows))


if __name__ == "__main__":
    main()
