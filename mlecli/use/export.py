"""Exporting a trained network: an ONNX model, or one self-contained web page to draw digits on.

ONNX (built with the onnx package's helper API): input `pixels` float32 (N, 784), 0-255,
light ink on black as MNIST's (prepared as `mlecli predict` prepares images); the graph
divides by 255 itself, runs the layers (Gemm + Sigmoid, in double precision) and gives
`y_hat` = P(y = 1) (N, 1) float32 and the logit `z` (N, 1) float32. Its metadata names the
task, the classes, the dataset, the checkpoint (and its SHA-256) and the mlecli version.

HTML: mlecli/web/page.html with the network's weights (base64, little-endian) and its
description embedded as JSON, and mlecli/web/prepare.js and page.js inlined: one file
that works offline from file://, and whose Content-Security-Policy forbids any request.
Both files are byte-identical for the same checkpoint (no timestamps). Every JSON written
(the page's model, ONNX metadata) refuses NaN and infinities: an evaluation report that holds
one is not shown. The output's name is checked before anything is done (`outputs.py`): it
must end in .onnx or .html and cannot be the checkpoint itself.
"""

from __future__ import annotations

import base64
import html
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from mlecli.nn.metrics import logit_bound
from mlecli.run import checkpoint as ckpt
from mlecli.run.evaluate import measured, run_dir_of
from mlecli.run.task import class_words
from mlecli.safe import schema
from mlecli.safe.errors import MlecliError, display
from mlecli.safe.files import atomic_write_bytes, hash_file
from mlecli.safe.outputs import check_output
from mlecli.use.predict import check_image_shape, check_weights, checkpoint_name
from mlecli.use.preparation import style_for
from mlecli.version import __version__

OPSET = 13  # Cast, Div, Gemm and Sigmoid as every ONNX runtime of the last years has them
IR_VERSION = 7
THRESHOLD = 0.5
LINE_WIDTH = 22  # pixels of the page's pen on its 280×280 canvas: MNIST's stroke width once scaled to 20 px
PAGE_LIMIT = 2_000_000  # bytes: a page over this loads slowly; `mlecli export` warns
KINDS = {"onnx": "ONNX model", "html": "web page"}
# How mlecli decides (metrics.decide), for whoever takes the exported network elsewhere.
DECISION = ("y = 1 where z >= log(t / (1 - t)) for a threshold t, that is where P(y = 1) >= t exactly; at mlecli's "
            "default t = 0.5, where z >= 0. Decide from z: y_hat is rounded to float32, and rounds to t for logits "
            "on either side of that bound")


def export(target: Path | str, which: str, fmt: str, out: Path | str | None) -> Path:
    """Write the checkpoint of `target` as `fmt` ("onnx" or "html") to `out` (default: beside it); return the path.

    `out` must end in .onnx or .html (not a folder) and may not be the checkpoint: checked
    before the checkpoint is even read."""
    if fmt not in KINDS:
        raise MlecliError(f"unknown export format {fmt!r}: onnx or html")
    path = ckpt.resolve(Path(target), checkpoint_name(which))
    default = default_out(path, fmt)
    out = check_output(default if out is None else out, "--out", f".{fmt}", KINDS[fmt],
                       keep=[(path, "the checkpoint being exported")])
    cp = ckpt.load(path)
    # Both formats take what predict takes: images prepared into 28×28 (the ONNX model's input
    # and metadata say so), so a network trained on other sizes is refused by all, in one line.
    check_image_shape(cp)
    check_weights(cp)
    info = metadata(cp)
    data = onnx_bytes(cp, info) if fmt == "onnx" else page_html(cp, info).encode("utf-8")
    atomic_write_bytes(out, data)
    return out


def default_out(checkpoint_path: Path, fmt: str) -> Path:
    """<run>/<checkpoint>.<fmt> for a checkpoint of a run folder, else beside the checkpoint file."""

    run = run_dir_of(checkpoint_path)
    return (run if run is not None else checkpoint_path.parent) / f"{checkpoint_path.stem}.{fmt}"


