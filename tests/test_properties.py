"""Property-based tests of lstm_jax (hypothesis, small sizes including 1).

Each property is checked for both layer implementations (``impl="fused"``, the
hand-written custom_vjp, and ``impl="scan"``, autodiff through ``lax.scan``) where the
implementation matters.  Sizes: batch 1-5, time 1-7, features 1-9, hidden 1-9 (per
layer, so layers may differ in width), layers 1-3.  Tolerances are float32: relative
error 1e-5 per element against max(|element|, the leaf's max |value|), plus 1e-6 absolute
(see ``assert_tree_close``), unless stated otherwise; some checks are exact.

Run time is almost all XLA compilation (1-2 s per layer for a gradient function, per
new shape, on a 2-core CPU), and every new shape compiles again.  So:

* ``cases()`` draws sizes from a small pool ``POOL`` of shapes that together cover every
  size range's ends (1 and the maximum, hidden 1 in a middle of a stack) and 1 and 3
  layers, and (``free=True``, the forward-only properties, which compile faster) about
  one draw in four freely from the full ranges.  Fixed-shape tests add 2-layer stacks.
  The values (weights, inputs, lengths, masks, keys) are always fresh, and the jitted
  functions are module-level, so a pool shape compiles once for the whole file.
* XLA's expensive optimisations are switched off while this module runs
  (``jax_disable_most_optimizations``, restored afterwards): these tests compare
  lstm_jax's computations with each other, not XLA's optimiser.  The exception is
  ``test_jit_equals_eager``, which runs with the optimiser on and its own jit cache.

Environment knobs for a more thorough run:

* ``LSTM_JAX_PROPERTY_EXAMPLES`` (default 15): hypothesis examples per property;
* ``LSTM_JAX_PROPERTY_SIZES=free``: draw every size freely (no pool) everywhere.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import lstm_jax as lj

IMPLS = ("fused", "scan")
RTOL, ATOL = 1e-5, 1e-6

EXAMPLES = int(os.environ.get("LSTM_JAX_PROPERTY_EXAMPLES", "15"))
FREE_SIZES = os.environ.get("LSTM_JAX_PROPERTY_SIZES", "").strip().lower() == "free"


def examples(n=EXAMPLES):
    return settings(max_examples=n, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


SETTINGS = examples()


@pytest.fixture(scope="module", autouse=True)
def _cheap_compiles():
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture
def xla_optimizations_on():
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", old)


#: (batch, time, features, hidden per layer); all ones first (hypothesis shrinks to it).
POOL = (
    (1, 1, 1, (1,)),
    (5, 7, 9, (1, 9, 3)),
)


class Case:
    """One random problem: sizes plus a seed from which every array is derived (with NumPy,
    so that building a case compiles nothing)."""

    def __init__(self, batch, time, features, hidden, seed):
        self.B, self.T, self.F = batch, time, features
        self.hidden = tuple(hidden)  # one per layer
        self.L = len(self.hidden)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def __repr__(self):
        return f"Case(B={self.B}, T={self.T}, F={self.F}, hidden={self.hidden}, seed={self.seed})"

    def _f32(self, a):
        return jnp.asarray(np.asarray(a, np.float32))  # cast on the host: no per-shape compile

    def params(self):
        """Per-layer hidden sizes; weights as init_lstm draws them, biases scaled up so the
        gates are not all near 0.5."""
        rng = np.random.default_rng(self.seed)  # the same params however often it is called
        layers, in_size = [], self.F
        for h in self.hidden:
            bound = 1.0 / np.sqrt(h)
            layers.append(lj.LSTMLayerParams(
                w_ih=self._f32(rng.uniform(-bound, bound, (in_size, 4 * h))),
                w_hh=self._f32(rng.uniform(-bound, bound, (h, 4 * h))),
                b=self._f32(rng.uniform(-2 * bound, 2 * bound, (4 * h,))),
            ))
            in_size = h
        return tuple(layers)

    def xs(self):
        return self._f32(self.rng.normal(size=(self.B, self.T, self.F)))

    def state(self):
        return tuple(
            lj.LSTMState(self._f32(self.rng.normal(size=(self.B, h)) * 0.5),
                         self._f32(self.rng.normal(size=(self.B, h))))
            for h in self.hidden
        )

    def lengths(self):
        return jnp.asarray(self.rng.integers(0, self.T + 1, size=(self.B,)).astype(np.int32))

    def masks(self, rate=0.4, recurrent_rate=0.3, variational=False):
        """Explicit scaled masks (NumPy-sampled); variational output masks are [B, 1, H]."""
        def mask(shape, r):
            return self._f32((self.rng.random(shape) >= r) / (1.0 - r))

        steps = 1 if variational else self.T
        return lj.DropoutMasks(
            output=tuple(mask((self.B, steps, h), rate) for h in self.hidden),
            recurrent=tuple(mask((self.B, h), recurrent_rate) for h in self.hidden),
        )


@st.composite
def cases(draw, free=False):
    """A Case: sizes from POOL or (when ``free``, about one draw in four) from the full
    ranges, and a fresh seed."""
    seed = draw(st.integers(0, 2**20))
    max_layers = 3
    if FREE_SIZES or (free and draw(st.sampled_from(["pool", "pool", "pool", "free"])) == "free"):
        num_layers = draw(st.integers(1, max_layers))
        return Case(
            batch=draw(st.integers(1, 5)),
            time=draw(st.integers(1, 7)),
            features=draw(st.integers(1, 9)),
            hidden=[draw(st.integers(1, 9)) for _ in range(num_layers)],
            seed=seed,
        )
    batch, time, features, hidden = draw(st.sampled_from(POOL))
    return Case(batch, time, features, hidden, seed)


ONES = Case(1, 1, 1, (1,), 0)
ONES_DEEP = Case(1, 1, 1, (1, 1, 1), 1)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def assert_tree_close(a, b, rtol=RTOL, atol=ATOL, err_msg=""):
    """Same structure, shapes and dtypes, and per leaf ``|a - b| <= atol + rtol * (|b| +
    max|b|)``: a relative error ``rtol`` measured against the leaf's scale, so that an
    element of a gradient that nearly cancels (a sum of float32 terms much larger than
    itself) is judged on the scale of its terms, not of its tiny value."""
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb, (ta, tb)
    for i, (x, y) in enumerate(zip(la, lb)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape, (i, x.shape, y.shape)
        assert x.dtype == y.dtype, (i, x.dtype, y.dtype)
        scale = float(np.max(np.abs(y))) if y.size else 0.0
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol + rtol * scale, err_msg=f"leaf {i} {err_msg}")


def take(tree, i):
    """``tree``'s leaves indexed on the host (eager indexing would compile per shape)."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[i], tree)


