"""Update rules: how a step of gradient ascent turns a gradient into new weights.

Each rule is a small class, after scikit-learn's neural_network/_stochastic_optimizers.py,
with two versions held equal by tests/test_optim.py:

- `reference(params, grads, state, lr, t)`: the rule as math on fresh arrays (the test
  oracle). `grads` is the gradient of the batch's log posterior,
  LL_batch + (m/N) log p(θ) (`model.posterior_gradients`); ascent: the step goes UP it.
- `bind(params, state, prior)`: the in-place version the hot loop runs (`Fast`). Its
  `layer(...)` gives one layer's update as calls bound once per batch size, like every
  product of step.py, each built (`blas.gemm`, `blas.axpby`) under the formula it
  computes; they read the layer's input h_prev and its δ = ∂LL/∂a, and add the prior's
  pull −(m/N) θ/σ² themselves (folded into the update GEMM's β for sgd). The numbers that
  change from step to step (η, the prior's share, Adam's bias corrections) live in ctypes
  scalars the bound calls read when they run: `begin(lr, m, t)` sets them.

State: each rule's named arrays shaped like the parameters (`slots`), zero at the start:
`state[slot]` is a list of (W, b)-shaped pairs like `params`; a checkpoint holds them as
`opt.<slot>.W1`, `opt.<slot>.b1`, ….

With g the gradient of the log posterior, η the learning rate and t = 1, 2, … the step:

  sgd        θ ← θ + η g
  momentum   v ← μ v + g;   θ ← θ + η v                    PyTorch's SGD(momentum=μ)
  nesterov   v ← μ v + g;   θ ← θ + η (g + μ v)            PyTorch's SGD(momentum=μ, nesterov=True)
  adam       m ← β₁ m + (1 − β₁) g;   v ← β₂ v + (1 − β₂) g²;
             θ ← θ + η m̂ / (√v̂ + ε),  m̂ = m / (1 − β₁ᵗ),  v̂ = v / (1 − β₂ᵗ)     PyTorch's Adam
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from mlecli.nn import blas
from mlecli.nn.model import Params

State = dict[str, list[tuple[np.ndarray, np.ndarray]]]  # slot → per layer (like W, like b)
Calls = tuple[blas.Call, ...]  # bound calls, run in order


@dataclass(frozen=True)
class Prior:
    """Independent N(0, σ²) on every weight (and every bias if `biases`), for a training
    set of `n` images. A batch of m images ascends LL_batch + (m/N) log p(θ): its share
    of the prior's pull on θ is −(m/N) θ/σ² = −decay(m) θ (docs/training.md derives it)."""

    sd: float
    biases: bool
    n: int

    def decay(self, m: int) -> float:
        return m / (self.n * self.sd * self.sd)


def state_names(slots: tuple[str, ...], n_layers: int) -> list[str]:
    """Checkpoint names of a rule's state arrays, in order: opt.<slot>.W1, opt.<slot>.b1, …"""
    return [f"opt.{slot}.{p}{i}" for slot in slots for i in range(1, n_layers + 1) for p in ("W", "b")]