def metadata(cp: ckpt.Checkpoint) -> dict[str, Any]:
    """What a reader of the exported file should know about the network, as plain values."""

    cfg = cp.config
    run = run_dir_of(cp.path)
    negative, positive = class_words(cfg)
    hashed = hash_file(cp.path)
    info: dict[str, Any] = {
        "run": display(run.name) if run is not None else cfg.name,
        "checkpoint": display(cp.path.name),
        "checkpoint_sha256": None if hashed is None else hashed.sha256,
        "epoch": cp.epoch,
        "task": cfg.task.describe(),
        "negative_class": negative,
        "positive_class": positive,
        "dataset": cfg.data.dataset,
        "hidden": list(cfg.model.hidden),
        "dtype": cfg.model.dtype,
        "image_shape": list(cp.meta.get("image_shape") or []),
        "n_inputs": int(cp.meta["n_inputs"]),
        "preparation": style_for(cfg.data.dataset).name,
        "decision": DECISION,
        "mlecli_version": __version__,
        "test_accuracy": None,
    }
    if run is not None:
        info["test_accuracy"] = _test_accuracy(run, cp)
    return info


def _test_accuracy(run: Path, cp: ckpt.Checkpoint) -> dict[str, float] | None:
    """Accuracy from `mlecli evaluate`'s report on this very checkpoint (same file, same epoch,
    and the bytes it measured: evaluate.measured), if any: a report that is damaged, or whose
    figures are not numbers in range, counts as none."""

    report_path = run / f"eval-test-{cp.path.stem}.json"
    if not report_path.is_file():
        return None
    try:
        report = schema.read_json(report_path, schema.REPORT)
    except MlecliError:
        return None
    accuracy, threshold = report.get("accuracy"), report.get("threshold", 0.5)
    if (report["epoch"] != cp.epoch or not isinstance(report.get("checkpoint"), str)
            or Path(report["checkpoint"]).name != cp.path.name):
        return None
    if not measured(report, cp.path):
        return None  # made before the checkpoint was replaced by a later best
    if accuracy is None or not 0 <= accuracy <= 1 or not 0 < threshold < 1:
        return None
    return {"accuracy": float(accuracy), "threshold": float(threshold)}


# ---------------------------------------------------------------------------
# ONNX