_STATIC = ("impl", "forget_bias", "dropout", "recurrent_dropout", "variational", "unroll")
lstm_jit = jax.jit(lj.lstm, static_argnames=_STATIC)

make_masks_jit = jax.jit(
    lj.make_dropout_masks,
    static_argnames=("batch_size", "time_steps", "dropout", "recurrent_dropout", "variational"),
)


def _probe_loss(params, xs, initial_state, masks, lengths, probe, *, impl):
    """A random linear functional of the outputs and of every layer's final (h, c)."""
    out = lj.lstm(params, xs, initial_state=initial_state, lengths=lengths, masks=masks, impl=impl)
    ys, final = out
    wy, wstate = probe
    total = jnp.sum(ys * wy)
    for s, (wh, wc) in zip(final, wstate):
        total = total + jnp.sum(s.h * wh) + jnp.sum(s.c * wc)
    return total, out


_probe_vg = jax.value_and_grad(_probe_loss, argnums=(0, 1, 2, 3), has_aux=True)


@functools.partial(jax.jit, static_argnames="impl")
def probe_all(params, xs, initial_state, masks, lengths, probe, *, impl):
    """One compilation giving ``lstm``'s outputs, the probe's value and its gradient with
    respect to (params, xs, initial_state, masks)."""
    (value, out), grads = _probe_vg(params, xs, initial_state, masks, lengths, probe, impl=impl)
    return out, value, grads


