"""The update rules (optim.py): each fast in-place version equals its reference, steps
worked by hand, the prior, shifted digits, and the scalars the bound calls read."""

import ctypes

import numpy as np
import pytest

from mlecli.nn import blas, optim
from mlecli.nn.model import forward, init_params, layer_sizes, posterior_gradients
from mlecli.nn.pixels import draw_offsets, pad_images, pixels, shift_images, shifted_view
from mlecli.nn.step import Workspace, train_step

RULES = {
    "sgd": optim.Sgd(),
    "momentum": optim.Momentum(0.9),
    "nesterov": optim.Momentum(0.8, nesterov=True),
    "adam": optim.Adam(0.9, 0.99, 1e-6),
}


@pytest.fixture(params=["cblas", "numpy"])
def backend(request, monkeypatch):
    if request.param == "numpy":
        monkeypatch.setattr(blas, "_CBLAS", None)
    elif blas._cblas() is None:
        pytest.skip("no cblas found beside numpy: the numpy fallback is what runs here")
    return request.param


def one_step(rule, params, state, pixels_255, y, lr, t, prior=None, ws=None):
    """One fast step of `rule` on images `pixels_255` (uint8 rows), in place."""
    ws = ws or Workspace(params, len(y), rule.bind(params, state, prior))
    z = np.empty((len(y), 1), params[0][0].dtype)
    train_step(params, ws, pixels_255, np.arange(len(y)), y - 0.5, z, lr, t)
    return ws


def test_one_momentum_step_by_hand(backend):
    # Logistic regression on one pixel: x = 255/255 = 1, y = 1, W = 0, b = 0.
    #   z = 0, ŷ = ½, ∂LL/∂z = y − ŷ = ½;  g = (∂LL/∂W, ∂LL/∂b) = (½·x, ½) = (½, ½).
    # State before the step: v = (1, −1); μ = 0.9, η = 0.1.
    #   momentum: v ← μ v + g = (0.9 + 0.5, −0.9 + 0.5) = (1.4, −0.4);
    #             θ ← θ + η v = (0.14, −0.04)
    #   nesterov: the same v; θ ← θ + η (g + μ v) = 0.1 (0.5 + 1.26, 0.5 − 0.36) = (0.176, 0.014)
    for nesterov, W_want, b_want in ((False, 0.14, -0.04), (True, 0.176, 0.014)):
        params = [(np.zeros((1, 1)), np.zeros(1))]
        state = {"velocity": [(np.ones((1, 1)), -np.ones(1))]}
        one_step(optim.Momentum(0.9, nesterov), params, state, np.full((1, 1), 255, np.uint8), np.ones(1), 0.1, 1)
        assert params[0][0][0, 0] == pytest.approx(W_want, abs=1e-15)
        assert params[0][1][0] == pytest.approx(b_want, abs=1e-15)
        assert state["velocity"][0][0][0, 0] == pytest.approx(1.4, abs=1e-15)
        assert state["velocity"][0][1][0] == pytest.approx(-0.4, abs=1e-15)


