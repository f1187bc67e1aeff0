"""What a hostile tester hands to `predict`, `export` and `mlecli.load`, held by the mechanisms
that make each class of breakage impossible: every input read inside its own guard, sizes
from headers in exact integers checked against budgets before anything is allocated, only
regular files and standard input read, names made valid Unicode once, one conversion for
every picture, ŷ finite by a bound on the weights, outputs that cannot be an input or a
run's own file. Searches (hypothesis, fuzzed headers and names) rather than single cases
where a search is possible.
"""

from __future__ import annotations

import fractions
import gzip
import importlib.util
import io
import itertools
import json
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require
from fakes import make_digits
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pictures import encode, strokes
from PIL import Image

import mlecli
from mlecli.cli import main
from mlecli.data.idx import idx_bytes
from mlecli.run import checkpoint as ckpt
from mlecli.safe.errors import CheckpointError, InputError, MlecliError
from mlecli.use import inputs
from mlecli.use import predict as pr
from mlecli.use.preparation import prepare, prepare_steps

INK = strokes([[(6, 8), (5, 20), (16, 13), (26, 17), (30, 9)], [(16, 13), (16, 22)]], (36, 30), width=3.5)
PAGE8 = np.floor(255 * (1.0 - INK) + 0.5).astype(np.uint8)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def cli(*args, input=None):
    return CliRunner().invoke(main, [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny, tiny_folder):
    root = tmp_path_factory.mktemp("hostile")
    cfg = tiny.write_config(root / "tiny.toml", tiny_folder, "[model]\nhidden = [8]\n[train]\nepochs = 1\n")
    res = cli("train", cfg, "--run-dir", root / "run", "--data-dir", root / "data", "-q")
    assert res.exit_code == 0, res.output
    return root / "run"


@pytest.fixture(scope="module")
def model(run):
    return mlecli.load(run)


@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "good.png"
    Image.fromarray(PAGE8).save(path)
    return path


def npy_bytes(shape, descr="'|u1'", fortran=False, body=b"\0" * 784, version=(1, 0)) -> bytes:
    header = ("{'descr': %s, 'fortran_order': %s, 'shape': %s, }" % (descr, fortran, shape)).encode("latin1")
    width = 2 if version == (1, 0) else 4
    header += b" " * (63 - (8 + width + len(header)) % 64) + b"\n"
    return b"\x93NUMPY" + bytes(version) + len(header).to_bytes(width, "little") + header + body


def load_file(tmp_path: Path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return inputs.load(inputs.Source(name, path))


def refusal(tmp_path: Path, name: str, data: bytes) -> str:
    with pytest.raises(InputError) as err:
        load_file(tmp_path, name, data)
    return str(err.value)


# ---------------------------------------------------------------------------
# 1. Headers: sizes in exact integers, checked before a byte is allocated


@pytest.mark.parametrize("shape,descr,fortran,says", [
    ((2**32, 2**32), "'|u1'", False,
     "x.npy: the .npy file's images are 4294967296×4294967296 pixels: a side longer than the 65,536 pixels mlecli reads"),
    ((3, 3074457345618258603), "'<f8'", False,
     "x.npy: the .npy file's images are 3×3074457345618258603 pixels: a side longer than the 65,536 pixels mlecli reads"),
    ((2, 2**62), "'|u1'", True,
     "x.npy: the .npy file's images are 2×4611686018427387904 pixels: a side longer than the 65,536 pixels mlecli reads"),
    ((0, 2**40, 2**40), "'|u1'", False, "x.npy: the .npy file holds no images (shape 0×1099511627776×1099511627776)"),
    ((400_000, 28, 28), "'|u1'", False,
     "x.npy: the .npy file holds 400,000 images, more than the 300,000 mlecli reads from one file: split it"),
    ((100_000, 28, 28), "'<f8'", False,
     "x.npy: the .npy file's header declares 627,200,000 bytes of images, more than the 512 MB mlecli reads from "
     "one file: split it"),
    ((-1, 784), "'|u1'", False, "x.npy: the .npy file's header is damaged (shape -1×784)"),
    ((3,), "[('a', '<i4'), ('b', '<f4')]", False,
     "x.npy: the .npy file holds [('a', '<i4'), ('b', '<f4')] values; images are uint8 0-255 or float 0-1"),
    ((28, 28), "'<U3'", False, "x.npy: the .npy file holds <U3 values; images are uint8 0-255 or float 0-1"),
    ((5,), "'|O'", False, "x.npy: the .npy file holds Python objects (loading it would need pickle); refused"),
])
def test_a_crafted_npy_header_is_refused_by_its_numbers_alone(tmp_path, shape, descr, fortran, says):
    tracemalloc.start()
    try:
        assert refusal(tmp_path, "x.npy", npy_bytes(shape, descr, fortran)) == says
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # nothing the header asked for was allocated


def test_a_sub_array_type_is_read_as_numpy_loads_it(tmp_path):
    digits, _ = make_digits(2, seed=3)
    loaded = load_file(tmp_path, "sub.npy", npy_bytes((2,), "('|u1', (28, 28))", body=digits.tobytes()))
    assert loaded.images.shape == (2, 28, 28) and loaded.indexed
    np.testing.assert_array_equal(loaded.images, digits)


def test_a_large_npy_header_is_refused_without_advising_pickle(tmp_path):
    header = b"{'descr': '|u1', 'fortran_order': False, 'shape': (28, 28), }" + b" " * 20_000 + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(784)
    assert refusal(tmp_path, "wide.npy", data) == (
        f"wide.npy: the .npy file's header is {len(header):,} bytes long, more than the 10,000 of any array of "
        "images: the file is damaged")


@st.composite
def npy_headers(draw):
    dims = st.one_of(st.integers(0, 40), st.integers(0, 2**64), st.sampled_from([784, 28, 2**31, 2**32, -1]))
    shape = tuple(draw(st.lists(dims, max_size=5)))
    descr = draw(st.sampled_from(["'|u1'", "'<f8'", "'>f4'", "'|b1'", "'<i8'", "'<c8'", "'|V4'", "'<U2'", "'|O'",
                                  "('|u1', (28, 28))", "('<f4', (2,))", "[('a', '|u1')]", "'<M8[s]'", "'<f2'"]))
    body = draw(st.binary(max_size=64)) + bytes(draw(st.sampled_from([0, 784, 1568, 4 * 784, 8 * 784])))
    version = draw(st.sampled_from([(1, 0), (2, 0)]))
    shape_text = repr(shape) if draw(st.booleans()) else draw(st.sampled_from(["[1, 2]", "(1.5,)", "'x'", "(1,"]))
    return npy_bytes(shape_text, descr, draw(st.booleans()), body, version)


@FUZZ
@given(npy_headers())
def test_any_npy_header_gives_images_or_one_line_within_a_small_memory(tmp_path, data):
    tracemalloc.start()
    try:
        try:
            loaded = load_file(tmp_path, "f.npy", data)
            assert loaded.images.ndim == 3 and loaded.images.dtype.kind in "uf"
        except InputError as exc:
            assert str(exc).startswith("f.npy: ") and "\n" not in str(exc) and "allow_pickle" not in str(exc)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


@st.composite
def idx_headers(draw):
    code = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E]))
    dims = draw(st.lists(st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1)), min_size=1, max_size=4))
    body = bytes(draw(st.sampled_from([0, 10, 784, 3 * 784])))
    raw = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + body
    return gzip.compress(raw, mtime=0) if draw(st.booleans()) else raw