def make_probe(case):
    rng = np.random.default_rng(case.seed + 7)
    wy = case._f32(rng.normal(size=(case.B, case.T, case.hidden[-1])))
    wstate = tuple(
        (case._f32(rng.normal(size=(case.B, h))), case._f32(rng.normal(size=(case.B, h))))
        for h in case.hidden
    )
    return wy, wstate


def cell_reference(params, xs, *, initial_state=None, lengths=None, masks=None, forget_bias=1.0):
    """``lstm`` rebuilt from ``lstm_cell`` with Python loops over layers and time.

    Recurrent dropout multiplies the h fed back into the cell (the carried state is not
    dropped); output dropout multiplies each layer's outputs; steps past ``lengths`` keep
    the state and output zeros.
    """
    B, T, _ = xs.shape
    x = xs
    final = []
    for k, p in enumerate(params):
        H = p.w_hh.shape[0]
        if initial_state is None:
            h, c = jnp.zeros((B, H), xs.dtype), jnp.zeros((B, H), xs.dtype)
        else:
            h, c = initial_state[k]
        rmask = None if masks is None or masks.recurrent is None else masks.recurrent[k]
        omask = None if masks is None or masks.output is None else masks.output[k]
        outs = []
        for t in range(T):
            h_in = h if rmask is None else h * rmask
            new, y = lj.lstm_cell(p, lj.LSTMState(h_in, c), x[:, t], forget_bias=forget_bias)
            assert y is new.h
            if lengths is not None:
                v = (t < lengths)[:, None]
                y = jnp.where(v, y, 0.0)
                h, c = jnp.where(v, new.h, h), jnp.where(v, new.c, c)
            else:
                h, c = new.h, new.c
            outs.append(y)
        ys = jnp.stack(outs, axis=1)
        if omask is not None:
            ys = ys * jnp.broadcast_to(omask, ys.shape)
        final.append(lj.LSTMState(h, c))
        x = ys
    return x, tuple(final)


# forget_bias is a traced argument here, so both values share one compilation.
cell_reference_jit = jax.jit(cell_reference)


@functools.partial(jax.jit, static_argnames="impl")
def lstm_traced_forget_bias(params, xs, forget_bias, *, initial_state=None, lengths=None, masks=None, impl):
    return lj.lstm(params, xs, initial_state=initial_state, lengths=lengths, masks=masks,
                   forget_bias=forget_bias, impl=impl)


# ---------------------------------------------------------------------------
# jit / vmap
# ---------------------------------------------------------------------------


_lstm_jit_optimized = jax.jit(lj.lstm, static_argnames=_STATIC)  # its own cache: see the module doc


@pytest.mark.parametrize("impl", IMPLS)
@examples(min(EXAMPLES, 6))  # the eager side recompiles lax.scan on every call
@given(case=cases(), extras=st.booleans())
@example(case=ONES, extras=True)
def test_jit_equals_eager(impl, case, extras, xla_optimizations_on):
    """With and (``extras``) without initial state, lengths and dropout masks."""
    params, xs = case.params(), case.xs()
    kw = dict(initial_state=case.state(), lengths=case.lengths(), masks=case.masks()) if extras else {}
    assert_tree_close(_lstm_jit_optimized(params, xs, impl=impl, **kw), lj.lstm(params, xs, impl=impl, **kw))


@functools.lru_cache(maxsize=None)
def _vmapped_lstm(impl, batched_params):
    def f(params, xs, s0, lengths, masks):
        return lj.lstm(params, xs, initial_state=s0, lengths=lengths, masks=masks, impl=impl)

    return jax.jit(jax.vmap(f, in_axes=(0 if batched_params else None, 0, 0, 0, 0)))


