"""One batch of gradient ascent, in place, as fast as numpy and its BLAS allow.

`train_step` is the hot loop of `mlecli train`: the math of model.py (the forward pass,
δ = y − σ(z) at the output, backpropagation through the sigmoids) and the update rules of
optim.py, with every matrix product a BLAS call bound once to preallocated buffers. Each
layer's `LayerPlan` holds its forward product, its backward product and its update side by
side, each built from the formula written above it; docs/design.md ("From the derivation to
the code") walks from each line of the math to the line here that runs it. The tests hold
it equal to model.py up to rounding; benchmarks/bench_train.py measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    slope[l] (B, n_{l+1}) per hidden layer (its output, its δ, scratch for h (1 − h)); z
    and delta_out (B, 1) for the output; ones (B, 1) for the bias products; with shifted
    digits (`shift` = k > 0, images H×W = `image_shape`) pad (B, (H+2k)(W+2k)) uint8 and
    its windows (B, 2k+1, 2k+1, H, W).
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
        self.slope = [np.empty((batch, n), dtype) for n in hidden]
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


# ---------------------------------------------------------------------------
# The arithmetic between the products, each a named piece of the math (model.py)


def sigmoid_of_half(half_a: np.ndarray) -> None:
    """h = σ(a) = ½ + ½ tanh(a/2), in place on a/2 (what a hidden layer's forward GEMMs
    leave): the bits of model.sigmoid(a), since halving and doubling are exact."""
    np.tanh(half_a, out=half_a)
    half_a *= 0.5
    half_a += 0.5


def output_delta(half_z: np.ndarray, target: np.ndarray, delta: np.ndarray) -> None:
    """The output layer's δ = ∂LL/∂z, for one logistic unit: y − σ(z) = (y − ½) − ½ tanh(z/2),
    into `delta` (m, 1) from z/2 (what the output layer's forward GEMMs leave) and
    target = y − ½ (m, 1). The one place the output's likelihood enters the step: a
    softmax output over K classes replaces it (δ = Y − softmax(z), the same ∂LL/∂z = y − ŷ)."""
    np.tanh(half_z, out=delta)
    delta *= -0.5
    delta += target


def times_sigmoid_slope(delta: np.ndarray, h: np.ndarray, slope: np.ndarray) -> None:
    """δ ← δ ⊙ σ'(a) = δ ⊙ h (1 − h), through a hidden layer's sigmoid (h = σ(a));
    h (1 − h) as h − h² into `slope` (np.square has the bits of h · h, at twice the speed)."""
    np.square(h, out=slope)
    np.subtract(h, slope, out=slope)
    delta *= slope


@dataclass(slots=True)
class LayerPlan:
    """One layer of a batch of m rows, bound once: its forward products, its backward
    product and its update side by side (as micrograd keeps each operation next to its
    derivative). The arrays are views of the Workspace; the calls are bound BLAS products
    (blas.gemm), each built in Plan from the formula in its comment.

    forward:  a = h_prev W + b, computed as a/2 (`add_bias`, `add_product`); for a hidden
              layer then h = σ(a) in place, the next layer's h_prev.
    backward: δ_prev = (δ Wᵀ) ⊙ h_prev (1 − h_prev), the δ of the layer below (`back`,
              then `times_sigmoid_slope`), with W as it was before this step's update.
    update:   the rule's calls (optim.py), from ∂LL/∂W = α h_prevᵀ δ and ∂LL/∂b = 1ᵀ δ
              (α = 1/255 for the first layer, whose h_prev is the pixels 0-255; else 1).
    """

    h_prev: np.ndarray  # (m, n_{l-1}): the layer's input
    out: np.ndarray  # (m, n_l): a/2, then h = σ(a) for a hidden layer; z/2 for the output layer
    hidden: bool
    add_bias: blas.Call  # a/2 ← ½ 1 bᵀ
    add_product: blas.Call  # a/2 ← a/2 + (α/2) h_prev W
    back: blas.Call | None  # δ_prev ← δ Wᵀ (None for the first layer: ∂LL/∂x is never needed)
    prev_delta: np.ndarray | None  # (m, n_{l-1}): δ of the layer below
    slope: np.ndarray | None  # (m, n_{l-1}): scratch for h_prev (1 − h_prev)
    update: optim.Calls  # W ← …, b ← … as the rule says

    def forward(self) -> None:
        self.add_bias()
        self.add_product()
        if self.hidden:
            sigmoid_of_half(self.out)

    def backward(self) -> None:
        """δ of the layer below, then this layer's update (in that order: δ_prev needs
        W as it was)."""
        if self.back is not None:
            self.back()
            times_sigmoid_slope(self.prev_delta, self.h_prev, self.slope)
        for call in self.update:
            call()


class Plan:
    """A batch of m rows: views of the workspace, and each layer's `LayerPlan`."""

    def __init__(self, ws: Workspace, m: int):
        params = ws.arrays
        last = len(params) - 1
        self.xu, self.x = ws.xu[:m], ws.x[:m]
        if ws.pad is not None:
            self.pad, self.windows, self.rows = ws.pad[:m], ws.windows[:m], np.arange(m)
        self.z, self.delta_out = ws.z[:m], ws.delta_out[:m]
        outs = [h[:m] for h in ws.h] + [self.z]  # each layer's a/2 (then h), the output's z/2
        ins = [self.x, *outs[:-1]]  # each layer's h_prev
        deltas = [d[:m] for d in ws.delta] + [self.delta_out]
        ones = ws.ones[:m]  # 1 (m, 1): the bias broadcast down the rows
        ones_row = ones.reshape(1, -1)  # 1ᵀ (1, m): the bias gradient's sum over the rows
        self.layers: list[LayerPlan] = []
        for layer, (W, b) in enumerate(params):
            h_prev, a, delta = ins[layer], outs[layer], deltas[layer]
            alpha = PIXEL_SCALE if layer == 0 else 1.0  # x = pixels/255, the 1/255 taken in the products
            back = prev_delta = slope = None
            if layer > 0:
                prev_delta, slope = deltas[layer - 1], ws.slope[layer - 1][:m]
                # δ_prev ← δ Wᵀ (with one output unit an outer product: 3x faster by the BLAS than numpy)
                back = blas.gemm(delta, blas.T(W), out=prev_delta)
            self.layers.append(LayerPlan(
                h_prev=h_prev,
                out=a,
                hidden=layer < last,
                # Every layer's GEMMs compute half its pre-activation, a/2 (z/2 at the output):
                # all that σ(a) = ½ + ½ tanh(a/2) (sigmoid_of_half) and output_delta need.
                # a/2 ← ½ 1 bᵀ (a K=1 GEMM: the bits of numpy's broadcast, 2-3x faster)
                add_bias=blas.gemm(ones, b.reshape(1, -1), out=a, alpha=0.5),
                # a/2 ← a/2 + (α/2) h_prev W
                add_product=blas.gemm(h_prev, W, out=a, alpha=0.5 * alpha, beta=1.0),
                back=back,
                prev_delta=prev_delta,
                slope=slope,
                update=ws.fast.layer(layer, h_prev, delta, ones_row, alpha),
            ))
        self.backward = self.layers[::-1]

    def gather(self, images: np.ndarray, idx: np.ndarray, offsets: tuple[np.ndarray, np.ndarray] | None) -> None:
        """h_0 = x: the batch's pixels as floats 0-255 (exact; the 1/255 is the first
        layer's α)."""
        if offsets is None:
            # mode="clip": with out= and the default mode="raise", numpy gathers into a
            # temporary buffer first and copies it over (twice the time); idx is a slice of
            # a permutation of range(len(images)), so there is nothing to clip.
            np.take(images, idx, axis=0, out=self.xu, mode="clip")
            np.copyto(self.x, self.xu)
        else:
            # Shifted digits: gather the padded images whole (contiguous rows, as above: a
            # fancy index into all n images' windows would touch 28-byte pieces all over
            # memory, 3x slower), then cut each one's window out of that small block while
            # converting to floats.
            np.take(images, idx, axis=0, out=self.pad, mode="clip")
            np.copyto(self.x, self.windows[self.rows, offsets[0], offsets[1]].reshape(len(idx), -1))


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
    flattened): image idx[i] is the H×W window at (oy[i], ox[i]) of its padded copy.
    `idx` valid row numbers (not checked: a slice of the epoch's permutation);
    `target` (m,) = y − ½ for the batch's targets y; `z` (m, 1) receives the batch's
    logits before the step (the caller measures LL and accuracy from them, many batches
    at a time).

    The math of model.forward, model.posterior_gradients and the rule's `reference` (the
    tests hold them equal up to rounding), each layer's products bound once (`Plan`), with
    the pixels' 1/255 and the halving that σ(a) = ½ + ½ tanh(a/2) needs taken inside the
    GEMMs, and the update done inside the gradient's GEMM where the rule allows
    (docs/design.md, "The hot loop" and "From the derivation to the code").
    """
    plan = ws.plan(params, len(idx))
    ws.fast.begin(lr, len(idx), t)  # η, the prior's share m/N, Adam's corrections: this step's numbers
    plan.gather(images, idx, offsets)  # h_0 = x
    for layer in plan.layers:  # forward: h_l = σ(h_{l−1} W_l + b_l), then z/2 at the output
        layer.forward()
    output_delta(plan.z, target[:, None], plan.delta_out)  # δ = ∂LL/∂z = y − σ(z)
    np.multiply(plan.z, 2.0, out=z)  # z, for the caller's LL and accuracy
    for layer in plan.backward:  # backward, from the output: δ_prev, then the layer's update
        layer.backward()


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
