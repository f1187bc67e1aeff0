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
    from mlecli.cache import ensure_dataset
    from mlecli.datasets import FASHION_MNIST

    ensure_dataset(FASHION_MNIST, data_dir, mirrors=(str(require_fashion()),))
    return FASHION_MNIST