def _stack_trees(trees):
    return jax.tree_util.tree_map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *trees)


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(case=cases(free=True))
@example(case=ONES)
def test_vmap_equals_python_loop(impl, case):
    """vmap over a new leading axis (of size 2) of xs, initial state, lengths and masks,
    against a Python loop over that axis."""
    subs = [Case(case.B, case.T, case.F, case.hidden, case.seed + 1000 * i) for i in range(2)]
    params = case.params()
    items = [(sub.xs(), sub.state(), sub.lengths(), sub.masks()) for sub in subs]
    got = _vmapped_lstm(impl, False)(params, *(_stack_trees([it[j] for it in items]) for j in range(4)))
    for i, (x, s, ln, m) in enumerate(items):
        want = lstm_jit(params, x, initial_state=s, lengths=ln, masks=m, impl=impl)
        assert_tree_close(take(got, i), want, err_msg=f"item {i}")


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_over_params_ensemble(impl):
    """vmap over params too (an ensemble of 3 models), against a Python loop."""
    subs = [Case(3, 4, 6, (4, 2), 40 + i) for i in range(3)]
    items = [(sub.params(), sub.xs(), sub.state(), sub.lengths(), sub.masks()) for sub in subs]
    got = _vmapped_lstm(impl, True)(*(_stack_trees([it[j] for it in items]) for j in range(5)))
    for i, (p, x, s, ln, m) in enumerate(items):
        want = lstm_jit(p, x, initial_state=s, lengths=ln, masks=m, impl=impl)
        assert_tree_close(take(got, i), want, err_msg=f"model {i}")


def _example_loss(params, x, ln, m, w, impl):
    masks = lj.DropoutMasks(tuple(o[None] for o in m.output), tuple(r[None] for r in m.recurrent))
    ys, final = lj.lstm(params, x[None], lengths=ln[None], masks=masks, impl=impl)
    return jnp.sum(ys[0] * w) + sum(jnp.sum(s.c) for s in final)


@functools.lru_cache(maxsize=None)
def _grad_fns(impl):
    grad = jax.grad(functools.partial(_example_loss, impl=impl), argnums=(0, 1, 3))
    return jax.jit(grad), jax.jit(jax.vmap(grad, in_axes=(None, 0, 0, 0, 0)))


@pytest.mark.parametrize(
    "impl, case", [("fused", ONES), ("fused", Case(3, 4, 6, (4, 2), 50)), ("scan", ONES), ("scan", Case(3, 4, 2, (3,), 51))],
    ids=["fused-ones", "fused-2layers", "scan-ones", "scan-1layer"],
)
def test_vmap_of_grad_equals_python_loop(impl, case):
    """Per-example gradients (w.r.t. params, inputs and masks): vmap(grad), which batches
    through the custom_vjp, against a loop. (Fixed shapes, to save compilations: see
    test_vmap_equals_python_loop for drawn ones.)"""
    params, xs, lengths, masks = case.params(), case.xs(), case.lengths(), case.masks()
    w = case._f32(case.rng.normal(size=(case.B, case.T, case.hidden[-1])))
    example_grad, per_example_grads = _grad_fns(impl)
    got = per_example_grads(params, xs, lengths, masks, w)
    for b in range(case.B):
        m_b = take(masks, b)
        want = example_grad(params, xs[b], lengths[b], m_b, w[b])
        assert_tree_close(take(got, b), want, err_msg=f"example {b}")


