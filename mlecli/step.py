"""One batch of gradient ascent, in place, as fast as numpy and its BLAS allow.

`train_step` is the hot loop of `mlecli train`: the math of model.py (the tests hold
the two equal up to rounding) with every product written into preallocated buffers,
η folded into ∂LL/∂z, pixel scaling folded into the first layer's GEMMs, and the
weight updates done inside the GEMMs. benchmarks/bench_train.py measures it.
"""

from __future__ import annotations

import numpy as np

from mlecli import blas
from mlecli.metrics import total_log_likelihood
from mlecli.model import Params
from mlecli.task import image_scores


class Workspace:
    """Buffers for batches of up to `batch` rows of `params`, and for each batch size
    met so far a `_Plan` bound to them; a smaller batch uses the buffers' first rows.

    xu (B, n_0) uint8 and x (B, n_0) the batch's pixels as floats 0-255; h[l], delta[l],
    hprime[l] (B, n_{l+1}) per hidden layer; z and delta_out (B, 1); ones (B, 1) for
    the bias products; scratch like each W and b for the numpy fallback of blas.bind.
    """

    def __init__(self, params: Params, batch: int):
        dtype = params[0][0].dtype
        hidden = [W.shape[1] for W, _ in params[:-1]]
        self.arrays = [(W, b) for W, b in params]  # what the plans are bound to
        self.xu = np.empty((batch, params[0][0].shape[0]), np.uint8)
        self.x = np.empty((batch, params[0][0].shape[0]), dtype)
        self.h = [np.empty((batch, n), dtype) for n in hidden]
        self.delta = [np.empty((batch, n), dtype) for n in hidden]
        self.hprime = [np.empty((batch, n), dtype) for n in hidden]
        self.z = np.empty((batch, 1), dtype)
        self.delta_out = np.empty((batch, 1), dtype)
        self.ones = np.ones((batch, 1), dtype)
        self.scratch = [np.empty_like(W) for W, _ in params]
        self.scratch_b = [np.empty((1, len(b)), dtype) for _, b in params]
        self.plans: dict[int, _Plan] = {}

    def plan(self, params: Params, m: int) -> _Plan:
        """The plan for a batch of m rows of these very arrays (checked: the plan's
        products are bound to their memory)."""
        if len(params) != len(self.arrays) or any(
            W is not W0 or b is not b0 for (W, b), (W0, b0) in zip(params, self.arrays, strict=True)
        ):
            raise ValueError("this Workspace was made for other parameter arrays")
        plan = self.plans.get(m)
        if plan is None:
            plan = self.plans[m] = _Plan(self, m)
        return plan