@FUZZ
@given(idx_headers())
def test_any_idx_header_gzipped_or_not_gives_images_or_one_line_within_a_small_memory(tmp_path, data):
    tracemalloc.start()
    try:
        try:
            assert load_file(tmp_path, "f.idx", data).images.ndim == 3
        except InputError as exc:
            assert str(exc).startswith("f.idx: ") and "\n" not in str(exc)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_crafted_headers_among_good_inputs_are_one_line_each(run, tmp_path, good):
    for name, data in {"overflow.npy": npy_bytes((2**32, 2**32)), "zero_big.npy": npy_bytes((0, 2**40, 2**40))}.items():
        (tmp_path / name).write_bytes(data)
    res = cli("predict", run, good, tmp_path / "overflow.npy", good, tmp_path / "zero_big.npy", good)
    assert res.exit_code == 1 and res.stdout.count(str(good)) == 3
    assert res.stderr.splitlines() == [
        f"Error: {tmp_path / 'overflow.npy'}: the .npy file's images are 4294967296×4294967296 pixels: a side longer "
        "than the 65,536 pixels mlecli reads",
        f"Error: {tmp_path / 'zero_big.npy'}: the .npy file holds no images (shape 0×1099511627776×1099511627776)",
    ]


def test_the_api_raises_input_errors_only(model, tmp_path):
    (tmp_path / "overflow.npy").write_bytes(npy_bytes((2**32, 2**32)))
    with pytest.raises(InputError, match=r"overflow.npy: the .npy file's images are 4294967296×4294967296 pixels"):
        model.predict_proba(tmp_path / "overflow.npy")
    huge = np.broadcast_to(np.uint8(0), (2**20, 2**20))  # a view: no memory behind it
    with pytest.raises(InputError, match=r"^array: the array's images are 1048576×1048576 pixels: a side longer"):
        model.predict_proba(huge)
    with pytest.raises(InputError, match=r"^array: the array holds <U1 values"):
        model.predict_proba(np.full((28, 28), "x"))


def test_any_failure_while_reading_one_input_is_that_input_s_line(run, good, tmp_path, monkeypatch):
    (tmp_path / "bug.png").write_bytes(good.read_bytes())
    real = inputs.read_image

    def broken(data, name):
        if name.endswith("bug.png"):
            raise ZeroDivisionError("a bug deep inside")
        return real(data, name)

    monkeypatch.setattr(inputs, "read_image", broken)
    res = cli("predict", run, good, tmp_path / "bug.png", good)
    assert res.exit_code == 1 and res.stdout.count(str(good)) == 2
    assert res.stderr == f"Error: {tmp_path / 'bug.png'}: cannot read it (ZeroDivisionError: a bug deep inside)\n"


# ---------------------------------------------------------------------------
# 2. Names: a total order on any name, and valid Unicode in every output


@given(st.lists(st.text(max_size=12), max_size=12))
def test_the_natural_order_is_a_total_order_on_any_names(names):
    once = sorted(names, key=inputs.natural_key)
    assert sorted(once, key=inputs.natural_key) == once
    assert sorted(reversed(names), key=inputs.natural_key) == once or len(set(map(inputs.natural_key, names))) < len(names)


def test_numbers_in_names_are_compared_as_numbers_and_only_ascii_digits_are_numbers():
    names = ["10.png", "2.png", "1²2.png", "١٢.png", "1.png", "a.png"]
    assert sorted(names, key=inputs.natural_key) == ["1.png", "1²2.png", "2.png", "10.png", "a.png", "١٢.png"]


@given(st.one_of(st.binary(min_size=1, max_size=20).map(os.fsdecode), st.text(max_size=20)))
def test_every_name_is_shown_as_valid_unicode(name):
    shown = inputs.display(name)
    shown.encode("utf-8")  # never a lone surrogate
    if name.encode("utf-8", "surrogateescape").decode("utf-8", "replace") == name:
        assert shown == name


@pytest.mark.parametrize("encoding,y_hat", [("latin-1", b"\\u0177"), ("cp1252", b"\\u0177"),
                                            ("ascii", "ŷ".encode())])  # click writes UTF-8 where ASCII is said
def test_a_terminal_that_cannot_show_every_character_gets_escapes_not_a_traceback(run, tmp_path, encoding, y_hat):
    picture = tmp_path / "1²2-ŷ.png"
    picture.write_bytes(encode(1.0 - INK))
    env = {**os.environ, "PYTHONIOENCODING": encoding}
    for extra in ([], ["--json"], ["--threshold", "x"]):
        res = subprocess.run([sys.executable, "-m", "mlecli", "predict", str(run), str(picture),
                              str(tmp_path / "missing-ŷ.png"), *extra],
                             capture_output=True, env=env, timeout=60)
        assert b"Traceback" not in res.stderr and res.returncode == (2 if extra[:1] == ["--threshold"] else 1)
        if not extra:
            assert y_hat + b" 0." in res.stdout and res.stderr.count(b"\n") == 1


