"""`mlecli export`: ONNX checked by onnx and run by onnxruntime on real images, and the page's file."""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DEBIAN_FASHION, require
from fakes import TinyDataset, make_digits

import mlecli
from mlecli import __version__
from mlecli.cli import main
from mlecli.data.datasets import MNIST_FILES
from mlecli.data.idx import idx_bytes, parse_idx
from mlecli.safe.errors import CheckpointError
from mlecli.use.preparation import prepare_many

onnx = pytest.importorskip("onnx", reason="pip install 'mlecli[onnx]'")
if importlib.util.find_spec("onnxruntime") is None:
    pytest.skip("onnxruntime is missing: pip install 'mlecli[onnx]'", allow_module_level=True)

# onnxruntime runs in a child process: imported here, its threads would deadlock any test that
# forks after it (tests/test_download.py forks concurrent downloads).
RUN_ONNX = """
import sys
import numpy as np
import onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
y_hat, z = session.run(None, {"pixels": np.load(sys.argv[2])})
np.save(sys.argv[3], y_hat)
np.save(sys.argv[4], z)
"""


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def train(root: Path, cfg_text: str, name: str, extra: str) -> Path:
    cfg = root / f"{name}.toml"
    cfg.write_text(cfg_text + extra)
    res = cli("train", cfg, "--run-dir", root / name, "--data-dir", root / "data", "-q")
    assert res.exit_code == 0, res.output
    return root / name


