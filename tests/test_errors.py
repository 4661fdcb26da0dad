"""Bad inputs: one test per mistake, asserting the exception type (ValueError or
TypeError, as lstm_jax raises) and that the message names the offending argument.

Shape, dtype and Python-value checks read only static information, so they must also
fire at trace time when the call is inside ``jax.jit`` (``TestUnderJit``).  The range
check on ``lengths`` values needs concrete values and is documented not to run under jit.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lstm_jax as lj

B, T, F, H = 2, 3, 4, 5


def _f32(a):
    return jnp.asarray(a, jnp.float32)


@pytest.fixture(scope="module")
def params():
    """Two layers: F -> H -> 3 (layer 1 narrower, so per-layer checks can tell layers apart)."""
    rng = np.random.default_rng(0)
    return (
        lj.LSTMLayerParams(_f32(rng.normal(size=(F, 4 * H))), _f32(rng.normal(size=(H, 4 * H))),
                           _f32(rng.normal(size=(4 * H,)))),
        lj.LSTMLayerParams(_f32(rng.normal(size=(H, 12))), _f32(rng.normal(size=(3, 12))),
                           _f32(rng.normal(size=(12,)))),
    )


@pytest.fixture(scope="module")
def xs():
    return _f32(np.random.default_rng(1).normal(size=(B, T, F)))


def _state(batch=B, hidden=(H, 3)):
    return tuple(lj.LSTMState(jnp.zeros((batch, h)), jnp.zeros((batch, h))) for h in hidden)


def _name(arg):
    """A regex matching ``arg`` as a whole name in the message (so ``dropout`` does not
    match ``recurrent_dropout`` and ``x`` does not match ``xs``)."""
    return rf"(?<![\w.]){re.escape(arg)}(?![\w])"


def test_sanity_good_inputs_pass(params, xs):
    ys, final = lj.lstm(params, xs, initial_state=_state(), lengths=jnp.array([3, 0]))
    assert ys.shape == (B, T, 3) and len(final) == 2


# ---------------------------------------------------------------------------
# xs
# ---------------------------------------------------------------------------


def test_xs_rank_2(params, xs):
    with pytest.raises(ValueError, match=_name("xs")):
        lj.lstm(params, xs[0])


def test_xs_rank_4(params, xs):
    with pytest.raises(ValueError, match=_name("xs")):
        lj.lstm(params, xs[None])


def test_xs_rank_1(params):
    with pytest.raises(ValueError, match=_name("xs")):
        lj.lstm(params, jnp.zeros((F,)))


def test_xs_feature_size_mismatch(params):
    with pytest.raises(ValueError, match=_name("xs")):
        lj.lstm(params, jnp.zeros((B, T, F + 1)))


def test_xs_integer_dtype(params):
    with pytest.raises(TypeError, match=_name("xs")):
        lj.lstm(params, jnp.zeros((B, T, F), jnp.int32))


def test_xs_not_an_array(params):
    with pytest.raises(TypeError, match=_name("xs")):
        lj.lstm(params, [[[0.0] * F] * T] * B)


# ---------------------------------------------------------------------------
# initial_state
# ---------------------------------------------------------------------------


def test_initial_state_too_few_layers(params, xs):
    with pytest.raises(ValueError, match=_name("initial_state")):
        lj.lstm(params, xs, initial_state=_state()[:1])


def test_initial_state_too_many_layers(params, xs):
    with pytest.raises(ValueError, match=_name("initial_state")):
        lj.lstm(params, xs, initial_state=_state() + _state()[:1])


def test_initial_state_bare_lstm_state(params, xs):
    """A single LSTMState (a 2-tuple!) for a 2-layer stack must not be taken as 2 layers."""
    with pytest.raises(ValueError, match=_name("initial_state")):
        lj.lstm(params, xs, initial_state=_state()[0])


def test_initial_state_wrong_h_shape(params, xs):
    s = _state()
    bad = (s[0]._replace(h=jnp.zeros((B, H + 1))), s[1])
    with pytest.raises(ValueError, match=r"initial_state\[0\]\.h"):
        lj.lstm(params, xs, initial_state=bad)


def test_initial_state_wrong_c_shape(params, xs):
    s = _state()
    bad = (s[0], s[1]._replace(c=jnp.zeros((B + 1, 3))))
    with pytest.raises(ValueError, match=r"initial_state\[1\]\.c"):
        lj.lstm(params, xs, initial_state=bad)


def test_initial_state_wrong_batch(params, xs):
    with pytest.raises(ValueError, match=r"initial_state\[0\]\.h"):
        lj.lstm(params, xs, initial_state=_state(batch=B + 1))


def test_initial_state_not_lstm_state(params, xs):
    s = _state()
    with pytest.raises(TypeError, match=r"initial_state\[0\]"):
        lj.lstm(params, xs, initial_state=((s[0].h, s[0].c), s[1]))


def test_initial_state_integer_dtype(params, xs):
    s = _state()
    bad = (s[0]._replace(c=jnp.zeros((B, H), jnp.int32)), s[1])
    with pytest.raises(TypeError, match=r"initial_state\[0\]\.c"):
        lj.lstm(params, xs, initial_state=bad)


# ---------------------------------------------------------------------------
# lengths
# ---------------------------------------------------------------------------


def test_lengths_wrong_shape(params, xs):
    with pytest.raises(ValueError, match=_name("lengths")):
        lj.lstm(params, xs, lengths=jnp.array([1, 2, 3]))


def test_lengths_2d(params, xs):
    with pytest.raises(ValueError, match=_name("lengths")):
        lj.lstm(params, xs, lengths=jnp.array([[1], [2]]))


def test_lengths_scalar(params, xs):
    with pytest.raises(ValueError, match=_name("lengths")):
        lj.lstm(params, xs, lengths=jnp.array(2))


def test_lengths_float(params, xs):
    with pytest.raises(TypeError, match=_name("lengths")):
        lj.lstm(params, xs, lengths=jnp.array([1.0, 2.0]))


def test_lengths_bool(params, xs):
    with pytest.raises(TypeError, match=_name("lengths")):
        lj.lstm(params, xs, lengths=jnp.array([True, False]))


def test_lengths_negative(params, xs):
    with pytest.raises(ValueError, match=_name("lengths")):
        lj.lstm(params, xs, lengths=jnp.array([-1, 2]))


def test_lengths_greater_than_time(params, xs):
    with pytest.raises(ValueError, match=_name("lengths")):
        lj.lstm(params, xs, lengths=jnp.array([T + 1, 2]))


def test_lengths_numpy_out_of_range(params, xs):
    with pytest.raises(ValueError, match=_name("lengths")):
        lj.lstm(params, xs, lengths=np.array([0, T + 5], np.int64))


def test_lengths_bounds_are_inclusive(params, xs):
    ys, _ = lj.lstm(params, xs, lengths=jnp.array([0, T]))
    assert np.all(np.asarray(ys[0]) == 0)


# ---------------------------------------------------------------------------
# dropout rates and key
# ---------------------------------------------------------------------------

BAD_RATES = [-0.1, 1.0, 1.5, float("nan")]


@pytest.mark.parametrize("rate", BAD_RATES)
def test_dropout_rate_out_of_range(params, xs, rate):
    with pytest.raises(ValueError, match=_name("dropout")):
        lj.lstm(params, xs, dropout=rate, key=jax.random.PRNGKey(0))


@pytest.mark.parametrize("rate", BAD_RATES)
def test_recurrent_dropout_rate_out_of_range(params, xs, rate):
    with pytest.raises(ValueError, match=_name("recurrent_dropout")):
        lj.lstm(params, xs, recurrent_dropout=rate, key=jax.random.PRNGKey(0))


@pytest.mark.parametrize("rate", BAD_RATES)
@pytest.mark.parametrize("which", ["dropout", "recurrent_dropout"])
def test_make_dropout_masks_rate_out_of_range(params, rate, which):
    with pytest.raises(ValueError, match=_name(which)):
        lj.make_dropout_masks(key=jax.random.PRNGKey(0), params=params, batch_size=B, time_steps=T,
                              **{which: rate})


def test_dropout_rate_not_a_number(params, xs):
    with pytest.raises(TypeError, match=_name("dropout")):
        lj.lstm(params, xs, dropout="high", key=jax.random.PRNGKey(0))


@pytest.mark.parametrize("which", ["dropout", "recurrent_dropout"])
def test_positive_rate_without_key(params, xs, which):
    with pytest.raises(ValueError, match=_name("key")):
        lj.lstm(params, xs, **{which: 0.5})


def test_traced_rate_under_jit(params, xs):
    f = jax.jit(lambda rate: lj.lstm(params, xs, dropout=rate, key=jax.random.PRNGKey(0)))
    with pytest.raises(TypeError, match=_name("dropout")):
        f(0.5)


# ---------------------------------------------------------------------------
# params
# ---------------------------------------------------------------------------


def test_params_empty_tuple(xs):
    with pytest.raises(TypeError, match=_name("params")):
        lj.lstm((), xs)


def test_params_bare_layer(params, xs):
    with pytest.raises(TypeError, match=_name("params")):
        lj.lstm(params[0], xs)


def test_params_dict(params, xs):
    with pytest.raises(TypeError, match=_name("params")):
        lj.lstm({"layer0": params[0]}, xs)


def test_params_none(xs):
    with pytest.raises(TypeError, match=_name("params")):
        lj.lstm(None, xs)


def test_params_layer_is_plain_tuple(params, xs):
    with pytest.raises(TypeError, match=r"params\[1\]"):
        lj.lstm((params[0], tuple(params[1])), xs)


def test_params_inconsistent_layer_sizes(params, xs):
    """Layer 1's input size (H + 1) is not layer 0's hidden size (H)."""
    bad1 = lj.LSTMLayerParams(jnp.zeros((H + 1, 12)), params[1].w_hh, params[1].b)
    with pytest.raises(ValueError, match=r"params\[1\]\.w_ih"):
        lj.lstm((params[0], bad1), xs)


def test_params_wrong_w_hh_shape(params, xs):
    bad0 = params[0]._replace(w_hh=jnp.zeros((H, 4 * H + 1)))
    with pytest.raises(ValueError, match=r"params\[0\]\.w_hh"):
        lj.lstm((bad0, params[1]), xs)


def test_params_w_hh_not_square_in_hidden(params, xs):
    bad1 = params[1]._replace(w_hh=jnp.zeros((4, 12)))
    with pytest.raises(ValueError, match=r"params\[1\]\.w_hh"):
        lj.lstm((params[0], bad1), xs)


def test_params_wrong_w_ih_shape(params, xs):
    bad0 = params[0]._replace(w_ih=jnp.zeros((F, 4 * H - 1)))
    with pytest.raises(ValueError, match=r"params\[0\]\.w_ih"):
        lj.lstm((bad0, params[1]), xs)


def test_params_wrong_b_shape(params, xs):
    bad1 = params[1]._replace(b=jnp.zeros((1, 12)))
    with pytest.raises(ValueError, match=r"params\[1\]\.b"):
        lj.lstm((params[0], bad1), xs)


def test_params_integer_weights(params, xs):
    bad0 = params[0]._replace(w_hh=jnp.zeros((H, 4 * H), jnp.int32))
    with pytest.raises(TypeError, match=r"params\[0\]\.w_hh"):
        lj.lstm((bad0, params[1]), xs)


# ---------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------


def test_masks_output_wrong_shape(params, xs):
    masks = lj.DropoutMasks(output=(jnp.ones((B, T + 1, H)), None), recurrent=None)
    with pytest.raises(ValueError, match=r"masks\.output\[0\]"):
        lj.lstm(params, xs, masks=masks)


def test_masks_output_wrong_hidden(params, xs):
    masks = lj.DropoutMasks(output=(None, jnp.ones((B, T, H))), recurrent=None)
    with pytest.raises(ValueError, match=r"masks\.output\[1\]"):
        lj.lstm(params, xs, masks=masks)


def test_masks_recurrent_wrong_shape(params, xs):
    masks = lj.DropoutMasks(output=None, recurrent=(jnp.ones((B, T, H)), jnp.ones((B, 3))))
    with pytest.raises(ValueError, match=r"masks\.recurrent\[0\]"):
        lj.lstm(params, xs, masks=masks)


def test_masks_wrong_number_of_layers(params, xs):
    masks = lj.DropoutMasks(output=(jnp.ones((B, T, H)),), recurrent=None)
    with pytest.raises(ValueError, match=r"masks\.output"):
        lj.lstm(params, xs, masks=masks)


def test_masks_not_dropout_masks(params, xs):
    with pytest.raises(TypeError, match=_name("masks")):
        lj.lstm(params, xs, masks=(None, None))


def test_masks_integer_dtype(params, xs):
    masks = lj.DropoutMasks(output=(jnp.ones((B, T, H), jnp.int32), None), recurrent=None)
    with pytest.raises(TypeError, match=r"masks\.output\[0\]"):
        lj.lstm(params, xs, masks=masks)


# ---------------------------------------------------------------------------
# impl, unroll
# ---------------------------------------------------------------------------


def test_impl_unknown(params, xs):
    with pytest.raises(ValueError, match=_name("impl")):
        lj.lstm(params, xs, impl="cudnn")


@pytest.mark.parametrize("unroll", [0, -1, 1.5, True])
def test_unroll_invalid(params, xs, unroll):
    with pytest.raises(ValueError, match=_name("unroll")):
        lj.lstm(params, xs, unroll=unroll)


# ---------------------------------------------------------------------------
# lstm_cell
# ---------------------------------------------------------------------------


def test_lstm_cell_x_wrong_features(params):
    with pytest.raises(ValueError, match=_name("x")):
        lj.lstm_cell(params[0], _state()[0], jnp.zeros((B, F + 1)))


def test_lstm_cell_x_wrong_rank(params):
    with pytest.raises(ValueError, match=_name("x")):
        lj.lstm_cell(params[0], _state()[0], jnp.zeros((B, 1, F)))


def test_lstm_cell_x_integer(params):
    with pytest.raises(TypeError, match=_name("x")):
        lj.lstm_cell(params[0], _state()[0], jnp.zeros((B, F), jnp.int32))


def test_lstm_cell_state_wrong_shape(params):
    with pytest.raises(ValueError, match=r"state\.h"):
        lj.lstm_cell(params[0], lj.LSTMState(jnp.zeros((B, H + 1)), jnp.zeros((B, H))), jnp.zeros((B, F)))


def test_lstm_cell_params_not_layer(params):
    with pytest.raises(TypeError, match=_name("layer_params")):
        lj.lstm_cell(params, _state()[0], jnp.zeros((B, F)))


# ---------------------------------------------------------------------------
# init_lstm, zero_state, make_dropout_masks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arg", ["input_size", "hidden_size", "num_layers"])
@pytest.mark.parametrize("value", [0, -1, 2.0, True])
def test_init_lstm_bad_sizes(arg, value):
    kw = dict(input_size=3, hidden_size=4, num_layers=2)
    kw[arg] = value
    with pytest.raises(ValueError, match=_name(arg)):
        lj.init_lstm(jax.random.PRNGKey(0), **kw)


def test_init_lstm_hidden_size_zero():
    with pytest.raises(ValueError, match=_name("hidden_size")):
        lj.init_lstm(jax.random.PRNGKey(0), 3, 0)


def test_init_lstm_integer_dtype():
    with pytest.raises(TypeError, match=_name("dtype")):
        lj.init_lstm(jax.random.PRNGKey(0), 3, 4, dtype=jnp.int32)


def test_zero_state_bad_batch(params):
    with pytest.raises(ValueError, match=_name("batch_size")):
        lj.zero_state(params, 0)


@pytest.mark.parametrize("arg", ["batch_size", "time_steps"])
def test_make_dropout_masks_bad_sizes(params, arg):
    kw = dict(batch_size=B, time_steps=T)
    kw[arg] = 0
    with pytest.raises(ValueError, match=_name(arg)):
        lj.make_dropout_masks(key=jax.random.PRNGKey(0), params=params, dropout=0.5, **kw)


def test_make_dropout_masks_bad_params():
    with pytest.raises(TypeError, match=_name("params")):
        lj.make_dropout_masks(key=jax.random.PRNGKey(0), params=(), batch_size=B, time_steps=T, dropout=0.5)


# ---------------------------------------------------------------------------
# The same errors at trace time under jax.jit
# ---------------------------------------------------------------------------


def _jit_lstm(**static):
    """``lstm`` jitted with arrays as traced arguments and ``static`` closed over."""

    def f(params, xs, initial_state=None, lengths=None, masks=None, key=None):
        return lj.lstm(params, xs, initial_state=initial_state, lengths=lengths, masks=masks, key=key, **static)

    return jax.jit(f)


def _bad_calls(params, xs):
    """(id, exception, pattern, traced args, static kwargs) for every check that reads only
    shapes, dtypes and Python values."""
    s = _state()
    return [
        ("xs_rank_2", ValueError, _name("xs"), dict(params=params, xs=xs[0]), {}),
        ("xs_rank_4", ValueError, _name("xs"), dict(params=params, xs=xs[None]), {}),
        ("xs_features", ValueError, _name("xs"), dict(params=params, xs=jnp.zeros((B, T, F + 1))), {}),
        ("xs_int", TypeError, _name("xs"), dict(params=params, xs=jnp.zeros((B, T, F), jnp.int32)), {}),
        ("state_layers", ValueError, _name("initial_state"), dict(params=params, xs=xs, initial_state=s[:1]), {}),
        ("state_h", ValueError, r"initial_state\[0\]\.h",
         dict(params=params, xs=xs, initial_state=(s[0]._replace(h=jnp.zeros((B, H + 1))), s[1])), {}),
        ("state_c", ValueError, r"initial_state\[1\]\.c",
         dict(params=params, xs=xs, initial_state=(s[0], s[1]._replace(c=jnp.zeros((B, 4))))), {}),
        ("lengths_shape", ValueError, _name("lengths"), dict(params=params, xs=xs, lengths=jnp.array([1, 2, 3])), {}),
        ("lengths_float", TypeError, _name("lengths"), dict(params=params, xs=xs, lengths=jnp.array([1.0, 2.0])), {}),
        ("dropout", ValueError, _name("dropout"), dict(params=params, xs=xs, key=jax.random.PRNGKey(0)),
         dict(dropout=1.0)),
        ("recurrent_dropout", ValueError, _name("recurrent_dropout"),
         dict(params=params, xs=xs, key=jax.random.PRNGKey(0)), dict(recurrent_dropout=-0.1)),
        ("no_key", ValueError, _name("key"), dict(params=params, xs=xs), dict(dropout=0.5)),
        ("params_layers", ValueError, r"params\[1\]\.w_ih",
         dict(params=(params[0], params[1]._replace(w_ih=jnp.zeros((H + 1, 12)))), xs=xs), {}),
        ("params_w_hh", ValueError, r"params\[0\]\.w_hh",
         dict(params=(params[0]._replace(w_hh=jnp.zeros((H, 4 * H + 1))), params[1]), xs=xs), {}),
        ("params_b", ValueError, r"params\[1\]\.b",
         dict(params=(params[0], params[1]._replace(b=jnp.zeros((13,)))), xs=xs), {}),
        ("params_empty", TypeError, _name("params"), dict(params=(), xs=xs), {}),
        ("masks_output", ValueError, r"masks\.output\[0\]",
         dict(params=params, xs=xs, masks=lj.DropoutMasks((jnp.ones((B, T, H + 1)), None), None)), {}),
        ("masks_recurrent", ValueError, r"masks\.recurrent\[1\]",
         dict(params=params, xs=xs, masks=lj.DropoutMasks(None, (None, jnp.ones((B, T, 3))))), {}),
        ("impl", ValueError, _name("impl"), dict(params=params, xs=xs), dict(impl="nope")),
    ]


_CASE_IDS = [
    "xs_rank_2", "xs_rank_4", "xs_features", "xs_int", "state_layers", "state_h", "state_c",
    "lengths_shape", "lengths_float", "dropout", "recurrent_dropout", "no_key", "params_layers",
    "params_w_hh", "params_b", "params_empty", "masks_output", "masks_recurrent", "impl",
]


def test_jit_case_list_is_complete(params, xs):
    assert [c[0] for c in _bad_calls(params, xs)] == _CASE_IDS


@pytest.mark.parametrize("case_id", _CASE_IDS)
def test_same_error_at_trace_time_under_jit(params, xs, case_id):
    """Calling a jitted function with the bad input raises the same error (type and
    message) as the eager call: the checks run while tracing."""
    (_, exc, pattern, args, static), = [c for c in _bad_calls(params, xs) if c[0] == case_id]
    with pytest.raises(exc, match=pattern) as eager:
        lj.lstm(**args, **static)
    with pytest.raises(exc, match=pattern) as jitted:
        _jit_lstm(**static)(**args)
    assert str(jitted.value) == str(eager.value)


def test_error_raised_while_tracing_not_running(params, xs):
    """``jit(...).trace`` (tracing only, no compile or run) already raises."""
    f = _jit_lstm()
    with pytest.raises(ValueError, match=_name("xs")):
        f.trace(params, xs[0])
    with pytest.raises(ValueError, match=r"initial_state\[0\]\.h"):
        f.trace(params, xs, initial_state=(_state()[0]._replace(h=jnp.zeros((B, 1))), _state()[1]))


def test_lengths_range_not_checked_under_jit(params, xs):
    """Documented: the range check needs concrete values, so under jit it does not run
    (and out-of-range lengths behave like clamped ones)."""
    f = _jit_lstm()
    ys_over, final_over = f(params, xs, lengths=jnp.array([T + 4, -2]))
    ys_clamp, final_clamp = f(params, xs, lengths=jnp.array([T, 0]))
    np.testing.assert_array_equal(ys_over, ys_clamp)
    jax.tree_util.tree_map(np.testing.assert_array_equal, final_over, final_clamp)


def test_lstm_cell_under_jit(params):
    f = jax.jit(lj.lstm_cell)
    with pytest.raises(ValueError, match=_name("x")):
        f(params[0], _state()[0], jnp.zeros((B, F + 1)))


# --- regressions found while reviewing the properties above -----------------------------


def test_lengths_may_be_a_python_list():
    params = lj.init_lstm(jax.random.PRNGKey(0), 2, 3)
    xs = jnp.ones((2, 4, 2))
    ys_list, _ = lj.lstm(params, xs, lengths=[4, 1])
    ys_array, _ = lj.lstm(params, xs, lengths=jnp.array([4, 1]))
    np.testing.assert_array_equal(ys_list, ys_array)


@pytest.mark.parametrize("rate", ["0.5", True, None])
def test_dropout_rate_must_be_a_number(rate):
    params = lj.init_lstm(jax.random.PRNGKey(0), 2, 3)
    with pytest.raises(TypeError, match=r"\bdropout\b"):
        lj.lstm(params, jnp.ones((1, 2, 2)), dropout=rate, key=jax.random.PRNGKey(1))


def test_fused_gradient_of_an_empty_sequence_is_zero():
    params = lj.init_lstm(jax.random.PRNGKey(0), 2, 3)
    xs = jnp.ones((2, 0, 2))
    state = tuple(lj.LSTMState(jnp.ones((2, 3)), jnp.ones((2, 3))) for _ in params)

    def loss(p, s, impl):
        _, final = lj.lstm(p, xs, initial_state=s, impl=impl)
        return sum(jnp.sum(f.h * f.c) for f in final)

    g_fused = jax.grad(loss, (0, 1))(params, state, "fused")
    g_scan = jax.grad(loss, (0, 1))(params, state, "scan")
    for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_scan)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # With no steps the final state is the initial one: d(h*c)/dh = c = 1; weights get nothing.
    np.testing.assert_array_equal(g_fused[1][0].h, np.ones((2, 3)))
    assert all(float(jnp.abs(w).max()) == 0 for w in jax.tree.leaves(g_fused[0]))