class Rule:
    """An update rule: `reference` is the math, `bind` the fast in-place version."""

    name = ""
    slots: tuple[str, ...] = ()

    def init_state(self, params: Params) -> State:
        return {slot: [(np.zeros_like(W), np.zeros_like(b)) for W, b in params] for slot in self.slots}

    def reference(self, params: Params, grads: Params, state: State, lr: float, t: int) -> tuple[Params, State]:
        raise NotImplementedError

    def bind(self, params: Params, state: State, prior: Prior | None) -> Fast:
        raise NotImplementedError

    def to_arrays(self, state: State) -> dict[str, np.ndarray]:
        """The state as named arrays for a checkpoint."""
        out = {}
        for slot in self.slots:
            for i, (W, b) in enumerate(state[slot], start=1):
                out[f"opt.{slot}.W{i}"], out[f"opt.{slot}.b{i}"] = W, b
        return out

    def from_arrays(self, arrays: dict[str, np.ndarray], params: Params) -> State:
        """The state from a checkpoint's named arrays (copies); ValueError naming what is
        missing or mis-shaped."""
        state: State = {}
        for slot in self.slots:
            pairs = []
            for i, (W, b) in enumerate(params, start=1):
                pair = []
                for name, like in ((f"opt.{slot}.W{i}", W), (f"opt.{slot}.b{i}", b)):
                    arr = arrays.get(name)
                    if arr is None:
                        raise ValueError(f"the {self.name} state array {name} is missing")
                    if arr.shape != like.shape or arr.dtype != like.dtype:
                        raise ValueError(f"the {self.name} state array {name} is {arr.dtype} {arr.shape}, "
                                         f"the weights need {like.dtype} {like.shape}")
                    if not np.all(np.isfinite(arr)):
                        raise ValueError(f"the {self.name} state array {name} holds non-finite values")
                    pair.append(np.array(arr, copy=True))
                pairs.append((pair[0], pair[1]))
            state[slot] = pairs
        unexpected = sorted(set(arrays) - set(state_names(self.slots, len(params))))
        if unexpected:
            raise ValueError(f"arrays {', '.join(unexpected)} are not state of the {self.name} rule")
        return state


class Fast:
    """A rule bound to the arrays of one network (its weights and its state).

    `begin(lr, m, t)` sets the numbers of step t (a batch of m images, learning rate
    lr); `layer(layer, h_prev, delta, ones_row, alpha)` gives that layer's update for one
    batch size as a tuple of bound calls, run in order after the layer's δ is known. Each
    is built under the formula it computes, with the layer's gradient of the LL written
    as the products that make it,

        ∂LL/∂W = α h_prevᵀ δ,    ∂LL/∂b = 1ᵀ δ

    (α: the pixels' 1/255 for the first layer, 1 elsewhere; 1ᵀ = `ones_row`, (1, m)), and
    the prior's share of ∇ log p(θ), −(m/N) θ/σ² (`pull` = −m/(Nσ²)). A bias is bound as
    a row (1, n_l), so that its products are GEMMs like the weights'."""

    def __init__(self, params: Params, state: State, prior: Prior | None):
        self.params, self.state, self.prior = params, state, prior
        self.dtype = params[0][0].dtype
        self.eta = blas.scalar(self.dtype)  # η
        self.pull = blas.scalar(self.dtype)  # −m/(Nσ²): the prior's share of −θ/σ² is pull · θ
        self._eta_times: dict[float, blas.Scalar] = {}  # α → η·α
        # per layer: a buffer like W and like b for a gradient, and scratch for the
        # numpy fallback of the bound calls
        self.grad = [(np.empty_like(W), np.empty((1, len(b)), self.dtype)) for W, b in params]
        self.tmp = [(np.empty_like(W), np.empty((1, len(b)), self.dtype)) for W, b in params]

    def eta_times(self, alpha: float) -> blas.Scalar:
        """η·α, a scalar set by each `begin`."""
        if alpha not in self._eta_times:
            self._eta_times[alpha] = blas.scalar(self.dtype)
        return self._eta_times[alpha]

    def begin(self, lr: float, m: int, t: int) -> None:
        self.eta.value = lr
        for alpha, s in self._eta_times.items():
            s.value = lr * alpha
        if self.prior is not None:
            self.pull.value = -self.prior.decay(m)
        self._begin(lr, m, t)

    def _begin(self, lr: float, m: int, t: int) -> None:
        pass

    def layer(self, layer: int, h_prev: np.ndarray, delta: np.ndarray, ones_row: np.ndarray, alpha: float) -> Calls:
        raise NotImplementedError

    # Pieces the rules share.

    def _prior_on(self, which: str) -> bool:
        return self.prior is not None and (which == "W" or self.prior.biases)

    def _gradient_into(self, layer: int, h_prev, delta, ones_row, alpha, gW, gb, beta) -> Calls:
        """g ← β g + ∇θ [LL + (m/N) log p(θ)] for θ = W and b of the layer, into gW, gb
        (shaped like W and like b as a row): the gradient's GEMMs, then the prior's pull
        where it applies."""
        W, b = self.params[layer]
        tmp_W, tmp_b = self.tmp[layer]
        calls = [
            # gW ← β gW + α h_prevᵀ δ
            blas.gemm(blas.T(h_prev), delta, out=gW, alpha=alpha, beta=beta, scratch=tmp_W),
            # gb ← β gb + 1ᵀ δ
            blas.gemm(ones_row, delta, out=gb, alpha=1.0, beta=beta, scratch=tmp_b),
        ]
        if self._prior_on("W"):
            # gW ← gW − (m/N) W/σ²
            calls.append(blas.axpby(W, out=gW, alpha=self.pull, scratch=tmp_W))
        if self._prior_on("b"):
            # gb ← gb − (m/N) b/σ²
            calls.append(blas.axpby(b.reshape(1, -1), out=gb, alpha=self.pull, scratch=tmp_b))
        return tuple(calls)


