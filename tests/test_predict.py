"""`mlecli predict` and `mlecli.load`: inputs of every kind, the output, and every refusal."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fakes import TinyDataset, make_digits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pictures import encode, strokes
from PIL import Image

import mlecli
from mlecli.cli import main
from mlecli.data.datasets import MNIST_FILES
from mlecli.data.idx import idx_bytes
from mlecli.safe.errors import CheckpointError, InputError

# A digit-like drawing, dark ink on white (asymmetric: no centre of mass exactly on a rounding tie).
INK = strokes([[(6, 8), (5, 20), (16, 13), (26, 17), (30, 9)], [(16, 13), (16, 22)]], (36, 30), width=3.5)
PAGE = 1.0 - INK
PAGE8 = np.floor(255 * PAGE + 0.5).astype(np.uint8)


def cli(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny, tiny_folder):
    """A small network on 28×28 images, trained once for the module."""
    root = tmp_path_factory.mktemp("predict")
    cfg = tiny.write_config(root / "tiny.toml", tiny_folder, "validation = 0.2\n[model]\nhidden = [8]\n"
                            "[train]\nepochs = 2\nbatch_size = 16\n")
    res = cli("train", cfg, "--run-dir", root / "run", "--data-dir", root / "data", "-q")
    assert res.exit_code == 0, res.output
    return root / "run"


@pytest.fixture(scope="module")
def model(run):
    return mlecli.load(run)


def predictions(res) -> list[dict]:
    return [json.loads(line) for line in res.stdout.splitlines()]


def p_of(model, gray: np.ndarray) -> float:
    from mlecli.use.preparation import prepare

    return float(model.probabilities(prepare(gray)[None])[0])


# ---------------------------------------------------------------------------
# Inputs of every kind


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


LOSSLESS = {
    "gray.png": lambda p: _save(Image.fromarray(PAGE8), p),
    "rgb.png": lambda p: _save(Image.fromarray(np.dstack([PAGE8] * 3)), p),
    "rgba.png": lambda p: _save(Image.fromarray(np.dstack([PAGE8] * 3 + [np.full_like(PAGE8, 255)])), p),
    "palette.png": lambda p: _save(Image.fromarray(PAGE8).convert("P"), p),
    "gray-alpha.png": lambda p: _save(Image.fromarray(PAGE8).convert("LA"), p),
    "sixteen-bit.png": lambda p: _save(Image.fromarray(PAGE8.astype(np.uint16) * 257), p),
    "gray.bmp": lambda p: _save(Image.fromarray(PAGE8), p),
    "gray.gif": lambda p: _save(Image.fromarray(PAGE8), p),
    "gray.tif": lambda p: _save(Image.fromarray(PAGE8), p),
    "float.tif": lambda p: _save(Image.fromarray((PAGE8 / 255.0).astype(np.float32)), p),
    "lossless.webp": lambda p: _save(Image.fromarray(PAGE8), p, lossless=True),
    "gray.pgm": lambda p: _save(Image.fromarray(PAGE8), p),
    "one-bit.png": lambda p: _save(Image.fromarray(PAGE8 > 127), p),
}


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_every_lossless_image_format_gives_the_network_the_same_image(model, tmp_path, name):
    path = LOSSLESS[name](tmp_path / name)
    expected_gray = (PAGE8 > 127).astype(np.float64) if name == "one-bit.png" else PAGE8 / 255.0
    from mlecli.use.preparation import prepare

    np.testing.assert_array_equal(model.prepare(path), prepare(expected_gray))


def test_a_jpeg_and_a_cmyk_jpeg_come_close_to_the_lossless_image(model, tmp_path):
    from mlecli.use.preparation import prepare

    expected = prepare(PAGE8 / 255.0).astype(int)
    rgb = _save(Image.fromarray(PAGE8).convert("RGB"), tmp_path / "photo.jpg", quality=95)
    cmyk = _save(Image.fromarray(PAGE8).convert("CMYK"), tmp_path / "print.jpg", quality=95)
    for path in (rgb, cmyk):
        got = model.prepare(path).astype(int)
        assert np.abs(got - expected).mean() < 3, path.name  # JPEG's loss, nothing more


def test_an_animated_gif_is_read_from_its_first_frame(model, tmp_path):
    first, second = Image.fromarray(PAGE8), Image.fromarray(np.fliplr(PAGE8))
    path = tmp_path / "anim.gif"
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)
    np.testing.assert_array_equal(model.prepare(path), model.prepare(LOSSLESS["gray.png"](tmp_path / "x.png")))


def test_a_photo_is_turned_upright_by_its_exif_orientation(model, tmp_path):
    # Stored rotated 90° anticlockwise, with Orientation 6 ("rotate 90° clockwise to view").
    stored = Image.fromarray(np.rot90(PAGE8, 1).copy())
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.png"
    stored.save(path, exif=exif)
    np.testing.assert_array_equal(model.prepare(path), model.prepare(LOSSLESS["gray.png"](tmp_path / "up.png")))


def test_a_folder_is_read_in_name_order_with_numbers_as_numbers(run, tmp_path):
    folder = tmp_path / "digits"
    folder.mkdir()
    for name in ("10.png", "2.png", "1.jpeg", "b.PNG", "a.bmp"):
        (folder / name).write_bytes(encode(PAGE))
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(encode(PAGE))
    (folder / "sub").mkdir()
    res = cli("predict", run, folder, "--json")
    assert res.exit_code == 0, res.output
    assert [Path(p["input"]).name for p in predictions(res)] == ["1.jpeg", "2.png", "10.png", "a.bmp", "b.PNG"]


def test_arrays_uint8_float_flattened_and_idx_give_the_same_predictions(run, model, tmp_path):
    digits, _ = make_digits(3, seed=4)  # light on dark, 28×28, MNIST's form of file
    files = {
        "one.npy": digits[0],
        "three.npy": digits,
        "float.npy": digits / 255.0,
        "flat.npy": digits.reshape(3, 784),
        "int64.npy": digits.astype(np.int64),
    }
    for name, arr in files.items():
        np.save(tmp_path / name, arr)
    (tmp_path / "images-idx3-ubyte").write_bytes(idx_bytes(digits))
    (tmp_path / "images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(digits)))
    names = [*files, "images-idx3-ubyte", "images-idx3-ubyte.gz"]
    res = cli("predict", run, *(tmp_path / n for n in names), "--json")
    assert res.exit_code == 0, res.output
    got = predictions(res)
    expected = model.predict_proba(digits)[:, 1]
    assert [(Path(p["input"]).name, p["index"]) for p in got] == [("one.npy", None)] + [
        (n, i) for n in names[1:] for i in range(3)
    ]
    assert got[0]["p"] == expected[0]
    for k in range(1, len(got), 3):
        assert [p["p"] for p in got[k : k + 3]] == pytest.approx(expected, abs=1e-12)


def test_raw_arrays_skip_the_preparation_and_match_evaluate(run, tiny, tmp_path):
    test_images = tiny.arrays["test-images"]
    (tmp_path / "t10k.gz").write_bytes(gzip.compress(idx_bytes(test_images)))
    res = cli("predict", run, tmp_path / "t10k.gz", "--raw", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(cli("evaluate", run, "--json", "--data-dir", run.parent / "data").stdout)
    p = {d["index"]: d["p"] for d in predictions(res)}
    for e in report["most_confident_errors"]:
        assert p[e["index"]] == pytest.approx(e["p"], abs=1e-6)
    from mlecli.nn.model import predict_proba
    from mlecli.nn.pixels import pixels

    direct = predict_proba(mlecli.load(run).params, pixels(test_images, np.float32))
    assert [p[i] for i in range(len(test_images))] == pytest.approx(direct, abs=1e-6)


def test_an_image_on_standard_input(run, model):
    res = cli("predict", run, "-", "--json", input=encode(PAGE))
    assert res.exit_code == 0, res.output
    (got,) = predictions(res)
    assert got["input"] == "<stdin>" and got["p"] == p_of(model, PAGE8 / 255.0)
    buf = io.BytesIO()
    np.save(buf, make_digits(2, seed=1)[0])
    res = cli("predict", run, "-", input=buf.getvalue())
    assert res.exit_code == 0 and res.stdout.count("<stdin>[") == 2


# ---------------------------------------------------------------------------
# What it prints


def test_the_table_and_the_json_say_the_same_exactly(run, model, tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "much-longer-name.png"]
    paths[0].write_bytes(encode(PAGE))
    paths[1].write_bytes(encode(np.fliplr(PAGE)))
    neg, pos = model.classes_
    assert (neg, pos) == ("even (0,2,4,6,8)", "odd (1,3,5,7,9)")
    res = cli("predict", run, *paths)
    js = predictions(cli("predict", run, *paths, "--json"))
    assert res.exit_code == 0 and res.stderr == ""
    width = len(str(paths[1]))
    assert res.stdout.splitlines() == [
        f"{str(path):<{width}}  ŷ {d['p']:.4f}  {pos if d['p'] >= 0.5 else neg}" for path, d in zip(paths, js)
    ]
    proba = model.predict_proba(paths)  # float32 products: the last bits depend on the batch's size
    for d, path, row in zip(js, paths, proba):
        assert d == {"input": str(path), "index": None, "p": pytest.approx(row[1], abs=1e-7),
                     "prediction": int(row[1] >= 0.5), "label": pos if row[1] >= 0.5 else neg}


def test_the_threshold_moves_the_decision(run, tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(encode(PAGE))
    (d,) = predictions(cli("predict", run, path, "--json"))
    below = predictions(cli("predict", run, path, "--json", "--threshold", min(0.999, d["p"] + 1e-3)))[0]
    above = predictions(cli("predict", run, path, "--json", "--threshold", max(0.001, d["p"] - 1e-3)))[0]
    assert (below["prediction"], above["prediction"]) == (0, 1)


def test_show_draws_the_images_the_network_saw_with_their_y_hat(run, model, tmp_path):
    digits, _ = make_digits(12, seed=2)
    np.save(tmp_path / "d.npy", digits)
    out = tmp_path / "seen.png"
    res = cli("predict", run, tmp_path / "d.npy", "--show", out)
    assert res.exit_code == 0 and res.stderr == f"wrote {out} (12 images)\n"
    sheet = np.asarray(Image.open(out))
    prepared = model.prepare(digits)
    cell_w, cell_h = 28 * 5 + 16, 28 * 5 + 16 + 5 * 16 + 4  # 140-pixel images, five caption lines under each
    assert sheet.shape == (2 * cell_h, 10 * cell_w)
    for k in range(12):
        y, x = (k // 10) * cell_h + 8, (k % 10) * cell_w + 8
        np.testing.assert_array_equal(sheet[y : y + 140 : 5, x : x + 140 : 5], prepared[k])  # 5×5 blocks
        written = [(sheet[top : top + 16, x : x + 148] < 128).any() for top in range(y + 144, y + 144 + 80, 16)]
        assert written == [True, True, True, False, False], k  # the name, "odd (1,3,5,7,9)", ŷ: a line each


def test_show_captions_give_the_name_the_decision_in_words_and_y_hat_wrapped_then_shortened_from_the_right():
    from mlecli.use.sheet import caption

    def fits(text):
        return len(text) <= 20

    assert caption("seven.png", 0.99717, "odd (1,3,5,7,9)", fits) == ["seven.png", "odd (1,3,5,7,9)", "ŷ 0.9972"]
    assert caption("t10k-images-idx3-ubyte.gz[9999]", 0.0031, "even (0,2,4,6,8)", fits) == [
        "t10k-images-idx3-", "ubyte.gz[9999]", "even (0,2,4,6,8)", "ŷ 0.0031"]  # two lines, cut after a "-"
    assert caption("scans/a-scan-whose-name-goes-on-and-on.png", 0.5, "4", fits) == [
        "a-scan-whose-name-", "goes-on-and-on.png", "4", "ŷ 0.5000"]  # its own name: the folder is in the table
    assert caption("archive/x" * 3 + "abcdefghijklmnopqrstuvwxyz0123456789.npy[12]", 0.5, "4", fits) == [
        "xabcdefghijklmnopqrs", "tuvwxyz01234567…[12]", "4", "ŷ 0.5000"]  # no place to break: where it is full
    assert caption("boot.png", 0.99991, "Trouser, Dress, Sandal, Sneaker, Ankle boot", fits) == [
        "boot.png", "Trouser, Dress,", "Sandal, Sneaker, An…", "ŷ 0.9999"]
    assert caption("scan.png", 0.25, "not 4 (0,1,2,3,5,6,7,8,9)", fits) == [
        "scan.png", "not 4", "(0,1,2,3,5,6,7,8,9)", "ŷ 0.2500"]
    assert caption("a.png", 0.5, "Pullover-and-a-very-long-class", fits) == ["a.png", "Pullover-and-a-very…", "ŷ 0.5000"]


def test_show_says_the_decision_the_table_says_at_the_threshold(run, tmp_path):
    from mlecli.use import sheet

    words = []
    monkey = pytest.MonkeyPatch()
    monkey.setattr(sheet, "caption", lambda label, p, word, fits: words.append(word) or [label])
    try:
        digits, _ = make_digits(12, seed=2)
        np.save(tmp_path / "d.npy", digits)
        res = cli("predict", run, tmp_path / "d.npy", "--show", tmp_path / "seen.png", "--threshold", "0.4")
    finally:
        monkey.undo()
    assert res.exit_code == 0
    assert words == [line.split("  ")[-1] for line in res.stdout.splitlines()]


# ---------------------------------------------------------------------------
# Refusals: one line each, the other inputs still predicted, exit status 1


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


BLANK = "{p}: no ink found: nothing stands out from the background (judged from the image's border: leave a margin around the ink)"
REFUSALS = {
    "empty.png": (b"", "{p}: the file is empty"),
    "notes.png": (b"hello, not an image", "{p}: not an image mlecli can read (PNG, JPEG, BMP, GIF, TIFF, WebP, PNM), nor a .npy or IDX file"),
    "labels.gz": (gzip.compress(idx_bytes(np.arange(10, dtype=np.uint8))),
                  "{p}: an IDX file of 10 labels (one number each), not of images: give the images file (…-images-idx3-ubyte)"),
    "cube.npy": (_npy(np.zeros((2, 3, 4, 5), np.uint8)),
                 "{p}: the .npy file holds an array of shape 2×3×4×5; images are H×W or N×H×W (e.g. 28×28 or N×28×28), or colour pictures H×W×3|4 or N×H×W×3|4"),
    "none.npy": (_npy(np.zeros((0, 28, 28), np.uint8)), "{p}: the .npy file holds no images (shape 0×28×28)"),
    "scalar.npy": (_npy(np.float64(3)),
                   "{p}: the .npy file holds an array of shape () (a single number); images are H×W or N×H×W (e.g. 28×28 or N×28×28), or colour pictures H×W×3|4 or N×H×W×3|4"),
    "bytes255.npy": (_npy(np.full((28, 28), 255.0)),
                     "{p}: the .npy file holds float64 values from 255 to 255; float images must be 0-1: divide it by 255"),
    "nan.npy": (_npy(np.array([[0.5, np.nan], [np.inf, 0.1]])),
                "{p}: the .npy file holds 2 NaN or infinite values; images must be finite"),
    "negative.npy": (_npy(np.array([[-1, 300]])), "{p}: the .npy file holds int64 values from -1 to 300; integer images must be 0-255"),
    "complex.npy": (_npy(np.zeros((28, 28), np.complex64)),
                    "{p}: the .npy file holds complex64 values; images are uint8 0-255 or float 0-1"),
    "pickle.npy": (_npy(np.array([{"a": 1}], dtype=object)),
                   "{p}: the .npy file holds Python objects (loading it would need pickle); refused"),
    "short.npy": (_npy(np.zeros((28, 28), np.uint8))[:-10],
                  "{p}: the .npy file is truncated (its header promises 784 bytes of data, it has 774)"),
    "notidx.gz": (gzip.compress(b"plain text"), "{p}: a gzip file that does not hold an IDX file (images like MNIST's)"),
    "short-idx": (idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-1],
                  "{p}: truncated IDX data: the header says 2x28x28 (1584 bytes in all), the file has 1583"),
    "white.png": (encode(np.ones((40, 40))), BLANK),
    "dot.png": (encode(np.zeros((1, 1))), BLANK),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_each_unusable_input_gets_one_line_and_the_others_are_still_predicted(run, tmp_path, name):
    data, message = REFUSALS[name]
    bad = tmp_path / name
    bad.write_bytes(data)
    good = tmp_path / "good.png"
    good.write_bytes(encode(PAGE))
    res = cli("predict", run, good, bad, good)
    assert res.exit_code == 1
    assert res.stderr == "Error: " + message.format(p=bad) + "\n"
    assert res.stdout.count(str(good)) == 2


def test_missing_inputs_and_folders_without_images(run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    res = cli("predict", run, tmp_path / "nowhere.png", empty)
    assert res.exit_code == 1
    assert res.stderr.splitlines() == [
        f"Error: {tmp_path / 'nowhere.png'} does not exist",
        f"Error: {empty}: no images in this folder (files ending in .png, .jpg, .jpeg, .bmp, .gif, .tif, …)",
    ]


def test_a_blank_image_inside_an_array_is_refused_by_its_index(run, tmp_path):
    digits, _ = make_digits(3, seed=0)
    digits[1] = 17
    np.save(tmp_path / "d.npy", digits)
    res = cli("predict", run, tmp_path / "d.npy", "--json")
    assert res.exit_code == 1
    assert [p["index"] for p in predictions(res)] == [0, 2]
    assert res.stderr == "Error: " + BLANK.format(p=f"{tmp_path / 'd.npy'}[1]") + "\n"


def test_raw_needs_28_by_28_images(run, tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(encode(PAGE))
    res = cli("predict", run, path, "--raw")
    assert res.exit_code == 1
    assert res.stderr == (f"Error: {path}: --raw needs 28×28 images (light ink on black, as MNIST's), this is 36×30; "
                          "leave out --raw to prepare it\n")


def test_an_image_over_50_megapixels_is_refused_before_it_is_decoded(run, tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (10_000, 5_001)).save(path)
    res = cli("predict", run, path)
    assert res.exit_code == 1
    assert res.stderr == (f"Error: {path}: 10000×5001 pixels: more than the 50 megapixels mlecli reads; "
                          "scale it down or crop it to the digit\n")


def test_a_decompression_bomb_is_refused_by_its_header(run, tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (15_000, 12_000)).save(path)  # 180 megapixels in a few kilobytes
    res = cli("predict", run, path)
    assert (res.exit_code, res.stderr) == (1, f"Error: {path}: more than the 50 megapixels mlecli reads; "
                                              "scale it down or crop it to the digit\n")


def test_devices_pipes_and_files_over_512_mb_are_refused_unread(run, tmp_path):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")  # starts as a PNG does
        f.truncate((512 << 20) + 1)  # sparse: nothing is read or written
    unknown = tmp_path / "unknown.png"
    with open(unknown, "wb") as f:
        f.truncate(2 << 30)  # larger than any input can be: refused by its size, before its first byte
    res = cli("predict", run, "/dev/zero", big, unknown)
    assert res.exit_code == 1
    assert res.stderr.splitlines() == [
        "Error: /dev/zero is not a file or a folder (a device or a socket): give an image file",
        f"Error: {big}: larger than 512 MB; no image or array here is that big",
        f"Error: {unknown}: larger than 512 MB; no image or array here is that big",
    ]


def test_a_single_colour_channel_is_dropped(run, model, tmp_path):
    digits, _ = make_digits(3, seed=6)
    np.save(tmp_path / "keras.npy", digits[..., None])  # N×H×W×1
    np.save(tmp_path / "torch.npy", digits[:, None])  # N×1×H×W
    np.save(tmp_path / "one.npy", digits[0][..., None])  # H×W×1
    got = predictions(cli("predict", run, tmp_path / "keras.npy", tmp_path / "torch.npy", tmp_path / "one.npy", "--json"))
    expected = model.predict_proba(digits)[:, 1]
    assert [(Path(d["input"]).name, d["index"]) for d in got] == [
        ("keras.npy", 0), ("keras.npy", 1), ("keras.npy", 2), ("torch.npy", 0), ("torch.npy", 1), ("torch.npy", 2),
        ("one.npy", None)]
    assert [d["p"] for d in got] == pytest.approx([*expected, *expected, expected[0]], abs=1e-7)


def test_transparent_pictures_read_as_ink_on_plain_paper(run, model, tmp_path):
    alpha = 255 - PAGE8  # black ink whose opacity is its darkness, on a transparent sheet
    clear = np.zeros((*PAGE8.shape, 4), np.uint8)
    clear[..., 3] = alpha
    Image.fromarray(clear).save(tmp_path / "clear.png")
    keyed = Image.fromarray(PAGE8).convert("P")
    keyed.info["transparency"] = 255  # the white of the palette is transparent
    keyed.save(tmp_path / "keyed.png", transparency=keyed.getpixel((0, 0)))
    opaque = model.prepare(PAGE8)
    for name in ("clear.png", "keyed.png"):
        np.testing.assert_allclose(model.prepare(tmp_path / name), opaque, atol=1, err_msg=name)


def test_control_characters_in_a_name_are_shown_as_escapes(run, tmp_path):
    path = tmp_path / "two\nlines.png"
    path.write_bytes(encode(PAGE))
    res = cli("predict", run, path)
    assert res.exit_code == 0 and res.stdout.count("\n") == 1 and "two\\nlines.png" in res.stdout
    assert json.loads(cli("predict", run, path, "--json").stdout)["input"] == str(path)


def test_a_truncated_image_is_one_line(run, tmp_path):
    for name, data in (("cut.png", encode(PAGE)), ("cut.jpg", encode(PAGE, "JPEG"))):
        path = tmp_path / name
        path.write_bytes(data[: len(data) // 2])
        res = cli("predict", run, path)
        assert res.exit_code == 1 and res.stdout == ""
        assert res.stderr.startswith(f"Error: {path}: not a readable image (") and res.stderr.count("\n") == 1


def test_nothing_on_standard_input(run):
    res = cli("predict", run, "-", input=b"")
    assert (res.exit_code, res.stderr) == (1, "Error: <stdin>: nothing came on standard input\n")


def test_a_network_trained_on_other_image_sizes_is_refused(tmp_path):
    images, labels = make_digits(200, seed=0, side=20)
    arrays = {"train-images": images, "train-labels": labels, "test-images": images[:50], "test-labels": labels[:50]}
    small = TinyDataset({MNIST_FILES[r]: idx_bytes(a) for r, a in arrays.items()}, arrays)
    cfg = small.write_config(tmp_path / "small.toml", small.write_folder(tmp_path / "mirror"),
                             "[model]\nhidden = [4]\n[train]\nepochs = 1\n")
    assert cli("train", cfg, "--run-dir", tmp_path / "run", "--data-dir", tmp_path / "data", "-q").exit_code == 0
    good = tmp_path / "good.png"
    good.write_bytes(encode(PAGE))
    res = cli("predict", tmp_path / "run", good)
    best = tmp_path / "run" / "checkpoints" / "best.npz"
    message = (f"{best} was trained on 20×20 images (400 inputs); predict and export work with 28×28 images "
               "(MNIST's form): use a network trained on a 28×28 dataset")
    assert (res.exit_code, res.stdout, res.stderr) == (1, "", f"Error: {message}\n")
    with pytest.raises(CheckpointError, match="trained on 20×20 images"):
        mlecli.load(tmp_path / "run")


def test_usage_errors(run, tmp_path):
    assert cli("predict", run).exit_code == 2  # no INPUT
    res = cli("predict", run, "x.png", "--checkpoint", "newest")
    assert res.exit_code == 2 and "'newest' is not best, last or epoch-N" in res.stderr
    assert cli("predict", run, "x.png", "--threshold", "1").exit_code == 2
    res = cli("predict", tmp_path / "no-run", "x.png")
    assert (res.exit_code, res.stderr) == (1, f"Error: {tmp_path / 'no-run'} does not exist: give a run folder or a checkpoint file\n")


GOOD_FILES = {
    "png": encode(PAGE),
    "jpeg": encode(PAGE, "JPEG"),
    "gif": encode(PAGE, "GIF"),
    "bmp": encode(PAGE, "BMP"),
    "tiff": encode(PAGE, "TIFF"),
    "webp": encode(PAGE, "WEBP"),
    "npy": _npy(make_digits(2, seed=0)[0]),
    "idx": idx_bytes(make_digits(2, seed=0)[0]),
    "idx.gz": gzip.compress(idx_bytes(make_digits(2, seed=0)[0]), mtime=0),
}


@st.composite
def damaged(draw):
    kind = draw(st.sampled_from(sorted(GOOD_FILES)))
    data = bytearray(GOOD_FILES[kind])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "zero"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "zero" and data:
            data[i : i + draw(st.integers(1, 64))] = bytes(min(64, len(data) - i))
    return kind, bytes(data)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damaged())
def test_damaged_files_give_a_prediction_or_one_line_never_a_traceback(run, tmp_path, case):
    kind, data = case
    path = tmp_path / f"damaged.{kind}"
    path.write_bytes(data)
    res = cli("predict", run, path)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    if res.exit_code == 1:
        assert res.stderr.startswith(f"Error: {path}") and res.stderr.count("\n") == 1, res.stderr
    else:
        assert res.exit_code == 0 and res.stderr == "" and res.stdout.startswith(str(path))


# ---------------------------------------------------------------------------
# The Python API


def test_the_python_api_in_five_lines(run, tmp_path):
    path = tmp_path / "seven.png"
    path.write_bytes(encode(PAGE))
    model = mlecli.load(run)  # a run folder (its best checkpoint) or a checkpoint file
    proba = model.predict_proba([path, PAGE8])  # paths, arrays, PIL images: (N, 2)
    assert proba.shape == (2, 2) and np.allclose(proba.sum(axis=1), 1.0) and proba[0, 1] == proba[1, 1]
    assert model.prepare(path).shape == (28, 28) and model.prepare(path).dtype == np.uint8
    assert model.predict(path).tolist() == [int(proba[0, 1] >= 0.5)]
    assert model.classes_ == ("even (0,2,4,6,8)", "odd (1,3,5,7,9)")
    assert proba[0, 1] == pytest.approx(predictions(cli("predict", run, path, "--json"))[0]["p"], abs=1e-7)


def test_the_api_takes_pil_images_stacks_and_checkpoint_files(run, model):
    digits, _ = make_digits(4, seed=9)
    best = run / "checkpoints" / "best.npz"
    by_file = mlecli.load(best)
    assert repr(by_file).startswith(f"<mlecli Model {best} (epoch ")
    np.testing.assert_array_equal(by_file.predict_proba(digits), model.predict_proba(digits))
    assert model.prepare(digits).shape == (4, 28, 28)
    assert model.predict_proba(Image.fromarray(PAGE8))[0, 1] == model.predict_proba(PAGE8)[0, 1]
    assert model.predict_proba(digits, raw=True).shape == (4, 2)
    last = mlecli.load(run, checkpoint="last")
    assert last.checkpoint.path.name == "last.npz"


def test_the_api_raises_the_one_line_errors(model):
    with pytest.raises(InputError, match="^array: no ink found"):
        model.predict_proba(np.zeros((28, 28), np.uint8))
    with pytest.raises(InputError, match="^cannot predict on a dict: give a path, a PIL image, or a gray array"):
        model.predict_proba({"not": "an image"})
    with pytest.raises(InputError, match="float images must be 0-1"):
        model.predict_proba(np.full((28, 28), 200.0))


def test_import_mlecli_and_the_new_commands_help_stay_light():
    code = (
        "import sys\n"
        "import mlecli\n"
        "from click.testing import CliRunner\n"
        "from mlecli.cli import main\n"
        "for args in (['predict', '--help'], ['export', '--help']):\n"
        "    assert CliRunner().invoke(main, args).exit_code == 0\n"
        "print(sorted(m for m in ('numpy', 'PIL', 'onnx') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout == "[]\n", res.stderr
