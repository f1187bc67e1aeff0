"""Direct calls to the BLAS that numpy itself uses, for the training hot loop.

numpy's `matmul` computes C = A·B into a fresh or given array; the trainer needs
C ← α·A·B + β·C (the weight update W ← W + η h_prevᵀ δ done inside the GEMM, with no
separate pass over W) and control of the BLAS thread count. numpy's wheels ship
OpenBLAS (as scipy-openblas, 64-bit integers); this module finds the copy numpy has
already loaded and calls its cblas_?gemm through ctypes, the way scipy.linalg.blas
does, with the arguments of each product converted once. A self-test against numpy
runs once; if the library, a symbol or the test is missing, or MLECLI_BLAS=numpy is set,
the bound calls are numpy's, with the same results up to rounding. Which one runs is
named by `backend()`.

How a product is written where it is used: as the formula it computes,

    gemm(T(h_prev), delta, out=W, alpha=eta, beta=1.0)     # W ← W + η h_prevᵀ δ
    axpby(v, out=W, alpha=eta)                              # W ← W + η v

each a call bound once to these very arrays and run every batch (`T(a)` is aᵀ: the
BLAS reads a's rows as columns, nothing is copied). `bind` and `bind_axpby` are the
same calls in the BLAS's own argument order.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Callable, Iterator

import numpy as np

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
Scalar = ctypes.c_float | ctypes.c_double  # a number a bound call reads when it runs
Call = Callable[[], None]  # a bound product: run it, and it computes its formula on its arrays
# (gemm symbol prefix, thread setter, integer type), most specific first
_FLAVOURS = (
    ("scipy_cblas_{}gemm64_", "scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_", ctypes.c_int64),
    ("cblas_{}gemm64_", "openblas_set_num_threads64_", "openblas_get_num_threads64_", ctypes.c_int64),
    ("cblas_{}gemm", "openblas_set_num_threads", "openblas_get_num_threads", ctypes.c_int),
)


def _loaded_blas_paths() -> list[str]:
    """Shared libraries with 'blas' in their name that this process has mapped."""
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(" ", 1)[-1].strip()
                if path.startswith("/") and "blas" in os.path.basename(path).lower() and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    return paths


class _Cblas:
    def __init__(self, lib: ctypes.CDLL, path: str, flavour):
        gemm_name, set_name, get_name, int_t = flavour
        self.path = path
        self.int_t = int_t
        self.gemm = {}  # dtype → (function, its float type)
        self.axpby = {}  # dtype → function
        self.axpy = {}  # dtype → function (OpenBLAS splits a long axpy over its threads; axpby it does not)
        for code, ct in (("s", ctypes.c_float), ("d", ctypes.c_double)):
            # No argtypes: `bind` converts every argument once, to its exact C type, so that
            # a call costs only ctypes' own overhead, not a conversion of each argument.
            dtype = np.dtype(np.float32 if code == "s" else np.float64)
            f = lib[gemm_name.format(code)]
            f.restype = None
            self.gemm[dtype] = (f, ct)
            g = lib[gemm_name.format(code).replace("gemm", "axpby")]
            g.restype = None
            self.axpby[dtype] = g
            a = lib[gemm_name.format(code).replace("gemm", "axpy")]
            a.restype = None
            self.axpy[dtype] = a
        self.set_threads = getattr(lib, set_name, None)
        self.get_threads = getattr(lib, get_name, None)
        if self.set_threads is not None:
            self.set_threads.argtypes = [ctypes.c_int]
            self.set_threads.restype = None
        if self.get_threads is not None:
            self.get_threads.argtypes = []
            self.get_threads.restype = ctypes.c_int


def _find() -> _Cblas | None:
    if os.environ.get("MLECLI_BLAS", "").lower() == "numpy":
        return None
    for path in _loaded_blas_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for flavour in _FLAVOURS:
            try:
                cblas = _Cblas(lib, path, flavour)
            except AttributeError:
                continue
            if _self_test(cblas):
                return cblas
    return None


def _self_test(cblas: _Cblas) -> bool:
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        a, b = rng.random((5, 3)).astype(dtype), rng.random((5, 4)).astype(dtype)
        c = rng.random((3, 4)).astype(dtype)
        want = 0.5 * (a.T @ b) + c
        _bind_cblas(cblas, a, b, c, 0.5, 1.0, True, False)()
        if not np.allclose(c, want, rtol=1e-5):
            return False
        want = 0.25 * a + 2.0 * a[::-1].copy()
        y = a[::-1].copy()
        _bind_axpby_cblas(cblas, a, y, 0.25, 2.0)()
        if not np.allclose(y, want, rtol=1e-5):
            return False
    return True


def _leading_dimension(a: np.ndarray) -> int | None:
    """Elements between the starts of consecutive rows, if each row is contiguous."""
    item = a.itemsize
    if a.ndim != 2 or (a.shape[1] > 1 and a.strides[1] != item) or a.strides[0] % item:
        return None
    ld = a.strides[0] // item if a.shape[0] > 1 else a.shape[1]
    return ld if ld >= a.shape[1] else None


def _bind_cblas(cblas: _Cblas, A, B, C, alpha, beta, trans_a, trans_b) -> Call:
    m, n = C.shape
    k = A.shape[0] if trans_a else A.shape[1]
    if (B.shape[1] if trans_b else B.shape[0]) != k or (A.shape[1] if trans_a else A.shape[0]) != m or (
        B.shape[0] if trans_b else B.shape[1]
    ) != n:
        raise ValueError(f"gemm shapes do not match: {A.shape}, {B.shape} -> {C.shape}")
    lds = [_leading_dimension(a) for a in (A, B, C)]
    if not (A.dtype == B.dtype == C.dtype) or None in lds:
        raise ValueError("gemm needs matrices of one dtype whose rows are contiguous")
    f, real = cblas.gemm[C.dtype]
    i, n_ = ctypes.c_int, cblas.int_t
    ptr = ctypes.c_void_p
    # cblas_?gemm(layout, op A, op B, M, N, K, α, A, lda, B, ldb, β, C, ldc): C ← α op(A) op(B) + β C, C M × N
    call = functools.partial(
        f, i(ROW_MAJOR), i(TRANS if trans_a else NO_TRANS), i(TRANS if trans_b else NO_TRANS), n_(m), n_(n), n_(k),
        _real(real, alpha), ptr(A.ctypes.data), n_(lds[0]), ptr(B.ctypes.data), n_(lds[1]), _real(real, beta),
        ptr(C.ctypes.data), n_(lds[2]),
    )
    call.arrays = (A, B, C)  # the memory the pointers point into lives as long as the call
    return call


def _real(real: type, value: float | Scalar) -> Scalar:
    """A float as the C type `real`; a Scalar of that very type as it is (read at each call)."""
    if isinstance(value, (ctypes.c_float, ctypes.c_double)):
        if type(value) is not real:
            raise ValueError(f"a {type(value).__name__} scalar for a {real.__name__} product")
        return value
    return real(value)


def _bind_axpby_cblas(cblas: _Cblas, x, y, alpha, beta) -> Call:
    if x.shape != y.shape or x.dtype != y.dtype or not (x.flags.c_contiguous and y.flags.c_contiguous):
        raise ValueError("axpby needs two C-contiguous arrays of one shape and dtype")
    _, real = cblas.gemm[y.dtype]
    n_, ptr = cblas.int_t, ctypes.c_void_p
    if type(beta) is float and beta == 1.0:  # y += α x: axpy, which runs on the BLAS's threads like the GEMMs
        call = functools.partial(cblas.axpy[y.dtype], n_(x.size), _real(real, alpha), ptr(x.ctypes.data), n_(1),
                                 ptr(y.ctypes.data), n_(1))
    else:
        call = functools.partial(cblas.axpby[y.dtype], n_(x.size), _real(real, alpha), ptr(x.ctypes.data), n_(1),
                                 _real(real, beta), ptr(y.ctypes.data), n_(1))
    call.arrays = (x, y)
    return call


_CBLAS: _Cblas | None | bool = False  # False = not looked for yet


def _cblas() -> _Cblas | None:
    global _CBLAS
    if _CBLAS is False:
        _CBLAS = _find()
    return _CBLAS  # type: ignore[return-value]


def backend() -> str:
    """Which GEMM `bind` gives: the BLAS through ctypes (its library's name), or numpy's fallback."""
    c = _cblas()
    return f"cblas via ctypes ({os.path.basename(c.path)})" if c else "numpy.matmul (fallback)"


def current_threads() -> int | None:
    """The BLAS's thread count right now (None where it cannot be asked)."""
    c = _cblas()
    return c.get_threads() if c is not None and c.get_threads is not None else None


def scalar(dtype, value: float = 0.0) -> Scalar:
    """A number a bound call reads each time it runs: set `.value` to change it without
    binding again (a learning rate that changes every step). C float for float32
    products, C double for float64."""
    return ctypes.c_float(value) if np.dtype(dtype) == np.float32 else ctypes.c_double(value)


def _value(v: float | Scalar) -> float:
    return v.value if isinstance(v, (ctypes.c_float, ctypes.c_double)) else v


class T:
    """aᵀ, as an operand of `gemm`: `gemm(T(h), d, out=G)` is G ← hᵀ d. No copy is made;
    the BLAS is told to read a's rows as columns (its "transpose" flag)."""

    __slots__ = ("a",)

    def __init__(self, a: np.ndarray):
        self.a = a


def gemm(a: np.ndarray | T, b: np.ndarray | T, *, out: np.ndarray, alpha: float | Scalar = 1.0,
         beta: float | Scalar = 0.0, scratch: np.ndarray | None = None) -> Call:
    """The bound call out ← α·a·b + β·out, where `a` or `b` given as T(x) stands for xᵀ
    (with β = 0, out ← α·a·b; with β = 1, out += α·a·b). Arrays, scalars and scratch as
    for `bind`, which this is, written in the order of the formula."""
    ta, tb = isinstance(a, T), isinstance(b, T)
    return bind(a.a if ta else a, b.a if tb else b, out, alpha, beta, trans_a=ta, trans_b=tb, scratch=scratch)


def axpby(x: np.ndarray, *, out: np.ndarray, alpha: float | Scalar, beta: float | Scalar = 1.0,
          scratch: np.ndarray | None = None) -> Call:
    """The bound call out ← α·x + β·out, elementwise (β = 1: out += α·x); `bind_axpby`,
    written in the order of the formula."""
    return bind_axpby(x, out, alpha, beta, scratch)


def bind(A: np.ndarray, B: np.ndarray, C: np.ndarray, alpha: float | Scalar, beta: float | Scalar,
         trans_a: bool = False, trans_b: bool = False, scratch: np.ndarray | None = None) -> Call:
    """A call that does C ← α·op(A)·op(B) + β·C in place, op = transpose where asked,
    on these very arrays (their memory, not their current values, is what is bound):
    the training loop binds its products once and calls them every batch.

    A, B, C are 2-D, of one dtype (float32 or float64), each row contiguous (a block of
    columns of a C-contiguous matrix will do), and must outlive the call. `scratch`,
    shaped like C, spares the numpy fallback an allocation when β ≠ 0. α and β are
    numbers, or `scalar`s of C's dtype read at each call.
    """
    cblas = _cblas()
    if cblas is not None:
        return _bind_cblas(cblas, A, B, C, alpha, beta, trans_a, trans_b)
    return functools.partial(_numpy_gemm, A, B, C, alpha, beta, trans_a, trans_b, scratch)


def bind_axpby(x: np.ndarray, y: np.ndarray, alpha: float | Scalar, beta: float | Scalar,
               scratch: np.ndarray | None = None) -> Call:
    """A call that does y ← α·x + β·y in place, elementwise, on these very arrays (both
    C-contiguous, one shape and dtype); α and β as for `bind`. `scratch`, shaped like
    y, spares the numpy fallback an allocation."""
    cblas = _cblas()
    if cblas is not None:
        return _bind_axpby_cblas(cblas, x, y, alpha, beta)
    if x.shape != y.shape or x.dtype != y.dtype:
        raise ValueError("axpby needs two arrays of one shape and dtype")
    return functools.partial(_numpy_axpby, x, y, alpha, beta, scratch if scratch is not None else np.empty_like(y))


def _numpy_axpby(x, y, alpha, beta, tmp) -> None:
    alpha, beta = _value(alpha), _value(beta)
    np.multiply(x, alpha, out=tmp)
    if beta != 1.0:
        y *= beta
    y += tmp


def _numpy_gemm(A, B, C, alpha, beta, trans_a, trans_b, scratch) -> None:
    alpha, beta = _value(alpha), _value(beta)
    a = A.T if trans_a else A
    b = B.T if trans_b else B
    if beta == 0.0:
        np.matmul(a, b, out=C)
        if alpha != 1.0:
            C *= alpha
        return
    tmp = scratch if scratch is not None else np.empty_like(C)
    np.matmul(a, b, out=tmp)
    if alpha != 1.0:
        tmp *= alpha
    if beta != 1.0:
        C *= beta
    C += tmp


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the block with the BLAS using `n` threads (None: leave it as it is)."""
    cblas = _cblas()
    if n is None or cblas is None or cblas.set_threads is None or cblas.get_threads is None:
        yield
        return
    before = cblas.get_threads()
    cblas.set_threads(n)
    try:
        yield
    finally:
        cblas.set_threads(before)
