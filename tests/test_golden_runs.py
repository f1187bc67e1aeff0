"""Every shipped config, and every update rule, prior, schedule and dtype, trains to the
bytes recorded in tests/golden/runs.json by the code before the package was reorganised."""

from __future__ import annotations

import gzip
import hashlib
import json
import platform
import tomllib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

HERE = Path(__file__).resolve().parent / "golden"
SHIPPED = Path(__file__).resolve().parents[1] / "mlecli" / "configs"
TIMINGS = ("seconds", "images_per_s")

# name → (shipped config, overrides): the shipped configs as they are, and the update
# rules, the prior, the schedules, float64, shifts and step records they do not cover.
CASES = {
    "default": ("default", {}),
    "logreg": ("logreg", {}),
    "four-vs-nine": ("four-vs-nine", {}),
    "deep": ("deep", {}),
    "accurate": ("accurate", {}),
    "adam-prior-plateau": ("default", {"train": {"optimizer": "adam", "learning_rate": 0.002, "prior_sd": 1.0,
                                                 "prior_biases": True, "plateau_patience": 1}}),
    "nesterov-prior-warmup": ("deep", {"train": {"optimizer": "nesterov", "learning_rate": 0.02, "prior_sd": 0.5,
                                                 "schedule": "step", "decay_every": 1, "warmup_epochs": 0.5}}),
    "momentum-float64-steps": ("logreg", {"model": {"dtype": "float64"},
                                          "train": {"optimizer": "momentum", "log_every": 3, "batch_size": 100}}),
    "sgd-float64-big-batch": ("default", {"model": {"dtype": "float64", "hidden": [8, 8]},
                                          "train": {"batch_size": 128, "patience": 1}}),
}
EPOCHS = 3


def digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n 28×28 images whose bright stripes depend on the digit (fixed here for good: the
    recorded bytes depend on it)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, d in enumerate(labels):
        row = 2 + int(d) * 24 // 10
        images[i, row : row + 2, 4:24] = 180 + int(d) * 7
        if d % 2:
            images[i, 4:24, 14] = 230
    return images, labels


def idx(a: np.ndarray) -> bytes:
    code = {1: b"\x00\x00\x08\x01", 3: b"\x00\x00\x08\x03"}[a.ndim]
    return code + b"".join(int(d).to_bytes(4, "big") for d in a.shape) + a.tobytes()


def write_dataset(folder: Path) -> dict[str, str]:
    """The golden dataset's four .gz files in `folder`; returns its sha256 table."""
    folder.mkdir(parents=True, exist_ok=True)
    (tr_x, tr_y), (te_x, te_y) = digits(400, 11), digits(100, 12)
    files = {"train-images": ("train-images-idx3-ubyte", tr_x), "train-labels": ("train-labels-idx1-ubyte", tr_y),
             "test-images": ("t10k-images-idx3-ubyte", te_x), "test-labels": ("t10k-labels-idx1-ubyte", te_y)}
    sha = {}
    for role, (name, array) in files.items():
        content = idx(array)
        (folder / f"{name}.gz").write_bytes(gzip.compress(content, mtime=0))
        sha[role] = hashlib.sha256(content).hexdigest()
    return sha


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def write_config(name: str, tmp: Path) -> Path:
    shipped, overrides = CASES[name]
    body = tomllib.loads((SHIPPED / f"{shipped}.toml").read_text())
    mirror = tmp / "mirror"
    sha = write_dataset(mirror)
    body["data"] = {**body["data"], "dataset": "golden", "url": str(mirror), "sha256": sha}
    body["train"]["epochs"] = EPOCHS
    for section, values in overrides.items():
        body[section] = {**body[section], **values}
    path = tmp / f"{name}.toml"
    path.write_text("".join(f"[{s}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in vals.items())
                            for s, vals in body.items()))
    return path


def digest(path: Path) -> dict:
    """Each array's dtype, shape and SHA-256, its float64 sum (for a machine whose numpy
    differs), and the meta record but for the version of mlecli that wrote it."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")[()]))
    meta.pop("mlecli", None)
    meta["config"]["data"].pop("url")  # a temporary folder's name
    return {"arrays": {k: {"dtype": str(a.dtype), "shape": list(a.shape), "sha256": hashlib.sha256(a.tobytes()).hexdigest(),
                           "sum": float(np.sum(a, dtype=np.float64)), "abs": float(np.sum(np.abs(a), dtype=np.float64))}
                       for k, a in sorted(arrays.items())},
            "meta": meta}


def train_case(name: str, tmp: Path) -> dict:
    from mlecli.cli import main

    work = tmp / name
    work.mkdir()
    run = work / "run"
    res = CliRunner().invoke(main, ["train", str(write_config(name, work)), "--run-dir", str(run),
                                    "--data-dir", str(work / "data")])
    assert res.exit_code == 0, res.output
    records = [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    checkpoints = {p.name: digest(p) for p in sorted((run / "checkpoints").glob("*.npz"))}
    return {"checkpoints": checkpoints, "metrics": records}


def environment() -> dict:
    from mlecli.nn.blas import backend

    return {"numpy": np.__version__, "blas": backend(), "machine": platform.machine()}


GOLDEN = json.loads((HERE / "runs.json").read_text()) if (HERE / "runs.json").exists() else None


@pytest.mark.parametrize("name", list(CASES))
def test_a_config_trains_to_the_recorded_bytes(name, tmp_path):
    assert GOLDEN is not None, "tests/golden/runs.json is missing"
    want, got = GOLDEN["cases"][name], train_case(name, tmp_path)
    if environment() == GOLDEN["made_with"]:  # the same numpy and BLAS: the very bytes
        assert got == want
        return
    # Another numpy or BLAS may round differently: the same files, figures and metrics
    # records, each number within a relative 1e-4 of the recorded one.
    assert got["checkpoints"].keys() == want["checkpoints"].keys()
    for ck, w in want["checkpoints"].items():
        g = got["checkpoints"][ck]
        assert g["meta"].keys() == w["meta"].keys()
        for k, a in w["arrays"].items():
            assert (g["arrays"][k]["dtype"], g["arrays"][k]["shape"]) == (a["dtype"], a["shape"]), (ck, k)
            assert g["arrays"][k]["sum"] == pytest.approx(a["sum"], rel=1e-4, abs=1e-6), (ck, k)
            assert g["arrays"][k]["abs"] == pytest.approx(a["abs"], rel=1e-4), (ck, k)
    assert len(got["metrics"]) == len(want["metrics"])
    for g, w in zip(got["metrics"], want["metrics"], strict=True):
        assert g.keys() == w.keys()
        for k, v in w.items():
            assert g[k] == (pytest.approx(v, rel=1e-4, abs=1e-9) if isinstance(v, float) else v), k
