"""Bad input, generated: the parser, the config loader and the checkpoint reader either
return a valid result or raise the project's own error, never anything else."""

from __future__ import annotations

import gzip
import tomllib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fakes import rewrite_npz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlecli.cli import main
from mlecli.data.idx import decode_file_bytes, idx_bytes, parse_idx
from mlecli.run import checkpoint as ckpt
from mlecli.run import config
from mlecli.safe.errors import CheckpointError, ConfigError, DataError

EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

GOOD_IDX = [
    idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4)),
    idx_bytes(np.arange(5, dtype=np.int32) - 2),
    idx_bytes(np.linspace(0, 1, 6).reshape(2, 3)),
    idx_bytes(np.zeros((0, 3), np.int16)),
]


def parse_or_refuse(data: bytes) -> None:
    try:
        arr = parse_idx(decode_file_bytes(data, "f"), "f")
    except DataError as exc:
        assert str(exc).startswith("f: ") or str(exc).startswith("f")
        return
    assert isinstance(arr, np.ndarray) and arr.dtype.isnative


@st.composite
def mutated(draw, good: list[bytes]):
    data = bytearray(draw(st.sampled_from(good)))
    if draw(st.booleans()):
        data = bytearray(gzip.compress(bytes(data), mtime=0))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "append", "insert"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=16))
        elif op == "insert" and data:
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@EXAMPLES
@given(st.binary(max_size=64))
def test_random_bytes_parse_or_are_refused(data):
    parse_or_refuse(data)


@EXAMPLES
@given(st.binary(min_size=4, max_size=40).map(lambda b: b"\x00\x00" + b[2:]))
def test_random_bytes_with_a_plausible_magic_parse_or_are_refused(data):
    parse_or_refuse(data)


@EXAMPLES
@given(mutated(GOOD_IDX))
def test_mutated_good_files_parse_or_are_refused(data):
    parse_or_refuse(data)


# ---------------------------------------------------------------------------
# Configs