# ---------------------------------------------------------------------------
# The rules


class Sgd(Rule):
    """θ ← θ + η g: today's plain gradient ascent."""

    name = "sgd"

    def reference(self, params, grads, state, lr, t):
        return [(W + lr * dW, b + lr * db) for (W, b), (dW, db) in zip(params, grads, strict=True)], state

    def bind(self, params, state, prior):
        return _SgdFast(params, state, prior)


class _SgdFast(Fast):
    """θ ← θ + η (∇LL − (m/N) θ/σ²) = keep · θ + η ∇LL, keep = 1 − η m/(Nσ²) (network2's
    `(1-eta*(lmbda/n))*w` for a summed LL): one GEMM per parameter, the prior its β, so it
    costs nothing; without a prior (or on a bias it does not cover) β = 1."""

    def __init__(self, params, state, prior):
        super().__init__(params, state, prior)
        self.keep = blas.scalar(self.dtype, 1.0)  # 1 − η m/(Nσ²)

    def _begin(self, lr, m, t):
        if self.prior is not None:
            self.keep.value = 1.0 - lr * self.prior.decay(m)

    def layer(self, layer, h_prev, delta, ones_row, alpha):
        W, b = self.params[layer]
        tmp_W, tmp_b = self.tmp[layer]
        keep_W = self.keep if self._prior_on("W") else 1.0
        keep_b = self.keep if self._prior_on("b") else 1.0
        return (
            # W ← keep W + η α h_prevᵀ δ
            blas.gemm(blas.T(h_prev), delta, out=W, alpha=self.eta_times(alpha), beta=keep_W, scratch=tmp_W),
            # b ← keep b + η 1ᵀ δ
            blas.gemm(ones_row, delta, out=b.reshape(1, -1), alpha=self.eta_times(1.0), beta=keep_b, scratch=tmp_b),
        )


class Momentum(Rule):
    """v ← μ v + g; θ ← θ + η v (heavy ball), or with `nesterov` θ ← θ + η (g + μ v):
    PyTorch's SGD(momentum=μ, nesterov=…, dampening=0)."""

    slots = ("velocity",)

    def __init__(self, mu: float, nesterov: bool = False):
        self.mu, self.nesterov = mu, nesterov
        self.name = "nesterov" if nesterov else "momentum"

    def reference(self, params, grads, state, lr, t):
        new_params, velocity = [], []
        for (W, b), (dW, db), (vW, vb) in zip(params, grads, state["velocity"], strict=True):
            vW, vb = self.mu * vW + dW, self.mu * vb + db
            if self.nesterov:
                new_params.append((W + lr * (dW + self.mu * vW), b + lr * (db + self.mu * vb)))
            else:
                new_params.append((W + lr * vW, b + lr * vb))
            velocity.append((vW, vb))
        return new_params, {"velocity": velocity}

    def bind(self, params, state, prior):
        return _MomentumFast(params, state, prior, self.mu, self.nesterov)


