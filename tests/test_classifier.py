"""lj.init_classifier / lj.classify: shapes, the last valid step, dropout, argument checks,
and agreement with the NumPy float64 reference (tests/reference.py)."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lstm_jax as lj

_spec = importlib.util.spec_from_file_location("_lstm_reference_cls", pathlib.Path(__file__).with_name("reference.py"))
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

B, T, IN, H, C = 5, 7, 6, 8, 4


@pytest.fixture(scope="module")
def params():
    return lj.init_classifier(jax.random.PRNGKey(0), IN, H, 2, C)


@pytest.fixture(scope="module")
def xs():
    return jax.random.uniform(jax.random.PRNGKey(1), (B, T, IN))


def test_init_shapes_and_dtypes():
    p = lj.init_classifier(jax.random.PRNGKey(0), 28, 16, 3, 10)
    assert isinstance(p, lj.ClassifierParams)
    assert len(p.lstm) == 3
    assert p.lstm[0].w_ih.shape == (28, 64) and p.lstm[1].w_ih.shape == (16, 64)
    assert p.w_out.shape == (16, 10) and p.b_out.shape == (10,)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(p))
    assert np.all(np.asarray(p.b_out) == 0)
    p16 = lj.init_classifier(jax.random.PRNGKey(0), 28, 16, 1, 10, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(p16))
    # Deterministic in the key, different across keys.
    again = lj.init_classifier(jax.random.PRNGKey(0), 28, 16, 3, 10)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(again)))
    other = lj.init_classifier(jax.random.PRNGKey(1), 28, 16, 3, 10)
    assert not np.array_equal(p.w_out, other.w_out)


@pytest.mark.parametrize("arg", ["input_size", "hidden_size", "num_layers", "num_classes"])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_init_rejects_bad_sizes(arg, bad):
    kwargs = dict(input_size=4, hidden_size=4, num_layers=1, num_classes=3)
    kwargs[arg] = bad
    with pytest.raises(ValueError, match=arg):
        lj.init_classifier(jax.random.PRNGKey(0), **kwargs)


def test_init_rejects_int_dtype():
    with pytest.raises(TypeError, match="dtype"):
        lj.init_classifier(jax.random.PRNGKey(0), 4, 4, 1, 3, dtype=jnp.int32)


def test_logits_are_last_step_through_linear_layer(params, xs):
    logits = lj.classify(params, xs)
    assert logits.shape == (B, C) and logits.dtype == jnp.float32
    ys, _ = lj.lstm(params.lstm, xs, forget_bias=1.0)
    np.testing.assert_allclose(logits, ys[:, -1] @ params.w_out + params.b_out, rtol=1e-6, atol=1e-6)


def test_matches_numpy_reference(params, xs):
    lengths = np.array([7, 1, 3, 7, 5])
    labels = np.array([0, 1, 2, 3, 0])
    ys, _, _ = ref.lstm_forward([tuple(np.asarray(a) for a in p) for p in params.lstm], np.asarray(xs),
                                lengths=lengths, forget_bias=1.0)
    last = ys[np.arange(B), lengths - 1]
    want = last @ np.asarray(params.w_out, np.float64) + np.asarray(params.b_out, np.float64)
    got = lj.classify(params, xs, lengths=jnp.asarray(lengths))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    want_loss, _ = ref.classifier_forward(ys, lengths, np.asarray(params.w_out), np.asarray(params.b_out), labels)
    logp = jax.nn.log_softmax(got)
    np.testing.assert_allclose(-np.mean(np.asarray(logp)[np.arange(B), labels]), want_loss, rtol=1e-5)


def test_lengths_read_the_last_valid_step(params, xs):
    lengths = jnp.array([7, 1, 3, 6, 2])
    got = lj.classify(params, xs, lengths=lengths)
    for b in range(B):
        n = int(lengths[b])
        alone = lj.classify(params, xs[b:b + 1, :n])  # the truncated sequence, no lengths
        np.testing.assert_allclose(got[b], alone[0], rtol=1e-5, atol=1e-6)
    # Full lengths == no lengths.
    np.testing.assert_allclose(lj.classify(params, xs, lengths=jnp.full((B,), T)), lj.classify(params, xs),
                               rtol=1e-6, atol=1e-6)


def test_scan_and_fused_agree(params, xs):
    a = lj.classify(params, xs, impl="fused", unroll=2)
    b = lj.classify(params, xs, impl="scan")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_matmuls_reach_the_lstm(params, xs):
    got = lj.classify(params, xs, matmul_dtype=jnp.bfloat16)
    ys, _ = lj.lstm(params.lstm, xs, matmul_dtype=jnp.bfloat16)
    np.testing.assert_allclose(got, ys[:, -1] @ params.w_out + params.b_out, rtol=1e-6, atol=1e-6)
    f32 = lj.classify(params, xs)
    assert got.dtype == f32.dtype == jnp.float32
    assert not np.array_equal(got, f32)
    np.testing.assert_allclose(got, f32, atol=5e-2 * float(jnp.abs(f32).max()))


def test_dropout_on_the_head_input(params, xs):
    key = jax.random.PRNGKey(3)
    clean = lj.classify(params, xs)
    d1 = lj.classify(params, xs, dropout=0.5, key=key)
    d2 = lj.classify(params, xs, dropout=0.5, key=key)
    d3 = lj.classify(params, xs, dropout=0.5, key=jax.random.PRNGKey(4))
    np.testing.assert_array_equal(d1, d2)  # same key, same masks
    assert not np.allclose(d1, clean) and not np.allclose(d1, d3)
    # The top layer's output mask reaches the head: with explicit masks, zeroing the top
    # layer's last-step mask leaves only the bias.
    masks = lj.make_dropout_masks(key=key, params=params.lstm, batch_size=B, time_steps=T, dropout=0.5)
    top = masks.output[-1].at[:, -1, :].set(0.0)
    ys, _ = lj.lstm(params.lstm, xs, masks=lj.DropoutMasks((masks.output[0], top), None))
    np.testing.assert_allclose(ys[:, -1], 0.0)
    # Dropout in classify equals lstm's output (after dropout) through the linear layer.
    ys_d, _ = lj.lstm(params.lstm, xs, dropout=0.5, key=key)
    np.testing.assert_allclose(d1, ys_d[:, -1] @ params.w_out + params.b_out, rtol=1e-5, atol=1e-6)
    # Variational / recurrent dropout run and differ from plain dropout.
    dv = lj.classify(params, xs, dropout=0.5, variational=True, recurrent_dropout=0.2, key=key)
    assert dv.shape == (B, C) and not np.allclose(dv, d1)


def test_jit_and_grad(params, xs):
    labels = jnp.array([0, 1, 2, 3, 0])

    @jax.jit
    def loss(p, x, key):
        logits = lj.classify(p, x, dropout=0.3, key=key)
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(B), labels])

    g = jax.grad(loss)(params, xs, jax.random.PRNGKey(0))
    assert jax.tree.structure(g) == jax.tree.structure(params)
    assert all(np.all(np.isfinite(leaf)) and np.any(leaf != 0) for leaf in jax.tree.leaves(g))


@pytest.mark.parametrize(
    "call, exc, name",
    [
        (lambda p, x: lj.classify(p.lstm, x), TypeError, "params"),
        (lambda p, x: lj.classify(p._replace(w_out=p.w_out[:-1]), x), ValueError, "w_out"),
        (lambda p, x: lj.classify(p._replace(b_out=p.b_out[:-1]), x), ValueError, "b_out"),
        (lambda p, x: lj.classify(p, x[0]), ValueError, "xs"),
        (lambda p, x: lj.classify(p, x[..., :-1]), ValueError, "xs"),
        (lambda p, x: lj.classify(p, np.asarray(x).astype(np.int32)), TypeError, "xs"),
        (lambda p, x: lj.classify(p, x, lengths=jnp.array([1, 2])), ValueError, "lengths"),
        (lambda p, x: lj.classify(p, x, lengths=jnp.zeros((B,), jnp.int32)), ValueError, "lengths"),
        (lambda p, x: lj.classify(p, x, lengths=jnp.full((B,), T + 1)), ValueError, "lengths"),
        (lambda p, x: lj.classify(p, x, lengths=jnp.full((B,), 2.0)), TypeError, "lengths"),
        (lambda p, x: lj.classify(p, x, dropout=0.5), ValueError, "key"),
        (lambda p, x: lj.classify(p, x, dropout=1.0, key=jax.random.PRNGKey(0)), ValueError, "dropout"),
        (lambda p, x: lj.classify(p, x, impl="cudnn"), ValueError, "impl"),
    ],
)
def test_bad_arguments_name_the_argument(params, xs, call, exc, name):
    with pytest.raises(exc, match=name):
        call(params, xs)
