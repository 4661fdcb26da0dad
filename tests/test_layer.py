"""The fast path (custom VJP, remat) against autodiff through the plain scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lstm_jax as lj


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _problem(dtype, *, batch=4, time_steps=9, features=5, hidden=6, layers=2, seed=0):
    key = jax.random.PRNGKey(seed)
    k_p, k_x, k_s, k_m, k_r = jax.random.split(key, 5)
    params = lj.init_lstm(k_p, features, hidden, layers, dtype=dtype)
    xs = jax.random.normal(k_x, (batch, time_steps, features), dtype)
    s_keys = jax.random.split(k_s, 2 * layers)
    state = tuple(
        lj.LSTMState(0.5 * jax.random.normal(s_keys[2 * k], (batch, hidden), dtype),
                     0.5 * jax.random.normal(s_keys[2 * k + 1], (batch, hidden), dtype))
        for k in range(layers)
    )
    masks = lj.make_dropout_masks(key=k_m, params=params, batch_size=batch, time_steps=time_steps,
                                  dropout=0.3, recurrent_dropout=0.25)
    lengths = jnp.array([time_steps, 1, 0, time_steps - 3][:batch], jnp.int32)
    r_ys, r_h, r_c = jax.random.normal(k_r, (3, batch, time_steps, hidden), dtype)
    return params, xs, state, masks, lengths, (r_ys, r_h[:, 0], r_c[:, 0])


def _loss(params, xs, state, masks, lengths, weights, **kw):
    r_ys, r_h, r_c = weights
    ys, final = lj.lstm(params, xs, initial_state=state, lengths=lengths, masks=masks, **kw)
    return jnp.sum(ys * r_ys) + sum(jnp.sum(s.h * r_h) + jnp.sum(s.c * r_c) for s in final)


GRAD_ARGS = (0, 1, 2, 3)  # params, xs, initial state, masks


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.float64, 1e-12)])
@pytest.mark.parametrize("use_lengths,use_masks", [(False, False), (True, True)])
def test_custom_vjp_equals_autodiff_through_scan(dtype, tol, use_lengths, use_masks):
    with jax.enable_x64(dtype == jnp.float64):
        params, xs, state, masks, lengths, w = _problem(dtype)
        lengths = lengths if use_lengths else None
        masks = masks if use_masks else None
        ref_val, ref_grads = jax.value_and_grad(_loss, GRAD_ARGS)(params, xs, state, masks, lengths, w, impl="scan")
        val, grads = jax.value_and_grad(_loss, GRAD_ARGS)(params, xs, state, masks, lengths, w, impl="fused")
        assert _rel_err(val, ref_val) <= tol
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            assert got.shape == want.shape
            assert _rel_err(got, want) <= tol


@pytest.mark.parametrize("impl,chunk", [("fused", 1), ("fused", 4), ("fused", 20), ("scan", 4)])
def test_remat_equals_no_remat_float64(impl, chunk):
    with jax.enable_x64(True):
        params, xs, state, masks, lengths, w = _problem(jnp.float64)
        ref_val, ref_grads = jax.value_and_grad(_loss, GRAD_ARGS)(params, xs, state, masks, lengths, w, impl="scan")
        val, grads = jax.value_and_grad(_loss, GRAD_ARGS)(
            params, xs, state, masks, lengths, w, impl=impl, remat_chunk=chunk)
        assert _rel_err(val, ref_val) <= 1e-12
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            assert _rel_err(got, want) <= 1e-12


@pytest.mark.parametrize("unroll", [3])
def test_unroll_does_not_change_results(unroll):
    params, xs, state, masks, lengths, w = _problem(jnp.float32)
    ref_val, ref_grads = jax.value_and_grad(_loss, GRAD_ARGS)(params, xs, state, masks, lengths, w)
    val, grads = jax.value_and_grad(_loss, GRAD_ARGS)(params, xs, state, masks, lengths, w, unroll=unroll)
    assert _rel_err(val, ref_val) <= 1e-5
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert _rel_err(got, want) <= 1e-5


def _saved_residual_bytes(fn, *args):
    """Bytes of the residuals that reverse mode keeps between the forward and backward pass."""
    _, vjp_fn = jax.vjp(fn, *args)
    own = {id(leaf) for leaf in jax.tree.leaves(args)}
    return sum(leaf.nbytes for leaf in jax.tree.leaves(vjp_fn) if hasattr(leaf, "nbytes") and id(leaf) not in own)


def test_remat_keeps_less_for_the_backward_pass():
    key = jax.random.PRNGKey(0)
    params = lj.init_lstm(key, 1, 32, 1)
    xs = jax.random.normal(key, (8, 256, 1))
    loss = lambda p, chunk, impl: jnp.sum(lj.lstm(p, xs, remat_chunk=chunk, impl=impl)[0] ** 2)  # noqa: E731
    for impl in ("fused", "scan"):
        full = _saved_residual_bytes(lambda p: loss(p, None, impl), params)
        remat = _saved_residual_bytes(lambda p: loss(p, 16, impl), params)
        # Full: gates and states for all 256 steps, ~6 * T*B*H floats; remat: states at 16 chunk starts.
        assert remat * 4 < full, (impl, remat, full)


def test_remat_chunk_is_validated():
    params = lj.init_lstm(jax.random.PRNGKey(0), 2, 3)
    with pytest.raises(ValueError, match="remat_chunk"):
        lj.lstm(params, jnp.ones((1, 4, 2)), remat_chunk=0)


@pytest.mark.parametrize("impl,chunk", [("fused", None), ("fused", 4), ("scan", None)])
def test_bfloat16_matmuls_stay_close_to_float32(impl, chunk):
    params, xs, state, masks, lengths, w = _problem(jnp.float32, hidden=16)
    ref_val, ref_grads = jax.value_and_grad(_loss, GRAD_ARGS)(params, xs, state, masks, lengths, w, impl="scan")
    val, grads = jax.value_and_grad(_loss, GRAD_ARGS)(
        params, xs, state, masks, lengths, w, impl=impl, remat_chunk=chunk, matmul_dtype=jnp.bfloat16)
    # bfloat16 operands keep 8 bits of mantissa (relative rounding 2**-9 ~ 2e-3) while
    # accumulation, gates and cell state stay float32: errors of a few 1e-3, not more.
    assert _rel_err(val, ref_val) <= 2e-2
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert got.dtype == want.dtype == jnp.float32
        err = _rel_err(got, want)
        assert 0 < err <= 2e-2  # > 0: the bfloat16 path really ran