def test_names_with_odd_characters_give_valid_json_in_valid_utf8(run, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    names = [b"1\xc2\xb22.png", b"latin1-\xe9.png", b"two\nlines.png", b"10.png", b"2.png"]
    for name in names:
        Path(os.fsdecode(os.fsencode(folder) + b"/" + name)).write_bytes(encode(1.0 - INK))
    res = cli("predict", run, folder, "--json")
    assert res.exit_code == 0, res.output
    lines = res.stdout_bytes.decode("utf-8").splitlines()  # strict: valid UTF-8
    got = [Path(json.loads(line)["input"]).name for line in lines]
    assert got == ["1²2.png", "2.png", "10.png", "latin1-\\xe9.png", "two\nlines.png"]
    table = cli("predict", run, folder).stdout_bytes.decode("utf-8").splitlines()
    assert [line.split("  ")[0].strip().rsplit("/", 1)[1] for line in table] == [
        "1²2.png", "2.png", "10.png", "latin1-\\xe9.png", "two\\nlines.png"]


SPLITTERS = [chr(c) for c in range(0x110000) if len(f"a{chr(c)}b".splitlines()) > 1]  # \n, \r, \v, …, U+2029


def test_every_character_a_unicode_line_splitter_splits_on_is_escaped_in_json_names(run, tmp_path):
    assert len(SPLITTERS) >= 10  # the search above found them (str.splitlines' own list, whatever its version)
    folder = tmp_path / "uni"
    folder.mkdir()
    names = [f"{k:02d}{c}x.png" for k, c in enumerate(SPLITTERS)]
    for name in names:
        (folder / name).write_bytes(encode(1.0 - INK))
    res = cli("predict", run, folder, "--json")
    assert res.exit_code == 0, res.output
    text = res.stdout_bytes.decode("utf-8")
    assert not any(c in text for c in SPLITTERS if c != "\n")
    lines = text.splitlines()
    assert [Path(json.loads(line)["input"]).name for line in lines] == names


@settings(max_examples=300, deadline=None)
@given(name=st.text(st.characters(blacklist_categories=["Cs"]), max_size=12) | st.sampled_from(SPLITTERS),
       words=st.tuples(st.text(max_size=6), st.text(max_size=6)))
def test_a_json_line_is_one_line_for_any_line_splitter_whatever_the_names(name, words):
    batch = pr.Batch(name, np.array([0, 3]), np.zeros((2, 28, 28), np.uint8), np.array([-1.1, 1.1]))  # logits
    for line in pr.json_lines(batch, words, 0.5):
        assert line.splitlines() == [line] and line.encode("utf-8")  # one line, valid UTF-8
        got = json.loads(line)
        assert (got["input"], got["label"]) in {(inputs.display(name), inputs.display(w)) for w in words}


# ---------------------------------------------------------------------------
# 3. Memory: budgets from what a file declares, streaming decompression, bounded errors


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1, mtime=0)


def test_an_idx_header_over_a_budget_is_refused_before_the_rest_is_decompressed(tmp_path):
    one_huge = struct.pack(">BBBBIII", 0, 0, 8, 3, 1, 16000, 16000) + bytes(1 << 20)  # the rest never read
    many = struct.pack(">BBBBIII", 0, 0, 8, 3, 1_369_000, 28, 28) + bytes(1 << 20)
    tracemalloc.start()
    try:
        assert refusal(tmp_path, "big.gz", gz(one_huge)) == (
            "big.gz: the IDX file's images are 16000×16000 pixels: more than the 50 megapixels mlecli reads")
        assert refusal(tmp_path, "many.gz", gz(many)) == (
            "many.gz: the IDX file holds 1,369,000 images, more than the 300,000 mlecli reads from one file: split it")
        assert refusal(tmp_path, "many.idx", many) == (
            "many.idx: the IDX file holds 1,369,000 images, more than the 300,000 mlecli reads from one file: split it")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # the 1 MB files, a piece of the stream: nothing the headers declared


def test_a_gzip_of_zeros_is_refused_by_its_first_bytes(tmp_path):
    bomb = gz(bytes(64 << 20))  # 64 MB of zeros in 64 KB
    tracemalloc.start()
    try:
        assert refusal(tmp_path, "zeros.gz", bomb) == (
            "zeros.gz: a gzip file that does not hold an IDX file (images like MNIST's)")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20


def test_a_picture_over_the_longest_side_is_refused_before_it_is_decoded(tmp_path):
    path = tmp_path / "line.png"
    Image.new("1", (70_000, 3)).save(path)
    assert refusal(tmp_path, "line.png", path.read_bytes()) == (
        "line.png: 70000×3 pixels: a side longer than the 65,536 pixels mlecli reads; scale it down or crop it "
        "to the digit")


