"""One batch of gradient ascent, in place, as fast as numpy and its BLAS allow.

`train_step` is the hot loop of `mlecli train`: the math of model.py and of the update
rules of optim.py (the tests hold them equal up to rounding) with every product written
into preallocated buffers, pixel scaling folded into the first layer's GEMMs, and the
updates done inside GEMMs and BLAS vector calls. benchmarks/bench_train.py measures it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mlecli.nn import blas, optim
from mlecli.nn.metrics import total_log_likelihood
from mlecli.nn.model import Params
from mlecli.nn.pixels import image_scores, windows


class Workspace:
    """Buffers for batches of up to `batch` rows of `params`, the update rule bound to
    them (`fast`, plain sgd when none is given), and for each batch size met so far a
    `Plan` bound to them; a smaller batch uses the buffers' first rows.

    xu (B, n_0) uint8 and x (B, n_0) the batch's pixels as floats 0-255; h[l], delta[l],
    hprime[l] (B, n_{l+1}) per hidden layer; z and delta_out (B, 1); ones (B, 1) for
    the bias products; with shifted digits (`shift` = k > 0, images H×W = `image_shape`)
    pad (B, (H+2k)(W+2k)) uint8 and its windows (B, 2k+1, 2k+1, H, W).
    """

    def __init__(self, params: Params, batch: int, fast: optim.Fast | None = None, shift: int = 0,
                 image_shape: tuple[int, int] | None = None):
        dtype = params[0][0].dtype
        hidden = [W.shape[1] for W, _ in params[:-1]]
        self.arrays = [(W, b) for W, b in params]  # what the plans are bound to
        self.fast = fast if fast is not None else optim.Sgd().bind(self.arrays, {}, None)
        if self.fast.params is not params and any(
            W is not W0 or b is not b0 for (W, b), (W0, b0) in zip(params, self.fast.params, strict=True)
        ):
            raise ValueError("the update rule was bound to other parameter arrays")
        self.xu = np.empty((batch, params[0][0].shape[0]), np.uint8)
        self.x = np.empty((batch, params[0][0].shape[0]), dtype)
        self.h = [np.empty((batch, n), dtype) for n in hidden]
        self.delta = [np.empty((batch, n), dtype) for n in hidden]
        self.hprime = [np.empty((batch, n), dtype) for n in hidden]
        self.z = np.empty((batch, 1), dtype)
        self.delta_out = np.empty((batch, 1), dtype)
        self.ones = np.ones((batch, 1), dtype)
        self.pad = self.windows = None
        if shift:  # shifted digits: the batch's padded images as gathered, and their H×W windows
            H, W = image_shape
            self.pad = np.empty((batch, (H + 2 * shift) * (W + 2 * shift)), np.uint8)
            self.windows = windows(self.pad.reshape(batch, H + 2 * shift, W + 2 * shift), (H, W))
        self.plans: dict[int, Plan] = {}

    def plan(self, params: Params, m: int) -> Plan:
        """The plan for a batch of m rows of these very arrays (checked: the plan's
        products are bound to their memory)."""
        if len(params) != len(self.arrays) or any(
            W is not W0 or b is not b0 for (W, b), (W0, b0) in zip(params, self.arrays, strict=True)
        ):
            raise ValueError("this Workspace was made for other parameter arrays")
        plan = self.plans.get(m)
        if plan is None:
            plan = self.plans[m] = Plan(self, m)
        return plan


@dataclass(slots=True)
class LayerPlan:
    """One layer of a batch of m rows, bound once: its forward products, its backward
    product and its update, side by side (a micrograd-style pairing of each forward with
    its derivative).

    Forward: `start` sets a ← b/2 (a K=1 GEMM: the same bits as numpy's broadcast, 2-3x
    faster), `forward` adds (α/2) h_prev W; for a hidden layer the step then turns a into
    h = σ(2a) in place. Backward: `back` (None for the first layer) gives
    δ_prev ← δ Wᵀ with W as it was before this step, and the step multiplies it by
    h_prev (1 − h_prev) (`hprime` its buffer). `update`: the rule's calls for W and b.
    """

    start: Callable[[], None]
    forward: Callable[[], None]
    out: np.ndarray  # (m, n_l): a, then h for a hidden layer; z/2 for the output
    hidden: bool
    back: Callable[[], None] | None
    h_prev: np.ndarray  # (m, n_{l-1}): the layer's input
    hprime: np.ndarray | None  # (m, n_{l-1}) for h_prev (1 − h_prev)
    prev_delta: np.ndarray | None  # (m, n_{l-1}): δ of the layer below
    update: tuple[Callable[[], None], ...]


class Plan:
    """A batch of m rows: views of the workspace and each layer's `LayerPlan`."""

    def __init__(self, ws: Workspace, m: int):
        params = ws.arrays
        last = len(params) - 1
        self.xu, self.x = ws.xu[:m], ws.x[:m]
        if ws.pad is not None:
            self.pad, self.windows, self.rows = ws.pad[:m], ws.windows[:m], np.arange(m)
        self.z, self.delta_out = ws.z[:m], ws.delta_out[:m]
        outs = [h[:m] for h in ws.h] + [self.z]  # each layer's pre-activation, then output
        ins = [self.x, *outs[:-1]]  # h_prev of each layer
        deltas = [d[:m] for d in ws.delta] + [self.delta_out]
        ones = ws.ones[:m]  # (m, 1)
        self.layers: list[LayerPlan] = []
        for layer, (W, b) in enumerate(params):
            scale = PIXEL_SCALE if layer == 0 else 1.0
            back = hprime = prev_delta = None
            if layer > 0:  # with one output unit, an outer product: 3x faster by the BLAS than numpy
                hprime, prev_delta = ws.hprime[layer - 1][:m], deltas[layer - 1]
                back = blas.bind(deltas[layer], W, prev_delta, 1.0, 0.0, trans_b=True)
            self.layers.append(LayerPlan(
                start=blas.bind(ones, b.reshape(1, -1), outs[layer], 0.5, 0.0),
                forward=blas.bind(ins[layer], W, outs[layer], 0.5 * scale, 1.0),
                out=outs[layer],
                hidden=layer < last,
                back=back,
                h_prev=ins[layer],
                hprime=hprime,
                prev_delta=prev_delta,
                update=ws.fast.layer(layer, ins[layer], deltas[layer], ones, scale),
            ))
        self.backward = self.layers[::-1]