# ---------------------------------------------------------------------------
# lengths
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(case=cases())
@example(case=ONES)
def test_full_lengths_equal_no_lengths(impl, case):
    """lengths == T everywhere gives the outputs, final state and gradients of no lengths."""
    params, xs, s0 = case.params(), case.xs(), case.state()
    probe = make_probe(case)
    full = np.full((case.B,), case.T, np.int32)
    assert_tree_close(probe_all(params, xs, s0, None, full, probe, impl=impl),
                      probe_all(params, xs, s0, None, None, probe, impl=impl))


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(case=cases())
@example(case=ONES)
def test_values_past_lengths_do_not_leak(impl, case):
    """Values written past ``lengths`` change neither the valid outputs, nor the final
    state, nor any gradient; outputs past ``lengths`` are exactly zero; the gradient w.r.t.
    padded inputs is exactly zero (with an initial state and dropout masks)."""
    params, xs, s0, lengths, masks = case.params(), case.xs(), case.state(), case.lengths(), case.masks()
    pad = np.arange(case.T)[None, :, None] >= np.asarray(lengths)[:, None, None]  # [B, T, 1]
    junk = case.rng.normal(size=xs.shape) * 100.0
    xs_junk = case._f32(np.where(pad, junk, xs))
    probe = make_probe(case)

    (ys, final), value, grads = probe_all(params, xs, s0, masks, lengths, probe, impl=impl)
    (ys_j, final_j), value_j, grads_j = probe_all(params, xs_junk, s0, masks, lengths, probe, impl=impl)
    pad_y = np.broadcast_to(pad, ys.shape)
    assert np.all(np.asarray(ys)[pad_y] == 0.0)
    assert np.all(np.asarray(ys_j)[pad_y] == 0.0)
    gx = np.asarray(grads[1])
    assert np.all(gx[np.broadcast_to(pad, gx.shape)] == 0.0)
    assert_tree_close((ys, final), (ys_j, final_j))
    assert_tree_close((value, grads), (value_j, grads_j))


@pytest.mark.parametrize("impl", IMPLS)
def test_lengths_equal_truncated_sequences(impl):
    """Each sequence, run alone and truncated to its length, gives the same valid outputs
    and final state (length 0: the initial state); dropout masks included."""
    case = Case(4, 5, 3, (4, 2), 17)
    params, xs, s0, masks = case.params(), case.xs(), case.state(), case.masks()
    lengths = jnp.asarray(np.array([0, 5, 2, 1], np.int32))
    ys, final = lstm_jit(params, xs, initial_state=s0, lengths=lengths, masks=masks, impl=impl)
    for b in range(case.B):
        n = int(lengths[b])
        s0_b = take(s0, slice(b, b + 1))
        if n == 0:
            want_final = s0_b
            assert np.all(np.asarray(ys[b]) == 0.0)
        else:
            masks_b = lj.DropoutMasks(
                output=take(masks.output, (slice(b, b + 1), slice(0, n))),
                recurrent=take(masks.recurrent, slice(b, b + 1)),
            )
            ys_b, want_final = lstm_jit(params, take(xs, (slice(b, b + 1), slice(0, n))), initial_state=s0_b,
                                        masks=masks_b, impl=impl)
            np.testing.assert_allclose(ys[b, :n], ys_b[0], rtol=RTOL, atol=ATOL)
        got_final = take(final, slice(b, b + 1))
        assert_tree_close(got_final, want_final, err_msg=f"sequence {b} (length {n})")


# ---------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="impl")
def _rate_zero_variants(params, xs, s0, key, *, impl):
    """lstm without dropout arguments, then every way of asking for rate-0 dropout."""
    kw = dict(initial_state=s0, impl=impl)
    plain = lj.lstm(params, xs, **kw)
    variants = []
    for variational in (False, True):
        for k in (None, key):
            variants.append(lj.lstm(params, xs, dropout=0.0, recurrent_dropout=0.0, variational=variational,
                                    key=k, **kw))
        masks = lj.make_dropout_masks(key=key, params=params, batch_size=xs.shape[0], time_steps=xs.shape[1],
                                      variational=variational)
        assert masks == lj.DropoutMasks(None, None)  # rate 0: no masks at all
        variants.append(lj.lstm(params, xs, masks=masks, **kw))
    return plain, variants


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(case=cases())
@example(case=ONES)
def test_rate_zero_dropout_is_identity(impl, case):
    """dropout = recurrent_dropout = 0 (variational or not) is no dropout at all and
    needs no key; make_dropout_masks at rate 0 gives no masks."""
    plain, variants = _rate_zero_variants(case.params(), case.xs(), case.state(), jax.random.PRNGKey(case.seed),
                                          impl=impl)
    for i, v in enumerate(variants):
        assert_tree_close(v, plain, rtol=0, atol=0, err_msg=f"variant {i}")


