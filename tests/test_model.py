"""The math of docs/design.md: forward pass, stable log-likelihood, hand-written backprop."""

import warnings

import numpy as np
import pytest

from mlecli.nn import blas
from mlecli.nn.model import (
    ascent_step,
    forward,
    gradients,
    init_params,
    layer_sizes,
    log_likelihood,
    log_posterior,
    log_prior,
    posterior_gradients,
    predict_proba,
    sigmoid,
)
from mlecli.nn.pixels import pixels
from mlecli.nn.step import Workspace, output_delta, sigmoid_of_half, times_sigmoid_slope, train_step


def random_problem(hidden, n=7, n_in=5, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    params = init_params(layer_sizes(n_in, hidden), rng, dtype)
    params = [(W, rng.normal(0, 0.3, b.shape).astype(dtype)) for W, b in params]  # non-zero biases too
    x = rng.uniform(0, 1, (n, n_in)).astype(dtype)
    y = rng.integers(0, 2, n).astype(dtype)
    return params, x, y


def ll_of(params, x, y):
    return log_likelihood(forward(params, x)[1], y)


@pytest.mark.parametrize("hidden", [(), (4,), (6, 3, 4)], ids=["logreg", "1-hidden", "3-hidden"])
def test_gradients_match_central_finite_differences(hidden):
    params, x, y = random_problem(hidden)
    hs, z = forward(params, x)
    grads = gradients(params, hs, z, y)
    eps = 1e-6
    for layer, ((W, b), (dW, db)) in enumerate(zip(params, grads)):
        for arr, grad, name in ((W, dW, "W"), (b, db, "b")):
            numeric = np.zeros_like(arr)
            for i in np.ndindex(arr.shape):
                old = arr[i]
                arr[i] = old + eps
                up = ll_of(params, x, y)
                arr[i] = old - eps
                down = ll_of(params, x, y)
                arr[i] = old
                numeric[i] = (up - down) / (2 * eps)
            rel = np.linalg.norm(grad - numeric) / max(np.linalg.norm(grad) + np.linalg.norm(numeric), 1e-12)
            assert rel < 1e-6, f"{name}{layer + 1}: relative error {rel:.2e}"


def test_one_ascent_step_on_a_2_2_1_network_by_hand():
    # x = [1, 0], y = 1. Hidden layer: W1 = [[0, 1], [1, 0]] (rows = inputs), b1 = [0, 0].
    #   a1 = x W1 + b1 = [0, 1];  h1 = σ(a1) = [0.5, σ(1)] with σ(1) = 0.7310585786300049.
    # Output: w = [[1], [-1]], b = 0.
    #   z = 0.5 − σ(1) = −0.2310585786300049;  ŷ = σ(z) = 0.44247...
    # ∂LL/∂z = y − ŷ = 1 − σ(z) = σ(−z) =: d = 0.5575...
    # Output gradients: ∂LL/∂w = h1ᵀ d = [0.5 d, σ(1) d];  ∂LL/∂b = d.
    # Hidden deltas: δ1 = (d wᵀ) ⊙ h1(1 − h1) = [d · 0.25, −d · σ(1)(1 − σ(1))].
    # Hidden gradients: ∂LL/∂W1 = xᵀ δ1 = [[δ1_1, δ1_2], [0, 0]];  ∂LL/∂b1 = δ1.
    # With η = 0.1 each parameter moves UP by 0.1 × its gradient.
    s1 = 1 / (1 + np.exp(-1.0))
    z = 0.5 - s1
    d = 1 / (1 + np.exp(z))
    params = [
        (np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([0.0, 0.0])),
        (np.array([[1.0], [-1.0]]), np.array([0.0])),
    ]
    x, y = np.array([[1.0, 0.0]]), np.array([1.0])
    hs, zz = forward(params, x)
    assert zz[0] == pytest.approx(z, abs=1e-15)
    assert log_likelihood(zz, y) == pytest.approx(np.log(1 / (1 + np.exp(-z))), abs=1e-15)
    new = ascent_step(params, gradients(params, hs, zz, y), 0.1)
    delta1 = np.array([d * 0.25, -d * s1 * (1 - s1)])
    np.testing.assert_allclose(new[0][0], [[0.1 * delta1[0], 1 + 0.1 * delta1[1]], [1.0, 0.0]], atol=1e-15)
    np.testing.assert_allclose(new[0][1], 0.1 * delta1, atol=1e-15)
    np.testing.assert_allclose(new[1][0], [[1 + 0.1 * 0.5 * d], [-1 + 0.1 * s1 * d]], atol=1e-15)
    np.testing.assert_allclose(new[1][1], [0.1 * d], atol=1e-15)
    assert ll_of(new, x, y) > ll_of(params, x, y)  # ascent: the likelihood went up


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_likelihood_is_finite_and_exact_for_huge_logits(dtype):
    z = np.array([-1000, -40, -1, 0, 1, 40, 1000], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any overflow warning fails the test
        ll1 = [log_likelihood(z[i : i + 1], np.ones(1, dtype)) for i in range(len(z))]
        ll0 = [log_likelihood(z[i : i + 1], np.zeros(1, dtype)) for i in range(len(z))]
        s = sigmoid(z)
    # log σ(z) = −softplus(−z): about z for very negative z, about −e^{−z} for large z
    assert ll1[0] == pytest.approx(-1000.0) and ll1[-1] == 0.0
    assert ll0[0] == 0.0 and ll0[-1] == pytest.approx(-1000.0)
    assert ll1[3] == pytest.approx(np.log(0.5)) and ll0[3] == pytest.approx(np.log(0.5))
    assert ll1[1] == pytest.approx(-40.0, rel=1e-6) and ll0[5] == pytest.approx(-40.0, rel=1e-6)
    assert s[0] == 0.0 and s[-1] == 1.0 and s[3] == 0.5
    assert np.all(np.isfinite(ll1 + ll0))


def test_sigmoid_is_symmetric():
    z = np.linspace(-30, 30, 601)
    np.testing.assert_allclose(sigmoid(z) + sigmoid(-z), 1.0, atol=1e-15)


def test_glorot_uniform_initialisation_is_seeded_and_bounded():
    sizes = layer_sizes(784, (128,))
    a = init_params(sizes, np.random.default_rng(3), np.float32)
    b = init_params(sizes, np.random.default_rng(3), np.float32)
    for (Wa, ba), (Wb, bb) in zip(a, b):
        assert Wa.dtype == np.float32 and np.array_equal(Wa, Wb) and not ba.any()
    limit = np.sqrt(6 / (784 + 128))
    assert np.abs(a[0][0]).max() <= limit and np.abs(a[0][0]).max() > 0.99 * limit
    assert a[1][0].shape == (128, 1)


@pytest.mark.parametrize("hidden", [(), (5,), (6, 3, 4)])
@pytest.mark.parametrize("batch", [7, 3])
@pytest.mark.parametrize("backend", ["cblas", "numpy"])
def test_in_place_train_step_equals_the_pure_functions(hidden, batch, backend, monkeypatch):
    if backend == "numpy":
        monkeypatch.setattr(blas, "_CBLAS", None)
    elif blas._cblas() is None:
        pytest.skip("no cblas found beside numpy: the numpy fallback is what runs here")
    params, _, y = random_problem(hidden, n=7)
    images = np.random.default_rng(1).integers(0, 256, (7, 5), dtype=np.uint8)
    x = pixels(images, np.float64)
    idx = np.array([6, 0, 3, 2, 5, 1, 4])[:batch]
    expected = ascent_step(params, gradients(params, *forward(params, x[idx]), y[idx]), 0.05)
    expected_ll = ll_of(params, x[idx], y[idx])
    fast = [(W.copy(), b.copy()) for W, b in params]
    z = np.empty((batch, 1))
    train_step(fast, Workspace(fast, 7), images, idx, y[idx] - 0.5, z, 0.05)
    np.testing.assert_allclose(z[:, 0], forward(params, x[idx])[1], rtol=1e-12)
    assert log_likelihood(z[:, 0], y[idx]) == pytest.approx(expected_ll, rel=1e-12)
    for (W, b), (We, be) in zip(fast, expected):
        np.testing.assert_allclose(W, We, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(b, be, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_steps_hidden_sigmoid_from_a_half_has_the_bits_of_model_sigmoid(dtype):
    a = np.linspace(-60, 60, 1201, dtype=dtype)
    h = a / 2  # what a hidden layer's GEMMs leave
    sigmoid_of_half(h)
    assert h.tobytes() == sigmoid(a).tobytes()


def test_the_steps_output_delta_is_y_minus_sigmoid_z():
    z = np.linspace(-40, 40, 161)
    y = (np.arange(161) % 2).astype(np.float64)
    delta = np.empty((161, 1))
    output_delta((z / 2)[:, None], (y - 0.5)[:, None], delta)
    np.testing.assert_allclose(delta[:, 0], y - sigmoid(z), rtol=0, atol=3e-16)


def test_the_steps_backprop_through_the_sigmoid_multiplies_by_h_times_one_minus_h():
    rng = np.random.default_rng(4)
    delta, h = rng.normal(size=(5, 3)), rng.uniform(0, 1, (5, 3))
    want = delta * h * (1.0 - h)
    times_sigmoid_slope(delta, h, np.empty_like(h))
    # h − h² rounds h² before the subtraction: near h = 1 that costs relative precision
    np.testing.assert_allclose(delta, want, rtol=1e-12)


@pytest.mark.parametrize("backend", ["cblas", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bound_gemm_is_alpha_op_a_op_b_plus_beta_c_on_the_arrays_memory(backend, dtype, monkeypatch):
    if backend == "numpy":
        monkeypatch.setattr(blas, "_CBLAS", None)
    elif blas._cblas() is None:
        pytest.skip("no cblas found beside numpy: the numpy fallback is what runs here")
    rng = np.random.default_rng(0)
    for trans_a in (False, True):
        for trans_b in (False, True):
            a = rng.normal(size=(4, 3) if trans_a else (3, 4)).astype(dtype)
            b = rng.normal(size=(5, 4) if trans_b else (4, 5)).astype(dtype)
            c = rng.normal(size=(3, 5)).astype(dtype)
            call = blas.bind(a, b, c, 0.25, 1.0, trans_a=trans_a, trans_b=trans_b)
            for _ in range(2):  # new values in the same arrays: the call sees them
                a[...] = rng.normal(size=a.shape)
                want = 0.25 * ((a.T if trans_a else a) @ (b.T if trans_b else b)) + c
                call()
                np.testing.assert_allclose(c, want, rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("backend", ["cblas", "numpy"])
def test_gemm_is_written_as_its_formula_with_t_for_a_transpose(backend, monkeypatch):
    if backend == "numpy":
        monkeypatch.setattr(blas, "_CBLAS", None)
    elif blas._cblas() is None:
        pytest.skip("no cblas found beside numpy: the numpy fallback is what runs here")
    rng = np.random.default_rng(2)
    h, d, w = rng.normal(size=(6, 4)), rng.normal(size=(6, 3)), rng.normal(size=(4, 3))
    G, G_bind = w.copy(), w.copy()
    blas.gemm(blas.T(h), d, out=G, alpha=0.5, beta=2.0)()  # G ← 2 G + ½ hᵀ d
    np.testing.assert_allclose(G, 2.0 * w + 0.5 * (h.T @ d), rtol=1e-12)
    blas.bind(h, d, G_bind, 0.5, 2.0, trans_a=True)()  # the same call in the BLAS's order: the same bits
    assert G.tobytes() == G_bind.tobytes()
    back = np.empty((6, 4))
    blas.gemm(d, blas.T(w), out=back)()  # back ← d wᵀ (β = 0: whatever back held is ignored)
    np.testing.assert_allclose(back, d @ w.T, rtol=1e-12)
    y = np.ones(5)
    blas.axpby(np.arange(5.0), out=y, alpha=0.5)()  # y ← y + ½ x
    np.testing.assert_array_equal(y, 1.0 + 0.5 * np.arange(5.0))


def test_bound_gemm_works_on_blocks_of_columns_and_refuses_strided_rows():
    if blas._cblas() is None:
        pytest.skip("no cblas found beside numpy")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 10)), rng.normal(size=(10, 8))
    c = np.zeros((6, 8))
    blas.bind(a[:, 2:7], b[3:8, 1:5], c[:, 4:8], 1.0, 0.0)()  # leading dimensions 10, 8, 8
    np.testing.assert_allclose(c[:, 4:8], a[:, 2:7] @ b[3:8, 1:5], rtol=1e-12)
    assert not c[:, :4].any()  # nothing outside the block was written
    with pytest.raises(ValueError, match="rows are contiguous"):
        blas.bind(a[:, ::2], b[:5], c, 1.0, 0.0)


def test_bound_gemm_refuses_shapes_that_do_not_multiply():
    if blas._cblas() is None:
        pytest.skip("no cblas found beside numpy")
    with pytest.raises(ValueError, match="shapes do not match"):
        blas.bind(np.zeros((3, 4)), np.zeros((5, 2)), np.zeros((3, 2)), 1.0, 0.0)


def test_a_workspace_refuses_parameters_it_was_not_made_for():
    params, _, y = random_problem((4,), n=7)
    images = np.zeros((7, 5), np.uint8)
    ws = Workspace(params, 7)
    other = [(W.copy(), b.copy()) for W, b in params]
    with pytest.raises(ValueError, match="other parameter arrays"):
        train_step(other, ws, images, np.arange(7), y - 0.5, np.empty((7, 1)), 0.1)
    train_step(params, ws, images, np.arange(7), y - 0.5, np.empty((7, 1)), 0.1)


def test_predict_proba_is_sigmoid_of_the_logit():
    params, x, _ = random_problem((3,))
    np.testing.assert_allclose(predict_proba(params, x), sigmoid(forward(params, x)[1]))


@pytest.mark.parametrize("hidden", [(), (4,), (6, 3, 4)], ids=["logreg", "1-hidden", "3-hidden"])
@pytest.mark.parametrize("biases", [False, True], ids=["weights", "weights+biases"])
def test_log_posterior_gradients_match_central_finite_differences(hidden, biases):
    params, x, y = random_problem(hidden)
    sd, share = 0.8, 7 / 40  # a batch of 7 of 40 training images
    grads = posterior_gradients(params, *forward(params, x), y, sd, biases, share)
    eps = 1e-6
    for layer, ((W, b), (dW, db)) in enumerate(zip(params, grads)):
        for arr, grad, name in ((W, dW, "W"), (b, db, "b")):
            numeric = np.zeros_like(arr)
            for i in np.ndindex(arr.shape):
                old = arr[i]
                arr[i] = old + eps
                up = log_posterior(params, x, y, sd, biases, share)
                arr[i] = old - eps
                down = log_posterior(params, x, y, sd, biases, share)
                arr[i] = old
                numeric[i] = (up - down) / (2 * eps)
            rel = np.linalg.norm(grad - numeric) / max(np.linalg.norm(grad) + np.linalg.norm(numeric), 1e-12)
            assert rel < 1e-6, f"{name}{layer + 1}: relative error {rel:.2e}"


def test_log_prior_is_the_gaussian_log_density():
    # one weight w = 2 with σ = 0.5 (and a bias 1, counted only when asked):
    #   log N(2; 0, 0.25) = −2²/(2·0.25) − log(0.5 √(2π)) = −8 − log(0.5) − ½ log(2π)
    params = [(np.array([[2.0]]), np.array([1.0]))]
    one = -8 - np.log(0.5) - 0.5 * np.log(2 * np.pi)
    assert log_prior(params, 0.5) == pytest.approx(one, rel=1e-15)
    assert log_prior(params, 0.5, biases=True) == pytest.approx(one + (-2 - np.log(0.5) - 0.5 * np.log(2 * np.pi)))
    x, y = np.array([[1.0]]), np.array([1.0])
    assert log_posterior(params, x, y, None, False, 0.5) == ll_of(params, x, y)
    assert log_posterior(params, x, y, 0.5, False, 0.25) == pytest.approx(ll_of(params, x, y) + 0.25 * one)