@pytest.fixture(scope="module")
def fashion_runs(tmp_path_factory):
    """Networks with 0, 1 and 3 hidden layers, one epoch on Debian's real Fashion-MNIST (T-shirt vs shirt)."""
    require(DEBIAN_FASHION.is_dir(), f"{DEBIAN_FASHION} is missing: apt-get install dataset-fashion-mnist")
    root = tmp_path_factory.mktemp("fashion")
    base = (f'[data]\ndataset = "fashion-mnist"\nurl = "{DEBIAN_FASHION}"\nvalidation = 0.1\n'
            "[task]\npositive = [0]\nnegative = [6]\n[train]\nepochs = 1\nbatch_size = 32\nlearning_rate = 0.01\n")
    runs = {len(h): train(root, base, f"h{len(h)}", f"[model]\nhidden = {h}\n") for h in ([], [32], [32, 16, 8])}
    test = parse_idx(gzip.decompress((DEBIAN_FASHION / "t10k-images-idx3-ubyte.gz").read_bytes()))
    labels = parse_idx(gzip.decompress((DEBIAN_FASHION / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    chosen = np.isin(labels, [0, 6])
    return runs, test[chosen][:1000], labels[chosen][:1000]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny, tiny_folder):
    root = tmp_path_factory.mktemp("export")
    sha = ", ".join(f'{k} = "{v}"' for k, v in tiny.spec(()).sha256.items())
    base = f'[data]\ndataset = "tiny"\nurl = "{tiny_folder}"\nsha256 = {{ {sha} }}\nvalidation = 0.2\n'
    return {
        "default": train(root, base, "default", "[model]\nhidden = [128]\n[train]\nepochs = 1\n"),
        "deep": train(root, base, "deep", "[model]\nhidden = [256, 128, 64]\n[train]\nepochs = 1\n"),
        "float64": train(root, base, "float64", '[model]\nhidden = [16]\ndtype = "float64"\n[train]\nepochs = 1\n'),
    }


def run_onnx(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.save(folder / "pixels.npy", images.reshape(len(images), -1).astype(np.float32))
        outs = [folder / "y_hat.npy", folder / "z.npy"]
        subprocess.run([sys.executable, "-c", RUN_ONNX, str(path), str(folder / "pixels.npy"), *map(str, outs)],
                       check=True)
        return np.load(outs[0]), np.load(outs[1])


@pytest.mark.parametrize("hidden", [0, 1, 3])
def test_onnxruntime_gives_mlecli_s_y_hat_on_1000_real_test_images(fashion_runs, hidden, tmp_path):
    runs, images, _ = fashion_runs
    out = tmp_path / "model.onnx"
    res = cli("export", runs[hidden], "--format", "onnx", "--out", out)
    assert res.exit_code == 0, res.output
    onnx.checker.check_model(onnx.load(out), full_check=True)
    y_hat, z = run_onnx(out, images)
    model = mlecli.load(runs[hidden])
    expected = model.probabilities(images)  # the network's own ŷ of these raw 28×28 images
    assert y_hat.shape == z.shape == (1000, 1) and y_hat.dtype == np.float32
    print(f"hidden layers {hidden}: max |ŷ onnxruntime − ŷ mlecli| = {np.abs(y_hat[:, 0] - expected).max():.2e}")
    assert np.abs(y_hat[:, 0] - expected).max() <= 1e-6
    assert 0.05 < expected.mean() < 0.95 and expected.std() > 0.1  # a trained network, not a constant
    np.testing.assert_allclose(1 / (1 + np.exp(-z[:, 0].astype(np.float64))), expected, atol=1e-6)


def test_a_fashion_network_speaks_fashion_and_prepares_as_fashion_mnist_did(fashion_runs):
    runs, images, labels = fashion_runs
    model = mlecli.load(runs[1])
    assert model.classes_ == ("Shirt", "T-shirt/top") and model.style.name == "fashion-mnist"
    _, blank = prepare_many(images, style=model.style)
    images, y = images[~blank], labels[~blank] == 0  # a picture covering half its border has no background
    raw = model.probabilities(images) >= 0.5
    prepared = model.predict_proba(images)[:, 1] >= 0.5  # cropped, longer side 28, centred by its box
    print(f"T-shirt vs shirt, {len(y)} test pictures: accuracy {np.mean(raw == y):.1%} as they are, "
          f"{np.mean(prepared == y):.1%} prepared; the same decision for {np.mean(raw == prepared):.1%}")
    assert np.mean(raw == prepared) >= 0.98
    assert cli("export", runs[1], "--format", "html").exit_code == 0
    page = page_model((runs[1] / "best.html").read_text(encoding="utf-8"))
    assert page["style"] == "fashion-mnist" and page["words"] == ["Shirt", "T-shirt/top"]
    assert page["heading"] == "Draw something to wear"


def test_the_onnx_graph_s_inputs_outputs_and_metadata(tiny_runs):
    run = tiny_runs["default"]
    assert cli("evaluate", run, "--data-dir", run.parent / "data").exit_code == 0
    res = cli("export", run, "--format", "onnx")
    out = run / "best.onnx"
    assert res.exit_code == 0 and res.stdout.startswith(f"wrote {out} (")
    model = onnx.load(out)
    graph = model.graph
    shape = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert [i.name for i in graph.input] == ["pixels"] and shape == ["N", 784]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [o.name for o in graph.output] == ["y_hat", "z"]
    assert [n.op_type for n in graph.node] == ["Cast", "Div", "Cast", "Cast", "Gemm", "Sigmoid", "Cast", "Cast", "Gemm",
                                               "Sigmoid", "Cast", "Cast"]
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for i, (W, b) in enumerate(mlecli.load(run).params, start=1):  # the weights as trained, float32
        assert stored[f"W{i}"].tobytes() == W.tobytes() and stored[f"b{i}"].tobytes() == b.tobytes()
    assert (model.producer_name, model.producer_version, model.opset_import[0].version) == ("mlecli", __version__, 13)
    best = run / "checkpoints" / "best.npz"
    report = json.loads((run / "eval-test-best.json").read_text())
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta == {
        "mlecli.run": "default",
        "mlecli.checkpoint": "best.npz",
        "mlecli.checkpoint_sha256": hashlib.sha256(best.read_bytes()).hexdigest(),
        "mlecli.epoch": "1",
        "mlecli.task": "1,3,5,7,9 vs 0,2,4,6,8",
        "mlecli.negative_class": "even (0,2,4,6,8)",
        "mlecli.positive_class": "odd (1,3,5,7,9)",
        "mlecli.dataset": "tiny",
        "mlecli.hidden": "[128]",
        "mlecli.dtype": "float32",
        "mlecli.image_shape": "[28, 28]",
        "mlecli.n_inputs": "784",
        "mlecli.preparation": "mnist",
        "mlecli.decision": "y = 1 where z >= log(t / (1 - t)) for a threshold t, that is where P(y = 1) >= t "
                           "exactly; at mlecli's default t = 0.5, where z >= 0. Decide from z: y_hat is rounded to "
                           "float32, and rounds to t for logits on either side of that bound",
        "mlecli.version": __version__,
        "mlecli.test_accuracy": json.dumps({"accuracy": report["accuracy"], "threshold": 0.5}),
    }


def test_a_float64_network_exports_with_float32_pixels_in_and_y_hat_out(tiny_runs, tiny):
    run = tiny_runs["float64"]
    assert cli("export", run, "--format", "onnx").exit_code == 0
    images = tiny.arrays["test-images"]
    y_hat, _ = run_onnx(run / "best.onnx", images)
    assert y_hat.dtype == np.float32
    assert np.abs(y_hat[:, 0] - mlecli.load(run).probabilities(images)).max() <= 1e-6


def test_a_network_of_other_image_sizes_is_refused_alike_by_predict_both_exports_and_the_api(tmp_path):
    # An ONNX model of it once said (N, 784) and "mnist" preparation for 400 inputs: every way
    # out of mlecli takes 28×28 images, so each refuses it with the same line, writing nothing.
    images, labels = make_digits(120, seed=3, side=20)
    arrays = {"train-images": images, "train-labels": labels, "test-images": images[:40], "test-labels": labels[:40]}
    small = TinyDataset({MNIST_FILES[r]: idx_bytes(a) for r, a in arrays.items()}, arrays)
    cfg = small.write_config(tmp_path / "s.toml", small.write_folder(tmp_path / "m"),
                             "[model]\nhidden = [4]\n[train]\nepochs = 1\n")
    assert cli("train", cfg, "--run-dir", tmp_path / "run", "--data-dir", tmp_path / "data", "-q").exit_code == 0
    np.save(tmp_path / "small.npy", images[:3])
    best = tmp_path / "run" / "checkpoints" / "best.npz"
    message = (f"{best} was trained on 20×20 images (400 inputs); predict and export work with 28×28 images "
               "(MNIST's form): use a network trained on a 28×28 dataset")
    for args in (["export", "--format", "onnx"], ["export", "--format", "html"], ["predict", tmp_path / "small.npy"],
                 ["predict", tmp_path / "small.npy", "--raw"]):
        res = cli(args[0], tmp_path / "run", *args[1:])
        assert (res.exit_code, res.stdout, res.stderr) == (1, "", f"Error: {message}\n"), args
    with pytest.raises(CheckpointError) as raised:
        mlecli.load(tmp_path / "run")
    assert str(raised.value) == message
    assert not list((tmp_path / "run").glob("best.*"))


def test_exports_are_byte_identical_and_go_where_asked(tiny_runs, tmp_path):
    run = tiny_runs["default"]
    for fmt in ("onnx", "html"):
        assert cli("export", run, "--format", fmt, "--checkpoint", "last").exit_code == 0
        first = (run / f"last.{fmt}").read_bytes()
        assert cli("export", run, "--format", fmt, "--checkpoint", "last", "--out", tmp_path / f"x.{fmt}").exit_code == 0
        assert (tmp_path / f"x.{fmt}").read_bytes() == first
    loose = tmp_path / "loose" / "net.npz"
    loose.parent.mkdir()
    loose.write_bytes((run / "checkpoints" / "best.npz").read_bytes())
    assert cli("export", loose, "--format", "html").exit_code == 0
    assert (loose.parent / "net.html").exists()
    assert not [p for p in tmp_path.rglob("*.tmp")] and not [p for p in run.rglob("*.tmp")]


def test_onnx_without_the_onnx_package_says_how_to_get_it(tiny_runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    res = cli("export", tiny_runs["default"], "--format", "onnx", "--out", tiny_runs["default"] / "no.onnx")
    assert (res.exit_code, res.stderr) == (1, "Error: --format onnx needs the onnx package: pip install 'mlecli[onnx]'\n")
    assert not (tiny_runs["default"] / "no.onnx").exists()


def test_bad_export_options_are_usage_errors(tiny_runs):
    run = tiny_runs["default"]
    assert cli("export", run).exit_code == 2  # --format is required
    assert cli("export", run, "--format", "pdf").exit_code == 2
    assert cli("export", run, "--format", "html", "--checkpoint", "first").exit_code == 2


# ---------------------------------------------------------------------------
# The page's file (the page in a real browser: test_browser.py)


def page_model(html: str) -> dict:
    found = re.search(r'<script id="mlecli-model" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(found.group(1))


@pytest.mark.parametrize("name", ["default", "deep"])
def test_the_page_stays_under_2_mb_and_holds_the_weights_exactly(tiny_runs, name):
    run = tiny_runs[name]
    assert cli("export", run, "--format", "html").exit_code == 0
    page = run / "best.html"
    assert page.stat().st_size < 2_000_000
    embedded = page_model(page.read_text(encoding="utf-8"))
    params = mlecli.load(run).params
    assert len(embedded["layers"]) == len(params)
    for layer, (W, b) in zip(embedded["layers"], params):
        assert (layer["n_in"], layer["n_out"]) == W.shape
        assert np.frombuffer(base64.b64decode(layer["W"]), "<f4").tobytes() == W.astype("<f4").tobytes()
        assert np.frombuffer(base64.b64decode(layer["b"]), "<f4").tobytes() == b.astype("<f4").tobytes()


def test_the_page_is_self_contained(tiny_runs):
    run = tiny_runs["default"]
    assert cli("export", run, "--format", "html").exit_code == 0
    html = (run / "best.html").read_text(encoding="utf-8")
    assert "default-src 'none'" in html  # the browser itself refuses any request the page might make
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|\bsrc\s*=|url\(|@import|fetch\(|XMLHttpRequest|WebSocket", html)
    assert html.count("<script") == 3 and "<!--mlecli:" not in html


def test_the_footer_shows_test_accuracy_only_for_this_very_checkpoint(tiny_runs):
    run = tiny_runs["deep"]
    for report in run.glob("eval-*.json"):
        report.unlink()
    cli("export", run, "--format", "html")
    footer = page_model((run / "best.html").read_text(encoding="utf-8"))["footer"]
    assert footer[:5] == ["run deep", "best.npz (epoch 1)", "task 1,3,5,7,9 vs 0,2,4,6,8", "dataset tiny",
                          "hidden [256, 128, 64]"]
    assert "test accuracy: not evaluated (mlecli evaluate)" in footer
    assert cli("evaluate", run, "--data-dir", run.parent / "data").exit_code == 0
    accuracy = json.loads((run / "eval-test-best.json").read_text())["accuracy"]
    cli("export", run, "--format", "html")
    footer = page_model((run / "best.html").read_text(encoding="utf-8"))["footer"]
    assert f"test accuracy {100 * accuracy:.2f}% (ŷ ≥ 0.5)" in footer
    stale = json.loads((run / "eval-test-best.json").read_text())
    (run / "eval-test-best.json").write_text(json.dumps({**stale, "epoch": 99}))
    cli("export", run, "--format", "html")
    assert "test accuracy: not evaluated (mlecli evaluate)" in page_model((run / "best.html").read_text())["footer"]
    (run / "eval-test-best.json").write_text(json.dumps({**stale, "checkpoint_sha256": "0" * 64}))  # another file
    cli("export", run, "--format", "html")
    assert "test accuracy: not evaluated (mlecli evaluate)" in page_model((run / "best.html").read_text())["footer"]


@pytest.mark.parametrize("fmt", ["html", "onnx"])
def test_a_run_folder_whose_name_is_not_utf8_exports_with_the_bytes_shown_as_escapes(tiny_runs, tmp_path, fmt):
    run = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))  # e.g. a folder from an old Latin-1 archive
    shutil.copytree(tiny_runs["default"], run)
    res = cli("export", run, "--format", fmt)
    assert res.exit_code == 0, res.output
    assert re.fullmatch(rf"wrote {re.escape(str(tmp_path))}/caf\\xe9/best\.{fmt} \(\d+ KB\)", res.output.splitlines()[0])
    if fmt == "html":
        assert page_model((run / "best.html").read_text(encoding="utf-8"))["footer"][0] == "run caf\\xe9"
    else:
        assert onnx.load(run / "best.onnx").doc_string.startswith(f"mlecli {__version__}: caf\\xe9 (best.npz")
