"""One LSTM layer over a whole sequence, time-major: two implementations.

Both take the layer's weights with the forget bias already folded into ``b`` and
return the same values:

* :func:`layer_scan`, the slow, obviously correct path: ``jax.lax.scan`` over the cell,
  differentiated by JAX's autodiff. Supports forward and reverse mode at any order.
* :func:`layer_fused`, the fast path: the same forward, with a ``jax.custom_vjp`` whose
  backward scan carries only what is sequential (``dh, dc -> dz_t``, then
  ``dz_t @ w_hh.T``). ``dW_ih``, ``dW_hh``, ``db`` and the input gradient are each one
  large matmul over all timesteps after the scan, instead of T small ones. Reverse mode
  only (``jax.jvp`` of a ``custom_vjp`` is not defined); use ``impl="scan"`` for
  forward mode.

In both, the input projection for every timestep is one ``[T*B, in] x [in, 4H]`` matmul
outside the loop; the loop body does only ``h @ w_hh`` and the gate math.

Shapes: ``xs [T, B, in]``, ``h0, c0 [B, H]``, ``valid [T, B]`` bool (``t < lengths[b]``)
or None, ``rmask [B, H]`` (recurrent dropout, scaled) or None. Returns
``ys [T, B, H]`` (zeros where not valid), ``h_T``, ``c_T``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lstm_jax._cell import cell_update, gate_activations


def _input_projection(xs, w_ih, b):
    return jnp.einsum("tbi,ig->tbg", xs, w_ih) + b


def _forward(w_ih, w_hh, b, xs, h0, c0, valid, rmask, unroll, save_residuals):
    """The forward scan shared by both paths; optionally emits what the backward needs."""
    zx = _input_projection(xs, w_ih, b)

    def step(carry, inputs):
        h, c = carry
        zx_t, v_t = inputs
        h_in = h if rmask is None else h * rmask
        acts = gate_activations(zx_t + h_in @ w_hh)
        h_new, c_new, _ = cell_update(acts, c)
        if v_t is None:
            y = h_new
        else:
            v = v_t[:, None]
            y = jnp.where(v, h_new, jnp.zeros_like(h_new))
            h_new = jnp.where(v, h_new, h)
            c_new = jnp.where(v, c_new, c)
        out = (y, acts, h_new, c_new) if save_residuals else y
        return (h_new, c_new), out

    (h_t, c_t), out = jax.lax.scan(step, (h0, c0), (zx, valid), unroll=unroll)
    return (h_t, c_t), out


def layer_scan(w_ih, w_hh, b, xs, h0, c0, valid=None, rmask=None, *, unroll=1):
    """Reference path: autodiff through ``lax.scan``. See the module docstring for shapes."""
    (h_t, c_t), ys = _forward(w_ih, w_hh, b, xs, h0, c0, valid, rmask, unroll, False)
    return ys, h_t, c_t


@functools.lru_cache(maxsize=None)
def _fused_fn(unroll):
    @jax.custom_vjp
    def fused(w_ih, w_hh, b, xs, h0, c0, valid, rmask):
        (h_t, c_t), ys = _forward(w_ih, w_hh, b, xs, h0, c0, valid, rmask, unroll, False)
        return ys, h_t, c_t

    def fwd(w_ih, w_hh, b, xs, h0, c0, valid, rmask):
        (h_t, c_t), (ys, acts, hs, cs) = _forward(w_ih, w_hh, b, xs, h0, c0, valid, rmask, unroll, True)
        if valid is None:
            hs = ys  # without lengths the carried h is the output: keep one copy
        residuals = (w_ih, w_hh, xs, h0, c0, valid, rmask, acts, hs, cs)
        return (ys, h_t, c_t), residuals

    def bwd(residuals, cotangents):
        w_ih, w_hh, xs, h0, c0, valid, rmask, acts, hs, cs = residuals
        d_ys, d_h_t, d_c_t = cotangents
        h_prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)  # [T, B, H]
        c_prev = jnp.concatenate([c0[None], cs[:-1]], axis=0)
        w_hh_t = w_hh.T  # loop-invariant; hoisted so the body has no transpose

        def step(carry, inputs):
            dh, dc, d_rmask = carry
            dy, a, cp, cn, hp, v_t = inputs
            dh_new = dy + dh
            dc_new = dc
            if v_t is not None:
                v = v_t[:, None]
                dh_new = jnp.where(v, dh_new, jnp.zeros_like(dh_new))
                dc_new = jnp.where(v, dc, jnp.zeros_like(dc))
            i, f, g, o = jnp.split(a, 4, axis=-1)
            tanh_c = jnp.tanh(cn)
            dc_total = dc_new + dh_new * o * (1 - tanh_c * tanh_c)
            dz = jnp.concatenate(
                [
                    dc_total * g * i * (1 - i),
                    dc_total * cp * f * (1 - f),
                    dc_total * i * (1 - g * g),
                    dh_new * tanh_c * o * (1 - o),
                ],
                axis=-1,
            )
            dh_in = dz @ w_hh_t
            if rmask is None:
                dh_prev = dh_in
            else:
                d_rmask = d_rmask + hp * dh_in
                dh_prev = dh_in * rmask
            dc_prev = dc_total * f
            if v_t is not None:
                # Steps past a sequence's length passed the state through unchanged.
                dh_prev = dh_prev + jnp.where(v, jnp.zeros_like(dh), dh)
                dc_prev = dc_prev + jnp.where(v, jnp.zeros_like(dc), dc)
            return (dh_prev, dc_prev, d_rmask), dz

        d_rmask0 = None if rmask is None else jnp.zeros_like(rmask)
        (dh0, dc0, d_rmask), dz = jax.lax.scan(
            step,
            (d_h_t, d_c_t, d_rmask0),
            (d_ys, acts, c_prev, cs, h_prev if rmask is not None else None, valid),
            reverse=True,
            unroll=unroll,
        )
        h_in_prev = h_prev if rmask is None else h_prev * rmask
        d_w_ih = jnp.einsum("tbi,tbg->ig", xs, dz)
        d_w_hh = jnp.einsum("tbh,tbg->hg", h_in_prev, dz)
        d_b = jnp.sum(dz, axis=(0, 1))
        d_xs = jnp.einsum("tbg,ig->tbi", dz, w_ih)
        return d_w_ih, d_w_hh, d_b, d_xs, dh0, dc0, None, d_rmask

    fused.defvjp(fwd, bwd)
    return fused


def layer_fused(w_ih, w_hh, b, xs, h0, c0, valid=None, rmask=None, *, unroll=1):
    """Fast path with a hand-written VJP. See the module docstring for shapes."""
    return _fused_fn(unroll)(w_ih, w_hh, b, xs, h0, c0, valid, rmask)