class _Plan:
    """A batch of m rows: views of the workspace and its matrix products, bound once."""

    def __init__(self, ws: Workspace, m: int):
        params = ws.arrays
        last = len(params) - 1
        self.xu, self.x = ws.xu[:m], ws.x[:m]
        self.z, self.delta_out = ws.z[:m], ws.delta_out[:m]
        outs = [h[:m] for h in ws.h] + [self.z]  # each layer's pre-activation, then output
        ins = [self.x, *outs[:-1]]  # h_prev of each layer
        deltas = [d[:m] for d in ws.delta] + [self.delta_out]
        ones = ws.ones[:m]  # (m, 1)
        self.forward, self.backward = [], []
        for layer, (W, b) in enumerate(params):
            scale = PIXEL_SCALE if layer == 0 else 1.0
            b_row = b.reshape(1, -1)
            # Every layer's forward products give half its pre-activation (see train_step):
            # a ← 1·(b/2) (a K=1 GEMM: the same bits as numpy's broadcast, 2-3x faster),
            # then a ← a + (α/2) h_prev W.
            start = blas.bind(ones, b_row, outs[layer], 0.5, 0.0)
            forward = blas.bind(ins[layer], W, outs[layer], 0.5 * scale, 1.0)
            self.forward.append((start, forward, outs[layer], layer < last))
            # W ← W + α h_prevᵀ (η δ) and b ← b + 1ᵀ (η δ), inside GEMMs with β = 1
            update = blas.bind(ins[layer], deltas[layer], W, scale, 1.0, trans_a=True, scratch=ws.scratch[layer])
            update_b = blas.bind(ones.reshape(1, -1), deltas[layer], b_row, 1.0, 1.0, scratch=ws.scratch_b[layer])
            # δ_prev ← δ Wᵀ, with W as it was before this step; with one output unit, an
            # outer product, which the BLAS does 3x faster than numpy's broadcasting multiply
            back = None
            if layer > 0:
                back = (blas.bind(deltas[layer], W, deltas[layer - 1], 1.0, 0.0, trans_b=True),
                        ins[layer], ws.hprime[layer - 1][:m], deltas[layer - 1])
            self.backward.insert(0, (back, update, update_b))


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
) -> None:
    """One ascent step on the batch images[idx], updating `params` in place.

    `images` (n, n_0) uint8; `idx` valid row numbers (not checked: a slice of the
    epoch's permutation); `target` (m,) = η (y − ½) for the batch's targets y;
    `z` (m, 1) receives the batch's logits before the step (the caller measures LL and
    accuracy from them, many batches at a time).

    Same math as model.forward / model.gradients / model.ascent_step (the tests hold
    them equal up to rounding), reordered for speed:
    - x = pixels / 255 is never formed: the first layer's GEMMs take the pixels as they
      are and α = 1/255;
    - η multiplies ∂LL/∂z once, η (y − σ(z)) = η (y − ½) − (η/2) tanh(z/2), so every δ
      below already carries it;
    - biases enter the forward GEMMs as their β = 1 starting value, and the updates
      W ← W + h_prevᵀ (η δ) and b ← b + 1ᵀ (η δ) happen inside GEMMs with β = 1;
    - the small products (bias broadcast, bias sums, the outer product δ w₂ᵀ) are
      GEMMs too: each is one call, 2-4x faster than numpy's broadcasting and reductions;
    - σ(a) = ½ + ½ tanh(a/2) and η (y − σ(z)) need only a/2 and z/2, so the forward
      GEMMs compute those (α/2, bias/2): halving is exact in binary floating point, so
      the bits are those of halving afterwards, one pass fewer per layer;
    - every product is bound once per batch size (`_Plan`), so a batch costs no
      argument conversion.
    """
    plan = ws.plan(params, len(idx))
    # mode="clip": with out= and the default mode="raise", numpy gathers into a temporary
    # buffer first and copies it over (twice the time); idx is a slice of a permutation of
    # range(len(images)), so there is nothing to clip.
    np.take(images, idx, axis=0, out=plan.xu, mode="clip")
    np.copyto(plan.x, plan.xu)
    for start, forward, a, hidden in plan.forward:
        start()
        forward()  # a = (h_prev W + b) / 2
        if hidden:  # h = σ(2a) = ½ + ½ tanh(a), bit-equal to model.sigmoid
            np.tanh(a, out=a)
            a *= 0.5
            a += 0.5
    delta = plan.delta_out
    np.tanh(plan.z, out=delta)  # plan.z holds z/2
    np.multiply(plan.z, 2.0, out=z)
    delta *= -0.5 * lr
    delta += target[:, None]
    for back, update, update_b in plan.backward:
        if back is not None:
            # δ_prev = (δ Wᵀ) ⊙ h_prev (1 − h_prev), with W as it was before this step
            outer, h_prev, hp, prev_delta = back
            outer()
            np.square(h_prev, out=hp)  # the same bits as h_prev * h_prev, at twice the speed
            np.subtract(h_prev, hp, out=hp)
            prev_delta *= hp
        update()
        update_b()


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
    GEMM to a second core costs more than it saves (measured with
    benchmarks/bench_train.py: 784-128-1 at batch 32 runs an epoch in 0.38 s on one
    thread, 0.54 s on two; at 512, 0.24 s on one, 0.19 s on two). None: the default."""
    return 1 if batch_size <= 64 else None
