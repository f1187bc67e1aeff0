"""docs/predict.md stays true to the code: its options, its constants, its tests, its example."""

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pictures import encode, strokes

from mlecli.cli import main
from mlecli.use import preparation as prepare

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "predict.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["predict", "export"])
def test_every_option_of_predict_and_export_is_in_the_doc(name):
    for param in main.commands[name].params:
        for opt in param.opts:
            if opt.startswith("--") and opt != "--help":
                assert f"`{opt}" in DOC, f"{name} {opt} is missing from docs/predict.md"


def test_every_test_named_in_the_behaviour_table_exists():
    section = DOC.split("## Behaviour", 1)[1]
    named = set(re.findall(r"`(test_\w+)`", section))
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
    assert len(named) >= 20
    assert named <= defined, f"named in docs/predict.md but not defined: {sorted(named - defined)}"


def test_the_steps_state_the_constants_the_code_uses():
    doc = " ".join(DOC.split())  # the doc's lines wrap anywhere
    assert prepare.MAD_TO_SIGMA == 1.4826 and "1.4826 · median(d)" in doc
    assert prepare.Q90_SIGMAS == 1.6449 and "f₉₀ / 1.6449" in doc
    assert prepare.FAINT == 16 and "a sixteenth of the contrast" in doc
    assert (prepare.MIN_CONTRAST, prepare.BLANK_NOISE) == (0.1, 8) and "max(0.1, 8σ)" in doc
    assert prepare.NOISE_CUT == 3 and "lo = m + 3σ and hi = p − 3σ" in doc
    assert prepare.TRIM == 0.005 and "δ = 0.5% when σ > 0" in doc
    assert (prepare.MNIST.box, prepare.MNIST.target) == (20, 14.5) and "t = 14.5" in doc
    assert (prepare.FASHION_MNIST.box, prepare.FASHION_MNIST.target) == (28, 14.0) and "t = 14, the frame's middle" in doc


def test_the_python_api_example_runs(tmp_path, tiny, tiny_folder, monkeypatch):
    cfg = tiny.write_config(tmp_path / "t.toml", tiny_folder, "[model]\nhidden = [4]\n[train]\nepochs = 1\n")
    run = tmp_path / "runs" / "default-20260101-120000"
    assert CliRunner().invoke(main, ["train", str(cfg), "--run-dir", str(run), "--data-dir", str(tmp_path / "d"),
                                     "-q"]).exit_code == 0
    ink = strokes([[(5, 8), (5, 20), (25, 12)]], (30, 30), width=3)
    (tmp_path / "seven.png").write_bytes(encode(1.0 - ink))
    (tmp_path / "scan.jpg").write_bytes(encode(1.0 - ink, "JPEG"))
    monkeypatch.chdir(tmp_path)
    block = DOC.split("## The Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len(block.strip().splitlines()) == 5
    scope: dict = {}
    exec(block, scope)  # noqa: S102 (our own documentation)
    assert scope["proba"].shape == (2, 2) and scope["image"].shape == (28, 28)
    assert np.allclose(scope["proba"].sum(axis=1), 1)
