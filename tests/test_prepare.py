"""MNIST's preparation (mlecli/use/preparation.py): steps worked by hand, the properties that make it
MNIST's, and the vectorised version held equal to the one-image oracle."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from conftest import DEBIAN_FASHION, require
from hypothesis import given, settings
from hypothesis import strategies as st
from pictures import random_strokes, strokes

from mlecli.data.idx import parse_idx
from mlecli.use.preparation import (
    FASHION_MNIST,
    MNIST,
    BlankImage,
    blank_message,
    composite,
    luminance,
    prepare,
    prepare_many,
    prepare_steps,
    ring,
    style_for,
)

SEARCH = settings(max_examples=150, deadline=None)


def drawing(seed: int, shape: tuple[int, int] = (60, 50)) -> np.ndarray:
    """Dark random strokes on white, gray (H, W) in [0, 1], with enough ink to be a digit."""
    rng = np.random.default_rng(seed)
    while True:
        ink = random_strokes(rng, shape)
        if ink.max() >= 0.5:
            return 1.0 - ink


def test_a_rectangle_worked_by_hand():
    # 10×10 white page, black rectangle on rows 3-6, columns 4-5.
    g = np.ones((10, 10))
    g[3:7, 4:6] = 0.0
    image, steps = prepare_steps(g)
    # 1. border median 1, min 0, max 1: the ink is dark (1 − 0 > 1 − 1): inverted, m = 0.
    # 2. σ = 0. 3. p − m = 1. 4. v = g. 5. rows 3..6, columns 4..5 have ink: h = 4, w = 2.
    # 6. s = 20/4 = 5: each crop pixel becomes a 5×5 block: 20 rows × 10 columns of 1.
    # 7. q = 255 there. 8. cy = 10.0, cx = 5.0. 9. dy = ⌊14.5 − 10 + ½⌋ = 5, dx = ⌊14.5 − 5 + ½⌋ = 10.
    assert steps.inverted and steps.background == 0.0 and steps.noise == 0.0 and steps.peak == 1.0
    assert steps.box == (3, 6, 4, 5) and steps.scale == 5.0
    assert steps.centre == (10.0, 5.0) and steps.offset == (5, 10)
    expected = np.zeros((28, 28), np.uint8)
    expected[5:25, 10:20] = 255
    np.testing.assert_array_equal(image, expected)


def test_the_same_rectangle_in_fashion_mnist_s_style():
    g = np.ones((10, 10))
    g[3:7, 4:6] = 0.0
    image, steps = prepare_steps(g, style=FASHION_MNIST)
    # Steps 1-5 as for MNIST; 6. s = 28/4 = 7: 28 rows × 14 columns of 1. 8. the middle of the
    # scaled crop: cy = 7·4/2 = 14, cx = 7·2/2 = 7. 9. dy = ⌊14 − 14 + ½⌋ = 0, dx = ⌊14 − 7 + ½⌋ = 7.
    assert steps.scale == 7.0 and steps.centre == (14.0, 7.0) and steps.offset == (0, 7)
    expected = np.zeros((28, 28), np.uint8)
    expected[:, 7:21] = 255
    np.testing.assert_array_equal(image, expected)


def test_each_dataset_s_networks_get_its_own_style():
    assert style_for("fashion-mnist") is FASHION_MNIST
    assert style_for("mnist") is MNIST and style_for("my-digits") is MNIST


def test_a_fractional_scale_worked_by_hand():
    # Light ink on black: one column (column 2) of rows 1-3 with levels 1, 1, 0.5.
    g = np.zeros((5, 5))
    g[1:4, 2] = [1.0, 1.0, 0.5]
    image, steps = prepare_steps(g)
    # Not inverted (m = 0, max − m = 1 > m − min = 0); box rows 1..3, column 2: h = 3, w = 1,
    # s = 20/3. Box rows [0, 6⅔) ← 1, [6⅔, 13⅓) ← 1, [13⅓, 20) ← 0.5; the column covers [0, 6⅔).
    # T: rows 0-12 → 1 (row 6: ⅔·1 + ⅓·1), row 13 → ⅓·1 + ⅔·0.5 = ⅔, rows 14-19 → 0.5;
    # columns 0-5 × 1, column 6 × ⅔. Peak 1 → q = ⌊255·T + ½⌋.
    col = np.array([255] * 13 + [170] + [128] * 6)  # 255·⅔ = 170, 255·0.5 + ½ = 128
    col6 = np.array([170] * 13 + [113] + [85] * 6)  # ⅔ of those: 170, 113.3, 85
    q = np.zeros((20, 20))
    q[:, :6] = col[:, None]
    q[:, 6] = col6
    cy = float(((np.arange(20) + 0.5) * q.sum(axis=1)).sum() / q.sum())
    cx = float(((np.arange(20) + 0.5) * q.sum(axis=0)).sum() / q.sum())
    dy, dx = int(np.floor(14.5 - cy + 0.5)), int(np.floor(14.5 - cx + 0.5))
    assert (steps.box, steps.scale, steps.inverted) == ((1, 3, 2, 2), 20 / 3, False)
    assert steps.centre == (cy, cx) and steps.offset == (dy, dx) == (6, 11)
    expected = np.zeros((28, 28), np.uint8)
    expected[dy : dy + 20, dx:] = q[:, : 28 - dx]  # columns 17-19 of the box, empty, fall outside
    np.testing.assert_array_equal(image, expected)


def test_an_image_already_in_mnist_form_comes_through_unchanged():
    # A digit-like drawing in MNIST's form: 20 pixels tall, centred by mass (pixel 14).
    ink = strokes([[(4, 10), (4, 19), (14, 14), (23, 12)], [(10, 12), (10, 18)]], (28, 28), width=2.5)
    digit = prepare(1.0 - ink)
    assert prepare(digit / 255.0).tobytes() == digit.tobytes()
    assert prepare_many(digit[None])[0][0].tobytes() == digit.tobytes()


@SEARCH
@given(st.integers(0, 2**32 - 1))
def test_a_prepared_image_that_fits_the_frame_is_a_fixed_point(seed):
    image, steps = prepare_steps(drawing(seed))
    inside = 0 <= steps.offset[0] <= 8 and 0 <= steps.offset[1] <= 8  # the 20×20 box lay inside the frame
    if inside and not ring(image).any():  # and no ink touches the frame's edge (it would count as noise)
        np.testing.assert_array_equal(prepare(image / 255.0), image)


@SEARCH
@given(st.integers(0, 2**32 - 1))
def test_mnist_form_the_longer_side_is_20_pixels_and_the_peak_255(seed):
    image, steps = prepare_steps(drawing(seed))
    rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
    inside = 0 <= steps.offset[0] <= 8 and 0 <= steps.offset[1] <= 8
    if inside:
        assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 == 20
        assert image.max() == 255
        q = image.astype(np.float64)
        com = ((np.arange(28) + 0.5) * q.sum(axis=1)).sum() / q.sum()
        assert abs(com - 14.5) <= 0.5  # within half a pixel of pixel 14's centre


@SEARCH
@given(st.integers(0, 2**32 - 1), st.integers(0, 40), st.integers(0, 40), st.integers(0, 40), st.integers(0, 40))
def test_moving_the_drawing_on_a_larger_page_changes_nothing(seed, top, bottom, left, right):
    g = drawing(seed)
    page = np.pad(g, ((top, bottom), (left, right)), constant_values=1.0)
    assert prepare(page).tobytes() == prepare(g).tobytes()


@SEARCH
@given(st.integers(0, 2**32 - 1), st.integers(2, 6))
def test_enlarging_the_picture_k_times_changes_nothing(seed, k):
    # Area averaging: each box pixel covers the same share of each enlarged pixel.
    g = drawing(seed, (30, 24))
    np.testing.assert_allclose(prepare(np.kron(g, np.ones((k, k)))), prepare(g), atol=1)


@SEARCH
@given(st.integers(0, 2**32 - 1), st.floats(0.4, 1.0), st.floats(0.0, 1.0))
def test_contrast_brightness_and_polarity_do_not_matter(seed, contrast, where):
    g = drawing(seed)
    base = prepare(g)
    dimmer = (1 - contrast) * where + contrast * g  # ink and paper closer together, anywhere in 0..1
    np.testing.assert_allclose(prepare(dimmer), base, atol=1)
    np.testing.assert_allclose(prepare(1.0 - g), base, atol=1)  # light ink on dark


def test_specks_of_noise_far_from_the_digit_do_not_move_it():
    rng = np.random.default_rng(5)
    paper = 0.8 + rng.normal(0, 0.02, (200, 200))
    ink = strokes([[(60, 60), (60, 110), (140, 80)]], (200, 200), width=12)
    photo = paper - 0.6 * ink
    speckled = photo.copy()
    for y, x in [(15, 180), (185, 20), (180, 185), (20, 30)]:
        speckled[y, x] = 0.2  # isolated dark dots, as dust on the page
    clean_image, clean = prepare_steps(photo)
    specked_image, specked = prepare_steps(speckled)
    assert clean.noise > 0 and specked.box == clean.box
    np.testing.assert_array_equal(specked_image, clean_image)


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 7), (28, 28), (300, 200)])
@pytest.mark.parametrize("level", [0.0, 0.5, 1.0])
def test_uniform_images_are_blank(shape, level):
    with pytest.raises(BlankImage) as err:
        prepare(np.full(shape, level), "page.png")
    assert str(err.value) == ("page.png: no ink found: nothing stands out from the background (judged from the image's "
                              "border: leave a margin around the ink)") == blank_message("page.png")
    assert prepare_many(np.full((2, *shape), level))[1].tolist() == [True, True]


def test_noise_alone_is_blank_and_faint_ink_in_it_is_not_enough():
    rng = np.random.default_rng(1)
    noise = np.clip(0.7 + rng.normal(0, 0.05, (120, 120)), 0, 1)
    with pytest.raises(BlankImage):
        prepare(noise)
    faint = noise - 0.08 * strokes([[(30, 30), (90, 90)]], (120, 120), width=8)  # 0.08 < max(0.1, 8σ)
    with pytest.raises(BlankImage):
        prepare(faint)
    clear = noise - 0.5 * strokes([[(30, 30), (90, 90)]], (120, 120), width=8)
    assert prepare(clear).max() == 255


def test_luminance_is_itu_601_luma():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], np.uint8)
    np.testing.assert_allclose(luminance(rgb), [[0.299, 0.587, 0.114, 1.0]], rtol=1e-15)


def test_transparency_is_filled_with_the_colour_opposite_the_ink():
    ink = strokes([[(8, 10), (30, 25), (33, 12)]], (40, 40), width=5)
    alpha = np.round(255 * ink).astype(np.uint8)
    dark_on_clear = np.zeros((40, 40, 4), np.uint8)
    dark_on_clear[..., 3] = alpha  # black ink, transparent sheet
    light_on_clear = dark_on_clear.copy()
    light_on_clear[..., :3] = 255  # white ink, transparent sheet
    expected = prepare(1.0 - alpha / 255.0)  # the same ink on opaque white
    np.testing.assert_allclose(prepare(composite(dark_on_clear)), expected, atol=1)
    np.testing.assert_allclose(prepare(composite(light_on_clear)), expected, atol=1)


@st.composite
def stacks(draw):
    n = draw(st.integers(1, 5))
    h, w = draw(st.integers(1, 45)), draw(st.integers(1, 45))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    images = []
    for _ in range(n):
        kind = draw(st.sampled_from(["strokes", "inverted", "noisy", "blank", "random"]))
        g = 1.0 - random_strokes(rng, (h, w)) if h > 2 and w > 2 else rng.random((h, w))
        if kind == "inverted":
            g = 1.0 - g
        elif kind == "noisy":
            g = np.clip(0.1 + 0.8 * g + rng.normal(0, 0.04, (h, w)), 0, 1)
        elif kind == "blank":
            g = np.full((h, w), draw(st.sampled_from([0.0, 0.3, 1.0])))
        elif kind == "random":
            g = rng.random((h, w))
        images.append(g)
    stack = np.stack(images)
    return np.round(stack * 255).astype(np.uint8) if draw(st.booleans()) else stack


@settings(max_examples=300, deadline=None)
@given(stacks(), st.sampled_from([MNIST, FASHION_MNIST]))
def test_the_vectorised_version_equals_the_one_image_oracle(stack, style):
    images, blank = prepare_many(stack, style=style)
    as_float = stack / 255.0 if stack.dtype == np.uint8 else stack
    for k, g in enumerate(as_float):
        try:
            expected = prepare(g, style=style)
        except BlankImage:
            assert blank[k] and not images[k].any()
            continue
        assert not blank[k]
        np.testing.assert_array_equal(images[k], expected)


def test_the_vectorised_version_works_in_chunks():
    stack = np.stack([np.round(255 * drawing(seed, (28, 28))).astype(np.uint8) for seed in range(7)])
    whole, _ = prepare_many(stack)
    chunked, _ = prepare_many(stack, chunk=3)
    np.testing.assert_array_equal(whole, chunked)
    assert prepare_many(np.zeros((0, 28, 28), np.uint8))[0].shape == (0, 28, 28)


def test_fashion_mnist_s_pictures_come_through_its_style_nearly_unchanged():
    require(DEBIAN_FASHION.is_dir(), f"{DEBIAN_FASHION} is missing: apt-get install dataset-fashion-mnist")
    images = parse_idx(gzip.decompress((DEBIAN_FASHION / "t10k-images-idx3-ubyte.gz").read_bytes()))
    prepared, blank = prepare_many(images, style=FASHION_MNIST)
    worst = np.abs(prepared.astype(int) - images).max(axis=(1, 2))
    print(f"of {len(images)} Fashion-MNIST test pictures: {(worst == 0).sum()} come through identical, "
          f"{blank.sum()} cover more than half their border (no background to judge)")
    assert (worst == 0).sum() >= 0.85 * len(images)  # the others: a longer side of 27 pixels, scaled to 28
    assert blank.sum() <= 0.001 * len(images)


@pytest.mark.parametrize("style", [MNIST, FASHION_MNIST], ids=lambda s: s.name)
def test_the_vectorised_version_equals_the_oracle_on_real_pictures(style):
    # Most of these already have a longer side of B (20 for MNIST's digits, 28 for Fashion's):
    # the vectorised version copies those instead of multiplying by 0/1 weights.
    require(DEBIAN_FASHION.is_dir(), f"{DEBIAN_FASHION} is missing: apt-get install dataset-fashion-mnist")
    images = parse_idx(gzip.decompress((DEBIAN_FASHION / "t10k-images-idx3-ubyte.gz").read_bytes()))[:300]
    digits = np.stack([prepare(drawing(seed, (28, 28))) for seed in range(100)])  # MNIST's form: 20 pixels
    for stack in (images, digits):
        prepared, blank = prepare_many(stack, style=style)
        for k, g in enumerate(stack / 255.0):
            try:
                expected = prepare(g, style=style)
            except BlankImage:
                assert blank[k]
                continue
            np.testing.assert_array_equal(prepared[k], expected)


def exact_resample(V: np.ndarray, box: int) -> np.ndarray:
    """Step 6 in Python's integers, term by term: the reference `resample` must equal exactly."""
    h, w = V.shape
    n = max(h, w)

    def A(i: int, a: int) -> int:
        return max(0, min((i + 1) * n, (a + 1) * box) - max(i * n, a * box))

    cells = [[int(x) for x in row] for row in V]
    U = [[sum(A(i, a) * cells[a][b] for a in range(h)) for b in range(w)] for i in range(box)]
    return np.array([[sum(U[i][b] * A(j, b) for b in range(w)) for j in range(box)] for i in range(box)], float)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 70), st.integers(1, 70), st.sampled_from([20, 28]), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_the_resampling_is_exact_in_any_order_of_its_sums(h, w, box, block, seed):
    from mlecli.use import preparation as prep

    rng = np.random.default_rng(seed)
    V = np.floor(rng.random((h, w)) ** 3 * prep.LEVELS + 0.5) * (rng.random((h, w)) < 0.6)
    expected = exact_resample(V, box)
    np.testing.assert_array_equal(prep.resample(V, box), expected)
    old = prep.WEIGHT_BLOCK
    prep.WEIGHT_BLOCK = block  # weights a few input pixels at a time: other orders of adding, the same bits
    try:
        np.testing.assert_array_equal(prep.resample(V, box), expected)
    finally:
        prep.WEIGHT_BLOCK = old


def test_the_largest_sums_the_resampling_can_meet_are_exact():
    from mlecli.use import preparation as prep

    # A crop n × n of full levels sums to n² · LEVELS ≤ 2⁴⁸ (n ≤ MAX_SIDE): below 2⁵³, where float64
    # stops holding every integer. A full row of MAX_SIDE pixels, worked by hand: box row 0 covers the
    # crop's one row over B units of its n; each box column covers n units of the row: T[0, j] = B · L · n.
    assert prep.MAX_SIDE**2 * prep.LEVELS <= 2**48
    T = prep.resample(np.full((1, prep.MAX_SIDE), float(prep.LEVELS)), 20)
    assert T[0].tolist() == [20.0 * prep.LEVELS * prep.MAX_SIDE] * 20 and not T[1:].any()
