"""Predict benchmark: `mlecli predict` on one PNG and on an IDX file of 10,000 images.

    python benchmarks/bench_predict.py [--repeat 9]

Trains the default network (784-128-1, odd vs even) for one epoch on Debian's Fashion-MNIST
(apt-get install dataset-fashion-mnist), then times, in rounds that interleave each
contender with its reference (this machine is shared: its speed drifts within minutes):

- one PNG, the whole process (start-up, imports, checkpoint, read, prepare, predict, print),
  against `python -c "import numpy, PIL.Image"`: the floor of any Python tool doing this;
- the 10,000 test images of an IDX file (.gz), the whole process, prepared (the default) and
  --raw, against the same process start and the network alone (`image_scores` on the
  images, in process: what the images cost once read and prepared);
- in process: reading + preparing + predicting those images, with and without preparation.

Targets (issue 11): one PNG under 0.5 s; the IDX file at 50,000 images/s or more.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import cached_fashion, require_fashion, table, write_results

PYTHON = sys.executable


def clock(cmd: list[str]) -> float:
    """Seconds of a whole process; exit status 1 is fine (Fashion-MNIST's test set holds 8 pictures
    whose object covers half the border: no background to judge, one line each)."""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    assert res.returncode in (0, 1), cmd
    return seconds


def in_process(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    folder = require_fashion()
    from click.testing import CliRunner
    from PIL import Image

    import mlecli
    from mlecli.cli import main as cli
    from mlecli.nn.pixels import image_scores
    from mlecli.use.inputs import Source, load

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_dir = tmp / "data"
        cached_fashion(data_dir)
        run = tmp / "run"
        res = CliRunner().invoke(cli, ["train", "default", "--run-dir", str(run), "--data-dir", str(data_dir), "-q",
                                       "--set", "data.dataset=fashion-mnist", "--set", "train.epochs=1"])
        assert res.exit_code == 0, res.output
        idx = folder / "t10k-images-idx3-ubyte.gz"
        model = mlecli.load(run)
        images = load(Source(str(idx), idx)).images
        n = len(images)
        png = tmp / "one.png"
        Image.fromarray(255 - np.kron(images[0], np.ones((8, 8), np.uint8))).save(png)  # a 224×224 scan

        mlecli_cmd = [PYTHON, "-m", "mlecli", "predict", str(run)]
        contenders = {
            "one PNG (224×224), process": (mlecli_cmd + [str(png)], [PYTHON, "-c", "import numpy, PIL.Image"]),
            f"IDX of {n:,}, process": (mlecli_cmd + [str(idx)], [PYTHON, "-c", "import numpy, PIL.Image"]),
            f"IDX of {n:,} --raw, process": (mlecli_cmd + [str(idx), "--raw"], [PYTHON, "-c", "import numpy, PIL.Image"]),
        }

        def predict_all(raw: bool):
            for batch in model.predict_sources([Source(str(idx), idx)], raw):
                pass

        in_proc = {
            f"IDX of {n:,}, in process": (lambda: predict_all(False), lambda: image_scores(model.params, images)),
            f"IDX of {n:,} --raw, in process": (lambda: predict_all(True), lambda: image_scores(model.params, images)),
        }
        times = {k: ([], []) for k in [*contenders, *in_proc]}
        for k, (cmd, ref) in contenders.items():  # warm the file cache and the imports' .pyc
            clock(cmd), clock(ref)
        for _ in range(args.repeat):
            for k, (cmd, ref) in contenders.items():
                times[k][0].append(clock(cmd))
                times[k][1].append(clock(ref))
            for k, (fn, ref) in in_proc.items():
                times[k][0].append(in_process(fn))
                times[k][1].append(in_process(ref))

    refs = {
        "one PNG (224×224), process": "python -c 'import numpy, PIL.Image'",
        f"IDX of {n:,}, process": "python -c 'import numpy, PIL.Image'",
        f"IDX of {n:,} --raw, process": "python -c 'import numpy, PIL.Image'",
        f"IDX of {n:,}, in process": "the network alone (image_scores)",
        f"IDX of {n:,} --raw, in process": "the network alone (image_scores)",
    }
    rows, payload = [], {}
    for k, (mine, ref) in times.items():
        m, r = statistics.median(mine), statistics.median(ref)
        count = 1 if k.startswith("one PNG") else n
        ratio = statistics.median([a / b for a, b in zip(mine, ref)])
        rows.append([k, f"{m:.3f}", f"{count / m:,.0f}", refs[k], f"{r:.3f}", f"{ratio:.2f}"])
        payload[k] = {"seconds": mine, "reference_seconds": ref, "images": count}
    print(f"mlecli predict, default network 784-128-1; medians of {args.repeat} interleaved rounds; "
          "ratio: median over rounds of mlecli/reference")
    print(table(["what", "mlecli s", "images/s", "reference", "reference s", "ratio"], rows))
    print(f"results: {write_results('bench_predict', payload)}")


if __name__ == "__main__":
    main()
