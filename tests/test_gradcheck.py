"""jax.test_util.check_grads (numerical vs. automatic derivatives, float64).

Tiny sizes (B=2, T=3, in=2, H=3) keep this fast.  ``impl="fused"`` uses a
custom_vjp, so forward mode is not available there and only reverse mode
(to second order: reverse-over-reverse) is checked.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.test_util import check_grads

B, T, D, H = 2, 3, 2, 3


@pytest.fixture
def lj():
    import lstm_jax

    return lstm_jax


@contextlib.contextmanager
def _x64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


@pytest.fixture
def x64():
    with _x64():
        yield


def _params(lj, rng, num_layers):
    ps = []
    for l in range(num_layers):
        din = D if l == 0 else H
        ps.append(lj.LSTMLayerParams(
            w_ih=jnp.asarray(rng.normal(size=(din, 4 * H)) * 0.5),
            w_hh=jnp.asarray(rng.normal(size=(H, 4 * H)) * 0.5),
            b=jnp.asarray(rng.normal(size=(4 * H,)) * 0.5),
        ))
    return tuple(ps)


def _state(lj, rng, num_layers):
    return tuple(lj.LSTMState(h=jnp.asarray(rng.normal(size=(B, H)) * 0.5),
                              c=jnp.asarray(rng.normal(size=(B, H))))
                 for _ in range(num_layers))


def _masks(lj, rng, num_layers, p=0.5, rp=0.3):
    out, rec = [], []
    for _ in range(num_layers):
        om = (rng.random((B, T, H)) >= p) / (1 - p)
        om.flat[0], om.flat[1] = 0.0, 1 / (1 - p)
        rm = (rng.random((B, H)) >= rp) / (1 - rp)
        rm.flat[0], rm.flat[1] = 0.0, 1 / (1 - rp)
        out.append(jnp.asarray(om))
        rec.append(jnp.asarray(rm))
    return lj.DropoutMasks(output=tuple(out), recurrent=tuple(rec))


def test_lstm_cell_check_grads(lj, x64):
    forget_bias = 0.7
    rng = np.random.default_rng(0)
    (p,) = _params(lj, rng, 1)
    (s,) = _state(lj, rng, 1)
    x = jnp.asarray(rng.normal(size=(B, D)))
    assert x.dtype == jnp.float64

    def f(p, s, x):
        return lj.lstm_cell(p, s, x, forget_bias=forget_bias)

    check_grads(jax.jit(f), (p, s, x), order=2, modes=("fwd", "rev"))


def _lstm_fn(lj, impl, lengths, masks, forget_bias=1.0):
    def f(params, xs, init):
        return lj.lstm(params, xs, initial_state=init, lengths=lengths,
                       forget_bias=forget_bias, masks=masks, impl=impl)
    return f


# scan: forward and reverse mode, one layer (13 XLA compilations, the slow
# part); fused (custom_vjp, the library's own backward): reverse mode only,
# two layers so the inter-layer masks/cotangents are checked to 2nd order too.
@pytest.mark.parametrize("impl,modes,L", [("scan", ("fwd", "rev"), 1), ("fused", ("rev",), 2)])
def test_lstm_check_grads(lj, x64, impl, modes, L):
    rng = np.random.default_rng(1)
    params = _params(lj, rng, L)
    init = _state(lj, rng, L)
    masks = _masks(lj, rng, L)
    xs = jnp.asarray(rng.normal(size=(B, T, D)))
    lengths = np.array([T, 1], dtype=np.int32)
    f = jax.jit(_lstm_fn(lj, impl, lengths, masks))
    check_grads(f, (params, xs, init), order=2, modes=modes)