VALID = (Path(__file__).resolve().parent.parent / "configs" / "default.toml").read_text()
toml_scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True), st.booleans(), st.text(max_size=12),
)
toml_values = st.recursive(
    toml_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
SECTION_KEYS = st.sampled_from([*config.SCHEMA, "name", "trian", "x"])


def load_or_refuse(path: Path) -> None:
    try:
        cfg = config.load(path)
    except ConfigError:
        return
    assert isinstance(cfg, config.Config)
    # whatever loads, writes back to TOML that loads to the same config
    assert config.from_dict(tomllib.loads(config.to_toml(cfg)), name=cfg.name) == cfg


@EXAMPLES
@given(text=st.text(max_size=200))
def test_random_text_loads_or_is_refused(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text, encoding="utf-8")
    load_or_refuse(p)


@EXAMPLES
@given(edits=st.lists(st.tuples(st.integers(0, len(VALID)), st.integers(0, 6), st.text(max_size=4)), max_size=4))
def test_mutated_valid_configs_load_or_are_refused(tmp_path, edits):
    text = VALID
    for pos, cut, insert in edits:
        text = text[:pos] + insert + text[pos + cut :]
    p = tmp_path / "c.toml"
    p.write_text(text, encoding="utf-8")
    load_or_refuse(p)


@EXAMPLES
@given(doc=st.dictionaries(SECTION_KEYS, st.dictionaries(
    st.sampled_from([k for keys in config.SCHEMA.values() for k in keys] + ["typo"]), toml_values, max_size=5,
) | toml_values, max_size=4))
def test_random_documents_validate_or_are_refused(doc):
    try:
        cfg = config.from_dict(doc, name="x")
    except ConfigError:
        return
    assert isinstance(cfg, config.Config)


@pytest.mark.parametrize("hidden", ["[1000000000]", "[100000, 100000]", "[1000000, 1000000, 10]"])
def test_networks_that_cannot_fit_are_refused_with_the_memory_they_need(hidden):
    with pytest.raises(ConfigError, match=r"the network would need about [\d.]+ (GiB|TiB) of memory"):
        config.load(None, [f"model.hidden={hidden}"])


# ---------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory, tiny, tiny_folder):
    root = tmp_path_factory.mktemp("ckpt")
    cfg = tiny.write_config(root / "c.toml", tiny_folder, "[model]\nhidden = [4]\n[train]\nepochs = 1\n")
    res = CliRunner().invoke(main, ["train", str(cfg), "--run-dir", str(root / "run"), "--data-dir",
                                    str(root / "data"), "-q"])
    assert res.exit_code == 0, res.output
    return str(root / "run" / "checkpoints" / "last.npz")  # a path: hypothesis prints its arguments


@EXAMPLES
@given(data=st.data())
def test_damaged_checkpoints_load_whole_or_not_at_all(tmp_path, good_checkpoint, data):
    blob = bytearray(Path(good_checkpoint).read_bytes())
    how = data.draw(st.sampled_from(["flip", "cut", "garbage"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "cut":
        del blob[data.draw(st.integers(0, len(blob) - 1)) :]
    else:
        blob = bytearray(data.draw(st.binary(max_size=200)))
    path = tmp_path / "last.npz"
    path.write_bytes(bytes(blob))
    try:
        cp = ckpt.load(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
        return
    for W, b in cp.params:
        assert np.all(np.isfinite(W)) and np.all(np.isfinite(b))


def test_a_checkpoint_with_a_pickled_meta_record_is_refused(tmp_path, good_checkpoint):
    rewrite_npz(good_checkpoint, tmp_path / "evil.npz", replace={"meta": np.array([{"format": 1}], dtype=object)})
    with pytest.raises(CheckpointError, match="would need pickle to load; refused"):
        ckpt.load(tmp_path / "evil.npz")


def test_a_checkpoint_whose_meta_is_not_json_is_refused(tmp_path, good_checkpoint):
    rewrite_npz(good_checkpoint, tmp_path / "bad.npz", replace={"meta": np.array("{not json")})
    with pytest.raises(CheckpointError, match=r"the meta record is not valid JSON"):
        ckpt.load(tmp_path / "bad.npz")


# ---------------------------------------------------------------------------
# URLs and command-line options


@pytest.mark.parametrize("url", ["ftp://x/mnist/", "sftp://x/", "gopher://x/", "data:,abc", "s3://bucket/mnist/"])
def test_only_http_https_file_and_folders_are_mirrors(url, tmp_path):
    res = CliRunner().invoke(main, ["download", "--mirror", url, "--data-dir", str(tmp_path)])
    assert res.exit_code == 2
    assert res.stderr.splitlines()[-1].startswith(f"Error: Invalid value for '--mirror {url}': unsupported URL scheme")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\ndataset = "mine"\nurl = "{url}"\n')
    res = CliRunner().invoke(main, ["download", "--config", str(cfg), "--data-dir", str(tmp_path)])
    assert res.exit_code == 1 and "unsupported URL scheme" in res.stderr


BAD_OPTIONS = [
    ["download", "--dataset", "cifar"],
    ["download", "--timeout", "0"],
    ["download", "--timeout", "soon"],
    ["download", "--timeout", "nan"],
    ["download", "--timeout", "inf"],
    ["download", "--retries", "-1"],
    ["download", "--retries", "many"],
    ["download", "--min-rate", "0"],
    ["download", "--min-rate", "fast"],
    ["download", "--min-rate", "nan"],
    ["download", "--config", "."],
    ["download", "--mirror", "ftp://example.org/mnist/"],
    ["download", "--mirror", "http:///no-host/"],
    ["download", "--data-dir", "README.md"],
    ["train", "--set", "epochs"],
    ["train", "--set", "=3"],
    ["train", "--set", "model.hidden=[1,"],
    ["train", "--run-dir", "README.md"],
    ["train", "--resume", "README.md"],
    ["train", "--data-dir", "README.md"],
    ["evaluate", "runs", "--split", "everything"],
    ["evaluate", "runs", "--threshold", "0"],
    ["evaluate", "runs", "--threshold", "1"],
    ["evaluate", "runs", "--threshold", "half"],
    ["evaluate", "runs", "--threshold", "nan"],
    ["evaluate", "runs", "--checkpoint", "newest"],
    ["evaluate", "runs", "--data-dir", "README.md"],
    ["evaluate"],
    ["evaluate", "runs", "--dataset", "My Digits"],
    ["import", "mine", "--name", "My Digits"],
    ["import", "mine", "--name", "mnist"],
    ["import", "mine", "--name", "x", "--test-fraction", "1.5"],
    ["import", "mine", "--name", "x", "--test-fraction", "nan"],
    ["import", "mine", "--name", "x", "--seed", "-1"],
    ["import", "mine", "--name", "x", "--preparation", "fashion"],
    ["import", "mine", "--name", "x", "--data-dir", "README.md"],
    ["import", "mine", "--name", "x", "--jobs", "0"],
    ["import", "mine"],
    ["plot", "runs", "--out", "README.md"],
    ["plot", "runs", "--data-dir", "README.md"],
    ["plot"],
    ["runs", "--sort", "speed"],
    ["runs", "README.md"],
    ["runs", "--where", "finished"],
    ["runs", "--where", "train.learning_rat=0.1"],
    ["runs", "--where", "model.hidden=[1,"],
    ["sweep", "--grid", "train.learning_rate"],
    ["sweep", "--grid", "train.learning_rate="],
    ["sweep", "--grid", "train.learning_rate=0.1,,0.2"],
    ["sweep", "--grid", "train.learning_rate=0.1,0.2,"],
    ["sweep", "--grid", "train.learning_rate=0.1,0.10"],
    ["sweep", "--grid", "model.hidden=[1,"],
    ["sweep", "--set", "epochs"],
    ["sweep", "--seeds", "a"],
    ["sweep", "--seeds", "3-1"],
    ["sweep", "--seeds", "0,1,0"],
    ["sweep", "--cluster", "local:0"],
    ["sweep", "--cluster", "tcp://no where"],
    ["sweep", "--seeds", ""],
    ["sweep", "--jobs", "0"],
    ["sweep", "--jobs", "many"],
    ["sweep", "--sweep-dir", "README.md"],
    ["sweep", "--data-dir", "README.md"],
    ["predict", "runs", "x.png", "--checkpoint", "newest"],
    ["predict", "runs", "x.png", "--threshold", "0"],
    ["predict", "runs", "x.png", "--threshold", "half"],
    ["predict", "runs", "x.png", "--show", "tests"],
    ["predict", "runs"],
    ["export", "runs", "--format", "pdf"],
    ["export", "runs"],
    ["export", "runs", "--format", "html", "--checkpoint", "newest"],
    ["export", "runs", "--format", "html", "--out", "tests"],
]


@pytest.mark.parametrize("args", BAD_OPTIONS, ids=" ".join)
def test_every_bad_option_is_a_usage_error(args, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    res = CliRunner().invoke(main, args, prog_name="mlecli")
    assert res.exit_code == 2, res.output
    assert res.stderr.splitlines()[0].startswith("Usage: mlecli ")
    assert "Traceback" not in res.stderr


def test_every_option_with_a_type_has_a_bad_value_tried():
    tried = {(a[0], a[i]) for a in BAD_OPTIONS for i in range(1, len(a)) if a[i].startswith("--")}
    for name, cmd in main.commands.items():
        for param in cmd.params:
            if param.opts[0].startswith("--") and not getattr(param, "is_flag", False) and param.name != "help":
                assert (name, param.opts[0]) in tried, f"{name} {param.opts[0]} has no bad-value test"
