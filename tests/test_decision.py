"""One decision rule: `evaluate`, `predict`, `mlecli.load(...).predict` and the exported ONNX
model's z decide alike at any threshold, exactly as σ(z) ≥ t in real numbers, for logits
on either side of the boundary (the page is held to it in tests/test_browser.py).

The network is a logistic regression whose weights are all 0 but one per test image: image
i lights pixel i alone (255, so x = 1 exactly), and its logit is exactly W[i] in float32,
in numpy's BLAS and in onnxruntime's double Gemm alike. Each case writes W so that the ten
test images sit on the float32 logits nearest the threshold's logit: ŷ rounded to float32
(or float64, near ½) cannot tell them apart, the rule can.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from fakes import TinyDataset, exactly_positive, make_digits, rewrite_npz

import mlecli
from mlecli.cli import main
from mlecli.data.datasets import MNIST_FILES
from mlecli.data.idx import idx_bytes
from mlecli.nn.metrics import decide

LABELS = [1, 0, 3, 2, 5, 4, 7, 6, 9, 8]  # odd, even, …: y = 1, 0, 1, 0, …
ZERO_CASE = [2**-60, -(2**-60), 2**-30, -(2**-30), 1e-8, -1e-8, 0.0, -2.9e-8, 1e-37, -1e-37]
THRESHOLDS = [0.5, 0.5 + 3e-9, 0.3, 0.9, 0.999, 1e-6]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def crafted_images() -> np.ndarray:
    images = np.zeros((10, 28, 28), np.uint8)
    for i in range(10):
        images[i, 0, i] = 255
    return images


def logits_near(t: float) -> np.ndarray:
    """Ten float32 logits: at ½, ZERO_CASE; else the five float32 numbers below logit(t)'s
    nearest and the five from it up."""
    if t == 0.5:
        return np.array(ZERO_CASE, np.float32)
    z = [np.float32(math.log(t / (1 - t)))]
    down, up = np.float32(-np.inf), np.float32(np.inf)
    while len(z) < 10:
        z = [np.nextafter(z[0], down), *z] if len(z) % 2 else [*z, np.nextafter(z[-1], up)]
    return np.array(z, np.float32)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("decision")
    train_x, train_y = make_digits(200, seed=4)
    arrays = {"train-images": train_x, "train-labels": train_y, "test-images": crafted_images(),
              "test-labels": np.array(LABELS, np.uint8)}
    data = TinyDataset({MNIST_FILES[r]: idx_bytes(a) for r, a in arrays.items()}, arrays)
    cfg = data.write_config(root / "edge.toml", data.write_folder(root / "mirror"),
                            "[model]\nhidden = []\n[train]\nepochs = 1\n")
    assert cli("train", cfg, "--run-dir", root / "run", "--data-dir", root / "data", "-q").exit_code == 0
    np.save(root / "test.npy", crafted_images())
    return root / "run", root / "data", root / "test.npy"


ONNX_Z = """
import sys
import numpy as np
import onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
np.save(sys.argv[3], session.run(["z"], {"pixels": np.load(sys.argv[2]).reshape(-1, 784).astype(np.float32)})[0])
"""


@pytest.mark.parametrize("t", THRESHOLDS)
def test_evaluate_predict_the_api_and_onnx_decide_exactly_alike_at_the_threshold(run, tmp_path, t):
    run_dir, data, npy = run
    z = logits_near(t)
    W = np.zeros((784, 1), np.float32)
    W[np.arange(10), 0] = z
    best = run_dir / "checkpoints" / "best.npz"
    rewrite_npz(best, replace={"W1": W, "b1": np.zeros(1, np.float32)})
    expected = [int(exactly_positive(float(v), t)) for v in z]
    assert 0 < sum(expected) < 10  # the threshold cuts through the ten images

    res = cli("evaluate", run_dir, "--data-dir", data, "--threshold", repr(t), "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    y = [d % 2 for d in LABELS]
    wrong = {e["index"] for e in report["most_confident_errors"]}  # all of them: ten images, at most ten errors
    assert [1 - y[i] if i in wrong else y[i] for i in range(10)] == expected

    res = cli("predict", run_dir, npy, "--raw", "--json", "--threshold", repr(t))
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["prediction"] for line in res.stdout.splitlines()] == expected

    model = mlecli.load(run_dir)
    assert model.predict(crafted_images(), threshold=t, raw=True).tolist() == expected
    assert model.logits(crafted_images()).tolist() == z.astype(np.float64).tolist()  # exactly the crafted logits

    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnx and onnxruntime are missing: pip install 'mlecli[onnx]'")
    assert cli("export", run_dir, "--format", "onnx", "--out", tmp_path / "edge.onnx").exit_code == 0
    subprocess.run([sys.executable, "-c", ONNX_Z, str(tmp_path / "edge.onnx"), str(npy), str(tmp_path / "z.npy")],
                   check=True)
    onnx_z = np.load(tmp_path / "z.npy")[:, 0]
    assert onnx_z.tobytes() == z.tobytes()  # the same logits, to the bit
    assert decide(onnx_z, t).astype(int).tolist() == expected  # by the rule its metadata states
