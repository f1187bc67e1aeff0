"""Data benchmark: loading the cached splits, and downloading from a local HTTP server.

    python benchmarks/bench_data.py [--repeat 7]

Uses Debian's Fashion-MNIST files (apt-get install dataset-fashion-mnist), served on
127.0.0.1. References measured in the same run:
- load: parsing the four .gz files directly (gzip + np.frombuffer, what most loaders do);
- download: a bare `requests` GET of the same files, without verification or caching.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).parent))
from _common import cached_fashion, median_time, require_fashion, serve_folder, table, write_results

from mlecli.data.cache import ensure_dataset, load_split
from mlecli.data.datasets import FASHION_MNIST


def naive_load(folder: Path) -> None:
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        data = gzip.decompress((folder / f"{name}.gz").read_bytes())
        np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)
    for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        np.frombuffer(gzip.decompress((folder / f"{name}.gz").read_bytes()), np.uint8, offset=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    folder = require_fashion()
    total_bytes = sum(p.stat().st_size for p in folder.glob("*.gz"))

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        cached_fashion(data_dir)

        def load_both():
            for split in ("train", "test"):
                load_split(FASHION_MNIST, data_dir, split)  # np.load reads the arrays whole

        load_both()
        load_s, _ = median_time(load_both, args.repeat)
        naive_s, _ = median_time(lambda: naive_load(folder), args.repeat)

        url, server = serve_folder(folder)

        def mlecli_download():
            shutil.rmtree(data_dir / "dl", ignore_errors=True)
            ensure_dataset(FASHION_MNIST, data_dir / "dl", mirrors=(url,))

        def bare_get():
            with requests.Session() as s:
                for p in folder.glob("*.gz"):
                    assert s.get(url + p.name).content  # read the whole body

        dl_s, _ = median_time(mlecli_download, max(3, args.repeat // 2))
        get_s, _ = median_time(bare_get, max(3, args.repeat // 2))
        server.shutdown()

    rows = [
        ["load cached train+test (70,000 images)", load_s * 1e3, naive_s * 1e3, naive_s / load_s],
        ["download+verify+cache all 4 files", dl_s * 1e3, get_s * 1e3, get_s / dl_s],
    ]
    print(table(["what", "mlecli ms", "reference ms", "reference/mlecli"], rows))
    print("\nload reference: gzip.decompress + np.frombuffer of the 4 .gz files")
    print(f"download reference: bare requests GET of the same {total_bytes / 1e6:.1f} MB, no verification")
    print(f"download throughput: {total_bytes / dl_s / 1e6:.0f} MB/s (compressed bytes over 127.0.0.1)")
    print(f"target: load under 50 ms -> {'met' if load_s < 0.05 else 'NOT met'} ({load_s * 1e3:.1f} ms)")
    path = write_results(
        "data",
        {"load_ms": load_s * 1e3, "naive_load_ms": naive_s * 1e3, "download_ms": dl_s * 1e3, "bare_get_ms": get_s * 1e3,
         "download_MB_per_s": total_bytes / dl_s / 1e6},
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
