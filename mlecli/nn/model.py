"""The network and its gradient, as pure functions on arrays (no I/O, no state).

Shapes: a batch `x` is (B, n_0); layer l has weights `W` (n_{l-1}, n_l) and bias `b`
(n_l,); the output layer has n_L+1 = 1, so `z` is (B,). `params` is a list of (W, b)
pairs, hidden layers first, output layer last; no hidden layers = logistic regression.

    h_0 = x,   h_l = σ(h_{l-1} W_l + b_l),   z = h_L W_out + b_out,   ŷ = σ(z) = P(Y=1 | x)
    LL = Σ_i [ y_i log ŷ_i + (1 − y_i) log(1 − ŷ_i) ] = Σ_i [ y_i z_i − softplus(z_i) ]

These are the test oracle for the fast in-place step in `step.py` and the update
rules in `optim.py`.
"""

from __future__ import annotations

import numpy as np

Params = list[tuple[np.ndarray, np.ndarray]]


def sigmoid(z: np.ndarray) -> np.ndarray:
    """σ(z) = 1 / (1 + e^-z), written with tanh so that no |z| overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def softplus(z: np.ndarray) -> np.ndarray:
    """log(1 + e^z), stably."""
    return np.logaddexp(0.0, z)


def layer_sizes(n_inputs: int, hidden: tuple[int, ...] | list[int]) -> list[int]:
    return [n_inputs, *hidden, 1]


def init_params(sizes: list[int], rng: np.random.Generator, dtype=np.float32) -> Params:
    """Glorot/Xavier uniform weights U(±sqrt(6 / (fan_in + fan_out))), zero biases."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        W = rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(dtype)
        params.append((W, np.zeros(fan_out, dtype=dtype)))
    return params


def forward(params: Params, x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Return the activations [h_0 = x, h_1, …, h_L] and the output logits z (B,)."""
    hs = [x]
    for W, b in params[:-1]:
        hs.append(sigmoid(hs[-1] @ W + b))
    W, b = params[-1]
    z = (hs[-1] @ W + b)[:, 0]
    return hs, z


def log_likelihood_terms(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """LL_i = y_i z_i − softplus(z_i): log P(y_i | x_i), finite for any finite z."""
    return y * z - softplus(z)


def log_likelihood(z: np.ndarray, y: np.ndarray) -> float:
    """The batch log-likelihood: a SUM over its examples, not a mean."""
    return float(np.sum(log_likelihood_terms(z, y)))


def gradients(params: Params, hs: list[np.ndarray], z: np.ndarray, y: np.ndarray) -> Params:
    """∇LL by the chain rule, layer by layer from the output back.

    ∂LL/∂z_i = y_i − ŷ_i;  δ_l = (δ_{l+1} W_{l+1}ᵀ) ⊙ h_l (1 − h_l);
    ∂LL/∂W_l = h_{l−1}ᵀ δ_l;  ∂LL/∂b_l = Σ_i δ_l,i.  Returns (dW, db) pairs like `params`.
    """
    delta = (y - sigmoid(z))[:, None]  # (B, 1)
    grads: Params = []
    for layer in range(len(params) - 1, -1, -1):
        W, _ = params[layer]
        h_prev = hs[layer]
        grads.append((h_prev.T @ delta, delta.sum(axis=0)))
        if layer > 0:
            delta = (delta @ W.T) * h_prev * (1.0 - h_prev)
    return grads[::-1]


def ascent_step(params: Params, grads: Params, learning_rate: float) -> Params:
    """θ ← θ + η ∇θ LL: a step UP the log-likelihood."""
    return [(W + learning_rate * dW, b + learning_rate * db) for (W, b), (dW, db) in zip(params, grads)]


def predict_proba(params: Params, x: np.ndarray) -> np.ndarray:
    """ŷ = P(Y=1 | x) for each row of x."""
    return sigmoid(forward(params, x)[1])


# ---------------------------------------------------------------------------
# A Gaussian prior on the weights, and the log posterior (maximum a posteriori)
#
#     log p(θ) = Σ_w [ −w²/(2σ²) − log(σ √(2π)) ]   over the weights (and the biases if asked)
#     log p(θ | D) = LL(D) + log p(θ) − log p(D)
#
# The LL is a sum over the N training images; a batch of m of them ascends
# LL_batch + (m/N) log p(θ), so that one pass over the data ascends the whole log posterior.


def log_prior(params: Params, sd: float, biases: bool = False) -> float:
    """log p(θ) for independent N(0, sd²) on every weight (and bias if `biases`)."""
    arrays = [W for W, _ in params] + ([b for _, b in params] if biases else [])
    count = sum(a.size for a in arrays)
    squares = sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)
    return -squares / (2 * sd * sd) - count * (np.log(sd) + 0.5 * np.log(2 * np.pi))


def prior_gradients(params: Params, sd: float, biases: bool = False) -> Params:
    """∇θ log p(θ) = −θ/σ² (zero for the biases unless `biases`)."""
    return [(-W / (sd * sd), -b / (sd * sd) if biases else np.zeros_like(b)) for W, b in params]


def log_posterior(params: Params, x: np.ndarray, y: np.ndarray, sd: float | None, biases: bool, share: float) -> float:
    """LL_batch + share · log p(θ), the objective of one batch (share = m/N); sd None: no prior."""
    ll = log_likelihood(forward(params, x)[1], y)
    return ll if sd is None else ll + share * log_prior(params, sd, biases)


def posterior_gradients(
    params: Params, hs: list[np.ndarray], z: np.ndarray, y: np.ndarray, sd: float | None, biases: bool, share: float
) -> Params:
    """∇θ [LL_batch + share · log p(θ)]: `gradients` plus share × `prior_gradients`."""
    grads = gradients(params, hs, z, y)
    if sd is None:
        return grads
    return [(dW + share * pW, db + share * pb)
            for (dW, db), (pW, pb) in zip(grads, prior_gradients(params, sd, biases), strict=True)]