class _MomentumFast(Fast):
    """v ← μ v + g with g's GEMMs accumulating straight into v (their β = μ), then θ moves
    by axpy passes; nesterov's θ + η (g + μ v) as written below for each case."""

    def __init__(self, params, state, prior, mu, nesterov):
        super().__init__(params, state, prior)
        self.mu, self.nesterov = mu, nesterov
        self.eta_mu = blas.scalar(self.dtype)  # η μ (nesterov with a prior)
        self.minus_eta_mu = blas.scalar(self.dtype)  # −η μ (nesterov)
        self.eta_1_mu = blas.scalar(self.dtype)  # η (1 + μ) (nesterov)

    def _begin(self, lr, m, t):
        self.eta_mu.value = lr * self.mu
        self.minus_eta_mu.value = -lr * self.mu
        self.eta_1_mu.value = lr * (1.0 + self.mu)

    def layer(self, layer, h_prev, delta, ones_row, alpha):
        W, b = self.params[layer]
        vW, vb = self.state["velocity"][layer]
        vb, b = vb.reshape(1, -1), b.reshape(1, -1)  # rows, like the gradient's
        tmp_W, tmp_b = self.tmp[layer]
        if not self.nesterov:
            return (
                # v ← μ v + g
                *self._gradient_into(layer, h_prev, delta, ones_row, alpha, vW, vb, beta=self.mu),
                # θ ← θ + η v
                blas.axpby(vW, out=W, alpha=self.eta, scratch=tmp_W),
                blas.axpby(vb, out=b, alpha=self.eta, scratch=tmp_b),
            )
        if self.prior is not None:  # the prior's pull needs θ as it was: g into a buffer first
            gW, gb = self.grad[layer]
            return (
                # g ← ∇LL − (m/N) θ/σ²
                *self._gradient_into(layer, h_prev, delta, ones_row, alpha, gW, gb, beta=0.0),
                # v ← μ v + g
                blas.axpby(gW, out=vW, alpha=1.0, beta=self.mu, scratch=tmp_W),
                blas.axpby(gb, out=vb, alpha=1.0, beta=self.mu, scratch=tmp_b),
                # θ ← θ + η g + η μ v
                blas.axpby(gW, out=W, alpha=self.eta, scratch=tmp_W),
                blas.axpby(gb, out=b, alpha=self.eta, scratch=tmp_b),
                blas.axpby(vW, out=W, alpha=self.eta_mu, scratch=tmp_W),
                blas.axpby(vb, out=b, alpha=self.eta_mu, scratch=tmp_b),
            )
        # θ + η (g + μ v') with v' = μ v + g is θ − η μ v + η (1 + μ) v': the gradient goes
        # straight into v (the GEMMs' β = μ), with one pass over θ before and one after
        # (rather than g into a buffer and three passes)
        return (
            # θ ← θ − η μ v
            blas.axpby(vW, out=W, alpha=self.minus_eta_mu, scratch=tmp_W),
            blas.axpby(vb, out=b, alpha=self.minus_eta_mu, scratch=tmp_b),
            # v ← μ v + g
            *self._gradient_into(layer, h_prev, delta, ones_row, alpha, vW, vb, beta=self.mu),
            # θ ← θ + η (1 + μ) v
            blas.axpby(vW, out=W, alpha=self.eta_1_mu, scratch=tmp_W),
            blas.axpby(vb, out=b, alpha=self.eta_1_mu, scratch=tmp_b),
        )