def test_rate_zero_dropout_eager_needs_no_key():
    case = Case(2, 3, 4, (3, 2), 3)
    params, xs = case.params(), case.xs()
    want = lj.lstm(params, xs)
    for variational in (False, True):
        got = lj.lstm(params, xs, dropout=0.0, recurrent_dropout=0, variational=variational, key=None)
        assert_tree_close(got, want, rtol=0, atol=0)


RATES = st.sampled_from([0.0, 0.1, 0.5, 0.9])


@examples(min(EXAMPLES, 10))  # every (shape, rates, variational) compiles
@given(case=cases(free=True), rate=RATES, recurrent_rate=RATES, variational=st.booleans())
@example(case=ONES, rate=0.5, recurrent_rate=0.5, variational=True)
def test_make_dropout_masks_structure(case, rate, recurrent_rate, variational):
    """Shapes, dtype, values in {0, 1/(1-rate)}; variational masks equal at every step."""
    params = case.params()
    m = make_masks_jit(key=jax.random.PRNGKey(case.seed), params=params, batch_size=case.B,
                       time_steps=case.T, dropout=rate, recurrent_dropout=recurrent_rate,
                       variational=variational)
    assert isinstance(m, lj.DropoutMasks)
    if rate == 0:
        assert m.output is None
    else:
        assert len(m.output) == case.L
        scale = np.float32(1.0) / np.float32(1.0 - rate)
        for k, (mask, h) in enumerate(zip(m.output, case.hidden)):
            mask = np.asarray(mask)
            assert mask.shape == (case.B, case.T, h) and mask.dtype == np.float32
            assert np.all((mask == 0) | np.isclose(mask, scale, rtol=1e-6, atol=0)), (k, np.unique(mask))
            if variational:
                # Exactly the same mask at every timestep.
                assert np.array_equal(mask, np.broadcast_to(mask[:, :1], mask.shape))
    if recurrent_rate == 0:
        assert m.recurrent is None
    else:
        assert len(m.recurrent) == case.L
        scale = np.float32(1.0) / np.float32(1.0 - recurrent_rate)
        for mask, h in zip(m.recurrent, case.hidden):
            mask = np.asarray(mask)
            assert mask.shape == (case.B, h) and mask.dtype == np.float32
            assert np.all((mask == 0) | np.isclose(mask, scale, rtol=1e-6, atol=0))


@pytest.mark.parametrize("variational", [False, True])
def test_dropout_masks_vary_across_time_unless_variational(variational):
    """On a case large enough that equal masks by chance are impossible in practice
    (P ~ 2**-(B*H) per pair of steps), non-variational masks differ between timesteps,
    variational ones do not; the keep rate is about 1 - rate; layers and the two kinds of
    dropout get different masks."""
    params = Case(8, 16, 3, (32, 32), 0).params()
    rate = 0.5
    m = lj.make_dropout_masks(key=jax.random.PRNGKey(42), params=params, batch_size=8, time_steps=16,
                              dropout=rate, recurrent_dropout=rate, variational=variational)
    for mask in m.output:
        mask = np.asarray(mask)
        same_as_step0 = [np.array_equal(mask[:, t], mask[:, 0]) for t in range(16)]
        if variational:
            assert all(same_as_step0)
        else:
            assert not any(same_as_step0[1:])
        keep = float(np.mean(mask > 0))
        assert abs(keep - (1 - rate)) < 0.05, keep
    assert not np.array_equal(m.output[0], m.output[1])
    assert not np.array_equal(m.recurrent[0], m.recurrent[1])
    assert not np.array_equal(m.recurrent[0], np.asarray(m.output[0])[:, 0])