PIXEL_SCALE = 1.0 / 255.0
# Batches between measurements of the logits (LL, accuracy, finiteness): fewer small
# numpy calls per batch; a non-finite LL is still found within this many batches.
MEASURE_EVERY = 16


def train_step(
    params: Params,
    ws: Workspace,
    images: np.ndarray,
    idx: np.ndarray,
    target: np.ndarray,
    z: np.ndarray,
    lr: float,
    t: int = 1,
    offsets: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Step t (1, 2, …) of the update rule at learning rate lr, on the batch images[idx],
    updating `params` (and the rule's state) in place.

    `images` (n, n_0) uint8; or, with `offsets` = (oy, ox) (m,) each and a Workspace made
    with that shift k, the padded images (n, (H+2k)(W+2k)) (`pixels.pad_images`, rows
    flattened): image idx[i] is the H×W window at (oy[i], ox[i]) of its padded copy. `idx` valid row numbers (not checked: a slice of the epoch's permutation);
    `target` (m,) = y − ½ for the batch's targets y; `z` (m, 1) receives the batch's
    logits before the step (the caller measures LL and accuracy from them, many batches
    at a time).

    Same math as model.forward / model.posterior_gradients and the rule's `reference`
    (the tests hold them equal up to rounding), reordered for speed:
    - x = pixels / 255 is never formed: the first layer's GEMMs take the pixels as they
      are, with α = 1/255;
    - biases enter the forward GEMMs as their β = 1 starting value, and each product of
      the update (sgd: W ← β W + η h_prevᵀ δ, with β = 1 − η m/(Nσ²) under a prior, else 1)
      happens inside a GEMM;
    - the small products (bias broadcast, bias sums, the outer product δ w₂ᵀ) are
      GEMMs too: each is one call, 2-4x faster than numpy's broadcasting and reductions;
    - σ(a) = ½ + ½ tanh(a/2) and y − σ(z) = (y − ½) − ½ tanh(z/2) need only a/2 and z/2,
      so the forward GEMMs compute those (α/2, bias/2): halving is exact in binary
      floating point, so the bits are those of halving afterwards, one pass fewer per layer;
    - every product is bound once per batch size (`Plan`), so a batch costs no argument
      conversion; η and the rule's other per-step numbers are scalars the bound calls
      read (`ws.fast.begin`).
    """
    plan = ws.plan(params, len(idx))
    ws.fast.begin(lr, len(idx), t)
    if offsets is None:
        # mode="clip": with out= and the default mode="raise", numpy gathers into a
        # temporary buffer first and copies it over (twice the time); idx is a slice of
        # a permutation of range(len(images)), so there is nothing to clip.
        np.take(images, idx, axis=0, out=plan.xu, mode="clip")
        np.copyto(plan.x, plan.xu)
    else:
        # Shifted digits: gather the padded images whole (contiguous rows, as above: a
        # fancy index into all n images' windows would touch 28-byte pieces all over
        # memory, 3x slower), then cut each one's window out of that small block while
        # converting to floats.
        np.take(images, idx, axis=0, out=plan.pad, mode="clip")
        np.copyto(plan.x, plan.windows[plan.rows, offsets[0], offsets[1]].reshape(len(idx), -1))
    for layer in plan.layers:
        layer.start()
        layer.forward()  # a = (h_prev W + b) / 2
        if layer.hidden:  # h = σ(2a) = ½ + ½ tanh(a), bit-equal to model.sigmoid
            a = layer.out
            np.tanh(a, out=a)
            a *= 0.5
            a += 0.5
    delta = plan.delta_out
    np.tanh(plan.z, out=delta)  # plan.z holds z/2
    np.multiply(plan.z, 2.0, out=z)
    delta *= -0.5
    delta += target[:, None]  # δ = ∂LL/∂z = y − σ(z)
    for layer in plan.backward:
        if layer.back is not None:
            # δ_prev = (δ Wᵀ) ⊙ h_prev (1 − h_prev), with W as it was before this step
            layer.back()
            hp = layer.hprime
            np.square(layer.h_prev, out=hp)  # the same bits as h_prev * h_prev, at twice the speed
            np.subtract(layer.h_prev, hp, out=hp)
            layer.prev_delta *= hp
        for call in layer.update:
            call()


class Tally:
    """Log-likelihood and accuracy of an epoch's batches, summed from their logits."""

    def __init__(self, ll: float = 0.0, correct: int = 0, seen: int = 0):
        self.ll, self.correct, self.seen = ll, correct, seen

    @classmethod
    def of(cls, z: np.ndarray, y: np.ndarray) -> Tally:
        """The tally of logits z for targets y."""
        return cls(total_log_likelihood(z, y), int(np.count_nonzero((z >= 0) == (y > 0.5))), len(y))  # ŷ ≥ ½ ⇔ z ≥ 0

    def add(self, other: Tally) -> None:
        self.ll += other.ll
        self.correct += other.correct
        self.seen += other.seen


# ---------------------------------------------------------------------------
# Measuring a whole split (validation, each epoch)


def ll_and_accuracy(params: Params, images: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean log-likelihood per image, accuracy at ŷ = 0.5) of uint8 images (n, H, W)."""
    z = image_scores(params, images)
    return total_log_likelihood(z, y) / len(y), float(np.mean((z >= 0) == (y == 1)))


def blas_threads(batch_size: int) -> int | None:
    """BLAS threads for the hot loop: one for small batches, where handing each small
    GEMM to a second core costs more than it saves (benchmarks/README.md has the
    measurements); None: the BLAS's own default."""
    return 1 if batch_size <= 64 else None