def test_a_long_thin_picture_is_resampled_without_weights_as_long_as_it():
    from mlecli.use.preparation import resample

    V = np.zeros((3, 65_536))
    V[:, 30_000:36_000] = 65535.0
    tracemalloc.start()
    try:
        T = resample(V, 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert T.shape == (20, 20) and T.max() > 0
    assert peak < 2 << 20, peak  # a block of 20 × 4,096 weights and its temporaries; all 20 × 65,536 were 10 MB
    g = np.ones((3, 65_536))
    g[:, 30_000:36_000] = 0.0
    tracemalloc.start()
    try:
        image = prepare(g, "thin")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image.max() == 255 and peak < 6 * g.nbytes, peak / g.nbytes  # its copy, the ring's, the row sums'


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_a_large_picture_costs_a_bounded_number_of_bytes_a_pixel(tmp_path, mode):
    h, w = 1500, 2000
    ink = np.zeros((h, w), bool)
    ink[300:1200, 900:1100] = True
    gray = np.where(ink, 20, 230).astype(np.uint8)
    img = Image.fromarray(gray).convert(mode)
    if mode == "RGBA":
        img.putalpha(Image.fromarray(np.where(ink, 255, 0).astype(np.uint8)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    tracemalloc.start()
    try:  # as `mlecli predict` does: the gray picture is prepared in place
        prepare_steps(inputs.read_image(buf.getvalue(), "big.png"), overwrite=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak / (h * w) < 20, peak / (h * w)  # bytes a pixel that numpy allocated, Pillow's own decoding aside


def test_a_file_of_blank_images_gives_ten_lines_and_one_for_the_rest(run, tmp_path):
    (tmp_path / "blank.idx").write_bytes(idx_bytes(np.zeros((50, 28, 28), np.uint8)))
    res = cli("predict", run, tmp_path / "blank.idx")
    blank = ": no ink found: nothing stands out from the background (judged from the image's border: leave a margin around the ink)"
    assert (res.exit_code, res.stdout) == (1, "")
    assert res.stderr.splitlines() == [f"Error: {tmp_path / 'blank.idx'}[{i}]{blank}" for i in range(10)] + [
        f"Error: {tmp_path / 'blank.idx'}: 40 more images with no ink found (50 in all; the first 10 are named above)"]


def test_a_stack_is_predicted_a_chunk_at_a_time_with_the_same_results(model, monkeypatch):
    from mlecli.use import predict

    digits, _ = make_digits(37, seed=5)
    whole = model.predict_proba(digits)
    monkeypatch.setattr(predict, "CHUNK_PIXELS", 5 * 784)
    np.testing.assert_array_equal(model.predict_proba(digits), whole)
    np.testing.assert_array_equal(model.prepare(digits), mlecli.load(model.checkpoint.path).prepare(digits))


@pytest.mark.parametrize("name", ["sparse.png", "sparse.npy", "sparse.gz"])
def test_a_file_over_the_byte_budget_is_refused_by_its_size_unread(tmp_path, name):
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(2 << 30)  # 2 GB of holes: nothing on disk, nothing worth reading
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as err:
            inputs.load(inputs.Source(name, path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(err.value) == f"{name}: larger than 512 MB; no image or array here is that big"
    assert peak < 1 << 20


def test_standard_input_from_dev_zero_is_refused_after_its_first_bytes(run):
    with open("/dev/zero", "rb") as zero:
        res = subprocess.run([sys.executable, "-m", "mlecli", "predict", str(run), "-"], stdin=zero,
                             capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stderr) == (
        1, "Error: <stdin>: not an image mlecli can read (PNG, JPEG, BMP, GIF, TIFF, WebP, PNM), nor a .npy or IDX file\n")


# ---------------------------------------------------------------------------
# 6, 12. One input that cannot be read never stops the others


def test_names_too_long_pipes_and_unreadable_stdin_are_each_one_line(run, tmp_path, good):
    long_name = tmp_path / ("a" * 300 + ".png")
    fifo = tmp_path / "nobody-writes.png"
    os.mkfifo(fifo)
    write_only = tmp_path / "wo.txt"
    code = ("import sys; from mlecli.cli import entry; sys.argv = ['mlecli', 'predict', *sys.argv[1:]]; entry()")
    with open(write_only, "wb") as stdin:  # standard input opened for writing only: reading it fails
        res = subprocess.run([sys.executable, "-c", code, str(run), str(good), str(long_name), str(fifo), "-", str(good)],
                             stdin=stdin, capture_output=True, text=True, timeout=60)  # a hang would end here
    assert res.returncode == 1 and res.stdout.count(str(good)) == 2
    assert res.stderr.splitlines() == [
        f"Error: {long_name}: cannot read it (File name too long)",
        f"Error: {fifo} is a named pipe: mlecli reads files, and pipes only as standard input "
        f"(mlecli predict RUN - < {fifo})",
        "Error: <stdin>: cannot read standard input (Bad file descriptor)",
    ]


def test_closed_standard_input_says_so(run):
    res = subprocess.run([sys.executable, "-m", "mlecli", "predict", str(run), "-"], capture_output=True, text=True,
                         preexec_fn=lambda: os.close(0), timeout=60)
    assert (res.returncode, res.stderr) == (
        1, "Error: <stdin>: standard input is closed: pipe an image in, e.g. < digit.png\n")


def test_files_this_process_may_not_search_are_one_line_each_and_a_folder_keeps_its_readable_pictures(run, tmp_path, good):
    require(os.geteuid() == 0 and shutil.which("setpriv"), "needs root and setpriv to drop the file-access capabilities")
    locked = tmp_path / "locked"
    locked.mkdir()
    shutil.copy(good, locked / "x.png")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(good, mixed / "good.png")
    (mixed / "link.png").symlink_to(locked / "x.png")
    os.chown(locked, 65534, 65534)
    os.chown(locked / "x.png", 65534, 65534)
    locked.chmod(0o700)
    for folder in (tmp_path, run.parent, run, run / "checkpoints"):
        folder.chmod(folder.stat().st_mode | 0o055)  # others may search and read what the test reads
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search", "--"]
    res = subprocess.run([*drop, sys.executable, "-m", "mlecli", "predict", str(run), str(good), str(locked / "x.png"),
                          str(mixed), str(good)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    assert [line.split("  ")[0] for line in res.stdout.splitlines()] == [
        str(good), str(mixed / "good.png"), str(good)]
    assert res.stderr.splitlines() == [
        f"Error: {locked / 'x.png'}: cannot read it (Permission denied)",
        f"Error: {mixed / 'link.png'}: cannot read it (Permission denied)",
    ]


# ---------------------------------------------------------------------------
# 7. Thresholds


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "0", "1", "-1"])
def test_a_threshold_that_is_not_strictly_between_0_and_1_is_a_usage_error(run, good, value):
    res = cli("predict", run, good, "--threshold", value)
    assert res.exit_code == 2 and "Invalid value for '--threshold'" in res.stderr


@pytest.mark.parametrize("value", [float("nan"), 5, -1, 0, 1, True, "0.5", None])
def test_the_api_s_threshold_is_checked(model, value):
    with pytest.raises(MlecliError) as err:
        model.predict(PAGE8, threshold=value)
    assert str(err.value) == f"threshold must be a number between 0 and 1 (both excluded), got {value!r}"


@given(st.one_of(st.floats(), st.integers(-2, 2), st.fractions(), st.booleans(), st.none(), st.text(max_size=4)))
def test_the_api_accepts_exactly_the_real_thresholds_strictly_between_0_and_1(model, value):
    real = isinstance(value, (int, float, fractions.Fraction)) and not isinstance(value, bool)
    if real and 0 < value < 1:
        assert model.predict(PAGE8, threshold=value).tolist() == [int(model.predict_proba(PAGE8)[0, 1] >= value)]
    else:
        with pytest.raises(MlecliError, match=r"^threshold must be a number between 0 and 1 \(both excluded\), got "):
            model.predict(PAGE8, threshold=value)


# ---------------------------------------------------------------------------
# 8, 9. One conversion for every picture, a file's or a PIL image


def _in_mode(mode: str) -> Image.Image:
    base = Image.fromarray(PAGE8)
    if mode in ("RGBa", "PA", "RGBA"):
        return base.convert("RGBA").convert(mode)
    if mode in ("La", "LA"):
        return base.convert("LA").convert(mode)
    if mode in ("1", "L", "P", "I", "F", "I;16"):
        return base.convert(mode) if mode != "I;16" else Image.fromarray(PAGE8.astype(np.uint16) * 257)
    return base.convert("RGB").convert(mode)


@pytest.mark.parametrize("mode", ["YCbCr", "HSV", "LAB", "RGBX", "RGBa", "La", "PA", "CMYK", "RGB", "RGBA", "LA", "P",
                                  "L", "I", "F", "I;16"])
def test_a_pil_image_of_any_mode_gives_what_its_gray_picture_gives(model, mode):
    expected = model.prepare(PAGE8)
    got = model.prepare(_in_mode(mode))
    assert np.abs(got.astype(int) - expected).max() <= 2, mode  # LAB and YCbCr round gray by a level or two


@pytest.mark.parametrize("mode,fmt", [("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("CMYK", "TIFF"),
                                      ("F", "TIFF"), ("I", "TIFF"), ("YCbCr", "JPEG"), ("1", "BMP")])
def test_a_pil_image_and_its_file_give_the_same_gray(mode, fmt):
    img = _in_mode(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    from_file = inputs.read_image(buf.getvalue(), "f")
    np.testing.assert_array_equal(inputs.picture_gray(Image.open(io.BytesIO(buf.getvalue())), "f"), from_file)


def test_an_empty_pil_image_and_exif_orientation_of_a_pil_image(model, tmp_path):
    with pytest.raises(InputError, match=r"^image: the image is empty \(0×0 pixels\)$"):
        model.predict_proba(Image.new("L", (0, 0)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    Image.fromarray(np.rot90(PAGE8, 1).copy()).save(tmp_path / "phone.png", exif=exif)
    np.testing.assert_array_equal(model.prepare(Image.open(tmp_path / "phone.png")), model.prepare(PAGE8))
    np.testing.assert_array_equal(model.prepare(tmp_path / "phone.png"), model.prepare(PAGE8))


def test_a_colour_key_transparency_reads_like_an_alpha_band(model, tmp_path):
    ink = PAGE8 < 128
    rgb = np.zeros((*PAGE8.shape, 3), np.uint8)
    rgb[ink] = 10  # near-black ink; the black background is the tRNS colour key
    Image.fromarray(rgb).save(tmp_path / "rgb_trns.png", transparency=(0, 0, 0))
    Image.open(tmp_path / "rgb_trns.png").convert("RGBA").save(tmp_path / "rgba.png")
    gray = np.where(ink, 10, 0).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "l_trns.png", transparency=0)
    expected = model.prepare(tmp_path / "rgba.png")
    assert expected.max() == 255
    np.testing.assert_array_equal(model.prepare(tmp_path / "rgb_trns.png"), expected)
    np.testing.assert_array_equal(model.prepare(tmp_path / "l_trns.png"), expected)


def _colour_picture(data, channels: int) -> np.ndarray:
    """INK in one colour on a paper of another, RGB or RGBA (opaque, a transparent sheet under
    the ink, or any alpha), as `np.array(PIL image)` gives it."""
    colour = st.tuples(*[st.integers(0, 255)] * 3)
    ink, paper = np.array(data.draw(colour), float), np.array(data.draw(colour), float)
    pixels = np.floor(INK[..., None] * ink + (1 - INK[..., None]) * paper + 0.5).astype(np.uint8)
    if channels == 3:
        return pixels
    alpha = data.draw(st.sampled_from(["opaque", "sheet", "any"]))
    a = {"opaque": np.full(INK.shape, 255, np.uint8), "sheet": np.floor(255 * INK + 0.5).astype(np.uint8),
         "any": np.random.default_rng(data.draw(st.integers(0, 99))).integers(0, 256, INK.shape, dtype=np.uint8)}[alpha]
    return np.concatenate([pixels, a[..., None]], axis=2)


def _prepared_or_error(model, image):
    try:
        return model.prepare(image)
    except InputError as exc:
        return str(exc).split(": ", 1)[1]  # the same error, whatever the input's name


@settings(max_examples=60, deadline=None)
@given(data=st.data(), channels=st.sampled_from([3, 4]), as_float=st.booleans())
def test_a_colour_array_is_prepared_as_the_picture_of_the_same_pixels(model, data, channels, as_float):
    pictures = [_colour_picture(data, channels) for _ in range(data.draw(st.integers(1, 3)))]
    to_array = (lambda a: a / 255.0) if as_float else (lambda a: a)
    one = [_prepared_or_error(model, to_array(p)) for p in pictures]
    assert all(isinstance(o, str) or o.shape == (28, 28) for o in one)
    for got, p in zip(one, pictures):
        expected = _prepared_or_error(model, Image.fromarray(p))
        assert got == expected if isinstance(got, str) else np.array_equal(got, expected)
    if not any(isinstance(o, str) for o in one):  # N pictures at once: each as on its own
        np.testing.assert_array_equal(model.prepare(to_array(np.stack(pictures))), np.stack(one))


@pytest.mark.parametrize("channels", [3, 4])
def test_a_colour_npy_reads_as_one_picture_and_a_stack_of_them_as_n(run, model, tmp_path, channels):
    rng = np.random.default_rng(channels)
    pictures = np.zeros((3, 60, 60, channels), np.uint8)  # light ink on black, as arrays are, in colour
    for k, picture in enumerate(pictures):
        top, left = rng.integers(5, 20, 2)
        picture[top : top + 30, left : left + 8 + 6 * k, :3] = rng.integers(128, 256, 3)
        if channels == 4:
            picture[..., 3] = 255
    for k, picture in enumerate(pictures):
        np.save(tmp_path / f"one{k}.npy", picture)
        Image.fromarray(picture).save(tmp_path / f"one{k}.png")
    np.save(tmp_path / "stack.npy", pictures)
    res = cli("predict", run, *[tmp_path / f"one{k}.{ext}" for k in range(3) for ext in ("npy", "png")],
              tmp_path / "stack.npy", "--json")
    assert res.exit_code == 0, res.output
    got = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(Path(d["input"]).name, d["index"]) for d in got] == [
        ("one0.npy", None), ("one0.png", None), ("one1.npy", None), ("one1.png", None), ("one2.npy", None),
        ("one2.png", None), ("stack.npy", 0), ("stack.npy", 1), ("stack.npy", 2)]
    p = [d["p"] for d in got]
    assert p[0:6:2] == p[1:6:2]
    assert p[6:] == pytest.approx(p[0:6:2], abs=1e-7)  # a batch's products round apart from one image's
    assert len(set(p[6:])) == 3


def test_a_32_bit_picture_is_scaled_from_its_own_darkest_to_lightest(model, tmp_path):
    Image.fromarray(PAGE8.astype(np.int32), "I").save(tmp_path / "int32.tif")
    np.testing.assert_array_equal(model.prepare(tmp_path / "int32.tif"), model.prepare(PAGE8))


def test_n_by_784_is_always_n_flattened_images(run, model, tmp_path):
    digits, _ = make_digits(28, seed=8)
    np.save(tmp_path / "flat28.npy", digits.reshape(28, 784))
    res = cli("predict", run, tmp_path / "flat28.npy", "--json")
    assert res.exit_code == 0 and [json.loads(line)["index"] for line in res.stdout.splitlines()] == list(range(28))
    assert model.prepare(digits.reshape(28, 784)).shape == (28, 28, 28)


# ---------------------------------------------------------------------------
# 10, 13. Outputs: never an input, a checkpoint or a run's record


def test_show_never_writes_over_an_input_whatever_its_name(run, tmp_path, good):
    (tmp_path / "hard.png").hardlink_to(good)
    (tmp_path / "soft.png").symlink_to(good)
    before = good.read_bytes()
    for show in (good, tmp_path / "hard.png", tmp_path / "soft.png"):
        res = cli("predict", run, good, "--show", show)
        assert (res.exit_code, res.stdout) == (1, "")
        assert res.stderr == f"Error: --show {show} is one of the inputs: writing there would destroy it; give another name\n"
    assert good.read_bytes() == before


def _snapshot(folder: Path) -> dict:
    """Every entry of `folder` (not following links): a link's target, a file's bytes, a folder's entries."""
    return {p.name: (os.readlink(p) if p.is_symlink() else _snapshot(p) if p.is_dir() else p.read_bytes())
            for p in folder.iterdir()}


FOLDER_SPELLINGS = ["scans", "./scans", "scans/", "ABS", "linked", "linked/", "other/../scans"]
SHOW_SPELLINGS = ["scans/seen.png", "./scans/seen.png", "ABS/seen.png", "linked/seen.png", "other/../scans/seen.png",
                  "scans/sub/../seen.png", "scans//seen.png"]


@pytest.mark.parametrize("state", ["missing", "a picture", "a link to a picture of the folder",
                                   "a link to a missing file of the folder"])
def test_show_inside_a_folder_that_is_an_input_is_refused_before_anything_is_read(run, tmp_path, good, state,
                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    scans = Path("scans")
    (scans / "sub").mkdir(parents=True)
    Path("other").mkdir()
    Path("linked").symlink_to("scans", target_is_directory=True)
    shutil.copy(good, scans / "a.png")
    if state == "a picture":  # the user's own scan
        shutil.copy(good, scans / "seen.png")
    elif state == "a link to a picture of the folder":
        (scans / "seen.png").symlink_to("a.png")
    elif state == "a link to a missing file of the folder":
        (scans / "seen.png").symlink_to("later.png")
    before = _snapshot(scans)
    for folder, show in itertools.product(FOLDER_SPELLINGS, SHOW_SPELLINGS):
        folder, show = folder.replace("ABS", str(tmp_path / "scans")), show.replace("ABS", str(tmp_path / "scans"))
        for target in (run, tmp_path / "no-run"):  # refused before the network is even looked for
            res = cli("predict", target, folder, "--show", show)
            assert (res.exit_code, res.stdout) == (1, "")
            assert res.stderr == (f"Error: --show {Path(show)} is inside the input folder {folder}: the sheet would be "
                                  "read as an input; write it elsewhere\n")
    assert _snapshot(scans) == before


def test_show_that_is_not_written_into_an_input_folder_is_written_run_after_run(run, tmp_path, good, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("scans/sub").mkdir(parents=True)
    shutil.copy(good, "scans/a.png")
    for show in ("seen.png", "scans/sub/seen.png"):  # beside the folder; in a subfolder (subfolders are not read)
        for _ in range(2):
            res = cli("predict", run, "scans", "--show", show, "--json")
            names = [Path(d["input"]).name for d in map(json.loads, res.stdout.splitlines())]
            assert (res.exit_code, names, res.stderr) == (0, ["a.png"], f"wrote {show} (1 image)\n")
            assert Image.open(show).size == (156, 240)  # one image: it alone is shown


@pytest.mark.parametrize("written", [False, True])
def test_show_named_by_a_link_in_an_input_folder_is_refused_as_an_input_written_or_not(run, tmp_path, good, written,
                                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("scans").mkdir()
    Path("out").mkdir()
    shutil.copy(good, "scans/a.png")
    Path("scans/seen-link.png").symlink_to(Path("../out/seen.png"))  # read as one of the folder's pictures
    if written:
        shutil.copy(good, "out/seen.png")
    before = _snapshot(Path("out"))
    for show in ("out/seen.png", "./out/seen.png", str(tmp_path / "out/seen.png")):
        res = cli("predict", run, "scans", "--show", show)
        assert (res.exit_code, res.stdout) == (1, "")
        assert res.stderr == (f"Error: --show {Path(show)} is one of the inputs: writing there would destroy it; "
                              "give another name\n")
    assert _snapshot(Path("out")) == before


@pytest.mark.parametrize("show,says", [
    ("-", "--show -: standard output is not a file here; give a file name ending in .png"),
    ("", "--show '': an empty name; give a file name ending in .png"),
    ("seen.jpg", "--show seen.jpg: a PNG picture is written there, so its name must end in .png (this keeps it from "
                 "replacing a file of another kind by mistake)"),
    ("/dev/null.png", None),
])
def test_show_names_that_are_not_a_png_file_are_refused(run, good, tmp_path, show, says):
    if says is None:  # a device under a .png name
        os.mkfifo(tmp_path / "pipe.png")
        show, says = str(tmp_path / "pipe.png"), (f"--show {tmp_path / 'pipe.png'} is not a regular file (a device, "
                                                  "a pipe or a socket): give the name of a file to write")
    res = cli("predict", run, good, "--show", show)
    assert (res.exit_code, res.stdout, res.stderr) == (1, "", f"Error: {says}\n")


def test_export_never_writes_over_the_run_s_files_or_the_checkpoint(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    best = copy / "checkpoints" / "best.npz"
    for out in (best, copy / "config.toml", copy / "metrics.jsonl"):
        res = cli("export", copy, "--format", "html", "--out", out)
        assert (res.exit_code, res.stderr) == (1, f"Error: --out {out}: a web page is written there, so its name must "
                                                  "end in .html (this keeps it from replacing a file of another kind "
                                                  "by mistake)\n")
    named = tmp_path / "net.html"  # a checkpoint file whose own name ends in .html: its default output is itself
    named.write_bytes(best.read_bytes())
    res = cli("export", named, "--format", "html")
    assert (res.exit_code, res.stderr) == (1, f"Error: --out {named} is the checkpoint being exported: writing there "
                                              "would destroy it; give another name\n")
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_export_into_a_folder_and_empty_names_are_refused(run, tmp_path):
    res = cli("export", run, "--format", "html", "--out", f"{tmp_path / 'newdir'}/")
    assert (res.exit_code, res.stderr) == (1, f"Error: --out {tmp_path / 'newdir'}/ is a folder: give a file name "
                                              "ending in .html\n")
    assert list(tmp_path.iterdir()) == []  # no file named newdir, no folder either
    res = cli("export", run, "--format", "html", "--out", tmp_path)
    assert res.exit_code == 2 and "Invalid value for '--out'" in res.stderr and list(tmp_path.iterdir()) == []
    res = cli("export", run, "--format", "html", "--out", "")
    assert (res.exit_code, res.stderr) == (1, "Error: --out '': an empty name; give a file name ending in .html\n")


# ---------------------------------------------------------------------------
# 11, 13. Crafted run files


def crafted(run: Path, folder: Path, params=None, **meta_changes) -> Path:
    cp = ckpt.load(run / "checkpoints" / "best.npz")
    meta = {k: v for k, v in cp.meta.items() if k != "format"}
    for key, value in meta_changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path = folder / "crafted.npz"
    path.write_bytes(ckpt.encode(params or cp.params, meta))
    return path


def test_finite_but_extreme_weights_are_refused_when_the_network_is_loaded(run, tmp_path, good):
    (W1, b1), (W2, b2) = ckpt.load(run / "checkpoints" / "best.npz").params
    huge = crafted(run, tmp_path, [(np.full_like(W1, 3e38), b1), (np.where(np.arange(len(W2))[:, None] % 2, 3e38, -3e38)
                                                                    .astype(W2.dtype), b2)])
    message = (f"{huge}: its weights are too large to compute with (layer 1's sums reach 2.35e+41, beyond float32's "
               "range); the checkpoint is damaged")
    for command in (("predict", huge, good, "--json"), ("export", huge, "--format", "html")):
        res = cli(*command)
        assert (res.exit_code, res.stdout, res.stderr) == (1, "", f"Error: {message}\n")
    with pytest.raises(CheckpointError, match="its weights are too large"):
        mlecli.load(huge)


def test_a_checkpoint_that_does_not_say_its_image_size_is_refused(run, tmp_path, good):
    unsaid = crafted(run, tmp_path, image_shape=None)
    for args in (["predict", unsaid, good], ["export", unsaid, "--format", "onnx"],
                 ["export", unsaid, "--format", "html"]):
        res = cli(*args)
        assert res.stderr == (f"Error: {unsaid} does not say what size of image it was trained on (no image_shape in "
                              "its meta record; 784 inputs, dataset tiny); predict and export work with 28×28 images "
                              "(MNIST's form): use a network trained on a 28×28 dataset\n"), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.npz", "good.png"]  # nothing exported


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.tuples(st.integers(1, 1 << 16), st.integers(1, 1 << 16)).filter(lambda s: s[0] * s[1] != 784))
def test_a_checkpoint_whose_image_shape_is_at_odds_with_its_inputs_is_refused_by_every_command(run, tmp_path, good,
                                                                                               shape):
    twice = crafted(run, tmp_path, image_shape=list(shape))  # e.g. 20×35: 700 pixels, but 784 inputs
    says = (f"{twice}: its meta record says {shape[0]}×{shape[1]} images ({shape[0] * shape[1]} pixels) but 784 "
            "inputs; the checkpoint is damaged")
    for args in (["predict", twice, good], ["export", twice, "--format", "html"], ["export", twice, "--format", "onnx"],
                 ["evaluate", twice, "--data-dir", tmp_path / "data"]):
        res = cli(*args)
        assert (res.exit_code, res.stderr) == (1, f"Error: {says}\n"), args
    with pytest.raises(CheckpointError) as raised:
        mlecli.load(twice)
    assert str(raised.value) == says
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.npz", "good.png"]  # nothing exported


def test_a_report_with_nan_is_not_shown_and_no_json_holds_nan(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    best = copy / "checkpoints" / "best.npz"
    report = {"split": "test", "checkpoint_name": "best", "checkpoint": str(best), "images": 10, "task": "x",
              "epoch": ckpt.load(best).epoch, "accuracy": float("nan"), "threshold": 0.5, "most_confident_errors": []}
    (copy / "eval-test-best.json").write_text(json.dumps(report))
    assert cli("export", copy, "--format", "html").exit_code == 0
    html = (copy / "best.html").read_text(encoding="utf-8")
    model_json = html.split('<script id="mlecli-model" type="application/json">', 1)[1].split("</script>", 1)[0]
    page = json.loads(model_json, parse_constant=lambda c: pytest.fail(f"the page's JSON holds {c}"))
    assert page["info"]["test_accuracy"] is None and "test accuracy: not evaluated (mlecli evaluate)" in page["footer"]


REPORT_FIGURES = st.one_of(st.floats(), st.integers(-3, 3), st.booleans(), st.none(), st.text(max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(accuracy=REPORT_FIGURES, threshold=REPORT_FIGURES)
def test_any_figures_in_a_report_give_strict_json_in_the_page_and_the_onnx_metadata(run, tmp_path, accuracy, threshold):
    from mlecli.use import export as ex

    require(importlib.util.find_spec("onnx") is not None, "pip install 'mlecli[onnx]'")
    import onnx

    copy = tmp_path / "run"
    if not copy.exists():
        shutil.copytree(run, copy)
    best = copy / "checkpoints" / "best.npz"
    cp = ckpt.load(best)
    report = {"split": "test", "checkpoint_name": "best", "checkpoint": str(best), "images": 10, "task": "x",
              "epoch": cp.epoch, "accuracy": accuracy, "threshold": threshold, "most_confident_errors": []}
    (copy / "eval-test-best.json").write_text(json.dumps(report))
    info = ex.metadata(cp)
    shown = info["test_accuracy"]
    in_range = (isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool) and 0 <= accuracy <= 1
                and isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0 < threshold < 1)
    assert shown == ({"accuracy": accuracy, "threshold": threshold} if in_range else None)
    strict = {"parse_constant": lambda c: pytest.fail(f"JSON holds {c}")}
    json.loads(json.dumps(ex.page_model(cp, info), allow_nan=False), **strict)
    props = onnx.load_from_string(ex.onnx_bytes(cp, info)).metadata_props
    for prop in props:
        if prop.key in ("mlecli.test_accuracy", "mlecli.hidden", "mlecli.image_shape"):
            json.loads(prop.value, **strict)
    assert ("mlecli.test_accuracy" in {p.key for p in props}) == in_range


def test_a_checkpoint_name_is_best_last_or_epoch_n(run):
    with pytest.raises(CheckpointError, match=r"^checkpoint '../../R/checkpoints/best' is not best, last or epoch-N$"):
        mlecli.load(run, checkpoint="../../R/checkpoints/best")


def test_a_page_over_2_mb_is_written_with_a_warning(run, tmp_path):
    cp = ckpt.load(run / "checkpoints" / "best.npz")
    meta = {k: v for k, v in cp.meta.items() if k != "format"}
    meta["config"] = {**meta["config"], "model": {**meta["config"]["model"], "hidden": [700]}}
    rng = np.random.default_rng(0)
    params = [(rng.normal(0, 0.01, (784, 700)).astype(np.float32), np.zeros(700, np.float32)),
              (rng.normal(0, 0.01, (700, 1)).astype(np.float32), np.zeros(1, np.float32))]
    big = tmp_path / "wide.npz"
    big.write_bytes(ckpt.encode(params, meta))
    res = cli("export", big, "--format", "html")
    size = (tmp_path / "wide.html").stat().st_size
    assert res.exit_code == 0 and size > 2_000_000
    assert res.stderr == (f"warning: the page is {size / 1e6:.1f} MB, more than the 2 MB a page should be: a browser "
                          "loads it slowly (its weights are most of it; a smaller network makes a lighter page)\n")


def test_a_broken_onnx_install_is_one_line(run, tmp_path, monkeypatch):
    (tmp_path / "fake" / "onnx").mkdir(parents=True)
    (tmp_path / "fake" / "onnx" / "__init__.py").write_text("raise RuntimeError('protobuf version mismatch')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    for name in [m for m in sys.modules if m == "onnx" or m.startswith("onnx.")]:
        monkeypatch.delitem(sys.modules, name)
    res = cli("export", run, "--format", "onnx", "--out", tmp_path / "x.onnx")
    assert (res.exit_code, res.stderr) == (1, "Error: --format onnx: the onnx package is installed but cannot be "
                                              "imported (RuntimeError: protobuf version mismatch); reinstall it: pip "
                                              "install --force-reinstall 'mlecli[onnx]'\n")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("values,says", [
    (np.array([[0.0, 1 + 1e-12]]), "values from 0 to 1.000000000001; float images must be 0-1: clip it to 0-1"),
    (np.array([[0.0, 255.0]]), "values from 0 to 255; float images must be 0-1: divide it by 255"),
    (np.array([[-3.0, 900.0]]), "values from -3 to 900; float images must be 0-1"),
])
def test_values_out_of_range_are_shown_exactly_with_the_right_advice(model, values, says):
    with pytest.raises(InputError) as err:
        model.predict_proba(values)
    assert str(err.value) == f"array: the array holds float64 {says}"


def test_a_damaged_gzip_and_a_gzip_of_something_else_are_one_line(tmp_path):
    assert refusal(tmp_path, "bad.gz", b"\x1f\x8b" + b"\xff" * 20).startswith("bad.gz: not a valid gzip file (")
    assert refusal(tmp_path, "text.gz", gz(b"plain text")) == (
        "text.gz: a gzip file that does not hold an IDX file (images like MNIST's)")


def _outcome(call):
    """What an API call gives: ("ok", the array) or ("refused", its one line); anything else escapes."""
    try:
        return "ok", call()
    except InputError as exc:
        return "refused", str(exc)


_SUBCLASSES = {
    "matrix": lambda a, tmp, data: np.matrix(a),
    "masked": lambda a, tmp, data: np.ma.masked_array(a, mask=data.draw(hnp.arrays(bool, a.shape))),
    "memmap": lambda a, tmp, data: _memmap(a, tmp),
    "subclass": lambda a, tmp, data: a.view(type("Pixels", (np.ndarray,), {})),
}


def _memmap(a, tmp):
    if a.size == 0:  # no file can be mapped for it
        return a.view(np.memmap)
    m = np.memmap(tmp / f"m{len(list(tmp.iterdir()))}.bin", dtype=a.dtype, mode="w+", shape=a.size)
    m[...] = a.reshape(-1)
    return m.reshape(a.shape)


_DTYPES = st.sampled_from([np.uint8, np.int16, ">u2", np.int64, np.float16, np.float32, ">f8", np.float64, bool,
                           np.complex64, "U1", "M8[s]"])


def _inked(shape, dtype, rng):
    """An array of `shape` (as `inputs.image_layout` reads it): each image black with a block of
    light ink (0.5-1) in its middle, as `dtype` holds it (0-1 floats, 0-255 integers, bool)."""
    ink = np.zeros(shape)
    if shape and shape[-1] == 784:
        images = ink.reshape(*shape[:-1], 28, 28)
    elif len(shape) == 3 and shape[-1] in (1, 3, 4):
        images = np.moveaxis(ink, -1, 0)  # channels first: the image axes are last (a view, as the reshape is)
    else:
        images = ink
    if images.ndim >= 2:
        h, w = images.shape[-2:]
        images[..., h // 4 : h // 4 + max(1, h // 2), w // 4 : w // 4 + max(1, w // 2)] = rng.uniform(0.5, 1)
    if dtype.kind in "fb":
        return ink.astype(dtype)
    return np.floor(255 * ink, out=ink).astype(dtype)  # `out`: an array even of 0 dimensions


_SHAPES = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6),  # mostly refused: no images, no pixels, …
    st.tuples(st.integers(2, 40), st.integers(2, 40)),  # one gray image
    st.tuples(st.integers(1, 3), st.integers(2, 30), st.integers(2, 30)),  # a stack
    st.tuples(st.integers(2, 30), st.integers(2, 30), st.sampled_from([1, 3, 4])),  # one colour picture
    st.tuples(st.integers(1, 3), st.just(784)), st.just((784,)),  # flattened 28×28
)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@FUZZ
@given(data=st.data(), kind=st.sampled_from(sorted(_SUBCLASSES)), dtype=_DTYPES, shape=_SHAPES,
       pixels=st.sampled_from(["inked", "inked", "any"]), seed=st.integers(0, 2**32 - 1))
def test_an_ndarray_subclass_is_read_as_its_plain_array_and_no_array_leaks_an_internal_error(
        model, tmp_path, data, kind, dtype, shape, pixels, seed):
    if kind == "matrix":  # a matrix has two dimensions
        shape = shape[-2:] if len(shape) >= 2 else (1, *shape, 1)[:2]
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    if pixels == "inked" and dtype.kind in "buif":  # a block of light ink on black, in the array's own kind
        plain = _inked(shape, dtype, rng)
    else:  # anything: NaN, inf, negative, past 255, strings, dates
        plain = data.draw(hnp.arrays(dtype, shape))
    other = _SUBCLASSES[kind](plain, tmp_path, data)
    values = np.asarray(other)
    assert type(other) is not np.ndarray and (values.shape, values.tobytes()) == (plain.shape, plain.tobytes())
    for call in ("predict_proba", "prepare"):
        want, got = _outcome(lambda: getattr(model, call)(plain)), _outcome(lambda: getattr(model, call)(other))
        event(f"{call} {want[0]} {kind}")
        assert want[0] == got[0]
        if want[0] == "refused":
            assert got[1] == want[1] and "cannot read it" not in want[1], want[1]  # no IndexError, TypeError, …
        else:
            np.testing.assert_array_equal(got[1], want[1])