@functools.partial(jax.jit, static_argnames=("impl", "dropout", "recurrent_dropout", "variational"))
def _key_vs_masks(params, xs, s0, lengths, key, *, impl, dropout, recurrent_dropout, variational):
    rates = dict(dropout=dropout, recurrent_dropout=recurrent_dropout, variational=variational)
    B, T, _ = xs.shape
    masks = lj.make_dropout_masks(key=key, params=params, batch_size=B, time_steps=T, **rates)
    explicit = lj.lstm(params, xs, initial_state=s0, lengths=lengths, masks=masks, impl=impl)
    sampled = lj.lstm(params, xs, initial_state=s0, lengths=lengths, key=key, impl=impl, **rates)
    return explicit, sampled


@examples(min(EXAMPLES, 8))  # every (shape, rates, variational, impl) compiles
@given(case=cases(), rates=st.sampled_from([(0.5, 0.0), (0.0, 0.5), (0.3, 0.6)]), variational=st.booleans(),
       impl=st.sampled_from(IMPLS))
@example(case=ONES, rates=(0.5, 0.5), variational=True, impl="fused")
@example(case=Case(5, 7, 9, (1, 9, 3), 9), rates=(0.5, 0.5), variational=True, impl="fused")
@example(case=Case(5, 7, 9, (1, 9, 3), 9), rates=(0.5, 0.5), variational=False, impl="scan")
def test_key_sampling_equals_explicit_masks(case, rates, variational, impl):
    """lstm(key=k, rates) == lstm(masks=make_dropout_masks(key=k, same rates)) (for
    variational, lstm keeps [B, 1, H] masks internally; the values must still match).
    Sampling happens before the layers, so ``impl`` is drawn rather than parametrized."""
    params, xs, s0, lengths = case.params(), case.xs(), case.state(), case.lengths()
    explicit, sampled = _key_vs_masks(params, xs, s0, lengths, jax.random.PRNGKey(case.seed), impl=impl,
                                      dropout=rates[0], recurrent_dropout=rates[1], variational=variational)
    assert_tree_close(sampled, explicit)


def test_key_sampling_equals_explicit_masks_eager():
    case = Case(3, 4, 2, (3, 2), 4)
    params, xs = case.params(), case.xs()
    key = jax.random.PRNGKey(7)
    rates = dict(dropout=0.5, recurrent_dropout=0.3, variational=True)
    masks = lj.make_dropout_masks(key=key, params=params, batch_size=3, time_steps=4, **rates)
    got = lj.lstm(params, xs, key=key, **rates)
    assert_tree_close(got, lj.lstm(params, xs, masks=masks))
    # The masks matter: another key gives other outputs.
    other = lj.lstm(params, xs, key=jax.random.PRNGKey(8), **rates)
    assert not np.allclose(other[0], got[0])


# ---------------------------------------------------------------------------
# lstm_cell loop == lstm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(case=cases(), other_forget_bias=st.sampled_from([0.0, -0.7, 2.5]))
@example(case=ONES, other_forget_bias=0.0)
@example(case=ONES_DEEP, other_forget_bias=2.5)
def test_cell_loop_equals_lstm(impl, case, other_forget_bias):
    """``lstm_cell`` stepped in Python over layers and time equals ``lstm``, for
    forget_bias 1.0 and another value, with an initial state, lengths and dropout masks
    (test_forget_bias_static_values checks the plain call)."""
    params, xs = case.params(), case.xs()
    kw = dict(initial_state=case.state(), lengths=case.lengths(), masks=case.masks())
    for forget_bias in (1.0, other_forget_bias):
        fb = jnp.float32(forget_bias)
        want = cell_reference_jit(params, xs, forget_bias=fb, **kw)
        got = lstm_traced_forget_bias(params, xs, fb, impl=impl, **kw)
        assert_tree_close(got, want, err_msg=f"forget_bias={forget_bias}")


