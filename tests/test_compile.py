"""No recompilation: calling a jitted lstm function again with new values of the same
shapes and dtypes must neither retrace nor recompile.

Three independent witnesses are checked around the second (and later) calls:

* a Python counter incremented inside the traced function (counts traces);
* JAX's monitoring events ``/jax/core/compile/jaxpr_trace_duration`` and
  ``/jax/core/compile/backend_compile_duration`` (recorded for every trace and every XLA
  compilation, also for ones a library does internally, e.g. an eager op);
* ``jitted._cache_size()`` (the number of entries in the jit cache), where it exists.

Everything the later calls need (new params, inputs, keys) is built before counting starts,
so that building it (which may compile small eager ops) is not counted.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lstm_jax as lj

IMPLS = ("fused", "scan")
B, T, F, H, C = 3, 5, 4, 6, 3  # batch, time, features, hidden, classes
L = 1  # layers; 2 in the training step (compile time grows with layers, recompiling does not)

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class EventCounter:
    def __init__(self):
        self.traces = 0
        self.compiles = 0

    def __call__(self, event, duration_secs, **kwargs):
        if event == TRACE_EVENT:
            self.traces += 1
        elif event == COMPILE_EVENT:
            self.compiles += 1


@contextlib.contextmanager
def count_events():
    counter = EventCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(counter)


def cache_size(jitted):
    return jitted._cache_size() if hasattr(jitted, "_cache_size") else None


def _rng(seed):
    return np.random.default_rng(seed)


def new_params(seed, layers=L):
    return lj.init_lstm(jax.random.PRNGKey(seed), F, H, layers)


def new_xs(seed):
    return jnp.asarray(_rng(seed).normal(size=(B, T, F)), jnp.float32)


def new_lengths(seed):
    return jnp.asarray(_rng(seed).integers(0, T + 1, size=(B,)), jnp.int32)


def new_state(seed, layers=L):
    r = _rng(seed)
    return tuple(
        lj.LSTMState(jnp.asarray(r.normal(size=(B, H)), jnp.float32), jnp.asarray(r.normal(size=(B, H)), jnp.float32))
        for _ in range(layers)
    )


def assert_no_recompile(fn, traced, calls, check_cache_size=True):
    """Calls ``fn(*args)`` for each ``args`` in ``calls``: the first may trace and compile,
    the later ones must do neither. ``traced`` is a one-element list counting traces."""
    out = jax.block_until_ready(fn(*calls[0]))
    assert traced[0] == 1, traced
    size = cache_size(fn)
    outs = [out]
    with count_events() as events:
        for args in calls[1:]:
            outs.append(jax.block_until_ready(fn(*args)))
    assert traced[0] == 1, f"retraced: {traced[0]} traces"
    assert events.traces == 0, f"{events.traces} traces during repeat calls"
    assert events.compiles == 0, f"{events.compiles} compilations during repeat calls"
    if size is not None and check_cache_size:
        assert size == 1 and cache_size(fn) == 1
    # New values really were used (the calls did not hit some stale constant).
    first = jax.tree_util.tree_leaves(outs[0])[0]
    assert any(not np.array_equal(first, jax.tree_util.tree_leaves(o)[0]) for o in outs[1:])
    return outs


def test_event_counter_sees_a_compile():
    """The witnesses themselves work: a new shape is one trace and one compilation."""
    traced = [0]

    @jax.jit
    def f(x):
        traced[0] += 1
        return x * 2.0

    f(jnp.ones(3))
    with count_events() as events:
        f(jnp.ones(4))
    assert traced[0] == 2
    assert events.traces >= 1 and events.compiles >= 1
    if cache_size(f) is not None:
        assert cache_size(f) == 2


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_no_recompile(impl):
    traced = [0]

    @jax.jit
    def f(params, xs):
        traced[0] += 1
        return lj.lstm(params, xs, impl=impl)

    assert_no_recompile(f, traced, [(new_params(s), new_xs(s)) for s in range(3)])


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_with_lengths_and_state_no_recompile(impl):
    traced = [0]

    @jax.jit
    def f(params, xs, lengths, state):
        traced[0] += 1
        return lj.lstm(params, xs, lengths=lengths, initial_state=state, impl=impl)

    calls = [(new_params(s), new_xs(s), new_lengths(s), new_state(s)) for s in range(3)]
    assert len({tuple(np.asarray(c[2])) for c in calls}) > 1  # the lengths values differ
    assert_no_recompile(f, traced, calls)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("key_kind, variational", [("PRNGKey", False), ("typed_key", True)])
def test_forward_with_dropout_key_no_recompile(impl, key_kind, variational):
    """New key values (raw uint32 PRNGKey or a typed jax.random.key) do not recompile."""
    traced = [0]
    make_key = jax.random.PRNGKey if key_kind == "PRNGKey" else jax.random.key

    @jax.jit
    def f(params, xs, lengths, key):
        traced[0] += 1
        return lj.lstm(params, xs, lengths=lengths, dropout=0.3, recurrent_dropout=0.2,
                       variational=variational, key=key, impl=impl)

    params, xs, lengths = new_params(0), new_xs(0), new_lengths(0)
    keys = [make_key(s) for s in range(4)]
    outs = assert_no_recompile(f, traced, [(params, xs, lengths, k) for k in keys])
    # Same params and inputs, new keys: different masks give different outputs.
    assert not np.array_equal(outs[0][0], outs[1][0])


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_with_explicit_masks_no_recompile(impl):
    traced = [0]

    @jax.jit
    def f(params, xs, masks):
        traced[0] += 1
        return lj.lstm(params, xs, masks=masks, impl=impl)

    params = new_params(0)
    calls = []
    for s in range(3):
        masks = lj.make_dropout_masks(key=jax.random.PRNGKey(s), params=params, batch_size=B, time_steps=T,
                                      dropout=0.4, recurrent_dropout=0.4)
        calls.append((params, new_xs(s), masks))
    assert_no_recompile(f, traced, calls)


def _train_setup(impl):
    """A training step as a user writes it: lstm -> last valid output -> linear head ->
    softmax cross-entropy; jitted value_and_grad and an optax Adam update."""
    optimizer = optax.adam(1e-2)
    traced = [0]

    def loss_fn(model, xs, lengths, labels, key):
        params, head = model
        ys, final = lj.lstm(params, xs, lengths=lengths, dropout=0.2, recurrent_dropout=0.1,
                            variational=True, key=key, impl=impl)
        logits = final[-1].h @ head["w"] + head["b"] + 0.0 * jnp.sum(ys)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def train_step(model, opt_state, xs, lengths, labels, key):
        traced[0] += 1
        loss, grads = jax.value_and_grad(loss_fn)(model, xs, lengths, labels, key)
        updates, opt_state = optimizer.update(grads, opt_state, model)
        return optax.apply_updates(model, updates), opt_state, loss

    head = {"w": jnp.asarray(_rng(9).normal(size=(H, C)) * 0.3, jnp.float32), "b": jnp.zeros((C,), jnp.float32)}
    model = (new_params(0, layers=2), head)
    return train_step, traced, model, optimizer.init(model)


@pytest.mark.parametrize("impl", IMPLS)
def test_train_step_no_recompile(impl):
    """Feeding each step's outputs (params, optimizer state) into the next step, with new
    batches, lengths and dropout keys, never retraces or recompiles."""
    train_step, traced, model, opt_state = _train_setup(impl)
    batches = [
        (new_xs(s), new_lengths(s), jnp.asarray(_rng(s).integers(0, C, size=(B,)), jnp.int32),
         jax.random.PRNGKey(100 + s))
        for s in range(4)
    ]
    model, opt_state, loss0 = jax.block_until_ready(train_step(model, opt_state, *batches[0]))
    assert traced[0] == 1
    size = cache_size(train_step)
    losses = [loss0]
    with count_events() as events:
        for batch in batches[1:]:
            model, opt_state, loss = train_step(model, opt_state, *batch)
            losses.append(loss)
        jax.block_until_ready((model, opt_state))
    assert traced[0] == 1, f"retraced: {traced[0]} traces"
    assert events.traces == 0 and events.compiles == 0, (events.traces, events.compiles)
    if size is not None:
        assert cache_size(train_step) == size == 1
    assert all(np.isfinite(np.asarray(losses)))
    assert len(set(float(x) for x in losses)) > 1


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_no_recompile(impl):
    """jax.jit(jax.value_and_grad(...)) w.r.t. params, xs and initial state with lengths."""
    traced = [0]

    def loss(params, xs, state, lengths):
        traced[0] += 1
        ys, final = lj.lstm(params, xs, initial_state=state, lengths=lengths, impl=impl)
        return jnp.sum(ys ** 2) + sum(jnp.sum(s.h * s.c) for s in final)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    assert_no_recompile(f, traced, [(new_params(s), new_xs(s), new_state(s), new_lengths(s)) for s in range(3)])


def test_numpy_inputs_do_not_recompile():
    """A second call with NumPy arrays of the same shapes and dtypes (as a data loader
    yields them) reuses the compilation made for jax arrays: no trace, no compile. (The
    C++ fast-path cache does add an entry for the NumPy argument types, so _cache_size
    grows; that is dispatch bookkeeping, not a compilation.)"""
    traced = [0]

    @jax.jit
    def f(params, xs, lengths):
        traced[0] += 1
        return lj.lstm(params, xs, lengths=lengths)

    params = new_params(0)
    calls = [(params, new_xs(0), new_lengths(0)),
             (params, np.asarray(new_xs(1)), np.asarray(new_lengths(1))),
             (params, np.asarray(new_xs(2)), np.asarray(new_lengths(2)))]
    assert_no_recompile(f, traced, calls, check_cache_size=False)


def test_new_shape_does_recompile():
    """Control: a new time length is a new shape and does compile again (so the witnesses
    above would have caught a recompilation)."""
    traced = [0]

    @jax.jit
    def f(params, xs):
        traced[0] += 1
        return lj.lstm(params, xs)

    params = new_params(0)
    xs_long = jnp.zeros((B, T + 1, F))
    f(params, new_xs(0))
    with count_events() as events:
        f(params, xs_long)
    assert traced[0] == 2 and events.compiles >= 1