def onnx_bytes(cp: ckpt.Checkpoint, info: dict[str, Any]) -> bytes:
    """The network as an ONNX model. It computes in double precision (its weights, stored as
    trained, are cast exactly), so that any runtime's ŷ agrees with mlecli's to about 1e-7: in
    float32, the runtimes' own sums over 784 pixels already differ by up to 1e-6."""
    try:
        import onnx  # lazy: onnx is an optional extra
        from onnx import TensorProto, helper, numpy_helper  # lazy: onnx is an optional extra
    except ImportError:
        raise MlecliError("--format onnx needs the onnx package: pip install 'mlecli[onnx]'") from None
    except Exception as exc:  # any type: importing a broken install runs its code (a missing shared library,
        # a module built for another numpy: OSError, AttributeError, ValueError…)
        why = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise MlecliError(f"--format onnx: the onnx package is installed but cannot be imported "
                          f"({type(exc).__name__}: {why}); reinstall it: pip install --force-reinstall "
                          "'mlecli[onnx]'") from None

    DOUBLE, FLOAT = TensorProto.DOUBLE, TensorProto.FLOAT
    n_in = info["n_inputs"]
    inits = [numpy_helper.from_array(np.array(255.0), "255")]
    nodes = [
        helper.make_node("Cast", ["pixels"], ["pixels_double"], to=DOUBLE, name="to_double"),
        helper.make_node("Div", ["pixels_double", "255"], ["h0"], name="scale_1_255"),
    ]
    h = "h0"
    for i, (W, b) in enumerate(cp.params, start=1):
        inits += [numpy_helper.from_array(W, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node("Cast", [f"W{i}"], [f"W{i}_double"], to=DOUBLE),
            helper.make_node("Cast", [f"b{i}"], [f"b{i}_double"], to=DOUBLE),
            helper.make_node("Gemm", [h, f"W{i}_double", f"b{i}_double"], [f"z{i}"], name=f"layer{i}"),
        ]
        if i < len(cp.params):
            nodes.append(helper.make_node("Sigmoid", [f"z{i}"], [f"h{i}"], name=f"sigmoid{i}"))
            h = f"h{i}"
    z = f"z{len(cp.params)}"
    nodes += [
        helper.make_node("Sigmoid", [z], ["y_hat_double"], name="probability"),
        helper.make_node("Cast", ["y_hat_double"], ["y_hat"], to=FLOAT),
        helper.make_node("Cast", [z], ["z"], to=FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "mlecli",
        [helper.make_tensor_value_info("pixels", FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("y_hat", FLOAT, ["N", 1]), helper.make_tensor_value_info("z", FLOAT, ["N", 1])],
        initializer=inits,
        doc_string=(
            f"{info['positive_class']} (y = 1) vs {info['negative_class']} (y = 0) on {info['dataset']}. "
            f"Input pixels: float32 (N, {n_in}), 0-255, light ink on black, each image prepared as "
            "`mlecli predict` prepares it (docs/predict.md). Outputs: y_hat = P(y = 1) and the logit z, "
            "float32, computed in double precision."
        ),
    )
    model = helper.make_model(
        graph,
        producer_name="mlecli",
        producer_version=__version__,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        doc_string=f"mlecli {__version__}: {info['run']} ({info['checkpoint']}, epoch {info['epoch']})",
    )
    helper.set_model_props(
        model, {f"mlecli.{k.removeprefix('mlecli_')}": _text(v) for k, v in info.items() if v is not None}
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, allow_nan=False)


# ---------------------------------------------------------------------------
# HTML


def _web(name: str) -> str:
    return resources.files("mlecli").joinpath("web", name).read_text(encoding="utf-8")


def page_model(cp: ckpt.Checkpoint, info: dict[str, Any]) -> dict[str, Any]:
    """The JSON the page reads: weights as base64 of little-endian floats, and the words it shows."""
    little = np.dtype(cp.config.model.dtype).newbyteorder("<")
    layers = [
        {
            "n_in": int(W.shape[0]),
            "n_out": int(W.shape[1]),
            "W": base64.b64encode(np.ascontiguousarray(W, little).tobytes()).decode("ascii"),
            "b": base64.b64encode(np.ascontiguousarray(b, little).tobytes()).decode("ascii"),
        }
        for W, b in cp.params
    ]
    digits = info["preparation"] == "mnist"
    footer = [
        f"run {info['run']}",
        f"{info['checkpoint']} (epoch {info['epoch']})",
        f"task {info['task']}",
        f"dataset {info['dataset']}",
        f"hidden {info['hidden']}",
    ]
    acc = info["test_accuracy"]
    if acc is not None:
        footer.append(f"test accuracy {100 * acc['accuracy']:.2f}% (ŷ ≥ {float(acc['threshold'])!r})")
    else:
        footer.append("test accuracy: not evaluated (mlecli evaluate)")
    footer += [f"mlecli {info['mlecli_version']}", "works offline: nothing you draw leaves this page"]
    return {
        "dtype": cp.config.model.dtype,
        "layers": layers,
        "words": [info["negative_class"], info["positive_class"]],
        "threshold": THRESHOLD,
        # the page decides as every command does (metrics.decide): y = 1 where z ≥ this bound
        "z_threshold": logit_bound(THRESHOLD),
        "style": info["preparation"],
        "seen": (
            "What the network sees: your drawing prepared as MNIST's digits were (cropped, scaled to 20 pixels, "
            "centred by its centre of mass in 28×28, light on dark)." if digits else
            "What the network sees: your drawing prepared as Fashion-MNIST's pictures were (cropped, scaled to "
            "28 pixels, centred in 28×28, light on dark)."
        ),
        "line_width": LINE_WIDTH,
        "heading": "Draw a digit" if digits else "Draw something to wear",
        "question": f"{info['positive_class']} or {info['negative_class']}? The network answers as you draw.",
        "footer": footer,
        "info": info,
    }


def page_html(cp: ckpt.Checkpoint, info: dict[str, Any]) -> str:
    # "<" is escaped so that no string in the JSON can close the <script> element holding it.
    model_json = json.dumps(page_model(cp, info), ensure_ascii=False, separators=(",", ":"),
                            allow_nan=False).replace("<", "\\u003c")
    page = _web("page.html")
    parts = {
        "<!--mlecli:title-->": html.escape(f"{info['run']}: {info['positive_class']} or {info['negative_class']}"),
        "<!--mlecli:model-->": model_json,
        "<!--mlecli:prepare.js-->": _web("prepare.js"),
        "<!--mlecli:page.js-->": _web("page.js"),
    }
    for marker, text in parts.items():
        assert page.count(marker) == 1, marker
        page = page.replace(marker, text)
    return page