class Adam(Rule):
    """Adam (Kingma & Ba 2015) as PyTorch's torch.optim.Adam computes it, for ascent."""

    name = "adam"
    slots = ("m", "v")

    def __init__(self, beta1: float, beta2: float, eps: float):
        self.beta1, self.beta2, self.eps = beta1, beta2, eps

    def reference(self, params, grads, state, lr, t):
        c1, c2 = 1.0 - self.beta1**t, 1.0 - self.beta2**t
        new_params, ms, vs = [], [], []
        for (W, b), (dW, db), (mW, mb), (vW, vb) in zip(params, grads, state["m"], state["v"], strict=True):
            pair = []
            for theta, g, m, v in ((W, dW, mW, vW), (b, db, mb, vb)):
                m = self.beta1 * m + (1 - self.beta1) * g
                v = self.beta2 * v + (1 - self.beta2) * g * g
                pair.append((theta + lr * (m / c1) / (np.sqrt(v / c2) + self.eps), m, v))
            (W2, mW2, vW2), (b2, mb2, vb2) = pair
            new_params.append((W2, b2))
            ms.append((mW2, mb2))
            vs.append((vW2, vb2))
        return new_params, {"m": ms, "v": vs}

    def bind(self, params, state, prior):
        return _AdamFast(params, state, prior, self.beta1, self.beta2, self.eps)


class _AdamFast(Fast):
    """η m̂/(√v̂ + ε) = (η √c₂ / c₁) · m / (√v + ε √c₂), c = 1 − βᵗ: one scalar for the step
    and one for ε, both set per step; the rest are passes over buffers (g's buffer is
    reused for g², then for m / (√v + ε̂)). scikit-learn's Adam takes the same step size
    but adds ε to √v unscaled, which is not PyTorch's value; ε √c₂ is."""

    def __init__(self, params, state, prior, beta1, beta2, eps):
        super().__init__(params, state, prior)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.step_size = blas.scalar(self.dtype)  # η √c₂ / c₁
        self.eps_hat = np.zeros((), self.dtype)  # ε √c₂ (a 0-d array numpy reads at each call)

    def _begin(self, lr, m, t):
        c1, c2 = 1.0 - self.beta1**t, 1.0 - self.beta2**t
        self.step_size.value = lr * math.sqrt(c2) / c1
        self.eps_hat[()] = self.eps * math.sqrt(c2)

    def layer(self, layer, h_prev, delta, ones_row, alpha):
        W, b = self.params[layer]
        gW, gb = self.grad[layer]
        tmp_W, tmp_b = self.tmp[layer]
        (mW, mb), (vW, vb) = self.state["m"][layer], self.state["v"][layer]
        # g ← ∇LL − (m/N) θ/σ²
        calls = list(self._gradient_into(layer, h_prev, delta, ones_row, alpha, gW, gb, beta=0.0))
        row = functools.partial(np.reshape, shape=(1, -1))
        for theta, g, m, v, tmp in ((W, gW, mW, vW, tmp_W), (row(b), gb, row(mb), row(vb), tmp_b)):
            calls += [
                blas.axpby(g, out=m, alpha=1.0 - self.beta1, beta=self.beta1, scratch=tmp),  # m ← β₁ m + (1 − β₁) g
                functools.partial(np.square, g, out=g),  # g²
                blas.axpby(g, out=v, alpha=1.0 - self.beta2, beta=self.beta2, scratch=tmp),  # v ← β₂ v + (1 − β₂) g²
                functools.partial(np.sqrt, v, out=g),  # √v
                functools.partial(np.add, g, self.eps_hat, out=g),  # √v + ε̂
                functools.partial(np.divide, m, g, out=g),  # m / (√v + ε̂)
                blas.axpby(g, out=theta, alpha=self.step_size, scratch=tmp),  # θ ← θ + step · m / (√v + ε̂)
            ]
        return tuple(calls)


RULES = ("sgd", "momentum", "nesterov", "adam")


def make(name: str, *, momentum: float = 0.9, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> Rule:
    """The rule called `name` (one of RULES) with its hyper-parameters."""
    if name == "sgd":
        return Sgd()
    if name in ("momentum", "nesterov"):
        return Momentum(momentum, nesterov=name == "nesterov")
    if name == "adam":
        return Adam(beta1, beta2, eps)
    raise ValueError(f"unknown update rule {name!r}")