def test_one_adam_step_with_a_prior_by_hand(backend):
    # Two pixels x = (255, 0)/255 = (1, 0), y = 1; W = (0, 2)ᵀ, b = 0, so z = 0, ∂LL/∂z = ½.
    #   ∂LL/∂W = ½ x = (½, 0);  ∂LL/∂b = ½.
    # Prior σ = 1 on the weights, N = 4 training images, a batch of m = 1: the batch
    # ascends LL + (1/4) log p(θ), whose gradient adds −(1/4) W/σ² = (0, −½) to ∂/∂W:
    #   g = (½, −½) for W, ½ for b.
    # Adam, step t = 1, β₁ = 0.9, β₂ = 0.999, ε = 1e-8, η = 0.01, from m = v = 0:
    #   m = 0.1 g, v = 0.001 g²;  m̂ = m/(1 − 0.9) = g;  v̂ = v/(1 − 0.999) = g²;
    #   θ ← θ + η g/(|g| + ε) = θ ± 0.01 · 0.5/(0.5 + 1e-8)   (Adam's first step: η sign(g))
    params = [(np.array([[0.0], [2.0]]), np.zeros(1))]
    rule = optim.Adam(0.9, 0.999, 1e-8)
    state = rule.init_state(params)
    prior = optim.Prior(sd=1.0, biases=False, n=4)
    one_step(rule, params, state, np.array([[255, 0]], np.uint8), np.ones(1), 0.01, 1, prior)
    move = 0.01 * 0.5 / (0.5 + 1e-8)
    np.testing.assert_allclose(params[0][0][:, 0], [move, 2 - move], rtol=0, atol=1e-16)
    np.testing.assert_allclose(params[0][1], [move], rtol=0, atol=1e-16)
    np.testing.assert_allclose(state["m"][0][0][:, 0], [0.05, -0.05], rtol=1e-15)
    np.testing.assert_allclose(state["v"][0][0][:, 0], [0.00025, 0.00025], rtol=1e-12)


def test_the_prior_is_the_sgd_updates_beta_by_hand(backend):
    # The same two pixels and weights; sgd with η = 0.1, σ = 1, N = 4, m = 1:
    #   W ← (1 − η m/(N σ²)) W + η ∂LL/∂W = 0.975 (0, 2) + 0.1 (½, 0) = (0.05, 1.95)
    #   b ← b + η ∂LL/∂b = 0.05                (no prior on the biases unless asked)
    params = [(np.array([[0.0], [2.0]]), np.zeros(1))]
    one_step(optim.Sgd(), params, {}, np.array([[255, 0]], np.uint8), np.ones(1), 0.1, 1,
             optim.Prior(sd=1.0, biases=False, n=4))
    np.testing.assert_allclose(params[0][0][:, 0], [0.05, 1.95], rtol=0, atol=1e-15)
    np.testing.assert_allclose(params[0][1], [0.05], rtol=0, atol=1e-15)