def test_forget_bias_static_values():
    """forget_bias as a Python float (including the 0.0 shortcut), no other options: the
    default is 1.0, the cell loop agrees, and forget_bias f equals adding f to b[H:2H]."""
    case = Case(2, 3, 4, (5, 3), 11)
    params, xs = case.params(), case.xs()
    default = cell_reference_jit(params, xs, forget_bias=jnp.float32(1.0))
    for impl in IMPLS:
        assert_tree_close(lj.lstm(params, xs, impl=impl), default)
    assert_tree_close(lj.lstm(params, xs, forget_bias=0.0), cell_reference_jit(params, xs, forget_bias=jnp.float32(0.0)))
    shifted = tuple(p._replace(b=p.b.at[p.w_hh.shape[0]:2 * p.w_hh.shape[0]].add(0.5)) for p in params)
    assert_tree_close(lj.lstm(params, xs, forget_bias=1.5), lj.lstm(shifted, xs))


# ---------------------------------------------------------------------------
# fused == scan, values and gradients
# ---------------------------------------------------------------------------


@SETTINGS
@given(case=cases(), options=st.sampled_from(["plain", "lengths", "lengths+masks"]))
@example(case=ONES, options="lengths+masks")
@example(case=ONES_DEEP, options="lengths+masks")
def test_fused_equals_scan_values_and_grads(case, options):
    """The custom_vjp layer against autodiff through lax.scan: outputs, final states, and
    the gradient of a random linear functional of (outputs, final h and c of every layer)
    w.r.t. params, xs, the initial state and the dropout masks (the last exercises the
    recurrent-mask cotangent), within float32 rounding (rtol 1e-5, atol 1e-6)."""
    params, xs, s0 = case.params(), case.xs(), case.state()
    lengths = case.lengths() if "lengths" in options else None
    masks = case.masks() if "masks" in options else None
    probe = make_probe(case)
    fused = probe_all(params, xs, s0, masks, lengths, probe, impl="fused")
    scan = probe_all(params, xs, s0, masks, lengths, probe, impl="scan")
    assert_tree_close(fused, scan)


def test_fused_equals_scan_variational_masks():
    """Variational ([B, 1, H]) output masks and zero-state defaults, fused vs scan."""
    case = Case(3, 4, 6, (4, 2), 8)
    params, xs, lengths = case.params(), case.xs(), case.lengths()
    masks = case.masks(variational=True)
    assert masks.output[0].shape == (3, 1, 4)
    probe = make_probe(case)
    fused = probe_all(params, xs, None, masks, lengths, probe, impl="fused")
    scan = probe_all(params, xs, None, masks, lengths, probe, impl="scan")
    assert_tree_close(fused, scan)


def test_unroll_does_not_change_results():
    """unroll=3 over T=7 (so with a remainder) changes neither values nor gradients."""
    case = Case(3, 7, 4, (5,), 21)
    params, xs, s0, lengths, masks = case.params(), case.xs(), case.state(), case.lengths(), case.masks()
    probe = make_probe(case)
    want = probe_all(params, xs, s0, masks, lengths, probe, impl="scan")

    @functools.partial(jax.jit, static_argnames=("impl", "unroll"))
    def f(params, xs, *, impl, unroll):
        def loss(params, xs):
            out = lj.lstm(params, xs, initial_state=s0, lengths=lengths, masks=masks, impl=impl, unroll=unroll)
            ys, final = out
            total = jnp.sum(ys * probe[0])
            for s, (wh, wc) in zip(final, probe[1]):
                total = total + jnp.sum(s.h * wh) + jnp.sum(s.c * wc)
            return total, out

        (value, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, xs)
        return out, value, grads

    for impl in IMPLS:
        out, value, grads = f(params, xs, impl=impl, unroll=3)
        assert_tree_close((out, value, grads), (want[0], want[1], want[2][:2]), err_msg=impl)