def random_net(hidden, n_in=5, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    params = init_params(layer_sizes(n_in, hidden), rng, dtype)
    return [(W, rng.normal(0, 0.3, b.shape).astype(dtype)) for W, b in params]


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("prior", [None, (0.7, False), (0.7, True)], ids=["no-prior", "prior", "prior+biases"])
@pytest.mark.parametrize("hidden", [(), (5,), (6, 3, 4)], ids=["logreg", "1-hidden", "3-hidden"])
def test_each_fast_rule_equals_its_reference_step_after_step(name, prior, hidden, backend):
    rule = RULES[name]
    params = random_net(hidden)
    images = np.random.default_rng(1).integers(0, 256, (7, 5), dtype=np.uint8)
    y = np.random.default_rng(2).integers(0, 2, 7).astype(np.float64)
    x = pixels(images, np.float64)
    n_train = 50
    prior_obj = optim.Prior(prior[0], prior[1], n_train) if prior else None
    fast = [(W.copy(), b.copy()) for W, b in params]
    state = rule.init_state(fast)
    ws = Workspace(fast, 7, rule.bind(fast, state, prior_obj))
    ref, ref_state = params, rule.init_state(params)
    # batches of different sizes (each binds its own plan) and a changing learning rate
    for t, (idx, lr) in enumerate([(np.array([6, 0, 3, 2, 5, 1, 4]), 0.05), (np.array([2, 4, 1]), 0.03),
                                   (np.array([0, 1, 2, 3, 4, 5, 6]), 0.04)], start=1):
        hs, zz = forward(ref, x[idx])
        share = len(idx) / n_train
        grads = posterior_gradients(ref, hs, zz, y[idx], prior[0] if prior else None, bool(prior and prior[1]), share)
        ref, ref_state = rule.reference(ref, grads, ref_state, lr, t)
        z = np.empty((len(idx), 1))
        train_step(fast, ws, images, idx, y[idx] - 0.5, z, lr, t)
        np.testing.assert_allclose(z[:, 0], zz, rtol=1e-12)
        for (W, b), (We, be) in zip(fast, ref):
            np.testing.assert_allclose(W, We, rtol=1e-11, atol=1e-13)
            np.testing.assert_allclose(b, be, rtol=1e-11, atol=1e-13)
        for slot in rule.slots:
            for (W, b), (We, be) in zip(state[slot], ref_state[slot]):
                np.testing.assert_allclose(W, We, rtol=1e-11, atol=1e-13)
                np.testing.assert_allclose(b, be, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("name", list(RULES))
def test_float32_fast_rules_stay_within_float32_rounding_of_the_float64_reference(name):
    rule = RULES[name]
    params = random_net((6,), seed=3)
    images = np.random.default_rng(4).integers(0, 256, (7, 5), dtype=np.uint8)
    y = np.random.default_rng(5).integers(0, 2, 7).astype(np.float64)
    prior = optim.Prior(0.5, True, 20)
    fast = [(W.astype(np.float32), b.astype(np.float32)) for W, b in params]
    state = rule.init_state(fast)
    ws = Workspace(fast, 7, rule.bind(fast, state, prior))
    ref, ref_state = params, rule.init_state(params)
    x = pixels(images, np.float64)
    for t in (1, 2, 3):
        grads = posterior_gradients(ref, *forward(ref, x), y, 0.5, True, 7 / 20)
        ref, ref_state = rule.reference(ref, grads, ref_state, 0.05, t)
        train_step(fast, ws, images, np.arange(7), (y - 0.5).astype(np.float32), np.empty((7, 1), np.float32), 0.05, t)
    for (W, b), (We, be) in zip(fast, ref):
        np.testing.assert_allclose(W, We, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b, be, rtol=1e-4, atol=1e-5)


def test_a_rule_bound_to_other_arrays_is_refused():
    params = random_net((3,))
    other = [(W.copy(), b.copy()) for W, b in params]
    with pytest.raises(ValueError, match="bound to other parameter arrays"):
        Workspace(params, 4, optim.Sgd().bind(other, {}, None))


def test_state_round_trips_through_named_arrays_and_bad_arrays_are_named():
    params = random_net((3,))
    rule = RULES["adam"]
    state = rule.init_state(params)
    state["m"][1][0][...] = 0.5
    arrays = rule.to_arrays(state)
    assert sorted(arrays) == sorted(optim.state_names(("m", "v"), 2))
    assert optim.state_names(("m", "v"), 2)[:4] == ["opt.m.W1", "opt.m.b1", "opt.m.W2", "opt.m.b2"]
    back = rule.from_arrays(arrays, params)
    assert np.array_equal(back["m"][1][0], state["m"][1][0]) and back["m"][1][0] is not state["m"][1][0]
    with pytest.raises(ValueError, match=r"^the adam state array opt.v.b2 is missing$"):
        rule.from_arrays({k: a for k, a in arrays.items() if k != "opt.v.b2"}, params)
    with pytest.raises(ValueError, match=r"^the adam state array opt.m.W1 is float32 \(5, 3\), the weights need float64"):
        rule.from_arrays({**arrays, "opt.m.W1": arrays["opt.m.W1"].astype(np.float32)}, params)
    with pytest.raises(ValueError, match=r"^arrays opt.velocity.W1 are not state of the adam rule$"):
        rule.from_arrays({**arrays, "opt.velocity.W1": arrays["opt.m.W1"]}, params)
    with pytest.raises(ValueError, match="holds non-finite values"):
        rule.from_arrays({**arrays, "opt.v.W2": np.full_like(arrays["opt.v.W2"], np.nan)}, params)


# ---------------------------------------------------------------------------
# Scalars read when a bound call runs (how η changes every step without binding again)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bound_calls_read_their_scalars_when_they_run(backend, dtype):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4)).astype(dtype), rng.normal(size=(4, 2)).astype(dtype)
    c = np.zeros((3, 2), dtype)
    alpha, beta = blas.scalar(dtype, 1.0), blas.scalar(dtype, 0.0)
    gemm = blas.bind(a, b, c, alpha, beta)
    x, y = rng.normal(size=5).astype(dtype), np.ones(5, dtype)
    axpby = blas.bind_axpby(x, y, alpha, beta)
    for al, be in ((1.0, 0.0), (0.5, 2.0), (-3.0, 0.25)):
        alpha.value, beta.value = al, be
        c_want, y_want = al * (a @ b) + be * c, al * x + be * y
        gemm()
        axpby()
        tol = 1e-5 if dtype == np.float32 else 1e-13
        np.testing.assert_allclose(c, c_want, rtol=tol, atol=tol)
        np.testing.assert_allclose(y, y_want, rtol=tol, atol=tol)


def test_a_scalar_of_the_other_precision_is_refused():
    if blas._cblas() is None:
        pytest.skip("no cblas found beside numpy")
    a = np.ones((2, 2), np.float32)
    with pytest.raises(ValueError, match="a c_double scalar for a c_float product"):
        blas.bind(a, a, a, ctypes.c_double(1.0), 0.0)


# ---------------------------------------------------------------------------
# Shifted digits


def test_shift_images_by_hand():
    img = np.arange(1, 10, dtype=np.uint8).reshape(1, 3, 3)  # 1 2 3 / 4 5 6 / 7 8 9
    assert shift_images(img, [1], [0])[0].tolist() == [[0, 0, 0], [1, 2, 3], [4, 5, 6]]  # down
    assert shift_images(img, [0], [-1])[0].tolist() == [[2, 3, 0], [5, 6, 0], [8, 9, 0]]  # left
    assert shift_images(img, [-1], [1])[0].tolist() == [[0, 4, 5], [0, 7, 8], [0, 0, 0]]  # up, right
    assert shift_images(img, [3], [0])[0].tolist() == [[0] * 3] * 3  # out of the frame


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gathering_at_offsets_equals_shifting_each_image(k):
    rng = np.random.default_rng(k)
    images = rng.integers(0, 256, (40, 6, 5), dtype=np.uint8)
    view = shifted_view(images, k)
    idx = rng.permutation(40)[:17]
    oy, ox = draw_offsets(rng, 17, k)
    assert oy.min() >= 0 and oy.max() <= 2 * k and ox.min() >= 0 and ox.max() <= 2 * k
    np.testing.assert_array_equal(view[idx, oy, ox], shift_images(images[idx], k - oy, k - ox))


def test_every_offset_is_drawn_and_the_draw_is_seeded():
    a = draw_offsets(np.random.default_rng(7), 5000, 2)
    b = draw_offsets(np.random.default_rng(7), 5000, 2)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert sorted(set(zip(a[0].tolist(), a[1].tolist()))) == [(i, j) for i in range(5) for j in range(5)]


def test_a_shifted_batch_trains_like_the_shifted_images(backend):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (9, 4, 4), dtype=np.uint8)
    y = rng.integers(0, 2, 9).astype(np.float64)
    idx = np.array([4, 0, 8, 2, 7])
    oy, ox = draw_offsets(rng, 5, 1)
    a = random_net((3,), n_in=16)
    b = [(W.copy(), b.copy()) for W, b in a]
    za, zb = np.empty((5, 1)), np.empty((5, 1))
    padded = pad_images(images, 1).reshape(9, -1)
    train_step(a, Workspace(a, 5, shift=1, image_shape=(4, 4)), padded, idx, y[idx] - 0.5, za, 0.1, offsets=(oy, ox))
    moved = shift_images(images[idx], 1 - oy, 1 - ox).reshape(5, 16)
    train_step(b, Workspace(b, 5), moved, np.arange(5), y[idx] - 0.5, zb, 0.1)
    assert za.tobytes() == zb.tobytes()
    for (Wa, ba), (Wb, bb) in zip(a, b):
        assert Wa.tobytes() == Wb.tobytes() and ba.tobytes() == bb.tobytes()
